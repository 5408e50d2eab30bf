"""Data for Gen-1 (Esser et al. 2023, arXiv 2302.03011, Sec. 3.2 / 4): video clips from real videos, and image batches
for joint image / video training.

- :class:`Clips` extends gencore's :class:`~gencore.data.video.VideoClips` (decord, OpenCV fallback, unreadable files
  skipped and counted, a clear :class:`~gencore.data.DataReadError` naming every skipped file and why when none is
  readable): ``channels=1`` gives grey clips (BT.601 luma, for the Fashion-MNIST autoencoder of the toy setting),
  ``cache=True`` decodes each video once (sequentially, in chunks, resized as it goes) and keeps its frames in memory,
  so a clip costs a slice instead of a decode (small toy sizes; the opencv-doc ``Megamind.avi`` must be read
  sequentially by OpenCV, which per clip would decode from its first frame every time).
- :class:`JointClips` pairs each clip with ``images_per_clip`` images drawn at random from an image dataset (e.g.
  Fashion-MNIST, the scikit-image photos): the image batch of joint training, trained in image mode.
- :class:`Gen1DataModule` builds both on gencore's :class:`~gencore.data.DataModule` (resumable sampler, seeded
  validation split).
- :func:`read_video`: one whole input video for editing; an undecodable file or one with fewer frames than asked for
  is a ``ValueError`` naming the file and the counts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from gencore.data import DataModule, VideoClips, read_frames, resize_center_crop, video_info
from gencore.data.video import frames_to_tensor, video_files, write_video

log = logging.getLogger(__name__)

__all__ = ["Clips", "Gen1DataModule", "JointClips", "read_video", "to_channels", "write_video"]

_CHUNK = 96  # frames decoded per read when caching a whole video


def to_channels(x: Tensor, channels: int, dim: int = -3) -> Tensor:
    """RGB in [-1, 1] -> ``channels`` (1: BT.601 luma, as ``cv2.COLOR_RGB2GRAY``; 3: unchanged) along ``dim``."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if x.shape[dim] != 3:
        raise ValueError(f"expected RGB along dim {dim}, got shape {tuple(x.shape)}")
    if channels == 3:
        return x
    shape = [1] * x.dim()
    shape[dim] = 3
    w = x.new_tensor([0.299, 0.587, 0.114]).reshape(shape)
    return (x * w).sum(dim=dim, keepdim=True)


def _frames_to_tensor(frames: Any, size: int | Sequence[int] | None, channels: int) -> Tensor:
    """uint8 (T, H, W, 3) -> (T, C, h, w) floats in [-1, 1], resized (short side) and centre-cropped unless ``size``
    is None."""
    x = frames_to_tensor(frames)
    return to_channels(x if size is None else resize_center_crop(x, size), channels)


class Clips(VideoClips):
    """:class:`~gencore.data.video.VideoClips` with ``channels`` (1: grey, 3: RGB) and an in-memory ``cache`` of each
    video's resized frames (decoded once, sequentially). Items: ``{"video": (C, T, H, W) in [-1, 1], "path", "start",
    "fps"}``. The other arguments are VideoClips' (``paths`` None: the opencv-doc sample videos)."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
        num_frames: int = 8,
        stride: int = 1,
        fps: float | None = None,
        size: int | Sequence[int] = 32,
        channels: int = 3,
        cache: bool = False,
        clip_step: int | None = None,
        max_clips_per_video: int | None = None,
        backend: str = "auto",
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"Clips: channels must be 1 (grey) or 3 (RGB), got {channels}")
        super().__init__(
            paths,
            num_frames=num_frames,
            stride=stride,
            fps=fps,
            size=size,
            clip_step=clip_step,
            max_clips_per_video=max_clips_per_video,
            backend=backend,
            random_flip=random_flip,
            seed=seed,
        )
        self.channels, self.cache = channels, bool(cache)
        self._frames: dict[int, Tensor] = {}

    def _video_frames(self, v: int) -> Tensor:
        """Every frame of video ``v`` that a clip uses, resized: (N, C, H, W)."""
        if v not in self._frames:
            info = self.videos[v]
            last = max(s + (self.num_frames - 1) * st for (vi, s, st) in self.clips if vi == v)
            chunks = []
            for lo in range(0, last + 1, _CHUNK):
                idx = list(range(lo, min(lo + _CHUNK, last + 1)))
                chunks.append(_frames_to_tensor(read_frames(info.path, idx, info.backend), self.size, self.channels))
            self._frames[v] = torch.cat(chunks)
        return self._frames[v]

    def _load_item(self, i: int) -> dict[str, Any]:
        if not self.cache:
            item = super()._load_item(i)
            return {**item, "video": to_channels(item["video"], self.channels, dim=0)}
        v, start, step = self.clips[i]
        info = self.videos[v]
        x = self._video_frames(v)[start : start + self.num_frames * step : step]  # (T, C, H, W)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {
            "video": x.permute(1, 0, 2, 3).contiguous(),
            "path": info.path,
            "start": start,
            "fps": info.fps / step if info.fps > 0 else 0.0,
        }


class JointClips(Dataset):
    """Clips, each with ``images_per_clip`` images of ``images`` (drawn uniformly with the torch RNG, which the
    training run seeds and :class:`gencore.resume.ExactResume` restores): items ``{"video": (C, T, H, W), "image":
    (K, C, H, W)}`` (no ``image`` when ``images`` is None or K = 0). The images must match the clips' channels and
    size."""

    def __init__(self, clips: Dataset, images: Dataset | None = None, images_per_clip: int = 0) -> None:
        if images_per_clip < 0:
            raise ValueError(f"images_per_clip must be >= 0, got {images_per_clip}")
        if images is not None and images_per_clip > 0:
            if len(images) == 0:  # type: ignore[arg-type]
                raise ValueError("the image dataset of joint training is empty")
            video = clips[0]["video"]
            image = images[0]["image"]
            if image.shape[0] != video.shape[0] or tuple(image.shape[-2:]) != tuple(video.shape[-2:]):
                raise ValueError(
                    f"joint training: images are {tuple(image.shape)} (C, H, W) but clip frames are "
                    f"{(video.shape[0], *video.shape[-2:])}: give both the same channels and size"
                )
        self.clips, self.images, self.images_per_clip = clips, images, int(images_per_clip)

    def __len__(self) -> int:
        return len(self.clips)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"video": self.clips[i]["video"]}
        if self.images is not None and self.images_per_clip > 0:
            idx = torch.randint(0, len(self.images), (self.images_per_clip,)).tolist()  # type: ignore[arg-type]
            item["image"] = torch.stack([self.images[j]["image"] for j in idx])
        return item


class Gen1DataModule(DataModule):
    """Clips of real videos (default: the opencv-doc samples) for Gen-1 training, plus optional image batches for
    joint training (``images``: a zero-argument dataset factory, e.g. a Hydra ``_partial_`` node of
    ``gencore.data.FashionMNIST``; ``images_per_clip`` images ride along with each clip). ``val_paths`` or
    ``val_fraction`` (of the clips) for validation. Clip arguments as :class:`Clips`."""

    def __init__(
        self,
        paths: Sequence[str] | str | None = None,
        val_paths: Sequence[str] | str | None = None,
        num_frames: int = 8,
        stride: int = 1,
        fps: float | None = None,
        size: int = 32,
        channels: int = 3,
        cache: bool = False,
        clip_step: int | None = None,
        max_clips_per_video: int | None = None,
        backend: str = "auto",
        random_flip: bool = False,
        images: Callable[[], Dataset] | None = None,
        images_per_clip: int = 0,
        val_fraction: float = 0.1,
        **loader_kwargs: Any,
    ) -> None:
        if images is not None and not callable(images):
            raise ValueError(f"images must be a dataset factory (a _partial_ node), got {type(images).__name__}")
        if images_per_clip < 0:
            raise ValueError(f"images_per_clip must be >= 0, got {images_per_clip}")
        common = dict(
            num_frames=num_frames,
            stride=stride,
            fps=fps,
            size=size,
            channels=channels,
            cache=cache,
            clip_step=clip_step,
            max_clips_per_video=max_clips_per_video,
            backend=backend,
        )
        for named in (paths, val_paths):  # a missing file is a config mistake: refuse it now, not at setup
            if named is not None:
                video_files(named)
        k = images_per_clip if images is not None else 0

        def train() -> Dataset:
            return JointClips(
                Clips(paths, random_flip=random_flip, **common), images() if k else None, images_per_clip=k
            )

        super().__init__(
            train=train,
            val=(lambda: JointClips(Clips(val_paths, **common))) if val_paths is not None else None,
            val_fraction=0.0 if val_paths is not None else val_fraction,
            **loader_kwargs,
        )
        self.image_size, self.channels, self.num_frames = size, channels, num_frames
        self.images_per_clip = k


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    *,
    stride: int = 1,
    start: int = 0,
    size: int | Sequence[int] | None = None,
    channels: int = 3,
    backend: str = "auto",
) -> tuple[Tensor, float]:
    """Frames ``start, start + stride, ...`` (``num_frames`` of them; None: as many as the video holds) of one video
    as (C, T, H, W) in [-1, 1] (resized and centre-cropped to ``size`` when given), and their frame rate.

    Raises FileNotFoundError for a missing file, ValueError naming the file for one that does not decode, and for
    one with fewer frames than asked for (with both counts)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input video {p} does not exist")
    if stride < 1 or start < 0 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"need num_frames >= 1, stride >= 1, start >= 0; got {num_frames}, {stride}, {start}")
    try:
        info = video_info(p, backend)
    except OSError as err:
        raise ValueError(f"cannot decode video {p}: {err}") from err
    available = max(0, (info.num_frames - start + stride - 1) // stride)
    if num_frames is None:
        num_frames = available
    need = start + (num_frames - 1) * stride + 1
    if num_frames < 1 or info.num_frames < need:
        raise ValueError(
            f"video {p} has {info.num_frames} decodable frames; {num_frames} frames with stride {stride} from frame "
            f"{start} need {need}"
        )
    try:
        frames = read_frames(p, list(range(start, need, stride)), info.backend)
    except OSError as err:
        raise ValueError(f"cannot decode video {p}: {err}") from err
    x = _frames_to_tensor(frames, size, channels)  # (T, C, H, W)
    fps = info.fps / stride if info.fps > 0 else 0.0
    return x.permute(1, 0, 2, 3).contiguous(), fps
