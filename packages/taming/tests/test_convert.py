"""Official VQGAN checkpoints and the diffusers VQModel key map (taming.convert)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from gencore.io import CheckpointKeyError
from gencore.testing import randomize_parameters
from taming.conditioning import ClassConditioner, SOSConditioner, SpatialConditioner
from taming.convert import diffusers_vq_config, from_diffusers_vq, load_net2net, load_vqgan, to_diffusers_vq
from taming.lit import Net2NetTransformer
from taming.models.mingpt import GPT
from taming.models.vqgan import GumbelVQ, VQModel, build_vqmodel

PARITY_DD = dict(
    double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
    num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
)  # fmt: skip
# docs BENCHMARKS.md, VQGAN row: 3 levels (64, 128, 128), 2 res blocks, latent 64, 1024 codes, embed 64, no level attn
BENCH_DD = dict(
    double_z=False, z_channels=64, resolution=64, in_channels=3, out_ch=3, ch=64, ch_mult=[1, 2, 2],
    num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def trained() -> VQModel:
    torch.manual_seed(0)
    return randomize_parameters(VQModel(ddconfig=PARITY_DD, n_embed=64, embed_dim=16), seed=7).eval()


def _loss_entries(ndf: int = 16) -> dict[str, torch.Tensor]:
    """Training-only weights of an official checkpoint: NLayerDiscriminator (BatchNorm) + LPIPS (names real)."""
    out: dict[str, torch.Tensor] = {}
    chans = [3, ndf, 2 * ndf, 4 * ndf, 8 * ndf]
    out["loss.discriminator.main.0.weight"] = torch.randn(ndf, 3, 4, 4)
    out["loss.discriminator.main.0.bias"] = torch.randn(ndf)
    for conv, bn, cin, cout in ((2, 3, 1, 2), (5, 6, 2, 3), (8, 9, 3, 4)):
        out[f"loss.discriminator.main.{conv}.weight"] = torch.randn(chans[cout], chans[cin], 4, 4)
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"loss.discriminator.main.{bn}.{name}"] = torch.randn(chans[cout])
        out[f"loss.discriminator.main.{bn}.num_batches_tracked"] = torch.tensor(1000)
    out["loss.discriminator.main.11.weight"] = torch.randn(1, chans[4], 4, 4)
    out["loss.discriminator.main.11.bias"] = torch.randn(1)
    out["loss.perceptual_loss.scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    out["loss.perceptual_loss.scaling_layer.scale"] = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]
    out["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    out["loss.perceptual_loss.net.slice1.0.bias"] = torch.randn(64)
    for i, c in enumerate((64, 128, 256, 512, 512)):
        out[f"loss.perceptual_loss.lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1)
    return out


def _official_ckpt(state: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """A Lightning-1.x-like checkpoint dict (with OmegaConf hparams, as the official main.py writes them)."""
    sd = {prefix + k: v.clone() for k, v in state.items()}
    sd.update({prefix + k: v for k, v in _loss_entries().items()})
    return {
        "epoch": 12,
        "global_step": 250_001,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "best_model_path": "last.ckpt"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9)}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": OmegaConf.create({"n_embed": 64, "embed_dim": 16, "ddconfig": PARITY_DD}),
    }


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _project_yaml(tmp_path, target="taming.models.vqgan.VQModel", **extra) -> str:
    params = {
        "embed_dim": 16,
        "n_embed": 64,
        "ddconfig": PARITY_DD,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 250001, "disc_weight": 0.8, "codebook_weight": 1.0}},
        **extra,
    }  # fmt: skip
    cfg = {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": params}, "data": {"target": "x"}}
    path = tmp_path / "2020-11-09T13-33-36-project.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return str(path)


# ---------------------------------------------------------------------------------------- official checkpoints


@pytest.mark.parametrize("how", ["config", "preset_free", "dict_config"])
def test_official_ckpt_loads_in_one_call_and_reproduces_outputs(trained, tmp_path, how):
    path = tmp_path / "last.ckpt"
    torch.save(_official_ckpt(trained.state_dict()), path)
    if how == "config":
        model = load_vqgan(path, config=_project_yaml(tmp_path))
    elif how == "dict_config":
        model = load_vqgan(path, config=OmegaConf.load(_project_yaml(tmp_path)).model)
    else:
        model = load_vqgan(path)  # architecture read off the weights
    assert type(model) is VQModel and not model.training
    _assert_same_weights(model, trained)
    if how == "config":
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            a, b = trained(x), model(x)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_missing_or_renamed_key_is_named(trained, tmp_path):
    ckpt = _official_ckpt(trained.state_dict())
    del ckpt["state_dict"]["decoder.conv_out.bias"]
    torch.save(ckpt, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointKeyError, match=r"missing key.*decoder\.conv_out\.bias"):
        load_vqgan(tmp_path / "missing.ckpt", config=_project_yaml(tmp_path))

    ckpt = _official_ckpt(trained.state_dict())
    ckpt["state_dict"]["quantize.embed.weight"] = ckpt["state_dict"].pop("quantize.embedding.weight")
    with pytest.raises(CheckpointKeyError) as err:
        load_vqgan(ckpt, config=_project_yaml(tmp_path))
    assert err.value.missing == ["quantize.embedding.weight"] and err.value.unexpected == ["quantize.embed.weight"]

    with pytest.raises(CheckpointKeyError, match="shape mismatch"):
        load_vqgan(_official_ckpt(trained.state_dict()), preset="tiny")


def test_nested_prefixes_of_a_transformer_checkpoint(trained):
    torch.manual_seed(1)
    cond = randomize_parameters(VQModel(ddconfig=PARITY_DD, n_embed=64, embed_dim=16), seed=8).eval()
    ckpt = _official_ckpt(trained.state_dict(), prefix="first_stage_model.")
    ckpt["state_dict"].update({f"cond_stage_model.{k}": v for k, v in cond.state_dict().items()})
    ckpt["state_dict"]["transformer.tok_emb.weight"] = torch.randn(64, 32)
    _assert_same_weights(load_vqgan(ckpt), trained)  # auto: first_stage_model.
    _assert_same_weights(load_vqgan(ckpt, prefix="cond_stage_model."), cond)
    # the transformer's project.yaml names both stages
    stage = {"target": "taming.models.vqgan.VQModel", "params": {"embed_dim": 16, "n_embed": 64, "ddconfig": PARITY_DD}}
    cfg = {"model": {"target": "taming.models.cond_transformer.Net2NetTransformer",
                     "params": {"first_stage_config": stage, "cond_stage_config": stage}}}  # fmt: skip
    _assert_same_weights(load_vqgan(ckpt, config=cfg, prefix="cond_stage_model."), cond)
    with pytest.raises(CheckpointKeyError, match="prefix 'nope.'"):
        load_vqgan(ckpt, prefix="nope.")


def test_gumbel_ckpt_detected_by_target(tmp_path):
    torch.manual_seed(2)
    g = randomize_parameters(GumbelVQ(ddconfig=PARITY_DD, n_embed=64, embed_dim=16), seed=9)
    sched = {"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
             "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9, "lr_max": 0.9,
                        "lr_min": 1.0e-6}}  # fmt: skip
    cfg = _project_yaml(tmp_path, "taming.models.vqgan.GumbelVQ", kl_weight=1e-8, temperature_scheduler_config=sched)
    path = tmp_path / "gumbel.ckpt"
    torch.save(_official_ckpt(g.state_dict()), path)
    loaded = load_vqgan(path, config=cfg)
    assert isinstance(loaded, GumbelVQ) and loaded.quantize.kl_weight == 1e-8
    assert loaded.temperature_schedule(0) == pytest.approx(0.9)
    assert isinstance(load_vqgan(path), GumbelVQ)  # also read off the weights (quantize.proj)
    _assert_same_weights(loaded, g)


def test_remapped_ckpt_uses_the_used_buffer(tmp_path):
    torch.manual_seed(3)
    m = VQModel(ddconfig=PARITY_DD, n_embed=64, embed_dim=16, remap=torch.arange(0, 64, 4))
    ckpt = _official_ckpt(m.state_dict())
    cfg = _project_yaml(tmp_path, remap="data/imagenet_used_codes.npy")  # a path that does not exist here
    loaded = load_vqgan(ckpt, config=cfg)
    assert torch.equal(loaded.quantize.used, torch.arange(0, 64, 4)) and loaded.vocab_size == 16


def test_unsupported_target_and_bad_input(tmp_path):
    with pytest.raises(ValueError, match="EMAVQ"):
        load_vqgan({"state_dict": {}}, config=_project_yaml(tmp_path, "taming.models.vqgan.EMAVQ"))
    with pytest.raises(ValueError, match="mapping"):
        load_vqgan(3)


# ------------------------------------------------------------------------------------------------- diffusers


def _diffusers_pair(dd: dict, n_embed: int, embed_dim: int):
    from diffusers import VQModel as DiffusersVQModel

    torch.manual_seed(0)
    ours = randomize_parameters(VQModel(ddconfig=dd, n_embed=n_embed, embed_dim=embed_dim), seed=11).eval()
    theirs = DiffusersVQModel(**diffusers_vq_config(dd, n_embed, embed_dim)).eval()
    theirs.load_state_dict(to_diffusers_vq(ours.state_dict()), strict=True)
    return ours, theirs


@pytest.mark.parametrize(
    "dd,n_embed,embed_dim,size",
    [(BENCH_DD, 1024, 64, 16), (PARITY_DD, 64, 16, 16), (dict(PARITY_DD, attn_type="none"), 64, 16, 16)],
    ids=["benchmark_row", "level_attention", "attn_none"],
)
def test_parity_with_diffusers_vqmodel(dd, n_embed, embed_dim, size):
    ours, theirs = _diffusers_pair(dd, n_embed, embed_dim)
    x = torch.randn(1, 3, size, size)
    tol = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        h = theirs.encode(x).latents
        torch.testing.assert_close(ours.encode_to_prequant(x), h, **tol)
        quant, loss, (_, _, idx) = ours.encode(x)
        d_quant, d_loss, (_, _, d_idx) = theirs.quantize(h)
        assert torch.equal(idx, d_idx.flatten())
        torch.testing.assert_close(quant, d_quant, **tol)
        torch.testing.assert_close(loss, d_loss, **tol)
        torch.testing.assert_close(ours.decode(quant), theirs.decode(h).sample, **tol)  # = forward(x) of both


def test_diffusers_key_map_round_trip_is_exact():
    torch.manual_seed(0)
    for dd in (BENCH_DD, PARITY_DD):
        sd = VQModel(ddconfig=dd, n_embed=64, embed_dim=16).state_dict()
        mapped = to_diffusers_vq(sd)
        assert len(mapped) == len(sd)
        back = from_diffusers_vq(mapped)
        assert list(back) == list(sd)
        assert all(torch.equal(back[k], v) and back[k].shape == v.shape for k, v in sd.items())
    sd = VQModel(ddconfig=PARITY_DD, n_embed=64, embed_dim=16).state_dict()
    mapped = to_diffusers_vq(sd)
    # decoder levels reversed: official up[2] (8x8, with attention) is diffusers up_blocks[0]
    assert torch.equal(
        mapped["decoder.up_blocks.0.attentions.1.to_k.weight"], sd["decoder.up.2.attn.1.k.weight"][:, :, 0, 0]
    )
    assert torch.equal(mapped["decoder.up_blocks.1.upsamplers.0.conv.weight"], sd["decoder.up.1.upsample.conv.weight"])
    assert torch.equal(mapped["encoder.conv_norm_out.bias"], sd["encoder.norm_out.bias"])
    assert "decoder.up_blocks.2.upsamplers.0.conv.weight" not in mapped
    legacy = {k.replace("to_q.", "query.").replace("to_out.0.", "proj_attn."): v for k, v in mapped.items()}
    assert all(torch.equal(from_diffusers_vq(legacy)[k], v) for k, v in sd.items())


def test_diffusers_config_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="ch_mult"):
        diffusers_vq_config(dict(PARITY_DD, ch_mult=[2, 2]), 64, 16)
    with pytest.raises(ValueError, match="resamp_with_conv"):
        diffusers_vq_config(dict(PARITY_DD, resamp_with_conv=False), 64, 16)
    torch.manual_seed(0)
    g = GumbelVQ(ddconfig=PARITY_DD, n_embed=64, embed_dim=16)
    with pytest.raises(ValueError, match="quantize.proj"):
        to_diffusers_vq(g.state_dict())


def _official_net2net_config(cond):
    vq = {
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": 16,
            "n_embed": 64,
            "ddconfig": {
                "double_z": False,
                "z_channels": 16,
                "resolution": 16,
                "in_channels": 1,
                "out_ch": 1,
                "ch": 32,
                "ch_mult": [1, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [8],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "taming.modules.losses.DummyLoss"},
        },
    }
    cond_cfg = {
        "sos": "__is_unconditional__",
        "class": {"target": "taming.modules.util.Labelator", "params": {"n_classes": 10}},
        "vq": vq,
    }[cond]
    return {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.cond_transformer.Net2NetTransformer",
            "params": {
                "cond_stage_key": "depth",
                "unconditional": cond == "sos",
                "sos_token": 3,
                "transformer_config": {
                    "target": "taming.modules.transformer.mingpt.GPT",
                    "params": {"vocab_size": 64, "block_size": 127, "n_layer": 2, "n_head": 2, "n_embd": 32},
                },
                "first_stage_config": vq,
                "cond_stage_config": cond_cfg,
            },
        }
    }


@pytest.mark.parametrize("cond", ["sos", "class", "vq"])
def test_official_net2net_checkpoint_loads_in_one_call(tmp_path, cond):
    cfg = _official_net2net_config(cond)
    (tmp_path / "project.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    # a model with the official layout, randomised, saved the way the released checkpoints are
    gpt = GPT(vocab_size=64, block_size=127, n_layer=2, n_head=2, n_embd=32)
    first = build_vqmodel("tiny")
    conditioner = {
        "sos": SOSConditioner(3),
        "class": ClassConditioner(10),
        "vq": SpatialConditioner(build_vqmodel("tiny"), cond_key="depth"),
    }[cond]
    src = Net2NetTransformer(gpt, first, conditioner)
    randomize_parameters(src, seed=1)
    state = dict(src.state_dict())
    assert all(k.split(".")[0] in ("transformer", "first_stage_model", "cond_stage_model") for k in state)
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "last.ckpt")
    loaded = load_net2net(tmp_path / "last.ckpt", config=tmp_path / "project.yaml")
    depth = torch.rand(2, 1, 16, 16) * 2 - 1
    batch = {"image": -depth, "label": torch.tensor([1, 7]), "depth": depth}
    c = src.encode_to_c(batch, 2)
    assert torch.equal(loaded.encode_to_c(batch, 2), c)  # the same conditioning tokens from the same batch
    expected = {"sos": [[3], [3]], "class": [[1], [7]]}  # SOSProvider(3); Labelator without offset
    if cond in expected:
        assert c.tolist() == expected[cond]
    else:  # the depth map's codes under the conditioning VQGAN
        assert torch.equal(c, src.cond_stage_model.vqgan.encode_to_indices(depth).flatten(1))
    z = torch.randint(0, 64, (2, 64))
    src.eval()
    torch.testing.assert_close(loaded(z, c)[0], src(z, c)[0])
    del state["transformer.head.weight"]
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointKeyError, match="transformer.head.weight"):
        load_net2net(tmp_path / "broken.ckpt", config=cfg)
