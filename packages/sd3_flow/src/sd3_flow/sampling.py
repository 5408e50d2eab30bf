"""Samplers for SD3 rectified flow and the eps/linear baseline -- pure functions over a velocity / eps callable.

Paper: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", ICML 2024
(arXiv 2403.03206). t in [0, 1], t = 1 noise; the generative ODE is dz_t/dt = v(z_t, t), integrated from t = 1 to 0.

- :func:`flow_timesteps`: the sigma grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` and the
  sd3.5 reference ``get_sigmas`` (``sd3_infer.py``): linspace(1, t_min, S), shifted with Eq. 23, then a terminal 0.
  Both references take t_min = shift_time(1 / num_train_timesteps, shift) from the already shifted training table and
  shift it again, so the last non-zero sigma is shifted twice (diffusers #13243; shift 3, 4 steps:
  [1, 0.85769, 0.60215, 0.0089286, 0]). Reproduced here for parity.
- :func:`euler_sample`: explicit Euler on the ODE, z_{t'} = z_t + (t' - t) v(z_t, t) (the reference
  ``sample_euler`` with d = (x - denoised) / sigma = v, and ``FlowMatchEulerDiscreteScheduler.step``).
- :func:`heun_sample`: Heun's 2nd-order method (Karras et al. 2022, Alg. 1 without churn): an Euler predictor, then
  the trapezoid corrector with v at t'; the final step to t = 0 is plain Euler. 2 S - 1 evaluations for S steps.
- :func:`ddim_eps_sample`: deterministic DDIM (Song et al. 2021, Eq. 12 with sigma = 0) for the eps/linear LDM
  baseline with the LDM step selection (``make_ddim_timesteps``, "uniform": range(0, T, T // S) + 1) and the final
  alpha_prev = alphas_cumprod[0] (as ``make_ddim_sampling_parameters``).
- :func:`classifier_free_guidance`: Ho & Salimans 2022, out = out_u + s (out_c - out_u) with the batch doubled
  [uncond, cond] (the reference ``CFGDenoiser``); valid for velocity or eps outputs alike.

A velocity / eps function is any callable ``fn(x, timestep)`` / ``fn(x, timestep, **cond)`` (``cond`` a mapping) /
``fn(x, timestep, cond)`` (other ``cond``), x (B, ...), ``timestep`` a float tensor (B,) on x's device and dtype equal
to ``t * timestep_scale`` (flow: SD3 uses 1000, as in :class:`sd3_flow.flow.RectifiedFlowLoss`) or to the integer
DDPM timestep scaled by ``timestep_scale / T`` (eps baseline, as :class:`sd3_flow.flow.EpsilonLinearLoss`).
The samplers never read model attributes, take devices and dtypes from ``x_T``, and run under ``torch.no_grad()``.
A ``callback`` receives a dict {"i", "t", "t_next", "x", "out"} after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor

from sd3_flow.flow import apply_model, shift_time

__all__ = [
    "classifier_free_guidance",
    "ddim_eps_sample",
    "ddim_timesteps",
    "euler_sample",
    "flow_timesteps",
    "heun_sample",
]

Callback = Callable[[dict[str, Any]], None]


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
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


def _grid(num_steps: int, shift: float, sigmas: Sequence[float] | Tensor | None) -> list[float]:
    if sigmas is None:
        return flow_timesteps(num_steps, shift).tolist()
    grid = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if len(grid) < 2 or any(b >= a for a, b in pairwise(grid)):
        raise ValueError(f"sigmas must be strictly decreasing with >= 2 entries, got sigmas={grid}")
    return grid


def _timestep(x: Tensor, t: float, scale: float) -> Tensor:
    return torch.full((x.shape[0],), t * scale, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler_sample(
    velocity: Callable[..., Tensor],
    x_T: Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    cond: Any = None,
    callback: Callback | None = None,
    timestep_scale: float = 1000.0,
    sigmas: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Euler from t = 1 (x_T, noise (B, ...)) to t = 0: x_{t'} = x_t + (t' - t) v(x_t, t). num_steps evaluations.

    ``sigmas`` (descending, ending at the target t) overrides the :func:`flow_timesteps` grid.
    """
    if sigmas is None:
        _check_steps(num_steps)
    grid = _grid(num_steps, shift, sigmas)
    x = x_T
    for i, (t, t_next) in enumerate(pairwise(grid)):
        v = apply_model(velocity, x, _timestep(x, t, timestep_scale), cond)
        x = x + (t_next - t) * v
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "out": v})
    return x


@torch.no_grad()
def heun_sample(
    velocity: Callable[..., Tensor],
    x_T: Tensor,
    num_steps: int,
    *,
    shift: float = 1.0,
    cond: Any = None,
    callback: Callback | None = None,
    timestep_scale: float = 1000.0,
    sigmas: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Heun (2nd order): x_e = x + h v(x, t); x' = x + h (v(x, t) + v(x_e, t')) / 2, h = t' - t; Euler when t' = 0.

    2 num_steps - 1 evaluations on the :func:`flow_timesteps` grid (whose last step ends at 0).
    """
    if sigmas is None:
        _check_steps(num_steps)
    grid = _grid(num_steps, shift, sigmas)
    x = x_T
    for i, (t, t_next) in enumerate(pairwise(grid)):
        h = t_next - t
        v = apply_model(velocity, x, _timestep(x, t, timestep_scale), cond)
        x_euler = x + h * v
        if t_next == 0.0:
            x = x_euler
        else:
            v_next = apply_model(velocity, x_euler, _timestep(x, t_next, timestep_scale), cond)
            v = (v + v_next) / 2
            x = x + h * v
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "out": v})
    return x


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Ascending DDPM timesteps of LDM's "uniform" DDIM selection: range(0, T, T // S) + 1 (S = 5 -> [1, 201, ...]).

    As officially, the count is ceil(T / (T // S)) (more than S when S does not divide T). A step count whose last
    timestep would reach T (e.g. S = 3 for T = 1000, or S > T / 2) raises a ValueError.
    """
    _check_steps(num_steps)
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={num_train_timesteps}")
    steps = [s + 1 for s in range(0, num_train_timesteps, num_train_timesteps // num_steps)]
    if steps[-1] >= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} with T={num_train_timesteps}: the LDM spacing (+1 offset) reaches t={steps[-1]}, "
            "outside the schedule; pick another step count"
        )
    return steps


@torch.no_grad()
def ddim_eps_sample(
    eps_fn: Callable[..., Tensor],
    x_T: Tensor,
    alphas_cumprod: Tensor,
    num_steps: int,
    *,
    cond: Any = None,
    callback: Callback | None = None,
    timestep_scale: float = 1000.0,
) -> Tensor:
    """Deterministic DDIM (eta = 0) for an eps-predictor trained with :class:`sd3_flow.flow.EpsilonLinearLoss`.

    x0^ = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); x_prev = sqrt(a_prev) x0^ + sqrt(1 - a_prev) eps, over
    :func:`ddim_timesteps` descending; the last a_prev is alphas_cumprod[0] (official LDM). ``eps_fn`` receives
    ``timestep = t * timestep_scale / T`` as a float tensor (B,).
    """
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().tolist()
    T = len(ac)
    steps = ddim_timesteps(num_steps, T)[::-1]  # descending
    x = x_T
    for i, t in enumerate(steps):
        a = ac[t]
        a_prev = ac[steps[i + 1]] if i + 1 < len(steps) else ac[0]
        eps = apply_model(eps_fn, x, _timestep(x, float(t), timestep_scale / T), cond)
        x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev) * eps
        if callback is not None:
            callback({"i": i, "t": t, "t_next": steps[i + 1] if i + 1 < len(steps) else 0, "x": x, "out": eps})
    return x


def _expand(u: Any, c: Any, batch: int) -> Tensor:
    """The unconditional value expanded to cond's batch shape (batch, ...)."""
    if not isinstance(c, Tensor) or not isinstance(u, Tensor):
        raise ValueError("classifier-free guidance needs tensor conditions and tensor unconditional values")
    u = u.to(device=c.device, dtype=c.dtype)
    if u.dim() == c.dim() - 1:
        u = u.unsqueeze(0)
    try:
        return u.expand(batch, *c.shape[1:])
    except RuntimeError as err:
        raise ValueError(f"unconditional value of shape {tuple(u.shape)} does not fit {tuple(c.shape)}") from err


def _double(c: Any, u: Any, batch: int) -> Tensor:
    """cat([uncond expanded to the batch, cond]) on dim 0."""
    return torch.cat([_expand(u, c, batch), c])


def _shared(c: Any) -> Any:
    return torch.cat([c, c]) if isinstance(c, Tensor) else c


def classifier_free_guidance(fn: Callable[..., Tensor], scale: float, uncond: Any) -> Callable[..., Tensor]:
    """Wrap ``fn`` so that it returns out_u + scale (out_c - out_u) from one doubled [uncond, cond] batch.

    ``uncond``: a tensor (shape (1, ...), (...) or (B, ...)) for tensor conditions, or a mapping for mapping
    conditions; keys absent from ``uncond`` are shared by both halves. scale = 1 calls ``fn`` with the conditions
    exactly (no doubling); scale = 0 calls it once with the unconditional ones.
    """
    if not (isinstance(scale, int | float) and math.isfinite(scale)):
        raise ValueError(f"guidance scale must be a finite number, got scale={scale!r}")
    if uncond is None:
        raise ValueError("classifier_free_guidance needs an uncond value")

    def merged(c: Any, b: int) -> Any:  # the unconditional conditions for a batch of b
        if isinstance(c, Mapping):
            return {k: (_expand(uncond[k], v, b) if k in uncond else v) for k, v in c.items()}
        return _expand(uncond, c, b)

    def guided(x: Tensor, timestep: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs and args:
            raise ValueError("pass conditions either as one positional value or as keyword arguments")
        if kwargs:
            cond: Any = kwargs
            if not isinstance(uncond, Mapping):
                raise ValueError("mapping conditions need a mapping uncond")
        elif len(args) == 1:
            cond = args[0]
        else:
            raise ValueError("classifier_free_guidance needs a condition (the sampler's cond)")
        b = x.shape[0]
        if scale == 1:
            return apply_model(fn, x, timestep, cond)
        if scale == 0:
            return apply_model(fn, x, timestep, merged(cond, b))
        if isinstance(cond, Mapping):
            cond2 = {k: (_double(v, uncond[k], b) if k in uncond else _shared(v)) for k, v in cond.items()}
        else:
            cond2 = _double(cond, uncond, b)
        out_u, out_c = apply_model(fn, torch.cat([x, x]), torch.cat([timestep, timestep]), cond2).chunk(2)
        return out_u + scale * (out_c - out_u)

    return guided
