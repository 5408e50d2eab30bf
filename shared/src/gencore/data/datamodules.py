"""LightningDataModules over the gencore datasets (and any other ``Dataset``).

:class:`DataModule` takes datasets (or zero-argument factories, e.g. Hydra ``_partial_: true`` nodes, built lazily in
``setup``); the named subclasses wire the real datasets with sensible splits so a config can say
``data: fashion_mnist`` and only override sizes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from gencore.data.fashion_mnist import FashionMNIST, find_fashion_mnist
from gencore.data.images import SKIMAGE_PHOTOS, ImageFolder, SkimagePhotos
from gencore.data.video import VideoClips, video_files
from gencore.resume import ResumableSampler

__all__ = [
    "DataModule",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "SkimagePhotosDataModule",
    "VideoDataModule",
]

DatasetLike = Dataset | Callable[[], Dataset] | None


def _build(ds: DatasetLike) -> Dataset | None:
    if ds is None or isinstance(ds, Dataset):
        return ds
    if callable(ds):
        built = ds()
        if not isinstance(built, Dataset):
            raise ValueError(f"dataset factory returned {type(built).__name__}, not a torch Dataset")
        return built
    raise ValueError(f"expected a Dataset or a factory returning one, got {type(ds).__name__}")


def _without_augmentation(ds: Dataset) -> Dataset:
    """``ds`` for evaluation: a shallow copy with ``random_flip`` off, so a validation split is not augmented."""
    if getattr(ds, "random_flip", False):
        ds = copy.copy(ds)
        ds.random_flip = False  # type: ignore[attr-defined]
    return ds


class DataModule(L.LightningDataModule):
    """Train / val / test datasets -> DataLoaders.

    ``val_fraction`` splits a validation set off ``train`` (seeded) when no ``val`` is given; the validation part
    reads the same items without the training augmentation (``random_flip``).
    """

    def __init__(
        self,
        train: DatasetLike = None,
        val: DatasetLike = None,
        test: DatasetLike = None,
        *,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pin_memory: bool = False,
        val_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"DataModule: batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"DataModule: num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"DataModule: val_fraction must be in [0, 1), got {val_fraction}")
        self._train, self._val, self._test = train, val, test
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.shuffle, self.drop_last, self.pin_memory = num_workers, shuffle, drop_last, pin_memory
        self.val_fraction, self.seed = val_fraction, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or self.val_set is not None or self.test_set is not None:
            return
        train, val, test = _build(self._train), _build(self._val), _build(self._test)
        if train is not None and val is None and self.val_fraction > 0:
            n = len(train)  # type: ignore[arg-type]
            n_val = max(1, round(n * self.val_fraction))
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
            train, val = Subset(train, perm[n_val:]), Subset(_without_augmentation(train), perm[:n_val])
        self.train_set, self.val_set, self.test_set = train, val, test

    def _loader(self, ds: Dataset | None, name: str, train: bool) -> DataLoader:
        if ds is None:
            raise ValueError(f"{type(self).__name__}: no {name} dataset configured")
        bs = self.batch_size if train else self.val_batch_size
        # training draws its order from a ResumableSampler: a function of (seed, epoch), split over DDP processes,
        # able to start an epoch where a checkpoint left it (gencore.resume); evaluation reads in order
        # (seeded with the datamodule's seed plus the run's, which lightning.seed_everything puts in PL_GLOBAL_SEED)
        seed = self.seed + int(os.environ.get("PL_GLOBAL_SEED", "0"))
        # (trainer.overfit_batches: the same first batches every step, in order, as Lightning would make them)
        overfit = self.trainer is not None and bool(self.trainer.overfit_batches)
        sampler = ResumableSampler(len(ds), shuffle=self.shuffle, seed=seed) if train and not overfit else None  # type: ignore[arg-type]
        return DataLoader(
            ds,
            batch_size=bs,
            sampler=sampler,
            drop_last=self.drop_last and train and len(ds) >= bs,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set or self.val_set, "test", False)


class FashionMNISTDataModule(DataModule):
    """Fashion-MNIST: train split for training, the 10,000-image test split for validation/test. ``wrap`` turns each
    split into another dataset over it (e.g. ``{_target_: gencore.data.InstructionEdits, _partial_: true}`` for edit
    pairs, :mod:`gencore.data.pairs`)."""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        image_size: int = 28,
        channels: int = 1,
        classes: list[int] | None = None,
        limit_train: int | None = None,
        limit_val: int | None = 1000,
        random_flip: bool = False,
        caption_template: str = "a photo of a {name}",
        wrap: Callable[[Dataset], Dataset] | None = None,
        **loader_kwargs: Any,
    ) -> None:
        find_fashion_mnist(root)  # a wrong root is one clear error now, not a traceback from inside fit
        common = dict(
            root=root, image_size=image_size, channels=channels, classes=classes, caption_template=caption_template
        )
        if wrap is not None and not callable(wrap):
            raise ValueError(f"wrap must be a callable (a _partial_ dataset node), got {type(wrap).__name__}")
        wrapped = wrap or (lambda ds: ds)
        super().__init__(
            train=lambda: wrapped(FashionMNIST(split="train", limit=limit_train, random_flip=random_flip, **common)),
            val=lambda: wrapped(FashionMNIST(split="test", limit=limit_val, **common)),
            **loader_kwargs,
        )
        self.image_size, self.channels = image_size, channels  # what gencore.validate.check_fits compares


class ImageFolderDataModule(DataModule):
    """A folder of images; ``val_fraction`` of it (default 5%) held out for validation."""

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | Sequence[int] = 64,
        channels: int = 3,
        labels: str | None = None,
        random_flip: bool = False,
        val_fraction: float = 0.05,
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(
            train=lambda: ImageFolder(root, size=size, channels=channels, labels=labels, random_flip=random_flip),
            val_fraction=val_fraction,
            **loader_kwargs,
        )
        self.image_size = size if isinstance(size, int) else None
        self.channels = channels


class SkimagePhotosDataModule(DataModule):
    """The scikit-image photos: random crops for training, centre crops of every photo for validation."""

    def __init__(
        self,
        size: int | Sequence[int] = 64,
        names: Sequence[str] = SKIMAGE_PHOTOS,
        crops_per_image: int = 64,
        crop_scale: tuple[float, float] = (0.3, 1.0),
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(
            train=lambda: SkimagePhotos(
                size=size, names=names, crops_per_image=crops_per_image, crop_scale=tuple(crop_scale), fresh_crops=True
            ),
            val=lambda: SkimagePhotos(size=size, names=names, crops_per_image=1),
            **loader_kwargs,
        )


class VideoDataModule(DataModule):
    """Clips from videos (default: the opencv-doc samples); ``val_paths`` or ``val_fraction`` for validation."""

    def __init__(
        self,
        paths: Sequence[str] | str | None = None,
        val_paths: Sequence[str] | str | None = None,
        num_frames: int = 8,
        stride: int = 1,
        fps: float | None = None,
        size: int | Sequence[int] = 64,
        clip_step: int | None = None,
        backend: str = "auto",
        random_flip: bool = False,
        val_fraction: float = 0.1,
        **loader_kwargs: Any,
    ) -> None:
        for named in (paths, val_paths):  # a missing file is a config mistake: refused now, not at setup
            if named is not None:
                video_files(named)
        common = dict(num_frames=num_frames, stride=stride, fps=fps, size=size, clip_step=clip_step, backend=backend)
        super().__init__(
            train=lambda: VideoClips(paths, random_flip=random_flip, **common),
            val=(lambda: VideoClips(val_paths, **common)) if val_paths is not None else None,
            val_fraction=0.0 if val_paths is not None else val_fraction,
            **loader_kwargs,
        )
