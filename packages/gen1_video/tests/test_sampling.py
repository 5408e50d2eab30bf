"""Temporal guidance (closed-form denoiser and the tiny video UNet) and DDIM sampling of video latents."""

from __future__ import annotations

import functools

import pytest
import torch

from gen1_video.models.video_unet import TEMPORAL_PREFIXES, video_unet_from_preset
from gen1_video.sampling import sample_video, temporal_guidance
from gencore.diffusion import classifier_free_guidance, ddim_timesteps
from gencore.testing import randomize_parameters
from ldm.diffusion import DiffusionSchedule
from ldm.sampling import ddim_sample


class ToyDenoiser:
    """Closed form: video mode mixes neighbouring frames, content shifts the output; counts calls and batch sizes."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, x, t, *, context, image_mode, structure=None, structure_level=None):
        self.calls.append((x.shape[0], image_mode))
        out = 0.5 * x + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1)
        if structure is not None:
            out = out + 0.1 * structure
        if not image_mode:
            out = out + 0.3 * x.roll(1, dims=2)
        return out


def _toy_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 4, 4, generator=g)
    t = torch.tensor([10, 20])
    ctx = torch.randn(2, 2, 8, generator=g) + 1.0
    s = torch.randn(2, 1, 3, 4, 4, generator=g)
    return x, t, ctx, s, torch.zeros(1, 2, 8)


@pytest.mark.parametrize(("omega", "omega_t"), [(7.5, 1.0), (3.0, 1.5), (2.0, 0.0), (0.0, 2.0), (1.0, 0.5)])
def test_temporal_guidance_is_the_documented_combination(omega, omega_t):
    x, t, ctx, s, null = _toy_inputs()
    f = ToyDenoiser()
    out = temporal_guidance(f, guidance_scale=omega, temporal_scale=omega_t, uncond={"context": null})(
        x, t, context=ctx, structure=s
    )
    nul = null.expand_as(ctx)
    mu_c = f(x, t, context=ctx, structure=s, image_mode=False)
    mu_u = f(x, t, context=nul, structure=s, image_mode=False)
    mu_pi_u = f(x, t, context=nul, structure=s, image_mode=True)
    assert torch.allclose(out, mu_pi_u + omega_t * (mu_u - mu_pi_u) + omega * (mu_c - mu_u), atol=1e-5)


def test_omega_t_one_is_plain_classifier_free_guidance_in_one_doubled_call():
    x, t, ctx, s, null = _toy_inputs()
    f = ToyDenoiser()
    out = temporal_guidance(f, guidance_scale=7.5, temporal_scale=1.0, uncond={"context": null})(
        x, t, context=ctx, structure=s
    )
    assert f.calls == [(4, False)]  # [∅, c] in one video-mode call, the image mode never runs
    ref = classifier_free_guidance(functools.partial(f, image_mode=False), 7.5, {"context": null})(
        x, t, context=ctx, structure=s
    )
    assert torch.equal(out, ref)
    f.calls.clear()
    temporal_guidance(f, guidance_scale=2.0, temporal_scale=1.5, uncond={"context": null})(x, t, context=ctx)
    assert sorted(f.calls) == [(2, True), (4, False)]  # [∅, c] in one video-mode call, + the image mode
    f.calls.clear()
    temporal_guidance(f, guidance_scale=0.0, temporal_scale=1.5, uncond={"context": null})(x, t, context=ctx)
    assert sorted(f.calls) == [(2, False), (2, True)]  # ω = 0: no conditional call at all


def test_guidance_on_the_video_unet():
    torch.manual_seed(0)
    model = randomize_parameters(video_unet_from_preset("tiny")).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.tensor([100, 700])
    ctx, other = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    s = torch.rand(2, 1, 3, 8, 8, generator=g) * 2 - 1
    cond = dict(structure=s, structure_level=torch.tensor([1, 3]))
    null = {"context": torch.zeros(3, 16)}
    with torch.no_grad():
        # ω_t = 1: plain classifier-free guidance on the video model
        out = temporal_guidance(model, guidance_scale=5.0, temporal_scale=1.0, uncond=null)(x, t, context=ctx, **cond)
        mu_c = model(x, t, ctx, **cond)
        mu_u = model(x, t, torch.zeros(2, 3, 16), **cond)
        # up to float32 rounding between the doubled batch and two single calls (~3e-6), amplified by 2ω + 1
        assert (out - (mu_u + 5.0 * (mu_c - mu_u))).abs().max() < 5e-5
        # ω = 0: the content term is gone, whatever the content
        a = temporal_guidance(model, guidance_scale=0.0, temporal_scale=2.0, uncond=null)(x, t, context=ctx, **cond)
        b = temporal_guidance(model, guidance_scale=0.0, temporal_scale=2.0, uncond=null)(x, t, context=other, **cond)
        assert torch.equal(a, b)
        mu_pi_u = model(x, t, torch.zeros(2, 3, 16), image_mode=True, **cond)
        assert torch.allclose(a, mu_pi_u + 2.0 * (mu_u - mu_pi_u), atol=1e-5)
        assert (a - mu_u).abs().max() > 1e-3  # the temporal term acts (trained temporal layers)
        # ω_t = 0, ω = 0: the frame-wise image model without content
        c = temporal_guidance(model, guidance_scale=0.0, temporal_scale=0.0, uncond=null)(x, t, context=ctx, **cond)
        assert torch.allclose(c, mu_pi_u, atol=1e-6)


def test_guidance_arguments_are_checked():
    f = ToyDenoiser()
    for bad in (float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="temporal_scale must be a finite number"):
            temporal_guidance(f, guidance_scale=1.0, temporal_scale=bad, uncond={"context": torch.zeros(1)})
    with pytest.raises(ValueError, match="need the null content"):
        temporal_guidance(f, guidance_scale=1.0, temporal_scale=2.0)
    x, t, ctx, _, _ = _toy_inputs()
    assert torch.equal(
        temporal_guidance(f, guidance_scale=1.0)(x, t, context=ctx), f(x, t, context=ctx, image_mode=False)
    )


# ------------------------------------------------------------------------------------------------------ sampling


def test_ddim_recovers_a_point_mass_clip_with_the_exact_denoiser():
    """Data = one clip x*: the exact ε(z_t, t) = (z_t - sqrt(abar_t) x*) / sqrt(1 - abar_t) in video and image mode
    alike, so any guidance gives it back, and DDIM lands on x* (at noise level abar_0)."""
    sched = DiffusionSchedule("linear", 1000)
    ac = sched.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, 4, 5, 4, 4, generator=g)

    def eps(x, t, *, context, image_mode, structure=None, structure_level=None):
        a = ac[t].reshape(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    z_T = torch.randn(2, 4, 5, 4, 4, generator=g)
    out = sample_video(
        eps,
        z_T,
        sched,
        ddim_timesteps(20),
        context=torch.ones(2, 1, 8),
        uncond_context=torch.zeros(1, 8),
        guidance_scale=3.0,
        temporal_scale=2.0,
    )
    assert out.shape == z_T.shape
    assert (out - target).abs().max() < 0.05


def test_sample_video_with_the_tiny_unet_is_ldm_ddim_over_guided_calls():
    torch.manual_seed(0)
    model = _perturbed()
    sched = DiffusionSchedule("linear", 1000)
    steps = ddim_timesteps(4)
    g = torch.Generator().manual_seed(2)
    z_T = torch.randn(1, 4, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 2, 16, generator=g)
    s = torch.rand(1, 1, 3, 8, 8, generator=g) * 2 - 1
    kw = dict(context=ctx, uncond_context=torch.zeros(2, 16), structure=s, structure_level=2, guidance_scale=4.0)
    out = sample_video(model, z_T, sched, steps, temporal_scale=1.0, **kw)
    ref = ddim_sample(
        classifier_free_guidance(functools.partial(model, image_mode=False), 4.0, {"context": torch.zeros(2, 16)}),
        z_T,
        sched,
        steps,
        cond={"context": ctx, "structure": s, "structure_level": 2},
    )
    assert out.shape == (1, 4, 3, 8, 8) and torch.isfinite(out).all()
    assert torch.allclose(out, ref, atol=1e-5)
    smoother = sample_video(model, z_T, sched, steps, temporal_scale=3.0, **kw)
    assert (smoother - out).abs().max() > 1e-3  # ω_t changes the sample
    with pytest.raises(ValueError, match=r"video latents \(B, C, T, h, w\)"):
        sample_video(model, z_T[:, :, 0], sched, steps, **kw)


def _perturbed():
    model = randomize_parameters(video_unet_from_preset("tiny")).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(TEMPORAL_PREFIXES):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model
