"""LADD's objective pieces (Sauer et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion
Distillation", Sec. 3).

- Student timesteps: a small discrete set, the sigmas of the shifted few-step schedule the student samples with
  (4 steps: :func:`student_sigmas`), drawn with weights that favour t = 1 (one-step quality).
- Re-noising: generated and synthetic x0 are noised again at t_hat ~ logit-normal(m, s) (m = 1, s = 1: biased to high
  noise, global structure), rescaled to [min_t, max_t] (:func:`renoise_timesteps`).
- Adversarial losses: hinge (the paper, as ADD) or non-saturating softplus (FastGen's default), for both players;
  the discriminator halves come from :mod:`gencore.training`.
- Approximate R1 (APT, as FastGen): mean squared change of the logits on real latents under a 0.1 N(0, 1) nudge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gencore.training import hinge_d_loss, vanilla_d_loss

__all__ = [
    "LOSSES",
    "approximate_r1",
    "discriminator_loss",
    "generator_loss",
    "renoise",
    "renoise_timesteps",
    "sample_student_sigmas",
    "student_sigmas",
]

LOSSES = ("hinge", "non_saturating")


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown adversarial loss {loss!r}; valid: {', '.join(LOSSES)}")


def generator_loss(logits_fake: Tensor, loss: str = "hinge") -> Tensor:
    """Hinge: -mean D(fake); non-saturating: mean softplus(-D(fake))."""
    _check_loss(loss)
    return -logits_fake.mean() if loss == "hinge" else F.softplus(-logits_fake).mean()


def discriminator_loss(logits_real: Tensor, logits_fake: Tensor, loss: str = "hinge") -> Tensor:
    """Hinge: mean relu(1 - D(real)) + mean relu(1 + D(fake)); non-saturating: mean softplus(-D(real)) + mean
    softplus(D(fake)) (twice :func:`gencore.training.hinge_d_loss` / ``vanilla_d_loss``, which average the halves)."""
    _check_loss(loss)
    half = hinge_d_loss if loss == "hinge" else vanilla_d_loss
    return 2.0 * half(logits_real, logits_fake)


def student_sigmas(num_steps: int = 4, shift: float = 3.0) -> list[float]:
    """The noise levels a ``num_steps`` student is trained at and samples from: the non-zero sigmas of
    :func:`sd3_flow.sampling.flow_timesteps` (diffusers' ``FlowMatchEulerDiscreteScheduler(shift=...)``; 4 steps,
    shift 3 = SD3.5-large-turbo's inference recipe: 1.0, 0.85769, 0.60215, 0.0089286)."""
    from sd3_flow.sampling import flow_timesteps

    if not 1 <= int(num_steps) <= 1000:
        raise ValueError(f"student_sigmas: num_steps must be in 1..1000, got {num_steps}")
    return [float(s) for s in flow_timesteps(int(num_steps), shift)[:-1]]


def sample_student_sigmas(
    n: int, sigmas: Sequence[float], weights: Sequence[float] | None = None, *, device=None, generator=None
) -> Tensor:
    """``n`` student noise levels drawn from ``sigmas`` with probabilities proportional to ``weights`` (uniform when
    None), on the device (no host sync)."""
    table = torch.as_tensor(list(sigmas), dtype=torch.float32, device=device)
    w = (
        torch.ones_like(table)
        if weights is None
        else torch.as_tensor(list(weights), dtype=torch.float32, device=device)
    )
    if w.shape != table.shape:
        raise ValueError(f"student timestep weights: {len(w)} weights for {len(table)} timesteps")
    idx = torch.multinomial(w / w.sum(), n, replacement=True, generator=generator)
    return table[idx]


def renoise_timesteps(
    n: int,
    *,
    mean: float = 1.0,
    std: float = 1.0,
    min_t: float = 0.0,
    max_t: float = 1.0,
    device=None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """t_hat = min_t + (max_t - min_t) sigmoid(N(mean, std)) (the paper's logit-normal re-noising, pi(t; m, s))."""
    if std <= 0 or not 0.0 <= min_t < max_t <= 1.0:
        raise ValueError(f"renoise_timesteps: need std > 0 and 0 <= min_t < max_t <= 1, got {std}, {min_t}, {max_t}")
    z = torch.randn(n, device=device, generator=generator) * std + mean
    return min_t + (max_t - min_t) * torch.sigmoid(z)


def renoise(x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
    """The rectified-flow forward process z_t = (1 - t) x0 + t eps (t per sample)."""
    eps = torch.randn_like(x0) if noise is None else noise
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - t) * x0 + t * eps


def approximate_r1(logits_fn: Callable[[Tensor], Tensor], real: Tensor, *, sigma: float = 0.1) -> Tensor:
    """mean (D(real + sigma eps) - D(real))^2: zero for a discriminator that ignores its input, growing with its
    sensitivity near the real data (an R1 penalty without the double backward; Lin et al. 2025, APT)."""
    return (logits_fn(real + sigma * torch.randn_like(real)) - logits_fn(real)).pow(2).mean()
