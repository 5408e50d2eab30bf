"""The LDM diffusion process: beta schedules, the closed-form forward process and the training objective.

Paper: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022 (Eq. 1-2, the
DDPM objective of Ho et al. 2020 run on autoencoder latents). Official code: ``CompVis/latent-diffusion`` at a506df57,
``ldm/modules/diffusionmodules/util.py`` (``make_beta_schedule``) and ``ldm/models/diffusion/ddpm.py``
(``DDPM.register_schedule``, ``q_sample``, ``predict_start_from_noise``, ``q_posterior``, ``LatentDiffusion.p_losses``).

- :func:`make_beta_schedule`: the official schedules, built in float64.
- :class:`DiffusionSchedule`: the ``register_schedule`` buffers (same names, float32, computed in float64) and
  - ``q_sample``: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM Eq. 4),
  - ``predict_x0_from_eps`` / ``predict_eps_from_x0``: the inverse of Eq. 4 for x0 or eps,
  - ``get_v`` / ``predict_x0_from_v`` / ``predict_eps_from_v``: v = sqrt(abar) eps - sqrt(1 - abar) x0
    (Salimans & Ho 2022, v-parameterisation; the SD 2 code's ``get_v`` / ``predict_start_from_z_and_v``),
  - ``q_posterior``: q(x_{t-1} | x_t, x0), DDPM Eq. 6-7 (``posterior_mean_coef1/2``, ``posterior_variance``).
- :class:`DiffusionLoss`: ``p_losses`` -- t ~ U{0..T-1}, L_simple = ||target - f(x_t, t, c)||^2 averaged over C, H, W,
  then over the batch (LDM Eq. 2 / DDPM Eq. 14); the optional VLB term ``original_elbo_weight * mean(lvlb_w[t] L_t)``;
  classifier-free conditioning dropout (``p_uncond``; not in the official code, see CompVis/latent-diffusion#139;
  SD v1 dropped 10% of the captions).

Calling convention shared with :mod:`ldm.sampling`: a model/denoiser is any callable ``fn(x_t, t)`` (``cond=None``),
``fn(x_t, t, **cond)`` (``cond`` a mapping, e.g. ``{"c_crossattn": ..., "c_concat": ..., "y": ...}``) or
``fn(x_t, t, cond)`` (any other ``cond``, e.g. a context tensor); ``t`` is a long tensor of shape (B,).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "PARAMETERIZATIONS",
    "DiffusionLoss",
    "DiffusionSchedule",
    "apply_denoiser",
    "drop_condition",
    "make_beta_schedule",
]

BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")
PARAMETERIZATIONS = ("eps", "x0", "v")


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


def apply_denoiser(fn: Callable[..., Tensor], x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    """``fn(x, t)`` if cond is None, ``fn(x, t, **cond)`` for a mapping, else ``fn(x, t, cond)``."""
    if cond is None:
        return fn(x, t)
    if isinstance(cond, Mapping):
        return fn(x, t, **cond)
    return fn(x, t, cond)


def _replace_rows(c: Any, u: Any, drop: Tensor, path: str) -> Any:
    """Rows of ``c`` (batch first) where ``drop`` is True replaced by ``u`` (broadcast: (B, ...), (1, ...) or (...))."""
    if isinstance(c, (list, tuple)):
        if not isinstance(u, (list, tuple)) or len(u) != len(c):
            raise ValueError(f"uncond{path} must be a list of {len(c)} items like the condition, got {type(u)}")
        return type(c)(_replace_rows(ci, ui, drop, f"{path}[{i}]") for i, (ci, ui) in enumerate(zip(c, u)))
    if not isinstance(c, Tensor):
        raise ValueError(f"condition{path} must be a tensor (or list of tensors) to drop, got {type(c).__name__}")
    u = torch.as_tensor(u, device=c.device).to(dtype=c.dtype)
    if u.dim() == c.dim() - 1:
        u = u.unsqueeze(0)
    if u.dim() != c.dim() or any(du not in (1, dc) for du, dc in zip(u.shape, c.shape)):
        raise ValueError(f"uncond{path} of shape {tuple(u.shape)} does not broadcast to the condition {tuple(c.shape)}")
    return torch.where(drop.reshape(-1, *((1,) * (c.dim() - 1))), u, c)


def drop_condition(
    cond: Any,
    uncond: Any,
    p_uncond: float | Mapping[str, float],
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Any:
    """Classifier-free-guidance conditioning dropout: each sample's condition -> ``uncond`` with prob. ``p_uncond``.

    ``cond`` is a tensor (B, ...) (or a list of them) and ``uncond`` broadcasts to it ((B, ...), (1, ...) or (...),
    e.g. the "" caption embedding or the null class index). For a dict condition, ``uncond`` is a dict whose keys are
    the ones to drop (others, e.g. ``c_concat`` of an inpainting model, stay); with a float ``p_uncond`` all those keys
    of a sample are dropped together, with a dict ``{key: p}`` each key is dropped independently.
    """
    probs = p_uncond if isinstance(p_uncond, Mapping) else None
    for name, p in (probs or {"p_uncond": p_uncond}).items():
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {name}={p}")
    if uncond is None:
        raise ValueError("p_uncond > 0 needs an uncond value to replace the dropped condition with, got uncond=None")

    def draw(p: float) -> Tensor:
        return torch.rand(batch_size, generator=generator, device=device or "cpu") < p

    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping):
            raise ValueError(f"a dict condition needs a dict uncond (keys to drop), got {type(uncond).__name__}")
        missing = [k for k in uncond if k not in cond]
        if missing:
            raise ValueError(f"uncond keys {missing} are not in the condition (keys {list(cond)})")
        if probs is not None and set(probs) - set(uncond):
            raise ValueError(f"p_uncond keys {sorted(set(probs) - set(uncond))} have no uncond value")
        shared = None if probs is not None else draw(float(p_uncond))
        out = dict(cond)
        for k, u in uncond.items():
            if probs is not None and k not in probs:
                continue
            drop = shared if shared is not None else draw(float(probs[k]))
            out[k] = _replace_rows(cond[k], u, drop.to(_device_of(cond[k])), f"[{k!r}]")
        return out
    if probs is not None:
        raise ValueError("a per-key p_uncond mapping needs a dict condition")
    if isinstance(uncond, Mapping):
        raise ValueError(f"a dict uncond needs a dict condition, got a {type(cond).__name__} condition")
    drop = draw(float(p_uncond))
    return _replace_rows(cond, uncond, drop.to(_device_of(cond)), "")


def _device_of(c: Any) -> torch.device:
    while isinstance(c, (list, tuple)):
        c = c[0]
    return c.device if isinstance(c, Tensor) else torch.device("cpu")


class DiffusionLoss:
    """The LDM training objective (``LatentDiffusion.p_losses``); owns timestep sampling and weighting.

    ``loss, log = DiffusionLoss(schedule)(model_fn, x0, cond, uncond=..., noise=..., t=...)``:
    t ~ U{0..T-1} per sample, x_t = q_sample(x0, t, noise), target = noise | x0 | v for parameterization
    "eps" | "x0" | "v", ``loss_simple`` = ((out - target)^2).mean over all but the batch dim (|.| for ``loss_type``
    "l1"), ``loss = l_simple_weight * mean_b(loss_simple) + original_elbo_weight * mean_b(lvlb_w[t] loss_simple)``.
    The official learnable per-timestep ``logvar`` is not implemented (``learn_logvar=False``, logvar = 0, in every
    official config, where the division by exp(0) and the + 0 are no-ops); ``original_elbo_weight`` is 0 in all
    official configs. ``p_uncond`` > 0 replaces the condition by ``uncond`` per sample (see :func:`drop_condition`).

    The log dict holds detached scalars: ``loss``, ``loss_simple``, ``loss_vlb`` and, when ``n_buckets`` > 0, the mean
    ``loss_simple`` of the samples in each present timestep bucket as ``loss_simple_t/{lo:03d}-{hi:03d}``.
    The schedule is referenced, not owned: move it with the module that registers it.
    """

    def __init__(
        self,
        schedule: DiffusionSchedule,
        *,
        parameterization: str = "eps",
        loss_type: str = "l2",
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
        p_uncond: float | Mapping[str, float] = 0.0,
        n_buckets: int = 10,
    ) -> None:
        _check_parameterization(parameterization)
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"unknown loss_type={loss_type!r}; expected 'l1' or 'l2'")
        if n_buckets < 0:
            raise ValueError(f"n_buckets must be >= 0, got n_buckets={n_buckets}")
        for name, p in p_uncond.items() if isinstance(p_uncond, Mapping) else [("p_uncond", p_uncond)]:
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"p_uncond must be in [0, 1], got {name}={p}")
        self.schedule = schedule
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.l_simple_weight = float(l_simple_weight)
        self.original_elbo_weight = float(original_elbo_weight)
        self.p_uncond = p_uncond
        self.n_buckets = int(n_buckets)
        self._lvlb = schedule.lvlb_weights(parameterization)  # (T,), moved to the data's device on first use

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def sample_t(self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U{0, ..., T-1}, shape (batch_size,), long."""
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)

    def _drop_active(self) -> bool:
        p = self.p_uncond
        return any(float(v) > 0 for v in p.values()) if isinstance(p, Mapping) else float(p) > 0

    def __call__(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        cond: Any = None,
        *,
        uncond: Any = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
        drop: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``drop=False`` skips the conditioning dropout (the conditional loss, e.g. for validation)."""
        b = x0.shape[0]  # x0: (B, C, H, W) latents (any (B, ...) works)
        if t is None:
            t = self.sample_t(b, x0.device, generator)
        else:
            t = torch.as_tensor(t, device=x0.device).long()
            t = t.expand(b) if t.dim() == 0 else t
            if t.shape != (b,):
                raise ValueError(f"t must have shape ({b},), got t.shape={tuple(t.shape)}")
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.num_timesteps:
                raise ValueError(f"t must lie in [0, {self.num_timesteps - 1}], got t in [{lo}, {hi}]")
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        if drop and self._drop_active():
            if cond is None:
                raise ValueError("p_uncond > 0 needs a condition to drop, got cond=None")
            cond = drop_condition(cond, uncond, self.p_uncond, b, generator=generator, device=x0.device)

        x_t = self.schedule.q_sample(x0, t, noise)  # (B, C, H, W)
        out = apply_denoiser(model_fn, x_t, t, cond)
        if out.shape != x0.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} != x0 shape {tuple(x0.shape)}")
        if self.parameterization == "eps":
            target = noise
        elif self.parameterization == "x0":
            target = x0
        else:
            target = self.schedule.get_v(x0, noise, t)
        err = (out - target).abs() if self.loss_type == "l1" else (out - target) ** 2
        loss_simple = err.float().mean(dim=tuple(range(1, err.dim())))  # (B,)
        loss = self.l_simple_weight * loss_simple.mean()
        if self._lvlb.device != loss_simple.device:
            self._lvlb = self._lvlb.to(loss_simple.device)
        loss_vlb = (self._lvlb[t] * loss_simple).mean()  # logged always, as officially
        if self.original_elbo_weight:
            loss = loss + self.original_elbo_weight * loss_vlb
        log = {"loss": loss.detach(), "loss_simple": loss_simple.mean().detach(), "loss_vlb": loss_vlb.detach()}
        if self.n_buckets:
            log.update(self._bucket_log(loss_simple.detach(), t))
        return loss, log

    def _bucket_log(self, loss_simple: Tensor, t: Tensor) -> dict[str, Tensor]:
        """Mean loss_simple per timestep bucket (n_buckets equal ranges of [0, T)), only buckets present in t."""
        n, big_t = self.n_buckets, self.num_timesteps
        bucket = t * n // big_t  # (B,)
        sums = torch.zeros(n, device=loss_simple.device).index_add_(0, bucket, loss_simple)
        counts = torch.bincount(bucket, minlength=n)
        log = {}
        for i, c in enumerate(counts.tolist()):
            if c:
                lo, hi = -(-i * big_t // n), -(-(i + 1) * big_t // n) - 1
                log[f"loss_simple_t/{lo:03d}-{hi:03d}"] = sums[i] / c
        return log
