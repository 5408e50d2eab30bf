"""sd3_flow.lit.RectifiedFlowModule: training steps and sampling with a tiny MMDiT over an SD3-style VAE, the injected
conditioner and its dropout, latent normalisation (estimated, saved, old keys), per-timestep loss buckets, the older
constructor arguments, adaLN-Zero initialisation of a model built through the training config."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate

from gencore.cli import compose
from gencore.io import load_state_dict
from gencore.latents import DiffusersVAECodec
from gencore.testing import randomize_parameters
from sd3_flow.cli import CONFIGS
from sd3_flow.conditioning import SD3TextConditioner
from sd3_flow.lit import RectifiedFlowModule, legacy_arguments
from sd3_flow.models.mmdit import AdaLayerNormContinuous, AdaLayerNormZero, mmdit_from_preset


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


def tiny_net():
    net = mmdit_from_preset(
        "tiny", sample_size=8, pos_embed_max_size=8, joint_attention_dim=384, pooled_projection_dim=384
    )
    return randomize_parameters(net, seed=2, std=0.02)


def model(text, objective="rf/lognorm(0.00,1.00)", **kw):
    torch.manual_seed(1)
    kw.setdefault("sample", {"num_steps": 4})
    return RectifiedFlowModule(tiny_net(), vae_codec(), text, objective=objective, image_size=16, **kw)


def logged(m):
    """Capture what the module logs (no Trainer attached)."""
    seen = {}
    m.log = lambda name, value, **k: seen.__setitem__(name, value)
    m.log_dict = lambda values, **k: seen.update(values)
    return seen


def batch(n=4):
    g = torch.Generator().manual_seed(3)
    return {
        "image": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1,
        "caption": ["a photo of a sneaker", "a photo of a bag", "a photo of a coat", "a photo of a shirt"][:n],
    }


def test_rf_training_step_and_sampling(text):
    m = model(text)
    seen = logged(m)
    m.train()
    loss = m.training_step(batch(), 0)
    loss.backward()
    assert torch.isfinite(loss) and m.transformer.proj_out.weight.grad is not None
    assert set(seen) == {"train/loss", "train/loss_unweighted", "train/t_mean"}
    assert m.cond_stage_model is text and not m.cond_stage_model.training  # frozen, outside the optimizer
    assert all(p.grad is None for p in m.cond_stage_model.parameters()) and all(
        p.grad is None for p in m.first_stage_model.parameters()
    )
    optimized = {id(p) for group in m.configure_optimizers().param_groups for p in group["params"]}
    assert optimized == {id(p) for p in m.transformer.parameters()}
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
    logged(m)
    assert torch.isfinite(m.training_step(batch(), 0))
    assert m.generate(1, labels=[3], num_steps=5)["images"].shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="does not fit objective"):
        m.generate(1, labels=[3], sampler="euler")
    with pytest.raises(ValueError, match=r"sampler 'heun' does not fit objective 'eps/linear' \(ddim expected\)"):
        model(text, objective="eps/linear", sample={"sampler": "heun"})  # checked when built, not at first use


def test_sampling_uses_the_objective_timestep_scale_and_the_grids(text, monkeypatch):
    """The network sees the objective's timestep convention; Euler walks flow_timesteps(num_steps, shift), DDIM
    ddim_timesteps(num_steps, T)."""
    m = model(text, objective_kwargs={"timestep_scale": 1.0}).eval()
    seen = []
    velocity = m.velocity
    monkeypatch.setattr(m, "velocity", lambda x, t, **c: seen.append(t[0].item()) or velocity(x, t, **c))
    m.generate(1, labels=[0], num_steps=3, shift=3.0)
    from sd3_flow.sampling import flow_timesteps

    assert seen == pytest.approx(flow_timesteps(3, 3.0)[:-1].tolist())
    eps = model(text, objective="eps/linear").eval()
    seen.clear()
    velocity = eps.velocity
    monkeypatch.setattr(eps, "velocity", lambda x, t, **c: seen.append(t[0].item()) or velocity(x, t, **c))
    eps.generate(1, labels=[0], num_steps=5)
    assert seen == [801.0, 601.0, 401.0, 201.0, 1.0]


def test_text_dropout_goes_through_the_conditioner_and_guidance_uses_its_null(text, monkeypatch):
    m = model(text, p_drop_text=1.0)
    logged(m)
    drops = []
    forward = type(text).forward

    def spy(self, batch, n=None, *, drop=0.0, generator=None):
        drops.append(drop)
        return forward(self, batch, n, drop=drop, generator=generator)

    monkeypatch.setattr(type(text), "forward", spy)
    m.train()
    m.training_step(batch(), 0)
    m.validation_step(batch(), 0)
    assert drops == [1.0, 0.0]  # dropout in training only
    cond = m.cond_stage_model(batch(), drop=1.0)
    assert torch.all(cond["context"] == 0) and torch.all(cond["pooled"] == 0)  # dropped = the null condition
    unc = m.cond_stage_model.unconditional(2)
    torch.testing.assert_close(unc["context"], torch.zeros(2, 8, 384))
    # guidance 1 needs no null condition; any other scale calls the network on [uncond, cond]
    m.eval()
    calls = []
    velocity = m.velocity
    monkeypatch.setattr(m, "velocity", lambda x, t, **c: calls.append(x.shape[0]) or velocity(x, t, **c))
    m.generate(2, labels=[0, 1], num_steps=2, guidance_scale=1.0)
    m.generate(2, labels=[0, 1], num_steps=2, guidance_scale=4.0)
    assert calls == [2, 2, 4, 4]


def test_per_timestep_loss_buckets(text):
    """The module owns a gencore LossBuckets per split: every step adds to it on the device; Lightning's logging
    steps (on_train_batch_end) and the end of validation (forced) write ``{split}/loss_t/<lo>-<hi>``."""
    bins = ("0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00")
    m = model(text, loss_buckets=4)
    seen = logged(m)
    m.train()
    m.training_step(batch(), 0)
    m.training_step(batch(), 1)
    train = m.loss_buckets["train"]
    assert train._counts.sum().item() == 8 and set(train.compute()) <= {f"loss_t/{b}" for b in bins}
    m._trainer = SimpleNamespace(_logger_connector=SimpleNamespace(should_update_logs=False), global_step=1)
    m.on_train_batch_end(None, batch(), 1)  # not a logging step: nothing is read or written
    assert not any(k.startswith("train/loss_t/") for k in seen) and train._counts.sum().item() == 8
    m._trainer._logger_connector.should_update_logs = True
    m.on_train_batch_end(None, batch(), 1)  # a logging step: the bin means of both steps, then a fresh start
    written = {k for k in seen if k.startswith("train/loss_t/")}
    assert written and written <= {f"train/loss_t/{b}" for b in bins} and train.compute() == {}
    m.eval()
    m.validation_step(batch(), 0)
    assert not any(k.startswith("val/loss_t/") for k in seen)
    m.on_validation_epoch_end()  # forced at the end of validation
    assert any(k.startswith("val/loss_t/") for k in seen)
    assert not model(text, loss_buckets=0).loss_buckets["train"].n_buckets


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
    with pytest.raises(ValueError, match=r"unknown sample defaults \['steps_per_image'\]"):
        model(text, sample={"steps_per_image": 3})
    with pytest.raises(ValueError, match="p_drop_text must be a probability"):
        model(text, p_drop_text=1.5)
    with pytest.raises(ValueError, match="cond_stage_model must be a gencore.conditioning.Conditioner"):
        RectifiedFlowModule(tiny_net(), vae_codec(), torch.nn.Identity(), image_size=16)


def test_latent_scale_and_shift_estimated_once_and_saved(text):
    m = model(text, latent_scale=None, latent_shift=None)
    logged(m)
    m.eval()
    with pytest.raises(RuntimeError, match="latent scale / shift are not set"):
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
    assert "latent_norm.scale" in state and "latent_norm.shift" in state
    assert m.latent_scale is m.latent_norm.scale  # read-only views of the normaliser's buffers
    with pytest.raises(AttributeError):
        m.latent_scale = torch.tensor(2.0)
    fresh = model(text, latent_scale=None, latent_shift=None)
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.equal(fresh.encode(x), m.encode(x))
    fixed = model(text)  # 1 / 0 given: known without looking; a loaded state dict is looked at again
    fixed.load_state_dict(model(text, latent_scale=None, latent_shift=None).state_dict())
    fixed.eval()
    with pytest.raises(RuntimeError, match="latent scale / shift are not set"):
        fixed.encode(x)
    with pytest.raises(ValueError, match="latent scale must be a finite number > 0"):
        model(text, latent_scale=0.0)


def test_state_dicts_with_the_older_keys_load(text):
    """Exports / checkpoints written before the gencore pieces keep the numbers under latent_scale / latent_shift and
    (Lightning checkpoints) the frozen text encoders under text.*"""
    state = model(text).state_dict()
    old = {k.replace("cond_stage_model.", "text.", 1): v for k, v in state.items() if "latent_norm." not in k}
    old |= {"latent_scale": torch.tensor(0.5), "latent_shift": torch.tensor(0.25)}
    assert any(k.startswith("text.encoders.") for k in old)
    for load in (lambda m, s: m.load_state_dict(s), lambda m, s: load_state_dict(m, s)):
        m = model(text, latent_scale=None, latent_shift=None)
        load(m, dict(old))
        assert float(m.latent_scale) == 0.5 and float(m.latent_shift) == 0.25
        m.eval()
        z = torch.ones(1, 16, 8, 8)
        torch.testing.assert_close(m.latent_norm.denormalize(z), z / 0.5 + 0.25)


def test_older_constructor_arguments(text):
    """Configs of older exports: ``text`` (SD3TextConditioner arguments) and ``sample: {steps: N}``."""
    torch.manual_seed(1)
    m = RectifiedFlowModule(
        tiny_net(), vae_codec(), text={"minilm": True, "minilm_max_length": 8}, image_size=16, sample={"steps": 3}
    )
    assert isinstance(m.cond_stage_model, SD3TextConditioner) and m.cond_stage_model.names == ("minilm",)
    assert m.sample_kwargs == {"sampler": "euler", "num_steps": 3, "shift": 1.0, "guidance_scale": 1.0}
    assert legacy_arguments(None, text, {"sampler": None, "steps": 7}) == (text, {"num_steps": 7})
    with pytest.raises(ValueError, match="both num_steps and"):
        legacy_arguments(None, None, {"steps": 3, "num_steps": 4})
    with pytest.raises(ValueError, match="cond_stage_model or"):
        legacy_arguments(text, {"minilm": True}, None)


def test_a_model_built_by_the_training_config_starts_from_adaln_zero():
    """adaLN-Zero is unmissable: the MMDiT the training config builds has every modulation output (each block's
    image and text streams, the final layer's) exactly zero at step 0, and so a zero output."""
    overrides = ["module.first_stage=null", "+module.image_channels=1", "+module.transformer.in_channels=1"]
    overrides += ["+module.transformer.out_channels=1", "+module.transformer.patch_size=4"]
    overrides += ["+module.transformer.sample_size=32", "run_dir=/tmp/unused"]
    cfg = compose(CONFIGS, "train", ["experiment=fmnist_rf_lognorm", *overrides])
    m = instantiate(cfg.module, _convert_="all")
    norms = [mod for mod in m.transformer.modules() if isinstance(mod, (AdaLayerNormZero, AdaLayerNormContinuous))]
    assert len(norms) == 2 * len(m.transformer.transformer_blocks) + 1  # norm1 + norm1_context per block, norm_out
    outputs = []
    hooks = [mod.linear.register_forward_hook(lambda mod, i, o: outputs.append(o)) for mod in norms]
    hooks.append(m.transformer.proj_out.register_forward_hook(lambda mod, i, o: outputs.append(o)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *m.latent_shape, generator=g)
    cond = m.cond_stage_model.encode({"caption": ["a photo of a bag", "a photo of a coat", "a photo of a shirt"]})
    with torch.no_grad():
        v = m.velocity(x, torch.tensor([999.0, 500.0, 3.0]), **cond)
    for h in hooks:
        h.remove()
    assert len(outputs) == len(norms) + 1
    assert all(torch.equal(o, torch.zeros_like(o)) for o in outputs)
    assert torch.equal(v, torch.zeros_like(x))
