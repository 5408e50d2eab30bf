"""LDM's KL autoencoder: structure, posterior, diffusers parity / key maps, official checkpoints, the codec."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from gencore.io import CheckpointKeyError, export
from gencore.latents import VAE_PRESETS, estimate_scale
from gencore.testing import assert_grads_reach_all_parameters, assert_state_dict_roundtrip, randomize_parameters
from ldm.convert import (
    autoencoder_from_diffusers,
    autoencoder_to_diffusers,
    diffusers_autoencoder_config,
    load_autoencoder,
)
from ldm.first_stage import KLCodec, kl_codec
from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL, DiagonalGaussianDistribution, build_autoencoder

# ldm.md "Suggested tests": the reference tiny AutoencoderKL (= preset "tiny")
TINY_DD = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
    num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny() -> AutoencoderKL:
    torch.manual_seed(0)
    return randomize_parameters(AutoencoderKL(ddconfig=TINY_DD, embed_dim=4), seed=7).eval()


@pytest.fixture(scope="module")
def kl_f8() -> AutoencoderKL:
    torch.manual_seed(0)
    return randomize_parameters(build_autoencoder("kl_f8"), seed=11, std=0.02).eval()


# ----------------------------------------------------------------------------------------------- structure


def test_tiny_reference_config_has_the_official_182_keys(tiny):
    sd = tiny.state_dict()
    # 72 encoder + 106 decoder + quant_conv / post_quant_conv (weight, bias); checked once against the official
    # ldm/modules/diffusionmodules/model.py Encoder / Decoder: same keys in the same order, same shapes
    assert len(sd) == 182
    assert sum(k.startswith("encoder.") for k in sd) == 72 and sum(k.startswith("decoder.") for k in sd) == 106
    assert sd["encoder.conv_out.weight"].shape == (8, 64, 3, 3)  # double_z: mean and log-variance
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1) and sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    # attention only at the 8x8 level (encoder down[2], decoder up[2]: up[] is indexed by resolution level)
    assert "encoder.down.2.attn.0.q.weight" in sd and "encoder.down.1.attn.0.q.weight" not in sd
    assert "decoder.up.2.attn.1.proj_out.weight" in sd and "decoder.up.0.attn.0.q.weight" not in sd
    assert "encoder.mid.attn_1.k.weight" in sd and "decoder.mid.attn_1.v.bias" in sd
    assert "encoder.down.1.downsample.conv.weight" in sd and "encoder.down.2.downsample.conv.weight" not in sd
    assert "decoder.up.1.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert not any(k.startswith("loss.") for k in sd)
    assert tiny.encoder.norm_out.eps == 1e-6  # AE GroupNorm eps (the UNet uses 1e-5)


def test_presets_match_the_released_configs():
    expected = {  # ldm.md first-stage table: ch_mult, z = embed, attn_res, f
        "kl_f4": ([1, 2, 4], 3, [], 4),
        "kl_f8": ([1, 2, 4, 4], 4, [], 8),
        "kl_f16": ([1, 1, 2, 2, 4], 16, [16], 16),
        "kl_f32": ([1, 1, 2, 2, 4, 4], 64, [16, 8], 32),
    }
    for name, (ch_mult, z, attn, f) in expected.items():
        cfg = AUTOENCODER_PRESETS[name]
        dd = cfg["ddconfig"]
        assert (dd["ch_mult"], dd["z_channels"], cfg["embed_dim"], dd["attn_resolutions"]) == (ch_mult, z, z, attn)
        assert (dd["ch"], dd["num_res_blocks"], dd["resolution"], dd["double_z"]) == (128, 2, 256, True)
        with torch.device("meta"):  # no memory, no init cost
            model = build_autoencoder(name)
        assert model.downsample_factor == f and model.latent_channels == z
    with torch.device("meta"):
        sd_vae = build_autoencoder("kl_f8")
    assert sum(p.numel() for p in sd_vae.parameters()) == 83_653_863  # the Stable Diffusion VAE
    assert len(sd_vae.state_dict()) == 248
    small = build_autoencoder("fmnist_kl_f4")
    assert small.latent_shape(32, 32) == (4, 8, 8) and small.in_channels == 1
    assert build_autoencoder("fmnist_kl_f4_c16").latent_shape(32, 32) == (16, 8, 8)
    assert len(build_autoencoder("tiny").state_dict()) == 182
    grey = build_autoencoder("tiny", ddconfig={"in_channels": 1, "out_ch": 1})
    assert grey.in_channels == 1 and grey.ddconfig["ch"] == 32


def test_encode_decode_shapes_and_forward(tiny):
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        post = tiny.encode(x)
        assert post.mean.shape == post.logvar.shape == (2, 4, 4, 6)
        rec = tiny.decode(post.mode())
        assert rec.shape == x.shape
        det, post2 = tiny(x, sample_posterior=False)
        assert torch.equal(det, rec) and torch.equal(post2.mean, post.mean)
        g = torch.Generator().manual_seed(1)
        a, _ = tiny(x, generator=g)
        g = torch.Generator().manual_seed(1)
        b, _ = tiny(x, generator=g)
        assert torch.equal(a, b) and not torch.equal(a, det)  # sampled posterior, reproducible with a generator


def test_bad_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="3 image channels, got 1"):
        tiny.encode(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        tiny.encode(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"latents \(B, 4, h, w\)"):
        tiny.decode(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="double_z=True"):
        AutoencoderKL(ddconfig={**TINY_DD, "double_z": False}, embed_dim=4)
    with pytest.raises(ValueError, match="use_linear_attn"):
        AutoencoderKL(ddconfig={**TINY_DD, "use_linear_attn": True}, embed_dim=4)
    with pytest.raises(ValueError, match="attn_type"):
        AutoencoderKL(ddconfig={**TINY_DD, "attn_type": "linear"}, embed_dim=4)
    with pytest.raises(ValueError, match="lacks"):
        AutoencoderKL(ddconfig={"ch": 32}, embed_dim=4)
    with pytest.raises(ValueError, match="embed_dim must be >= 1"):
        AutoencoderKL(ddconfig=TINY_DD, embed_dim=0)
    with pytest.raises(ValueError, match="unknown AutoencoderKL preset 'kl_f64'"):
        build_autoencoder("kl_f64")
    with pytest.raises(ValueError, match="needs a preset"):
        build_autoencoder(ddconfig=TINY_DD)
    with pytest.raises(ValueError, match="moments"):
        DiagonalGaussianDistribution(torch.randn(2, 3, 4, 4))


def test_gradients_reach_all_parameters_and_state_dict_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = build_autoencoder("fmnist_kl_f4").train()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    rec, post = model(x)
    assert_grads_reach_all_parameters(model, (rec - x).abs().mean() + 1e-3 * post.kl().mean())
    assert_state_dict_roundtrip(
        model, lambda: build_autoencoder("fmnist_kl_f4"), (x,), tmp_path, sample_posterior=False
    )


# ----------------------------------------------------------------------------------------------- posterior


def test_posterior_kl_mode_nll_against_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    by_hand = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,)
    torch.testing.assert_close(post.kl(), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        post.kl(), torch.distributions.kl_divergence(q, std_normal).sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5
    )
    m2, lv2 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    other = DiagonalGaussianDistribution(torch.cat([m2, lv2], 1))
    p = torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    torch.testing.assert_close(
        post.kl(other), torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5
    )
    assert post.kl(post).abs().max() < 1e-5
    assert torch.equal(post.mode(), mean)
    s = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(post.nll(s), -q.log_prob(s).sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)


def test_posterior_sample_statistics_clamp_and_deterministic():
    mean = torch.full((1, 4, 64, 64), 0.5)
    logvar = torch.full((1, 4, 64, 64), math.log(4.0))
    post = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    s = post.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 0.5) < 0.05 and abs(s.std().item() - 2.0) < 0.05  # 16384 draws
    clamped = DiagonalGaussianDistribution(
        torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([100.0, -100.0]).view(1, 2, 1, 1)], 1)
    )
    assert clamped.logvar.flatten().tolist() == [20.0, -30.0]
    assert torch.allclose(clamped.var.flatten(), torch.tensor([math.exp(20.0), math.exp(-30.0)]))
    det = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1), deterministic=True)
    assert torch.equal(det.sample(), mean) and torch.equal(det.kl(), torch.zeros(1))
    # reparameterised: the sample carries gradients to mean and log-variance
    params = torch.randn(2, 8, 2, 2, requires_grad=True)
    DiagonalGaussianDistribution(params).sample().sum().backward()
    assert params.grad[:, :4].abs().min() > 0 and params.grad[:, 4:].abs().sum() > 0


# ----------------------------------------------------------------------------------------------- diffusers


def _diffusers_twin(model: AutoencoderKL):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    theirs = DiffusersAutoencoderKL(**diffusers_autoencoder_config(model.ddconfig, model.embed_dim)).eval()
    theirs.load_state_dict(autoencoder_to_diffusers(model.state_dict()), strict=True)
    return theirs


@pytest.mark.parametrize("which, shape, e2e_tol", [("tiny", (2, 3, 32, 32), 1e-4), ("kl_f8", (1, 3, 16, 16), 1e-5)])
def test_parity_with_diffusers_autoencoderkl(which, shape, e2e_tol, request):
    ours = request.getfixturevalue(which)
    theirs = _diffusers_twin(ours)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    tol = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        post, dist = ours.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(post.mean, dist.mean, **tol)
        torch.testing.assert_close(post.logvar, dist.logvar, **tol)
        z = dist.mode()
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, **tol)  # decoders on the same latents
        a = ours.decode(post.mode())
        b = theirs.decode(dist.mode()).sample
    assert a.shape == shape and a.abs().mean() > 1e-2  # non-trivial output
    # end to end in fp32: 1e-5 for the SD kl-f8 layout; the tiny random decoder amplifies the ~3e-7 fp32 latent
    # difference (a 3e-7 latent perturbation alone moves its output by ~1e-5), so its bound is 1e-4 ...
    torch.testing.assert_close(a, b, rtol=e2e_tol, atol=e2e_tol)
    if which == "tiny":  # ... and in fp64 the two implementations agree to rounding
        ours64, theirs64 = copy.deepcopy(ours).double(), theirs.double()
        with torch.no_grad():
            a64 = ours64.decode(ours64.encode(x.double()).mode())
            b64 = theirs64.decode(theirs64.encode(x.double()).latent_dist.mode()).sample
        torch.testing.assert_close(a64, b64, rtol=1e-10, atol=1e-10)


def test_key_map_round_trip_is_exact_and_reverses_decoder_levels(tiny):
    sd = tiny.state_dict()
    mapped = autoencoder_to_diffusers(sd)
    assert len(mapped) == len(sd)
    back = autoencoder_from_diffusers(mapped)
    assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    # decoder up[2] (8x8, with attention) is diffusers up_blocks[0]; attention 1x1 convs become Linear weights
    assert torch.equal(
        mapped["decoder.up_blocks.0.attentions.1.to_out.0.weight"],
        sd["decoder.up.2.attn.1.proj_out.weight"][:, :, 0, 0],
    )
    assert torch.equal(
        mapped["encoder.down_blocks.0.resnets.0.conv1.weight"], sd["encoder.down.0.block.0.conv1.weight"]
    )
    assert torch.equal(mapped["decoder.conv_norm_out.weight"], sd["decoder.norm_out.weight"])
    assert torch.equal(mapped["quant_conv.weight"], sd["quant_conv.weight"])
    # training-only loss.* entries are dropped; foreign keys are refused
    assert autoencoder_to_diffusers({**sd, "loss.logvar": torch.zeros(())}).keys() == mapped.keys()
    with pytest.raises(ValueError, match="VQ model"):
        autoencoder_to_diffusers({**sd, "quantize.embedding.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="unexpected keys"):
        autoencoder_from_diffusers({**mapped, "model.diffusion_model.out.2.weight": torch.zeros(1)})


def test_diffusers_own_converter_agrees_with_the_key_map(kl_f8):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = kl_f8.state_dict()
    ours = autoencoder_to_diffusers(sd)
    cfg = diffusers_autoencoder_config(kl_f8.ddconfig, kl_f8.embed_dim)
    theirs = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in sd.items()}, cfg)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_diffusers_config_is_the_sd_vae_config_and_refuses_the_inexpressible():
    cfg = diffusers_autoencoder_config(AUTOENCODER_PRESETS["kl_f8"]["ddconfig"], 4)
    sd = VAE_PRESETS["sd"]  # gencore's copy of the SD VAE config.json
    for key, value in sd.items():
        if key != "sample_size":
            assert (list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key]) == value, key
    f16 = diffusers_autoencoder_config(AUTOENCODER_PRESETS["kl_f16"]["ddconfig"], 16, scaling_factor=1.0)
    assert (
        f16["down_block_types"][-1] == "AttnDownEncoderBlock2D" and f16["up_block_types"][0] == "AttnUpDecoderBlock2D"
    )
    assert f16["scaling_factor"] == 1.0
    with pytest.raises(ValueError, match="embed_dim == z_channels"):
        diffusers_autoencoder_config(TINY_DD, 8)
    with pytest.raises(ValueError, match="ch_mult"):
        diffusers_autoencoder_config({**TINY_DD, "ch_mult": [2, 2]}, 4)


# ------------------------------------------------------------------------------------- official checkpoints


def _loss_entries() -> dict[str, torch.Tensor]:
    """Training-only weights of an official first-stage checkpoint (logvar, a tiny discriminator, LPIPS names)."""
    return {
        "loss.logvar": torch.tensor(0.0),
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
        "loss.discriminator.main.0.bias": torch.randn(8),
        "loss.discriminator.main.3.running_mean": torch.randn(16),
        "loss.discriminator.main.3.num_batches_tracked": torch.tensor(1000),
        "loss.perceptual_loss.scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None],
        "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3),
        "loss.perceptual_loss.lin0.model.1.weight": torch.rand(1, 64, 1, 1),
    }


def _official_ckpt(state: dict[str, torch.Tensor]) -> dict:
    """A Lightning-1.x-like first-stage checkpoint (as the official main.py writes it)."""
    sd = {k: v.clone() for k, v in state.items()}
    sd.update(_loss_entries())
    return {
        "epoch": 3,
        "global_step": 123_456,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1), "best_model_path": "last.ckpt"}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9)}]}] * 2,
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": OmegaConf.create({"embed_dim": 4, "ddconfig": TINY_DD}),
    }


def _sd_like_ckpt(state: dict[str, torch.Tensor], scale_by_std: bool = False) -> dict:
    """A Stable-Diffusion-v1-like LatentDiffusion checkpoint: UNet, first stage, text encoder, schedule buffers."""
    sd = {f"first_stage_model.{k}": v.clone() for k, v in state.items()}
    sd.update({
        "model.diffusion_model.time_embed.0.weight": torch.randn(16, 4),
        "model.diffusion_model.out.2.weight": torch.randn(4, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
        "betas": torch.linspace(8.5e-4, 0.012, 1000, dtype=torch.float64),
        "alphas_cumprod": torch.rand(1000, dtype=torch.float64),
        "model_ema.decay": torch.tensor(0.9999),
    })  # fmt: skip
    if scale_by_std:
        sd["scale_factor"] = torch.tensor(0.2)
    return {"state_dict": sd, "global_step": 470_000, "epoch": 6}


def _first_stage_yaml(tmp_path) -> str:
    cfg = {"model": {"base_learning_rate": 4.5e-6, "target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "monitor": "val/rec_loss", "embed_dim": 4, "ddconfig": TINY_DD,
        "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator",
                       "params": {"disc_start": 50001, "kl_weight": 1e-6, "disc_weight": 0.5}}}},
        "data": {"target": "main.DataModuleFromConfig"}}  # fmt: skip
    path = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return str(path)


def _sd_yaml(tmp_path) -> str:
    cfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "scale_factor": 0.18215, "first_stage_key": "jpg", "cond_stage_key": "txt",
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": TINY_DD,
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}}  # fmt: skip
    path = tmp_path / "v1-inference.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return str(path)


def _same_outputs(a: AutoencoderKL, b: AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a(x, sample_posterior=False)[0], b(x, sample_posterior=False)[0])


@pytest.mark.parametrize("how", ["inferred", "config", "preset"])
def test_official_first_stage_ckpt_loads_in_one_call(tiny, tmp_path, how):
    path = tmp_path / "last.ckpt"
    torch.save(_official_ckpt(tiny.state_dict()), path)
    kwargs = {"config": {"config": _first_stage_yaml(tmp_path)}, "preset": {"preset": "tiny"}}.get(how, {})
    model = load_autoencoder(path, **kwargs)
    assert isinstance(model, AutoencoderKL) and not model.training
    if how == "config":
        assert model.ddconfig["attn_resolutions"] == (8,)
    _same_outputs(model, tiny)


@pytest.mark.parametrize("with_yaml", [False, True])
def test_sd_like_checkpoint_first_stage_loads_in_one_call(tiny, tmp_path, with_yaml):
    path = tmp_path / "sd-v1-like.ckpt"
    torch.save(_sd_like_ckpt(tiny.state_dict()), path)
    model = load_autoencoder(path, config=_sd_yaml(tmp_path) if with_yaml else None)  # prefix found automatically
    _same_outputs(model, tiny)
    # as a codec: the scale comes from the yaml (0.18215) or the scale_factor buffer of scale_by_std runs
    codec = kl_codec(path, config=_sd_yaml(tmp_path) if with_yaml else None)
    assert codec.scale == (0.18215 if with_yaml else 1.0)
    torch.save(_sd_like_ckpt(tiny.state_dict(), scale_by_std=True), path)
    assert kl_codec(path).scale == pytest.approx(0.2)
    assert kl_codec(path, scale=0.5).scale == 0.5


def test_missing_key_is_named_and_wrong_checkpoints_refused(tiny, tmp_path):
    ckpt = _official_ckpt(tiny.state_dict())
    del ckpt["state_dict"]["decoder.conv_out.bias"]
    torch.save(ckpt, tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointKeyError, match=r"missing key.*decoder\.conv_out\.bias") as err:
        load_autoencoder(tmp_path / "missing.ckpt", config=_first_stage_yaml(tmp_path))
    assert err.value.missing == ["decoder.conv_out.bias"]
    with pytest.raises(CheckpointKeyError, match="shape mismatch"):
        load_autoencoder(_official_ckpt(tiny.state_dict()), preset="fmnist_kl_f4")
    with pytest.raises(CheckpointKeyError, match="no autoencoder weights"):
        load_autoencoder({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}})
    vq = {**tiny.state_dict(), "quantize.embedding.weight": torch.zeros(16, 4)}
    with pytest.raises(ValueError, match="load_vqgan"):
        load_autoencoder(vq)
    bad_yaml = {"model": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {"ddconfig": TINY_DD}}}
    with pytest.raises(ValueError, match="unsupported first stage"):
        load_autoencoder(tiny.state_dict(), config=bad_yaml)
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / "nope.ckpt")


# ---------------------------------------------------------------------------------------------------- codec


def test_klcodec_shapes_scale_and_freezing():
    torch.manual_seed(0)
    ae = build_autoencoder("fmnist_kl_f4")
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    codec = KLCodec.from_autoencoder(ae)
    assert codec.scale == 1.0 and codec.latent_channels == 4 and codec.downsample_factor == 4
    assert all(p.requires_grad for p in ae.parameters())  # the training model is untouched (a frozen copy)
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.training and not codec.model.training
    z = codec.encode(x)
    assert z.shape == (8, 4, 8, 8) and codec.latent_shape((1, 32, 32)) == (4, 8, 8)
    with torch.no_grad():
        assert torch.equal(z, ae.encode(x).mode())
        assert codec.decode(z).shape == x.shape
    scale = estimate_scale(codec, x)  # 1/std of the latents: scaled latents have unit variance
    assert codec.scale == scale
    assert codec.encode(x).std().item() == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(codec.decode(codec.encode(x)), ae.decode(ae.encode(x).mode()), rtol=1e-4, atol=1e-5)
    assert KLCodec.from_autoencoder(ae, images=x).scale == pytest.approx(scale)
    sampled = KLCodec.from_autoencoder(ae, 0.5, sample_posterior=True)
    assert not torch.equal(sampled.encode(x), sampled.encode(x))
    with pytest.raises(ValueError, match="1 image channels"):
        codec.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        codec.encode(torch.rand(1, 1, 30, 32))
    with pytest.raises(ValueError, match="not a KL autoencoder"):
        KLCodec(torch.nn.Linear(2, 2))


def test_kl_codec_loads_an_export_folder_and_an_official_ckpt(tiny, tmp_path):
    module_cfg = {"module": {"_target_": "ldm.models.autoencoder.build_autoencoder", "preset": "tiny"}}
    folder = export(tiny, module_cfg, tmp_path / "export")
    codec = kl_codec(folder, scale=0.25)
    assert codec.scale == 0.25 and isinstance(codec.model, AutoencoderKL)
    _same_outputs(codec.model, tiny)
    torch.save(_official_ckpt(tiny.state_dict()), tmp_path / "last.ckpt")
    codec = kl_codec(tmp_path / "last.ckpt", sample_posterior=True)
    assert codec.scale == 1.0 and codec.sample_posterior
    _same_outputs(codec.model, tiny)
    with pytest.raises(FileNotFoundError):
        kl_codec(tmp_path / "missing")


def test_older_config_targets_resolve_lazily():
    """Configs written before name ldm.models.autoencoder.kl_codec: the model file resolves the moved names on first
    use, without importing the loaders (or anything that imports it back) when it loads."""
    import subprocess
    import sys

    code = (
        "import sys; import ldm.models.autoencoder as a; "
        "assert 'ldm.first_stage' not in sys.modules and 'ldm.convert' not in sys.modules, sorted(sys.modules); "
        "import ldm.first_stage as f; "
        "assert a.kl_codec is f.kl_codec and a.KLCodec is f.KLCodec and a.load_kl_first_stage is f.load_kl_first_stage"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from hydra.utils import get_method

    assert get_method("ldm.models.autoencoder.kl_codec") is kl_codec
    import ldm.models.autoencoder as module

    with pytest.raises(AttributeError, match="no attribute 'codec'"):
        _ = module.codec


def test_build_autoencoder_init_from_copies_another_autoencoders_weights(tmp_path):
    """``init_from``: start from a trained KL autoencoder of the same shape (here an official-layout ``.ckpt``)."""
    import torch

    from ldm.models.autoencoder import build_autoencoder

    torch.manual_seed(1)
    source = build_autoencoder("tiny")
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ae.ckpt")
    torch.manual_seed(2)
    model = build_autoencoder("tiny", init_from=tmp_path / "ae.ckpt")
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(ValueError, match="not a tiny autoencoder of this shape"):
        build_autoencoder("tiny", init_from=tmp_path / "ae.ckpt", ddconfig={"ch": 64})
    with pytest.raises(FileNotFoundError, match="init_from=.*nowhere.ckpt not found"):
        build_autoencoder("tiny", init_from=tmp_path / "nowhere.ckpt")
