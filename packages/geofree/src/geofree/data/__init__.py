"""Data for Geometry-Free View Synthesis: pairs of views with their relative camera.

- :mod:`geofree.data.realestate`: RealEstate10K / ACID, in the official COLMAP layout (with sparse points) or as the
  released camera files + frames (no points: the fixed depth range);
- :mod:`geofree.data.synthetic`: rendered rooms textured with real photos, exact cameras and depth (CPU runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from geofree.data.realestate import RealEstate10KCameras, RealEstate10KSparse, read_colmap_model, write_colmap_model
from geofree.data.synthetic import SyntheticScenes, SyntheticScenesDataModule

__all__ = [
    "RealEstate10KCameras",
    "RealEstate10KSparse",
    "SyntheticScenes",
    "SyntheticScenesDataModule",
    "read_colmap_model",
    "realestate_datamodule",
    "write_colmap_model",
]


def realestate_datamodule(
    root: str,
    size: Sequence[int] = (208, 368),
    max_points: int = 16384,
    frames_file: str | None = None,
    train_split: str = "train",
    val_split: str = "test",
    **loader_kwargs: Any,
):
    """A gencore DataModule over :class:`RealEstate10KSparse` (ACID: the same layout): training pairs from
    ``<root>/<train_split>`` (a new pair of each sequence on every access); validation on ``<root>/<val_split>``: the
    official 564 fixed pairs when ``frames_file`` (data/realestate_custom_frames.txt) is given, else pairs drawn as in
    training (fixed)."""
    from gencore.data import DataModule

    common = dict(size=tuple(size), max_points=max_points)
    val_mode = dict(mode="custom_test", frames_file=frames_file) if frames_file else dict(mode="train")
    dm = DataModule(
        train=lambda: RealEstate10KSparse(root, split=train_split, mode="train", fresh_pairs=True, **common),
        val=lambda: RealEstate10KSparse(root, split=val_split, **val_mode, **common),
        **loader_kwargs,
    )
    dm.image_size = tuple(int(s) for s in size)
    dm.channels = 3
    return dm
