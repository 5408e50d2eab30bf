"""Video clips through decord (OpenCV fallback): items ``{"video": (C, T, H, W) in [-1, 1], "path", "start", "fps"}``.

Default videos: the four real clips of the Debian ``opencv-doc`` package (``vtest.avi`` street scene, ``tree.avi``,
``Megamind.avi``, ``Megamind_bugy.avi``). Every video is opened once at construction to learn its real frame count
(headers lie: ``tree.avi`` claims 444 frames and holds 68); files that do not open, or hold fewer frames than one clip
needs, are skipped with a warning and counted. A read that fails later skips that clip the same way (a random readable
clip takes its slot).

Wrong frames are never returned in silence. decord's random access is checked once per file against a sequential
decode: where it is wrong (a truncated AVI has lost its keyframe index; ``Megamind.avi``'s index does not match its
packed B-frames) the file is read with OpenCV, with a warning. The last decodable frame of a truncated AVI is cut
mid-picture (the decoder conceals the missing rows) and is not used.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
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
    "VideoInfo",
    "avi_truncated",
    "frames_to_tensor",
    "opencv_sample_videos",
    "read_frames",
    "video_files",
    "video_info",
    "write_video",
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


def _decord() -> Any:
    """The decord module, imported after OpenCV: decord's wheel bundles zlib 1.2.3, and loaded first it breaks
    OpenCV's PNG reader for the whole process (``libpng error: bad parameters to zlib``, every imread -> None)."""
    import cv2  # noqa: F401
    import decord

    return decord


def _resolve_backend(backend: str) -> str:
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; valid: {', '.join(VIDEO_BACKENDS)}")
    if backend == "auto":
        try:
            _decord()
        except ImportError:
            return "opencv"
        return "decord"
    return backend


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int  # frames that decode completely (a truncated AVI's cut last frame is not counted)
    fps: float
    height: int
    width: int
    backend: str = "opencv"  # the backend that reads this file correctly (decord may fall back to OpenCV)
    note: str = ""  # why the file is read differently from what was asked, if it is


# Mean absolute difference (of 255) above which a frame read by seeking is not the frame decoded sequentially.
SEEK_TOLERANCE = 1.0
_seek_checks: dict[tuple[str, int, int], str | None] = {}  # per process: (path, size, mtime) -> problem or None
_logged: set[str] = set()


def _warn(msg: str) -> None:
    """A RuntimeWarning (Python's filters show each message once by default), logged once per process."""
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def avi_truncated(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an AVI whose RIFF chunks run past the end of the file (cut off: an interrupted copy or
    download). Such a file has lost its keyframe index (``idx1`` is written last) and its last decodable frame is cut
    mid-picture: the decoders fill in the missing rows and report no error."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    pos = 0
    with open(path, "rb") as f:
        while pos + 12 <= size:
            f.seek(pos)
            head = f.read(12)
            if head[:4] != b"RIFF" or head[8:12] not in (b"AVI ", b"AVIX"):  # not an AVI, or a trailer after it
                break
            chunk = int.from_bytes(head[4:8], "little")
            pos += 8 + chunk + (chunk & 1)  # RIFF chunks are padded to an even size
    return pos > size


def _decord_seek_problem(path: str) -> str | None:
    """Why decord's random access returns wrong frames from ``path``, or None when its seeks are right.

    decord seeks to the keyframe before a frame and decodes forward from there. Where the container's keyframe index
    is missing (a truncated AVI: decord then takes every frame for a keyframe) or does not match the stream (MPEG-4
    ASP with packed B-frames, like opencv-doc's Megamind.avi), that returns other or half-decoded frames without an
    error. So the first keyframe after frame 0 that decord knows, and a frame a few after it (reached by decoding
    forward from that keyframe), are read by seeking and compared with a sequential decode from frame 0 (the first
    group of pictures is decoded once). Checked once per file and process.
    """
    decord = _decord()
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _seek_checks:
        return _seek_checks[key]
    vr = decord.VideoReader(path, ctx=decord.cpu(0))
    n = len(vr)
    keys = sorted(k for k in (int(k) for k in vr.get_key_indices()) if 0 < k < n)
    problem = None
    if keys:  # with no keyframe but frame 0, every read decodes from frame 0: nothing to get wrong
        k = keys[0]
        q = min(k + 4, (keys[1] if len(keys) > 1 else n) - 1)
        seq = decord.VideoReader(path, ctx=decord.cpu(0))
        refs = {}
        for i in range(q + 1):
            frame = seq.next()
            if i in (k, q):
                refs[i] = frame.asnumpy().astype(np.int16)
        for i, ref in refs.items():
            err = float(np.abs(decord.VideoReader(path, ctx=decord.cpu(0))[i].asnumpy() - ref).mean())
            if err > SEEK_TOLERANCE:
                problem = (
                    f"frame {i} read by seeking differs from the sequential decode by {err:.1f}/255 on average "
                    f"(decord's keyframe index lists {len(keys) + 1} of {n} frames)"
                )
                break
    _seek_checks[key] = problem
    return problem


def _decord_fallback(path: str) -> str | None:
    """A warning when decord must not read ``path`` (wrong seeks, or it fails decoding), else None."""
    decord = _decord()
    try:
        problem = _decord_seek_problem(path)
    except (RuntimeError, decord.DECORDError) as err:
        problem = f"decord fails decoding it: {_first_line(err)}"
    if problem is None:
        return None
    return f"decord reads wrong frames from {path}: {problem}; reading this file with OpenCV (sequential decode)"


def video_info(path: str | os.PathLike, backend: str = "auto") -> VideoInfo:
    """Open ``path`` and return its real frame count, fps, size and the backend that reads it correctly.

    With decord, a file whose seeks decord gets wrong (see :func:`read_frames`) is read with OpenCV instead (warning;
    ``backend`` and ``note`` say so). A truncated AVI's last decodable frame is cut mid-picture and not counted.
    Raises OSError when the file does not open or holds no complete frame.
    """
    backend = _resolve_backend(backend)
    path = str(path)
    notes: list[str] = []
    if backend == "decord":
        decord = _decord()
        try:
            vr = decord.VideoReader(path, ctx=decord.cpu(0))
        except (RuntimeError, decord.DECORDError) as err:
            raise OSError(f"decord cannot open {path}: {_first_line(err)}") from err
        if len(vr) == 0:
            raise OSError(f"{path}: no decodable frames")
        fallback = _decord_fallback(path)
        if fallback is None:
            try:
                h, w = vr[0].shape[:2]
                n, fps = len(vr), float(vr.get_avg_fps())
            except (RuntimeError, decord.DECORDError) as err:
                fallback = f"decord fails decoding {path}: {_first_line(err)}; reading this file with OpenCV"
        if fallback is not None:
            _warn(fallback)
            notes.append(fallback)
            backend = "opencv"
    if backend == "opencv":
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
    if avi_truncated(path):
        n -= 1
        if n == 0:
            raise OSError(f"{path}: truncated AVI without one complete frame")
        cut = f"{path} is a truncated AVI: its last decodable frame ({n}) is incomplete and is not used"
        _warn(cut)
        notes.append(cut)
    return VideoInfo(path, n, fps, int(h), int(w), backend, "; ".join(notes))


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3), as :func:`read_frames` returns them -> float (T, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def read_frames(path: str | os.PathLike, indices: Sequence[int], backend: str = "auto") -> np.ndarray:
    """Frames ``indices`` (sorted ascending) of a video as uint8 (T, H, W, 3) RGB.

    Never wrong frames in silence: with decord, a file whose seeks decord gets wrong (a truncated AVI, whose index is
    lost; MPEG-4 with packed B-frames) is checked once per process and read with OpenCV, with a warning; the
    incomplete last frame of a truncated AVI is refused (OSError), as are frames past the end.
    """
    backend = _resolve_backend(backend)
    idx = [int(i) for i in indices]
    if not idx or any(b < a for a, b in itertools.pairwise(idx)) or idx[0] < 0:
        raise ValueError(f"read_frames: indices must be non-empty, non-negative and ascending, got {idx[:8]}")
    path = str(path)
    if backend == "decord":
        fallback = _decord_fallback(path)
        if fallback is not None:
            _warn(fallback)
            backend = "opencv"
    return _read_frames(path, idx, backend)


def _read_frames(path: str, idx: list[int], backend: str) -> np.ndarray:
    """:func:`read_frames` with a backend known to read ``path`` correctly (``VideoInfo.backend``)."""
    cut = avi_truncated(path)
    if backend == "decord":
        decord = _decord()
        try:
            vr = decord.VideoReader(path, ctx=decord.cpu(0))
            n = len(vr) - int(cut)
            if idx[-1] >= n:
                raise OSError(
                    f"{path}: frame {idx[-1]} requested, video has {n} complete frames"
                    + (" (a truncated AVI: its last decodable frame is incomplete)" if cut else "")
                )
            return vr.get_batch(idx).asnumpy()
        except (RuntimeError, decord.DECORDError) as err:
            raise OSError(f"decord failed reading {path}: {_first_line(err)}") from err
    import cv2

    cap = cv2.VideoCapture(path)
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
        complete = len(frames) == len(idx) and (not cut or cap.grab())  # in a cut file, the last frame is partial
    finally:
        cap.release()
    if len(frames) != len(idx):
        raise OSError(f"{path}: only {len(frames)} of {len(idx)} requested frames decoded")
    if not complete:
        raise OSError(f"{path}: frame {idx[-1]} is the incomplete last frame of a truncated AVI")
    return np.stack(frames)


def video_files(paths: Any = None) -> list[Path]:
    """The video files ``paths`` names: None = the opencv-doc samples, a folder = its video files (recursively), else
    one path or a list of paths. A named path that does not exist raises FileNotFoundError (a mistake in the
    config, not a damaged file to skip); a folder without videos raises DataReadError."""
    if paths is None:
        return opencv_sample_videos()
    if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
        files = sorted(p for p in Path(paths).rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS)
    else:
        files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not files:
        raise DataReadError(f"VideoClips: no video files in {paths}")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"VideoClips: no such video file(s): {', '.join(missing)}")
    return files


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
        backend: ``auto`` (decord when installed, else OpenCV), ``decord`` or ``opencv``. A file whose seeks decord
            gets wrong is read with OpenCV (``notes`` says which and why); see :func:`read_frames`.
        seed: seeds the random readable clip that replaces a clip failing at read time (see :class:`RobustItems`).
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
        seed: int = 0,
    ) -> None:
        self._init_robust("VideoClips", seed)
        if num_frames < 1:
            raise ValueError(f"VideoClips: num_frames must be >= 1, got {num_frames}")
        if stride < 1:
            raise ValueError(f"VideoClips: stride must be >= 1, got {stride}")
        if fps is not None and fps <= 0:
            raise ValueError(f"VideoClips: fps must be > 0, got {fps}")
        if clip_step is not None and clip_step < 1:
            raise ValueError(f"VideoClips: clip_step must be >= 1, got {clip_step}")
        self.backend = _resolve_backend(backend)
        files = video_files(paths)
        self.num_frames, self.size, self.random_flip = num_frames, size, random_flip
        self.videos: list[VideoInfo] = []
        self.notes: dict[str, str] = {}  # path -> why it is read differently (OpenCV fallback, cut last frame)
        self.clips: list[tuple[int, int, int]] = []  # (video index, first frame, stride)
        for f in files:
            try:
                info = video_info(f, self.backend)
            except OSError as err:
                self.skip_log.skip(str(f), str(err))
                continue
            step = stride if fps is None else max(1, round(info.fps / fps)) if info.fps > 0 else stride
            if fps is not None and info.fps <= 0:
                _warn(f"VideoClips: {info.path} has no frame rate to resample to {fps} fps; using stride {stride}")
            span = (num_frames - 1) * step + 1
            if info.num_frames < span:
                self.skip_log.skip(str(f), f"only {info.num_frames} decodable frame(s), a clip needs {span}")
                continue
            starts = list(range(0, info.num_frames - span + 1, clip_step or span))
            if max_clips_per_video is not None and len(starts) > max_clips_per_video:
                pick = np.linspace(0, len(starts) - 1, max_clips_per_video).round().astype(int)
                starts = [starts[i] for i in pick]
            if info.note:
                self.notes[info.path] = info.note
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
        frames = _read_frames(info.path, list(range(start, start + self.num_frames * step, step)), info.backend)
        x = resize_center_crop(frames_to_tensor(frames), self.size)  # (T, C, H, W)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {
            "video": x.permute(1, 0, 2, 3).contiguous(),
            "path": info.path,
            "start": start,
            "fps": info.fps / step if info.fps > 0 else 0.0,
        }


def write_video(video: torch.Tensor, path: str | os.PathLike, fps: float = 8.0, *, min_size: int = 64) -> Path:
    """(C, T, H, W) in [-1, 1] (C = 1 or 3) -> an mp4 (OpenCV ``mp4v``), written to a temporary name and renamed.
    Clips whose short side is under ``min_size`` are enlarged by a whole factor (nearest neighbour: the pixels stay
    visible; decoders, decord among them, fail on mp4s a few pixels wide). Raises OSError when OpenCV cannot write
    it."""
    import cv2

    from gencore.viz import to_uint8

    if video.dim() != 4 or video.shape[0] not in (1, 3):
        raise ValueError(f"write_video: expected (C, T, H, W) with C = 1 or 3, got {tuple(video.shape)}")
    factor = max(1, -(-min_size // min(video.shape[-2:])))
    if factor > 1:
        video = video.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    frames = to_uint8(video).permute(1, 2, 3, 0).numpy()  # (T, H, W, C)
    if frames.shape[-1] == 1:
        frames = frames.repeat(3, axis=-1)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps) if fps > 0 else 8.0, (w, h))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {out} (mp4v)")
    try:
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    os.replace(tmp, out)
    return out
