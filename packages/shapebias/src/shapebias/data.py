"""Cue-conflict data with known shape and texture for Islam et al., "Shape or Texture: Understanding Discriminative
Features in CNNs" (ICLR 2021, arXiv 2101.11604).

The paper measures shape and texture dimensions on Stylized PASCAL VOC ("SVOC"): 4369 single-class VOC2012 images,
each stylised by AdaIN with 5 Describable-Textures images (``generate_stylized_voc/make_stl_voc.py``; AdaIN itself is
:mod:`shapebias.adain`). VOC, DTD and the AdaIN weights are not on this machine, so this module makes data whose shape
and texture are known exactly and exist offline:

- a **texture bank** (:data:`TEXTURES`) of real texture photographs: scikit-image's bundled brick / grass / gravel,
  immunohistochemistry and Hubble images, and crops of the OpenCV sample images (baboon fur, Starry Night brush
  strokes, a patterned fabric, a circuit board, a building facade);
- **shapes** from real Fashion-MNIST items: the item upsampled, thresholded and hole-filled into a silhouette, placed
  at a random scale and offset that stay fixed for that content across its textures (as an SVOC content image keeps
  its layout across its 5 stylisations);
- :class:`CueConflict`: every content under every texture (``pairing="all"``, SVOC-like) or one texture per content
  that predicts the class (``pairing="class_texture"``, an ImageNet-like control);
- :class:`StylizedFolder`: a folder named as the official generator writes it (``<texIdx>_<cls>_<imgid>.jpg``),
  the working version of the released SVOC loader, which never fills its item list and indexes texture ``'0'`` that
  does not exist (keys ``'1'..'5'`` while the generator writes 0..4);
- :class:`FactorPairs`: the pair sampler of ``dim_estimation/datasets/svoc.py``. factor 0 = shape (the same content
  under a different texture), factor 1 = texture (the same texture on a content of a different class). The default
  draws factor ~ Uniform{0, 1} (the fixed version); ``sampling="official"`` keeps the released
  ``random.randint(0, 3)`` skew (shape pairs 1/4 of the time; values 2 and 3 take the texture branch and keep their
  value). Departure: the texture partner is drawn uniformly over all items with that texture and another class
  (the official code first draws a class, then a file of it), and every draw comes from a ``(seed, index)``
  generator so a pair is the same in every worker and run;
- :class:`CueConflictDataModule` and :func:`write_dataset` (writes a dataset with the official file naming, plus
  masks and an ``index.json``, so :class:`StylizedFolder` reads it back).

Items are dicts: ``image`` (3, H, W) float in [-1, 1], ``label`` (shape class 0..C-1), ``texture`` (0..T-1),
``content`` (shape instance id), ``mask`` (H, W) int64 in {0, 1} and ``semantic`` (H, W) int64 in {0, 1..C}
(class + 1; a VOC mask's 255 "ignore" is kept as 255 in both).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gencore.data._robust import RobustItems
from gencore.data.datamodules import DataModule
from gencore.data.fashion_mnist import CLASS_NAMES as FASHION_MNIST_CLASSES
from gencore.data.fashion_mnist import load_fashion_mnist
from gencore.data.images import image_readable, load_image, to_model_range
from gencore.io import atomic_path
from gencore.progress import Progress

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TEXTURES",
    "OPENCV_DATA",
    "TEXTURES",
    "VOC_CLASSES",
    "CueConflict",
    "CueConflictDataModule",
    "FactorPairs",
    "StylizedFolder",
    "TextureSource",
    "load_texture",
    "silhouette",
    "write_dataset",
]

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


# ------------------------------------------------------------------------------------------------- texture bank


@dataclass(frozen=True)
class TextureSource:
    """Where a texture comes from: a scikit-image bundled image (``source="skimage"``, ``name`` = its loader) or an
    OpenCV sample image (``source="opencv"``, ``name`` = the file under :data:`OPENCV_DATA`), optionally cropped to
    ``box = (top, bottom, left, right)`` pixels of the original."""

    source: str
    name: str
    box: tuple[int, int, int, int] | None = None
    description: str = ""


# scikit-image loaders whose images ship inside the wheel (never the ones that download: brain, cells3d, eagle, ...)
_SKIMAGE_BUNDLED = frozenset(
    {"brick", "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "coffee", "chelsea", "astronaut"}
)

TEXTURES: dict[str, TextureSource] = {
    "brick": TextureSource("skimage", "brick", None, "brick wall, grayscale photo"),
    "grass": TextureSource("skimage", "grass", None, "grass blades, grayscale photo"),
    "gravel": TextureSource("skimage", "gravel", None, "gravel, grayscale photo"),
    "cells": TextureSource("skimage", "immunohistochemistry", None, "stained tissue cells (brown / blue)"),
    "stars": TextureSource("skimage", "hubble_deep_field", None, "Hubble deep field: dots on black"),
    "fur": TextureSource("opencv", "baboon.jpg", (200, 512, 0, 150), "baboon fur, yellow-green with white hairs"),
    "brushstrokes": TextureSource("opencv", "starry_night.jpg", (0, 300, 250, 752), "Starry Night sky strokes"),
    "fabric": TextureSource("opencv", "aloeL.jpg", (0, 500, 0, 400), "patterned fabric behind the aloe"),
    "circuit": TextureSource("opencv", "board.jpg", None, "green circuit board"),
    "facade": TextureSource("opencv", "building.jpg", (50, 400, 150, 700), "building facade, a grid of windows"),
}
# eight visually distinct ones (grass and facade stay available by name)
DEFAULT_TEXTURES: list[str] = ["brick", "gravel", "cells", "stars", "fur", "brushstrokes", "fabric", "circuit"]


def _unknown_texture(name: Any) -> ValueError:
    return ValueError(f"unknown texture {name!r}; known textures: {', '.join(TEXTURES)}")


def _as_uint8_rgb(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        if img.dtype.kind == "f":
            img = (np.clip(img, 0.0, 1.0) * 255.0).round()
        img = img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


@functools.cache
def load_texture(name: str) -> np.ndarray:
    """The texture ``name`` of :data:`TEXTURES` as (H, W, 3) uint8 RGB (grayscale photos repeated to 3 channels).

    Cached per process; treat the array as read-only. An unknown name raises ValueError listing the known ones; an
    OpenCV texture when the opencv-doc sample images are absent raises FileNotFoundError naming the file.
    """
    if name not in TEXTURES:
        raise _unknown_texture(name)
    src = TEXTURES[name]
    if src.source == "skimage":
        if src.name not in _SKIMAGE_BUNDLED:
            raise ValueError(
                f"texture {name!r}: skimage image {src.name!r} is not one of the bundled (offline) images "
                f"{sorted(_SKIMAGE_BUNDLED)}"
            )
        from skimage import data as skdata

        img = getattr(skdata, src.name)()
    elif src.source == "opencv":
        import cv2

        path = OPENCV_DATA / src.name
        if not path.is_file():
            raise FileNotFoundError(
                f"texture {name!r} needs the OpenCV sample image {path}, which is missing: `make data` installs it "
                "(the Debian package opencv-doc)"
            )
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"texture {name!r}: {path} exists but OpenCV cannot read it")
        img = bgr[..., ::-1]
    else:
        raise ValueError(f"texture {name!r}: source must be 'skimage' or 'opencv', got {src.source!r}")
    img = _as_uint8_rgb(img)
    if src.box is not None:
        top, bottom, left, right = src.box
        img = np.ascontiguousarray(img[top:bottom, left:right])
    img.setflags(write=False)
    return img


@functools.cache
def _texture_at(name: str, short_side: int) -> np.ndarray:
    """The texture resized (aspect kept) so its shorter side is ``short_side``: float32 (H, W, 3) in [0, 1]."""
    import cv2

    img = load_texture(name)
    h, w = img.shape[:2]
    s = short_side / min(h, w)
    size = (max(short_side, round(w * s)), max(short_side, round(h * s)))  # cv2 takes (width, height)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    out = cv2.resize(img, size, interpolation=interp).astype(np.float32) / 255.0
    out.setflags(write=False)
    return out


def _check_textures(textures: Sequence[str] | str | None, owner: str) -> list[str]:
    if isinstance(textures, str):  # one name given bare (textures=brick): a list of one, not its letters
        textures = [textures]
    names = list(DEFAULT_TEXTURES if textures is None else textures)
    for n in names:
        if n not in TEXTURES:
            raise ValueError(f"{owner}: textures: unknown texture {n!r}; known textures: {', '.join(TEXTURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: textures must be distinct, got {names}")
    if len(names) < 2:
        raise ValueError(f"{owner}: textures needs at least 2 textures (shape pairs need two), got {names}")
    return names


# -------------------------------------------------------------------------------------------------- silhouettes

_SUPERSAMPLE = 4  # silhouettes are cut at 4x resolution and area-averaged: an anti-aliased edge


def silhouette(item: np.ndarray, side: int, threshold: float = 0.08) -> np.ndarray:
    """A Fashion-MNIST item (28, 28) uint8 as a soft silhouette (side, side) float32 in [0, 1].

    The item is upsampled bilinearly (at 4x ``side``), thresholded at ``threshold`` of full intensity, its holes
    filled (``scipy.ndimage.binary_fill_holes``), then area-averaged down to ``side``: 1 inside, 0 outside, fractional
    on the edge. The hard mask is ``silhouette >= 0.5``.
    """
    import cv2
    from scipy.ndimage import binary_fill_holes

    if side < 1:
        raise ValueError(f"silhouette: side must be >= 1, got {side}")
    hi = side * _SUPERSAMPLE
    up = cv2.resize(item.astype(np.float32) / 255.0, (hi, hi), interpolation=cv2.INTER_LINEAR)
    solid = binary_fill_holes(up > threshold)
    return cv2.resize(solid.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)


# ------------------------------------------------------------------------------------------------- cue conflict

# stream tags: each kind of randomness draws from its own (seed, tag, ...) generator
_LAYOUT, _CROP, _TEX_CHOICE, _CONTENT_PICK = 1, 2, 3, 4
_BACKGROUNDS = ("gray", "dim")
_PAIRINGS = ("all", "class_texture")
_SPLITS = ("train", "test")
_TEXTURE_SCALE = 2.5  # a texture's shorter side is 2.5x the image side: a crop shows its structure, not one blob
_DIM_CONTRAST = 0.25


def _check_limit(limit: Any, owner: str) -> int | None:
    """``None`` or a positive int; ints given as strings (an interpolated config value) and "null" / "none" are read."""
    if isinstance(limit, str):
        text = limit.strip().lower()
        if text in ("", "null", "none"):
            return None
        try:
            limit = int(text)
        except ValueError:
            raise ValueError(f"{owner}: limit must be None or an int >= 1, got {limit!r}") from None
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ValueError(f"{owner}: limit must be None or an int >= 1, got {limit!r}")
    return int(limit)


def _check_seed(seed: Any, owner: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{owner}: seed must be an int >= 0, got {seed!r}")
    return int(seed)


def _check_cue_args(
    split: str,
    num_contents: int,
    textures: Sequence[str] | None,
    image_size: int,
    object_scale: Sequence[float],
    background: str,
    pairing: str,
    texture_consistency: float,
    seed: int,
    limit: Any,
    owner: str = "CueConflict",
) -> tuple[list[str], tuple[float, float], int | None]:
    if split not in _SPLITS:
        raise ValueError(f"{owner}: split must be one of {list(_SPLITS)}, got {split!r}")
    if isinstance(num_contents, bool) or not isinstance(num_contents, (int, np.integer)) or num_contents < 2:
        raise ValueError(
            f"{owner}: num_contents must be an int >= 2 (texture pairs need contents of two classes), "
            f"got {num_contents!r}"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"{owner}: image_size must be an int >= 16, got {image_size!r}")
    try:
        lo, hi = (float(v) for v in object_scale)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: object_scale must be a pair (lo, hi), got {object_scale!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"{owner}: object_scale must satisfy 0 < lo <= hi <= 1, got {object_scale!r}")
    if background not in _BACKGROUNDS:
        raise ValueError(f"{owner}: background must be one of {list(_BACKGROUNDS)}, got {background!r}")
    if pairing not in _PAIRINGS:
        raise ValueError(f"{owner}: pairing must be one of {list(_PAIRINGS)}, got {pairing!r}")
    try:
        consistency = None if isinstance(texture_consistency, bool) else float(texture_consistency)
    except (TypeError, ValueError):
        consistency = None
    if consistency is None or not 0.0 <= consistency <= 1.0:
        raise ValueError(f"{owner}: texture_consistency must be a number in [0, 1], got {texture_consistency!r}")
    _check_seed(seed, owner)
    names = _check_textures(textures, owner)
    return names, (lo, hi), _check_limit(limit, owner)


def _balanced_contents(labels: np.ndarray, num_contents: int, num_classes: int, seed: int, owner: str) -> np.ndarray:
    """Indices of ``num_contents`` items drawn class-balanced (classes differ by at most one), in a seeded order."""
    rng = np.random.default_rng([seed, _CONTENT_PICK])
    per_class = np.full(num_classes, num_contents // num_classes)
    per_class[rng.permutation(num_classes)[: num_contents % num_classes]] += 1
    picked = []
    for c in range(num_classes):
        pool = np.flatnonzero(labels == c)
        if per_class[c] > len(pool):
            raise ValueError(
                f"{owner}: num_contents={num_contents} needs {per_class[c]} items of class {c}, the split has "
                f"{len(pool)} (at most {len(pool) * num_classes} contents)"
            )
        picked.append(rng.choice(pool, size=per_class[c], replace=False))
    out = np.concatenate(picked)
    return out[rng.permutation(len(out))]


class CueConflict(Dataset):
    """Fashion-MNIST silhouettes filled with real textures: shape (class, content) and texture known per item.

    Args:
        split: Fashion-MNIST split the contents come from (``train`` or ``test``).
        num_contents: how many items (shapes) are drawn, class-balanced and seeded.
        textures: names from :data:`TEXTURES` (default :data:`DEFAULT_TEXTURES`).
        image_size: side of the square images (>= 16).
        object_scale: the silhouette's side as a fraction of the image side, drawn per content in this range.
        background: ``"gray"`` (flat mid-grey, 0 in [-1, 1]) or ``"dim"`` (the same texture crop at 1/4 contrast
            around mid-grey).
        pairing: ``"all"`` (SVOC-like: every content under every texture; item i = content i // T, texture i % T) or
            ``"class_texture"`` (one item per content, textured with its class's texture ``class % T`` with
            probability ``texture_consistency``, else a random other texture).
        texture_consistency: see ``pairing``; in [0, 1].
        seed: every draw (contents, layouts, texture crops, texture choice) comes from generators seeded by
            ``(seed, stream, ...)``: the same item for the same index and seed in every process.
        root: Fashion-MNIST folder (default: see :func:`gencore.data.fashion_mnist.find_fashion_mnist`).
        limit: keep at most this many items (debug runs).

    The texture image is resized so its shorter side is 2.5x ``image_size``; each (content, texture) shows a seeded
    crop of it (:meth:`texture_crop`). The object's edge is anti-aliased; ``mask`` is the hard mask (soft >= 0.5).
    """

    def __init__(
        self,
        split: str = "train",
        num_contents: int = 500,
        textures: Sequence[str] | None = None,
        image_size: int = 64,
        object_scale: Sequence[float] = (0.6, 0.95),
        background: str = "gray",
        pairing: str = "all",
        texture_consistency: float = 0.9,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        limit: int | None = None,
    ) -> None:
        names, scale, limit = _check_cue_args(
            split,
            num_contents,
            textures,
            image_size,
            object_scale,
            background,
            pairing,
            texture_consistency,
            seed,
            limit,
        )
        self.split, self.num_contents, self.image_size = split, int(num_contents), int(image_size)
        self.object_scale, self.background, self.pairing = scale, background, pairing
        self.texture_consistency, self.seed, self.limit = float(texture_consistency), int(seed), limit
        self.texture_names = names
        self.class_names = list(FASHION_MNIST_CLASSES)
        self.num_classes, self.num_textures = len(self.class_names), len(names)
        for name in names:  # a missing texture file is one clear error now, not a crash inside a worker
            load_texture(name)

        images, labels = load_fashion_mnist(root, split)
        picked = _balanced_contents(labels, self.num_contents, self.num_classes, self.seed, "CueConflict")
        self.source_indices = picked.astype(np.int64)  # Fashion-MNIST index of each content
        self.items = np.ascontiguousarray(images[picked])  # (N, 28, 28) uint8
        self.content_labels = labels[picked].astype(np.int64)  # class of each content

        T, N = self.num_textures, self.num_contents
        if pairing == "all":
            contents = np.repeat(np.arange(N, dtype=np.int64), T)
            textures_ = np.tile(np.arange(T, dtype=np.int64), N)
        else:
            contents = np.arange(N, dtype=np.int64)
            textures_ = np.array([self._class_texture(c) for c in range(N)], dtype=np.int64)
        if limit is not None:
            contents, textures_ = contents[:limit], textures_[:limit]
        self.contents, self.textures = contents, textures_
        self.labels = self.content_labels[contents]
        self._alpha_cache: dict[int, np.ndarray] = {}

    def _class_texture(self, content: int) -> int:
        T = self.num_textures
        own = int(self.content_labels[content]) % T
        rng = np.random.default_rng([self.seed, _TEX_CHOICE, content])
        if rng.random() < self.texture_consistency:
            return own
        other = int(rng.integers(0, T - 1))
        return other + (other >= own)  # uniform over the T - 1 other textures

    def __len__(self) -> int:
        return len(self.labels)

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return int(i) % n

    def layout(self, content: int) -> tuple[int, int, int]:
        """(side, top, left) of content ``content``'s silhouette in the image: fixed across its textures."""
        S = self.image_size
        rng = np.random.default_rng([self.seed, _LAYOUT, int(content)])
        lo, hi = self.object_scale
        side = min(S, max(4, round(S * rng.uniform(lo, hi))))
        top = int(rng.integers(0, S - side + 1))
        left = int(rng.integers(0, S - side + 1))
        return side, top, left

    def alpha(self, content: int) -> np.ndarray:
        """The soft silhouette of ``content`` placed in the image: (S, S) float32 in [0, 1] (cached)."""
        content = int(content)
        if content not in self._alpha_cache:
            S = self.image_size
            side, top, left = self.layout(content)
            canvas = np.zeros((S, S), np.float32)
            canvas[top : top + side, left : left + side] = silhouette(self.items[content], side)
            canvas.setflags(write=False)
            self._alpha_cache[content] = canvas
        return self._alpha_cache[content]

    def content_image(self, content: int) -> np.ndarray:
        """The plain content picture of ``content``: the Fashion-MNIST item's own grey levels in its silhouette's
        place on the grey background, (S, S, 3) float32 in [0, 1] -- what AdaIN stylises
        (:class:`shapebias.adain.AdaINStylized`), as the paper stylises VOC photographs."""
        content = int(content)
        S = self.image_size
        side, top, left = self.layout(content)
        item = torch.from_numpy(self.items[content].astype(np.float32) / 255.0)[None, None]
        item = torch.nn.functional.interpolate(item, size=(side, side), mode="bilinear", align_corners=False)[0, 0]
        grey = np.full((S, S), 0.5, np.float32)
        grey[top : top + side, left : left + side] = item.clamp(0, 1).numpy()
        a = self.alpha(content)
        picture = a * grey + (1.0 - a) * 0.5
        return np.repeat(picture[..., None], 3, axis=2)

    def texture_crop(self, i: int) -> np.ndarray:
        """The texture crop that fills item ``i``: (S, S, 3) float32 in [0, 1], seeded by (seed, content, texture)."""
        i = self._index(i)
        c, t = int(self.contents[i]), int(self.textures[i])
        S = self.image_size
        tex = _texture_at(self.texture_names[t], round(_TEXTURE_SCALE * S))
        rng = np.random.default_rng([self.seed, _CROP, c, t])
        top = int(rng.integers(0, tex.shape[0] - S + 1))
        left = int(rng.integers(0, tex.shape[1] - S + 1))
        return tex[top : top + S, left : left + S].copy()

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self._index(i)
        c, label = int(self.contents[i]), int(self.labels[i])
        a = self.alpha(c)[..., None]  # (S, S, 1)
        crop = self.texture_crop(i)  # (S, S, 3)
        if self.background == "gray":
            bg = np.float32(0.5)
        else:
            bg = 0.5 + _DIM_CONTRAST * (crop - crop.mean(axis=(0, 1), keepdims=True))
        img = a * crop + (1.0 - a) * bg  # (S, S, 3) in [0, 1]
        image = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1).mul(2.0).sub(1.0)
        mask = torch.from_numpy((a[..., 0] >= 0.5).astype(np.int64))
        return {
            "image": image.contiguous(),
            "label": label,
            "texture": int(self.textures[i]),
            "content": c,
            "mask": mask,
            "semantic": mask * (label + 1),
        }


# ---------------------------------------------------------------------------------------------- official folder

_NAME_RE = re.compile(r"^(\d+)_(\d+)_(.+)$")
_FOLDER_EXTS = (".jpg", ".jpeg", ".png")
_IGNORE = 255
INDEX_NAME = "index.json"


class StylizedFolder(RobustItems, Dataset):
    """A folder of stylised images named as the official generator writes them: ``<texIdx>_<cls>_<imgid>.<ext>``
    (``imgid`` may hold underscores, e.g. ``0_12_2008_000123.jpg``).

    Labels are the ``cls`` values remapped to 0..C-1 (sorted), textures the ``texIdx`` values remapped to 0..T-1,
    contents one id per distinct ``imgid`` (sorted). When the folder holds the ``index.json`` that
    :func:`write_dataset` writes, its class / texture names are used and ids are kept as written (``label = cls - 1``,
    ``texture = texIdx``, ``content = int(imgid)``), so a written dataset reads back exactly. Without it, class names
    are VOC's when every ``cls`` is in 1..20.

    ``masks``: a folder of ``<imgid>.png`` (VOC palette or index PNGs: 0 background, 255 ignore, k = class ``k``);
    default ``root/masks`` when it exists, ``False`` for none. Items then carry ``mask`` and ``semantic`` (255 kept).
    Images are resized to ``image_size`` squared (as the official loader's ``cv2.resize``), RGB, in [-1, 1]; masks
    with nearest neighbour. Files whose header does not read are skipped and counted at construction
    (``num_skipped``); a file that fails later is replaced by a seeded random readable item (gencore's RobustItems).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 64,
        masks: str | os.PathLike | bool | None = None,
        limit: int | None = None,
        verify: str = "header",
        seed: int = 0,
    ) -> None:
        owner = f"StylizedFolder({root})"
        self._init_robust(owner, _check_seed(seed, "StylizedFolder"))
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"StylizedFolder: {self.root} is not a folder")
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(f"StylizedFolder: image_size must be an int >= 1, got {image_size!r}")
        if verify not in ("none", "header"):
            raise ValueError(f"StylizedFolder: verify must be 'none' or 'header', got {verify!r}")
        limit = _check_limit(limit, "StylizedFolder")
        self.image_size = int(image_size)

        parsed = []
        for p in sorted(self.root.iterdir()):
            m = _NAME_RE.match(p.stem)
            if p.is_file() and p.suffix.lower() in _FOLDER_EXTS and m:
                parsed.append((p, int(m.group(1)), int(m.group(2)), m.group(3)))
        if not parsed:
            raise FileNotFoundError(
                f"StylizedFolder: no files named <texIdx>_<cls>_<imgid>.(jpg|jpeg|png) in {self.root}"
            )
        if limit is not None:
            parsed = parsed[:limit]
        if verify == "header":
            parsed = [row for row in parsed if self._readable(row[0])]
            if not parsed:
                raise FileNotFoundError(f"StylizedFolder: none of the image files in {self.root} is readable")
        self.paths = [row[0] for row in parsed]
        tex_raw = np.array([row[1] for row in parsed], dtype=np.int64)
        cls_raw = np.array([row[2] for row in parsed], dtype=np.int64)
        self.image_ids = [row[3] for row in parsed]

        index = self._read_index()
        if index is not None:
            self.class_names = [str(n) for n in index["class_names"]]
            self.texture_names = [str(n) for n in index["texture_names"]]
            self.labels, self.textures = cls_raw - 1, tex_raw
            bad = [
                f"{p.name}"
                for p, lab, tex in zip(self.paths, self.labels, self.textures)
                if not (0 <= lab < len(self.class_names) and 0 <= tex < len(self.texture_names))
            ]
            if bad:
                raise ValueError(
                    f"StylizedFolder: {len(bad)} file(s) name a class or texture outside {self.root / INDEX_NAME} "
                    f"({len(self.class_names)} classes, {len(self.texture_names)} textures), e.g. {bad[0]}"
                )
            self._cls_values = np.arange(1, len(self.class_names) + 1)
        else:
            self._cls_values = np.unique(cls_raw)
            tex_values = np.unique(tex_raw)
            self.labels = np.searchsorted(self._cls_values, cls_raw).astype(np.int64)
            self.textures = np.searchsorted(tex_values, tex_raw).astype(np.int64)
            voc = bool(np.all((self._cls_values >= 1) & (self._cls_values <= len(VOC_CLASSES))))
            self.class_names = [VOC_CLASSES[c - 1] if voc else str(c) for c in self._cls_values]
            self.texture_names = [f"texture{t}" for t in tex_values]
        uniq_ids = sorted(set(self.image_ids))
        if index is not None and all(s.isdigit() for s in uniq_ids):
            self.contents = np.array([int(s) for s in self.image_ids], dtype=np.int64)
        else:
            rank = {s: k for k, s in enumerate(uniq_ids)}
            self.contents = np.array([rank[s] for s in self.image_ids], dtype=np.int64)
        self.num_classes, self.num_textures = len(self.class_names), len(self.texture_names)
        # VOC class value k -> semantic value label + 1 (values of no class here become ignore)
        self._lut = np.full(256, _IGNORE, dtype=np.int64)
        self._lut[0] = 0
        for lab, k in enumerate(self._cls_values):
            if 0 < k < 255:
                self._lut[k] = lab + 1

        self.mask_dir = self._mask_dir(masks)
        if self.mask_dir is not None:
            missing = sorted({s for s in self.image_ids if not (self.mask_dir / f"{s}.png").is_file()})
            if missing:
                raise FileNotFoundError(
                    f"StylizedFolder: {len(missing)} image id(s) have no mask <imgid>.png in {self.mask_dir}, e.g. "
                    f"{missing[0]}.png (pass masks=False to read images only)"
                )

    def _read_index(self) -> dict[str, Any] | None:
        path = self.root / INDEX_NAME
        if not path.is_file():
            return None
        try:
            index = json.loads(path.read_text())
            if not isinstance(index.get("class_names"), list) or not isinstance(index.get("texture_names"), list):
                raise ValueError("class_names and texture_names must be lists")
        except (OSError, ValueError) as err:
            raise ValueError(f"StylizedFolder: {path} is not a valid index ({err})") from err
        return index

    def _mask_dir(self, masks: str | os.PathLike | bool | None) -> Path | None:
        if masks is False:
            return None
        if masks is None or masks is True:
            folder = self.root / "masks"
            if masks is True and not folder.is_dir():
                raise FileNotFoundError(f"StylizedFolder: masks=True but {folder} is not a folder")
            return folder if folder.is_dir() else None
        folder = Path(masks)
        if not folder.is_dir():
            raise FileNotFoundError(f"StylizedFolder: masks folder {folder} is not a folder")
        return folder

    def _readable(self, path: Path) -> bool:
        return image_readable(path, self.skip_log)

    def _num_items(self) -> int:
        return len(self.paths)

    def _item_path(self, i: int) -> str:
        return str(self.paths[i])

    def _load_item(self, i: int) -> dict[str, Any]:
        import cv2

        S = self.image_size
        arr = load_image(self.paths[i], 3)
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float32) / 257.0).round().astype(np.uint8)
        if arr.shape[:2] != (S, S):
            interp = cv2.INTER_AREA if min(arr.shape[:2]) > S else cv2.INTER_LINEAR
            arr = cv2.resize(arr, (S, S), interpolation=interp)
        label = int(self.labels[i])
        item: dict[str, Any] = {
            "image": to_model_range(np.ascontiguousarray(arr)),
            "label": label,
            "texture": int(self.textures[i]),
            "content": int(self.contents[i]),
        }
        if self.mask_dir is not None:
            from PIL import Image

            path = self.mask_dir / f"{self.image_ids[i]}.png"
            try:
                with Image.open(path) as im:
                    raw = np.array(im)  # palette PNGs give their indices
            except (OSError, ValueError, SyntaxError) as err:
                raise OSError(f"mask {path}: {err}") from err
            if raw.ndim != 2 or raw.dtype != np.uint8:
                raise ValueError(f"mask {path}: expected a palette or 8-bit index PNG, got {raw.shape} {raw.dtype}")
            if raw.shape != (S, S):
                raw = cv2.resize(raw, (S, S), interpolation=cv2.INTER_NEAREST)
            semantic = torch.from_numpy(self._lut[raw])
            item["semantic"] = semantic
            item["mask"] = torch.where(semantic == _IGNORE, semantic, (semantic > 0).long())
        return item


# ------------------------------------------------------------------------------------------------- factor pairs

_SAMPLINGS = ("uniform", "official")


class FactorPairs(Dataset):
    """Pairs that share shape (factor 0) or texture (factor 1), over any dataset exposing ``labels``, ``textures``
    and ``contents`` arrays (partners are chosen from those arrays; only the two items of a pair are loaded).

    Item ``i``: example 1 is ``dataset[i]``; the factor and the partner are drawn from a ``(seed, i)`` generator.
    factor 0 (shape): the same content under a different texture; factor 1 (texture): the same texture on a content
    of a different class, uniformly among all such items. ``sampling="uniform"``: factor ~ Uniform{0, 1} (the fixed
    version); ``"official"``: factor ~ randint(0, 3) inclusive as released, every value != 0 takes the texture branch
    and keeps its value (2 and 3 then only enter the estimator's total variance).

    Raises ValueError at construction when the dataset cannot give a pair for every item (one texture, one class, a
    content seen under a single texture, or a texture whose items are all of one class).
    """

    def __init__(self, dataset: Dataset, seed: int = 0, sampling: str = "uniform") -> None:
        if sampling not in _SAMPLINGS:
            raise ValueError(f"FactorPairs: sampling must be one of {list(_SAMPLINGS)}, got {sampling!r}")
        for attr in ("labels", "textures", "contents"):
            if not hasattr(dataset, attr):
                raise ValueError(f"FactorPairs: the dataset ({type(dataset).__name__}) has no {attr!r} array")
        self.dataset, self.seed, self.sampling = dataset, _check_seed(seed, "FactorPairs"), sampling
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.textures = np.asarray(dataset.textures, dtype=np.int64)
        self.contents = np.asarray(dataset.contents, dtype=np.int64)
        n = len(self.labels)
        if not n == len(self.textures) == len(self.contents) == len(dataset):  # type: ignore[arg-type]
            raise ValueError(
                f"FactorPairs: labels / textures / contents / dataset lengths differ: {len(self.labels)}, "
                f"{len(self.textures)}, {len(self.contents)}, {len(dataset)}"  # type: ignore[arg-type]
            )
        if len(np.unique(self.textures)) < 2:
            raise ValueError("FactorPairs: the dataset has a single texture; shape pairs need two textures per content")
        if len(np.unique(self.labels)) < 2:
            raise ValueError("FactorPairs: the dataset has a single class; texture pairs need two classes")
        # shape partners: items of the same content (sorted by content, as slices)
        order = np.argsort(self.contents, kind="stable")
        uniq, start, count = np.unique(self.contents[order], return_index=True, return_counts=True)
        self._by_content = {int(c): order[s : s + k] for c, s, k in zip(uniq, start, count)}
        single = [int(c) for c, idx in self._by_content.items() if len(np.unique(self.textures[idx])) < 2]
        if single:
            raise ValueError(
                f"FactorPairs: {len(single)} content(s) appear under a single texture (e.g. content {single[0]}), so "
                "they have no shape partner; use pairing='all' (and a limit that is a multiple of the texture count)"
            )
        # texture partners: items of the same texture
        self._by_texture = {int(t): np.flatnonzero(self.textures == t) for t in np.unique(self.textures)}
        lonely = [t for t, idx in self._by_texture.items() if len(np.unique(self.labels[idx])) < 2]
        if lonely:
            raise ValueError(
                f"FactorPairs: texture(s) {lonely} appear on a single class only, so their items have no texture "
                "partner of a different class"
            )
        self.class_names = getattr(dataset, "class_names", None)
        self.texture_names = getattr(dataset, "texture_names", None)

    def __len__(self) -> int:
        return len(self.labels)

    def factor_and_partner(self, i: int) -> tuple[int, int]:
        """(factor, index of example 2) for item ``i``: no image is loaded."""
        rng = np.random.default_rng([self.seed, int(i)])
        factor = int(rng.integers(0, 2 if self.sampling == "uniform" else 4))
        if factor == 0:
            same = self._by_content[int(self.contents[i])]
            cand = same[self.textures[same] != self.textures[i]]
        else:
            same = self._by_texture[int(self.textures[i])]
            cand = same[self.labels[same] != self.labels[i]]
        return factor, int(cand[rng.integers(0, len(cand))])

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i = int(i) % n
        factor, j = self.factor_and_partner(i)
        a, b = self.dataset[i], self.dataset[j]
        return {
            "factor": factor,
            "example1": a["image"],
            "example2": b["image"],
            "class1": int(a["label"]),
            "class2": int(b["label"]),
            "texture1": int(a["texture"]),
            "texture2": int(b["texture"]),
            "content1": int(a["content"]),
            "content2": int(b["content"]),
        }


# -------------------------------------------------------------------------------------------------- datamodules


class CueConflictDataModule(DataModule):
    """:class:`CueConflict` for training and evaluation: ``num_contents`` Fashion-MNIST train items for training,
    ``val_contents`` test items for validation (same textures and settings). ``pairs`` (``"uniform"`` or
    ``"official"``) wraps both splits in :class:`FactorPairs` (for the dimensionality estimate). ``limit`` caps both
    splits (None, an int, or the value of ``${oc.select:debug_limit,null}``). Loader options (``shuffle``,
    ``drop_last``, ``val_batch_size``, ...) pass on to :class:`gencore.data.DataModule`."""

    def __init__(
        self,
        num_contents: int = 500,
        val_contents: int = 100,
        textures: Sequence[str] | None = None,
        image_size: int = 64,
        pairing: str = "all",
        texture_consistency: float = 0.9,
        background: str = "gray",
        object_scale: Sequence[float] = (0.6, 0.95),
        batch_size: int = 32,
        num_workers: int = 0,
        limit: int | str | None = None,
        seed: int = 0,
        root: str | os.PathLike | None = None,
        pairs: str | None = None,
        **loader_kwargs: Any,
    ) -> None:
        if isinstance(textures, str):
            textures = [textures]
        textures = None if textures is None else [str(t) for t in textures]
        object_scale = tuple(float(v) for v in object_scale)
        _, _, limit = _check_cue_args(
            "train", num_contents, textures, image_size, object_scale, background, pairing,
            texture_consistency, seed, limit, owner="CueConflictDataModule",
        )  # fmt: skip
        _check_cue_args(
            "test", val_contents, textures, image_size, object_scale, background, pairing,
            texture_consistency, seed, None, owner="CueConflictDataModule (val_contents)",
        )  # fmt: skip
        if pairs is not None and pairs not in _SAMPLINGS:
            raise ValueError(f"CueConflictDataModule: pairs must be None or one of {list(_SAMPLINGS)}, got {pairs!r}")
        common = dict(
            textures=textures,
            image_size=image_size,
            object_scale=object_scale,
            background=background,
            pairing=pairing,
            texture_consistency=texture_consistency,
            seed=seed,
            root=root,
            limit=limit,
        )

        def wrap(ds: Dataset) -> Dataset:
            return ds if pairs is None else FactorPairs(ds, seed=seed, sampling=pairs)

        super().__init__(
            train=lambda: wrap(CueConflict(split="train", num_contents=num_contents, **common)),
            val=lambda: wrap(CueConflict(split="test", num_contents=val_contents, **common)),
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            **loader_kwargs,
        )
        self.image_size, self.channels = image_size, 3  # what gencore.validate.check_fits compares
        self.num_classes = len(FASHION_MNIST_CLASSES)
        self.num_textures = len(_check_textures(textures, "CueConflictDataModule"))


# ------------------------------------------------------------------------------------------------------- writer


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    x = image.detach().float().cpu().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(1, 2, 0).numpy())


def _write_encoded(path: Path, arr: np.ndarray, ext: str) -> None:
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext in ("jpg", "jpeg") else []
    ok, buf = cv2.imencode(f".{ext}", arr, params)
    if not ok:
        raise ValueError(f"write_dataset: OpenCV cannot encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def write_dataset(dataset: Dataset, out_dir: str | os.PathLike, *, ext: str = "png") -> Path:
    """Write every item of ``dataset`` as ``<texture>_<label + 1>_<content:06d>.<ext>`` (the official SVOC naming,
    classes 1-based as VOC), masks as ``masks/<content:06d>.png`` (0 background, class + 1 inside; from the item's
    ``semantic``, once per content) and ``index.json`` (class and texture names, counts). Every file is written
    atomically (complete or absent). Returns ``out_dir``; :class:`StylizedFolder` reads it back with the same
    labels, textures and contents.
    """
    ext = ext.lower().lstrip(".")
    if ext not in ("png", "jpg", "jpeg"):
        raise ValueError(f"write_dataset: ext must be 'png', 'jpg' or 'jpeg', got {ext!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("write_dataset: the dataset is empty")
    progress = Progress("write_dataset", n, unit="image")
    masks_written: set[int] = set()
    labels, textures, contents = [], [], []
    for i in range(n):
        item = dataset[i]
        label, tex, content = int(item["label"]), int(item["texture"]), int(item["content"])
        if label < 0 or tex < 0 or content < 0:
            raise ValueError(f"write_dataset: item {i} has a negative label / texture / content: {label, tex, content}")
        rgb = _to_uint8_hwc(item["image"])
        _write_encoded(out / f"{tex}_{label + 1}_{content:06d}.{ext}", rgb[..., ::-1], ext)
        if "semantic" in item and content not in masks_written:
            sem = item["semantic"].detach().cpu().numpy()
            if sem.min() < 0 or sem.max() > 255:
                raise ValueError(f"write_dataset: item {i}: semantic values outside 0..255")
            _write_encoded(out / "masks" / f"{content:06d}.png", sem.astype(np.uint8), "png")
            masks_written.add(content)
        labels.append(label)
        textures.append(tex)
        contents.append(content)
        progress.update(i + 1)
    class_names = list(getattr(dataset, "class_names", None) or [str(c + 1) for c in range(max(labels) + 1)])
    texture_names = list(getattr(dataset, "texture_names", None) or [str(t) for t in range(max(textures) + 1)])
    index = {
        "format": "<texture>_<label+1>_<content:06d>." + ext,
        "class_names": class_names,
        "texture_names": texture_names,
        "num_items": n,
        "num_contents": len(set(contents)),
        "items_per_class": np.bincount(labels, minlength=len(class_names)).tolist(),
        "items_per_texture": np.bincount(textures, minlength=len(texture_names)).tolist(),
        "masks": bool(masks_written),
    }
    with atomic_path(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=2) + "\n")
    return out
