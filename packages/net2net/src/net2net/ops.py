"""What the data-bias note does with a trained cINN T, as functions of the flow and conditionings (no model state).

- :func:`sample` — z = T⁻¹(v | c), v ~ N(0, t² I) (official ``sample_all_labels`` / ``flow.sample``);
- :func:`project` — z' = T⁻¹(T(z | c_src) | c_tgt), the note's projection of an image onto another dataset
  (official ``modify_input``); :func:`project_all` does it for K targets in one batched inverse pass, where the
  official demo loops over the labels (:func:`project_loop`, kept as the reference the benchmark compares with);
- :func:`interpolate` — the path from z to its projection: ``mode="latent"`` blends the latents,
  (1 − α)·z + α·z' (the official ``alpha`` of ``modify_input``); ``mode="label"`` inverts the same residual v with
  the blended conditioning (1 − α)·c_src + α·c_tgt (the flow's embedder is a smooth function of c; α = 0 and 1 give
  z and z' exactly).

Latents are (B, D) (flatten spatial latents first); conditionings (B, conditioning_dim) or one row for all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["interpolate", "project", "project_all", "project_loop", "sample"]

MODES = ("latent", "label")


def _rows(c: Tensor, n: int, what: str) -> Tensor:
    if c.dim() != 2:
        raise ValueError(f"{what}: conditionings must be (B, width) or (1, width), got {tuple(c.shape)}")
    if c.shape[0] == 1 and n != 1:
        return c.expand(n, -1)
    if c.shape[0] != n:
        raise ValueError(f"{what}: {c.shape[0]} conditionings for {n} latents")
    return c


@torch.no_grad()
def sample(
    flow: nn.Module,
    c: Tensor,
    width: int,
    *,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, D) latents z = T⁻¹(v | c) with v ~ N(0, temperature² I), drawn in the flow's dtype (the conditioning may be
    an integer one-hot)."""
    weight = next(flow.parameters(), None)
    dtype = weight.dtype if weight is not None else c.dtype
    v = torch.randn(c.shape[0], width, generator=generator, device=c.device, dtype=dtype) * temperature
    return flow.reverse(v, c)


@torch.no_grad()
def project(flow: nn.Module, z: Tensor, c_src: Tensor, c_tgt: Tensor) -> Tensor:
    """(B, D): z' = T⁻¹(T(z | c_src) | c_tgt)."""
    v, _ = flow(z, _rows(c_src, z.shape[0], "project"))
    return flow.reverse(v, _rows(c_tgt, z.shape[0], "project"))


@torch.no_grad()
def project_all(flow: nn.Module, z: Tensor, c_src: Tensor, c_targets: Tensor) -> Tensor:
    """(B, K, D): z projected onto each of K target conditionings ``c_targets`` (K, width), one forward pass and one
    batched inverse pass of B·K rows."""
    b, k = z.shape[0], c_targets.shape[0]
    v, _ = flow(z, _rows(c_src, b, "project_all"))
    v_rep = v.repeat_interleave(k, dim=0)  # (B·K, D): item i's rows are i·K .. i·K + K − 1
    c_rep = c_targets.repeat(b, 1)  # (B·K, width)
    return flow.reverse(v_rep, c_rep).reshape(b, k, -1)


@torch.no_grad()
def project_loop(flow: nn.Module, z: Tensor, c_src: Tensor, c_targets: Tensor) -> Tensor:
    """(B, K, D) like :func:`project_all`, the official way (``modify_input``): one forward pass, then one inverse
    pass per target."""
    b = z.shape[0]
    v, _ = flow(z, _rows(c_src, b, "project_loop"))
    return torch.stack([flow.reverse(v, c_targets[j : j + 1].expand(b, -1)) for j in range(c_targets.shape[0])], 1)


@torch.no_grad()
def interpolate(
    flow: nn.Module, z: Tensor, c_src: Tensor, c_tgt: Tensor, alphas: Sequence[float], *, mode: str = "latent"
) -> Tensor:
    """(B, A, D): the path from z (α = 0) to its projection onto ``c_tgt`` (α = 1) at each α of ``alphas``."""
    if mode not in MODES:
        raise ValueError(f"interpolate: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if len(alphas) == 0:
        raise ValueError("interpolate: no alphas given")
    b = z.shape[0]
    c_src, c_tgt = _rows(c_src, b, "interpolate"), _rows(c_tgt, b, "interpolate")
    a = torch.as_tensor(list(alphas), dtype=z.dtype, device=z.device)  # (A,)
    n = a.shape[0]
    v, _ = flow(z, c_src)
    if mode == "latent":
        zp = flow.reverse(v, c_tgt)
        return torch.lerp(z[:, None], zp[:, None], a[None, :, None])
    c_src, c_tgt = c_src.to(a.dtype), c_tgt.to(a.dtype)  # (integer one-hots blend as floats)
    c = torch.lerp(c_src[:, None], c_tgt[:, None], a[None, :, None]).reshape(b * n, -1)  # (B·A, width)
    return flow.reverse(v.repeat_interleave(n, dim=0), c).reshape(b, n, -1)
