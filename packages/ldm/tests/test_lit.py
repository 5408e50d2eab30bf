"""ldm.lit: LatentDiffusion built from injected conditioners (training, guidance, inpainting, super-resolution,
semantic synthesis), the older constructor arguments and state-dict layout, the latent normaliser, the per-timestep
loss logging, and the AutoencoderKLModule GAN recipe."""

import lightning as L
import pytest
import torch

from gencore.conditioning import NoConditioner
from gencore.diffusion import ddim_timesteps
from gencore.io import load_state_dict
from gencore.testing import randomize_parameters
from gencore.training import GANModule
from ldm.conditioning import (
    ClassConditioner,
    HybridConditioner,
    InpaintingConditioner,
    LowResolutionConditioner,
    SemanticConditioner,
    TextConditioner,
    Unconditional,
)
from ldm.first_stage import KLCodec
from ldm.lit import AutoencoderKLModule, LatentDiffusion
from ldm.losses import LPIPSWithDiscriminator
from ldm.models.autoencoder import build_autoencoder
from ldm.models.unet import unet_from_preset


def codec():
    torch.manual_seed(0)
    return KLCodec(build_autoencoder("tiny"))  # 32x32x3 -> 4x8x8


def unet(**kw):
    torch.manual_seed(1)
    net = unet_from_preset("tiny", **kw)  # in/out 4, 8x8, context 16
    return randomize_parameters(net, seed=2, std=0.02)


def concat_unet(in_channels):
    return unet(in_channels=in_channels, context_dim=None, use_spatial_transformer=False)


def batch(n=4):
    g = torch.Generator().manual_seed(3)
    return {
        "image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
        "label": torch.tensor([0, 1, 2, 3])[:n],
        "caption": ["a photo of a bag"] * n,
    }


def quiet(m):
    m.log = m.log_dict = lambda *a, **k: None
    return m


def test_latent_class_model_trains_and_samples_with_guidance():
    m = LatentDiffusion(
        unet(),
        codec(),
        ClassConditioner(10),
        p_uncond=0.5,
        scale_by_std=True,
        image_size=32,
        sample={"num_steps": 4},
    )
    assert m.model.conditioning_key == "crossattn" and m.latent_shape == (4, 8, 8)
    assert torch.isnan(m.scale_factor) and not m.latent_norm.ready  # estimated at the first training batch
    b = batch()
    quiet(m.train())
    loss = m.training_step(b, 0)
    loss.backward()
    assert torch.isfinite(loss) and m.cond_stage_model.embedding.weight.grad is not None  # the embedder learns
    z = m.encode(b["image"])
    assert float(m.scale_factor) != 1.0 and z.std().item() == pytest.approx(1.0, rel=1e-3)  # scale_by_std
    state = m.state_dict()
    assert "latent_norm.scale" in state and state["latent_norm.shift"].item() == 0.0  # LDM scales, never shifts
    m.eval()
    out = m.generate(3, labels=[1, 2, 3], guidance_scale=3.0)
    assert out["images"].shape == (3, 3, 32, 32) and out["labels"].tolist() == [1, 2, 3]
    # guidance = 1 is the plain conditional sample; the uncond branch changes the result at scale 3
    torch.manual_seed(0)
    plain = m.generate(2, labels=[1, 1], guidance_scale=1.0)["images"]
    torch.manual_seed(0)
    guided = m.generate(2, labels=[1, 1], guidance_scale=3.0)["images"]
    assert not torch.allclose(plain, guided)
    logs = m.log_images(b, n=2)
    assert set(logs) == {"inputs", "reconstructions", "samples"} and logs["samples"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="num_steps="):
        m.generate(1, steps=4)


def test_dropout_is_the_conditioners():
    """p_uncond drops each sample's condition to the null class (in the conditioner), the loss sees the result."""
    m = quiet(LatentDiffusion(unet(), codec(), ClassConditioner(10), p_uncond=1.0, image_size=32).train())
    seen = {}
    m.denoise = lambda x, t, **c: (seen.update(c), torch.zeros_like(x))[1]
    m.training_step(batch(), 0)
    torch.testing.assert_close(seen["c_crossattn"], m.unconditional(4)["c_crossattn"])
    m.p_uncond = 0.0
    m.training_step(batch(), 0)
    torch.testing.assert_close(seen["c_crossattn"], m.conditions(batch())["c_crossattn"])


def test_validation_loss_is_the_deterministic_conditional_loss():
    """With p_uncond > 0 the validation step must not drop conditions (it crashed at the first epoch end before)."""
    m = LatentDiffusion(unet(), codec(), ClassConditioner(10), p_uncond=0.5, image_size=32).eval()
    logged = {}
    m.log = lambda name, value, **k: logged.__setitem__(name, float(value))
    b = batch()
    with torch.no_grad():
        m.validation_step(b, 7)
        first = logged["val/loss"]
        m.validation_step(b, 7)
        assert logged["val/loss"] == first  # same t / noise for the same batch index
        z, cond = m.encode(b["image"]), m.conditions(b)
        g = torch.Generator().manual_seed(7)
        t = torch.randint(0, m.schedule.num_timesteps, (4,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        conditional, _ = m.loss_fn(m.denoise, z, cond, noise=noise, t=t)
        null, _ = m.loss_fn(m.denoise, z, m.unconditional(4), noise=noise, t=t)
    assert first == pytest.approx(float(conditional)) and float(null) != pytest.approx(first)
    # before the first training batch a scale_by_std model has no scale yet: validation (a sanity check) is skipped
    fresh = LatentDiffusion(unet(), codec(), ClassConditioner(10), image_size=32, scale_by_std=True).eval()
    logged.clear()
    fresh.log = m.log
    fresh.validation_step(b, 0)
    assert logged == {}
    with pytest.raises(RuntimeError, match="latent scale / shift are not set"):
        fresh.generate(1)


def test_pixel_space_and_unconditional_errors():
    net = unet_from_preset(
        "tiny", in_channels=1, out_channels=1, context_dim=None, use_spatial_transformer=False, image_size=16
    )
    m = LatentDiffusion(
        net,
        None,
        image_channels=1,
        image_size=16,
        sample={"num_steps": 4},
        schedule={"timesteps": 50},  # ddpm below runs every step
    )
    assert m.latent_shape == (1, 16, 16) and isinstance(m.cond_stage_model, Unconditional)
    out = m.generate(2)
    assert out["images"].shape == (2, 1, 16, 16) and set(out) == {"images"}
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs a conditioner with an unconditional condition"):
        m.generate(1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        m.generate(1, sampler="euler")
    with pytest.raises(ValueError, match="Unconditional does not take labels"):
        m.generate(1, labels=[1])
    # masked sampling (inpainting with an unconditional model) keeps the known pixels
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    masks = torch.zeros(2, 1, 16, 16)
    masks[..., 4:12, 4:12] = 1
    filled = m.inpaint(x, masks, num_steps=4)
    assert torch.equal(filled[masks.expand_as(x) == 0], x[masks.expand_as(x) == 0])
    for sampler in ("plms", "ddpm"):
        assert m.generate(1, sampler=sampler, num_steps=4)["images"].shape == (1, 1, 16, 16)
    # gencore's NoConditioner means the same
    same = LatentDiffusion(net, None, NoConditioner(), image_channels=1, image_size=16)
    assert isinstance(same.cond_stage_model, Unconditional)


def test_sampler_steps_follow_the_official_grid():
    m = LatentDiffusion(unet(), codec(), ClassConditioner(10), image_size=32, sample={"num_steps": 7}).eval()
    seen = []
    m.denoise = lambda x, t, **c: (seen.append(int(t[0])), torch.zeros_like(x))[1]
    m.generate(1, labels=[3])
    assert seen == ddim_timesteps(7, 1000)[::-1]  # 8 steps for S = 7, stride 142, as officially
    seen.clear()
    m.generate(1, labels=[3], sampler="plms", num_steps=5)
    assert seen == [801, 601, 601, 401, 201, 1]


def test_inpainting_model_by_concatenation():
    c = codec()
    m = LatentDiffusion(concat_unet(9), c, InpaintingConditioner(), image_size=32, sample={"num_steps": 2}).eval()
    assert m.model.conditioning_key == "concat"
    x = batch()["image"]
    masks = torch.zeros(4, 1, 32, 32)
    masks[..., 8:24, 8:24] = 1
    seen = {}
    denoise = m.denoise
    m.denoise = lambda x_t, t, **cond: (seen.update(cond), denoise(x_t, t, **cond))[1]
    out = m.inpaint(x, masks)
    assert torch.equal(out[masks.expand_as(x) == 0], x[masks.expand_as(x) == 0])  # conditionally, not masked
    torch.testing.assert_close(seen["c_concat"][:, :4], m.encode(x * (1 - masks)))
    logs = m.log_images(batch(), n=2)
    assert {"masked", "inpainted"} <= set(logs)
    quiet(m.train())
    m.training_step(batch(), 0).backward()  # random training masks
    with pytest.raises(ValueError, match="samples with inpaint"):
        m.generate(1)


def test_concat_superres_model():
    x = batch(2)["image"]
    sr = LatentDiffusion(concat_unet(7), codec(), LowResolutionConditioner(4), image_size=32, sample={"num_steps": 2})
    assert sr.model.conditioning_key == "concat" and sr.cond_stage_model.sr_factor == 4
    assert sr.superres(x).shape == (2, 3, 32, 32)
    assert sr.superres(torch.rand(2, 3, 8, 8) * 2 - 1).shape == (2, 3, 32, 32)  # low-res input, upsampled first
    assert {"low_resolution", "super_resolved"} <= set(sr.log_images(batch(2), n=2))
    with pytest.raises(ValueError, match="samples with superres"):
        sr.generate(1)
    m = LatentDiffusion(unet(), codec(), ClassConditioner(10), image_size=32)
    with pytest.raises(ValueError, match="superres\\(\\) needs a model conditioned on low-resolution images"):
        m.superres(x)


def test_hybrid_model_routes_both():
    m = LatentDiffusion(
        unet(in_channels=7),
        codec(),
        HybridConditioner(ClassConditioner(10), LowResolutionConditioner(4)),
        p_uncond=0.2,
        image_size=32,
        sample={"num_steps": 2},
    ).eval()
    assert m.model.conditioning_key == "hybrid"
    assert m.superres(batch(2)["image"], labels=[1, 2], guidance_scale=2.0).shape == (2, 3, 32, 32)
    quiet(m.train())
    m.training_step(batch(), 0).backward()
    assert m.cond_stage_model.crossattn.embedding.weight.grad is not None


@pytest.mark.slow
def test_text_conditioning_with_the_offline_encoder(tmp_path):
    m = LatentDiffusion(
        unet(context_dim=384),
        codec(),
        TextConditioner(max_length=8),
        p_uncond=0.1,
        image_size=32,
        sample={"num_steps": 2},
    )
    b = batch(2)
    cond = m.conditions(b)
    assert cond["c_crossattn"].shape == (2, 8, 384)
    assert m.unconditional(2)["c_crossattn"].shape == (2, 8, 384)
    out = m.generate(2, captions=["a photo of a sneaker", "a photo of a bag"], guidance_scale=2.0)
    assert out["images"].shape == (2, 3, 32, 32) and out["captions"][0] == "a photo of a sneaker"
    assert not any(k.startswith("cond_stage_model.") for k in m.state_dict() if "encoder" not in k)
    with pytest.raises(ValueError, match="does not match the UNet's context_dim 16"):
        LatentDiffusion(unet(), codec(), TextConditioner())
    from gencore.text import save_text_features

    feats = save_text_features(m.cond_stage_model.encoder, ["", "a photo of a bag"], tmp_path / "text.safetensors")
    pre = LatentDiffusion(unet(context_dim=384), codec(), TextConditioner(feats), image_size=32)
    assert torch.equal(pre.conditions(b)["c_crossattn"], m.conditions(b)["c_crossattn"])  # captions: "a photo of a bag"
    assert torch.equal(pre.unconditional(1)["c_crossattn"], m.unconditional(1)["c_crossattn"])


def test_semantic_synthesis_by_concatenation():
    seg = torch.randint(0, 5, (2, 32, 32))
    m = LatentDiffusion(
        concat_unet(7),
        codec(),
        SemanticConditioner(n_stages=2, method="nearest", in_channels=5, out_channels=3),
        image_size=32,
        sample={"num_steps": 4},
    )
    assert m.model.conditioning_key == "concat" and set(m.cond_stage_model.state_dict()) == {"channel_mapper.weight"}
    quiet(m)
    loss = m.training_step({**batch(2), "segmentation": seg}, 0)
    loss.backward()
    assert m.cond_stage_model.channel_mapper.weight.grad is not None  # trainable, as officially
    assert m.generate(2, segmentation=seg)["images"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="needs segmentation maps"):
        m.generate(1)


def test_bad_configurations():
    with pytest.raises(ValueError, match="not divisible by the first stage's factor 4"):
        LatentDiffusion(unet(), codec(), ClassConditioner(10), image_size=30)
    with pytest.raises(
        ValueError, match=r"conditioning_key='concat' routes \['c_concat'\].*produces \['c_crossattn'\]"
    ):
        LatentDiffusion(unet(), codec(), ClassConditioner(10), conditioning_key="concat")
    with pytest.raises(ValueError, match=r"routes \['c_crossattn'\], but Unconditional produces none"):
        LatentDiffusion(unet(), codec(), conditioning_key="crossattn")
    with pytest.raises(ValueError, match="which LowResolutionConditioner does not have"):
        LatentDiffusion(concat_unet(7), codec(), LowResolutionConditioner(4), p_uncond=0.1)
    with pytest.raises(ValueError, match="p_uncond must be a probability"):
        LatentDiffusion(unet(), codec(), ClassConditioner(10), p_uncond=1.5)
    with pytest.raises(TypeError, match="unexpected keyword argument 'cond_key'"):
        LatentDiffusion(unet(), codec(), cond_key="class")
    with pytest.raises(ValueError, match="not both"):
        LatentDiffusion(unet(), codec(), ClassConditioner(10), cond_stage="class")
    with pytest.raises(ValueError, match="must be an ldm.conditioning conditioner"):
        LatentDiffusion(unet(), codec(), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="do not also give scale_factor"):
        LatentDiffusion(unet(), codec(), ClassConditioner(10), scale_by_std=True, scale_factor=0.18)
    with pytest.raises(ValueError, match="unknown option"):
        LatentDiffusion(unet(), codec(), ClassConditioner(10), sample={"temperature": 1.0})
    with pytest.raises(ValueError, match="not both"):
        LatentDiffusion(unet(), codec(), ClassConditioner(10), sample={"steps": 4, "num_steps": 4})


# ---------------------------------------------------------------------------- the older arguments and layout


def test_older_arguments_build_the_same_model():
    """Configs written before the conditioners (cond_stage=..., concat=..., sample: {steps: N}) still build."""
    old = LatentDiffusion(
        unet(), codec(), cond_stage="class", num_classes=10, p_uncond=0.1, image_size=32, sample={"steps": 5}
    )
    new = LatentDiffusion(unet(), codec(), ClassConditioner(10), p_uncond=0.1, image_size=32)
    assert isinstance(old.cond_stage_model, ClassConditioner) and old.sample_kwargs == {"num_steps": 5}
    assert list(old.state_dict()) == list(new.state_dict())
    inpaint = LatentDiffusion(concat_unet(9), codec(), concat="inpaint", num_classes=10, image_size=32)
    assert isinstance(inpaint.cond_stage_model, InpaintingConditioner) and inpaint.model.conditioning_key == "concat"
    sr = LatentDiffusion(concat_unet(7), codec(), concat="lowres", sr_factor=4, image_size=32)
    assert isinstance(sr.cond_stage_model, LowResolutionConditioner)
    hybrid = LatentDiffusion(unet(in_channels=7), codec(), cond_stage="class", concat="lowres", image_size=32)
    assert hybrid.model.conditioning_key == "hybrid"
    with pytest.raises(ValueError, match="concat must be"):
        LatentDiffusion(unet(), codec(), concat="depth")
    with pytest.raises(ValueError, match="cond_stage must be"):
        LatentDiffusion(unet(), codec(), cond_stage="layout")


def test_older_layout_with_root_scale_factor_loads():
    """A state dict with LDM's root scale_factor buffer (official checkpoints, exports made before the normaliser)
    loads into the new module, through torch (Lightning's resume) and gencore.io alike."""
    src = LatentDiffusion(unet(), codec(), ClassConditioner(10), image_size=32, scale_factor=0.25)
    state = src.state_dict()
    state["scale_factor"] = state.pop("latent_norm.scale")
    for load in (lambda m, s: m.load_state_dict(s, strict=True), load_state_dict):
        m = LatentDiffusion(unet(), codec(), ClassConditioner(10), image_size=32, scale_by_std=True).eval()
        assert not m.latent_norm.ready
        load(m, dict(state))
        assert float(m.scale_factor) == 0.25 and m.latent_norm.ready
        x = batch(1)["image"]
        torch.testing.assert_close(m.encode(x), src.encode(x))


def test_older_hybrid_layout_loads():
    """Older class + semantic models kept the embedder at cond_stage_model and the rescaler at semantic_model."""
    kw = dict(cond_stage="class", concat="semantic", semantic={"n_stages": 2, "in_channels": 5, "out_channels": 3})
    src = LatentDiffusion(unet(in_channels=7), codec(), image_size=32, **kw)
    randomize_parameters(src.cond_stage_model, seed=5)
    state = {
        k.replace("cond_stage_model.crossattn.", "cond_stage_model.").replace(
            "cond_stage_model.concat.", "semantic_model."
        ): v
        for k, v in src.state_dict().items()
    }
    assert {"cond_stage_model.embedding.weight", "semantic_model.channel_mapper.weight"} <= set(state)
    m = LatentDiffusion(unet(in_channels=7), codec(), image_size=32, **kw)
    load_state_dict(m, state)
    assert torch.equal(m.cond_stage_model.crossattn.embedding.weight, src.cond_stage_model.crossattn.embedding.weight)
    assert torch.equal(
        m.cond_stage_model.concat.channel_mapper.weight, src.cond_stage_model.concat.channel_mapper.weight
    )
    m.load_state_dict(src.state_dict())  # the new layout loads as it is


def test_older_text_layout_loads(tmp_path):
    """Older text models held the frozen encoder as cond_stage_model itself (Lightning .ckpt files carry it)."""
    from gencore.testing import tiny_clip

    clip = tiny_clip(tmp_path / "clip", hidden_size=16)
    kw = dict(cond_stage="text", text_encoder={"path": str(clip), "max_length": 8}, image_size=32)
    m = LatentDiffusion(unet(), codec(), **kw)
    state = {k.replace("cond_stage_model.encoder.", "cond_stage_model."): v for k, v in m.state_dict().items()}
    assert any(k.startswith("cond_stage_model.transformer.") for k in state)
    with torch.no_grad():
        for k, v in state.items():
            if k.startswith("cond_stage_model.transformer.") and v.is_floating_point():
                v.add_(0.25)
    fresh = LatentDiffusion(unet(), codec(), **kw)
    missing, unexpected = load_state_dict(fresh, state)
    assert not missing and not unexpected
    ours = fresh.state_dict()
    old = [k for k in state if k.startswith("cond_stage_model.transformer.")]
    assert old and all(torch.equal(ours[k.replace("model.", "model.encoder.", 1)], state[k]) for k in old)


# ------------------------------------------------------------------------------------------ per-timestep logs


@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")
def test_loss_buckets_are_logged_per_split(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from gencore.data import FashionMNISTDataModule
    from gencore.testing import logged_values

    net = unet_from_preset(
        "tiny", in_channels=1, out_channels=1, context_dim=None, use_spatial_transformer=False, image_size=16
    )
    m = LatentDiffusion(net, None, image_channels=1, image_size=16, n_buckets=2)
    dm = FashionMNISTDataModule(image_size=16, batch_size=8, num_workers=0, limit_train=32, limit_val=8)
    trainer = L.Trainer(
        max_steps=3,
        log_every_n_steps=1,
        limit_val_batches=1,
        val_check_interval=3,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(m, datamodule=dm)
    train = logged_values(tmp_path, "train/loss_simple_t/000-499") + logged_values(
        tmp_path, "train/loss_simple_t/500-999"
    )
    assert len(train) >= 3 and all(v > 0 for v in train)  # one write per logging step (the bins seen since the last)
    val = logged_values(tmp_path, "val/loss_simple_t/000-499") + logged_values(tmp_path, "val/loss_simple_t/500-999")
    assert len(val) >= 1


# ---------------------------------------------------------------------------------------- the autoencoder recipe


def test_autoencoder_module_is_a_gan_recipe():
    ae = build_autoencoder("tiny", ddconfig={"in_channels": 1, "out_ch": 1})
    loss = LPIPSWithDiscriminator(disc_start=0, disc_in_channels=1, disc_ndf=8, disc_num_layers=2, perceptual="none")
    m = AutoencoderKLModule(ae, loss, learning_rate=1e-4, scale_lr=False)
    assert isinstance(m, GANModule) and not m.automatic_optimization
    assert m.generator_loss_name == "train/aeloss"
    opt_g, opt_d = m.configure_optimizers()
    n_ae = len(list(ae.parameters()))
    assert len(opt_g.param_groups[0]["params"]) == n_ae  # logvar stays out, as officially
    assert len(opt_d.param_groups[0]["params"]) == len(list(loss.discriminator.parameters()))
    learn = AutoencoderKLModule(ae, loss, learning_rate=1e-4, scale_lr=False, learn_logvar=True)
    assert learn.configure_optimizers()[0].param_groups[0]["params"][-1] is loss.logvar
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    g_loss, logs, state = m.generator_step({"image": x}, 0)
    assert torch.isfinite(g_loss) and logs["train/d_weight"] > 0 and state[0] is x
    d_loss, d_logs = m.discriminator_step({"image": x}, state, 0)
    assert torch.isfinite(d_loss) and "train/disc_loss" in d_logs
    late = AutoencoderKLModule(
        ae, LPIPSWithDiscriminator(disc_start=5, disc_in_channels=1, disc_ndf=8, perceptual="none"), scale_lr=False
    )
    assert late.discriminator_step({"image": x}, state, 4) == (None, {})
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        AutoencoderKLModule(ae, loss, learning_rate=0.0)
    with pytest.raises(ValueError, match=r"needs batch\['image'\]"):
        m.generator_step({"x": x}, 0)
