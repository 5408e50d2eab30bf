"""Hole masks: LaMa's "mixed" training masks (irregular strokes and boxes) and moving holes for video clips.

Conventions: a mask is float32 with values in {0, 1}, 1 = hole (the pixels to inpaint). The drawing functions take a
``numpy.random.Generator`` and return ``(h, w)`` arrays; :class:`MixedMasks` returns ``(1, h, w)`` tensors and
:func:`moving_masks` ``(F, 1, h, w)`` tensors.

The official training masks (``configs/ours.yaml``, LaMa's ``saicinpainting/training/data/masks.py``):

- :func:`irregular_mask` = ``make_random_irregular_mask``: ``times`` strokes, each a polyline of 1-5 thick
  ``cv2.line`` segments of length ``10 + U{0, max_len - 1}`` and width ``5 + U{0, max_width - 1}``, with LaMa's
  integer-radian angles ``0.01 + U{0, max_angle - 1}`` (mirrored to ``2 pi - angle`` on even strokes); official
  config max_angle 4, max_len 200, max_width 100, 1-5 strokes. Here ``times`` is drawn from
  ``[min_times, max_times]`` inclusive; LaMa's generator (its ramp adds one) draws up to ``max_times + 1``: pass
  ``max_times=6`` for exactly LaMa's count.
- :func:`box_mask` = ``make_random_rectangle_mask``: 1-4 axis-aligned boxes of side 30-150 px (inclusive, clipped to
  the image less its margin) at least ``margin`` = 10 px from the border.
- :class:`MixedMasks` = ``MixedMaskGenerator``: one kind per mask, picked by the normalised probabilities (official
  irregular 1 : box 1; segmentation masks 0, not implemented here).

**Scaling to the image size.** LaMa's pixel sizes are for 256 x 256 training crops. :class:`MixedMasks` multiplies
every pixel size (stroke length and width, including LaMa's fixed +10 / +5 minimums; box margin and sizes) by
``min(h, w) / scale_to`` (``scale_to`` = 256), so a 64 x 64 toy image gets holes covering the same fraction of the
image as a 256 x 256 one (strokes 2-51 px long and 1-25 px wide, boxes 8-38 px); ``scale_to=None`` uses the pixel
sizes as given. The functions :func:`irregular_mask` and :func:`box_mask` themselves never rescale.

A :class:`MixedMasks` mask is never empty and never covers the whole image: such draws are redrawn, and after
``max_attempts`` failures a ``RuntimeError`` names the sizes (it happens only for absurd settings on tiny images).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch

__all__ = ["MOVING_KINDS", "MixedMasks", "box_mask", "irregular_mask", "moving_masks"]

MOVING_KINDS = ("box", "stroke", "mixed")


def _check_times(name: str, min_times: int, max_times: int) -> None:
    if min_times < 0 or max_times < 0:
        raise ValueError(f"{name}: min_times and max_times must be >= 0, got {min_times}, {max_times}")
    if min_times > max_times:
        raise ValueError(f"{name}: min_times must be <= max_times, got {min_times} > {max_times}")
    if max_times == 0:
        raise ValueError(f"{name}: max_times must be >= 1 (0 draws an empty mask), got {max_times}")


def _check_irregular(max_angle: int, max_len: int, max_width: int, min_times: int, max_times: int) -> None:
    for key, val in (("max_angle", max_angle), ("max_len", max_len), ("max_width", max_width)):
        if int(val) != val or val < 1:
            raise ValueError(f"irregular_mask: {key} must be a positive integer, got {val!r}")
    _check_times("irregular_mask", min_times, max_times)


def _check_box(margin: int, bbox_min_size: int, bbox_max_size: int, min_times: int, max_times: int) -> None:
    if margin < 0:
        raise ValueError(f"box_mask: margin must be >= 0, got {margin}")
    if bbox_min_size < 1:
        raise ValueError(f"box_mask: bbox_min_size must be >= 1, got {bbox_min_size}")
    if bbox_min_size > bbox_max_size:
        raise ValueError(f"box_mask: bbox_min_size must be <= bbox_max_size, got {bbox_min_size} > {bbox_max_size}")
    _check_times("box_mask", min_times, max_times)


def _check_shape(name: str, h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"{name}: image size must be positive, got {h}x{w}")


def irregular_mask(
    rng: np.random.Generator,
    h: int,
    w: int,
    *,
    max_angle: int = 4,
    max_len: int = 200,
    max_width: int = 100,
    min_times: int = 1,
    max_times: int = 5,
    min_len: int = 10,
    min_width: int = 5,
) -> np.ndarray:
    """LaMa's irregular (brush-stroke) mask, ``(h, w)`` float32 in {0, 1}; sizes in pixels as given.

    ``min_len`` / ``min_width`` are LaMa's fixed offsets (10 and 5 px): segment length ``min_len + U{0, max_len-1}``,
    brush width ``min_width + U{0, max_width-1}``. See the module docstring for the stroke count.
    """
    _check_shape("irregular_mask", h, w)
    _check_irregular(max_angle, max_len, max_width, min_times, max_times)
    mask = np.zeros((h, w), np.float32)
    times = int(rng.integers(min_times, max_times + 1))
    for i in range(times):
        x, y = int(rng.integers(w)), int(rng.integers(h))
        for _ in range(1 + int(rng.integers(5))):
            angle = 0.01 + int(rng.integers(max_angle))
            if i % 2 == 0:
                angle = 2 * 3.1415926 - angle
            length = min_len + int(rng.integers(max_len))
            brush = max(1, min_width + int(rng.integers(max_width)))
            end_x = int(np.clip(int(x + length * np.sin(angle)), 0, w))
            end_y = int(np.clip(int(y + length * np.cos(angle)), 0, h))
            cv2.line(mask, (x, y), (end_x, end_y), 1.0, brush)
            x, y = end_x, end_y
    return mask


def box_mask(
    rng: np.random.Generator,
    h: int,
    w: int,
    *,
    margin: int = 10,
    bbox_min_size: int = 30,
    bbox_max_size: int = 150,
    min_times: int = 1,
    max_times: int = 4,
) -> np.ndarray:
    """LaMa's rectangle mask, ``(h, w)`` float32 in {0, 1}: ``U{min_times, max_times}`` boxes with sides in
    ``[bbox_min_size, bbox_max_size]`` (clipped to the image less ``2 * margin``), ``margin`` px from the border."""
    _check_shape("box_mask", h, w)
    _check_box(margin, bbox_min_size, bbox_max_size, min_times, max_times)
    room = min(h, w) - 2 * margin
    if room < 1:
        raise ValueError(f"box_mask: a {h}x{w} image leaves no room for a box inside a {margin} px margin")
    hi = min(bbox_max_size, room)
    lo = min(bbox_min_size, hi)
    mask = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(min_times, max_times + 1))):
        bw, bh = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(margin, w - margin - bw + 1))
        y0 = int(rng.integers(margin, h - margin - bh + 1))
        mask[y0 : y0 + bh, x0 : x0 + bw] = 1.0
    return mask


_IRREGULAR_PIXELS = ("max_len", "max_width", "min_len", "min_width")
_BOX_PIXELS = ("margin", "bbox_min_size", "bbox_max_size")


def _kwargs_for(fn: Any, kwargs: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """``kwargs`` completed with ``fn``'s defaults; unknown keys raise TypeError."""
    kwargs = dict(kwargs or {})
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY})
    if unknown:
        raise TypeError(f"MixedMasks: unknown {what} argument(s) {unknown}")
    full = {k: p.default for k, p in params.items() if p.kind is p.KEYWORD_ONLY}
    full.update(kwargs)
    return full


def _scaled(kwargs: dict[str, Any], keys: tuple[str, ...], factor: float, minimum: dict[str, int]) -> dict[str, Any]:
    out = dict(kwargs)
    for k in keys:
        out[k] = max(minimum.get(k, 1), round(kwargs[k] * factor))
    return out


class MixedMasks:
    """LaMa's ``MixedMaskGenerator`` (irregular strokes and boxes): ``masks(rng, h, w)`` -> ``(1, h, w)`` float tensor.

    Args:
        irregular_proba, box_proba: relative probabilities of the two kinds (>= 0, not both 0; renormalised as LaMa).
        irregular_kwargs, box_kwargs: arguments of :func:`irregular_mask` / :func:`box_mask` (LaMa's names), for a
            ``scale_to`` x ``scale_to`` image.
        scale_to: the image side the pixel sizes are meant for; they are multiplied by ``min(h, w) / scale_to``
            (None: used as given). See the module docstring.
        max_attempts: redraws allowed for an empty or full mask before a RuntimeError.
    """

    def __init__(
        self,
        irregular_proba: float = 1.0,
        box_proba: float = 1.0,
        irregular_kwargs: Mapping[str, Any] | None = None,
        box_kwargs: Mapping[str, Any] | None = None,
        scale_to: int | None = 256,
        max_attempts: int = 100,
    ) -> None:
        probas = np.array([irregular_proba, box_proba], dtype=np.float64)
        if not np.all(np.isfinite(probas)) or np.any(probas < 0):
            raise ValueError(f"MixedMasks: probabilities must be finite and >= 0, got {irregular_proba}, {box_proba}")
        if probas.sum() <= 0:
            raise ValueError("MixedMasks: irregular_proba and box_proba are both 0; at least one kind must be possible")
        if scale_to is not None and scale_to <= 0:
            raise ValueError(f"MixedMasks: scale_to must be positive or None, got {scale_to}")
        if max_attempts < 1:
            raise ValueError(f"MixedMasks: max_attempts must be >= 1, got {max_attempts}")
        self.probas = probas / probas.sum()
        self.irregular_kwargs = _kwargs_for(irregular_mask, irregular_kwargs, "irregular")
        self.box_kwargs = _kwargs_for(box_mask, box_kwargs, "box")
        _check_irregular(*(self.irregular_kwargs[k] for k in ("max_angle", "max_len", "max_width")), *self._times(0))
        _check_box(*(self.box_kwargs[k] for k in ("margin", "bbox_min_size", "bbox_max_size")), *self._times(1))
        self.scale_to, self.max_attempts = scale_to, int(max_attempts)

    def _times(self, kind: int) -> tuple[int, int]:
        kw = self.irregular_kwargs if kind == 0 else self.box_kwargs
        return kw["min_times"], kw["max_times"]

    def kwargs_for(self, h: int, w: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """The (irregular, box) arguments used for an ``h`` x ``w`` image (pixel sizes scaled)."""
        if self.scale_to is None:
            return dict(self.irregular_kwargs), dict(self.box_kwargs)
        f = min(h, w) / self.scale_to
        irr = _scaled(self.irregular_kwargs, _IRREGULAR_PIXELS, f, {"min_len": 0, "min_width": 0})
        box = _scaled(self.box_kwargs, _BOX_PIXELS, f, {"margin": 0})
        box["bbox_min_size"] = min(box["bbox_min_size"], box["bbox_max_size"])
        return irr, box

    def draw(self, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        """One mask as an ``(h, w)`` float32 array (never empty, never full)."""
        _check_shape("MixedMasks", h, w)
        irr, box = self.kwargs_for(h, w)
        for _ in range(self.max_attempts):
            kind = int(rng.choice(2, p=self.probas))
            m = irregular_mask(rng, h, w, **irr) if kind == 0 else box_mask(rng, h, w, **box)
            area = float(m.mean())
            if 0.0 < area < 1.0:
                return m
        raise RuntimeError(
            f"MixedMasks: {self.max_attempts} draws for a {h}x{w} image were all empty or full "
            f"(irregular {irr}, box {box}); make the holes smaller or the image larger"
        )

    def __call__(self, rng: np.random.Generator, h: int, w: int) -> torch.Tensor:
        return torch.from_numpy(self.draw(rng, h, w))[None]

    def __repr__(self) -> str:
        return (
            f"MixedMasks(irregular_proba={self.probas[0]:.3g}, box_proba={self.probas[1]:.3g}, "
            f"irregular_kwargs={self.irregular_kwargs}, box_kwargs={self.box_kwargs}, scale_to={self.scale_to})"
        )


def _path(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, min_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Start and end points, uniform in the box [lo, hi] (x, y), at least ``min_dist`` apart when the box allows."""
    best = None
    for _ in range(32):
        p0, p1 = rng.uniform(lo, hi), rng.uniform(lo, hi)
        d = float(np.linalg.norm(p1 - p0))
        if best is None or d > best[0]:
            best = (d, p0, p1)
        if d >= min_dist:
            break
    return best[1], best[2]


def _moving_box(rng: np.random.Generator, num_frames: int, h: int, w: int) -> np.ndarray:
    s = min(h, w)
    bh = max(1, round(rng.uniform(0.25, 0.45) * s))
    bw = max(1, round(rng.uniform(0.25, 0.45) * s))
    bh, bw = min(bh, h - 1) if h > 1 else 1, min(bw, w - 1) if w > 1 else 1
    lo = np.array([0.0, 0.0])
    hi = np.array([w - bw, h - bh], dtype=np.float64)
    p0, p1 = _path(rng, lo, hi, 0.35 * s)
    out = np.zeros((num_frames, h, w), np.float32)
    for f in range(num_frames):
        t = f / max(1, num_frames - 1)
        x0, y0 = (round(v) for v in p0 + t * (p1 - p0))
        out[f, y0 : y0 + bh, x0 : x0 + bw] = 1.0
    return out


def _moving_stroke(rng: np.random.Generator, num_frames: int, h: int, w: int) -> np.ndarray:
    s = min(h, w)
    length = rng.uniform(0.35, 0.6) * s
    width = max(1, round(rng.uniform(0.08, 0.16) * s))
    angle = rng.uniform(0, math.pi)
    spin = rng.uniform(-0.5, 0.5)  # radians over the whole clip: a slow turn while it moves
    lo, hi = np.array([0.0, 0.0]), np.array([w - 1.0, h - 1.0])
    p0, p1 = _path(rng, lo, hi, 0.35 * s)
    out = np.zeros((num_frames, h, w), np.float32)
    for f in range(num_frames):
        t = f / max(1, num_frames - 1)
        c = p0 + t * (p1 - p0)
        a = angle + t * spin
        d = 0.5 * length * np.array([math.cos(a), math.sin(a)])
        q0, q1 = np.round(c - d).astype(int), np.round(c + d).astype(int)
        cv2.line(out[f], (int(q0[0]), int(q0[1])), (int(q1[0]), int(q1[1])), 1.0, width)
    return out


def moving_masks(
    rng: np.random.Generator, num_frames: int, h: int, w: int, kind: str = "box", max_attempts: int = 100
) -> torch.Tensor:
    """A hole moving smoothly across a clip: ``(num_frames, 1, h, w)`` float32 in {0, 1}.

    ``kind``: ``"box"`` (an axis-aligned box with sides of 25-45% of ``min(h, w)`` translated along a straight path
    inside the frame), ``"stroke"`` (a thick line segment, 35-60% of ``min(h, w)`` long and 8-16% wide, its centre
    translated along a straight path inside the frame while it slowly turns) or ``"mixed"`` (one of the two, with
    probability 1/2 each). The start and end points are drawn at least 35% of ``min(h, w)`` apart (when the frame
    allows), so the hole visibly moves; positions are linear in the frame index (constant speed). No frame
    is empty or full (redrawn otherwise; RuntimeError after ``max_attempts``).
    """
    if kind not in MOVING_KINDS:
        raise ValueError(f"moving_masks: kind must be one of {MOVING_KINDS}, got {kind!r}")
    if num_frames < 1:
        raise ValueError(f"moving_masks: num_frames must be >= 1, got {num_frames}")
    _check_shape("moving_masks", h, w)
    if h * w < 2:
        raise ValueError(f"moving_masks: a {h}x{w} frame cannot hold a hole that is neither empty nor full")
    for _ in range(max_attempts):
        k = kind if kind != "mixed" else ("box", "stroke")[int(rng.integers(2))]
        m = _moving_box(rng, num_frames, h, w) if k == "box" else _moving_stroke(rng, num_frames, h, w)
        area = m.reshape(num_frames, -1).mean(1)
        if np.all(area > 0) and np.all(area < 1):
            return torch.from_numpy(m)[:, None]
    raise RuntimeError(f"moving_masks: {max_attempts} draws of a {kind} hole for {h}x{w} frames were empty or full")
