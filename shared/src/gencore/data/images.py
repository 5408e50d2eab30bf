"""Image datasets: a folder of images, and the real photos that scikit-image ships (a tiny natural-image set).

Items are dicts ``{"image": (C, H, W) float in [-1, 1], ...}``. Unreadable or truncated image files are skipped with
a warning and counted (``dataset.num_skipped``); a folder with no readable image raises a clear error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from gencore.data._robust import DataReadError, RobustItems

__all__ = [
    "IMAGE_EXTENSIONS",
    "SKIMAGE_PHOTOS",
    "ImageFolder",
    "SkimagePhotos",
    "load_image",
    "resize_center_crop",
    "to_model_range",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# The natural RGB photographs bundled with scikit-image (no download needed).
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
    "motorcycle_left",
    "motorcycle_right",
)


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {size}")
    return h, w


# PIL modes of 16-bit single-channel images (PNG / TIFF); older Pillow opens 16-bit PNGs as 32-bit "I".
_GRAY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the numpy view that shows the image upright (the transposes of PIL's ImageOps.exif_transpose).
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def _deep_color(path: str | os.PathLike, channels: int) -> np.ndarray | None:
    """A 16-bit colour image (PIL keeps only its high bytes) at full depth through OpenCV, as uint16 RGB or gray;
    None when OpenCV does not decode it."""
    import cv2

    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION
    flags |= cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    arr = cv2.imdecode(np.fromfile(os.fspath(path), dtype=np.uint8), flags)
    if arr is None or arr.dtype != np.uint16:
        return None
    return arr if channels == 1 else arr[..., ::-1]  # BGR -> RGB


def load_image(path: str | os.PathLike, channels: int = 3) -> np.ndarray:
    """Fully decode an image file to (H, W, channels) at its own bit depth: uint8, or uint16 for 16-bit files.

    16-bit PNG / TIFF (grayscale, RGB, RGBA) keep all 16 bits (:func:`to_model_range` scales by the dtype), the EXIF
    orientation is applied (a phone photo comes out upright, as viewers show it) and alpha is dropped. Truncated or
    corrupt files raise OSError/ValueError, and so do floating-point and 32-bit integer images (of unknown range).
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"load_image: channels must be 1 or 3, got {channels}")
    with Image.open(path) as im:
        deep = any(";16" in str(tile[3]) for tile in im.tile)  # raw 16-bit samples; load() clears the tiles
        im.load()  # full decode: a truncated JPEG fails here, not later in a worker
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        if im.mode in _GRAY16_MODES or (im.mode == "I" and deep):
            arr = np.array(im).astype(np.uint16)
            if channels == 3:
                arr = np.repeat(arr[..., None], 3, axis=-1)
        elif im.mode in ("I", "F"):
            what = "floating-point" if im.mode == "F" else "32-bit integer"
            raise ValueError(f"load_image: {path} holds {what} pixels (PIL mode {im.mode}) of unknown range")
        else:
            arr = _deep_color(path, channels) if deep else None
            if deep and arr is None:
                warnings.warn(
                    f"load_image: OpenCV does not decode the 16-bit colour image {path} (a zlib clash: was decord "
                    "imported before cv2?); reading its high bytes only (8-bit precision)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if arr is None:
                arr = np.array(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    arr = _ORIENT.get(orientation, lambda a: a)(arr)
    return np.ascontiguousarray(arr[..., None] if arr.ndim == 2 else arr)  # a writable copy


def to_model_range(arr: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 or uint16 (H, W, C) -> float (C, H, W) in [-1, 1], scaled by the bit depth (255 or 65535 = white)."""
    if isinstance(arr, np.ndarray):
        if arr.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"to_model_range: expected uint8 or uint16 pixels, got {arr.dtype}")
        half = np.iinfo(arr.dtype).max / 2  # 127.5 or 32767.5
        t = torch.from_numpy(np.ascontiguousarray(arr if arr.dtype == np.uint8 else arr.astype(np.float32)))
    else:
        if arr.dtype != torch.uint8:
            raise ValueError(f"to_model_range: expected a uint8 tensor (or a uint8/uint16 array), got {arr.dtype}")
        t, half = arr, 127.5
    return t.permute(2, 0, 1).float().div(half).sub(1.0)


def resize_center_crop(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Resize (..., C, H, W) so the short side covers ``size`` (antialiased bilinear), then centre-crop."""
    th, tw = _as_size(size)
    h, w = x.shape[-2:]
    s = max(th / h, tw / w)
    nh, nw = max(th, round(h * s)), max(tw, round(w * s))
    lead = x.shape[:-3]
    y = x.reshape(-1, *x.shape[-3:])
    if (nh, nw) != (h, w):
        y = F.interpolate(y, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - th) // 2, (nw - tw) // 2
    y = y[..., top : top + th, left : left + tw]
    return y.reshape(*lead, *y.shape[-3:]).contiguous()


def image_readable(path: str | os.PathLike, skip_log: Any, *, load: Any = None) -> bool:
    """Whether ``path`` reads as an image: ``load(path)`` succeeds when given (a full decode), else PIL's header
    check passes; a file that does not is recorded in ``skip_log`` (a :class:`gencore.data._robust.SkipLog`) with
    the reason, for datasets that skip unreadable files and count them."""
    from PIL import Image

    try:
        if load is not None:
            load(path)
        else:
            with Image.open(path) as im:
                im.verify()
        return True
    except (OSError, ValueError, SyntaxError) as err:
        skip_log.skip(str(path), f"{type(err).__name__}: {err}")
        return False


class ImageFolder(RobustItems, Dataset):
    """All images below ``root`` (recursively), resized + centre-cropped to ``size``.

    ``labels="subfolder"`` gives class labels from the first-level folder names (sorted; an image directly under
    ``root`` has no class and gets label -1, with a warning); a ``.txt`` file beside an image (same stem) becomes its
    caption. 8- and 16-bit files are scaled by their bit depth. An unreadable file is skipped and counted, and its
    slot is filled by a random readable image, seeded by ``seed`` and the index (see :class:`RobustItems`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | Sequence[int] = 64,
        channels: int = 3,
        labels: str | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        random_flip: bool = False,
        limit: int | None = None,
        verify: str = "header",
        seed: int = 0,
    ) -> None:
        self._init_robust(f"ImageFolder({root})", seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder: {self.root} is not a folder")
        if labels not in (None, "subfolder"):
            raise ValueError(f"ImageFolder: labels must be None or 'subfolder', got {labels!r}")
        if channels not in (1, 3):
            raise ValueError(f"ImageFolder: channels must be 1 or 3, got {channels}")
        self.size, self.channels, self.random_flip = _as_size(size), channels, random_flip
        exts = tuple(e.lower() for e in extensions)
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        if limit is not None:
            self.paths = self.paths[:limit]
        if not self.paths:
            raise DataReadError(f"ImageFolder: no image files ({', '.join(exts)}) under {self.root}")
        if verify not in ("none", "header", "full"):
            raise ValueError(f"ImageFolder: verify must be 'none', 'header' or 'full', got {verify!r}")
        if verify != "none":
            self.paths = [p for p in self.paths if self._readable(p, full=verify == "full")]
            if not self.paths:
                raise DataReadError(
                    f"ImageFolder: none of the {self.num_skipped} image files under {self.root} is readable"
                )
        self.classes: list[str] = []
        if labels == "subfolder":
            self.classes = sorted({p.relative_to(self.root).parts[0] for p in self.paths if p.parent != self.root})
            loose = [p for p in self.paths if p.parent == self.root]
            if loose:
                warnings.warn(
                    f"ImageFolder({root}): {len(loose)} image(s) directly under the root (e.g. {loose[0].name}) are "
                    "in no class folder and get label -1",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._class_index = {c: i for i, c in enumerate(self.classes)}

    def _readable(self, path: Path, full: bool) -> bool:
        return image_readable(path, self.skip_log, load=(lambda p: load_image(p, self.channels)) if full else None)

    def _num_items(self) -> int:
        return len(self.paths)

    def _item_path(self, i: int) -> str:
        return str(self.paths[i])

    def _load_item(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        x = resize_center_crop(to_model_range(load_image(path, self.channels)), self.size)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        item: dict[str, Any] = {"image": x}
        if self.classes:
            rel = path.relative_to(self.root).parts
            item["label"] = self._class_index.get(rel[0], -1) if len(rel) > 1 else -1
        caption = path.with_suffix(".txt")
        if caption.is_file():
            item["caption"] = caption.read_text().strip()
        return item


def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data

    if name == "motorcycle_left":
        return data.stereo_motorcycle()[0]
    if name == "motorcycle_right":
        return data.stereo_motorcycle()[1]
    if name not in SKIMAGE_PHOTOS:
        raise ValueError(f"SkimagePhotos: unknown photo {name!r}; bundled photos: {', '.join(SKIMAGE_PHOTOS)}")
    img = getattr(data, name)()
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.dtype.kind == "f" else img.astype(np.uint8)
    return img[..., :3]


class SkimagePhotos(Dataset):
    """The real RGB photos bundled with scikit-image (astronaut, chelsea, coffee, rocket, ...), offline.

    With ``crops_per_image == 1`` each photo is resized + centre-cropped to ``size``. With more, each item is a random
    resized crop covering ``crop_scale`` of the photo's short side: fixed per index (``seed``) unless
    ``fresh_crops`` draws a new one on every access (augmentation).
    """

    def __init__(
        self,
        size: int | Sequence[int] = 64,
        names: Sequence[str] = SKIMAGE_PHOTOS,
        crops_per_image: int = 1,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        fresh_crops: bool = False,
        seed: int = 0,
    ) -> None:
        if crops_per_image < 1:
            raise ValueError(f"SkimagePhotos: crops_per_image must be >= 1, got {crops_per_image}")
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"SkimagePhotos: crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        self.names = list(names)
        self.photos = [to_model_range(_skimage_photo(n)) for n in self.names]
        self.size, self.crops_per_image = _as_size(size), crops_per_image
        self.crop_scale, self.fresh_crops, self.seed = (lo, hi), fresh_crops, seed

    def __len__(self) -> int:
        return len(self.photos) * self.crops_per_image

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        k = i // self.crops_per_image
        photo = self.photos[k]
        if self.crops_per_image == 1:
            return {"image": resize_center_crop(photo, self.size), "label": k, "caption": self.names[k]}
        gen = None if self.fresh_crops else torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        h, w = photo.shape[-2:]
        th, tw = self.size
        lo, hi = self.crop_scale
        frac = lo + (hi - lo) * torch.rand((), generator=gen).item()
        side = max(1, round(min(h, w) * frac))
        ch, cw = (side, max(1, round(side * tw / th))) if th >= tw else (max(1, round(side * th / tw)), side)
        ch, cw = min(ch, h), min(cw, w)
        top = int(torch.randint(0, h - ch + 1, (), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (), generator=gen))
        crop = photo[:, top : top + ch, left : left + cw]
        return {"image": resize_center_crop(crop, self.size), "label": k, "caption": self.names[k]}
