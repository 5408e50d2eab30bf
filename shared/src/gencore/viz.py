"""Image and video grids as PNG files (the logging callback and the samplers write these)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["make_grid", "save_gif", "save_grid", "save_panels", "to_uint8"]


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


def _grid_image(images: Tensor, nrow: int, scale: int) -> Any:
    from PIL import Image

    arr = to_uint8(make_grid(images, nrow=nrow)).permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr)).convert("RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_panels(
    panels: Sequence[tuple[str, Tensor]],
    path: str | os.PathLike,
    *,
    nrow: int,
    column_labels: Sequence[str] | None = None,
    scale: int = 2,
    title: str | None = None,
) -> Path:
    """Image grids side by side, each under its caption (``panels``: ``[(caption, (B, C, H, W) in [-1, 1]), ...]``,
    ``nrow`` images per row), with optional labels over the columns and a title line; written as one PNG
    (atomically). For comparisons at a glance: the same prompts and seeds in the same cells of every panel."""
    from PIL import Image, ImageDraw, ImageFont

    from gencore.io import atomic_path

    if not panels:
        raise ValueError("save_panels: no panels")
    grids = [_grid_image(images, nrow, scale) for _, images in panels]
    font = ImageFont.load_default(size=13)
    line, gap, pad = 18, 16, 8
    cell = (grids[0].width - 2 * scale) / nrow  # make_grid: 2 px padding per cell, scaled
    top = pad + (line if title else 0) + line + (line if column_labels else 0)
    width = sum(g.width for g in grids) + gap * (len(grids) - 1) + 2 * pad
    height = top + max(g.height for g in grids) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    x = pad
    for (caption, _), grid in zip(panels, grids, strict=True):
        y = pad + (line if title else 0)
        draw.text((x, y), caption, fill="black", font=font)
        if column_labels:
            for j, label in enumerate(column_labels[:nrow]):
                text = str(label)
                while len(text) > 2 and draw.textlength(text, font=font) > cell - 2:
                    text = text[:-1]
                draw.text((x + 2 * scale + j * cell, y + line), text, fill="dimgray", font=font)
        canvas.paste(grid, (x, top))
        x += grid.width + gap
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path


def save_gif(videos: Tensor, path: str | os.PathLike, fps: float = 8.0, *, scale: int = 1) -> Path:
    """Clips (B, C, T, H, W) in [-1, 1] side by side (frame t of every clip in one row) as an animated GIF that loops,
    enlarged ``scale`` times (nearest neighbour); written atomically. A GIF plays wherever an image shows (a browser
    page, a README), where an mp4's codec may not."""

    from gencore.io import atomic_path

    if not isinstance(videos, Tensor) or videos.dim() != 5:
        raise ValueError(f"save_gif: expected clips (B, C, T, H, W), got {getattr(videos, 'shape', videos)}")
    if fps <= 0 or scale < 1:
        raise ValueError(f"save_gif: need fps > 0 and scale >= 1, got {fps}, {scale}")
    frames = [_grid_image(videos[:, :, t], videos.shape[0], scale) for t in range(videos.shape[2])]
    path = Path(path)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path
