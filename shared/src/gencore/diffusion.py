"""What every diffusion and flow package shares (ldm and sd3_flow; ladd_turbo and gen1_video build on it too).

- **Calling a denoiser** (:func:`call_denoiser`): a denoiser / velocity field is any callable ``fn(x, t)``
  (``cond=None``), ``fn(x, t, **cond)`` (``cond`` a mapping, e.g. ``{"c_crossattn": ..., "c_concat": ...}`` of an LDM
  UNet or ``{"context": ..., "pooled": ...}`` of an MMDiT) or ``fn(x, t, cond)`` (any other ``cond``). Samplers and
  objectives call a model only through it, so they never read model attributes.
- **Classifier-free guidance** (:func:`classifier_free_guidance`, Ho & Salimans 2022): out = out_u + s (out_c - out_u)
  from one call on the doubled batch [uncond, cond]; linear, so it applies to eps, v or velocity outputs alike.
- **Conditioning dropout** (:func:`dropout_masks`, :func:`drop_condition`): each sample's condition replaced by the
  unconditional one with probability p, for all conditions together or per group (SD3 drops each text encoder on its
  own). Drawn on the data's device, no host sync.
- **DDIM step grids and steps** (:func:`ddim_timesteps`, :func:`ddim_plan`, :func:`ddim_step`; Song et al. 2021 with
  the official LDM step selection ``make_ddim_timesteps`` / ``make_ddim_sampling_parameters``): samplers take the grid
  as an argument (k-diffusion style), so a caller can pass any ascending list of training timesteps.
- **Per-timestep loss logging** (:class:`LossBuckets`): the mean per-sample loss in equal bins of t, accumulated on
  the device every step and read (one host sync) only when Lightning writes its logs. The flat mean of a diffusion
  loss is dominated by the noisiest timesteps and looks flat while the model improves; the per-bin curves do not.

All functions take devices and dtypes from their tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PARAMETERIZATIONS",
    "LossBuckets",
    "call_denoiser",
    "check_probability",
    "classifier_free_guidance",
    "ddim_plan",
    "ddim_step",
    "ddim_timesteps",
    "drop_condition",
    "dropout_masks",
    "x0_eps_from_output",
]

Denoiser = Callable[..., Tensor]
PARAMETERIZATIONS = ("eps", "x0", "v")


def call_denoiser(fn: Denoiser, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    """``fn(x, t)`` if ``cond`` is None, ``fn(x, t, **cond)`` for a mapping, else ``fn(x, t, cond)``."""
    if cond is None:
        return fn(x, t)
    if isinstance(cond, Mapping):
        return fn(x, t, **cond)
    return fn(x, t, cond)


def check_probability(p: float | Mapping[Any, float], name: str = "p") -> float | dict[Any, float]:
    """``p`` (a float, or a mapping of floats) checked to lie in [0, 1]; returns floats (a dict for a mapping)."""
    items = p.items() if isinstance(p, Mapping) else [(None, p)]
    out = {}
    for key, value in items:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
            where = name if key is None else f"{name}[{key!r}]"
            raise ValueError(f"{where} must be a probability in [0, 1], got {value!r}")
        out[key] = float(value)
    return out if isinstance(p, Mapping) else out[None]


# ------------------------------------------------------------------------------------------ classifier-free guidance


def _items(c: Any, u: Any, where: str) -> list[tuple[Any, Any, str]]:
    """(condition item, uncond item, name) pairs of a list / tuple condition and its list-like uncond."""
    if not isinstance(u, (list, tuple)) or len(u) != len(c):
        got = type(u).__name__
        raise ValueError(f"uncond{where} must be a list of {len(c)} items like the condition, got {got}")
    return [(ci, ui, f"{where}[{i}]") for i, (ci, ui) in enumerate(zip(c, u))]


def _broadcast_to(u: Any, c: Any, where: str) -> Any:
    """The unconditional value ``u`` broadcast to the condition ``c`` ((B, ...), (1, ...) or (...)); lists / tuples
    element-wise."""
    if isinstance(c, (list, tuple)):
        return type(c)(_broadcast_to(ui, ci, w) for ci, ui, w in _items(c, u, where))
    if not isinstance(c, Tensor):
        raise ValueError(f"condition{where} must be a tensor (or a list of them), got {type(c).__name__}")
    u = torch.as_tensor(u, device=c.device).to(dtype=c.dtype)
    if u.dim() == c.dim() - 1:
        u = u.unsqueeze(0)
    if u.dim() != c.dim() or any(du not in (1, dc) for du, dc in zip(u.shape, c.shape)):
        shapes = f"{tuple(u.shape)} does not broadcast to the condition {tuple(c.shape)}"
        raise ValueError(f"uncond{where} of shape {shapes}")
    return u.expand_as(c)


def _both_halves(c: Any) -> Any:
    """A condition shared by both halves of the doubled batch: tensors repeated along the batch, others unchanged."""
    if isinstance(c, (list, tuple)):
        return type(c)(_both_halves(ci) for ci in c)
    return torch.cat([c, c]) if isinstance(c, Tensor) and c.dim() > 0 else c


def _check_uncond_keys(cond: Any, uncond: Any) -> None:
    if isinstance(cond, Mapping) != isinstance(uncond, Mapping):
        raise ValueError(
            "keyword (mapping) conditions need a mapping uncond {name: value}, a positional condition a tensor uncond"
        )
    if isinstance(cond, Mapping):
        missing = [k for k in uncond if k not in cond]
        if missing:
            raise ValueError(f"uncond keys {missing} are not among the condition's keys {list(cond)}")


def classifier_free_guidance(fn: Denoiser, scale: float, uncond: Any = None) -> Denoiser:
    """``fn`` wrapped into out = out_u + scale (out_c - out_u), one call on the doubled batch [uncond, cond].

    The condition comes the way :func:`call_denoiser` passes it: positionally (``uncond`` then broadcasts to it:
    (B, ...), (1, ...) or (...), e.g. the "" caption embedding or a null class index) or as keyword arguments
    (``uncond`` a mapping; keys absent from it, e.g. the ``c_concat`` of an inpainting model, are shared by both
    halves). ``scale`` = 1 calls ``fn`` once with the condition (no ``uncond`` needed); ``scale`` = 0 calls it once with
    the unconditional one.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be a finite number, got {scale!r}")
    scale = float(scale)
    if scale != 1.0 and uncond is None:
        raise ValueError(f"guidance_scale={scale} != 1 needs an unconditional condition, got uncond=None")

    def guided(x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if (args and kwargs) or len(args) > 1:
            raise ValueError("classifier-free guidance takes one positional condition or keyword conditions")
        cond = kwargs if kwargs else (args[0] if args else None)
        if scale == 1.0:
            return call_denoiser(fn, x, t, cond)
        if cond is None:
            raise ValueError(f"guidance_scale={scale} needs a condition to guide, got none")
        _check_uncond_keys(cond, uncond)
        if isinstance(cond, Mapping):
            u = {k: (_broadcast_to(uncond[k], v, f"[{k!r}]") if k in uncond else v) for k, v in cond.items()}
        else:
            u = _broadcast_to(uncond, cond, "")
        if scale == 0.0:
            return call_denoiser(fn, x, t, u)
        if isinstance(cond, Mapping):
            both = {k: (torch.cat([u[k], v]) if k in uncond else _both_halves(v)) for k, v in cond.items()}
        else:
            both = type(cond)(torch.cat(p) for p in zip(u, cond)) if isinstance(cond, (list, tuple)) else None
            both = torch.cat([u, cond]) if both is None else both
        t_in = torch.cat([t, t]) if t.dim() > 0 else t
        out_u, out_c = call_denoiser(fn, torch.cat([x, x]), t_in, both).chunk(2)
        return out_u + scale * (out_c - out_u)

    return guided


# ---------------------------------------------------------------------------------------------- conditioning dropout


def dropout_masks(
    batch_size: int,
    p: float | Mapping[str, float],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Boolean "dropped" masks (batch_size,): ``{"cond": mask}`` for a float ``p``, one independent mask per name of a
    mapping ``p`` (in its order). Names with p = 0 get no mask (nothing is drawn for them)."""
    probs = check_probability(p) if isinstance(p, Mapping) else {"cond": check_probability(p)}
    return {
        name: torch.rand(batch_size, generator=generator, device=device) < prob
        for name, prob in probs.items()
        if prob > 0.0
    }


def _replace_rows(c: Any, u: Any, drop: Tensor, where: str) -> Any:
    """Rows of ``c`` (batch first) where ``drop`` is True replaced by ``u`` (broadcast as in guidance)."""
    if isinstance(c, (list, tuple)):
        return type(c)(_replace_rows(ci, ui, drop, w) for ci, ui, w in _items(c, u, where))
    u = _broadcast_to(u, c, where)
    return torch.where(drop.to(c.device).reshape(-1, *((1,) * (c.dim() - 1))), u, c)


def _group_keys(name: Any) -> tuple[str, ...]:
    if isinstance(name, str):
        return tuple(name.split("+"))
    return tuple(name)


def drop_condition(
    cond: Any,
    uncond: Any,
    p: float | Mapping[Any, float],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Any, dict[str, Tensor]]:
    """Classifier-free-guidance dropout: each sample's condition replaced by ``uncond`` with probability ``p``.

    - a tensor (or list of tensors) ``cond``: ``p`` a float; ``uncond`` broadcasts to it (e.g. (1, L, D));
    - a mapping ``cond`` with a float ``p``: one mask drops every key of ``uncond`` together (keys absent from
      ``uncond``, e.g. ``c_concat``, are kept);
    - a mapping ``cond`` with a mapping ``p``: an independent mask per entry, keyed by a condition name, a tuple of
      names or ``"a+b"`` (dropped together).

    Returns ``(new condition, {group name: dropped mask (B,)})``; nothing is drawn when every p is 0.
    """
    if cond is None:
        raise ValueError("conditioning dropout needs a condition, got cond=None")
    if uncond is None:
        raise ValueError("conditioning dropout needs the unconditional value to replace dropped conditions with")
    _check_uncond_keys(cond, uncond)
    first = next(iter(cond.values())) if isinstance(cond, Mapping) else cond
    while isinstance(first, (list, tuple)):
        first = first[0]
    batch = first.shape[0]
    device = device if device is not None else first.device
    if isinstance(p, Mapping):
        if not isinstance(cond, Mapping):
            raise ValueError("a per-key dropout mapping needs mapping conditions")
        groups = {"+".join(_group_keys(k)): v for k, v in p.items()}
        for name in groups:
            absent = [k for k in _group_keys(name) if k not in uncond]
            if absent:
                raise ValueError(f"dropout keys {absent} have no unconditional value (uncond keys: {list(uncond)})")
    else:
        groups = {"+".join(uncond) if isinstance(cond, Mapping) else "cond": p}
    masks = dropout_masks(batch, groups, generator=generator, device=device)
    out = dict(cond) if isinstance(cond, Mapping) else cond
    for name, drop in masks.items():
        if not isinstance(cond, Mapping):
            out = _replace_rows(cond, uncond, drop, "")
            continue
        for key in _group_keys(name):
            out[key] = _replace_rows(cond[key], uncond[key], drop, f"[{key!r}]")
    return out, masks


# --------------------------------------------------------------------------------------------------------- DDIM


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000, method: str = "uniform") -> list[int]:
    """Ascending training timesteps of DDIM / PLMS (LDM's ``make_ddim_timesteps``), e.g. S = 5, T = 1000 ->
    [1, 201, 401, 601, 801].

    "uniform": ``range(0, T, T // S) + 1``; as officially, that is ``ceil(T / (T // S))`` steps, more than S when S does
    not divide T (S = 7 -> 8 steps, stride 142). "quad": ``int(linspace(0, sqrt(0.8 T), S) ** 2) + 1`` (small timesteps
    may repeat for large S, as officially). The +1 offset reaches t = T, outside the schedule (an IndexError in the
    official code), whenever the stride divides T - 1 (S > T / 2, or S = 3 for T = 1000): a ValueError here.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got num_steps={num_steps!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the number of training timesteps {num_train_timesteps}")
    if method == "uniform":
        steps = [s + 1 for s in range(0, num_train_timesteps, num_train_timesteps // num_steps)]
    elif method == "quad":
        grid = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2).astype(int) + 1  # as officially
        steps = [int(s) for s in grid]
    else:
        raise ValueError(f"unknown method={method!r}; expected 'uniform' or 'quad'")
    if steps[-1] >= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} with {num_train_timesteps} training timesteps ({method!r}) selects t={steps[-1]}, "
            f"outside [0, {num_train_timesteps - 1}] (official stride T // S and +1 offset); pick another num_steps"
        )
    return steps


def ddim_plan(
    alphas_cumprod: Tensor | Sequence[float], timesteps: Sequence[int], eta: float = 0.0
) -> list[tuple[int, float, float, float]]:
    """Descending ``[(t, abar_t, abar_prev, sigma_t)]`` over ascending ``timesteps``
    (``make_ddim_sampling_parameters``), in float64 on the host. The first (lowest) step's abar_prev is abar_0, not 1,
    as officially; sigma is DDIM Eq. 16 times ``eta``: eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev))."""
    if not 0.0 <= eta:
        raise ValueError(f"eta must be >= 0, got eta={eta}")
    ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
    steps = [int(t) for t in timesteps]
    if not steps or any(b < a for a, b in pairwise(steps)) or steps[0] < 0 or steps[-1] >= ac.shape[0]:
        raise ValueError(f"timesteps must be ascending integers in [0, {ac.shape[0] - 1}], got {steps}")
    alphas = ac[steps].tolist()
    prev = [float(ac[0]), *alphas[:-1]]
    plan = []
    for t, a, ap in zip(steps, alphas, prev):
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap)) if eta else 0.0
        if 1 - ap - sigma**2 < 0:
            raise ValueError(f"eta={eta} gives sigma^2={sigma**2:.3g} > 1 - a_prev={1 - ap:.3g} at t={t}; use eta <= 1")
        plan.append((t, a, ap, sigma))
    return plan[::-1]


def x0_eps_from_output(out: Tensor, x: Tensor, a: float, parameterization: str = "eps") -> tuple[Tensor, Tensor]:
    """(x0^, eps^) implied by a model output at noise level abar = ``a`` (a Python float): eps, x0 or v
    (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022)."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization={parameterization!r}; expected one of {PARAMETERIZATIONS}")
    sa, s1 = math.sqrt(a), math.sqrt(1 - a)
    if parameterization == "eps":
        return (x - s1 * out) / sa, out
    if parameterization == "x0":
        return out, (x - sa * out) / s1
    return sa * x - s1 * out, sa * out + s1 * x


def ddim_step(
    x: Tensor,
    eps: Tensor,
    a: float,
    a_prev: float,
    sigma: float = 0.0,
    *,
    x0_hat: Tensor | None = None,
    quantize_x0: Callable[[Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """One DDIM update (Song et al. 2021, Eq. 12) -> (x_prev, x0^):
    x_prev = sqrt(a_prev) x0^ + sqrt(1 - a_prev - sigma^2) eps + sigma z, with x0^ = (x - sqrt(1 - a) eps) / sqrt(a)
    unless given; ``quantize_x0`` is applied to x0^ (a VQ first stage's quantiser); z is drawn only when sigma > 0."""
    if x0_hat is None:
        x0_hat = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    if quantize_x0 is not None:
        x0_hat = quantize_x0(x0_hat)
    x_prev = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma**2) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x_prev, x0_hat


# --------------------------------------------------------------------------------------------- per-timestep logging


class LossBuckets:
    """Mean per-sample loss in ``n_buckets`` equal bins of t in [0, 1], accumulated on the device.

    ``update(per_sample, t)`` every step (an ``index_add_``: no host sync); ``log(module, split)`` writes the bin means
    since the last write with ``module.log_dict`` and starts over: call it from ``on_train_batch_end`` (it writes only
    on the steps Lightning sends to its loggers, so it syncs only there) and ``on_validation_epoch_end`` (``force``).
    Names: ``{prefix}/0.00-0.10`` ..., or with ``num_train_timesteps`` T the integer timesteps ``{prefix}/000-099``.
    Empty bins are left out.
    """

    def __init__(self, n_buckets: int = 10, *, prefix: str = "loss_t", num_train_timesteps: int | None = None) -> None:
        if isinstance(n_buckets, bool) or not isinstance(n_buckets, int) or n_buckets < 0:
            raise ValueError(f"n_buckets must be an integer >= 0, got {n_buckets!r}")
        self.n_buckets, self.prefix, self.num_train_timesteps = n_buckets, prefix, num_train_timesteps
        self._sums: Tensor | None = None
        self._counts: Tensor | None = None

    def names(self) -> list[str]:
        n, big_t = self.n_buckets, self.num_train_timesteps
        if big_t is None:
            return [f"{self.prefix}/{i / n:.2f}-{(i + 1) / n:.2f}" for i in range(n)]
        return [f"{self.prefix}/{-(-i * big_t // n):03d}-{-(-(i + 1) * big_t // n) - 1:03d}" for i in range(n)]

    @torch.no_grad()
    def update(self, per_sample: Tensor, t: Tensor) -> None:
        """Add (B,) per-sample losses at (B,) times ``t`` in [0, 1] (t / T for integer DDPM timesteps)."""
        if not self.n_buckets:
            return
        idx = (t.detach().float() * self.n_buckets).long().clamp_(0, self.n_buckets - 1)
        if self._sums is None or self._sums.device != per_sample.device:
            self._sums = torch.zeros(self.n_buckets, device=per_sample.device)
            self._counts = torch.zeros(self.n_buckets, device=per_sample.device)
        self._sums.index_add_(0, idx, per_sample.detach().float())
        self._counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))

    def compute(self) -> dict[str, float]:
        """{name: mean} of the non-empty bins since the last reset (one host sync)."""
        if self._sums is None:
            return {}
        sums, counts = self._sums.tolist(), self._counts.tolist()
        return {name: s / c for name, s, c in zip(self.names(), sums, counts) if c > 0}

    def reset(self) -> None:
        self._sums = self._counts = None

    def log(self, module: Any, split: str, *, force: bool = False) -> None:
        """``module.log_dict`` of :meth:`compute` under ``{split}/`` on Lightning's logging steps (or ``force``)."""
        if self._sums is None:
            return
        trainer = module.trainer
        connector = getattr(trainer, "_logger_connector", None)
        due = getattr(connector, "should_update_logs", None)
        if due is None:  # not a Lightning Trainer of the expected version: every log_every_n_steps training batches
            due = (trainer.global_step + 1) % max(1, int(getattr(trainer, "log_every_n_steps", 1))) == 0
        if not (force or due):
            return
        values = self.compute()
        self.reset()
        if values:
            module.log_dict({f"{split}/{k}": v for k, v in values.items()}, on_step=not force, on_epoch=force)
