"""Attention kernels: the one attention function every genlab model calls.

``attention(q, k, v, *, mask=None, causal=False, scale=None, dropout_p=0.0, backend=None)`` takes tensors in
(B, H, L, D) layout and dispatches to a backend from a small registry:

- ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient / math kernels
  chosen by torch),
- ``math``: the plain softmax(QKᵀ·scale + mask)·V reference, computed in float32,
- ``xformers``: ``xformers.ops.memory_efficient_attention``, an optional GPU extra imported lazily.

The backend is chosen by the ``backend`` argument, else the innermost ``with attention_backend(name):`` block, else the
``GENLAB_ATTN_BACKEND`` environment variable, else ``sdpa``.

Mask semantics (the same for every backend):

- a boolean mask marks the pairs that take part in attention (``True`` = attend), as in SDPA;
- a floating mask is added to the scaled scores (``-inf`` removes a pair);
- masks broadcast to (B, H, Lq, Lk);
- ``causal=True`` aligns the causal triangle to the bottom right: query ``i`` sits at absolute position
  ``Lk - Lq + i``, so decoding with a KV cache (Lq new queries against Lk cached keys) is causal without extra work;
- a query row whose keys are all masked returns zeros (SDPA's behaviour on CPU, reproduced by ``math``).

``causal_mask(lq, lk, n_unmasked=...)`` builds the minGPT mask with a bidirectional prefix (taming / geofree
``n_unmasked``). :class:`KVCache` stores keys and values for autoregressive sampling.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ENV_VAR",
    "AttentionBackendUnavailable",
    "KVCache",
    "attention",
    "attention_backend",
    "available_backends",
    "causal_mask",
    "register_backend",
    "resolve_backend",
]

ENV_VAR = "GENLAB_ATTN_BACKEND"
DEFAULT_BACKEND = "sdpa"

BackendFn = Callable[[Tensor, Tensor, Tensor, Tensor | None, bool, float, float], Tensor]
_BACKENDS: dict[str, BackendFn] = {}
_CONTEXT_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar("genlab_attn_backend", default=None)


class AttentionBackendUnavailable(RuntimeError):
    """The requested backend exists but cannot run here (extra not installed, wrong device)."""


def register_backend(name: str) -> Callable[[BackendFn], BackendFn]:
    """Decorator adding ``fn(q, k, v, mask, causal, scale, dropout_p) -> out`` to the registry under ``name``."""

    def deco(fn: BackendFn) -> BackendFn:
        _BACKENDS[name] = fn
        return fn

    return deco


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``backend=`` (registered, not necessarily runnable on this machine)."""
    return tuple(sorted(_BACKENDS))


def _check_name(name: str, source: str) -> str:
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r} (from {source}); valid backends: {', '.join(available_backends())}"
        )
    return name


def resolve_backend(backend: str | None = None) -> str:
    """The backend that ``attention(..., backend=backend)`` would use: argument > context > env var > sdpa."""
    if backend is not None:
        return _check_name(backend, "the backend argument")
    ctx = _CONTEXT_BACKEND.get()
    if ctx is not None:
        return ctx
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"${ENV_VAR}")
    return DEFAULT_BACKEND


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[str]:
    """Use backend ``name`` for every ``attention`` call inside the block that passes no ``backend=``."""
    token = _CONTEXT_BACKEND.set(_check_name(name, "attention_backend()"))
    try:
        yield name
    finally:
        _CONTEXT_BACKEND.reset(token)


def causal_mask(
    lq: int, lk: int | None = None, *, n_unmasked: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Boolean (lq, lk) mask, ``True`` = attend, aligned bottom-right (query i is absolute position lk - lq + i).

    Positions ``< n_unmasked`` form a bidirectional prefix: they attend to each other regardless of order (the
    minGPT ``mask[:n_unmasked, :n_unmasked] = 1`` of taming and geofree); later positions stay causal.
    """
    lk = lq if lk is None else lk
    if lq < 1 or lk < lq:
        raise ValueError(f"causal_mask needs 1 <= lq <= lk, got lq={lq}, lk={lk}")
    if n_unmasked < 0:
        raise ValueError(f"n_unmasked must be >= 0, got {n_unmasked}")
    pos_q = torch.arange(lk - lq, lk, device=device)[:, None]  # absolute positions of the queries
    pos_k = torch.arange(lk, device=device)[None, :]
    allowed = pos_k <= pos_q
    if n_unmasked > 0:
        allowed = allowed | ((pos_q < n_unmasked) & (pos_k < n_unmasked))
    return allowed


def _validate(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must have layout (B, H, L, D), got shape {tuple(t.shape)}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(
            f"attention: batch and head dims of q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} differ"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"attention: k and v lengths differ ({k.shape[2]} vs {v.shape[2]})")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"attention: mask must be a tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"attention: mask must be boolean or floating, got dtype {mask.dtype}")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        try:
            torch.broadcast_shapes(mask.shape, target)
        except RuntimeError:
            raise ValueError(
                f"attention: mask of shape {tuple(mask.shape)} does not broadcast to (B, H, Lq, Lk) = {target}"
            ) from None


def _merged_mask(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool) -> Tensor | None:
    """One mask holding both ``mask`` and the bottom-right causal triangle (bool if possible, else additive)."""
    if not causal:
        return mask
    lq, lk = q.shape[2], k.shape[2]
    if lq > lk:
        raise ValueError(f"attention: causal attention needs Lq <= Lk, got Lq={lq}, Lk={lk}")
    tri = causal_mask(lq, lk, device=q.device)
    if mask is None:
        return tri
    if mask.dtype == torch.bool:
        return mask & tri
    return mask + torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(~tri, float("-inf"))


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> Tensor:
    """softmax(q·kᵀ·scale + mask)·v over (B, H, L, D) tensors; returns (B, H, Lq, Dv).

    ``scale`` defaults to D**-0.5. ``dropout_p`` drops attention weights (pass 0 at inference).
    """
    _validate(q, k, v, mask, dropout_p)
    name = resolve_backend(backend)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _BACKENDS[name](q, k, v, mask, causal, scale, dropout_p)


@functools.cache
def _cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


@register_backend("sdpa")
def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float, dropout_p: float) -> Tensor:
    d = q.shape[-1]
    if d < 16 and q.device.type == "cpu" and k.shape[2] >= 128 and _cpu_has_avx512():
        # torch's CPU flash kernel works in 16-float vectors on AVX-512; narrower heads (the LDM UNet's 8) fall into
        # its scalar tail. Zero columns leave q·kᵀ unchanged and only add output columns that are dropped: same
        # attention, (4, 8, 1024, 8) fwd+bwd ~150 ms instead of ~225 ms on one thread.
        q, k, v = (F.pad(z, (0, 16 - d)) for z in (q, k, v))
        return _sdpa(q, k, v, mask, causal, scale, dropout_p)[..., :d]
    if causal and mask is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p)
    mask = _merged_mask(q, k, mask, causal)
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


@register_backend("math")
def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float, dropout_p: float) -> Tensor:
    mask = _merged_mask(q, k, mask, causal)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)  # rows with every key masked -> zero output, as SDPA does
    weights = torch.exp(scores - torch.where(dead, torch.zeros_like(row_max), row_max))
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v.float()).to(q.dtype)


@register_backend("xformers")
def _xformers(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float, dropout_p: float
) -> Tensor:
    try:
        import xformers.ops as xops  # optional GPU extra, imported only when asked for
    except ImportError as err:
        raise AttentionBackendUnavailable(
            "attention backend 'xformers' is not installed: pip install 'genlab-core[xformers]' "
            "(CUDA only), or use backend='sdpa'"
        ) from err
    if q.device.type != "cuda":
        raise AttentionBackendUnavailable(
            f"attention backend 'xformers' runs on CUDA tensors only, got device {q.device.type!r}; use backend='sdpa'"
        )
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))  # xformers wants (B, L, H, D)
    lq, lk = q.shape[2], k.shape[2]
    if causal and mask is None and lq == lk:
        bias = xops.LowerTriangularMask()
    else:
        merged = _merged_mask(q, k, mask, causal)
        bias = None
        if merged is not None:
            if merged.dtype == torch.bool:
                merged = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~merged, float("-inf"))
            shape = (q.shape[0], q.shape[1], lq, lk)
            # xformers needs the bias' last dim 8-aligned in memory: allocate padded, then view.
            padded = torch.empty(*shape[:-1], math.ceil(lk / 8) * 8, dtype=q.dtype, device=q.device)
            bias = padded[..., :lk]
            bias.copy_(merged.to(q.dtype).expand(shape))
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, p=dropout_p, scale=scale)
    return out.transpose(1, 2)


class KVCache:
    """Keys and values of one attention layer, pre-allocated for autoregressive decoding.

    ``k_all, v_all = cache.append(k_new, v_new)`` writes the new (B, H, l, D) entries after the cached ones and
    returns views of everything so far; pass them to ``attention(q_new, k_all, v_all, causal=True)``.
    """

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, val in (
            ("batch_size", batch_size),
            ("num_heads", num_heads),
            ("max_len", max_len),
            ("head_dim", head_dim),
        ):
            if int(val) < 1:
                raise ValueError(f"KVCache: {name} must be >= 1, got {val}")
        shape = (batch_size, num_heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @classmethod
    def for_layers(cls, n_layers: int, *args, **kwargs) -> list[KVCache]:
        """One cache per transformer layer."""
        if n_layers < 1:
            raise ValueError(f"KVCache.for_layers: n_layers must be >= 1, got {n_layers}")
        return [cls(*args, **kwargs) for _ in range(n_layers)]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b, h, _, d = self.k.shape
        if k.shape != v.shape or k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
            raise ValueError(
                f"KVCache.append: expected k and v of shape ({b}, {h}, l, {d}), "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache.append: {end} positions exceed max_len={self.max_len}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0
