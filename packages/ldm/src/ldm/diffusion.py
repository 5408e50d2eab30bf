"""The LDM diffusion process: beta schedules and the closed-form forward process.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (Eq. 1-2, the
DDPM of Ho et al. 2020 run on autoencoder latents). Official code: ``CompVis/latent-diffusion`` at a506df57,
``ldm/modules/diffusionmodules/util.py`` (``make_beta_schedule``) and ``ldm/models/diffusion/ddpm.py``
(``DDPM.register_schedule``, ``q_sample``, ``predict_start_from_noise``, ``q_posterior``).

- :func:`make_beta_schedule`: the official schedules, built in float64.
- :class:`DiffusionSchedule`: the ``register_schedule`` buffers (same names, float32, computed in float64) and
  - ``q_sample``: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM Eq. 4),
  - ``predict_x0_from_eps`` / ``predict_eps_from_x0``: the inverse of Eq. 4 for x0 or eps,
  - ``get_v`` / ``predict_x0_from_v`` / ``predict_eps_from_v``: v = sqrt(abar) eps - sqrt(1 - abar) x0
    (Salimans & Ho 2022, v-parameterisation; the SD 2 code's ``get_v`` / ``predict_start_from_z_and_v``),
  - ``q_posterior``: q(x_{t-1} | x_t, x0), DDPM Eq. 6-7 (``posterior_mean_coef1/2``, ``posterior_variance``),
  - ``lvlb_weights``: the per-timestep VLB weights of ``register_schedule``.

The training objective (``p_losses``) is :class:`ldm.losses.DiffusionLoss`; the samplers are in :mod:`ldm.sampling`.
Models are called the one gencore way (:func:`gencore.diffusion.call_denoiser`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from gencore.diffusion import PARAMETERIZATIONS

__all__ = ["PARAMETERIZATIONS", "DiffusionSchedule", "make_beta_schedule"]

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(
    kind: str,
    n_timestep: int = 1000,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> Tensor:
    """Betas (n_timestep,) in float64, as ``util.make_beta_schedule``.

    - ``"linear"``: ``linspace(sqrt(start), sqrt(end), T) ** 2`` (= diffusers ``scaled_linear``; SD: 8.5e-4 -> 0.012).
    - ``"cosine"``: Nichol & Dhariwal 2021 Eq. 17 with offset ``cosine_s``, betas clipped to [0, 0.999].
    - ``"sqrt_linear"``: ``linspace(start, end, T)`` (linear in beta, despite the official name).
    - ``"sqrt"``: ``linspace(start, end, T) ** 0.5``.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule kind={kind!r}; expected one of {BETA_SCHEDULES}")
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be >= 1, got n_timestep={n_timestep}")
    f64 = torch.float64
    if kind == "linear":
        return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=f64) ** 2
    if kind == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=f64) / n_timestep + cosine_s
        alphas_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas_bar = alphas_bar / alphas_bar[0]
        return (1 - alphas_bar[1:] / alphas_bar[:-1]).clamp(min=0.0, max=0.999)
    if kind == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=f64)
    return torch.linspace(linear_start, linear_end, n_timestep, dtype=f64) ** 0.5


def _check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization={parameterization!r}; expected one of {PARAMETERIZATIONS}")


def _extract(buf: Tensor, t: Tensor | int, x: Tensor) -> Tensor:
    """``buf[t]`` shaped to broadcast against ``x``: t (B,) -> (B, 1, ..., 1); an int or 0-dim t -> a scalar."""
    buf = buf.to(device=x.device)
    if isinstance(t, int):
        return buf[t]
    t = t.to(device=x.device, dtype=torch.long)
    if t.dim() == 0:
        return buf[t]
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be an int, a 0-dim tensor or shape ({x.shape[0]},), got t.shape={tuple(t.shape)}")
    return buf[t].reshape(t.shape[0], *((1,) * (x.dim() - 1)))


class DiffusionSchedule(nn.Module):
    """Fixed DDPM variance schedule with the official ``register_schedule`` buffers (float64 maths, float32 storage).

    Buffers (all (T,), persistent, official names so an official checkpoint's root buffers can be compared):
    ``betas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    log_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance,
    posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2``.
    ``v_posterior`` mixes the posterior variance: (1 - v) beta_tilde + v beta (official, default 0).
    """

    BUFFERS = (
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
    )

    def __init__(
        self,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        *,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Tensor | np.ndarray | Sequence[float] | None = None,
        v_posterior: float = 0.0,
    ) -> None:
        super().__init__()
        if given_betas is not None:
            betas = torch.as_tensor(np.asarray(given_betas, dtype=np.float64))
            if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError(f"given_betas must be 1-D with values in (0, 1), got shape {tuple(betas.shape)}")
        else:
            betas = make_beta_schedule(
                beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
            )
        self.num_timesteps = int(betas.shape[0])
        self.v_posterior = float(v_posterior)
        # all in float64, as the official numpy code
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
        values = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
            "posterior_variance": post_var,
            # log clipped because the posterior variance is 0 at t = 0
            "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        }
        for name in self.BUFFERS:
            self.register_buffer(name, values[name].to(torch.float32))

    def extra_repr(self) -> str:
        return f"num_timesteps={self.num_timesteps}, v_posterior={self.v_posterior}"

    # --- forward process (DDPM Eq. 4) -----------------------------------------------------------------------------
    def q_sample(
        self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; x0 (B, ...), t (B,) long; noise ~ N(0, I) if None."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        sa, s1 = _extract(self.sqrt_alphas_cumprod, t, x0), _extract(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return sa * x0 + s1 * noise

    def q_mean_variance(self, x0: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x0) * x0
        return mean, _extract(1.0 - self.alphas_cumprod, t, x0), _extract(self.log_one_minus_alphas_cumprod, t, x0)

    # --- conversions between eps, x0 and v ------------------------------------------------------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps (official ``predict_start_from_noise``)."""
        recip = _extract(self.sqrt_recip_alphas_cumprod, t, x_t)
        return recip * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """eps = (x_t / sqrt(abar) - x0) / sqrt(1/abar - 1) (official ``_predict_eps_from_xstart``)."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def get_v(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """v = sqrt(abar) noise - sqrt(1 - abar) x0."""
        sa, s1 = _extract(self.sqrt_alphas_cumprod, t, x0), _extract(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return sa * noise - s1 * x0

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
        sa, s1 = _extract(self.sqrt_alphas_cumprod, t, x_t), _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return sa * x_t - s1 * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
        sa, s1 = _extract(self.sqrt_alphas_cumprod, t, x_t), _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return sa * v + s1 * x_t

    def model_output_to_x0_eps(
        self, x_t: Tensor, t: Tensor | int, output: Tensor, parameterization: str = "eps"
    ) -> tuple[Tensor, Tensor]:
        """(x0, eps) implied by a model ``output`` under ``parameterization`` ("eps" | "x0" | "v")."""
        _check_parameterization(parameterization)
        if parameterization == "eps":
            return self.predict_x0_from_eps(x_t, t, output), output
        if parameterization == "x0":
            return output, self.predict_eps_from_x0(x_t, t, output)
        return self.predict_x0_from_v(x_t, t, output), self.predict_eps_from_v(x_t, t, output)

    # --- posterior (DDPM Eq. 6-7) ---------------------------------------------------------------------------------
    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t), _extract(self.posterior_log_variance_clipped, t, x_t)

    def lvlb_weights(self, parameterization: str = "eps") -> Tensor:
        """Per-timestep VLB weights (T,) of ``register_schedule`` (non-persistent there); weight[0] := weight[1].

        eps: beta^2 / (2 sigma_post^2 alpha (1 - abar)); x0: the official expression ``0.5 sqrt(abar) / (2 - abar)``
        (kept as written in ddpm.py); v: ones (SD 2 code).
        """
        _check_parameterization(parameterization)
        ac = self.alphas_cumprod.double()
        if parameterization == "eps":
            betas = self.betas.double()
            w = betas**2 / (2 * self.posterior_variance.double() * (1 - betas) * (1 - ac))
        elif parameterization == "x0":
            w = 0.5 * ac.sqrt() / (2.0 * 1 - ac)
        else:
            w = torch.ones_like(ac)
        if w.shape[0] > 1:
            w[0] = w[1]
        return w.to(torch.float32)
