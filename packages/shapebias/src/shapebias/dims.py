"""The shape / texture dimensionality estimate of Islam et al., "Shape or Texture: Understanding Discriminative
Features in CNNs" (ICLR 2021, arXiv 2101.11604), Sec. 3 ("Quantifying shape and texture"), computed exactly as the
paper's code (``dim_estimation/utils.py::dim_est``) does.

It is the correlation proxy for mutual information of Esser, Rombach and Ommer's IIN (CVPR 2020). Given N pairs of
features (z_a, z_b) in R^D, each labelled with the factor the pair shares (0 = shape: the same content image under two
textures; 1 = texture: the same texture on images of two classes):

    Z = [z_a; z_b] (2N x D),   V = sum_d var(Z_d)                      (total variance, ddof 0)
    P_F = (1 / V) sum_d mean_{n in S_F} (z_a,d - m_F,d)(z_b,d - m_F,d)  (m_F = mean of the pair means of factor F)
    P_residual = 1
    |z_F| = floor(softmax(P)_F * D),  |z_residual| = D - |z_shape| - |z_texture|

Kept as the official code has it (and tested): the residual's score is fixed at 1, so the softmax squashes the
factors' scores strongly (a raw 2:1 shape : texture ratio comes out near 1.33:1) and a factor never gets more than
e / (e + 2) ~ 58% of the dimensions; sums run in the features' own dtype (float32 from a network) and the scores
come out float64; factor values other than the shape and texture ones (the released loader also draws 2 and 3) only
enter the total variance. Departures: empty factors and mismatched pair widths raise a ValueError naming the problem
(the official code returns NaN-driven garbage or fails inside numpy).

:func:`collect_pair_features` runs a feature extractor over a loader of pairs once for every requested stage
(the official script reruns the network per stage) and :func:`estimate_stages` applies :func:`dim_est` per stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FACTOR_NAMES",
    "DimEstimate",
    "PairFeatures",
    "collect_pair_features",
    "dim_est",
    "dims_from_scores",
    "estimate_stages",
]

log = logging.getLogger(__name__)

#: factor index -> name, as the paper's code orders them (residual last)
FACTOR_NAMES = ("shape", "texture", "residual")


def _as_array(x: Any, what: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    elif isinstance(x, (list, tuple)) and x and isinstance(x[0], (np.ndarray, Tensor)):
        x = np.concatenate([_as_array(part, what) for part in x])
    return np.asarray(x)


@dataclass(frozen=True)
class DimEstimate:
    """One estimate: ``scores`` P_F (float64, residual = 1), ``dims`` |z_F| in neurons (sum = ``dim``), ``percent``
    (rounded to one decimal as the paper's tables), ``pairs``: how many pairs of each factor it used."""

    scores: tuple[float, ...]
    dims: tuple[int, ...]
    percent: tuple[float, ...]
    dim: int
    pairs: dict[str, int] = field(default_factory=dict)
    names: tuple[str, ...] = FACTOR_NAMES

    def __getitem__(self, name: str) -> int:
        return self.dims[self.names.index(name)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "dims": dict(zip(self.names, self.dims, strict=True)),
            "percent": dict(zip(self.names, self.percent, strict=True)),
            "scores": dict(zip(self.names, self.scores, strict=True)),
            "pairs": dict(self.pairs),
        }


def dims_from_scores(scores: Sequence[float], dim: int) -> tuple[list[int], list[float]]:
    """(dims, percent) from factor scores as the official code turns them into neuron counts: a max-shifted softmax,
    ``int(p * dim)`` per factor, the remainder to the last (residual) factor, percentages rounded to 1 decimal."""
    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(s - np.max(s))
    p = e / np.sum(e)
    dims = [int(v * dim) for v in p]
    dims[-1] = dim - sum(dims[:-1])
    total = sum(dims)
    return dims, [round(100 * (d / total), 1) for d in dims]


def dim_est(
    z_a: Any,
    z_b: Any,
    factors: Any,
    *,
    n_factors: int = 3,
    residual_index: int = 2,
    names: Sequence[str] = FACTOR_NAMES,
) -> DimEstimate:
    """The paper's dimensionality estimate of every factor from paired features.

    Args:
        z_a, z_b: (N, D) features of each pair's first and second example (arrays, tensors, or lists of batches).
        factors: (N,) the factor each pair shares (0 = shape, 1 = texture; other values only count in the variance).
        n_factors: factors including the residual (3 in the paper); ``residual_index``: the residual's index.
    """
    za, zb, f = _as_array(z_a, "z_a"), _as_array(z_b, "z_b"), _as_array(factors, "factors").reshape(-1)
    if za.ndim != 2 or zb.ndim != 2:
        raise ValueError(f"pair features must be (N, D) matrices, got {za.shape} and {zb.shape}")
    if za.shape[1] != zb.shape[1]:
        raise ValueError(
            f"pairs with mismatched feature widths: example1 features are {za.shape[1]}-d, example2 features "
            f"{zb.shape[1]}-d (both examples must come from the same stage of the same network)"
        )
    if za.shape[0] != zb.shape[0] or za.shape[0] != f.shape[0]:
        raise ValueError(f"{za.shape[0]} example1 rows, {zb.shape[0]} example2 rows and {f.shape[0]} factors differ")
    if not 0 <= residual_index < n_factors or len(names) != n_factors:
        raise ValueError(f"residual_index {residual_index} / names {list(names)} do not fit n_factors={n_factors}")
    if not np.all(np.isfinite(za)) or not np.all(np.isfinite(zb)):
        raise ValueError("pair features contain NaN or infinite values")
    zall = np.concatenate([za, zb], 0)
    mean = np.mean(zall, 0, keepdims=True)
    var = np.sum(np.mean((zall - mean) * (zall - mean), 0))
    if not var > 0:
        raise ValueError("the features have zero total variance (a constant stage?): nothing to attribute")
    scores: list[Any] = []
    pairs: dict[str, int] = {}
    for k in range(n_factors):
        if k == residual_index:
            scores.append(1.0)
            continue
        idx = np.where(f == k)[0]
        pairs[names[k]] = int(idx.size)
        if idx.size == 0:
            raise ValueError(f"no pairs of factor {k} ({names[k]!r}): the estimate needs pairs of every factor")
        a, b = za[idx], zb[idx]
        m = 0.5 * (np.mean(a, 0, keepdims=True) + np.mean(b, 0, keepdims=True))
        scores.append(np.sum(np.mean((a - m) * (b - m), 0)) / var)
    s = np.array(scores)  # float32 scores + the residual's Python 1.0 -> float64, as in the official code
    dims, percent = dims_from_scores(s, za.shape[1])
    return DimEstimate(
        scores=tuple(float(v) for v in s),
        dims=tuple(dims),
        percent=tuple(percent),
        dim=int(za.shape[1]),
        pairs=pairs,
        names=tuple(names),
    )


# ------------------------------------------------------------------------------------------- from a network


@dataclass
class PairFeatures:
    """Pooled features of both examples of every pair, per stage, and the pairs' factors."""

    a: dict[str, np.ndarray]
    b: dict[str, np.ndarray]
    factors: np.ndarray

    def estimate(self, stage: str) -> DimEstimate:
        return dim_est(self.a[stage], self.b[stage], self.factors)


@torch.no_grad()
def collect_pair_features(
    features: Callable[..., Mapping[str, Tensor]],
    pairs: Iterable[Mapping[str, Any]],
    stages: Sequence[str],
    *,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> PairFeatures:
    """Run ``features(images, stages=stages)`` (e.g. a :class:`shapebias.encoders.FeatureExtractor`) over batches of
    pairs (``{"factor", "example1", "example2"}``, as :class:`shapebias.data.FactorPairs` gives them) and keep every
    stage's pooled (B, C) features, as float32 numpy. Both examples of a batch go through the network as one batch."""
    stages = [str(s) for s in stages]
    a: dict[str, list[np.ndarray]] = {s: [] for s in stages}
    b: dict[str, list[np.ndarray]] = {s: [] for s in stages}
    factors: list[np.ndarray] = []
    for i, batch in enumerate(pairs):
        x1, x2 = batch["example1"], batch["example2"]
        if x1.shape != x2.shape:
            raise ValueError(f"pair examples differ in shape: {tuple(x1.shape)} vs {tuple(x2.shape)}")
        x = torch.cat([x1, x2])
        if device is not None:
            x = x.to(device)
        out = features(x, stages=stages)
        n = x1.shape[0]
        for s in stages:
            z = out[s].float().cpu().numpy()
            if z.ndim != 2:
                raise ValueError(f"stage {s!r}: expected pooled (B, C) features, got shape {z.shape}")
            a[s].append(z[:n])
            b[s].append(z[n:])
        factors.append(np.asarray(torch.as_tensor(batch["factor"]).cpu()).reshape(-1))
        if progress is not None:
            progress(i + 1)
    if not factors:
        raise ValueError("no pairs: the pair loader is empty")
    return PairFeatures(
        a={s: np.concatenate(v) for s, v in a.items()},
        b={s: np.concatenate(v) for s, v in b.items()},
        factors=np.concatenate(factors),
    )


def estimate_stages(pair_features: PairFeatures, stages: Sequence[str] | None = None) -> dict[str, DimEstimate]:
    """:func:`dim_est` for every stage of ``pair_features`` (or the given ones), in order."""
    stages = list(pair_features.a) if stages is None else [str(s) for s in stages]
    return {s: pair_features.estimate(s) for s in stages}
