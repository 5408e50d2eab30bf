import pytest
import torch

from gencore.testing import randomize_parameters
from ldm.conditioning import ClassEmbedder, DiffusionWrapper, inpainting_condition, low_resolution_condition
from ldm.lit import LatentDiffusion
from ldm.models.autoencoder import KLCodec, build_autoencoder
from ldm.models.unet import unet_from_preset


def codec():
    torch.manual_seed(0)
    return KLCodec(build_autoencoder("tiny"))  # 32x32x3 -> 4x8x8


def unet(**kw):
    torch.manual_seed(1)
    net = unet_from_preset("tiny", **kw)  # in/out 4, 8x8, context 16
    return randomize_parameters(net, seed=2, std=0.02)


def batch(n=4):
    g = torch.Generator().manual_seed(3)
    return {
        "image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1,
        "label": torch.tensor([0, 1, 2, 3])[:n],
        "caption": ["a photo of a bag"] * n,
    }


def test_wrapper_routes_conditions_and_names_missing_ones():
    seen = {}

    def fake(x, t, context=None, y=None):
        seen.update(x=x.shape, context=context, y=y)
        return x[:, :1]

    x, t = torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long)
    DiffusionWrapper(fake, "hybrid")(x, t, c_concat=torch.ones(2, 3, 8, 8), c_crossattn=torch.ones(2, 5, 16))
    assert seen["x"] == (2, 7, 8, 8) and seen["context"].shape == (2, 5, 16)
    DiffusionWrapper(fake, "adm")(x, t, y=torch.tensor([1, 2]))
    assert seen["y"].tolist() == [1, 2] and seen["context"] is None
    with pytest.raises(ValueError, match="needs c_crossattn"):
        DiffusionWrapper(fake, "crossattn")(x, t)
    with pytest.raises(ValueError, match="conditioning_key must be one of"):
        DiffusionWrapper(fake, "film")


def test_class_embedder_null_class():
    emb = ClassEmbedder(16, n_classes=10, null_class=True)
    assert emb(torch.tensor([0, 10])).shape == (2, 1, 16) and emb.null_index == 10
    assert set(emb.state_dict()) == {"embedding.weight"}  # official name
    with pytest.raises(ValueError, match="label 11 outside"):
        emb(torch.tensor([11]))
    with pytest.raises(ValueError, match="no null class"):
        _ = ClassEmbedder(16, 10).null_index


def test_latent_class_model_trains_and_samples_with_guidance():
    m = LatentDiffusion(
        unet(),
        codec(),
        cond_stage="class",
        num_classes=10,
        p_uncond=0.5,
        scale_by_std=True,
        image_size=32,
        sample={"steps": 4},
    )
    assert m.model.conditioning_key == "crossattn" and m.latent_shape == (4, 8, 8)
    b = batch()
    m.train()
    m.log = m.log_dict = lambda *a, **k: None
    loss = m.training_step(b, 0)
    loss.backward()
    assert torch.isfinite(loss) and m.cond_stage_model.embedding.weight.grad is not None  # the embedder learns
    z = m.encode(b["image"])
    assert float(m.scale_factor) != 1.0 and z.std().item() == pytest.approx(1.0, rel=1e-3)  # scale_by_std
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
    assert set(logs) == {"inputs", "reconstructions", "samples"}


def test_validation_loss_is_the_deterministic_conditional_loss():
    """With p_uncond > 0 the validation step must not drop conditions (it crashed at the first epoch end before)."""
    m = LatentDiffusion(unet(), codec(), cond_stage="class", num_classes=10, p_uncond=0.5, image_size=32).eval()
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
        conditional, _ = m.loss_fn(m.denoise, z, cond, noise=noise, t=t, drop=False)
        null, _ = m.loss_fn(m.denoise, z, m.unconditional(4), noise=noise, t=t, drop=False)
    assert first == pytest.approx(float(conditional)) and float(null) != pytest.approx(first)
    with pytest.raises(ValueError, match="uncond"):
        m.loss_fn(m.denoise, z, cond)  # training-mode dropout without the null condition is still an error


def test_pixel_space_and_unconditional_errors():
    m = LatentDiffusion(
        unet_from_preset(
            "tiny",
            in_channels=1,
            out_channels=1,
            context_dim=None,
            use_spatial_transformer=False,
            num_heads=2,
            image_size=16,
        ),
        None,
        image_channels=1,
        image_size=16,
        sample={"steps": 4},
        schedule={"timesteps": 50},  # ddpm below runs every step
    )
    assert m.latent_shape == (1, 16, 16)
    out = m.generate(2)
    assert out["images"].shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="needs a class- or text-conditional model"):
        m.generate(1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        m.generate(1, sampler="euler")
    # masked sampling (inpainting with an unconditional model) keeps the known pixels
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    masks = torch.zeros(2, 1, 16, 16)
    masks[..., 4:12, 4:12] = 1
    filled = m.inpaint(x, masks, steps=4)
    assert torch.equal(filled[masks.expand_as(x) == 0], x[masks.expand_as(x) == 0])
    for sampler in ("plms", "ddpm"):
        assert m.generate(1, sampler=sampler, steps=4)["images"].shape == (1, 1, 16, 16)


def test_concat_conditioning_inputs_and_superres_model():
    c = codec()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :16, :] = 1
    cond = inpainting_condition(x, mask, c.encode)
    assert cond.shape == (2, 5, 8, 8) and torch.equal(cond[:, 4:, :4], torch.ones(2, 1, 4, 8))
    lr = low_resolution_condition(x, 4, (8, 8))
    assert lr.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        low_resolution_condition(x, 3, (8, 8))
    sr = LatentDiffusion(
        unet(in_channels=7, context_dim=None, use_spatial_transformer=False),
        c,
        concat="lowres",
        image_size=32,
        sample={"steps": 2},
    )
    assert sr.model.conditioning_key == "concat"
    assert sr.superres(x).shape == (2, 3, 32, 32)
    assert sr.superres(torch.rand(2, 3, 8, 8) * 2 - 1).shape == (2, 3, 32, 32)  # low-res input, upsampled first
    with pytest.raises(ValueError, match="sample with inpaint"):
        sr.generate(1)


@pytest.mark.slow
def test_text_conditioning_with_the_offline_encoder(tmp_path):
    m = LatentDiffusion(
        unet(context_dim=384),
        codec(),
        cond_stage="text",
        text_encoder={"max_length": 8},
        p_uncond=0.1,
        image_size=32,
        sample={"steps": 2},
    )
    b = batch(2)
    cond = m.conditions(b)
    assert cond["c_crossattn"].shape == (2, 8, 384)
    assert m.unconditional(2)["c_crossattn"].shape == (2, 8, 384)
    out = m.generate(2, captions=["a photo of a sneaker", "a photo of a bag"], guidance_scale=2.0)
    assert out["images"].shape == (2, 3, 32, 32) and out["captions"][0] == "a photo of a sneaker"
    with pytest.raises(ValueError, match="does not match the UNet's context_dim 16"):
        LatentDiffusion(unet(), codec(), cond_stage="text")
    from gencore.text import save_text_features

    feats = save_text_features(m.cond_stage_model, ["", "a photo of a bag"], tmp_path / "text.safetensors")
    pre = LatentDiffusion(
        unet(context_dim=384), codec(), cond_stage="text", text_encoder={"path": str(feats)}, image_size=32
    )
    assert torch.equal(pre.conditions(b)["c_crossattn"], m.conditions(b)["c_crossattn"])  # captions: "a photo of a bag"
    assert torch.equal(pre.unconditional(1)["c_crossattn"], m.unconditional(1)["c_crossattn"])


def test_bad_configurations():
    with pytest.raises(ValueError, match="not divisible by the first stage's factor 4"):
        LatentDiffusion(unet(), codec(), image_size=30)
    with pytest.raises(ValueError, match="concat must be"):
        LatentDiffusion(unet(), codec(), concat="depth")
    with pytest.raises(ValueError, match="cond_stage must be"):
        LatentDiffusion(unet(), codec(), cond_stage="layout")


def test_semantic_synthesis_by_concatenation():
    from ldm.conditioning import SpatialRescaler, one_hot_map

    r = SpatialRescaler(n_stages=2, method="nearest", multiplier=0.5, in_channels=5, out_channels=3)
    assert set(r.state_dict()) == {"channel_mapper.weight"}  # official names
    seg = torch.randint(0, 5, (2, 32, 32))
    assert r(one_hot_map(seg, 5)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="labels must lie in"):
        one_hot_map(seg + 5, 5)
    m = LatentDiffusion(
        unet(in_channels=7, context_dim=None, use_spatial_transformer=False),
        codec(),
        concat="semantic",
        semantic={"n_stages": 2, "method": "nearest", "in_channels": 5, "out_channels": 3},
        image_size=32,
        sample={"steps": 4},
    )
    assert m.model.conditioning_key == "concat" and isinstance(m.cond_stage_model, SpatialRescaler)
    m.log = m.log_dict = lambda *a, **k: None
    loss = m.training_step({**batch(2), "segmentation": seg}, 0)
    loss.backward()
    assert m.cond_stage_model.channel_mapper.weight.grad is not None  # trainable, as officially
    assert m.generate(2, segmentation=seg)["images"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="needs segmentation maps"):
        m.generate(1)
    with pytest.raises(ValueError, match="semantic=\\{in_channels"):
        LatentDiffusion(unet(), codec(), concat="semantic")
