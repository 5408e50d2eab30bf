"""Sample-quality metrics for generated Fashion-MNIST images, in the feature space of the in-project network.

- FID-FMNIST: Fréchet distance between Gaussians fitted to penultimate features of generated images and of the real
  test images (torchmetrics ``FrechetInceptionDistance`` with our network as the feature extractor).
- KID-FMNIST: torchmetrics ``KernelInceptionDistance`` (cubic polynomial kernel MMD, unbiased), same features.
- Precision / recall: k-NN manifold estimate of Kynkäänniemi et al. 2019 (k = 3) in the same features.
- Class accuracy: share of samples the network classifies as the class they were asked for.

All take images in [-1, 1], (N, 1|3, H, W); the reference is the Fashion-MNIST test split (10,000 images).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gencore.metrics.fmnist_net import load_feature_net

log = logging.getLogger(__name__)

__all__ = [
    "class_accuracy",
    "classify_fmnist",
    "fid_fmnist",
    "fmnist_features",
    "fmnist_report",
    "frechet_distance",
    "kid_fmnist",
    "precision_recall",
    "precision_recall_fmnist",
    "psnr",
]

REPORT_METRICS = ("fid", "kid", "precision", "recall", "class_accuracy")


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB (B,) of images in [-1, 1] (data range 2)."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.float() - y.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be (N, 1|3, H, W) in [-1, 1], got {getattr(images, 'shape', images)}")
    if images.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 images, got {images.shape[0]}")


@torch.no_grad()
def fmnist_features(images: Tensor, batch_size: int = 1000) -> Tensor:
    """Penultimate features (N, 128) of the Fashion-MNIST network, float64."""
    net = load_feature_net()
    return torch.cat([net(images[i : i + batch_size]).double().cpu() for i in range(0, len(images), batch_size)])


@functools.lru_cache(maxsize=4)
def _reference_images(split: str, root: str | None) -> Tensor:
    from gencore.data.fashion_mnist import FashionMNIST

    return FashionMNIST(root=root, split=split).tensors()[0]


def cache_dir() -> Path:
    """genlab's cache folder for derived data (``$GENLAB_CACHE``, else ``$XDG_CACHE_HOME/genlab``, else
    ``~/.cache/genlab``); nothing in it is needed, everything in it is rebuilt when missing or stale."""
    env = os.environ.get("GENLAB_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genlab"


def _reference_key(split: str, root: str | None) -> str:
    """What the reference features depend on: the feature network's weights and the split's image file."""
    from gencore.data.fashion_mnist import _FILES, _idx_path, find_fashion_mnist
    from gencore.metrics.fmnist_net import WEIGHTS_PATH

    data = _idx_path(find_fashion_mnist(root), _FILES[split][0])
    h = hashlib.sha256(WEIGHTS_PATH.read_bytes())
    h.update(f"{split}:{data.resolve()}:{data.stat().st_size}:{data.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _reference_features(split: str, root: str | None) -> Tensor:
    """The real images' features, computed once per machine (10,000 test images: ~10 s on a CPU core) and kept in
    :func:`cache_dir`; a missing, stale or unreadable cache file is recomputed."""
    from safetensors.torch import load_file, save_file

    from gencore.io import atomic_path

    path = cache_dir() / f"fmnist_reference_{split}_{_reference_key(split, root)}.safetensors"
    try:
        return load_file(path)["features"]
    except Exception:  # a cache: anything wrong with it (missing, stale, truncated) means recompute
        pass
    features = fmnist_features(_reference_images(split, root))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"features": features.contiguous()}, str(tmp))
    except OSError as e:  # a read-only home: compute each time
        log.warning("could not cache the FID reference features in %s: %s", path.parent, e)
    return features


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), with the trace of the root from the eigenvalues of Σ1Σ2."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    eig = torch.linalg.eigvals(sigma1 @ sigma2)
    tr_sqrt = eig.sqrt().real.sum()
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt)


class _Precomputed(torch.nn.Module):
    """Feature "extractor" for torchmetrics when the features are already computed (each image passes our network
    once; the 10,000 reference features are computed once per process)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@functools.lru_cache(maxsize=4)
def _fid_metric(split: str, root: str | None) -> Any:
    from torchmetrics.image.fid import FrechetInceptionDistance

    ref = _reference_features(split, root)
    fid = FrechetInceptionDistance(feature=_Precomputed(ref.shape[1]), reset_real_features=False)
    fid.update(ref, real=True)
    return fid


def fid_fmnist(images: Tensor, *, split: str = "test", root: str | None = None, batch_size: int = 1000) -> float:
    """FID-FMNIST of ``images`` against the real ``split`` (10,000 test images by default). Lower is better."""
    _check_images(images)
    fid = _fid_metric(split, root)
    fid.reset()  # keeps the real statistics
    fid.update(fmnist_features(images.float(), batch_size), real=False)
    return float(fid.compute())


def kid_fmnist(
    images: Tensor,
    *,
    split: str = "test",
    root: str | None = None,
    subsets: int = 50,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID-FMNIST (mean, std over ``subsets`` random subsets) of ``images`` against the real ``split``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_images(images)
    ref = _reference_features(split, root)
    size = min(subset_size, len(images), len(ref))
    with warnings.catch_warnings():  # "will save all extracted features": expected, they are 64-d and few
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(ref.shape[1]), subsets=subsets, subset_size=size)
    kid.update(ref, real=True)
    kid.update(fmnist_features(images.float()), real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        mean, std = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return float(mean), float(std)


def _kth_radii(x: Tensor, k: int, chunk: int = 2048) -> Tensor:
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i : i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(out)


def _coverage(queries: Tensor, support: Tensor, radii: Tensor, chunk: int = 2048) -> Tensor:
    inside = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i : i + chunk], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` vs ``real`` feature sets (N, d)."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision_recall: expected (N, d) feature sets, got {tuple(real.shape)}, {tuple(fake.shape)}"
        )
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision_recall: need more than k={k} samples per set, got {len(real)}, {len(fake)}")
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _kth_radii(real, k)).double().mean()
    recall = _coverage(real, fake, _kth_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def precision_recall_fmnist(
    images: Tensor, *, split: str = "test", root: str | None = None, k: int = 3, seed: int = 0
) -> tuple[float, float]:
    """Precision / recall of ``images`` against as many real ``split`` images (random, seeded), in FMNIST features."""
    _check_images(images)
    real = _reference_features(split, root)
    n = min(len(images), len(real))
    idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]
    return precision_recall(real[idx], fmnist_features(images), k=k)


@torch.no_grad()
def class_accuracy(images: Tensor, labels: Tensor | Sequence[int]) -> float:
    """Share of ``images`` the network classifies as ``labels`` (the classes they were generated for)."""
    _check_images(images)
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (len(images),):
        raise ValueError(f"class_accuracy: labels must be ({len(images)},), got {tuple(labels.shape)}")
    return float((classify_fmnist(images) == labels).double().mean())


def classify_fmnist(images: Tensor, batch_size: int = 1000) -> Tensor:
    """(N,) Fashion-MNIST class ids the network assigns to ``images`` (what a sample looks like, whatever its
    prompt)."""
    _check_images(images)
    net = load_feature_net()
    starts = range(0, len(images), batch_size)
    return torch.cat([net.logits(images[i : i + batch_size]).argmax(1).cpu() for i in starts])


def fmnist_report(
    images: Tensor,
    labels: Tensor | None = None,
    *,
    metrics: Sequence[str] = REPORT_METRICS,
    split: str = "test",
    root: str | None = None,
) -> dict[str, float]:
    """The toy-scale result-table numbers for generated Fashion-MNIST images: a dict with ``n`` and each metric."""
    unknown = [m for m in metrics if m not in REPORT_METRICS]
    if unknown:
        raise ValueError(f"fmnist_report: unknown metrics {unknown}; valid: {', '.join(REPORT_METRICS)}")
    _check_images(images)
    out: dict[str, float] = {"n": float(len(images))}
    if "fid" in metrics:
        out["fid"] = fid_fmnist(images, split=split, root=root)
    if "kid" in metrics:
        out["kid"], out["kid_std"] = kid_fmnist(images, split=split, root=root)
    if "precision" in metrics or "recall" in metrics:
        p, r = precision_recall_fmnist(images, split=split, root=root)
        out.update({k: v for k, v in (("precision", p), ("recall", r)) if k in metrics})
    if "class_accuracy" in metrics and labels is not None:
        out["class_accuracy"] = class_accuracy(images, labels)
    return out
