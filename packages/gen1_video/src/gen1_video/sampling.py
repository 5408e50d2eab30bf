"""Sampling Gen-1 (Esser et al. 2023, arXiv 2302.03011, Sec. 3.3 "temporal control" / guidance): DDIM over a
guided denoiser.

**Guidance.** With μ(z, c) the video model's prediction (video mode), μ_π(z, c) the frame-wise image model's (image
mode: the same network with every temporal layer skipped) and ∅ the null content,

    μ̃ = μ_π(z, ∅) + ω_t · (μ(z, ∅) − μ_π(z, ∅)) + ω · (μ(z, c) − μ(z, ∅))

- ω (``guidance_scale``): classifier-free guidance on the content c (Ho & Salimans 2022);
- ω_t (``temporal_scale``): temporal guidance. ω_t = 1 gives plain classifier-free guidance on the video model;
  ω_t > 1 extrapolates away from the frame-wise model (temporally smoother), ω_t < 1 moves toward it (more
  per-frame detail, more flicker); ω_t = 0, ω = 0 is the frame-wise image model without content.

This form is a reconstruction: the paper names both scales and the two modes; how exactly they combine is not
spelled out in what we could check, so it is documented here and tested in its limiting cases. The prediction μ may
be ε, x0 or v: the combination is linear, so it is the same for each.

Cost per step: one call on the doubled batch [∅, c] when ω_t = 1 (gencore's classifier-free guidance); otherwise
that call (as μ̃ = (1 − ω_t) μ_π(z, ∅) + ω_t [μ(z, ∅) + (ω / ω_t)(μ(z, c) − μ(z, ∅))]) plus one image-mode call
μ_π(z, ∅).

**Sampling.** :func:`sample_video` runs ldm's DDIM (:func:`ldm.sampling.ddim_sample`, over
:func:`gencore.diffusion.ddim_plan` / ``ddim_step``) with this guided denoiser on video latents (B, C, T, h, w); the
step grid is passed in (e.g. :func:`gencore.diffusion.ddim_timesteps`). Masked sampling (``x0`` / ``mask``, the
paper's masked video editing) is ldm's.

A denoiser here is any callable ``denoise(x, t, *, image_mode: bool, **cond)`` (the video UNet is one:
``cond = {"context", "structure", "structure_level"}``); the wrappers never read model attributes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gencore.diffusion import call_denoiser, classifier_free_guidance
from ldm.diffusion import DiffusionSchedule
from ldm.sampling import ddim_sample

__all__ = ["sample_video", "temporal_guidance"]

Denoiser = Callable[..., Tensor]


def _scale(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def temporal_guidance(
    denoise: Denoiser, *, guidance_scale: float, temporal_scale: float = 1.0, uncond: Any = None
) -> Denoiser:
    """``denoise`` wrapped into μ̃ = μ_π(z, ∅) + ω_t (μ(z, ∅) − μ_π(z, ∅)) + ω (μ(z, c) − μ(z, ∅)) (module
    docstring), with ω = ``guidance_scale`` and ω_t = ``temporal_scale``.

    ``denoise(x, t, *, image_mode, **cond)``: ``image_mode=False`` gives μ, ``True`` gives μ_π. The wrapped
    callable takes ``(x, t, **cond)`` (or one positional condition); ``uncond`` replaces the content as in
    :func:`gencore.diffusion.classifier_free_guidance`, e.g. ``{"context": null_content}`` (conditions it does not
    name, such as the structure, are shared by every call). It is needed unless ω = 1 and ω_t = 1."""
    omega = _scale(guidance_scale, "guidance_scale")
    omega_t = _scale(temporal_scale, "temporal_scale")
    if uncond is None and (omega != 1.0 or omega_t != 1.0):
        raise ValueError(
            f"guidance_scale={omega}, temporal_scale={omega_t} need the null content: pass uncond (e.g. "
            "{'context': zeros})"
        )
    video = functools.partial(denoise, image_mode=False)
    image = functools.partial(denoise, image_mode=True)
    # μ̃ = (1 − ω_t) μ_π(z, ∅) + ω_t [μ(z, ∅) + (ω / ω_t)(μ(z, c) − μ(z, ∅))]: the same sum, with the two video terms
    # in one classifier-free-guidance call on the doubled batch
    video_cfg = classifier_free_guidance(video, omega / omega_t if omega_t != 0.0 else 0.0, uncond)
    if omega_t != 1.0:
        video_uncond = classifier_free_guidance(video, 0.0, uncond)  # μ(z, ∅)
        image_uncond = classifier_free_guidance(image, 0.0, uncond)  # μ_π(z, ∅)

    def guided(x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if (args and kwargs) or len(args) > 1:
            raise ValueError("temporal guidance takes one positional condition or keyword conditions")
        cond = kwargs if kwargs else (args[0] if args else None)
        if omega_t == 1.0:
            return call_denoiser(video_cfg, x, t, cond)
        out = (1.0 - omega_t) * call_denoiser(image_uncond, x, t, cond)
        if omega_t != 0.0:
            out = out + omega_t * call_denoiser(video_cfg, x, t, cond)
        elif omega != 0.0:  # ω_t = 0: the frame-wise model, plus ω (μ(z, c) − μ(z, ∅)) of the video model
            out = out + omega * (call_denoiser(video, x, t, cond) - call_denoiser(video_uncond, x, t, cond))
        return out

    return guided


@torch.no_grad()
def sample_video(
    denoise: Denoiser,
    z_T: Tensor,
    schedule: DiffusionSchedule | Tensor,
    timesteps: Sequence[int],
    *,
    context: Tensor,
    uncond_context: Tensor | None = None,
    structure: Tensor | None = None,
    structure_level: Tensor | int | None = None,
    guidance_scale: float = 1.0,
    temporal_scale: float = 1.0,
    eta: float = 0.0,
    parameterization: str = "eps",
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    mask: Tensor | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> Tensor:
    """DDIM from z_T (B, C, T, h, w) with content ``context`` (B, L, D) (null content ``uncond_context``: (B, L, D),
    (1, L, D) or (L, D)), structure (B, S, T, h, w) at level ``structure_level``, and the guidance of
    :func:`temporal_guidance`. ``timesteps``: ascending training timesteps. Returns z_0 (B, C, T, h, w)."""
    if z_T.dim() != 5:
        raise ValueError(f"z_T must be video latents (B, C, T, h, w), got shape {tuple(z_T.shape)}")
    cond: dict[str, Any] = {"context": context}
    if structure is not None or structure_level is not None:
        cond |= {"structure": structure, "structure_level": structure_level}
    uncond: Mapping[str, Any] | None = None if uncond_context is None else {"context": uncond_context}
    guided = temporal_guidance(denoise, guidance_scale=guidance_scale, temporal_scale=temporal_scale, uncond=uncond)
    return ddim_sample(
        guided,
        z_T,
        schedule,
        timesteps,
        eta=eta,
        parameterization=parameterization,
        cond=cond,
        generator=generator,
        x0=x0,
        mask=mask,
        callback=callback,
    )
