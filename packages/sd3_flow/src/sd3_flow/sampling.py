"""Samplers for SD3 rectified flow and the eps/linear baseline -- pure functions over a velocity / eps callable, with
the step grid passed in (k-diffusion style).

Paper: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", ICML 2024
(arXiv 2403.03206). t in [0, 1], t = 1 noise; the generative ODE is dz_t/dt = v(z_t, t), integrated from t = 1 to 0.

- :func:`flow_timesteps`: the sigma grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` and the
  sd3.5 reference ``get_sigmas`` (``sd3_infer.py``): linspace(1, t_min, S), shifted with Eq. 23, then a terminal 0.
  Both references take t_min = shift_time(1 / num_train_timesteps, shift) from the already shifted training table and
  shift it again, so the last non-zero sigma is shifted twice (diffusers #13243; shift 3, 4 steps:
  [1, 0.85769, 0.60215, 0.0089286, 0]). Reproduced here for parity.
- :func:`euler_sample`: explicit Euler on the ODE over a descending ``sigmas`` grid, z_{t'} = z_t + (t' - t) v(z_t, t)
  (the reference ``sample_euler`` with d = (x - denoised) / sigma = v, and ``FlowMatchEulerDiscreteScheduler.step``).
- :func:`heun_sample`: Heun's 2nd-order method (Karras et al. 2022, Alg. 1 without churn): an Euler predictor, then
  the trapezoid corrector with v at t'; a step to t = 0 is plain Euler. 2 S - 1 evaluations on an S-step grid
  ending at 0.
- :func:`ddim_eps_sample`: deterministic DDIM (Song et al. 2021, Eq. 12 with sigma = 0) for the eps/linear LDM
  baseline over ascending training ``timesteps`` (the LDM selection :func:`gencore.diffusion.ddim_timesteps`,
  "uniform": range(0, T, T // S) + 1), with the final alpha_prev = alphas_cumprod[0] (as
  ``make_ddim_sampling_parameters``); the step maths is :func:`gencore.diffusion.ddim_plan` / ``ddim_step``.

Classifier-free guidance is a wrapper around the velocity / eps function: :func:`gencore.diffusion.
classifier_free_guidance` (Ho & Salimans 2022, the doubled batch [uncond, cond], as the reference ``CFGDenoiser``).

A velocity / eps function is called through :func:`gencore.diffusion.call_denoiser`: ``fn(x, timestep)`` /
``fn(x, timestep, **cond)`` (``cond`` a mapping) / ``fn(x, timestep, cond)`` (other ``cond``), x (B, ...),
``timestep`` a float tensor (B,) on x's device and dtype equal to ``t * timestep_scale`` (flow: SD3 uses 1000, as in
:class:`sd3_flow.losses.RectifiedFlowLoss`) or to the integer DDPM timestep scaled by ``timestep_scale / T`` (eps
baseline, as :class:`sd3_flow.losses.EpsilonLinearLoss`). The samplers never read model attributes, take devices and
dtypes from ``x_T``, and run under ``torch.no_grad()``. A ``callback`` receives a dict {"i", "t", "t_next", "x",
"out"} after every step (DDIM adds "x0").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from gencore.diffusion import call_denoiser, ddim_plan, ddim_step
from sd3_flow.losses import shift_time

__all__ = ["ddim_eps_sample", "euler_sample", "flow_timesteps", "heun_sample"]

Callback = Callable[[dict[str, Any]], None]


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got num_steps={num_steps!r}")


def flow_timesteps(num_steps: int, shift: float = 1.0, *, num_train_timesteps: int = 1000) -> Tensor:
    """Descending sigmas (num_steps + 1,) float64 from 1 to a terminal 0, as FlowMatchEulerDiscreteScheduler.

    sigmas[:-1] = shift_time(linspace(1, t_min, num_steps), shift) with t_min = shift_time(1 / num_train_timesteps,
    shift) (the double shift of the references, see the module docstring); sigmas[-1] = 0.
    """
    _check_steps(num_steps)
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got num_train_timesteps={num_train_timesteps}")
    t_min = shift_time(1.0 / num_train_timesteps, shift)
    grid = shift_time(torch.linspace(1.0, t_min, num_steps, dtype=torch.float64), shift)
    return torch.cat([grid, grid.new_zeros(1)])


def _grid(sigmas: Sequence[float] | Tensor) -> list[float]:
    """The descending grid as Python floats (read once, before the loop)."""
    if isinstance(sigmas, Tensor):
        sigmas = sigmas.detach().to("cpu", torch.float64).flatten().tolist()
    elif isinstance(sigmas, (int, float)):
        raise ValueError(f"sigmas must be a descending grid (e.g. flow_timesteps(num_steps, shift)), got {sigmas!r}")
    grid = [float(s) for s in sigmas]
    if len(grid) < 2 or any(b >= a for a, b in pairwise(grid)):
        raise ValueError(f"sigmas must be strictly decreasing with >= 2 entries, got sigmas={grid}")
    return grid


def _timestep(x: Tensor, t: float, scale: float) -> Tensor:
    return torch.full((x.shape[0],), t * scale, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler_sample(
    velocity: Callable[..., Tensor],
    x_T: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    cond: Any = None,
    callback: Callback | None = None,
    timestep_scale: float = 1000.0,
) -> Tensor:
    """Euler along the descending ``sigmas`` (e.g. :func:`flow_timesteps`; x_T (B, ...) at sigmas[0]):
    x_{t'} = x_t + (t' - t) v(x_t, t). len(sigmas) - 1 evaluations."""
    grid = _grid(sigmas)
    x = x_T
    for i, (t, t_next) in enumerate(pairwise(grid)):
        v = call_denoiser(velocity, x, _timestep(x, t, timestep_scale), cond)
        x = x + (t_next - t) * v
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "out": v})
    return x


@torch.no_grad()
def heun_sample(
    velocity: Callable[..., Tensor],
    x_T: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    cond: Any = None,
    callback: Callback | None = None,
    timestep_scale: float = 1000.0,
) -> Tensor:
    """Heun (2nd order) along the descending ``sigmas``: x_e = x + h v(x, t); x' = x + h (v(x, t) + v(x_e, t')) / 2,
    h = t' - t; Euler when t' = 0. 2 S - 1 evaluations on an S-step grid that ends at 0 (:func:`flow_timesteps`)."""
    grid = _grid(sigmas)
    x = x_T
    for i, (t, t_next) in enumerate(pairwise(grid)):
        h = t_next - t
        v = call_denoiser(velocity, x, _timestep(x, t, timestep_scale), cond)
        x_euler = x + h * v
        if t_next == 0.0:
            x = x_euler
        else:
            v_next = call_denoiser(velocity, x_euler, _timestep(x, t_next, timestep_scale), cond)
            v = (v + v_next) / 2
            x = x + h * v
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "out": v})
    return x


@torch.no_grad()
def ddim_eps_sample(
    eps_fn: Callable[..., Tensor],
    x_T: Tensor,
    alphas_cumprod: Tensor | Sequence[float],
    timesteps: Sequence[int],
    *,
    cond: Any = None,
    callback: Callback | None = None,
    timestep_scale: float = 1000.0,
) -> Tensor:
    """Deterministic DDIM (eta = 0) for an eps-predictor trained with :class:`sd3_flow.losses.EpsilonLinearLoss`.

    Over the ascending training ``timesteps`` (e.g. ``gencore.diffusion.ddim_timesteps(num_steps, T)``), highest
    first: x0^ = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); x_prev = sqrt(a_prev) x0^ + sqrt(1 - a_prev) eps; the last
    a_prev is alphas_cumprod[0] (official LDM). ``eps_fn`` receives ``timestep = t * timestep_scale / T`` as a float
    tensor (B,), T = len(alphas_cumprod).
    """
    plan = ddim_plan(alphas_cumprod, timesteps, eta=0.0)  # descending (t, a, a_prev, sigma = 0)
    num_train_timesteps = len(torch.as_tensor(alphas_cumprod).flatten())
    x = x_T
    for i, (t, a, a_prev, sigma) in enumerate(plan):
        eps = call_denoiser(eps_fn, x, _timestep(x, float(t), timestep_scale / num_train_timesteps), cond)
        x, x0_hat = ddim_step(x, eps, a, a_prev, sigma)
        if callback is not None:
            t_next = plan[i + 1][0] if i + 1 < len(plan) else 0
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "out": eps, "x0": x0_hat})
    return x
