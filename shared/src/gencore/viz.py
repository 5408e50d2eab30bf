"""Image and video grids as PNG files (the logging callback and the samplers write these)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["make_grid", "save_grid", "to_uint8"]


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] floats -> uint8 [0, 255] (clamped, rounded)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """(B, C, H, W) images, or (B, C, T, H, W) videos (one row per video), in [-1, 1] -> one (C, H', W') image."""
    from torchvision.utils import make_grid as tv_make_grid

    if not isinstance(images, Tensor) or images.dim() not in (4, 5):
        raise ValueError(f"make_grid: expected (B, C, H, W) or (B, C, T, H, W), got {getattr(images, 'shape', images)}")
    if images.dim() == 5:
        b, c, t, h, w = images.shape
        nrow = t
        images = images.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid: images need 1 or 3 channels, got {images.shape[1]}")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    return tv_make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=padding, pad_value=pad_value)


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write ``make_grid(images)`` as a PNG (atomically)."""
    from PIL import Image

    from gencore.io import atomic_path

    grid = to_uint8(make_grid(images, nrow=nrow))  # (C, H, W)
    arr = grid.permute(1, 2, 0).numpy()
    arr = arr[..., 0] if arr.shape[-1] == 1 else arr
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    return path
