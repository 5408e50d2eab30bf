"""Video clips through decord (OpenCV fallback): items ``{"video": (C, T, H, W) in [-1, 1], "path", "start", "fps"}``.

Default videos: the four real clips of the Debian ``opencv-doc`` package (``vtest.avi`` street scene, ``tree.avi``,
``Megamind.avi``, ``Megamind_bugy.avi``). Every video is opened once at construction to learn its real frame count
(headers lie: ``tree.avi`` claims 444 frames and holds 68); files that do not open, or hold fewer frames than one clip
needs, are skipped with a warning and counted. A read that fails later skips that clip the same way.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gencore.data._robust import DataReadError, RobustItems
from gencore.data.images import resize_center_crop

log = logging.getLogger(__name__)

__all__ = [
    "OPENCV_SAMPLES",
    "OPENCV_SAMPLE_VIDEOS",
    "VIDEO_BACKENDS",
    "VideoClips",
    "opencv_sample_videos",
    "read_frames",
    "video_info",
]

OPENCV_SAMPLES = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_SAMPLE_VIDEOS = ("vtest.avi", "tree.avi", "Megamind.avi", "Megamind_bugy.avi")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".webm", ".m4v")
VIDEO_BACKENDS = ("auto", "decord", "opencv")


def opencv_sample_videos(names: Sequence[str] = OPENCV_SAMPLE_VIDEOS) -> list[Path]:
    """Paths of the opencv-doc sample videos; FileNotFoundError naming the package when they are missing."""
    paths = [OPENCV_SAMPLES / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"OpenCV sample videos missing: {', '.join(map(str, missing))}; install the Debian package opencv-doc "
            "(`make data`)"
        )
    return paths


def _resolve_backend(backend: str) -> str:
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; valid: {', '.join(VIDEO_BACKENDS)}")
    if backend == "auto":
        try:
            import decord  # noqa: F401
        except ImportError:
            return "opencv"
        return "decord"
    return backend


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int  # frames that actually decode
    fps: float
    height: int
    width: int


def video_info(path: str | os.PathLike, backend: str = "auto") -> VideoInfo:
    """Open ``path`` and return its real frame count, fps and size; raises OSError when it does not open."""
    backend = _resolve_backend(backend)
    path = str(path)
    if backend == "decord":
        import decord

        try:
            vr = decord.VideoReader(path, ctx=decord.cpu(0))
        except (RuntimeError, decord.DECORDError) as err:
            raise OSError(f"decord cannot open {path}: {str(err).splitlines()[0]}") from err
        if len(vr) == 0:
            raise OSError(f"{path}: no decodable frames")
        h, w = vr[0].shape[:2]
        return VideoInfo(path, len(vr), float(vr.get_avg_fps()), int(h), int(w))
    import cv2

    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise OSError(f"OpenCV cannot open {path}")
        fps = float(cap.get(cv2.CAP_PROP_FPS)) or 0.0
        n = 0
        while cap.grab():  # count frames that decode; CAP_PROP_FRAME_COUNT trusts the header
            n += 1
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        cap.release()
    if n == 0:
        raise OSError(f"{path}: no decodable frames")
    return VideoInfo(path, n, fps, h, w)


def read_frames(path: str | os.PathLike, indices: Sequence[int], backend: str = "auto") -> np.ndarray:
    """Frames ``indices`` (sorted ascending) of a video as uint8 (T, H, W, 3) RGB."""
    backend = _resolve_backend(backend)
    idx = [int(i) for i in indices]
    if not idx or any(b < a for a, b in itertools.pairwise(idx)) or idx[0] < 0:
        raise ValueError(f"read_frames: indices must be non-empty, non-negative and ascending, got {idx[:8]}")
    if backend == "decord":
        import decord

        try:
            vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
            if idx[-1] >= len(vr):
                raise OSError(f"{path}: frame {idx[-1]} requested, video has {len(vr)}")
            return vr.get_batch(idx).asnumpy()
        except (RuntimeError, decord.DECORDError) as err:
            raise OSError(f"decord failed reading {path}: {str(err).splitlines()[0]}") from err
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames: list[np.ndarray] = []
    try:
        if not cap.isOpened():
            raise OSError(f"OpenCV cannot open {path}")
        want = set(idx)
        for i in range(idx[-1] + 1):
            if i in want:
                ok, frame = cap.read()
                if not ok:
                    break
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            elif not cap.grab():
                break
    finally:
        cap.release()
    if len(frames) != len(idx):
        raise OSError(f"{path}: only {len(frames)} of {len(idx)} requested frames decoded")
    return np.stack(frames)


class VideoClips(RobustItems, Dataset):
    """Fixed-length clips from a set of videos.

    Args:
        paths: video files, or a folder (searched recursively); default: the opencv-doc sample videos.
        num_frames: frames per clip (T).
        stride: take every ``stride``-th frame. ``fps`` instead resamples to that frame rate (stride =
            round(native_fps / fps), at least 1); give one of them.
        size: output (H, W) (or an int): short side resized, then centre-cropped.
        clip_step: frames between consecutive clip starts (default: one clip span, i.e. non-overlapping).
        max_clips_per_video: keep at most this many clips per video, evenly spread.
        backend: ``auto`` (decord when installed, else OpenCV), ``decord`` or ``opencv``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
        num_frames: int = 8,
        stride: int = 1,
        fps: float | None = None,
        size: int | Sequence[int] = 64,
        clip_step: int | None = None,
        max_clips_per_video: int | None = None,
        backend: str = "auto",
        random_flip: bool = False,
    ) -> None:
        self._init_robust("VideoClips")
        if num_frames < 1:
            raise ValueError(f"VideoClips: num_frames must be >= 1, got {num_frames}")
        if stride < 1:
            raise ValueError(f"VideoClips: stride must be >= 1, got {stride}")
        if fps is not None and fps <= 0:
            raise ValueError(f"VideoClips: fps must be > 0, got {fps}")
        if clip_step is not None and clip_step < 1:
            raise ValueError(f"VideoClips: clip_step must be >= 1, got {clip_step}")
        self.backend = _resolve_backend(backend)
        if paths is None:
            files = opencv_sample_videos()
        elif isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
            files = sorted(p for p in Path(paths).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
        else:
            files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        if not files:
            raise DataReadError(f"VideoClips: no video files in {paths}")
        self.num_frames, self.size, self.random_flip = num_frames, size, random_flip
        self.videos: list[VideoInfo] = []
        self.clips: list[tuple[int, int, int]] = []  # (video index, first frame, stride)
        for f in files:
            try:
                info = video_info(f, self.backend)
            except OSError as err:
                self.skip_log.skip(str(f), str(err))
                continue
            step = stride if fps is None else max(1, round(info.fps / fps)) if info.fps > 0 else stride
            span = (num_frames - 1) * step + 1
            if info.num_frames < span:
                self.skip_log.skip(str(f), f"only {info.num_frames} decodable frame(s), a clip needs {span}")
                continue
            starts = list(range(0, info.num_frames - span + 1, clip_step or span))
            if max_clips_per_video is not None and len(starts) > max_clips_per_video:
                pick = np.linspace(0, len(starts) - 1, max_clips_per_video).round().astype(int)
                starts = [starts[i] for i in pick]
            self.videos.append(info)
            self.clips.extend((len(self.videos) - 1, s, step) for s in starts)
        if not self.clips:
            raise DataReadError(f"VideoClips: no readable clip in {len(files)} file(s); skipped: {self.skipped}")
        log.info(
            "VideoClips: %d clips from %d videos (%d skipped)", len(self.clips), len(self.videos), self.num_skipped
        )

    def _num_items(self) -> int:
        return len(self.clips)

    def _item_path(self, i: int) -> str:
        return self.videos[self.clips[i][0]].path

    def _load_item(self, i: int) -> dict[str, Any]:
        v, start, step = self.clips[i]
        info = self.videos[v]
        frames = read_frames(info.path, range(start, start + self.num_frames * step, step), self.backend)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (T, C, H, W)
        x = resize_center_crop(x, self.size)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {
            "video": x.permute(1, 0, 2, 3).contiguous(),
            "path": info.path,
            "start": start,
            "fps": info.fps / step if info.fps > 0 else 0.0,
        }
