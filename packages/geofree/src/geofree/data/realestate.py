"""RealEstate10K / ACID pair datasets for Geometry-Free View Synthesis (Rombach, Esser, Ommer 2021).

Two on-disk layouts are supported:

* :class:`RealEstate10KSparse` -- the layout the official code trains on: one COLMAP sparse model per sequence,
  triangulated with the *known* RealEstate10K poses and intrinsics (``scripts/sparse_from_realestate_format.py``)::

      <root>/<split>/<seq>/sparse/{cameras,images,points3D}.bin   (or .txt; ``sparse/0/`` is accepted too)
      <root>/<split>/<seq>/images/<name>

  The sparse points share the pose scale, which is what the model needs to put the (scale-free) MiDaS depth into the
  scale of the camera translation.

* :class:`RealEstate10KCameras` -- the camera files as downloaded from the RealEstate10K / ACID releases, plus the
  extracted frames::

      <root>/<split>/<seq>.txt                      first line: YouTube URL, then one line per frame
      <frames_root>/<split>/<seq>/<timestamp>.png   (.jpg accepted)

  These have no 3-D points: ``src_points`` is all ``-1`` and ``has_points`` is ``False``, so a model has to fall back to
  its fixed-scale depth normalisation. That does not reproduce the paper's training signal: the paper needs COLMAP
  points to fit the MiDaS scale / shift to the pose scale (the authors' answer in issue #12 of the official
  repository). Use it for quick experiments or for demo-style inference, and :class:`RealEstate10KSparse` for
  faithful training.

Conventions of every item (a ``dict``):

=============== =================== ======================================================================
key             type / shape        meaning
=============== =================== ======================================================================
``src_img``     float32 (3, H, W)   source frame in [-1, 1], resized with PIL LANCZOS to ``size`` (h, w)
``dst_img``     float32 (3, H, W)   destination frame, same
``R_rel``       float32 (3, 3)      ``R_dst @ R_src.T`` (cameras are world-to-camera, ``x_c = R x_w + t``,
                                    OpenCV axes: x right, y down, z forward)
``t_rel``       float32 (3,)        ``t_dst - R_rel @ t_src``, so ``x_dst = R_rel x_src + t_rel``
``K``           float32 (3, 3)      pixel intrinsics of the *output* size (rows 0 / 1 scaled by w_out / w,
                                    h_out / h, as the official loader does), from the source camera
``K_inv``       float32 (3, 3)      ``inv(K)``
``src_points``  float32 (P, 3)      pixel x, pixel y (output size), camera-space depth z of the sparse points
                                    seen in the source; rows past the valid ones are ``-1`` (``pad_points``)
``has_points``  bool tensor ()      whether ``src_points`` holds at least one valid row
``label``       int                 0 / 1 forward small / large, 2 / 3 backward small / large (bookkeeping)
``seq``         str                 sequence name
``src_frame``   str                 source frame file name
``dst_frame``   str                 destination frame file name
=============== =================== ======================================================================

Pair-label rule (train mode). The frames of a sequence (sorted by name, digit runs compared as numbers so that
``99999900.png`` sorts before ``106806000.png``) are split into three equal thirds; two distinct thirds are drawn, the
*destination* third ``d`` and the *source* third ``s``, and one random frame in each. With ``diff = d - s``:
``diff = +1 -> 0`` (forward, small), ``+2 -> 1`` (forward, large), ``-1 -> 2`` (backward, small), ``-2 -> 3``
(backward, large). "Forward" means the destination lies later along the trajectory than the source, which matches the
official custom test set (frames ``a < b < c`` in time; label 0 is ``b|a`` = destination ``b`` given source ``a``).
The official train loader instead calls ``dst third < src third`` forward and, through a sign slip, gives every
backward pair label 3; labels are bookkeeping only (no loss uses them), so this difference does not change training.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "ColmapCamera",
    "ColmapFormatError",
    "ColmapImage",
    "ColmapPoint3D",
    "RealEstate10KCameras",
    "RealEstate10KSparse",
    "UnsupportedCameraModelError",
    "camera_matrix",
    "pad_points",
    "pair_label",
    "parse_camera_file",
    "qvec_to_rotmat",
    "read_colmap_model",
    "read_frames_file",
    "rotmat_to_qvec",
    "sample_pair_by_thirds",
    "write_colmap_model",
]

# ----------------------------------------------------------------------------------------------------------------------
# COLMAP sparse models
# ----------------------------------------------------------------------------------------------------------------------

# COLMAP camera model ids / names (https://colmap.github.io/cameras.html). Only the pinhole models are supported; the
# others are listed so that a refusal can name the model found in the file.
_COLMAP_MODEL_NAMES = {
    0: "SIMPLE_PINHOLE",
    1: "PINHOLE",
    2: "SIMPLE_RADIAL",
    3: "RADIAL",
    4: "OPENCV",
    5: "OPENCV_FISHEYE",
    6: "FULL_OPENCV",
    7: "FOV",
    8: "SIMPLE_RADIAL_FISHEYE",
    9: "RADIAL_FISHEYE",
    10: "THIN_PRISM_FISHEYE",
    11: "RAD_TAN_THIN_PRISM_FISHEYE",
}
_SUPPORTED_MODELS = {"SIMPLE_PINHOLE": (0, 3), "PINHOLE": (1, 4)}  # name -> (model id, number of params)


class ColmapFormatError(ValueError):
    """A COLMAP model file is truncated, malformed or inconsistent."""


class UnsupportedCameraModelError(ValueError):
    """A COLMAP camera uses a model other than PINHOLE / SIMPLE_PINHOLE."""


@dataclass(eq=False)
class ColmapCamera:
    id: int
    model: str
    width: int
    height: int
    params: np.ndarray  # float64: PINHOLE (fx, fy, cx, cy), SIMPLE_PINHOLE (f, cx, cy)


@dataclass(eq=False)
class ColmapImage:
    id: int
    qvec: np.ndarray  # float64 (4,) (qw, qx, qy, qz), world-to-camera rotation
    tvec: np.ndarray  # float64 (3,) world-to-camera translation
    camera_id: int
    name: str
    xys: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # float64 (N, 2) pixel coordinates
    point3D_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))  # int64 (N,), -1 = none

    def rotmat(self) -> np.ndarray:
        return qvec_to_rotmat(self.qvec)


@dataclass(eq=False)
class ColmapPoint3D:
    id: int
    xyz: np.ndarray  # float64 (3,)
    rgb: np.ndarray = field(default_factory=lambda: np.zeros(3, np.uint8))
    error: float = 0.0
    image_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    point2D_idxs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))


def qvec_to_rotmat(qvec) -> np.ndarray:
    """Rotation matrix of a COLMAP quaternion ``(qw, qx, qy, qz)`` (Hamilton convention).

    The quaternion is normalised first, so rounded values (e.g. six decimals in a text model) still give an
    orthonormal matrix.
    """
    q = np.asarray(qvec, dtype=np.float64).reshape(4)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"invalid quaternion {q.tolist()}")
    w, x, y, z = q / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def rotmat_to_qvec(R) -> np.ndarray:
    """Unit quaternion ``(qw, qx, qy, qz)`` with ``qw >= 0`` of a rotation matrix (inverse of ``qvec_to_rotmat``)."""
    R = np.asarray(R, dtype=np.float64).reshape(3, 3)
    trace = R[0, 0] + R[1, 1] + R[2, 2]
    # pick the numerically largest of 4w^2, 4x^2, 4y^2, 4z^2 as pivot
    cands = np.array([trace, R[0, 0], R[1, 1], R[2, 2]])
    k = int(np.argmax(cands))
    if k == 0:
        s = 2.0 * np.sqrt(max(1.0 + trace, 0.0))
        q = [0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    elif k == 1:
        s = 2.0 * np.sqrt(max(1.0 + R[0, 0] - R[1, 1] - R[2, 2], 0.0))
        q = [(R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s]
    elif k == 2:
        s = 2.0 * np.sqrt(max(1.0 - R[0, 0] + R[1, 1] - R[2, 2], 0.0))
        q = [(R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(max(1.0 - R[0, 0] - R[1, 1] + R[2, 2], 0.0))
        q = [(R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[0] < 0 else q


def camera_matrix(camera: ColmapCamera) -> np.ndarray:
    """3x3 pixel intrinsics (float64) of a PINHOLE / SIMPLE_PINHOLE camera at its own width / height."""
    p = np.asarray(camera.params, dtype=np.float64)
    if camera.model == "PINHOLE":
        fx, fy, cx, cy = p
    elif camera.model == "SIMPLE_PINHOLE":
        fx, cx, cy = p
        fy = fx
    else:
        raise UnsupportedCameraModelError(
            f"unsupported COLMAP camera model {camera.model!r} (camera {camera.id}); supported: PINHOLE, SIMPLE_PINHOLE"
        )
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _check_model(name: str, n_params: int | None, where: str) -> None:
    if name not in _SUPPORTED_MODELS:
        raise UnsupportedCameraModelError(
            f"{where}: unsupported COLMAP camera model {name!r}; supported: PINHOLE (fx, fy, cx, cy), "
            "SIMPLE_PINHOLE (f, cx, cy)"
        )
    expected = _SUPPORTED_MODELS[name][1]
    if n_params is not None and n_params != expected:
        raise ColmapFormatError(f"{where}: camera model {name} takes {expected} parameters, got {n_params}")


class _ByteReader:
    """Sequential little-endian reader over a whole file with bounds checks that name the file."""

    def __init__(self, path: Path):
        self.path = path
        self.buf = path.read_bytes()
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise ColmapFormatError(
                f"{self.path}: truncated or corrupt file (needs {n} bytes at offset {self.pos}, size {len(self.buf)})"
            )

    def unpack(self, fmt: str) -> tuple:
        n = struct.calcsize(fmt)
        self._need(n)
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return vals

    def array(self, dtype, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        self._need(dtype.itemsize * count)
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += dtype.itemsize * count
        return arr

    def cstring(self) -> str:
        end = self.buf.find(b"\x00", self.pos)
        if end < 0:
            raise ColmapFormatError(f"{self.path}: unterminated image name at offset {self.pos}")
        raw = self.buf[self.pos : end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ColmapFormatError(f"{self.path}: image name at offset {self.pos} is not UTF-8") from e


_XY_ID = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])


def _read_cameras_bin(path: Path) -> dict[int, ColmapCamera]:
    r = _ByteReader(path)
    (n,) = r.unpack("<Q")
    cameras = {}
    for _ in range(n):
        cam_id, model_id, width, height = r.unpack("<iiQQ")
        name = _COLMAP_MODEL_NAMES.get(model_id, f"<unknown model id {model_id}>")
        _check_model(name, None, f"{path} (camera {cam_id})")
        params = r.array("<f8", _SUPPORTED_MODELS[name][1])
        cameras[cam_id] = ColmapCamera(cam_id, name, int(width), int(height), params.astype(np.float64))
    return cameras


def _read_images_bin(path: Path) -> dict[int, ColmapImage]:
    r = _ByteReader(path)
    (n,) = r.unpack("<Q")
    images = {}
    for _ in range(n):
        vals = r.unpack("<I7dI")
        name = r.cstring()
        (n2d,) = r.unpack("<Q")
        pts = r.array(_XY_ID, n2d)
        xys = np.stack([pts["x"], pts["y"]], axis=1) if n2d else np.zeros((0, 2))
        images[vals[0]] = ColmapImage(
            id=vals[0],
            qvec=np.array(vals[1:5], dtype=np.float64),
            tvec=np.array(vals[5:8], dtype=np.float64),
            camera_id=vals[8],
            name=name,
            xys=xys.astype(np.float64),
            point3D_ids=pts["id"].astype(np.int64),
        )
    return images


def _read_points3D_bin(path: Path) -> dict[int, ColmapPoint3D]:
    r = _ByteReader(path)
    (n,) = r.unpack("<Q")
    points = {}
    for _ in range(n):
        vals = r.unpack("<Q3d3BdQ")
        track = r.array("<i4", 2 * vals[8])
        points[vals[0]] = ColmapPoint3D(
            id=vals[0],
            xyz=np.array(vals[1:4], dtype=np.float64),
            rgb=np.array(vals[4:7], dtype=np.uint8),
            error=float(vals[7]),
            image_ids=track[0::2].astype(np.int32),
            point2D_idxs=track[1::2].astype(np.int32),
        )
    return points


def _text_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) for every non-comment line, empty lines kept."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            s = line.strip()
            if not s.startswith("#"):
                out.append((i, s))
    return out


def _numbers(path: Path, lineno: int, tokens: Sequence[str], kind=float) -> list:
    try:
        return [kind(t) for t in tokens]
    except ValueError as e:
        raise ColmapFormatError(f"{path}, line {lineno}: expected numbers, got {' '.join(tokens)!r}") from e


def _read_cameras_txt(path: Path) -> dict[int, ColmapCamera]:
    cameras = {}
    for lineno, s in _text_lines(path):
        if not s:
            continue
        tok = s.split()
        if len(tok) < 4:
            raise ColmapFormatError(f"{path}, line {lineno}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...'")
        cam_id, width, height = _numbers(path, lineno, [tok[0], tok[2], tok[3]], int)
        _check_model(tok[1], len(tok) - 4, f"{path}, line {lineno}")
        params = np.array(_numbers(path, lineno, tok[4:]), dtype=np.float64)
        cameras[cam_id] = ColmapCamera(cam_id, tok[1], width, height, params)
    return cameras


def _read_images_txt(path: Path) -> dict[int, ColmapImage]:
    lines = _text_lines(path)
    images = {}
    i = 0
    while i < len(lines):
        lineno, s = lines[i]
        i += 1
        if not s:
            continue
        tok = s.split(maxsplit=9)
        if len(tok) != 10:
            raise ColmapFormatError(f"{path}, line {lineno}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME'")
        image_id, cam_id = _numbers(path, lineno, [tok[0], tok[8]], int)
        pose = _numbers(path, lineno, tok[1:8])
        # the next line holds the 2-D points (possibly empty, possibly missing at the end of the file)
        pts_tok: list[str] = []
        if i < len(lines):
            plineno, ps = lines[i]
            i += 1
            pts_tok = ps.split()
            if len(pts_tok) % 3:
                raise ColmapFormatError(f"{path}, line {plineno}: 2-D points must be 'X Y POINT3D_ID' triplets")
        else:
            plineno = lineno
        xy = np.array(_numbers(path, plineno, pts_tok[0::3] + pts_tok[1::3]), dtype=np.float64)
        n = len(pts_tok) // 3
        ids = np.array(_numbers(path, plineno, pts_tok[2::3], int), dtype=np.int64)
        images[image_id] = ColmapImage(
            id=image_id,
            qvec=np.array(pose[:4], dtype=np.float64),
            tvec=np.array(pose[4:7], dtype=np.float64),
            camera_id=cam_id,
            name=tok[9],
            xys=np.stack([xy[:n], xy[n:]], axis=1) if n else np.zeros((0, 2)),
            point3D_ids=ids,
        )
    return images


def _read_points3D_txt(path: Path) -> dict[int, ColmapPoint3D]:
    points = {}
    for lineno, s in _text_lines(path):
        if not s:
            continue
        tok = s.split()
        if len(tok) < 8 or (len(tok) - 8) % 2:
            raise ColmapFormatError(f"{path}, line {lineno}: expected 'POINT3D_ID X Y Z R G B ERROR TRACK[]'")
        (pid,) = _numbers(path, lineno, tok[:1], int)
        xyz = _numbers(path, lineno, tok[1:4])
        rgb = _numbers(path, lineno, tok[4:7], int)
        (err,) = _numbers(path, lineno, tok[7:8])
        track = np.array(_numbers(path, lineno, tok[8:], int), dtype=np.int32)
        points[pid] = ColmapPoint3D(
            id=pid,
            xyz=np.array(xyz, dtype=np.float64),
            rgb=np.array(rgb, dtype=np.uint8),
            error=err,
            image_ids=track[0::2],
            point2D_idxs=track[1::2],
        )
    return points


_MODEL_FILES = ("cameras", "images", "points3D")


def _model_ext(folder: Path) -> str | None:
    for ext in (".bin", ".txt"):
        if all((folder / f"{name}{ext}").is_file() for name in _MODEL_FILES):
            return ext
    return None


def _read_model_part(folder: Path, ext: str, which: str):
    path = Path(folder) / f"{which}{ext}"
    readers = {
        (".bin", "cameras"): _read_cameras_bin,
        (".bin", "images"): _read_images_bin,
        (".bin", "points3D"): _read_points3D_bin,
        (".txt", "cameras"): _read_cameras_txt,
        (".txt", "images"): _read_images_txt,
        (".txt", "points3D"): _read_points3D_txt,
    }
    try:
        return readers[(ext, which)](path)
    except UnicodeDecodeError as e:
        raise ColmapFormatError(f"{path}: not a UTF-8 text file") from e


def read_colmap_model(
    folder, ext: str | None = None
) -> tuple[dict[int, ColmapCamera], dict[int, ColmapImage], dict[int, ColmapPoint3D]]:
    """Read a COLMAP sparse model ``(cameras, images, points3D)``, each a dict keyed by id.

    ``ext`` is ``".bin"``, ``".txt"`` or ``None`` (binary if all three ``.bin`` files exist, else text). Only PINHOLE
    and SIMPLE_PINHOLE cameras are accepted (:class:`UnsupportedCameraModelError` names any other model); truncated or
    malformed files raise :class:`ColmapFormatError` naming the file (and the line, for text files).
    """
    folder = Path(folder)
    if ext is None:
        ext = _model_ext(folder)
        if ext is None:
            raise FileNotFoundError(
                f"no COLMAP model in {folder}: expected cameras.bin, images.bin, points3D.bin "
                "(or cameras.txt, images.txt, points3D.txt)"
            )
    if ext not in (".bin", ".txt"):
        raise ValueError(f"ext must be '.bin' or '.txt', got {ext!r}")
    cameras = _read_model_part(folder, ext, "cameras")
    images = _read_model_part(folder, ext, "images")
    points3D = _read_model_part(folder, ext, "points3D")
    for im in images.values():
        if im.camera_id not in cameras:
            raise ColmapFormatError(f"{folder}: image {im.name!r} refers to missing camera {im.camera_id}")
    return cameras, images, points3D


def write_colmap_model(
    folder,
    cameras: Mapping[int, ColmapCamera] | Iterable[ColmapCamera],
    images: Mapping[int, ColmapImage] | Iterable[ColmapImage],
    points3D: Mapping[int, ColmapPoint3D] | Iterable[ColmapPoint3D],
    binary: bool = True,
) -> Path:
    """Write a COLMAP sparse model in the official binary (``*.bin``) or text (``*.txt``) layout; returns ``folder``.

    Binary files are written with full precision; text files with 17 significant digits, so both round-trip exactly
    through :func:`read_colmap_model`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cams = list(cameras.values()) if isinstance(cameras, Mapping) else list(cameras)
    ims = list(images.values()) if isinstance(images, Mapping) else list(images)
    pts = list(points3D.values()) if isinstance(points3D, Mapping) else list(points3D)
    for c in cams:
        _check_model(c.model, len(np.ravel(c.params)), f"camera {c.id}")

    def g(v) -> str:
        return format(float(v), ".17g")

    if binary:
        with open(folder / "cameras.bin", "wb") as f:
            f.write(struct.pack("<Q", len(cams)))
            for c in cams:
                f.write(struct.pack("<iiQQ", c.id, _SUPPORTED_MODELS[c.model][0], c.width, c.height))
                f.write(np.asarray(c.params, dtype="<f8").tobytes())
        with open(folder / "images.bin", "wb") as f:
            f.write(struct.pack("<Q", len(ims)))
            for im in ims:
                q = np.asarray(im.qvec, dtype=np.float64)
                t = np.asarray(im.tvec, dtype=np.float64)
                f.write(struct.pack("<I7dI", im.id, *q, *t, im.camera_id))
                f.write(im.name.encode("utf-8") + b"\x00")
                xys = np.asarray(im.xys, dtype=np.float64).reshape(-1, 2)
                rec = np.empty(len(xys), dtype=_XY_ID)
                rec["x"], rec["y"] = xys[:, 0], xys[:, 1]
                rec["id"] = np.asarray(im.point3D_ids, dtype=np.int64).reshape(-1)
                f.write(struct.pack("<Q", len(rec)))
                f.write(rec.tobytes())
        with open(folder / "points3D.bin", "wb") as f:
            f.write(struct.pack("<Q", len(pts)))
            for p in pts:
                rgb = np.asarray(p.rgb, dtype=np.uint8)
                image_ids = np.asarray(p.image_ids, dtype=np.int32).reshape(-1)
                f.write(struct.pack("<Q3d3BdQ", p.id, *np.asarray(p.xyz, np.float64), *rgb, p.error, len(image_ids)))
                track = np.stack([image_ids, np.asarray(p.point2D_idxs, dtype=np.int32).reshape(-1)], axis=1)
                f.write(track.astype("<i4").tobytes())
    else:
        with open(folder / "cameras.txt", "w", encoding="utf-8") as f:
            f.write("# Camera list with one line of data per camera:\n#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n")
            f.write(f"# Number of cameras: {len(cams)}\n")
            for c in cams:
                f.write(" ".join([str(c.id), c.model, str(c.width), str(c.height), *map(g, c.params)]) + "\n")
        with open(folder / "images.txt", "w", encoding="utf-8") as f:
            f.write("# Image list with two lines of data per image:\n")
            f.write("#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n#   POINTS2D[] as (X, Y, POINT3D_ID)\n")
            f.write(f"# Number of images: {len(ims)}\n")
            for im in ims:
                pose = [*np.asarray(im.qvec, np.float64), *np.asarray(im.tvec, np.float64)]
                f.write(" ".join([str(im.id), *map(g, pose), str(im.camera_id), im.name]) + "\n")
                xys = np.asarray(im.xys, dtype=np.float64).reshape(-1, 2)
                ids = np.asarray(im.point3D_ids, dtype=np.int64).reshape(-1)
                f.write(" ".join(f"{g(x)} {g(y)} {int(i)}" for (x, y), i in zip(xys, ids)) + "\n")
        with open(folder / "points3D.txt", "w", encoding="utf-8") as f:
            f.write("# 3D point list with one line of data per point:\n")
            f.write("#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n")
            f.write(f"# Number of points: {len(pts)}\n")
            for p in pts:
                track = " ".join(f"{int(a)} {int(b)}" for a, b in zip(np.ravel(p.image_ids), np.ravel(p.point2D_idxs)))
                fields = [str(p.id), *map(g, p.xyz), *(str(int(v)) for v in np.ravel(p.rgb)), g(p.error)]
                f.write(" ".join(fields) + (" " + track if track else "") + "\n")
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# RealEstate10K / ACID camera files
# ----------------------------------------------------------------------------------------------------------------------


def parse_camera_file(path) -> tuple[str | None, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Parse a RealEstate10K / ACID camera file.

    Format: first line the YouTube URL, then one line per frame with 19 numbers
    ``timestamp fx fy cx cy k1 k2 p00 p01 p02 p03 p10 ... p23``: intrinsics normalised by the image width (fx, cx) and
    height (fy, cy), two unused values, and the row-major 3x4 world-to-camera matrix.

    Returns ``(url, frames)`` with ``frames`` a list of ``(timestamp, K_normalised (3, 3), w2c (3, 4))`` (float64) in
    file order. ``url`` is ``None`` when the file has no URL line. Empty lines are ignored. Malformed lines raise
    ``ValueError`` naming the file and the 1-based line number.
    """
    path = Path(path)
    url: str | None = None
    frames = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    seen_data = False
    for lineno, line in enumerate(lines, start=1):
        s = line.strip()
        if not s:
            continue
        tok = s.split()
        if not seen_data and url is None and (s.startswith("http") or (len(tok) == 1 and not _isnum(tok[0]))):
            url = s  # the first non-empty line may be the video URL
            seen_data = True
            continue
        seen_data = True
        if len(tok) != 19:
            raise ValueError(
                f"{path}, line {lineno}: expected 19 values (timestamp, 6 intrinsics, 3x4 pose), got {len(tok)}"
            )
        try:
            ts = int(tok[0])
        except ValueError:
            try:
                tsf = float(tok[0])
            except ValueError:
                tsf = float("nan")
            if not (np.isfinite(tsf) and tsf == int(tsf)):
                raise ValueError(f"{path}, line {lineno}: timestamp {tok[0]!r} is not an integer") from None
            ts = int(tsf)
        try:
            vals = np.array([float(t) for t in tok[1:]], dtype=np.float64)
        except ValueError:
            bad = next(t for t in tok[1:] if not _isnum(t))
            raise ValueError(f"{path}, line {lineno}: {bad!r} is not a number") from None
        if not np.all(np.isfinite(vals)):
            raise ValueError(f"{path}, line {lineno}: non-finite value")
        fx, fy, cx, cy = vals[:4]
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        frames.append((ts, K, vals[6:18].reshape(3, 4).copy()))
    return url, frames


def _isnum(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read_frames_file(path) -> dict[str, tuple[str, str, str]]:
    """Read an official ``*_custom_frames.txt``: lines ``seq,a,b,c`` -> ``{seq: (a, b, c)}`` (file order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"frames file {path} not found (expected lines 'seq,a,b,c')")
    out: dict[str, tuple[str, str, str]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            parts = [p.strip() for p in s.split(",")]
            if len(parts) != 4 or not all(parts):
                raise ValueError(f"{path}, line {lineno}: expected 'seq,a,b,c', got {s!r}")
            if parts[0] in out:
                raise ValueError(f"{path}, line {lineno}: sequence {parts[0]!r} listed twice")
            out[parts[0]] = (parts[1], parts[2], parts[3])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# pair sampling and item helpers
# ----------------------------------------------------------------------------------------------------------------------


def pair_label(dst_third: int, src_third: int) -> int:
    """0 / 1 forward small / large, 2 / 3 backward small / large; forward = destination third after source third."""
    diff = int(dst_third) - int(src_third)
    if diff not in (-2, -1, 1, 2):
        raise ValueError(f"thirds must be distinct values in 0..2, got dst={dst_third}, src={src_third}")
    return (0 if diff > 0 else 2) + (1 if abs(diff) == 2 else 0)


def pair_rng(seed: int, epoch: int, index: int, *, fresh: bool = False) -> np.random.Generator:
    """The generator of one item's pair: ``(seed, epoch, index)`` (reproducible), or with ``fresh`` a new draw from
    torch's RNG (seeded per DataLoader worker by Lightning's ``seed_everything(workers=True)``): training sees a new
    pair of each sequence every epoch, also from persistent workers."""
    if fresh:
        import torch

        return np.random.default_rng([int(torch.randint(0, 2**62, ()).item()), index])
    return np.random.default_rng([seed, epoch, index])


def sample_pair_by_thirds(n_frames: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Paper pair sampling: ``(dst_index, src_index, label)`` for a sequence of ``n_frames`` (>= 3) sorted frames.

    Third ``k`` covers indices ``[k n // 3, (k + 1) n // 3)`` (as officially); two distinct thirds are drawn
    (destination first), then a uniform frame in each. See the module docstring for the label rule.
    """
    if n_frames < 3:
        raise ValueError(f"need at least 3 frames to sample a pair by thirds, got {n_frames}")
    dst_third, src_third = (int(v) for v in rng.choice(3, size=2, replace=False))

    def frame_in(third: int) -> int:
        return int(rng.integers(third * n_frames // 3, (third + 1) * n_frames // 3))

    dst = frame_in(dst_third)
    src = frame_in(src_third)
    return dst, src, pair_label(dst_third, src_third)


def pad_points(points: np.ndarray, n: int) -> np.ndarray:
    """``(n, 3)`` float32 with ``points`` (first ``n`` rows kept) on top and ``-1`` rows below."""
    points = np.asarray(points, dtype=np.float32).reshape(-1, 3)[:n]
    out = -np.ones((n, 3), dtype=np.float32)
    out[: len(points)] = points
    return out


_DIGITS = re.compile(r"(\d+)")


def _natural_key(name: str):
    parts = _DIGITS.split(name)
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]


def _load_image(path: Path, size_hw: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """(3, H, W) float32 in [-1, 1] resized (LANCZOS) to ``size_hw``, and the original (h, w)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        orig = (im.height, im.width)
        if size_hw is not None and (im.height, im.width) != tuple(size_hw):
            im = im.resize((int(size_hw[1]), int(size_hw[0])), resample=Image.Resampling.LANCZOS)
        arr = np.asarray(im, dtype=np.float32)
    return np.ascontiguousarray((arr / 127.5 - 1.0).transpose(2, 0, 1)), orig


def _scaled_K(K: np.ndarray, from_hw: tuple[float, float], to_hw: tuple[int, int]) -> np.ndarray:
    K = np.array(K, dtype=np.float64)
    K[0, :] *= to_hw[1] / from_hw[1]
    K[1, :] *= to_hw[0] / from_hw[0]
    return K


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class _SeqRecord:
    name: str
    frames: np.ndarray  # unicode array of frame names, sorted (compact; no per-object refcounts in workers)
    info: tuple  # dataset-specific (e.g. sparse folder + extension)


class _PairDataset(Dataset):
    """Shared logic: sequence scan with skip bookkeeping, pair sampling by thirds, custom test pairs, item assembly."""

    _layout = ""  # human-readable expected layout, for error messages

    def __init__(self, root, split, size, max_points, mode, frames_file, limit, seed, sequences):
        if mode not in ("train", "custom_test"):
            raise ValueError(f"mode must be 'train' or 'custom_test', got {mode!r}")
        if mode == "custom_test" and frames_file is None:
            raise ValueError("mode='custom_test' needs frames_file (lines 'seq,a,b,c')")
        if size is not None:
            size = (int(size[0]), int(size[1]))
            if min(size) < 1:
                raise ValueError(f"size must be (h, w) with positive entries, got {size}")
        if int(max_points) < 1:
            raise ValueError(f"max_points must be >= 1, got {max_points}")
        if limit is not None and int(limit) < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        self.root = Path(root)
        self.split = split
        self.size = size
        self.max_points = int(max_points)
        self.mode = mode
        self.seed = int(seed)
        self.epoch = 0
        self.fresh_pairs = False
        self.skipped: dict[str, int] = {}
        self._skip_notes: list[str] = []
        self._counter: Counter = Counter()

        split_dir = self.root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{type(self).__name__}: {split_dir} does not exist; expected {self._layout}")

        triplets = read_frames_file(frames_file) if mode == "custom_test" else None
        if triplets is not None:
            names = sorted(triplets)
        else:
            names = self._list_sequences(split_dir)
        if sequences is not None:
            wanted = list(dict.fromkeys(str(s) for s in sequences))
            if triplets is not None:
                wanted = [s for s in wanted if s in triplets]
            names = wanted if triplets is None else sorted(wanted)

        self._seqs: list[_SeqRecord] = []
        self._pairs: list[tuple[int, int, str, str]] = []  # (seq index, label, dst frame, src frame)
        for name in names:
            if limit is not None and len(self._seqs) >= int(limit):
                break
            try:
                frames, info = self._scan(split_dir, name)
                frames = sorted(frames, key=_natural_key)
                if triplets is None:
                    if len(frames) < 3:
                        raise _Skip("too_few_frames", f"{name}: {len(frames)} usable frame(s), need >= 3")
                else:
                    abc = [self._match_frame(frames, f) for f in triplets[name]]
                    missing = [f for f, m in zip(triplets[name], abc) if m is None]
                    if missing:
                        raise _Skip("missing_test_frame", f"{name}: test frame(s) {missing} not available")
            except _Skip as e:
                self._skip(e.reason, str(e))
                continue
            self._seqs.append(_SeqRecord(name, np.array(frames, dtype=str), info))
            if triplets is not None:
                a, b, c = abc
                i = len(self._seqs) - 1
                self._pairs += [(i, 0, b, a), (i, 1, c, a), (i, 2, a, b), (i, 3, a, c)]

        self.skipped = dict(self._counter)
        if self.skipped:
            notes = "; ".join(self._skip_notes[:5]) + (" ..." if len(self._skip_notes) > 5 else "")
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            warnings.warn(
                f"{type(self).__name__}({split_dir}): skipped items ({counts}); e.g. {notes}",
                RuntimeWarning,
                stacklevel=3,
            )
        if not self._seqs:
            what = f"the sequences of {frames_file}" if triplets is not None else "any sequence"
            raise ValueError(
                f"{type(self).__name__}: no usable sequence under {split_dir} (looked for {what}); expected "
                f"{self._layout}" + (f"; skipped: {self.skipped}" if self.skipped else "")
            )

    # -- subclass hooks ------------------------------------------------------------------------------------------------
    def _list_sequences(self, split_dir: Path) -> list[str]:
        raise NotImplementedError

    def _scan(self, split_dir: Path, seq: str) -> tuple[list[str], tuple]:
        """Usable frame names of ``seq`` and dataset-specific info; raise ``_Skip`` when unusable."""
        raise NotImplementedError

    def _load(self, rec: _SeqRecord, dst: str, src: str) -> dict:
        """dst_img, src_img, R_dst, t_dst, R_src, t_src, K (output size), points (N, 3) or None."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------------------------------------
    def _skip(self, reason: str, note: str, count: int = 1) -> None:
        self._counter[reason] += count
        if len(self._skip_notes) < 6:
            self._skip_notes.append(note)

    @staticmethod
    def _match_frame(frames: list[str], name: str) -> str | None:
        if name in frames:
            return name
        stem = os.path.splitext(name)[0]
        for f in frames:
            if os.path.splitext(f)[0] == stem:
                return f
        return None

    # -- public API ----------------------------------------------------------------------------------------------------
    @property
    def sequences(self) -> list[str]:
        return [r.name for r in self._seqs]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used in the per-item pair seed ``(seed, epoch, index)`` (train mode)."""
        if int(epoch) < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._pairs) if self.mode == "custom_test" else len(self._seqs)

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        if self.mode == "custom_test":
            si, label, dst, src = self._pairs[index]
            rec = self._seqs[si]
        else:
            rec = self._seqs[index]
            rng = pair_rng(self.seed, self.epoch, index, fresh=self.fresh_pairs)
            di, si_, label = sample_pair_by_thirds(len(rec.frames), rng)
            dst, src = str(rec.frames[di]), str(rec.frames[si_])
        d = self._load(rec, dst, src)
        R_rel = d["R_dst"] @ d["R_src"].T
        t_rel = d["t_dst"] - R_rel @ d["t_src"]
        K = d["K"]
        pts = d["points"]
        n_pts = 0 if pts is None else min(len(pts), self.max_points)
        src_points = pad_points(np.zeros((0, 3)) if pts is None else pts, self.max_points)
        return {
            "src_img": torch.from_numpy(d["src_img"]),
            "dst_img": torch.from_numpy(d["dst_img"]),
            "R_rel": torch.from_numpy(R_rel.astype(np.float32)),
            "t_rel": torch.from_numpy(t_rel.astype(np.float32)),
            "K": torch.from_numpy(K.astype(np.float32)),
            "K_inv": torch.from_numpy(np.linalg.inv(K).astype(np.float32)),
            "src_points": torch.from_numpy(src_points),
            "has_points": torch.tensor(n_pts > 0),
            "label": int(label),
            "seq": rec.name,
            "src_frame": src,
            "dst_frame": dst,
        }


class RealEstate10KSparse(_PairDataset):
    """Frame pairs with COLMAP sparse points, the official training / validation layout.

    Layout: ``<root>/<split>/<seq>/sparse/{cameras,images,points3D}.bin`` (``.txt`` or ``sparse/0/`` also accepted) and
    ``<root>/<split>/<seq>/images/<name>`` (the names stored in the model).

    * ``mode="train"``: one item per sequence; each ``__getitem__`` draws a pair by thirds (module docstring) with
      ``np.random.default_rng([seed, epoch, index])`` -- reproducible, and different per epoch via :meth:`set_epoch`
      (call it before creating the epoch's DataLoader iterator so that worker copies see it); ``fresh_pairs=True``
      (the training datamodule's choice) draws a new pair on every access instead, from the worker's seeded torch RNG
      (persistent DataLoader workers never see a ``set_epoch`` made in the main process).
    * ``mode="custom_test"``: ``frames_file`` lines ``seq,a,b,c`` give 4 pairs per sequence, in the official order
      ``b|a, c|a, a|b, a|c`` (destination | source) with labels 0, 1, 2, 3; sequences sorted by name.

    Source points: entries of the source image with ``point3D_ids > 0`` (COLMAP uses -1 for "no 3-D point"); pixel xy
    are the image's stored ``xys`` scaled to the output size, z the depth of the 3-D point in the source camera
    (``(R_src X + t_src)_z``). If more than ``max_points`` are visible, the first ``max_points`` (file order) are kept;
    the rest of the ``(max_points, 3)`` array is ``-1``. ``K`` is the source image's camera, rows 0 / 1 scaled by
    ``w_out / width`` and ``h_out / height`` of that camera. ``size=None`` keeps the camera's size.

    Construction scans every sequence (cameras and images are read, points3D only checked for presence unless
    ``validate=True``; frames listed in the model but absent from ``images/`` are dropped and counted). Unusable
    sequences are skipped -- one summary ``RuntimeWarning`` per construction, counts in ``self.skipped`` (reason ->
    count; ``missing_frame`` counts frames, every other reason counts sequences). Reasons: ``missing_sequence_dir``,
    ``missing_sparse_model``, ``corrupt_model``, ``unsupported_camera``, ``missing_images_dir``, ``missing_frame``,
    ``too_few_frames`` (train mode needs >= 3 frames), ``missing_test_frame``. ``limit`` stops after that many usable
    sequences; ``sequences`` restricts / orders the sequence names (like the official ``*_train_sequences.txt``).
    """

    _layout = "<root>/<split>/<seq>/sparse/{cameras,images,points3D}.bin|.txt and <root>/<split>/<seq>/images/<name>"

    def __init__(
        self,
        root,
        split: str = "train",
        size: tuple[int, int] | None = (208, 368),
        max_points: int = 16384,
        mode: str = "train",
        frames_file=None,
        limit: int | None = None,
        seed: int = 0,
        sequences: Sequence[str] | None = None,
        validate: bool = False,
        fresh_pairs: bool = False,
    ):
        self.validate = bool(validate)
        super().__init__(root, split, size, max_points, mode, frames_file, limit, seed, sequences)
        self.fresh_pairs = bool(fresh_pairs)

    def _list_sequences(self, split_dir: Path) -> list[str]:
        return sorted(p.name for p in split_dir.iterdir() if p.is_dir())

    def _scan(self, split_dir: Path, seq: str) -> tuple[list[str], tuple]:
        seq_dir = split_dir / seq
        if not seq_dir.is_dir():
            raise _Skip("missing_sequence_dir", f"{seq}: {seq_dir} not found")
        sparse = None
        for cand in (seq_dir / "sparse", seq_dir / "sparse" / "0"):
            ext = _model_ext(cand)
            if ext is not None:
                sparse = cand
                break
        if sparse is None:
            raise _Skip("missing_sparse_model", f"{seq}: no sparse model in {seq_dir / 'sparse'}")
        try:
            cameras = _read_model_part(sparse, ext, "cameras")
            images = _read_model_part(sparse, ext, "images")
            if self.validate:
                _read_model_part(sparse, ext, "points3D")
        except UnsupportedCameraModelError as e:
            raise _Skip("unsupported_camera", f"{seq}: {e}") from None
        except (ColmapFormatError, OSError) as e:
            raise _Skip("corrupt_model", f"{seq}: {e}") from None
        bad_cam = [im.name for im in images.values() if im.camera_id not in cameras]
        if bad_cam:
            raise _Skip("corrupt_model", f"{seq}: images {bad_cam[:3]} refer to missing cameras in {sparse}")
        img_dir = seq_dir / "images"
        if not img_dir.is_dir():
            raise _Skip("missing_images_dir", f"{seq}: {img_dir} not found")
        on_disk = set(os.listdir(img_dir))
        frames, missing = [], 0
        for im in images.values():
            ok = im.name in on_disk if "/" not in im.name else (img_dir / im.name).is_file()
            if ok:
                frames.append(im.name)
            else:
                missing += 1
        if missing:
            self._skip("missing_frame", f"{seq}: {missing} frame(s) of the model missing in {img_dir}", missing)
        return frames, (str(sparse), ext, str(img_dir))

    def _load(self, rec: _SeqRecord, dst: str, src: str) -> dict:
        sparse, ext, img_dir = rec.info
        cameras, images, points3D = read_colmap_model(sparse, ext)
        by_name = {im.name: im for im in images.values()}
        im_dst, im_src = by_name[dst], by_name[src]
        cam = cameras[im_src.camera_id]
        cam_hw = (cam.height, cam.width)
        out_hw = self.size if self.size is not None else cam_hw
        K = _scaled_K(camera_matrix(cam), cam_hw, out_hw)
        R_src, t_src = im_src.rotmat(), np.asarray(im_src.tvec, dtype=np.float64)
        R_dst, t_dst = im_dst.rotmat(), np.asarray(im_dst.tvec, dtype=np.float64)

        ids = np.asarray(im_src.point3D_ids, dtype=np.int64)
        valid = ids > 0
        ids = ids[valid][: self.max_points]
        xys = np.asarray(im_src.xys, dtype=np.float64)[valid][: self.max_points]
        try:
            xyz = np.array([points3D[int(i)].xyz for i in ids], dtype=np.float64).reshape(-1, 3)
        except KeyError as e:
            raise ColmapFormatError(f"{sparse}: image {src!r} refers to missing 3-D point {e.args[0]}") from None
        z = xyz @ R_src[2] + t_src[2]
        points = np.concatenate(
            [xys[:, :1] * out_hw[1] / cam_hw[1], xys[:, 1:2] * out_hw[0] / cam_hw[0], z[:, None]], axis=1
        )
        src_img, _ = _load_image(Path(img_dir) / src, out_hw)
        dst_img, _ = _load_image(Path(img_dir) / dst, out_hw)
        return {
            "src_img": src_img,
            "dst_img": dst_img,
            "R_src": R_src,
            "t_src": t_src,
            "R_dst": R_dst,
            "t_dst": t_dst,
            "K": K,
            "points": points,
        }


_FRAME_EXTS = (".png", ".jpg", ".jpeg")


class RealEstate10KCameras(_PairDataset):
    """Frame pairs from the RealEstate10K / ACID camera files as downloaded (no sparse points).

    Layout: ``<root>/<split>/<seq>.txt`` (see :func:`parse_camera_file`) and
    ``<frames_root>/<split>/<seq>/<timestamp>.png`` (``.jpg`` / ``.jpeg`` accepted), i.e. frames are named
    ``<timestamp>.<ext>``.

    Same pair sampling (``mode="train"``, by thirds, ``set_epoch``) and ``mode="custom_test"`` (frames file entries are
    matched by file name or by stem, i.e. timestamp) as :class:`RealEstate10KSparse`, and the same item keys. ``K`` is
    the source frame's normalised intrinsics times the output width (row 0) / height (row 1); ``size=None`` keeps the
    source image's size.

    There are no 3-D points: ``src_points`` is ``(max_points, 3)`` of ``-1`` and ``has_points`` is ``False``, so the
    model must fall back to its fixed-scale depth normalisation. The paper's depth scale comes from COLMAP points
    triangulated with the known poses (issue #12 of the official repository); for faithful training convert the data
    to the sparse layout (official ``scripts/sparse_from_realestate_format.py``) and use :class:`RealEstate10KSparse`.

    Skips (one summary warning, counts in ``self.skipped``): ``malformed_camera_file``, ``missing_camera_file``
    (custom_test), ``missing_frames_dir``, ``missing_frame`` (counts frames listed in the file but absent on disk),
    ``too_few_frames`` (< 3 frames left, train mode), ``missing_test_frame``.
    """

    _layout = "<root>/<split>/<seq>.txt camera files and frames <frames_root>/<split>/<seq>/<timestamp>.png"

    def __init__(
        self,
        root,
        frames_root,
        split: str = "train",
        size: tuple[int, int] | None = (208, 368),
        max_points: int = 1,
        mode: str = "train",
        frames_file=None,
        limit: int | None = None,
        seed: int = 0,
        sequences: Sequence[str] | None = None,
        fresh_pairs: bool = False,
    ):
        self.frames_root = Path(frames_root)
        super().__init__(root, split, size, max_points, mode, frames_file, limit, seed, sequences)
        self.fresh_pairs = bool(fresh_pairs)

    def _list_sequences(self, split_dir: Path) -> list[str]:
        return sorted(p.stem for p in split_dir.glob("*.txt") if p.is_file())

    def _scan(self, split_dir: Path, seq: str) -> tuple[list[str], tuple]:
        cam_file = split_dir / f"{seq}.txt"
        if not cam_file.is_file():
            raise _Skip("missing_camera_file", f"{seq}: {cam_file} not found")
        try:
            _, entries = parse_camera_file(cam_file)
        except (ValueError, OSError) as e:
            raise _Skip("malformed_camera_file", f"{seq}: {e}") from None
        frame_dir = self.frames_root / self.split / seq
        if not frame_dir.is_dir():
            raise _Skip("missing_frames_dir", f"{seq}: {frame_dir} not found")
        on_disk: dict[str, str] = {}
        for fname in os.listdir(frame_dir):
            stem, ext = os.path.splitext(fname)
            if ext.lower() in _FRAME_EXTS:
                prev = on_disk.get(stem)
                # prefer .png if a frame exists in several formats
                if prev is None or os.path.splitext(prev)[1].lower() != ".png":
                    on_disk[stem] = fname
        frames, missing = [], 0
        seen = set()
        for ts, _, _ in entries:
            if ts in seen:
                continue
            seen.add(ts)
            fname = on_disk.get(str(ts))
            if fname is None:
                missing += 1
            else:
                frames.append(fname)
        if missing:
            self._skip(
                "missing_frame", f"{seq}: {missing} frame(s) listed in {cam_file.name} missing in {frame_dir}", missing
            )
        return frames, (str(cam_file), str(frame_dir))

    def _load(self, rec: _SeqRecord, dst: str, src: str) -> dict:
        cam_file, frame_dir = rec.info
        _, entries = parse_camera_file(cam_file)
        table = {ts: (K, P) for ts, K, P in entries}
        Kn_src, P_src = table[int(os.path.splitext(src)[0])]
        _, P_dst = table[int(os.path.splitext(dst)[0])]
        src_img, src_hw = _load_image(Path(frame_dir) / src, self.size)
        out_hw = self.size if self.size is not None else src_hw
        dst_img, _ = _load_image(Path(frame_dir) / dst, out_hw)
        K = _scaled_K(Kn_src, (1.0, 1.0), out_hw)
        return {
            "src_img": src_img,
            "dst_img": dst_img,
            "R_src": P_src[:, :3],
            "t_src": P_src[:, 3],
            "R_dst": P_dst[:, :3],
            "t_dst": P_dst[:, 3],
            "K": K,
            "points": None,
        }
