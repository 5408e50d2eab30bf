"""Figures of Islam et al., "Shape or Texture" (ICLR 2021) as matplotlib PNGs: the shape / texture / residual share of
every stage (the paper's stacked bars, Fig. 3-4), their course over training epochs (Fig. 6) and the per-stage
readout mIoU of binary against semantic masks (Fig. 7-8)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gencore import io

__all__ = ["plot_dims", "plot_dynamics", "plot_readout"]

COLOURS = {"shape": "#1f77b4", "texture": "#ff7f0e", "residual": "#c7c7c7"}


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=100)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def plot_dims(percent: Mapping[str, Mapping[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Stacked bars: per stage, the % of its dimensions estimated to encode shape, texture and neither."""
    stages = list(percent)
    fig, ax = _figure(1.2 + 0.9 * len(stages), 3.4)
    bottom = [0.0] * len(stages)
    x = list(range(len(stages)))
    for factor in ("shape", "texture", "residual"):
        values = [float(percent[s][factor]) for s in stages]
        ax.bar(x, values, bottom=bottom, color=COLOURS[factor], label=factor, width=0.6)
        for i, v in enumerate(values):
            if factor != "residual" and v >= 6:
                ax.text(i, bottom[i] + v / 2, f"{v:.1f}", ha="center", va="center", fontsize=8, color="white")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(x, [str(s) for s in stages])
    ax.set_xlabel("stage")
    ax.set_ylabel("% of the stage's dimensions")
    ax.set_ylim(0, 100)
    ax.set_title(title or "shape / texture dimensions per stage", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def plot_dynamics(
    epochs: Sequence[int], percent: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, *, title: str = ""
) -> Path:
    """Shape (solid) and texture (dashed) % of every stage over training epochs (``percent[stage][i]`` at
    ``epochs[i]``)."""
    import matplotlib.pyplot as plt

    fig, ax = _figure(6.0, 3.6)
    cmap = plt.get_cmap("viridis")
    stages = list(percent)
    for k, stage in enumerate(stages):
        colour = cmap(k / max(1, len(stages) - 1))
        rows = percent[stage]
        ax.plot(epochs, [r["shape"] for r in rows], "-o", color=colour, ms=3, label=f"stage {stage} shape")
        ax.plot(epochs, [r["texture"] for r in rows], "--", color=colour, alpha=0.7, label=f"stage {stage} texture")
    if max(epochs, default=0) > 2:
        ax.set_xscale("symlog", linthresh=1.0)  # the first epoch linear (finer snapshots), later epochs logarithmic
    ax.set_xlabel("epoch (0 = initialisation)")
    ax.set_ylabel("% of dimensions")
    ax.set_title(title or "shape and texture dimensions over training", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    return _save(fig, path)


def plot_readout(miou: Mapping[str, Mapping[str, float]], path: str | Path, *, title: str = "") -> Path:
    """mIoU of each readout task (``miou[task][stage]``) across stages."""
    fig, ax = _figure(5.0, 3.4)
    markers = {"binary": "o", "semantic": "s"}
    stages: list[str] = []
    for task, per_stage in miou.items():
        stages = list(per_stage)
        x = list(range(len(stages)))
        ax.plot(x, [100 * per_stage[s] for s in stages], marker=markers.get(task, "^"), label=f"{task} masks")
    ax.set_xticks(list(range(len(stages))), [str(s) for s in stages])
    ax.set_xlabel("stage of the frozen network")
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "per-pixel readout of frozen features", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    return _save(fig, path)
