"""UNet weights: diffusers UNet2DConditionModel key map and parity, official LDM / SD v1 checkpoints (ldm.convert)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from gencore.io import CheckpointKeyError
from gencore.testing import randomize_parameters
from ldm.convert import diffusers_unet_config, load_unet, unet_config_from_yaml, unet_from_diffusers, unet_to_diffusers
from ldm.models.unet import UNET_PRESETS, UNetModel

TINY = dict(UNET_PRESETS["tiny"])
BENCH = dict(UNET_PRESETS["bench"])  # BENCHMARKS.md "UNet fwd+bwd" row
PARITY_CONFIGS = {
    "tiny_num_heads": TINY,
    "num_head_channels_8": dict(TINY, num_heads=-1, num_head_channels=8),
    "three_heads_inner_width_30": dict(TINY, num_heads=3),
    "legacy_head_channels_depth2_scale_shift_classes": dict(
        TINY, num_heads=-1, num_head_channels=16, legacy=True, transformer_depth=2, use_scale_shift_norm=True,
        num_classes=3,
    ),
    "linear_proj_three_levels": dict(
        TINY, use_linear_in_transformer=True, channel_mult=[1, 2, 2], attention_resolutions=[1, 4], num_res_blocks=2
    ),
    "benchmark_row": BENCH,
}  # fmt: skip


def _pair(cfg: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    ours = randomize_parameters(UNetModel(**cfg), seed=seed).eval()
    theirs = UNet2DConditionModel(**diffusers_unet_config(**cfg)).eval()
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg), strict=True)
    return ours, theirs


# ------------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_parity_with_diffusers_unet_forward_and_backward(name):
    cfg = PARITY_CONFIGS[name]
    ours, theirs = _pair(cfg)
    torch.manual_seed(1)
    batch, size = (1, 16) if name == "benchmark_row" else (2, 8)  # 16x16: 256 tokens, 8-wide heads (padded path)
    x = torch.randn(batch, cfg["in_channels"], size, size)
    t = torch.tensor([10, 500][:batch])
    ctx = torch.randn(batch, 16 if name == "benchmark_row" else 5, cfg["context_dim"])
    y = torch.tensor([0, 2]) if cfg.get("num_classes") else None
    a = ours(x, t, ctx, y=y)
    b = theirs(x, t, ctx, class_labels=y).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a.mean().backward()
    b.mean().backward()
    ours_grads = unet_to_diffusers({n: p.grad for n, p in ours.named_parameters()}, cfg)
    for n, p in theirs.named_parameters():
        torch.testing.assert_close(ours_grads[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_diffusers_key_map_round_trip_is_exact():
    for cfg in PARITY_CONFIGS.values():
        sd = UNetModel(**cfg).state_dict()
        mapped = unet_to_diffusers(sd, cfg)
        assert len(mapped) == len(sd)
        back = unet_from_diffusers(mapped, cfg)
        assert list(back) == list(sd)
        assert all(back[k] is v for k, v in sd.items())


def test_key_map_agrees_with_diffusers_own_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for cfg in (BENCH, PARITY_CONFIGS["legacy_head_channels_depth2_scale_shift_classes"]):
        sd = UNetModel(**cfg).state_dict()
        official = {"model.diffusion_model." + k: v for k, v in sd.items()}
        ref = convert_ldm_unet_checkpoint(official, diffusers_unet_config(**cfg))
        ours = unet_to_diffusers(sd, cfg)
        assert sorted(ours) == sorted(ref)
        assert all(ours[k] is ref[k] for k in ref)
    mapped = unet_to_diffusers(UNetModel(**BENCH).state_dict(), BENCH)
    sd = UNetModel(**BENCH).state_dict()
    assert {k for k in mapped if "upsamplers" in k} == {
        f"up_blocks.{b}.upsamplers.0.conv.{w}" for b in (0, 1) for w in ("weight", "bias")
    }
    assert mapped["up_blocks.0.upsamplers.0.conv.weight"].shape == sd["output_blocks.2.1.conv.weight"].shape


def test_diffusers_config_for_stable_diffusion_v1():
    cfg = diffusers_unet_config(**UNET_PRESETS["sd_v1"])
    assert cfg["block_out_channels"] == [320, 640, 1280, 1280]
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert cfg["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert cfg["attention_head_dim"] == [8, 8, 8, 8]  # diffusers' name for the head count
    assert (cfg["cross_attention_dim"], cfg["layers_per_block"], cfg["norm_eps"]) == (768, 2, 1e-5)
    assert (cfg["flip_sin_to_cos"], cfg["freq_shift"], cfg["use_linear_projection"]) == (True, 0, False)
    # num_head_channels 32: the head count grows with the width (256, 512, 1024 channels)
    assert diffusers_unet_config(**UNET_PRESETS["cin_ldm_vq8"])["attention_head_dim"] == [8, 16, 32]
    assert diffusers_unet_config(**BENCH)["attention_head_dim"] == [8, 8, 8]


@pytest.mark.parametrize(
    "cfg,match",
    [
        (UNET_PRESETS["celebahq_vq4"], "AttentionBlock"),
        (UNET_PRESETS["lsun_churches_kl8"], "AttentionBlock"),
        (dict(TINY, resblock_updown=True), "resblock_updown"),
        (dict(TINY, conv_resample=False), "conv_resample"),
        (dict(TINY, model_channels=96, num_heads=-1, num_head_channels=64), "does not divide the attention width 96"),
    ],
)
def test_configs_diffusers_cannot_express_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        diffusers_unet_config(**cfg)
    with pytest.raises(ValueError, match=match):
        unet_to_diffusers({}, cfg)


# ---------------------------------------------------------------------------------------- official checkpoints


@pytest.fixture(scope="module")
def raw_and_ema() -> tuple[UNetModel, UNetModel]:
    return randomize_parameters(UNetModel(**TINY), seed=1).eval(), randomize_parameters(
        UNetModel(**TINY), seed=2
    ).eval()


def _official_ckpt(raw: UNetModel, ema: UNetModel) -> dict:
    """A Lightning-1.x-like LatentDiffusion checkpoint: UNet, first stage, conditioner, schedule buffers, LitEma."""
    sd = {"model.diffusion_model." + k: v.clone() for k, v in raw.state_dict().items()}
    sd.update(
        {"model_ema." + ("diffusion_model." + k).replace(".", ""): v.clone() for k, v in ema.state_dict().items()}
    )
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3)
    sd["first_stage_model.quant_conv.weight"] = torch.randn(8, 8, 1, 1)
    sd["cond_stage_model.embedding.weight"] = torch.randn(1001, 16)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_variance"):
        sd[name] = torch.rand(1000, dtype=torch.float64)
    return {
        "epoch": 3,
        "global_step": 100_000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "best_model_path": "last.ckpt"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-6}]}],
        "lr_schedulers": [],
        "hyper_parameters": OmegaConf.create({"unet_config": {"params": TINY}}),
    }


def _official_yaml(tmp_path) -> str:
    cfg = {
        "model": {
            "base_learning_rate": 1e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": TINY},
                "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4}},
            },
        }
    }
    path = tmp_path / "v1-inference.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return str(path)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("use_ema", [False, True], ids=["raw", "ema"])
def test_official_ckpt_loads_in_one_call(raw_and_ema, tmp_path, use_ema):
    raw, ema = raw_and_ema
    path = tmp_path / "last.ckpt"
    torch.save(_official_ckpt(raw, ema), path)
    model = load_unet(path, preset="tiny", use_ema=use_ema)
    assert isinstance(model, UNetModel) and not model.training
    assert _same_weights(model, ema if use_ema else raw)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), (ema if use_ema else raw)(x, t, ctx))
    assert _same_weights(load_unet(path, config=_official_yaml(tmp_path), use_ema=use_ema), model)


def test_official_yaml_and_plain_kwargs_give_the_same_config(tmp_path):
    assert unet_config_from_yaml(_official_yaml(tmp_path)) == TINY
    assert unet_config_from_yaml(OmegaConf.load(_official_yaml(tmp_path)).model.params.unet_config) == TINY
    assert unet_config_from_yaml(dict(TINY, use_fp16=False)) == TINY


def test_missing_keys_are_named(raw_and_ema, tmp_path):
    raw, ema = raw_and_ema
    ckpt = _official_ckpt(raw, ema)
    del ckpt["state_dict"]["model.diffusion_model.out.2.bias"]
    del ckpt["state_dict"]["model_ema.diffusion_modelmiddle_block1proj_inweight"]
    with pytest.raises(CheckpointKeyError, match=r"missing key.*out\.2\.bias"):
        load_unet(ckpt, preset="tiny")
    with pytest.raises(CheckpointKeyError, match=r"model_ema\.diffusion_modelmiddle_block1proj_inweight"):
        load_unet(ckpt, preset="tiny", use_ema=True)
    with pytest.raises(CheckpointKeyError, match="no UNet weights"):
        load_unet({"state_dict": {"first_stage_model.x": torch.zeros(1)}}, preset="tiny")
    with pytest.raises(ValueError, match="preset= or config="):
        load_unet(ckpt)


def test_bare_and_diffusers_state_dicts_load(raw_and_ema):
    raw, _ = raw_and_ema
    assert _same_weights(load_unet(raw.state_dict(), preset="tiny"), raw)
    assert _same_weights(load_unet(unet_to_diffusers(raw.state_dict(), TINY), preset="tiny"), raw)
