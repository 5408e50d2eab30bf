"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from its IDX files: 70,000 real 28×28 grayscale product photos.

Default location: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, installed by
``make data``); any folder holding the four IDX files (gzipped or not) works through ``root`` or the
``GENLAB_FASHION_MNIST`` environment variable. Items are dicts::

    {"image": (C, S, S) float in [-1, 1], "label": int, "caption": "a photo of a sneaker"}
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "FashionMNIST",
    "caption_for",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "GENLAB_FASHION_MNIST"
# Official class names, and the nouns used in captions.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CAPTION_NOUNS = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def caption_for(label: int, template: str = "a photo of a {name}") -> str:
    """``"a photo of a sneaker"``; ``a`` becomes ``an`` before a vowel (``"a photo of an ankle boot"``)."""
    if not 0 <= int(label) < len(CAPTION_NOUNS):
        raise ValueError(f"caption_for: label must be in [0, {len(CAPTION_NOUNS)}), got {label}")
    name = CAPTION_NOUNS[int(label)]
    text = template.format(name=name)
    return text.replace(f" a {name}", f" an {name}") if name[0] in "aeiou" else text


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array; a clear ValueError names a truncated or foreign file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"read_idx: cannot read {path}: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"read_idx: {path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"read_idx: {path} holds {len(data)} bytes, shape {shape} needs {expected} (truncated?)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The folder holding the IDX files: ``root``, else ``$GENLAB_FASHION_MNIST``, else the Debian package's."""
    folder = Path(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT)
    name = _FILES["test"][0]
    if not ((folder / name).is_file() or (folder / f"{name}.gz").is_file()):
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder}: expected {name}[.gz] and friends. Install the Debian package "
            f"(`make data`, i.e. apt-get install dataset-fashion-mnist) or pass root= / set ${ENV_VAR}."
        )
    return folder


def _idx_path(folder: Path, name: str) -> Path:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"Fashion-MNIST: {name}[.gz] missing in {folder}")


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of a split (``train``: 60,000, ``test``: 10,000)."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FILES)}, got {split!r}")
    folder = find_fashion_mnist(root)
    images = read_idx(_idx_path(folder, _FILES[split][0]))
    labels = read_idx(_idx_path(folder, _FILES[split][1])).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST as dict items in [-1, 1].

    Args:
        root: folder of the IDX files (default: see :func:`find_fashion_mnist`).
        split: ``train`` or ``test``.
        image_size: 28 keeps the originals; 32 pads 2 background pixels a side (exact, friendly to /2 /4 /8
            networks); any other size resizes bilinearly (``resize="bilinear"``) or pads/crops (``resize="pad"``).
        channels: 1 (grayscale) or 3 (repeated, for RGB networks).
        classes: keep only these labels.
        limit: keep the first ``limit`` items (after class filtering).
        caption_template: format string with ``{name}``.
        random_flip: horizontal flips (training augmentation).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        image_size: int = 28,
        channels: int = 1,
        classes: list[int] | None = None,
        limit: int | None = None,
        caption_template: str = "a photo of a {name}",
        resize: str | None = None,
        random_flip: bool = False,
    ) -> None:
        if image_size < 8:
            raise ValueError(f"FashionMNIST: image_size must be >= 8, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"FashionMNIST: channels must be 1 or 3, got {channels}")
        resize = resize or ("pad" if image_size >= 28 else "bilinear")
        if resize not in ("pad", "bilinear"):
            raise ValueError(f"FashionMNIST: resize must be 'pad' or 'bilinear', got {resize!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"FashionMNIST: limit must be >= 1, got {limit}")
        images, labels = load_fashion_mnist(root, split)
        if classes is not None:
            bad = [c for c in classes if not 0 <= c < len(CLASS_NAMES)]
            if bad:
                raise ValueError(f"FashionMNIST: classes must be in [0, 10), got {bad}")
            keep = np.isin(labels, np.asarray(list(classes)))
            images, labels = images[keep], labels[keep]
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images = torch.from_numpy(images.copy())  # (N, 28, 28) uint8
        self.labels = torch.from_numpy(labels.copy())
        self.split, self.image_size, self.channels = split, image_size, channels
        self.resize, self.random_flip = resize, random_flip
        self.caption_template = caption_template
        self.class_names = CLASS_NAMES
        self.captions = [caption_for(c, caption_template) for c in range(len(CLASS_NAMES))]

    def __len__(self) -> int:
        return len(self.labels)

    def to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 28, 28) -> float (..., C, S, S) in [-1, 1] with this dataset's size policy."""
        x = images.float().div(127.5).sub(1.0)
        x = x.reshape(-1, 1, *x.shape[-2:])
        s = self.image_size
        if s != x.shape[-1]:
            if self.resize == "pad":
                d = s - x.shape[-1]
                lo = d // 2
                x = F.pad(x, (lo, d - lo, lo, d - lo), value=-1.0) if d > 0 else x[..., -lo : s - lo, -lo : s - lo]
            else:
                x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split at once: images (N, C, S, S) in [-1, 1] and labels (N,) (for metrics)."""
        return self.to_model_range(self.images), self.labels.clone()

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.to_model_range(self.images[i])[0]
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        label = int(self.labels[i])
        return {"image": x, "label": label, "caption": self.captions[label]}
