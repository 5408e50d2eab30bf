"""Training and evaluation data: keyframe-guided inpainting samples made from real photos, and masked video clips.

**Photos** (:func:`real_photos`): the natural RGB photos scikit-image ships (gencore's ``SKIMAGE_PHOTOS``) and a fixed
list of natural colour photos among the OpenCV sample images (:data:`OPENCV_PHOTOS`, from the Debian ``opencv-doc``
package; calibration boards, text, logos, drawings, grayscale images and the second image of stereo / flow pairs are
left out). Missing or unreadable files are skipped and counted (``.skipped``). The split is fixed by name:
:data:`VAL_PHOTOS` (6 of the 29 photos, ~20%) are validation photos, the rest training photos; a name not in the
default pool is assigned by ``crc32(name) % 5 == 0`` -> val (:func:`photo_split`).

**Keyframe samples** (:class:`KeyframeImages`) follow the official ``LamaGI``
(``gi/data/inpainting_lama_multiframe.py``, ``transform_variant: distortions``) scaled from its 256 px frames to
``size`` = S:

1. shared, once per sample (the official ``ReplayCompose``): a square crop of side ``U(0.35, 1) * min(H, W)`` of the
   photo resized to M x M with ``M = S + max_shift`` (``max_shift`` = 200 * S / 256, so M = 456 at S = 256, the
   official PadIfNeeded / RandomCrop 456; the official code crops 456 px of a Places photo without resizing, our few
   photos are cropped at random scales instead), horizontal flip (p 0.5), CLAHE (p 0.5, clip 1-4, 8 x 8 tiles, on
   the L channel of Lab), RandomBrightnessContrast 0.2 (p 0.5) and HueSaturationValue (5, 30, 5) (p 0.5), all
   albumentations' uint8 formulas;
2. per frame (the target and each keyframe, independently): a perspective jitter (p 0.5; corners moved inwards by
   ``|N(0, sigma)|`` of the side, ``sigma ~ U(0, 0.06)``, as imgaug's ``PerspectiveTransform(keep_size=True)``), an
   affine map about the centre (p 0.5; scale x and y each U(0.7, 1.3), rotation U(-40, 40) degrees, shear
   U(-0.1, 0.1) *degrees* per axis: imgaug's unit, so the official shear is negligible), an optical (barrel /
   pincushion) distortion (p 0.5; albumentations' ``OpticalDistortion``, k ~ U(-0.05, 0.05), its rounded-away
   centre shift left out), then an S x S crop at a random position in the M x M frame (``crop_range`` = 1, as the
   official RandomCrop; smaller values keep the crop near the centre), then the tiny colour jitter
   (brightness / contrast 0.01, saturation 3, value 1; p 0.5 each). The three warps are composed into one
   ``cv2.remap`` (one resampling instead of three; bilinear) with ``BORDER_REFLECT_101`` (imgaug's ``"reflect"``, the
   official affine border; the official perspective uses ``replicate``, which its inward corners never reach);
3. ``easy=True``: only the shared part with ``max_shift`` = 25 * S / 256 and a per-frame random S x S crop of it
   (a shift of up to ``max_shift`` px), as the official easy variant;
4. masks: drawn independently for the target and each keyframe by ``masks`` (default :class:`~.masks.MixedMasks`:
   LaMa's mixed irregular / box masks, scaled to S).

Items: ``{"image": (3, S, S), "mask": (1, S, S), "srcs": (T, 3, S, S), "srcs_masks": (T, 1, S, S)}``, images float32
in [0, 1], masks {0, 1} with 1 = hole (T = ``n_references``).

Determinism: an item is a pure function of ``(seed, index)`` with ``fresh=False`` (validation), and of
``(seed, epoch, index)`` with ``fresh=True`` (training), ``epoch`` set by :meth:`KeyframeImages.set_epoch`. The
epoch lives in a shared-memory tensor, so persistent DataLoader workers see a ``set_epoch`` made in the main process;
:class:`KeyframeDataModule` forwards the sampler's epoch (which Lightning sets, also when resuming) to the dataset.
Items never depend on the worker that makes them.

**Video clips** (:class:`VideoInpaintClips`): clips of the OpenCV sample videos with moving holes
(:func:`~.masks.moving_masks`). Each video is split in time: ``'train'`` = its first 70% of frames, ``'val'`` = the
last 30% (:func:`split_range`), so the two splits never share a frame. :func:`video_frames` gives single frames of a
split as photos, so the image model can train on the training segment of the videos the video evaluation uses.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gencore.data._robust import DataReadError, RobustItems
from gencore.data.datamodules import DataModule
from gencore.data.images import IMAGE_EXTENSIONS, SKIMAGE_PHOTOS, _skimage_photo, load_image, resize_center_crop
from gencore.data.video import OPENCV_SAMPLES, opencv_sample_videos, read_frames, video_files, video_info
from gencore.resume import ResumableSampler
from twostream_inpaint.masks import MOVING_KINDS, MixedMasks, moving_masks

__all__ = [
    "OPENCV_PHOTOS",
    "TRAIN_FRACTION",
    "VAL_PHOTOS",
    "KeyframeDataModule",
    "KeyframeImages",
    "PhotoList",
    "VideoInpaintClips",
    "load_photos",
    "photo_split",
    "real_photos",
    "split_range",
    "video_frames",
]

# Natural colour photos among the opencv-doc sample images (one image of each stereo / flow pair).
OPENCV_PHOTOS = (
    "fruits.jpg",
    "baboon.jpg",
    "messi5.jpg",
    "butterfly.jpg",
    "building.jpg",
    "home.jpg",
    "starry_night.jpg",
    "aloeL.jpg",
    "graf1.png",
    "leuvenA.jpg",
    "rubberwhale1.png",
    "aero1.jpg",
    "apple.jpg",
    "orange.jpg",
    "squirrel_cls.jpg",
    "chicky_512.png",
    "stuff.jpg",
    "board.jpg",
    "ela_original.jpg",
    "smarties.png",
)
# The held-out validation photos (names as real_photos gives them); everything else of the default pool is training.
VAL_PHOTOS = frozenset(
    {
        "skimage:chelsea",
        "skimage:rocket",
        "opencv:home.jpg",
        "opencv:butterfly.jpg",
        "opencv:squirrel_cls.jpg",
        "opencv:leuvenA.jpg",
    }
)
_DEFAULT_POOL = frozenset({f"skimage:{n}" for n in SKIMAGE_PHOTOS} | {f"opencv:{n}" for n in OPENCV_PHOTOS})
TRAIN_FRACTION = 0.7
SPLITS = ("train", "val")

Photo = tuple[str, np.ndarray]


class PhotoList(list):
    """A list of ``(name, (H, W, 3) uint8 RGB)`` photos with ``skipped``: ``{name or path: reason}`` of the files
    that were missing or unreadable."""

    def __init__(self, items: Sequence[Photo] = (), skipped: dict[str, str] | None = None) -> None:
        super().__init__(items)
        self.skipped: dict[str, str] = dict(skipped or {})

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self]


def _check_split(split: str | None, allow_none: bool = True) -> None:
    if split not in SPLITS and not (allow_none and split is None):
        raise ValueError(f"split must be one of {SPLITS}{' or None' if allow_none else ''}, got {split!r}")


def photo_split(name: str) -> str:
    """``'train'`` or ``'val'`` for a photo name: :data:`VAL_PHOTOS` for the default pool, otherwise
    ``crc32(name) % 5 == 0`` -> ``'val'`` (about 20%, fixed by the name alone)."""
    if name in _DEFAULT_POOL:
        return "val" if name in VAL_PHOTOS else "train"
    return "val" if zlib.crc32(name.encode()) % 5 == 0 else "train"


def _as_rgb8(img: np.ndarray, what: str) -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) uint8 / uint16 image -> a read-only contiguous (H, W, 3) uint8 array."""
    img = np.asarray(img)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 or uint16 pixels, got {img.dtype}")
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4) or min(img.shape[:2]) < 1:
        raise ValueError(f"{what}: expected an (H, W, 3) image, got shape {img.shape}")
    img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]
    img = np.ascontiguousarray(img)
    img.setflags(write=False)
    return img


def _shrink(img: np.ndarray, short: int | None) -> np.ndarray:
    """Downscale (area) so the short side is ``short`` when it is longer; never upscales."""
    h, w = img.shape[:2]
    if short is None or min(h, w) <= short:
        return img
    s = short / min(h, w)
    out = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=8)
def _load_real_photos(size: int | None, opencv_dir: str) -> tuple[tuple[Photo, ...], tuple[tuple[str, str], ...]]:
    photos: list[Photo] = []
    skipped: dict[str, str] = {}
    for name in SKIMAGE_PHOTOS:
        try:
            photos.append((f"skimage:{name}", _shrink(_as_rgb8(_skimage_photo(name), name), size)))
        except (OSError, ValueError) as err:  # pragma: no cover - a broken scikit-image install
            skipped[f"skimage:{name}"] = f"{type(err).__name__}: {err}"
    folder = Path(opencv_dir)
    for name in OPENCV_PHOTOS:
        path = folder / name
        if not path.is_file():
            skipped[f"opencv:{name}"] = f"missing: {path}"
            continue
        try:
            photos.append((f"opencv:{name}", _shrink(_as_rgb8(load_image(path), str(path)), size)))
        except (OSError, ValueError, SyntaxError) as err:
            skipped[f"opencv:{name}"] = f"unreadable {path}: {type(err).__name__}: {err}"
    return tuple(photos), tuple(skipped.items())


def real_photos(
    size: int | None = None, opencv_dir: str | os.PathLike | None = None, split: str | None = None
) -> PhotoList:
    """The default photo pool: ``[(name, (H, W, 3) uint8 RGB), ...]`` (names ``skimage:<name>`` / ``opencv:<file>``).

    ``size``: photos whose short side is longer are downscaled (area) to it; None keeps them as they are.
    ``opencv_dir``: where the OpenCV sample images are (default the opencv-doc package's data folder).
    ``split``: ``'train'`` / ``'val'`` (:data:`VAL_PHOTOS`) or None for all. Missing or unreadable files are skipped:
    ``result.skipped`` names them with the reason (one warning sums them up). Loaded once per process and cached.
    """
    _check_split(split)
    if size is not None and size < 1:
        raise ValueError(f"real_photos: size must be positive or None, got {size}")
    folder = os.fspath(opencv_dir) if opencv_dir is not None else os.fspath(OPENCV_SAMPLES)
    photos, skipped = _load_real_photos(size, folder)
    if skipped:
        unreadable = [k for k, v in skipped if not v.startswith("missing")]
        warnings.warn(
            f"real_photos: {len(skipped)} of {len(SKIMAGE_PHOTOS) + len(OPENCV_PHOTOS)} photos skipped "
            f"({len(skipped) - len(unreadable)} missing from {folder}"
            + (f", unreadable: {', '.join(unreadable)}" if unreadable else "")
            + "); install the Debian package opencv-doc for the OpenCV samples",
            RuntimeWarning,
            stacklevel=2,
        )
    chosen = [p for p in photos if split is None or photo_split(p[0]) == split]
    return PhotoList(chosen, dict(skipped))


def load_photos(source: str | os.PathLike | Sequence[Any], size: int | None = None) -> PhotoList:
    """Photos from a folder (its image files, recursively, sorted), a list of image paths, or a list of
    ``(name, array)`` pairs (as :func:`real_photos` gives). Unreadable files are skipped and counted (``skipped``);
    a path that does not exist is skipped as well. ``size`` as in :func:`real_photos`."""
    items: list[Any]
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"load_photos: {root} does not exist")
        exts = tuple(IMAGE_EXTENSIONS)
        items = (
            sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts) if root.is_dir() else [root]
        )
    else:
        items = list(source)
    out = PhotoList()
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], np.ndarray):
            name, img = item
            out.append((str(name), _shrink(_as_rgb8(img, str(name)), size)))
            continue
        path = Path(item)
        try:
            out.append((str(path), _shrink(_as_rgb8(load_image(path), str(path)), size)))
        except (OSError, ValueError, SyntaxError) as err:
            out.skipped[str(path)] = f"{type(err).__name__}: {err}"
            warnings.warn(f"load_photos: skipping unreadable image {path}: {err}", RuntimeWarning, stacklevel=2)
    return out


def split_range(num_frames: int, split: str, train_fraction: float = TRAIN_FRACTION) -> tuple[int, int]:
    """Frame range ``[start, end)`` of a video's split: ``'train'`` = the first ``floor(train_fraction * n)``
    frames, ``'val'`` = the rest. The two never share a frame."""
    _check_split(split, allow_none=False)
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    cut = math.floor(train_fraction * num_frames)
    return (0, cut) if split == "train" else (cut, num_frames)


@functools.lru_cache(maxsize=8)
def _load_video_frames(
    split: str, size: int | None, every: int, max_per_video: int | None, paths: tuple[str, ...], train_fraction: float
) -> tuple[tuple[Photo, ...], tuple[tuple[str, str], ...]]:
    photos: list[Photo] = []
    skipped: dict[str, str] = {}
    for path in paths:
        try:
            info = video_info(path)
            start, end = split_range(info.num_frames, split, train_fraction)
            idx = list(range(start, end, every))
            if max_per_video is not None and len(idx) > max_per_video:
                idx = [idx[round(k)] for k in np.linspace(0, len(idx) - 1, max_per_video)]
            if not idx:
                skipped[path] = f"no frame in its {split} range [{start}, {end})"
                continue
            frames = read_frames(path, idx, backend=info.backend)
        except (OSError, ValueError, RuntimeError) as err:
            skipped[path] = f"{type(err).__name__}: {err}"
            continue
        for i, frame in zip(idx, frames, strict=True):
            photos.append((f"video:{Path(path).name}#{i:06d}", _shrink(_as_rgb8(frame, path), size)))
    return tuple(photos), tuple(skipped.items())


def video_frames(
    split: str = "train",
    size: int | None = 256,
    every: int = 30,
    max_per_video: int | None = 8,
    paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    train_fraction: float = TRAIN_FRACTION,
) -> PhotoList:
    """Single frames of the videos' ``split`` segment (:func:`split_range`) as photos for :class:`KeyframeImages`.

    Every ``every``-th frame of the segment, at most ``max_per_video`` per video (evenly spread), downscaled to short
    side ``size``; names ``video:<file>#<frame>``. Default videos: the opencv-doc samples (FileNotFoundError when
    the package is absent). Unreadable videos are skipped and counted (``skipped``). Cached per process.
    """
    _check_split(split, allow_none=False)
    if every < 1:
        raise ValueError(f"video_frames: every must be >= 1, got {every}")
    if max_per_video is not None and max_per_video < 1:
        raise ValueError(f"video_frames: max_per_video must be >= 1 or None, got {max_per_video}")
    files = tuple(str(p) for p in video_files(paths))
    photos, skipped = _load_video_frames(split, size, every, max_per_video, files, float(train_fraction))
    for path, reason in skipped:
        warnings.warn(f"video_frames: skipping {path}: {reason}", RuntimeWarning, stacklevel=2)
    return PhotoList(photos, dict(skipped))


# ---------------------------------------------------------------------------------------------------------------------
# colour and geometry (albumentations' / imgaug's formulas on uint8 RGB)


def _lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(img, np.clip(np.round(table), 0, 255).astype(np.uint8))


def _brightness_contrast(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    return _lut(img, np.arange(256, dtype=np.float64) * alpha + beta * 255.0)


def _hue_sat_val(img: np.ndarray, dh: float, ds: float, dv: float) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # uint8: hue in [0, 180)
    ramp = np.arange(256, dtype=np.float64)
    hue = np.mod(np.round(ramp + dh), 180).astype(np.uint8)
    hsv = np.stack([cv2.LUT(hsv[..., 0], hue), _lut(hsv[..., 1], ramp + ds), _lut(hsv[..., 2], ramp + dv)], axis=-1)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def _clahe(img: np.ndarray, clip: float) -> np.ndarray:
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB)
    lab[..., 0] = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def _perspective(rng: np.random.Generator, m: int, scale: tuple[float, float]) -> np.ndarray:
    """imgaug ``PerspectiveTransform(keep_size=True)``: a quadrilateral with corners moved inwards by
    ``|N(0, sigma)|`` of the side is mapped onto the whole frame. Returns the 3x3 map (source -> output)."""
    sigma = rng.uniform(*scale)
    d = np.abs(rng.normal(0.0, sigma, size=(4, 2))) * (m - 1)
    e = m - 1.0
    src = np.array(
        [[d[0, 0], d[0, 1]], [e - d[1, 0], d[1, 1]], [e - d[2, 0], e - d[2, 1]], [d[3, 0], e - d[3, 1]]], np.float32
    )
    dst = np.array([[0, 0], [e, 0], [e, e], [0, e]], np.float32)
    return cv2.getPerspectiveTransform(src, dst).astype(np.float64)


def _affine(rng: np.random.Generator, m: int, scale: tuple[float, float], rotate: float, shear: float) -> np.ndarray:
    """imgaug ``Affine`` about the frame centre: scale (x, y drawn apart), rotation and shear in degrees."""
    sx, sy = rng.uniform(*scale, size=2)
    rot = math.radians(rng.uniform(-rotate, rotate))
    shx, shy = (math.tan(math.radians(v)) for v in rng.uniform(-shear, shear, size=2))
    c = (m - 1) / 2.0
    to_c = np.array([[1, 0, -c], [0, 1, -c], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, c], [0, 1, c], [0, 0, 1]], np.float64)
    rmat = np.array([[math.cos(rot), -math.sin(rot), 0], [math.sin(rot), math.cos(rot), 0], [0, 0, 1]])
    smat = np.diag([sx, sy, 1.0])
    shmat = np.array([[1, shx, 0], [shy, 1, 0], [0, 0, 1]], np.float64)
    return back @ rmat @ shmat @ smat @ to_c


def _optical_maps(m: int, k: float) -> tuple[np.ndarray, np.ndarray]:
    """albumentations ``OpticalDistortion`` maps (camera f = side, centre at the frame centre, k1 = k2 = k)."""
    c = (m - 1) / 2.0
    cam = np.array([[m, 0, c], [0, m, c], [0, 0, 1]], np.float32)
    dist = np.array([k, k, 0, 0, 0], np.float32)
    return cv2.initUndistortRectifyMap(cam, dist, None, cam, (m, m), cv2.CV_32FC1)


class KeyframeImages(Dataset):
    """Target + ``n_references`` keyframes made from one photo (the official ``LamaGI``; see the module docstring).

    Args:
        photos: None (the default pool: :func:`real_photos` of ``split``, plus :func:`video_frames` of ``split`` with
            ``include_video_frames``), a folder or a list of image paths, or ``(name, array)`` pairs. Given photos
            are used as they are (``split`` then only names the role; split them with :func:`photo_split`).
        split: ``'train'`` / ``'val'``: which part of the default pool (None: all of it).
        size: S, the frame side (positive, a multiple of 8).
        n_references: T >= 1 keyframes per sample.
        easy: the official easy variant (a shift only).
        masks: ``(rng, h, w) -> (1, h, w)`` hole masks (default :class:`~.masks.MixedMasks`).
        seed: the base seed of every draw.
        length: items per epoch; item i uses photo ``i % len(photos)``. Default: 50 per photo with ``fresh``, one
            per photo otherwise.
        fresh: draw new samples every epoch (:meth:`set_epoch`), for training; False: fixed per index (validation).
        crop_scale: the shared crop's side as a fraction of the photo's short side, drawn uniformly.
        max_shift: M - S in pixels (default 200 * S / 256, or 25 * S / 256 with ``easy``).
        crop_range: fraction of the M - S margin (centred) in which each frame's crop is placed; 1 = anywhere.
        p_perspective, perspective_scale, p_affine, affine_scale, rotate, shear, p_optical, optical_k: the per-frame
            distortions (official defaults; rotation and shear in degrees).
        include_video_frames: add :func:`video_frames` of ``split`` to the default pool (needs opencv-doc).
        opencv_dir: folder of the OpenCV sample images (default pool only).
    """

    def __init__(
        self,
        photos: str | os.PathLike | Sequence[Any] | None = None,
        split: str | None = "train",
        size: int = 64,
        n_references: int = 2,
        easy: bool = False,
        masks: Callable[[np.random.Generator, int, int], torch.Tensor] | None = None,
        seed: int = 0,
        length: int | None = None,
        fresh: bool = True,
        crop_scale: tuple[float, float] = (0.35, 1.0),
        max_shift: int | None = None,
        crop_range: float = 1.0,
        p_perspective: float = 0.5,
        perspective_scale: tuple[float, float] = (0.0, 0.06),
        p_affine: float = 0.5,
        affine_scale: tuple[float, float] = (0.7, 1.3),
        rotate: float = 40.0,
        shear: float = 0.1,
        p_optical: float = 0.5,
        optical_k: float = 0.05,
        include_video_frames: bool = False,
        opencv_dir: str | os.PathLike | None = None,
    ) -> None:
        _check_split(split)
        if int(size) != size or size < 8 or size % 8:
            raise ValueError(f"KeyframeImages: size must be a positive multiple of 8, got {size!r}")
        if int(n_references) != n_references or n_references < 1:
            raise ValueError(f"KeyframeImages: n_references must be an integer >= 1, got {n_references!r}")
        if seed < 0:
            raise ValueError(f"KeyframeImages: seed must be >= 0, got {seed}")
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"KeyframeImages: crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if not 0.0 <= crop_range <= 1.0:
            raise ValueError(f"KeyframeImages: crop_range must be in [0, 1], got {crop_range}")
        for key, p in (("p_perspective", p_perspective), ("p_affine", p_affine), ("p_optical", p_optical)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"KeyframeImages: {key} must be in [0, 1], got {p}")
        if not (0 <= perspective_scale[0] <= perspective_scale[1] and 0 < affine_scale[0] <= affine_scale[1]):
            raise ValueError(
                f"KeyframeImages: need 0 <= perspective_scale lo <= hi and 0 < affine_scale lo <= hi, got "
                f"{perspective_scale}, {affine_scale}"
            )
        if max_shift is not None and max_shift < 0:
            raise ValueError(f"KeyframeImages: max_shift must be >= 0, got {max_shift}")
        self.size, self.n_references, self.easy = int(size), int(n_references), bool(easy)
        self.split, self.seed, self.fresh = split, int(seed), bool(fresh)
        self.masks = masks if masks is not None else MixedMasks()
        self.crop_scale, self.crop_range = (float(lo), float(hi)), float(crop_range)
        self.max_shift = int(max_shift) if max_shift is not None else round((25 if easy else 200) * size / 256)
        self.inter = self.size + self.max_shift  # M: the shared frame (456 at S = 256, as officially)
        self.p_perspective, self.perspective_scale = float(p_perspective), tuple(perspective_scale)
        self.p_affine, self.affine_scale = float(p_affine), tuple(affine_scale)
        self.rotate, self.shear, self.p_optical, self.optical_k = (
            float(rotate),
            float(shear),
            float(p_optical),
            optical_k,
        )

        # photos are kept no larger than needed: the smallest crop (crop_scale[0] of the short side) still gets M px
        keep = math.ceil(self.inter / self.crop_scale[0])
        if photos is None:
            pool = real_photos(size=keep, opencv_dir=opencv_dir, split=split)
            if include_video_frames:
                frames = video_frames(split=split or "train", size=keep)
                pool = PhotoList([*pool, *frames], {**pool.skipped, **frames.skipped})
        else:
            if include_video_frames:
                raise ValueError("KeyframeImages: include_video_frames applies to the default pool (photos=None)")
            pool = load_photos(photos, size=keep)
        if not pool:
            raise ValueError(
                f"KeyframeImages: no photos (split {split!r}; skipped: {dict(list(pool.skipped.items())[:4])})"
            )
        self.photos: PhotoList = pool
        self.length = int(length) if length is not None else len(pool) * (50 if self.fresh else 1)
        if self.length < 1:
            raise ValueError(f"KeyframeImages: length must be >= 1, got {length}")
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    # -- bookkeeping ---------------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return self.photos.names

    @property
    def skipped(self) -> dict[str, str]:
        return dict(self.photos.skipped)

    @property
    def num_skipped(self) -> int:
        return len(self.photos.skipped)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """The epoch mixed into training draws (``fresh=True``); shared with DataLoader workers."""
        if int(epoch) < 0:
            raise ValueError(f"KeyframeImages.set_epoch: epoch must be >= 0, got {epoch}")
        self._epoch.fill_(int(epoch))

    def photo_name(self, index: int) -> str:
        return self.photos[index % len(self.photos)][0]

    def __len__(self) -> int:
        return self.length

    def _rngs(self, index: int) -> list[np.random.Generator]:
        """Independent generators of one item: (shared, per-frame geometry, masks)."""
        key = [self.seed, 1, self.epoch, index] if self.fresh else [self.seed, 0, index]
        return [np.random.default_rng(s) for s in np.random.SeedSequence(key).spawn(3)]

    # -- the pipeline --------------------------------------------------------------------------------------------------
    def _shared(self, photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = photo.shape[:2]
        m = self.inter
        side = max(1, min(h, w, round(rng.uniform(*self.crop_scale) * min(h, w))))
        y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[y0 : y0 + side, x0 : x0 + side]
        img = cv2.resize(crop, (m, m), interpolation=cv2.INTER_AREA if side > m else cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = np.ascontiguousarray(img)
        if rng.random() < 0.5:
            img = _clahe(img, rng.uniform(1.0, 4.0))
        if rng.random() < 0.5:
            img = _brightness_contrast(img, 1.0 + rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2))
        if rng.random() < 0.5:
            img = _hue_sat_val(img, rng.uniform(-5, 5), rng.uniform(-30, 30), rng.uniform(-5, 5))
        return img

    def _frame(self, base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        m, s = self.inter, self.size
        if self.easy:
            y0, x0 = (int(v) for v in rng.integers(0, m - s + 1, size=2))
            return base[y0 : y0 + s, x0 : x0 + s]
        hom = np.eye(3)
        if rng.random() < self.p_perspective:
            hom = _perspective(rng, m, self.perspective_scale) @ hom
        if rng.random() < self.p_affine:
            hom = _affine(rng, m, self.affine_scale, self.rotate, self.shear) @ hom
        k = rng.uniform(-self.optical_k, self.optical_k) if rng.random() < self.p_optical else 0.0
        margin = m - s
        lo = 0.5 * (1.0 - self.crop_range) * margin
        y0, x0 = (round(v) for v in rng.uniform(lo, lo + self.crop_range * margin, size=2))
        if k != 0.0:
            mx, my = _optical_maps(m, k)
            mx, my = mx[y0 : y0 + s, x0 : x0 + s], my[y0 : y0 + s, x0 : x0 + s]
        else:
            my, mx = np.mgrid[y0 : y0 + s, x0 : x0 + s].astype(np.float32)
        # output pixel -> (optical) position q in the warped frame -> source position hom^-1 q
        pts = np.linalg.inv(hom) @ np.stack([mx.ravel(), my.ravel(), np.ones(s * s, np.float32)])
        sx = (pts[0] / pts[2]).reshape(s, s).astype(np.float32)
        sy = (pts[1] / pts[2]).reshape(s, s).astype(np.float32)
        out = cv2.remap(base, sx, sy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        if rng.random() < 0.5:
            out = _brightness_contrast(out, 1.0 + rng.uniform(-0.01, 0.01), rng.uniform(-0.01, 0.01))
        if rng.random() < 0.5:
            out = _hue_sat_val(out, 0.0, rng.uniform(-3, 3), rng.uniform(-1, 1))
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        shared_rng, frame_rng, mask_rng = self._rngs(index)
        base = self._shared(self.photos[index % len(self.photos)][1], shared_rng)
        frames = [self._frame(base, frame_rng) for _ in range(self.n_references + 1)]
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255.0)
        s = self.size
        masks = torch.stack([self.masks(mask_rng, s, s).reshape(1, s, s).float() for _ in frames])
        return {"image": x[0], "mask": masks[0], "srcs": x[1:], "srcs_masks": masks[1:]}


# ---------------------------------------------------------------------------------------------------------------------


def _frame_size(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else (int(v) for v in size)
    if h < 8 or w < 8 or h % 8 or w % 8:
        raise ValueError(f"VideoInpaintClips: size must be positive multiples of 8, got {size!r}")
    return h, w


class VideoInpaintClips(RobustItems, Dataset):
    """Clips of videos with a moving hole, for video inpainting / keyframe propagation tests and evaluation.

    Items ``{"frames": (F, 3, H, W) in [0, 1], "masks": (F, 1, H, W) in {0, 1}, "keyframe_index": LongTensor,
    "name": "<file>@<first frame>"}``.

    Args:
        paths: video files or a folder (default: the opencv-doc sample videos).
        split: ``'train'`` (each video's first ``train_fraction`` = 70% of frames) or ``'val'`` (the rest): the
            splits never share a frame (:func:`split_range`).
        size: (H, W) or an int for a square; each frame is resized so its short side covers it (antialiased) and
            centre-cropped. Multiples of 8.
        num_frames: F, frames per clip; ``stride``: every ``stride``-th frame.
        clip_step: frames between clip starts (default one clip span: non-overlapping clips).
        max_clips_per_video: keep at most this many clips per video (evenly spread).
        mask_kind: :func:`~.masks.moving_masks` kind (``box`` / ``stroke`` / ``mixed``).
        keyframes: positions in the clip given as keyframes (default the first and last frame; negative = from the
            end).
        seed: masks are a pure function of ``(seed, epoch, index)`` (``epoch`` 0 unless :meth:`set_epoch`).

    Videos that do not open, or whose split holds fewer frames than one clip, are skipped with a warning and counted
    (``num_skipped`` / ``skipped``); a clip that fails to read later is replaced by a random readable one (gencore's
    :class:`~gencore.data._robust.RobustItems`).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        split: str = "val",
        size: int | Sequence[int] = 64,
        num_frames: int = 12,
        stride: int = 1,
        clip_step: int | None = None,
        max_clips_per_video: int | None = None,
        mask_kind: str = "mixed",
        keyframes: Sequence[int] | None = None,
        seed: int = 0,
        train_fraction: float = TRAIN_FRACTION,
        backend: str = "auto",
    ) -> None:
        self._init_robust(f"VideoInpaintClips({split})", seed)
        _check_split(split, allow_none=False)
        if num_frames < 2:
            raise ValueError(f"VideoInpaintClips: num_frames must be >= 2, got {num_frames}")
        if stride < 1 or (clip_step is not None and clip_step < 1):
            raise ValueError(f"VideoInpaintClips: stride and clip_step must be >= 1, got {stride}, {clip_step}")
        if max_clips_per_video is not None and max_clips_per_video < 1:
            raise ValueError(f"VideoInpaintClips: max_clips_per_video must be >= 1, got {max_clips_per_video}")
        if mask_kind not in MOVING_KINDS:
            raise ValueError(f"VideoInpaintClips: mask_kind must be one of {MOVING_KINDS}, got {mask_kind!r}")
        self.size = _frame_size(size)
        self.split, self.num_frames, self.stride, self.mask_kind = split, int(num_frames), int(stride), mask_kind
        self.seed, self.epoch, self.backend = int(seed), 0, backend
        keys = [0, num_frames - 1] if keyframes is None else [int(k) for k in keyframes]
        if not keys or any(not -num_frames <= k < num_frames for k in keys):
            raise ValueError(
                f"VideoInpaintClips: keyframes must be non-empty positions in [0, {num_frames}), got {keys}"
            )
        self.keyframes = sorted({k % num_frames for k in keys})
        files = opencv_sample_videos() if paths is None else video_files(paths)
        span = (num_frames - 1) * stride + 1
        step = clip_step or span
        self.videos: list[Any] = []
        self.clips: list[tuple[int, int]] = []
        for path in files:
            try:
                info = video_info(path, backend=backend)
            except (OSError, ValueError, RuntimeError) as err:
                self.skip_log.skip(str(path), f"{type(err).__name__}: {err}")
                continue
            start, end = split_range(info.num_frames, split, train_fraction)
            starts = list(range(start, end - span + 1, step))
            if not starts:
                self.skip_log.skip(
                    str(path), f"its {split} segment [{start}, {end}) holds fewer than the {span} frames of one clip"
                )
                continue
            if max_clips_per_video is not None and len(starts) > max_clips_per_video:
                starts = [starts[round(k)] for k in np.linspace(0, len(starts) - 1, max_clips_per_video)]
            self.clips += [(len(self.videos), s) for s in starts]
            self.videos.append(info)
        if not self.clips:
            raise DataReadError(
                f"VideoInpaintClips: no readable video with a full {split} clip (skipped {self.skipped})"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _num_items(self) -> int:
        return len(self.clips)

    def _item_path(self, i: int) -> str:
        return self.videos[self.clips[i][0]].path

    def frame_indices(self, i: int) -> list[int]:
        """The video frame numbers of clip ``i``."""
        start = self.clips[i][1]
        return list(range(start, start + (self.num_frames - 1) * self.stride + 1, self.stride))

    def _load_item(self, i: int) -> dict[str, Any]:
        info = self.videos[self.clips[i][0]]
        raw = read_frames(info.path, self.frame_indices(i), backend=info.backend)
        x = torch.from_numpy(raw).permute(0, 3, 1, 2).float().div(255.0)
        x = resize_center_crop(x, self.size).clamp(0.0, 1.0)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        masks = moving_masks(rng, self.num_frames, *self.size, kind=self.mask_kind)
        return {
            "frames": x,
            "masks": masks,
            "keyframe_index": torch.tensor(self.keyframes, dtype=torch.long),
            "name": f"{Path(info.path).name}@{self.clips[i][1]}",
        }


# ---------------------------------------------------------------------------------------------------------------------


class _ForwardEpoch:
    """A sampler's ``set_epoch`` that also sets the dataset's epoch (Lightning calls the sampler's only)."""

    def __init__(self, set_epoch: Callable[[int], None], dataset: Any) -> None:
        self.set_epoch, self.dataset = set_epoch, dataset

    def __call__(self, epoch: int) -> None:
        self.set_epoch(epoch)
        self.dataset.set_epoch(epoch)


class KeyframeDataModule(DataModule):
    """Keyframe-guided inpainting data: training = :class:`KeyframeImages` of the training photos, drawn anew every
    epoch (``fresh``; the sampler's epoch, set by Lightning also on resume, is forwarded to the dataset);
    validation = ``val_length`` fixed samples of the held-out photos.

    ``include_video_frames`` adds frames of the sample videos' training segments to the training pool (and of their
    validation segments to the validation pool). ``photos``: a folder or list of images instead of the embedded
    photos (Places365 for the paper's runs; split into train / val by name). Other keyword arguments:
    :class:`gencore.data.DataModule` (``batch_size``, ``num_workers``, ...).
    """

    def __init__(
        self,
        size: int = 64,
        n_references: int = 2,
        easy: bool = False,
        include_video_frames: bool = False,
        train_length: int | None = None,
        val_length: int = 64,
        val_n_references: int | None = None,
        masks: Callable[[np.random.Generator, int, int], torch.Tensor] | None = None,
        opencv_dir: str | os.PathLike | None = None,
        seed: int = 0,
        photos: str | os.PathLike | Sequence[Any] | None = None,
        **loader_kwargs: Any,
    ) -> None:
        common = dict(size=size, easy=easy, include_video_frames=include_video_frames, masks=masks, seed=seed)
        common["photos"] = photos
        common["opencv_dir"] = opencv_dir
        KeyframeImages(split="train", n_references=n_references, length=1, **common)  # bad arguments fail now
        super().__init__(
            train=lambda: KeyframeImages(
                split="train", n_references=n_references, fresh=True, length=train_length, **common
            ),
            val=lambda: KeyframeImages(
                split="val", n_references=val_n_references or n_references, fresh=False, length=val_length, **common
            ),
            seed=seed,
            **loader_kwargs,
        )
        self.image_size, self.channels = size, 3
        self.n_references = n_references

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        sampler = loader.sampler
        if isinstance(sampler, ResumableSampler) and hasattr(self.train_set, "set_epoch"):
            if not isinstance(sampler.set_epoch, _ForwardEpoch):
                sampler.set_epoch = _ForwardEpoch(sampler.set_epoch, self.train_set)  # type: ignore[method-assign]
            self.train_set.set_epoch(sampler.epoch)  # type: ignore[union-attr]
        return loader
