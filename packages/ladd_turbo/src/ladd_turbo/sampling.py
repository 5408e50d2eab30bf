"""Few-step, unguided sampling of a LADD student (SD3-Turbo: 4 Euler steps, shift 3, guidance 1).

The student is still a velocity network. Trained at the noise levels ``S = student_sigmas(num_train_steps, shift)``,
it samples with any ``k`` of them, 1 <= k <= len(S): the k levels ``S[round(i * n / k)]`` (always starting at 1),
then 0, with Euler steps between them (sd3_flow's :func:`sd3_flow.sampling.euler_sample`); with k = len(S) these are
exactly diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(k)`` sigmas. Every level the sampler
visits is one the student was trained at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from sd3_flow.sampling import euler_sample

__all__ = ["few_step_sigmas", "student_sample"]


def few_step_sigmas(train_sigmas: Sequence[float], num_steps: int) -> list[float]:
    """The descending grid (num_steps + 1 entries, ending at 0) of a ``num_steps`` sample from the student's
    training noise levels."""
    n = len(train_sigmas)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be an integer in 1..{n} (the student's training steps), got {num_steps!r}")
    picks = sorted({round(i * n / num_steps) for i in range(num_steps)})
    return [float(train_sigmas[i]) for i in picks] + [0.0]


def student_sample(
    velocity: Callable[..., Tensor],
    x_T: Tensor,
    train_sigmas: Sequence[float],
    num_steps: int,
    *,
    cond: Any = None,
    timestep_scale: float = 1000.0,
) -> Tensor:
    """x_T ~ N(0, I) -> x_0 in ``num_steps`` unguided Euler steps over :func:`few_step_sigmas`."""
    return euler_sample(
        velocity, x_T, few_step_sigmas(train_sigmas, num_steps), cond=cond, timestep_scale=timestep_scale
    )
