"""The bias report: attribute statistics of the same images projected onto each dataset of the union.

The note's point is that a model trained on a dataset reproduces that dataset's biases; projecting one image onto
each dataset (z' = T⁻¹(T(z | y_src) | y_tgt)) shows what each dataset "adds". Here the attributes are measurable
offline:

- ``brightness`` (mean intensity, [0, 1]), ``contrast`` (standard deviation of the intensities), ``ink`` (share of
  pixels brighter than mid-gray), ``centre_mass`` (share of the intensity in the central half of the frame);
- the Fashion-MNIST class histogram of gencore's frozen classifier (:func:`gencore.metrics.classify_fmnist`): which
  garments a projection onto Fashion-MNIST becomes;
- the dataset a classifier trained on the real images assigns (:class:`DatasetClassifier`, multinomial logistic
  regression on pixels): the share of projections onto y recognised as y ("projection success").

For each (source, target) pair the report gives the projections' mean attributes beside the real images' of both
datasets and the share of the gap between them the projection closed, ``shift = (P − S) / (T − S)`` (1: the
projection has the target's statistic, 0: it kept the source's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["ATTRIBUTES", "DatasetClassifier", "attributes", "bias_table", "plot_report"]

ATTRIBUTES = ("brightness", "contrast", "ink", "centre_mass")


def _check(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1|3, H, W) in [-1, 1], got {getattr(images, 'shape', images)}")
    return images.float().mean(1)  # gray (N, H, W)


def attributes(images: Tensor) -> dict[str, Tensor]:
    """Per-image attributes {name: (N,)} of images in [-1, 1] (see the module docstring)."""
    g = (_check(images) + 1) / 2  # [0, 1]
    n, h, w = g.shape
    flat = g.reshape(n, -1)
    centre = g[:, h // 4 : h - h // 4, w // 4 : w - w // 4].reshape(n, -1).sum(1)
    return {
        "brightness": flat.mean(1),
        "contrast": flat.std(1, unbiased=False),
        "ink": (flat > 0.5).float().mean(1),
        "centre_mass": centre / flat.sum(1).clamp(min=1e-8),
    }


class DatasetClassifier:
    """Which dataset of the union an image looks like: multinomial logistic regression (scikit-learn, balanced
    class weights) on the images' pixels at ``size`` x ``size``, fitted on real images."""

    def __init__(self, names: Sequence[str], size: int = 16, max_iter: int = 300, seed: int = 0) -> None:
        self.names, self.size, self.max_iter, self.seed = tuple(names), int(size), int(max_iter), int(seed)
        self.model: Any = None
        self.train_accuracy: float | None = None

    def _features(self, images: Tensor) -> np.ndarray:
        g = _check(images)[:, None]
        g = torch.nn.functional.interpolate(g, size=(self.size, self.size), mode="area")
        return g.reshape(g.shape[0], -1).cpu().double().numpy()

    def fit(self, images: Tensor, labels: Tensor) -> DatasetClassifier:
        from sklearn.linear_model import LogisticRegression

        y = torch.as_tensor(labels).long().cpu().numpy()
        missing = sorted(set(range(len(self.names))) - set(y.tolist()))
        if missing:
            raise ValueError(f"DatasetClassifier: no images of {[self.names[i] for i in missing]} to fit on")
        x = self._features(images)
        self.model = LogisticRegression(max_iter=self.max_iter, class_weight="balanced", random_state=self.seed)
        self.model.fit(x, y)
        self.train_accuracy = float((self.model.predict(x) == y).mean())
        return self

    def predict(self, images: Tensor) -> Tensor:
        if self.model is None:
            raise RuntimeError("DatasetClassifier: fit it first")
        return torch.from_numpy(self.model.predict(self._features(images))).long()

    def accuracy(self, images: Tensor, labels: Tensor) -> float:
        return float((self.predict(images) == torch.as_tensor(labels).long().cpu()).double().mean())


def _mean(x: Tensor) -> float:
    return float(x.double().mean())


def bias_table(
    names: Sequence[str],
    real: Mapping[int, Tensor],
    projected: Mapping[tuple[int, int], Tensor],
    *,
    classifier: DatasetClassifier | None = None,
    fmnist_classes: bool = True,
) -> dict[str, Any]:
    """The report's numbers: ``real[d]`` images of dataset d, ``projected[(s, t)]`` the projections of source s's
    images onto target t. Returns ``{"real": {name: attrs}, "pairs": [{source, target, attrs, shift, ...}]}``."""
    from gencore.metrics import classify_fmnist

    def stats(images: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {k: _mean(v) for k, v in attributes(images).items()}
        if classifier is not None:
            counts = torch.bincount(classifier.predict(images), minlength=len(names)).double()
            out["dataset_share"] = {n: float(c) for n, c in zip(names, counts / counts.sum(), strict=True)}
        if fmnist_classes and images.shape[0] >= 2:
            hist = torch.bincount(classify_fmnist(images.float()), minlength=10).double()
            out["fmnist_classes"] = (hist / hist.sum()).tolist()
        return out

    real_stats = {names[d]: stats(x) for d, x in real.items()}
    pairs = []
    for (s, t), images in projected.items():
        p = stats(images)
        shift = {}
        for a in ATTRIBUTES:
            gap = real_stats[names[t]][a] - real_stats[names[s]][a]
            shift[a] = (p[a] - real_stats[names[s]][a]) / gap if abs(gap) > 1e-6 else None
        row = {"source": names[s], "target": names[t], "n": int(images.shape[0]), "attributes": p, "shift": shift}
        if classifier is not None:
            row["recognised_as_target"] = p["dataset_share"][names[t]]
        pairs.append(row)
    return {"datasets": list(names), "real": real_stats, "pairs": pairs}


def plot_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One figure: for each attribute, the projections' mean per (target, source) as grouped bars with the real
    target's value marked; and the Fashion-MNIST class histograms of the projections onto each target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gencore.data.fashion_mnist import CLASS_NAMES

    names = list(report["datasets"])
    k = len(names)
    panels = [*ATTRIBUTES, "recognised_as_target"]
    fig, axes = plt.subplots(2, max(len(panels), k), figsize=(3.2 * max(len(panels), k), 6.4), squeeze=False)
    width = 0.8 / k
    pairs = {(p["source"], p["target"]): p for p in report["pairs"]}
    for j, attr in enumerate(panels):
        ax = axes[0][j]
        for i, src in enumerate(names):
            vals = []
            for tgt in names:
                row = pairs.get((src, tgt))
                v = (
                    None
                    if row is None
                    else (row.get(attr) if attr == "recognised_as_target" else row["attributes"][attr])
                )
                vals.append(np.nan if v is None else v)
            ax.bar(np.arange(k) + (i - (k - 1) / 2) * width, vals, width, label=f"from {src}")
        if attr != "recognised_as_target":
            ax.scatter(np.arange(k), [report["real"][t][attr] for t in names], marker="_", s=600, c="k",
                       label="real target", zorder=3)  # fmt: skip
        ax.set_xticks(np.arange(k), [f"onto\n{t}" for t in names], fontsize=8)
        ax.set_title(attr.replace("_", " "), fontsize=10)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    for j in range(len(panels), axes.shape[1]):
        axes[0][j].axis("off")
    for j in range(axes.shape[1]):
        ax = axes[1][j]
        if j >= k:
            ax.axis("off")
            continue
        tgt = names[j]
        rows = [(src, pairs[(src, tgt)]["attributes"].get("fmnist_classes")) for src in names if (src, tgt) in pairs]
        for i, (src, hist) in enumerate(rows):
            if hist is None:
                continue
            ax.bar(np.arange(10) + (i - (len(rows) - 1) / 2) * (0.8 / len(rows)), hist, 0.8 / len(rows), label=src)
        real = report["real"][tgt].get("fmnist_classes")
        if real is not None:
            ax.step(np.arange(10), real, where="mid", c="k", lw=1, label="real target")
        ax.set_xticks(np.arange(10), [c.split("/")[0][:7] for c in CLASS_NAMES], rotation=60, fontsize=7)
        ax.set_title(f"Fashion-MNIST classes: onto {tgt}", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
