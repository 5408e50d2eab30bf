import pytest
import torch
from diffusers import AutoencoderKL

from gencore.latents import DiffusersVAECodec
from gencore.testing import randomize_parameters
from sd3_flow.conditioning import SD3TextConditioner
from sd3_flow.lit import RectifiedFlowModule
from sd3_flow.models.mmdit import mmdit_from_preset


@pytest.fixture(scope="module")
def text():
    return SD3TextConditioner(minilm_max_length=8)  # the offline MiniLM: 384-d tokens and pooled vector


def vae_codec():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return DiffusersVAECodec(vae)  # SD3-style 16-channel latents, 16x16 -> 8x8


def model(text, objective="rf/lognorm(0.00,1.00)", **kw):
    torch.manual_seed(1)
    net = mmdit_from_preset(
        "tiny", sample_size=8, pos_embed_max_size=8, joint_attention_dim=384, pooled_projection_dim=384
    )
    randomize_parameters(net, seed=2, std=0.02)
    return RectifiedFlowModule(net, vae_codec(), text, objective=objective, image_size=16, sample={"steps": 4}, **kw)


def batch(n=4):
    g = torch.Generator().manual_seed(3)
    return {
        "image": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1,
        "caption": ["a photo of a sneaker", "a photo of a bag", "a photo of a coat", "a photo of a shirt"][:n],
    }


def test_rf_training_step_and_sampling(text):
    m = model(text)
    m.log = m.log_dict = lambda *a, **k: None
    m.train()
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert torch.isfinite(loss) and m.transformer.proj_out.weight.grad is not None
    assert all(p.grad is None for p in m.text.parameters()) and all(
        p.grad is None for p in m.first_stage_model.parameters()
    )
    m.eval()
    out = m.generate(2, captions=["a photo of a bag", "a photo of a dress"], guidance_scale=3.0)
    assert out["images"].shape == (2, 1, 16, 16) and out["captions"][1] == "a photo of a dress"
    heun = m.generate(2, labels=[1, 2], sampler="heun", shift=3.0)
    assert heun["images"].shape == (2, 1, 16, 16) and heun["captions"][0] == "a photo of a pair of trousers"
    logs = m.log_images(batch(2), n=2)
    assert set(logs) == {"inputs", "reconstructions", "samples"}


def test_eps_linear_baseline_uses_ddim(text):
    m = model(text, objective="eps/linear")
    assert m.sample_kwargs["sampler"] == "ddim"
    m.log = m.log_dict = lambda *a, **k: None
    assert torch.isfinite(m.training_step(batch(), 0))
    assert m.generate(1, labels=[3], steps=5)["images"].shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="does not fit objective"):
        m.generate(1, labels=[3], sampler="euler")


def test_text_dropout_is_per_encoder_and_guidance_needs_it(text):
    m = model(text, p_drop_text=1.0)
    keep = m.text.random_keep(4, 1.0)
    assert not keep["minilm"].any()
    cond = m.conditions(batch()["caption"], keep)
    assert torch.all(cond["context"] == 0) and torch.all(cond["pooled"] == 0)  # dropped = the null condition
    unc = m.text.unconditional(2)
    torch.testing.assert_close(unc["context"], torch.zeros(2, 8, 384))


def test_bad_configurations(text):
    net = mmdit_from_preset("tiny", sample_size=8, pos_embed_max_size=8)  # joint_attention_dim 64
    with pytest.raises(ValueError, match="joint_attention_dim is 64"):
        RectifiedFlowModule(net, vae_codec(), text, image_size=16)
    with pytest.raises(ValueError, match="not divisible by the first stage's factor 2"):
        model(text).__class__(
            mmdit_from_preset(
                "tiny", sample_size=8, pos_embed_max_size=8, joint_attention_dim=384, pooled_projection_dim=384
            ),
            vae_codec(),
            text,
            image_size=15,
        )
    with pytest.raises(ValueError, match="unknown objective"):
        model(text, objective="edm")
    m = model(text)
    with pytest.raises(ValueError, match="unknown sampler 'dpm'"):
        m.generate(1, labels=[0], sampler="dpm")


def test_latent_scale_and_shift_estimated_once_and_saved(text):
    m = model(text, latent_scale=None, latent_shift=None)
    m.log = m.log_dict = lambda *a, **k: None
    m.eval()
    with pytest.raises(RuntimeError, match="latent_scale / latent_shift are not set"):
        m.generate(1, labels=[0])
    m.train()
    x = batch()["image"]
    m.training_step(batch(), 0)
    raw = m.first_stage_model.encode(x)
    assert float(m.latent_shift) == pytest.approx(raw.mean().item(), abs=1e-5)
    z = m.encode(x)  # the first batch's latents are now zero-mean, unit-variance
    assert z.mean().abs().item() < 1e-5 and z.pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=1e-4)
    before = m.latent_scale.clone()
    m.training_step({**batch(), "image": x * 0.5}, 1)  # estimated once, not per batch
    assert torch.equal(m.latent_scale, before)
    assert torch.allclose(m.decode(z), m.first_stage_model.decode(raw), atol=1e-5)  # decode undoes the map
    state = m.state_dict()
    assert "latent_scale" in state and "latent_shift" in state
    fresh = model(text, latent_scale=None, latent_shift=None)
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.equal(fresh.encode(x), m.encode(x))
    fixed = model(text)  # 1 / 0 given: known without looking; a loaded state dict is looked at again
    fixed.load_state_dict(model(text, latent_scale=None, latent_shift=None).state_dict())
    fixed.eval()
    with pytest.raises(RuntimeError, match="latent_scale / latent_shift are not set"):
        fixed.encode(x)
    with pytest.raises(ValueError, match="latent_scale must be > 0"):
        model(text, latent_scale=0.0)
