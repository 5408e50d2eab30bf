"""Training objectives of SD3: rectified flow with biased timestep densities, and the eps/linear LDM baseline.

Paper: Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", ICML 2024
(arXiv 2403.03206). Convention throughout: t in [0, 1], t = 0 is data, t = 1 is noise.

- Sec. 2 / Eq. 3: forward process z_t = (1 - t) x0 + t eps (rectified flow: a_t = 1 - t, b_t = t).
- Sec. 2 / Eq. 1-2: the network predicts the velocity v = dz_t/dt = eps - x0 and is trained with the conditional flow
  matching MSE ||v_theta(z_t, t) - (eps - x0)||^2 (the "rf" objective).
- Sec. 2 / Eq. 12-13: written as a weighted eps-loss L_w = -1/2 E[w_t lambda'_t ||eps_theta - eps||^2] with
  lambda_t = log(a_t^2 / b_t^2), rectified flow carries the implicit weight w_t^RF = t / (1 - t)
  (:func:`implicit_weight`); sampling t from a density pi(t) multiplies it by pi(t).
- Sec. 3.1 "Tailored SNR samplers for RF models" (Eq. 19-21): the timestep densities of :class:`TimestepDensity`:
  - logit-normal ``lognorm(m, s)``: t = sigmoid(N(m, s^2)),
    pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) * 1 / (t (1 - t)) * exp(-(logit(t) - m)^2 / (2 s^2));
  - mode sampling with heavy tails ``mode(s)``: t = f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1),
    monotone (a valid density) only for s in [-1, 2 / (pi - 2)]; s = 0 is uniform;
  - ``cosmap``: t = 1 - 1 / (tan(pi u / 2) + 1), pi(t) = 2 / (pi (1 - 2t + 2t^2));
  - ``uniform``: t ~ U(0, 1) (the "rf" row of the paper's tables).
- Sec. 5.3.2, Eq. 23: the resolution-dependent timestep shift t_m = alpha t_n / (1 + (alpha - 1) t_n),
  alpha = sqrt(m / n) for pixel counts m, n (:func:`shift_time`, :func:`unshift_time`, :func:`resolution_shift`).
  SD3 samples with alpha = 3.0 at 1024^2.
- Sec. 3.1 / Table 1, "eps/linear": the LDM baseline (Rombach et al. 2022) -- DDPM eps-prediction (Ho et al. 2020,
  Eq. 14, L_simple) with the LDM "linear" schedule betas = linspace(sqrt(8.5e-4), sqrt(0.012), 1000)^2 and
  t ~ U{0, ..., T - 1} (:class:`EpsilonLinearLoss`, :func:`ldm_linear_schedule`).

Loss weightings of :class:`RectifiedFlowLoss` follow diffusers' ``compute_loss_weighting_for_sd3``
(``src/diffusers/training_utils.py``): "sigma_sqrt" -> t^-2, "cosmap" -> 2 / (pi (1 - 2t + 2t^2)) (the CosMap density
as an importance weight over uniform t), "none" -> 1. Unlike the diffusers dreambooth script, t is sampled directly
from the density (no lookup into a pre-shifted sigma table) and the target is v = eps - x0 (no x0 "preconditioning").

Calling convention (shared with :mod:`sd3_flow.sampling`): a model is called only through
:func:`gencore.diffusion.call_denoiser`: ``fn(x_t, timestep)`` (``cond=None``), ``fn(x_t, timestep, **cond)`` (``cond``
a mapping, e.g. ``{"context": ..., "pooled": ...}`` of :meth:`sd3_flow.lit.RectifiedFlowModule.velocity`) or
``fn(x_t, timestep, cond)`` (any other ``cond``, e.g. a context tensor). ``timestep`` is a float tensor of shape (B,)
equal to ``t * timestep_scale``; ``timestep_scale = 1000`` is what SD3's MMDiT expects (diffusers passes
``sigma * 1000``; the sd3.5 reference ``ModelSamplingDiscreteFlow.timestep``). The per-timestep loss log is a
:class:`gencore.diffusion.LossBuckets` the caller passes in (``buckets=``); classifier-free-guidance dropout is done by
the conditioner (:class:`sd3_flow.conditioning.SD3TextConditioner`), not here. Nothing on the training path reads a
tensor's values on the host.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gencore.diffusion import LossBuckets, call_denoiser
from gencore.modules import check_index_range

__all__ = [
    "DENSITY_KINDS",
    "MODE_S_MAX",
    "MODE_S_MIN",
    "WEIGHTINGS",
    "EpsilonLinearLoss",
    "RectifiedFlowLoss",
    "TimestepDensity",
    "implicit_weight",
    "ldm_linear_schedule",
    "loss_weight",
    "make_objective",
    "resolution_shift",
    "shift_time",
    "unshift_time",
]

DENSITY_KINDS = ("lognorm", "mode", "cosmap", "uniform")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
MODE_S_MIN = -1.0
MODE_S_MAX = 2.0 / (math.pi - 2.0)  # ~1.7519: f_mode is monotone (a valid density) for s in [MODE_S_MIN, MODE_S_MAX]

Model = Callable[..., Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# Timestep shift (Sec. 5.3.2, Eq. 23)
# ----------------------------------------------------------------------------------------------------------------------


def _check_shift(shift: float) -> None:
    if not (isinstance(shift, int | float) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got shift={shift!r}")


def shift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """t_shifted = shift * t / (1 + (shift - 1) * t) (Eq. 23 with alpha = shift); maps [0, 1] onto [0, 1].

    shift > 1 moves t toward noise (t = 0.5, shift = 3 -> 0.75). Same map as the sd3.5 reference
    ``ModelSamplingDiscreteFlow.sigma`` and diffusers' static shift.
    """
    _check_shift(shift)
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: Tensor | float, shift: float) -> Tensor | float:
    """Inverse of :func:`shift_time`: t = t_shifted / (shift - (shift - 1) * t_shifted) (= shift_time(., 1 / shift))."""
    _check_shift(shift)
    return t / (shift - (shift - 1) * t)


def resolution_shift(m_pixels: float, n_pixels: float) -> float:
    """alpha = sqrt(m / n): the shift that maps timesteps tuned at n pixels to equally uncertain ones at m pixels.

    E.g. 1024^2 vs the 256^2 pretraining base -> 4.0 (the paper's human-preference sweep picked 3.0 at 1024^2).
    """
    for name, val in (("m_pixels", m_pixels), ("n_pixels", n_pixels)):
        if not (isinstance(val, int | float) and math.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {name}={val!r}")
    return math.sqrt(m_pixels / n_pixels)


def implicit_weight(t: Tensor) -> Tensor:
    """w_t^RF = t / (1 - t): rectified flow's velocity MSE as a weighted eps-loss (Sec. 2, Eq. 12-13).

    With lambda_t = 2 log((1 - t) / t), lambda'_t = -2 / (t (1 - t)), so -1/2 w_t lambda'_t = 1 / (1 - t)^2 and
    ||v_pred - v||^2 = ||eps_pred - eps||^2 / (1 - t)^2 for the eps prediction implied by v_pred at the same z_t.
    A timestep density pi(t) multiplies the effective weight by pi(t).
    """
    return t / (1 - t)


# ----------------------------------------------------------------------------------------------------------------------
# Timestep densities (Sec. 3.1, Eq. 19-21)
# ----------------------------------------------------------------------------------------------------------------------

_SPEC_RE = re.compile(r"^\s*(?:rf\s*/\s*)?([a-z_]+)\s*(?:\(([^)]*)\))?\s*$")


def _f_mode(u: Tensor, s: float) -> Tensor:
    """t = 1 - u - s (cos^2(pi u / 2) - 1 + u) (Eq. 20); decreasing from f(0) = 1 to f(1) = 0 for valid s."""
    return 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


@dataclass(frozen=True)
class TimestepDensity:
    """A density over t in [0, 1] (t = 1 noise) that samples, and evaluates its pdf / cdf in closed form.

    ``kind``: "lognorm" (``m`` location, ``s`` > 0 scale of the normal before the sigmoid), "mode" (``s`` in
    [-1, 2 / (pi - 2)], ``m`` unused), "cosmap" or "uniform" (no parameters). Build from a config string with
    :meth:`parse` ("rf/lognorm(0.00,1.00)", "mode(1.29)", "cosmap", "uniform") or the classmethods.
    An optional ``shift`` in :meth:`sample` / :meth:`pdf` / :meth:`cdf` describes the density of shift_time(t, shift).
    """

    kind: str = "lognorm"
    m: float = 0.0
    s: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in DENSITY_KINDS:
            raise ValueError(f"unknown timestep density kind={self.kind!r}; expected one of {DENSITY_KINDS}")
        if not (math.isfinite(self.m) and math.isfinite(self.s)):
            raise ValueError(f"density parameters must be finite, got m={self.m!r}, s={self.s!r}")
        if self.kind == "lognorm" and self.s <= 0:
            raise ValueError(f"lognorm needs a scale s > 0, got s={self.s!r}")
        if self.kind == "mode" and not (MODE_S_MIN <= self.s <= MODE_S_MAX):
            raise ValueError(
                f"mode density needs s in [{MODE_S_MIN}, 2/(pi-2) = {MODE_S_MAX:.4f}] to be monotone, got s={self.s!r}"
            )

    # -- constructors ------------------------------------------------------------------------------------------------
    @classmethod
    def lognorm(cls, m: float = 0.0, s: float = 1.0) -> TimestepDensity:
        return cls("lognorm", m=float(m), s=float(s))

    @classmethod
    def mode(cls, s: float = 1.29) -> TimestepDensity:
        return cls("mode", s=float(s))

    @classmethod
    def cosmap(cls) -> TimestepDensity:
        return cls("cosmap", s=0.0)

    @classmethod
    def uniform(cls) -> TimestepDensity:
        return cls("uniform", s=0.0)

    @classmethod
    def parse(cls, spec: str | TimestepDensity) -> TimestepDensity:
        """ "rf/lognorm(0.00,1.00)" | "lognorm(0.5, 0.6)" | "mode(1.29)" | "cosmap" | "uniform" (the "rf/" prefix and
        the diffusers names "logit_normal" / "none" are accepted)."""
        if isinstance(spec, TimestepDensity):
            return spec
        match = _SPEC_RE.match(spec) if isinstance(spec, str) else None
        if match is None:
            raise ValueError(f"cannot parse timestep density spec={spec!r}; expected e.g. 'rf/lognorm(0.00,1.00)'")
        kind, args = match.group(1), match.group(2)
        kind = {"logit_normal": "lognorm", "none": "uniform"}.get(kind, kind)
        try:
            vals = [float(a) for a in args.split(",")] if args and args.strip() else []
        except ValueError as err:
            raise ValueError(f"non-numeric argument in timestep density spec={spec!r}") from err
        n_args = {"lognorm": (0, 2), "mode": (0, 1), "cosmap": (0,), "uniform": (0,)}.get(kind)
        if n_args is None:
            raise ValueError(f"unknown timestep density kind={kind!r} in spec={spec!r}; expected {DENSITY_KINDS}")
        if len(vals) not in n_args:
            raise ValueError(f"timestep density {kind!r} takes {n_args} arguments, got {len(vals)} in spec={spec!r}")
        if kind == "lognorm":
            return cls.lognorm(*vals)
        if kind == "mode":
            return cls.mode(*vals)
        return cls.cosmap() if kind == "cosmap" else cls.uniform()

    def __str__(self) -> str:
        if self.kind == "lognorm":
            return f"lognorm({self.m:.2f},{self.s:.2f})"
        if self.kind == "mode":
            return f"mode({self.s:.2f})"
        return self.kind

    # -- sampling ----------------------------------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        shift: float = 1.0,
    ) -> Tensor:
        """n float32 timesteps in [0, 1] (n,), then shift_time(t, shift). One draw of size n from ``generator``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got n={n}")
        if self.kind == "lognorm":
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
            t = torch.sigmoid(z * self.s + self.m)
        else:
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
            if self.kind == "mode":
                t = _f_mode(u, self.s)
            elif self.kind == "cosmap":
                t = 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
            else:
                t = u
        t = t.clamp(0.0, 1.0)
        return t if shift == 1.0 else shift_time(t, shift)

    # -- closed forms ------------------------------------------------------------------------------------------------
    def _mode_u(self, t: Tensor) -> Tensor:
        """u = f_mode^-1(t) by bisection in float64 (f_mode is decreasing in u)."""
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = _f_mode(mid, self.s) > t  # f decreasing: the root is to the right of mid
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2

    def _pdf(self, t: Tensor) -> Tensor:
        if self.kind == "lognorm":
            inner = t.clamp(1e-300, 1 - 1e-16)
            logit = torch.log(inner) - torch.log1p(-inner)
            dens = torch.exp(-((logit - self.m) ** 2) / (2 * self.s**2)) / (
                self.s * math.sqrt(2 * math.pi) * inner * (1 - inner)
            )
            return torch.where((t > 0) & (t < 1), dens, torch.zeros_like(t))
        if self.kind == "mode":
            u = self._mode_u(t)
            return 1 / (1 + self.s - self.s * math.pi / 2 * torch.sin(math.pi * u))  # 1 / |f'(u)|
        if self.kind == "cosmap":
            return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
        return torch.ones_like(t)

    def _cdf(self, t: Tensor) -> Tensor:
        if self.kind == "lognorm":
            inner = t.clamp(1e-300, 1 - 1e-16)
            logit = torch.log(inner) - torch.log1p(-inner)
            cdf = 0.5 * (1 + torch.erf((logit - self.m) / (self.s * math.sqrt(2))))
            return torch.where(t <= 0, torch.zeros_like(t), torch.where(t >= 1, torch.ones_like(t), cdf))
        if self.kind == "mode":
            return 1 - self._mode_u(t)  # P(f(u) <= t) = P(u >= f^-1(t))
        if self.kind == "cosmap":
            return 2 / math.pi * torch.atan2(t, 1 - t)
        return t

    def pdf(self, t: Tensor, *, shift: float = 1.0) -> Tensor:
        """Density of t (float64, same shape), 0 outside [0, 1]; with ``shift`` the density of shift_time(t0, shift)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        inside = (t >= 0) & (t <= 1)
        tc = t.clamp(0.0, 1.0)
        if shift == 1.0:
            dens = self._pdf(tc)
        else:  # change of variables through t0 = unshift(t): dt0/dt = shift / (shift - (shift - 1) t)^2
            dens = self._pdf(unshift_time(tc, shift)) * shift / (shift - (shift - 1) * tc) ** 2
        return torch.where(inside, dens, torch.zeros_like(dens))

    def cdf(self, t: Tensor, *, shift: float = 1.0) -> Tensor:
        """P(T <= t) (float64); with ``shift`` for the shifted variable (shift_time is increasing)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
        return self._cdf(t if shift == 1.0 else unshift_time(t, shift))


# ----------------------------------------------------------------------------------------------------------------------
# Loss weights
# ----------------------------------------------------------------------------------------------------------------------


def loss_weight(t: Tensor, weighting: str) -> Tensor:
    """Explicit per-sample loss weight at t (= sigma), as diffusers' ``compute_loss_weighting_for_sd3``.

    "none" -> 1; "sigma_sqrt" -> t^-2 (unbounded as t -> 0, as in diffusers); "cosmap" -> 2 / (pi (1 - 2t + 2t^2)).
    """
    if weighting == "none":
        return torch.ones_like(t)
    if weighting == "sigma_sqrt":
        return t**-2.0
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
    raise ValueError(f"unknown loss weighting={weighting!r}; expected one of {WEIGHTINGS}")


def _mask_like(v: Tensor, ref: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against ``ref`` (B, ...)."""
    return v.view(-1, *((1,) * (ref.dim() - 1)))


def _mse_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"model output shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)


def _noise_like(x0: Tensor, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    if noise is None:
        return torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    return noise


def _check_timestep_scale(timestep_scale: float) -> float:
    if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, int | float) or not timestep_scale > 0:
        raise ValueError(f"timestep_scale must be a number > 0, got timestep_scale={timestep_scale!r}")
    return float(timestep_scale)


# ----------------------------------------------------------------------------------------------------------------------
# Objectives
# ----------------------------------------------------------------------------------------------------------------------


class RectifiedFlowLoss:
    """The "rf/<density>" objective (Sec. 2-3.1): E_t E_{x0, eps} [w(t) ||v_theta(z_t, t) - (eps - x0)||^2].

    Args:
        density: a :class:`TimestepDensity` or its spec string (SD3: "rf/lognorm(0.00,1.00)").
        shift: t = shift_time(t0, shift) after sampling t0 ~ density (Eq. 23; for high-resolution fine-tuning).
        weighting: "none" | "sigma_sqrt" | "cosmap", an explicit per-sample weight of the loss (:func:`loss_weight`).
        timestep_scale: the model receives ``timestep = t * timestep_scale`` (SD3's MMDiT: 1000).

    ``__call__(model_fn, x0, cond=None, *, noise=None, t=None, generator=None, buckets=None) -> (loss, log)``: the
    model is called through :func:`gencore.diffusion.call_denoiser`; random draws (when not given) in the order t
    (n = B), noise (x0's shape), from ``generator`` on x0's device. ``t`` overrides the sampled (already shifted)
    timesteps, shape (B,). ``loss`` is the weighted mean; ``log`` holds detached scalars "loss", "loss_unweighted"
    and "t_mean". ``buckets`` (a :class:`gencore.diffusion.LossBuckets`) receives the unweighted per-sample losses at
    their t (on the device, no host sync). Conditioning dropout is the conditioner's business, not the objective's.
    """

    #: samplers that integrate what this objective trains (the first is the default)
    samplers: tuple[str, ...] = ("euler", "heun")

    def __init__(
        self,
        density: TimestepDensity | str = "lognorm(0.00,1.00)",
        *,
        shift: float = 1.0,
        weighting: str = "none",
        timestep_scale: float = 1000.0,
    ) -> None:
        _check_shift(shift)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting={weighting!r}; expected one of {WEIGHTINGS}")
        self.density = TimestepDensity.parse(density)
        self.shift = float(shift)
        self.weighting = weighting
        self.timestep_scale = _check_timestep_scale(timestep_scale)

    def __repr__(self) -> str:
        return (
            f"RectifiedFlowLoss(rf/{self.density}, shift={self.shift}, weighting={self.weighting!r}, "
            f"timestep_scale={self.timestep_scale})"
        )

    def sample_t(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """(n,) float32 timesteps: density sample, then the shift."""
        return self.density.sample(n, generator=generator, device=device, shift=self.shift)

    def __call__(
        self,
        model_fn: Model,
        x0: Tensor,
        cond: Any = None,
        *,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        buckets: LossBuckets | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b = x0.shape[0]  # x0: (B, ...)
        if t is None:
            t = self.sample_t(b, generator=generator, device=x0.device)
        t = torch.as_tensor(t, device=x0.device).float().reshape(-1)  # (B,)
        if t.shape[0] != b:
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {b}")
        noise = _noise_like(x0, noise, generator)
        tb = _mask_like(t, x0).to(x0.dtype)
        z_t = (1 - tb) * x0 + tb * noise  # Eq. 3: (B, ...)
        target = noise - x0  # v = dz_t / dt
        pred = call_denoiser(model_fn, z_t, t * self.timestep_scale, cond)
        per_sample = _mse_per_sample(pred, target)  # (B,) mean over non-batch dims
        weight = loss_weight(t, self.weighting)  # (B,)
        loss = (weight * per_sample).mean()
        if buckets is not None:
            buckets.update(per_sample, t)
        log = {"loss": loss.detach(), "loss_unweighted": per_sample.detach().mean(), "t_mean": t.mean()}
        return loss, log


def ldm_linear_schedule(
    num_train_timesteps: int = 1000, beta_start: float = 8.5e-4, beta_end: float = 0.012
) -> tuple[Tensor, Tensor]:
    """(betas, alphas_cumprod), float64 (T,): the LDM / SD "linear" schedule linspace(sqrt(b0), sqrt(b1), T)^2.

    (= diffusers ``beta_schedule="scaled_linear"``); T = 1000 gives alphas_cumprod[-1] = 0.004660.
    """
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return betas, torch.cumprod(1 - betas, dim=0)


class EpsilonLinearLoss:
    """The "eps/linear" baseline (Table 1): DDPM eps-prediction with the LDM linear schedule, L_simple.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0, ..., T - 1}, loss = ||eps_theta(x_t, t) - eps||^2 (mean
    over non-batch dims, then batch). The model gets ``timestep = t * timestep_scale / T`` (the integer timestep,
    in [0, 1000) for the defaults), as a float tensor (B,). ``betas`` / ``alphas_cumprod`` (float64, CPU) feed
    :func:`sd3_flow.sampling.ddim_eps_sample`. Same calling convention and log as :class:`RectifiedFlowLoss`
    (``t`` overrides are integer timesteps, checked with :func:`gencore.modules.check_index_range`: a ValueError on
    the CPU, an asynchronous device assertion on an accelerator; the buckets get t / T).
    """

    samplers: tuple[str, ...] = ("ddim",)

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 8.5e-4,
        beta_end: float = 0.012,
        timestep_scale: float = 1000.0,
    ) -> None:
        self.timestep_scale = _check_timestep_scale(timestep_scale)
        self.betas, self.alphas_cumprod = ldm_linear_schedule(num_train_timesteps, beta_start, beta_end)
        self.num_train_timesteps = int(num_train_timesteps)
        self._device_tables: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        return f"EpsilonLinearLoss(eps/linear, T={self.num_train_timesteps}, timestep_scale={self.timestep_scale})"

    def _alphas_cumprod_on(self, device: torch.device) -> Tensor:
        """alphas_cumprod on ``device``, copied there once (a copy every step would wait for the device)."""
        table = self._device_tables.get(device)
        if table is None:
            table = self._device_tables[device] = self.alphas_cumprod.to(device)
        return table

    def __call__(
        self,
        model_fn: Model,
        x0: Tensor,
        cond: Any = None,
        *,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        buckets: LossBuckets | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b = x0.shape[0]  # x0: (B, ...)
        if t is None:
            t = torch.randint(0, self.num_train_timesteps, (b,), generator=generator, device=x0.device)
        t = torch.as_tensor(t, device=x0.device).reshape(-1)
        if t.is_floating_point() or t.shape[0] != b:
            raise ValueError(f"t must be an integer tensor with {b} entries, got dtype={t.dtype}, shape={t.shape}")
        check_index_range(t, self.num_train_timesteps, "EpsilonLinearLoss: t")
        noise = _noise_like(x0, noise, generator)
        a = _mask_like(self._alphas_cumprod_on(x0.device)[t], x0)  # (B, 1, ...) float64
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)
        timestep = t.float() * (self.timestep_scale / self.num_train_timesteps)
        pred = call_denoiser(model_fn, x_t, timestep, cond)
        per_sample = _mse_per_sample(pred, noise)
        loss = per_sample.mean()
        t_unit = t.float() / self.num_train_timesteps
        if buckets is not None:
            buckets.update(per_sample, t_unit)
        log = {"loss": loss.detach(), "loss_unweighted": loss.detach(), "t_mean": t_unit.mean()}
        return loss, log


def make_objective(spec: str, **kwargs: Any) -> RectifiedFlowLoss | EpsilonLinearLoss:
    """An objective from the paper's naming: "rf/lognorm(0.00,1.00)", "rf/mode(1.29)", "rf/cosmap", "rf" (uniform t)
    or "eps/linear"; ``kwargs`` go to the constructor."""
    if not isinstance(spec, str):
        raise ValueError(f"objective spec must be a string, got spec={spec!r}")
    s = spec.strip()
    if s.replace(" ", "") == "eps/linear":
        return EpsilonLinearLoss(**kwargs)
    if s == "rf":
        return RectifiedFlowLoss(TimestepDensity.uniform(), **kwargs)
    if s.startswith("rf/"):
        return RectifiedFlowLoss(TimestepDensity.parse(s), **kwargs)
    raise ValueError(f"unknown objective spec={spec!r}; expected 'rf/<density>', 'rf' or 'eps/linear'")
