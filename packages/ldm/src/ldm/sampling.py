"""Samplers for LDM: DDIM, PLMS, ancestral DDPM, classifier-free guidance -- pure functions over a denoiser.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (samples with DDIM,
Sec. 4 / App. D; classifier-free guidance for LDM-4-G / LDM-KL-8-G). Official code: ``CompVis/latent-diffusion`` at
a506df57, ``ldm/models/diffusion/ddim.py``, ``plms.py``, ``ddpm.py`` (``p_sample``, ``p_sample_loop``) and
``ldm/modules/diffusionmodules/util.py`` (``make_ddim_timesteps``, ``make_ddim_sampling_parameters``).

- :func:`ddim_timesteps`: the official step selection (uniform stride T // S, offset +1; or "quad").
- :func:`ddim_sample`: Song et al. 2021 (DDIM) Eq. 12 with sigma of Eq. 16 scaled by eta:
  x0^ = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);
  x_prev = sqrt(a_prev) x0^ + sqrt(1 - a_prev - sigma^2) eps + sigma z,
  sigma = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)); the last a_prev is abar_0, not 1 (official).
- :func:`plms_sample`: Liu et al. 2022 (PNDM) pseudo linear multistep, as ``plms.py``: a pseudo improved Euler first
  step (two evaluations, eps' = (eps_t + eps_next) / 2), then Adams-Bashforth 2/3/4 on the eps history, each eps'
  plugged into the DDIM (eta = 0) update.
- :func:`ddpm_sample`: DDPM (Ho et al. 2020) Algorithm 2 in the official posterior form: x_{t-1} ~ N(mu~(x0^, x_t),
  beta~_t), no noise at t = 0.
- :func:`classifier_free_guidance`: Ho & Salimans 2022: eps = eps_u + s (eps_c - eps_u), batch doubled [uncond, cond]
  (``p_sample_ddim``).
- Masked sampling (inpainting, ``mask``/``x0``): ``x = q_sample(x0, t) * mask + (1 - mask) * x``; mask = 1 keeps x0.

A denoiser is any callable ``denoise(x, t)`` / ``denoise(x, t, **cond)`` (``cond`` a mapping) / ``denoise(x, t,
cond)`` (other ``cond``), with x (B, ...) and t (B,) long, returning the model output of the given
``parameterization`` ("eps", "x0" or "v"); see :func:`ldm.diffusion.apply_denoiser`. The samplers never read model
attributes; devices and dtypes come from the tensors. All samplers run under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldm.diffusion import PARAMETERIZATIONS, DiffusionSchedule, apply_denoiser

__all__ = [
    "classifier_free_guidance",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "plms_sample",
]

Denoiser = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]


def ddim_timesteps(num_steps: int, num_train: int = 1000, method: str = "uniform") -> list[int]:
    """Ascending training timesteps used by DDIM/PLMS (``make_ddim_timesteps``), e.g. S=5, T=1000 -> [1, 201, ...801].

    "uniform": ``range(0, T, T // S) + 1``. As officially, the count is ``ceil(T / (T // S))``, more than ``S``
    when S does not divide T (S=7 -> 8 steps, stride 142). "quad": ``int(linspace(0, sqrt(0.8 T), S) ** 2) + 1``
    (may repeat small timesteps for large S, as officially). The +1 offset reaches t = T, outside the schedule (an
    IndexError in the official code), whenever the stride divides T - 1 (S > T / 2, or S = 3 for T = 1000): that
    raises a ValueError here.
    """
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got num_train={num_train}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got num_steps={num_steps}")
    if num_steps > num_train:
        raise ValueError(f"num_steps={num_steps} exceeds the number of training timesteps num_train={num_train}")
    if method == "uniform":
        c = num_train // num_steps
        steps = [s + 1 for s in range(0, num_train, c)]
    elif method == "quad":
        steps = (np.linspace(0, np.sqrt(num_train * 0.8), num_steps) ** 2).astype(int) + 1  # numpy as officially
        steps = [int(s) for s in steps]
    else:
        raise ValueError(f"unknown method={method!r}; expected 'uniform' or 'quad'")
    if steps[-1] >= num_train:
        raise ValueError(
            f"num_steps={num_steps} with num_train={num_train} and method={method!r} selects t={steps[-1]}, outside "
            f"[0, {num_train - 1}] (official stride T // S and +1 offset); pick another num_steps or use ddpm_sample"
        )
    return steps


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


def _ddim_plan(
    schedule: DiffusionSchedule | Tensor, num_steps: int, eta: float, method: str
) -> list[tuple[int, float, float, float]]:
    """Descending [(t, a_t, a_prev, sigma_t)] (``make_ddim_sampling_parameters``), maths in float64."""
    ac = _alphas_cumprod(schedule).detach().to("cpu", torch.float64)
    steps = ddim_timesteps(num_steps, ac.shape[0], method)
    alphas = ac[steps].tolist()
    prev = [float(ac[0]), *alphas[:-1]]  # the first a_prev is abar_0, not 1
    plan = []
    for t, a, ap in zip(steps, alphas, prev):
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        if 1 - ap - sigma**2 < 0:
            raise ValueError(f"eta={eta} gives sigma^2={sigma**2:.3g} > 1 - a_prev={1 - ap:.3g} at t={t}; use eta <= 1")
        plan.append((t, a, ap, sigma))
    return plan[::-1]


def _x0_eps(out: Tensor, x: Tensor, a: float, parameterization: str) -> tuple[Tensor, Tensor]:
    """(x0^, eps^) at noise level abar = a from a model output (scalar coefficients)."""
    sa, s1 = math.sqrt(a), math.sqrt(1 - a)
    if parameterization == "eps":
        return (x - s1 * out) / sa, out
    if parameterization == "x0":
        return out, (x - sa * out) / s1
    return sa * x - s1 * out, sa * out + s1 * x  # v


def _mix_known(x: Tensor, x0: Tensor, mask: Tensor, a: float, generator: torch.Generator | None) -> Tensor:
    """q_sample(x0, t) * mask + (1 - mask) * x (mask = 1: known region)."""
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return (math.sqrt(a) * x0 + math.sqrt(1 - a) * noise) * mask + (1.0 - mask) * x


def _ddim_step(
    x: Tensor,
    eps: Tensor,
    a: float,
    a_prev: float,
    sigma: float,
    *,
    x0_hat: Tensor | None = None,
    quantize_x0: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
    draw_noise: bool = False,
) -> tuple[Tensor, Tensor]:
    """One DDIM update (DDIM Eq. 12) -> (x_prev, x0^)."""
    if x0_hat is None:
        x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if quantize_x0 is not None:
        x0_hat = quantize_x0(x0_hat)
    x_prev = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma**2) * eps
    if draw_noise:
        x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x_prev, x0_hat


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule | Tensor,
    num_steps: int,
    *,
    eta: float = 0.0,
    parameterization: str = "eps",
    cond: Any = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    mask: Tensor | None = None,
    quantize_x0: Callable[[Tensor], Tensor] | None = None,
    method: str = "uniform",
    return_intermediates: bool = False,
) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
    """DDIM sampling from x_T (B, ...) over ``ddim_timesteps(num_steps, T, method)`` (``DDIMSampler.ddim_sampling``).

    ``schedule``: a :class:`DiffusionSchedule` or its ``alphas_cumprod`` (T,). ``eta`` = 0 is deterministic, 1 is
    DDPM-like; the noise (eta > 0, and the q_sample noise of masked sampling) comes from ``generator``.
    ``mask``/``x0``: before each step the known region (mask = 1) is reset to q_sample(x0, t) (the final x carries
    x0 at noise level abar_0 there). ``quantize_x0``: applied to x0^ (a VQ quantiser, official ``quantize_x0``).
    ``callback({"i", "t", "x", "pred_x0"})`` after every step. Returns x_0, or (x_0, {"x_inter": [...],
    "pred_x0": [...]}) (both lists start with x_T, then one entry per step) if ``return_intermediates``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got eta={eta}")
    _check_common(parameterization, x0, mask)
    plan = _ddim_plan(schedule, num_steps, eta, method)
    b = x_T.shape[0]
    x = x_T
    inter: dict[str, list[Tensor]] = {"x_inter": [x_T], "pred_x0": [x_T]}
    for i, (t, a, ap, sigma) in enumerate(plan):
        if mask is not None:
            x = _mix_known(x, x0, mask, a, generator)
        ts = torch.full((b,), t, device=x.device, dtype=torch.long)
        out = apply_denoiser(denoise, x, ts, cond)  # (B, ...) eps | x0 | v
        x0_hat, eps = _x0_eps(out, x, a, parameterization)
        x, x0_hat = _ddim_step(
            x, eps, a, ap, sigma, x0_hat=x0_hat, quantize_x0=quantize_x0, generator=generator, draw_noise=eta > 0
        )
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": x0_hat})
        if return_intermediates:
            inter["x_inter"].append(x)
            inter["pred_x0"].append(x0_hat)
    return (x, inter) if return_intermediates else x


@torch.no_grad()
def plms_sample(
    denoise: Denoiser,
    x_T: Tensor,
    schedule: DiffusionSchedule | Tensor,
    num_steps: int,
    *,
    eta: float = 0.0,
    parameterization: str = "eps",
    cond: Any = None,
    callback: Callback | None = None,
    generator: torch.Generator | None = None,
    x0: Tensor | None = None,
    mask: Tensor | None = None,
    quantize_x0: Callable[[Tensor], Tensor] | None = None,
    method: str = "uniform",
    return_intermediates: bool = False,
) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
    """PLMS sampling (``PLMSSampler.plms_sampling``): S steps cost S + 1 denoiser evaluations.

    Step 1: pseudo improved Euler, eps' = (eps(x, t) + eps(x~, t_next)) / 2 with x~ the DDIM step from eps(x, t).
    Then Adams-Bashforth on the history of eps(x, t) (not of eps'): (3 e - e1) / 2, (23 e - 16 e1 + 5 e2) / 12,
    (55 e - 59 e1 + 37 e2 - 9 e3) / 24. ``eta`` must be 0. Other arguments as :func:`ddim_sample`; x0/v outputs are
    converted to eps at the noise level of the input they were evaluated at.
    """
    if eta != 0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got eta={eta}")
    _check_common(parameterization, x0, mask)
    plan = _ddim_plan(schedule, num_steps, 0.0, method)
    b = x_T.shape[0]
    x = x_T
    inter: dict[str, list[Tensor]] = {"x_inter": [x_T], "pred_x0": [x_T]}
    old_eps: list[Tensor] = []

    def eps_at(x_in: Tensor, t: int, a: float) -> Tensor:
        ts = torch.full((b,), t, device=x_in.device, dtype=torch.long)
        return _x0_eps(apply_denoiser(denoise, x_in, ts, cond), x_in, a, parameterization)[1]

    for i, (t, a, ap, _) in enumerate(plan):
        if mask is not None:
            x = _mix_known(x, x0, mask, a, generator)
        e_t = eps_at(x, t, a)
        if not old_eps:
            t_next, a_next = (plan[i + 1][0], plan[i + 1][1]) if i + 1 < len(plan) else (t, a)
            x_tmp, _ = _ddim_step(x, e_t, a, ap, 0.0, quantize_x0=quantize_x0)
            e_prime = (e_t + eps_at(x_tmp, t_next, a_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, x0_hat = _ddim_step(x, e_prime, a, ap, 0.0, quantize_x0=quantize_x0)
        old_eps = [*old_eps[-2:], e_t]
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": x0_hat})
        if return_intermediates:
            inter["x_inter"].append(x)
            inter["pred_x0"].append(x0_hat)
    return (x, inter) if return_intermediates else x


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
    b = x_T.shape[0]
    x = x_T
    inter: dict[str, list[Tensor]] = {"x_inter": [x_T], "pred_x0": [x_T]}
    for i, t in enumerate(reversed(range(schedule.num_timesteps))):
        ts = torch.full((b,), t, device=x.device, dtype=torch.long)
        out = apply_denoiser(denoise, x, ts, cond)
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
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": x0_hat})
        if return_intermediates:
            inter["x_inter"].append(x)
            inter["pred_x0"].append(x0_hat)
    return (x, inter) if return_intermediates else x


def _expand_cat(u: Any, c: Any, name: str) -> Any:
    """cat([u broadcast to c, c]) along the batch; lists/tuples element-wise."""
    if isinstance(c, (list, tuple)):
        if not isinstance(u, (list, tuple)) or len(u) != len(c):
            raise ValueError(f"uncond{name} must be a list of {len(c)} items like the condition")
        return type(c)(_expand_cat(ui, ci, f"{name}[{i}]") for i, (ui, ci) in enumerate(zip(u, c)))
    if not isinstance(c, Tensor):
        raise ValueError(f"condition{name} must be a tensor to pair with an uncond, got {type(c).__name__}")
    u = torch.as_tensor(u, device=c.device).to(dtype=c.dtype)
    if u.dim() == c.dim() - 1:
        u = u.unsqueeze(0)
    if u.dim() != c.dim() or any(du not in (1, dc) for du, dc in zip(u.shape, c.shape)):
        raise ValueError(f"uncond{name} of shape {tuple(u.shape)} does not broadcast to the condition {tuple(c.shape)}")
    return torch.cat([u.expand_as(c), c])


def _dup(c: Any) -> Any:
    """A condition shared by both halves: tensors repeated along the batch, other values unchanged."""
    if isinstance(c, (list, tuple)):
        return type(c)(_dup(ci) for ci in c)
    return torch.cat([c, c]) if isinstance(c, Tensor) and c.dim() > 0 else c


def classifier_free_guidance(denoise: Denoiser, scale: float, uncond: Any = None) -> Denoiser:
    """Wrap ``denoise`` into eps = eps_u + scale (eps_c - eps_u), one call on the doubled batch [uncond, cond].

    The wrapper takes the condition the way the samplers pass it: positionally (``uncond`` then broadcasts to it:
    (B, ...), (1, ...) or (...), e.g. the "" caption embedding or the null class index 1000 of cin256-v2), or as
    keyword arguments (``uncond`` a dict; keys absent from it, e.g. ``c_concat`` of an inpainting model, are shared by
    both halves). ``scale`` = 1 calls ``denoise`` once, unchanged (the conditional prediction); ``scale`` = 0 gives the
    unconditional one. Apply it to eps (or v; guidance is linear in either) outputs.
    """
    scale = float(scale)
    if scale != 1.0 and uncond is None:
        raise ValueError(f"guidance scale={scale} != 1 needs an unconditional condition, got uncond=None")

    def guided(x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if scale == 1.0:
            return denoise(x, t, *args, **kwargs)
        if len(args) > 1:
            raise ValueError(f"classifier_free_guidance supports one positional condition, got {len(args)}")
        if args and isinstance(uncond, Mapping):
            raise ValueError("a positional condition needs a tensor uncond, got a dict")
        if not args and not isinstance(uncond, Mapping):
            raise ValueError("keyword conditions need a dict uncond {name: value}")
        x_in = torch.cat([x, x])
        t_in = torch.cat([t, t]) if t.dim() > 0 else t
        args_in = (_expand_cat(uncond, args[0], ""),) if args else ()
        kwargs_in = dict(kwargs)
        if not args:
            missing = [k for k in uncond if k not in kwargs]
            if missing:
                raise ValueError(f"uncond keys {missing} are not among the condition's keys {list(kwargs)}")
            for k, v in kwargs.items():
                kwargs_in[k] = _expand_cat(uncond[k], v, f"[{k!r}]") if k in uncond else _dup(v)
        eps_u, eps_c = denoise(x_in, t_in, *args_in, **kwargs_in).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return guided
