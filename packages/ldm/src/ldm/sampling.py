"""Samplers for LDM: DDIM, PLMS, ancestral DDPM -- pure functions over a denoiser and a step grid.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (samples with DDIM,
Sec. 4 / App. D; classifier-free guidance for LDM-4-G / LDM-KL-8-G). Official code: ``CompVis/latent-diffusion`` at
a506df57, ``ldm/models/diffusion/ddim.py``, ``plms.py``, ``ddpm.py`` (``p_sample``, ``p_sample_loop``).

- :func:`ddim_sample`: Song et al. 2021 (DDIM) Eq. 12 with sigma of Eq. 16 scaled by eta
  (:func:`gencore.diffusion.ddim_plan` / :func:`gencore.diffusion.ddim_step`):
  x0^ = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);
  x_prev = sqrt(a_prev) x0^ + sqrt(1 - a_prev - sigma^2) eps + sigma z,
  sigma = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)); the last a_prev is abar_0, not 1 (official).
- :func:`plms_sample`: Liu et al. 2022 (PNDM) pseudo linear multistep, as ``plms.py``: a pseudo improved Euler first
  step (two evaluations, eps' = (eps_t + eps_next) / 2), then Adams-Bashforth 2/3/4 on the eps history, each eps'
  plugged into the DDIM (eta = 0) update.
- :func:`ddpm_sample`: DDPM (Ho et al. 2020) Algorithm 2 in the official posterior form: x_{t-1} ~ N(mu~(x0^, x_t),
  beta~_t), no noise at t = 0, over all T steps.
- Masked sampling (inpainting, ``mask``/``x0``): ``x = q_sample(x0, t) * mask + (1 - mask) * x``; mask = 1 keeps x0.

DDIM and PLMS take the step grid as an argument (k-diffusion style): an ascending list of training timesteps, e.g.
``gencore.diffusion.ddim_timesteps(num_steps, T, "uniform")`` (the official ``make_ddim_timesteps``). Classifier-free
guidance is a wrapper of the denoiser (:func:`gencore.diffusion.classifier_free_guidance`).

A denoiser is any callable ``denoise(x, t)`` / ``denoise(x, t, **cond)`` (``cond`` a mapping) / ``denoise(x, t,
cond)`` (other ``cond``), called through :func:`gencore.diffusion.call_denoiser`, with x (B, ...) and t (B,) long,
returning the model output of the given ``parameterization`` ("eps", "x0" or "v"). The samplers never read model
attributes; devices and dtypes come from the tensors. All samplers run under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from gencore.diffusion import PARAMETERIZATIONS, call_denoiser, ddim_plan, ddim_step, x0_eps_from_output
from ldm.diffusion import DiffusionSchedule

__all__ = ["ddim_sample", "ddpm_sample", "plms_sample"]

Denoiser = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]
# one step of a sampler: (step index, x, the plan entry (t, ...)) -> (x after the step, its x0^)
Step = Callable[[int, Tensor, tuple], tuple[Tensor, Tensor]]


def _alphas_cumprod(schedule: DiffusionSchedule | Tensor) -> Tensor:
    if isinstance(schedule, DiffusionSchedule):
        return schedule.alphas_cumprod
    if isinstance(schedule, Tensor) and schedule.dim() == 1:
        return schedule
    raise ValueError(f"schedule must be a DiffusionSchedule or a 1-D alphas_cumprod tensor, got {type(schedule)}")


def _check_common(parameterization: str, x0: Tensor | None, mask: Tensor | None) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization={parameterization!r}; expected one of {PARAMETERIZATIONS}")
    if (x0 is None) != (mask is None):
        raise ValueError(f"masked sampling needs both x0 and mask, got x0={x0 is not None}, mask={mask is not None}")


def _plan(schedule: DiffusionSchedule | Tensor, timesteps: Sequence[int], eta: float) -> list[tuple]:
    """Descending (t, a_t, a_prev, sigma_t) over the ascending ``timesteps`` (:func:`gencore.diffusion.ddim_plan`)."""
    if isinstance(timesteps, str) or not hasattr(timesteps, "__iter__"):
        raise ValueError(
            "timesteps must be an ascending list of training timesteps, e.g. "
            f"gencore.diffusion.ddim_timesteps(num_steps, T), got {timesteps!r}"
        )
    return ddim_plan(_alphas_cumprod(schedule), timesteps, eta)


def _mix_known(x0: Tensor, mask: Tensor, generator: torch.Generator | None) -> Callable[[Tensor, tuple], Tensor]:
    """Before a step at noise level a: q_sample(x0, t) * mask + (1 - mask) * x (mask = 1: known region)."""

    def mix(x: Tensor, entry: tuple) -> Tensor:
        a = entry[1]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return (math.sqrt(a) * x0 + math.sqrt(1 - a) * noise) * mask + (1.0 - mask) * x

    return mix


def _sample_loop(
    x_T: Tensor,
    plan: Sequence[tuple],
    step: Step,
    *,
    prepare: Callable[[Tensor, tuple], Tensor] | None = None,
    callback: Callback | None = None,
    return_intermediates: bool = False,
) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
    """The loop every sampler shares: for each plan entry (t, ...), ``prepare`` (masked sampling's re-noising of the
    known region), one ``step``, ``callback({"i", "t", "x", "pred_x0"})`` and the intermediates."""
    x = x_T
    inter: dict[str, list[Tensor]] = {"x_inter": [x_T], "pred_x0": [x_T]}
    for i, entry in enumerate(plan):
        if prepare is not None:
            x = prepare(x, entry)
        x, x0_hat = step(i, x, entry)
        if callback is not None:
            callback({"i": i, "t": entry[0], "x": x, "pred_x0": x0_hat})
        if return_intermediates:
            inter["x_inter"].append(x)
            inter["pred_x0"].append(x0_hat)
    return (x, inter) if return_intermediates else x


def _at(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule | Tensor,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    parameterization: str = "eps",
    cond: Any = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    mask: Tensor | None = None,
    quantize_x0: Callable[[Tensor], Tensor] | None = None,
    return_intermediates: bool = False,
) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
    """DDIM sampling from x_T (B, ...) over the ascending training ``timesteps`` (``DDIMSampler.ddim_sampling``).

    ``schedule``: a :class:`DiffusionSchedule` or its ``alphas_cumprod`` (T,). ``eta`` = 0 is deterministic, 1 is
    DDPM-like; the noise (eta > 0, and the q_sample noise of masked sampling) comes from ``generator``.
    ``mask``/``x0``: before each step the known region (mask = 1) is reset to q_sample(x0, t) (the final x carries
    x0 at noise level abar_0 there). ``quantize_x0``: applied to x0^ (a VQ quantiser, official ``quantize_x0``).
    ``callback({"i", "t", "x", "pred_x0"})`` after every step. Returns x_0, or (x_0, {"x_inter": [...],
    "pred_x0": [...]}) (both lists start with x_T, then one entry per step) if ``return_intermediates``.
    """
    _check_common(parameterization, x0, mask)
    plan = _plan(schedule, timesteps, eta)

    def step(i: int, x: Tensor, entry: tuple) -> tuple[Tensor, Tensor]:
        t, a, a_prev, sigma = entry
        out = call_denoiser(denoise, x, _at(t, x), cond)  # (B, ...) eps | x0 | v
        x0_hat, eps = x0_eps_from_output(out, x, a, parameterization)
        return ddim_step(x, eps, a, a_prev, sigma, x0_hat=x0_hat, quantize_x0=quantize_x0, generator=generator)

    prepare = _mix_known(x0, mask, generator) if mask is not None else None
    return _sample_loop(x_T, plan, step, prepare=prepare, callback=callback, return_intermediates=return_intermediates)


@torch.no_grad()
def plms_sample(
    denoise: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule | Tensor,
    timesteps: Sequence[int],
    *,
    eta: float = 0.0,
    parameterization: str = "eps",
    cond: Any = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    mask: Tensor | None = None,
    quantize_x0: Callable[[Tensor], Tensor] | None = None,
    return_intermediates: bool = False,
) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
    """PLMS sampling (``PLMSSampler.plms_sampling``): S timesteps cost S + 1 denoiser evaluations.

    Step 1: pseudo improved Euler, eps' = (eps(x, t) + eps(x~, t_next)) / 2 with x~ the DDIM step from eps(x, t).
    Then Adams-Bashforth on the history of eps(x, t) (not of eps'): (3 e - e1) / 2, (23 e - 16 e1 + 5 e2) / 12,
    (55 e - 59 e1 + 37 e2 - 9 e3) / 24. ``eta`` must be 0. Other arguments as :func:`ddim_sample`; x0/v outputs are
    converted to eps at the noise level of the input they were evaluated at.
    """
    if eta != 0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got eta={eta}")
    _check_common(parameterization, x0, mask)
    plan = _plan(schedule, timesteps, 0.0)
    old_eps: list[Tensor] = []

    def eps_at(x: Tensor, t: int, a: float) -> Tensor:
        return x0_eps_from_output(call_denoiser(denoise, x, _at(t, x), cond), x, a, parameterization)[1]

    def step(i: int, x: Tensor, entry: tuple) -> tuple[Tensor, Tensor]:
        t, a, a_prev, _ = entry
        e_t = eps_at(x, t, a)
        if not old_eps:
            t_next, a_next = (plan[i + 1][0], plan[i + 1][1]) if i + 1 < len(plan) else (t, a)
            x_tmp, _ = ddim_step(x, e_t, a, a_prev, 0.0, quantize_x0=quantize_x0)
            e_prime = (e_t + eps_at(x_tmp, t_next, a_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        old_eps[:] = [*old_eps[-2:], e_t]
        return ddim_step(x, e_prime, a, a_prev, 0.0, quantize_x0=quantize_x0)

    prepare = _mix_known(x0, mask, generator) if mask is not None else None
    return _sample_loop(x_T, plan, step, prepare=prepare, callback=callback, return_intermediates=return_intermediates)


@torch.no_grad()
def ddpm_sample(
    denoise: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule,
    *,
    parameterization: str = "eps",
    cond: Any = None,
    clip_denoised: bool = False,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    mask: Tensor | None = None,
    quantize_x0: Callable[[Tensor], Tensor] | None = None,
    return_intermediates: bool = False,
) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
    """Ancestral sampling over all T steps (``LatentDiffusion.p_sample_loop``).

    x0^ from the model output (clamped to [-1, 1] if ``clip_denoised``; LatentDiffusion's default is False), then
    x_{t-1} = mu~(x0^, x_t) + exp(0.5 log beta~_t) z with the schedule's ``posterior_log_variance_clipped``, no noise
    at t = 0. With ``mask``/``x0`` the known region is reset to q_sample(x0, t) *after* the step at t (official order).
    """
    if not isinstance(schedule, DiffusionSchedule):
        raise ValueError(f"ddpm_sample needs a DiffusionSchedule (posterior coefficients), got {type(schedule)}")
    _check_common(parameterization, x0, mask)

    def step(i: int, x: Tensor, entry: tuple) -> tuple[Tensor, Tensor]:
        (t,) = entry
        out = call_denoiser(denoise, x, _at(t, x), cond)
        x0_hat, _ = schedule.model_output_to_x0_eps(x, t, out, parameterization)
        if clip_denoised:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        if quantize_x0 is not None:
            x0_hat = quantize_x0(x0_hat)
        mean, _, log_var = schedule.q_posterior(x0_hat, x, t)
        if t > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + (0.5 * log_var).exp() * noise
        else:
            x = mean
        if mask is not None:
            x = schedule.q_sample(x0, t, generator=generator) * mask + (1.0 - mask) * x
        return x, x0_hat

    plan = [(t,) for t in reversed(range(schedule.num_timesteps))]
    return _sample_loop(x_T, plan, step, callback=callback, return_intermediates=return_intermediates)
