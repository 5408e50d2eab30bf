"""The labelled union of datasets net2net trains on, as images and as cached first-stage latents.

"A Note on Data Biases in Generative Models" trains one autoencoder on a *union* of datasets and then a conditional
invertible network on its latents, conditioned on the dataset an image came from. The members here are three real
grayscale datasets that ship with the environment (no download):

- ``fashion_mnist``: Fashion-MNIST (:class:`gencore.data.FashionMNIST`; train = its 60,000-image train split, val =
  its 10,000-image test split). 28×28 products on a black background; at ``image_size`` 28 / 32 the originals /
  2 pixels of background a side (gencore's exact padding), at any other size resized bilinearly (antialiased) so the
  product fills the frame as the other members' content does. Labels: the 10 classes.
- ``digits``: scikit-learn's ``load_digits`` (1,797 real 8×8 handwritten digits, values 0..16): ``x / 16 · 2 − 1``,
  upsampled with **bicubic** interpolation (``align_corners=False``), then clamped to [-1, 1] (bicubic overshoots a
  little at the strokes' edges). Split: a permutation from ``np.random.default_rng(0)``, its last 297 items val,
  the other 1,500 train. Labels: the digit 0..9.
- ``lfw``: the 100 faces of scikit-image's ``lfw_subset`` (real 25×25 LFW face crops in [0, 1]; its other 100
  images are background crops without a face, for face detection, and are not used): ``x · 2 − 1`` resized with
  antialiased bilinear interpolation. Split: a permutation of all 200 crops from ``default_rng(0)``, its last 30 val,
  the faces among them: 84 train / 16 val (the split the toy autoencoder was trained with, when the member still held
  the background crops too: no held-out face was seen by it).
  No class labels: ``-1``.

Every image is (channels, image_size, image_size) float in [-1, 1] with a dark background; ``channels=3`` repeats
the gray channel. Each member's arrays are read once per process, on first use (never at import), and shared by the
datasets built over them.

- :func:`load_member` — one member's split as tensors;
- :class:`DatasetUnion` — the union as a dataset of ``{"image", "dataset", "label"}`` items, with optional balancing
  (``per_member``: every member contributes the same number of items per epoch) and flips;
- :func:`posterior_moments` — the encode function of the latent cache: the first stage's posterior mean *and*
  standard deviation (scaled), so training can draw posterior samples from cached moments;
- :class:`LatentUnionDataModule` — caches the union's latents once (:func:`gencore.latents.build_latent_cache`) and
  serves ``{"latent", "std", "label", "dataset"}`` items; :class:`UnionDataModule` — the images, for training the
  autoencoder on the union.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from gencore.data import DataModule, FashionMNIST
from gencore.latents import FrozenCodec, LatentCacheDataset, build_latent_cache

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MEMBERS",
    "MEMBERS",
    "SPLITS",
    "DatasetUnion",
    "LatentUnionDataModule",
    "PosteriorMoments",
    "UnionDataModule",
    "balanced_indices",
    "load_member",
    "member_indices",
    "posterior_moments",
]

MEMBERS: tuple[str, ...] = ("fashion_mnist", "digits", "lfw")
DEFAULT_MEMBERS: tuple[str, ...] = MEMBERS
SPLITS: tuple[str, ...] = ("train", "val")
# members whose content a horizontal flip keeps in the data distribution (a flipped digit is another glyph)
FLIPPABLE: frozenset[str] = frozenset({"fashion_mnist", "lfw"})
_SPLIT_SEED = 0
_DIGITS_VAL, _LFW_VAL = 297, 30  # LFW: of lfw_subset's 200 crops, faces and background
LFW_FACES = 100  # lfw_subset(): the first 100 images are faces, the other 100 background crops
# bumped when a member's preprocessing changes: part of the fingerprint, so latent caches of the old images rebuild
_PREPROCESSING_VERSION = 1


# ------------------------------------------------------------------------------------------ argument checking


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_member_names(members: Any, where: str) -> tuple[str, ...]:
    if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
        # (Hydra's ListConfig is a Sequence; a bare string is most likely a forgotten list)
        raise ValueError(f"{where}: members must be a list of names from {list(MEMBERS)}, got {members!r}")
    names = tuple(str(m) for m in members)
    if not names:
        raise ValueError(f"{where}: members is empty; choose from {list(MEMBERS)}")
    unknown = [n for n in names if n not in MEMBERS]
    if unknown:
        raise ValueError(f"{where}: unknown member(s) {unknown}; known members are {list(MEMBERS)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: member(s) {duplicates} listed more than once in {list(names)}")
    return names


def _check_split(split: Any, where: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
    return str(split)


def _check_image(image_size: Any, channels: Any, where: str) -> tuple[int, int]:
    if not _is_int(image_size) or image_size < 8:
        raise ValueError(f"{where}: image_size must be an integer >= 8, got {image_size!r}")
    if not _is_int(channels) or channels not in (1, 3):
        raise ValueError(f"{where}: channels must be 1 or 3, got {channels!r}")
    return int(image_size), int(channels)


def _check_count(name: str, value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{where}: {name} must be an integer >= 1 or None, got {value!r}")
    return int(value)


def _check_seed(seed: Any, where: str) -> int:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"{where}: seed must be an integer >= 0, got {seed!r}")
    return int(seed)


# ---------------------------------------------------------------------------------------------- the members


@functools.lru_cache(maxsize=1)
def _digits_source() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.asarray(digits.images, dtype=np.float32), np.asarray(digits.target, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _lfw_source() -> np.ndarray:
    from skimage.data import lfw_subset

    return np.asarray(lfw_subset()[:LFW_FACES], dtype=np.float32)  # the faces only


def _split_indices(n: int, n_val: int, split: str) -> np.ndarray:
    """The fixed split of a small member: a permutation from ``default_rng(0)``, its last ``n_val`` items val."""
    perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
    return perm[n - n_val :] if split == "val" else perm[: n - n_val]


def _lfw_indices(split: str) -> np.ndarray:
    """The faces (indices < 100 of ``lfw_subset()``) in ``split`` of the fixed split of all 200 crops."""
    idx = _split_indices(2 * LFW_FACES, _LFW_VAL, split)
    return idx[idx < LFW_FACES]


class _Member:
    """One member's split at one image size: labels, the items' indices in the source, and images on demand."""

    def __init__(self, name: str, split: str, image_size: int, channels: int) -> None:
        self.name, self.split, self.image_size, self.channels = name, split, image_size, channels
        self._fashion: FashionMNIST | None = None
        self._images: Tensor | None = None  # (N, 1, S, S) float in [-1, 1] (digits, lfw)
        if name == "fashion_mnist":
            resize = "pad" if image_size in (28, 32) else "bilinear"
            fashion_split = "train" if split == "train" else "test"
            self._fashion = FashionMNIST(split=fashion_split, image_size=image_size, channels=channels, resize=resize)
            self.labels = self._fashion.labels.long()
            self.source_index = torch.arange(len(self.labels))
            return
        if name == "digits":
            images, targets = _digits_source()
            idx = _split_indices(len(images), _DIGITS_VAL, split)
            x = torch.from_numpy(images[idx]).unsqueeze(1).div(16.0).mul(2.0).sub(1.0)
            if image_size != x.shape[-1]:
                x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
            self.labels = torch.from_numpy(targets[idx])
        elif name == "lfw":
            faces = _lfw_source()
            idx = _lfw_indices(split)
            x = torch.from_numpy(faces[idx]).unsqueeze(1).mul(2.0).sub(1.0)
            if image_size != x.shape[-1]:
                x = F.interpolate(
                    x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
                )
            self.labels = torch.full((len(idx),), -1, dtype=torch.long)
        else:  # pragma: no cover - names are checked before
            raise ValueError(f"unknown member {name!r}; known members are {list(MEMBERS)}")
        self._images = x.clamp_(-1.0, 1.0).contiguous()
        self.source_index = torch.from_numpy(idx.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, index: int | slice | Tensor) -> Tensor:
        """Images (B, C, S, S) of ``index`` (an int gives B = 1)."""
        if self._fashion is not None:
            return self._fashion.to_model_range(self._fashion.images[index])
        x = self._images[index]  # type: ignore[index]
        x = x.reshape(-1, *x.shape[-3:])
        return x.expand(-1, self.channels, -1, -1).contiguous() if self.channels != x.shape[1] else x


@functools.lru_cache(maxsize=12)
def _member(name: str, split: str, image_size: int, channels: int) -> _Member:
    log.debug("loading %s/%s at %dx%d, %d channel(s)", name, split, image_size, image_size, channels)
    return _Member(name, split, image_size, channels)


def load_member(name: str, split: str, image_size: int = 32, channels: int = 1) -> tuple[Tensor, Tensor]:
    """(images float (N, C, S, S) in [-1, 1], labels long (N,)) of one member's split (``train`` / ``val``);
    ``label`` is -1 for a member without classes (``lfw``)."""
    if name not in MEMBERS:
        raise ValueError(f"load_member: unknown member {name!r}; known members are {list(MEMBERS)}")
    split = _check_split(split, "load_member")
    image_size, channels = _check_image(image_size, channels, "load_member")
    member = _member(name, split, image_size, channels)
    return member.images(slice(None)), member.labels.clone()


def member_indices(name: str, split: str) -> np.ndarray:
    """The positions of a member's split items in its source (sklearn's ``load_digits()``, skimage's
    ``lfw_subset()``, Fashion-MNIST's IDX file of that split), in the order :func:`load_member` returns them."""
    if name not in MEMBERS:
        raise ValueError(f"member_indices: unknown member {name!r}; known members are {list(MEMBERS)}")
    split = _check_split(split, "member_indices")
    if name == "digits":
        return _split_indices(len(_digits_source()[0]), _DIGITS_VAL, split)
    if name == "lfw":
        return _lfw_indices(split)
    return _member(name, split, 32, 1).source_index.numpy()  # (the default size: usually loaded already)


# ------------------------------------------------------------------------------------------------ the union


def balanced_indices(n: int, per_member: int | None, *, seed: int = 0, name: str = "") -> np.ndarray:
    """Indices into a member's first ``n`` items that make it contribute exactly ``per_member`` items.

    A member with more items is subsampled (a permutation seeded by ``seed`` and the member's ``name``, so a member's
    choice does not depend on which others are in the union), a smaller one is tiled: repeated whole, then a seeded
    partial copy. ``per_member=None`` keeps the member as it is (``arange(n)``).
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"balanced_indices: a member needs at least one item, got n={n!r}")
    if per_member is None:
        return np.arange(n, dtype=np.int64)
    per_member = _check_count("per_member", per_member, "balanced_indices")
    rng = np.random.default_rng([_check_seed(seed, "balanced_indices"), zlib.crc32(name.encode())])
    if n >= per_member:
        return np.sort(rng.permutation(n)[:per_member]).astype(np.int64)
    repeats, rest = divmod(per_member, n)
    partial = np.sort(rng.permutation(n)[:rest])
    return np.concatenate([np.tile(np.arange(n), repeats), partial]).astype(np.int64)


def _union_index(
    names: Sequence[str], sizes: Sequence[int], per_member: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(member index, index within the member) of every item of the union, members one after the other."""
    members, local = [], []
    for k, (name, n) in enumerate(zip(names, sizes, strict=True)):
        idx = balanced_indices(n, per_member, seed=seed, name=name)
        members.append(np.full(len(idx), k, dtype=np.int64))
        local.append(idx)
    return np.concatenate(members), np.concatenate(local)


def _fingerprint(
    names: Sequence[str],
    split: str,
    image_size: int,
    channels: int,
    per_member: int | None,
    limit: int | None,
    seed: int,
) -> str:
    meta = {
        "members": list(names),
        "split": split,
        "image_size": image_size,
        "channels": channels,
        "per_member": per_member,
        "limit": limit,
        "seed": seed if per_member is not None else None,  # (only balancing draws from it)
        "preprocessing": _PREPROCESSING_VERSION,
    }
    return "net2net.DatasetUnion" + json.dumps(meta, sort_keys=True, separators=(",", ":"))


def _smaller(a: int | None, b: int | None) -> int | None:
    """The smaller of two optional caps (None: no cap)."""
    return b if a is None else a if b is None else min(a, b)


class DatasetUnion(Dataset):
    """The labelled union of the members: items ``{"image": (C, S, S), "dataset": int, "label": int}``, with
    ``dataset`` the member's index in ``names`` and ``label`` its class (-1 for ``lfw``).

    Args:
        members: names from :data:`MEMBERS`, in the order that numbers them.
        split: ``train`` or ``val``.
        image_size, channels: the images' size (>= 8) and channels (1, or 3 repeating the gray one).
        per_member: balance the union: every member contributes exactly this many items per epoch (a larger member
            subsampled, a smaller one tiled; see :func:`balanced_indices`). None: the members as they are.
        limit: keep at most the first ``limit`` items of each member (before balancing): tests and quick runs.
        random_flip: horizontal flips with probability 0.5 for ``fashion_mnist`` and ``lfw`` items (never digits).
        seed: the balancing's seed.

    ``counts`` is the number of items per member in the union, ``sizes`` the number available per member (after
    ``limit``), ``index`` the (dataset, position within the member's split) of every item; ``fingerprint`` names
    everything that decides which images the union holds (the latent cache keys on it): members, split, image size,
    channels, ``per_member``, ``limit`` and, when balancing, ``seed``.
    """

    def __init__(
        self,
        members: Sequence[str] = DEFAULT_MEMBERS,
        split: str = "train",
        image_size: int = 32,
        channels: int = 1,
        per_member: int | None = None,
        limit: int | None = None,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        where = "DatasetUnion"
        self.names = _check_member_names(members, where)
        self.split = _check_split(split, where)
        self.image_size, self.channels = _check_image(image_size, channels, where)
        self.per_member = _check_count("per_member", per_member, where)
        self.limit = _check_count("limit", limit, where)
        self.seed = _check_seed(seed, where)
        self.random_flip = bool(random_flip)
        self._members = [_member(n, self.split, self.image_size, self.channels) for n in self.names]
        self.sizes = tuple(len(m) if self.limit is None else min(len(m), self.limit) for m in self._members)
        self._member_of, self._local = _union_index(self.names, self.sizes, self.per_member, self.seed)
        self.counts = tuple(int(c) for c in np.bincount(self._member_of, minlength=len(self.names)))
        # (dataset, position among the member's items) of every item, in item order
        self.index = np.stack([self._member_of, self._local], axis=1)
        self.index.flags.writeable = False
        self._flippable = tuple(n in FLIPPABLE for n in self.names)
        self.fingerprint = _fingerprint(
            self.names, self.split, self.image_size, self.channels, self.per_member, self.limit, self.seed
        )

    @property
    def num_datasets(self) -> int:
        return len(self.names)

    def dataset_index(self, name: str) -> int:
        """The ``dataset`` value of member ``name``'s items."""
        if name not in self.names:
            raise ValueError(
                f"DatasetUnion: {name!r} is not a member of this union; its members are {list(self.names)}"
            )
        return self.names.index(name)

    def __len__(self) -> int:
        return len(self._member_of)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, j = int(self._member_of[i]), int(self._local[i])
        member = self._members[k]
        x = member.images(j)[0]
        if self.random_flip and self._flippable[k] and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x, "dataset": k, "label": int(member.labels[j])}

    def tensors(self, max_per_member: int | None = None) -> dict[str, Tensor]:
        """The split for evaluation: every member's items once (after ``limit``, without balancing or flips), at most
        ``max_per_member`` of each: ``{"images": (N, C, S, S), "dataset": (N,), "label": (N,)}``."""
        cap = _check_count("max_per_member", max_per_member, "DatasetUnion.tensors")
        images, dataset, labels = [], [], []
        for k, (member, n) in enumerate(zip(self._members, self.sizes, strict=True)):
            n = n if cap is None else min(n, cap)
            images.append(member.images(slice(0, n)))
            dataset.append(torch.full((n,), k, dtype=torch.long))
            labels.append(member.labels[:n])
        return {"images": torch.cat(images), "dataset": torch.cat(dataset), "label": torch.cat(labels)}

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={c}" for n, c in zip(self.names, self.counts, strict=True))
        return f"DatasetUnion({self.split}, {self.image_size}px, {parts})"


# ----------------------------------------------------------------------------------------- posterior moments


class PosteriorMoments:
    """The latent cache's encode function: ``x -> {"latents": (mean − shift)·scale, "std": std·scale}``.

    For a KL first stage (the codec's ``model.encode(x)`` returns the posterior, an object with ``.mean`` and
    ``.std``: ldm's :class:`~ldm.first_stage.KLCodec`; a diffusers VAE's ``latent_dist`` likewise) the posterior's
    mean and standard deviation, in the codec's scaled units, so that ``latents + std · ε`` is a sample of q(z|x)
    scaled as ``codec.encode`` scales. For any other codec (deterministic first stages such as taming's VQGAN, or
    :class:`~gencore.latents.IdentityCodec`) ``codec.encode(x)`` and a zero ``std``.

    ``__qualname__`` is stable (``PosteriorMoments.posterior`` / ``.deterministic``): the latent cache's fingerprint
    uses it.
    """

    def __init__(self, codec: FrozenCodec) -> None:
        if not all(hasattr(codec, a) for a in ("encode", "scale", "shift")):
            raise ValueError(
                "posterior_moments: expected a gencore FrozenCodec (encode / scale / shift), "
                f"got {type(codec).__name__}"
            )
        self.codec = codec
        model = getattr(codec, "model", None)
        if callable(getattr(codec, "vae", None)) and hasattr(getattr(codec, "vae", None), "encode"):
            self.kind = "diffusers"  # gencore.latents.DiffusersVAECodec
        elif callable(getattr(model, "encode", None)) and not hasattr(model, "quantize"):
            self.kind = "posterior"  # ldm's KLCodec (a VQ model's encode quantises and returns no posterior)
        else:
            self.kind = "deterministic"
        self.__qualname__ = f"PosteriorMoments.{'deterministic' if self.kind == 'deterministic' else 'posterior'}"

    def _posterior(self, x: Tensor) -> Any:
        codec = self.codec
        if self.kind == "diffusers":
            return codec.vae.encode(x.to(codec.vae.dtype)).latent_dist  # type: ignore[attr-defined]
        posterior = codec.model.encode(x)  # type: ignore[attr-defined]
        if not (hasattr(posterior, "mean") and hasattr(posterior, "std")):
            raise ValueError(
                f"posterior_moments: {type(codec).__name__}.model.encode returned {type(posterior).__name__}, "
                "not a posterior with .mean and .std"
            )
        return posterior

    @torch.no_grad()
    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        codec = self.codec
        if self.kind == "deterministic":
            z = codec.encode(x)
            return {"latents": z, "std": torch.zeros_like(z)}
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"posterior_moments: x must be (B, C, H, W), got {getattr(x, 'shape', x)}")
        if hasattr(codec, "_check_size"):
            codec._check_size(x.shape[2], x.shape[3])
        posterior = self._posterior(x)
        mean, std = posterior.mean.to(x.dtype), posterior.std.to(x.dtype)
        return {"latents": (mean - codec.shift) * codec.scale, "std": std * codec.scale}

    def __repr__(self) -> str:
        return f"PosteriorMoments({type(self.codec).__name__}, {self.kind})"


def posterior_moments(codec: FrozenCodec) -> Callable[[Tensor], dict[str, Tensor]]:
    """The encode function for :func:`gencore.latents.build_latent_cache` that stores the posterior's scaled mean
    and standard deviation (zero for deterministic first stages); see :class:`PosteriorMoments`."""
    return PosteriorMoments(codec)


# --------------------------------------------------------------------------------------------- datamodules


CodecLike = FrozenCodec | Callable[[], FrozenCodec]


class LatentUnionDataModule(DataModule):
    """The union's first-stage latents, cached once: items ``{"latent": (c, h, w), "std": (c, h, w), "label": int,
    "dataset": 0-d long tensor}``.

    ``codec`` is a gencore ``FrozenCodec`` or a zero-argument factory of one (Hydra:
    ``{_target_: ldm.first_stage.kl_codec, path: ..., _partial_: true}``), built on first use (``prepare_data`` /
    ``setup`` / :attr:`codec`), never in ``__init__``. The caches live in ``cache_dir/train`` (the *unbalanced* train
    union: each image encoded once) and ``cache_dir/val``, made by :func:`gencore.latents.build_latent_cache` with
    :func:`posterior_moments` and reused while their fingerprint (codec weights and scale, the union's fingerprint)
    holds. ``per_member`` balances training over the cached items by index, choosing the items
    :class:`DatasetUnion` would (same :func:`balanced_indices`, same ``seed``); validation reads every cached item
    once. ``limit`` caps each member of both splits, ``val_limit`` of the validation split (so that a validation of
    a few batches sees every member, not only the first). ``encode_device`` (e.g. ``"cuda"``; ``"auto"``: CUDA when
    available) moves the codec there for encoding and back afterwards; None encodes where the codec is.
    """

    def __init__(
        self,
        codec: CodecLike,
        cache_dir: str | os.PathLike,
        members: Sequence[str] = DEFAULT_MEMBERS,
        image_size: int = 32,
        channels: int = 1,
        per_member: int | None = None,
        limit: int | None = None,
        val_limit: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        encode_batch_size: int = 256,
        encode_device: str | None = None,
        seed: int = 0,
        **loader_kwargs: Any,
    ) -> None:
        where = "LatentUnionDataModule"
        self.names = _check_member_names(members, where)
        self.image_size, self.channels = _check_image(image_size, channels, where)
        self.per_member = _check_count("per_member", per_member, where)
        self.limit = _check_count("limit", limit, where)
        self.val_limit = _check_count("val_limit", val_limit, where)
        self.encode_batch_size = _check_count("encode_batch_size", encode_batch_size, where)
        seed = _check_seed(seed, where)
        if isinstance(codec, FrozenCodec):
            self._codec: FrozenCodec | None = codec
            self._codec_factory: Callable[[], FrozenCodec] | None = None
        elif callable(codec):
            self._codec, self._codec_factory = None, codec
        else:
            raise ValueError(f"{where}: codec must be a FrozenCodec or a factory returning one, got {codec!r}")
        if cache_dir is None or str(cache_dir) == "":
            raise ValueError(f"{where}: cache_dir is required (the folder the latent caches are written to)")
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, **loader_kwargs)
        self.cache_dir = Path(cache_dir)
        self.encode_device = encode_device
        self.latent_shape: tuple[int, ...] | None = None
        self.train_cache: LatentCacheDataset | None = None
        self._caches_checked = False  # prepare_data built / checked the caches in this process

    @property
    def num_datasets(self) -> int:
        return len(self.names)

    def dataset_index(self, name: str) -> int:
        if name not in self.names:
            raise ValueError(f"LatentUnionDataModule: {name!r} is not a member; its members are {list(self.names)}")
        return self.names.index(name)

    @property
    def codec(self) -> FrozenCodec:
        """The first stage (built from the factory on first access)."""
        if self._codec is None:
            built = self._codec_factory()  # type: ignore[misc]
            if not isinstance(built, FrozenCodec):
                raise ValueError(
                    f"LatentUnionDataModule: the codec factory returned {type(built).__name__}, not a FrozenCodec"
                )
            self._codec = built
        codec = self._codec
        if getattr(codec, "in_channels", self.channels) != self.channels:
            raise ValueError(
                f"LatentUnionDataModule: channels={self.channels} but the codec takes "
                f"{codec.in_channels}-channel images"
            )
        codec.latent_shape((self.image_size, self.image_size))  # image size divisible by f, or a clear error
        return codec

    def union(self, split: str) -> DatasetUnion:
        """The image union a split's cache encodes (unbalanced, unflipped)."""
        limit = self.limit if split == "train" else _smaller(self.limit, self.val_limit)
        return DatasetUnion(
            self.names, split, self.image_size, self.channels, per_member=None, limit=limit, seed=self.seed
        )

    def cache_path(self, split: str) -> Path:
        return self.cache_dir / _check_split(split, "LatentUnionDataModule.cache_path")

    def _encode_device(self) -> torch.device | None:
        if self.encode_device is None:
            return None
        if self.encode_device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.encode_device)

    def build_caches(self) -> dict[str, Path]:
        """Encode the train and val unions into their caches (or find them up to date); the cache folders."""
        codec = self.codec
        encode = posterior_moments(codec)
        device = self._encode_device()
        home = next(codec.parameters(), torch.empty(0)).device
        if device is not None and device != home:
            codec.to(device)
        try:
            return {
                split: build_latent_cache(
                    codec,
                    self.union(split),
                    self.cache_path(split),
                    encode=encode,
                    keys=("label", "dataset"),
                    batch_size=self.encode_batch_size,
                    num_workers=self.num_workers,
                )
                for split in SPLITS
            }
        finally:
            if device is not None and device != home:
                codec.to(home)

    def prepare_data(self) -> None:
        self.build_caches()
        self._caches_checked = True

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self._caches_checked:  # (another DDP process, or setup called directly: check / build them here)
            self.build_caches()
        train_union = self.union("train")
        train = LatentCacheDataset(self.cache_path("train"))
        val = LatentCacheDataset(self.cache_path("val"))
        expected = np.repeat(np.arange(len(self.names)), train_union.sizes)
        stored = train.extra.get("dataset")
        if stored is None or len(stored) != len(expected) or not np.array_equal(stored.numpy(), expected):
            raise RuntimeError(
                f"LatentUnionDataModule: the train cache in {self.cache_path('train')} does not hold the union "
                f"{dict(zip(self.names, train_union.sizes, strict=True))} in order (delete it to rebuild)"
            )
        self.train_cache = train
        if self.per_member is None:
            self.train_set = train
        else:
            offsets = np.concatenate([[0], np.cumsum(train_union.sizes)[:-1]])
            member_of, local = _union_index(self.names, train_union.sizes, self.per_member, self.seed)
            self.train_set = Subset(train, (offsets[member_of] + local).tolist())
        self.val_set = val
        self.latent_shape = tuple(int(s) for s in train.index["latent_shape"])
        log.info(
            "latent union: %d train items (%s cached), %d val, latents %s",
            len(self.train_set),
            ", ".join(f"{n}={c}" for n, c in zip(self.names, train_union.sizes, strict=True)),
            len(val),
            self.latent_shape,
        )


class UnionDataModule(DataModule):
    """The union's images, for training the autoencoder on it: the train union (``random_flip`` and ``per_member``
    as given) and the val union (no flips, no balancing; each member capped at ``val_limit``)."""

    def __init__(
        self,
        members: Sequence[str] = DEFAULT_MEMBERS,
        image_size: int = 32,
        channels: int = 1,
        per_member: int | None = None,
        limit: int | None = None,
        val_limit: int | None = None,
        random_flip: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        **loader_kwargs: Any,
    ) -> None:
        where = "UnionDataModule"
        names = _check_member_names(members, where)
        image_size, channels = _check_image(image_size, channels, where)
        per_member = _check_count("per_member", per_member, where)
        limit = _check_count("limit", limit, where)
        val_limit = _smaller(limit, _check_count("val_limit", val_limit, where))
        seed = _check_seed(seed, where)
        common = dict(members=names, image_size=image_size, channels=channels, seed=seed)
        super().__init__(
            train=lambda: DatasetUnion(
                split="train", per_member=per_member, random_flip=random_flip, limit=limit, **common
            ),
            val=lambda: DatasetUnion(split="val", limit=val_limit, **common),
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            **loader_kwargs,
        )
        self.names = names
        self.image_size, self.channels = image_size, channels  # what gencore.validate.check_fits compares
        self.per_member, self.limit, self.random_flip = per_member, limit, bool(random_flip)

    @property
    def num_datasets(self) -> int:
        return len(self.names)
