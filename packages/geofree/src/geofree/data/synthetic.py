"""Synthetic multi-view scenes with exact cameras and depth: a small ray-casting renderer of textured rooms.

Novel view synthesis needs what no real dataset on this machine has: several views of one scene with known relative
cameras and metric depth (RealEstate10K / ACID are YouTube videos with COLMAP poses; see
:mod:`geofree.data.realestate` for them). This module renders such data honestly: the *pixels* are real photographs
(the photos scikit-image ships and the OpenCV sample images), pasted as textures onto the walls, floor, ceiling and
boxes of a randomly laid-out room; the *geometry* is synthetic and therefore exact. A sequence is a short camera
walk through the room (mostly forward, some sideways drift and yaw, as the RealEstate10K walk-throughs), and training
pairs are drawn from it as the paper draws them (two distinct thirds of the sequence, one frame in each).

Conventions (as :mod:`geofree.geometry`): world-to-camera cameras ``x_c = R x_w + t``, OpenCV axes (x right, y down,
z forward), pixel centres at integer (u, v), pinhole ``K``. Depth is the camera-space z at each pixel centre. Colours
are rendered with 2x2 supersampling (anti-aliased), depth at the pixel centre (exact, so warping with it is exact).

Each pair item carries, besides the images and cameras, what the method's depth path needs:

- ``src_points``: sparse 3-D points of the source view (pixel x, y, depth z; -1 padding rows), as COLMAP would give;
- ``src_mono_disparity``: a stand-in for a monocular depth network (MiDaS): the true disparity 1/z under an unknown
  per-item affine map ``a/z + b`` (MiDaS is affine-invariant in disparity), which the paper's least-squares fit to the
  sparse points undoes; ``src_depth`` / ``dst_depth``: the true depth maps (for evaluation and the depth probe).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from geofree.data.realestate import pair_rng

__all__ = [
    "OPENCV_TEXTURES",
    "Room",
    "SyntheticScenes",
    "SyntheticScenesDataModule",
    "default_intrinsics",
    "load_textures",
    "look_camera",
    "render_view",
]

# OpenCV sample photographs used as textures besides scikit-image's photos (skipped when opencv-doc is absent).
OPENCV_TEXTURES = (
    "fruits.jpg",
    "baboon.jpg",
    "building.jpg",
    "home.jpg",
    "starry_night.jpg",
    "butterfly.jpg",
    "graf1.png",
    "leuvenA.jpg",
    "aero1.jpg",
    "orange.jpg",
    "lena.jpg",
    "messi5.jpg",
    "squirrel_cls.jpg",
    "board.jpg",
    "stuff.jpg",
    "smarties.png",
)
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
TEXTURE_SIZE = 64


def _resize_texture(img: np.ndarray, size: int) -> np.ndarray:
    """A (H, W, 3) uint8 photo -> its (size, size, 3) float32 centre square in [0, 1] (area-averaged)."""
    t = torch.from_numpy(np.ascontiguousarray(img[..., :3])).permute(2, 0, 1).float()[None] / 255.0
    h, w = t.shape[-2:]
    s = min(h, w)
    t = t[..., (h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    t = torch.nn.functional.interpolate(t, size=(size, size), mode="area")
    return t[0].permute(1, 2, 0).numpy().astype(np.float32)


@functools.lru_cache(maxsize=4)
def load_textures(size: int = TEXTURE_SIZE, opencv_dir: str | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """The real photos used as textures: (N, size, size, 3) float32 in [0, 1] and their names.

    scikit-image's bundled photos always; the OpenCV sample images in ``opencv_dir`` (default the ``opencv-doc``
    package's data folder) when present. Unreadable files are skipped.
    """
    import cv2

    from gencore.data.images import SKIMAGE_PHOTOS, _skimage_photo

    images, names = [], []
    for name in SKIMAGE_PHOTOS:
        images.append(_resize_texture(_skimage_photo(name), size))
        names.append(f"skimage:{name}")
    folder = Path(opencv_dir) if opencv_dir is not None else OPENCV_DATA
    for name in OPENCV_TEXTURES:
        path = folder / name
        if not path.is_file():
            continue
        bgr = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
        if bgr is None:
            continue
        images.append(_resize_texture(bgr[..., ::-1], size))
        names.append(f"opencv:{name}")
    return np.stack(images), tuple(names)


def default_intrinsics(height: int, width: int, fov_x_deg: float = 60.0) -> np.ndarray:
    """Pinhole K with a horizontal field of view ``fov_x_deg``, square pixels, principal point at the centre."""
    f = 0.5 * width / math.tan(math.radians(fov_x_deg) / 2)
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]], dtype=np.float64)


def look_camera(center: np.ndarray, yaw: float, pitch: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R, t) of a camera at ``center`` looking along +z turned by ``yaw`` (about the y axis, positive
    to the right) and ``pitch`` (about x, positive down)."""
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    yaw_m = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    pitch_m = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    c2w = yaw_m @ pitch_m  # columns: the camera axes in world coordinates
    R = c2w.T
    return R, -R @ np.asarray(center, dtype=np.float64)


class Room:
    """A box-shaped room (x in [-w, w], y in [ceiling, floor] with y down, z in [z0, z1]) with textured walls, floor
    and ceiling, and a few textured boxes standing on the floor. Every face is an axis-aligned rectangle
    ``(axis, value, (lo_a, hi_a), (lo_b, hi_b), texture, repeat, shade)`` over the two other axes a < b."""

    def __init__(self, rng: np.random.Generator, num_textures: int, max_boxes: int = 3) -> None:
        w = rng.uniform(1.6, 2.4)
        floor, ceil = rng.uniform(0.9, 1.2), -rng.uniform(1.0, 1.4)
        z0, z1 = -3.0, rng.uniform(4.5, 6.5)
        self.bounds = (w, ceil, floor, z0, z1)
        tex = lambda: int(rng.integers(num_textures))
        faces = [
            (1, floor, (-w, w), (z0, z1), tex(), 2.0, 0.75),  # floor (normal up)
            (1, ceil, (-w, w), (z0, z1), tex(), 2.0, 0.55),  # ceiling
            (0, -w, (ceil, floor), (z0, z1), tex(), 2.0, 0.85),  # left wall
            (0, w, (ceil, floor), (z0, z1), tex(), 2.0, 0.7),  # right wall
            (2, z1, (-w, w), (ceil, floor), tex(), 1.0, 1.0),  # back wall
            (2, z0, (-w, w), (ceil, floor), tex(), 1.0, 0.9),  # wall behind the start
        ]
        for _ in range(int(rng.integers(1, max_boxes + 1))):
            sx, sy, sz = rng.uniform(0.3, 0.8), rng.uniform(0.4, 1.3), rng.uniform(0.3, 0.8)
            cx, cz = rng.uniform(-w + sx + 0.1, w - sx - 0.1), rng.uniform(1.6 + sz, z1 - sz - 0.3)
            x0, x1, y0, y1, zb0, zb1 = cx - sx, cx + sx, floor - 2 * sy, floor, cz - sz, cz + sz
            t = tex()
            faces += [
                (2, zb0, (x0, x1), (y0, y1), t, 1.0, 1.0),  # front
                (0, x0, (y0, y1), (zb0, zb1), t, 1.0, 0.8),  # left side
                (0, x1, (y0, y1), (zb0, zb1), t, 1.0, 0.65),  # right side
                (1, y0, (x0, x1), (zb0, zb1), t, 1.0, 1.1),  # top
                (2, zb1, (x0, x1), (y0, y1), t, 1.0, 0.6),  # back
            ]
        self.faces = faces

    def trajectory(self, rng: np.random.Generator, num_frames: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """A walk of ``num_frames`` cameras: start near the entrance wall, move 1-2.5 units (mostly forward, some
        sideways drift), turn by up to ~25 degrees in all, kept inside the side walls. The walk ends before the boxes
        (their fronts stand at z >= 1.6; the walk reaches z <= 1.1)."""
        w, _, _, z0, _ = self.bounds
        start = np.array([rng.uniform(-0.5, 0.5) * w, rng.uniform(-0.1, 0.2), rng.uniform(z0 + 0.8, z0 + 1.6)])
        step = np.array([rng.uniform(-0.35, 0.35), rng.uniform(-0.05, 0.05), rng.uniform(0.6, 1.0)])
        step *= rng.uniform(1.0, 2.5) / max(num_frames - 1, 1) / np.linalg.norm(step)
        yaw0, dyaw = rng.uniform(-0.3, 0.3), rng.uniform(-0.45, 0.45) / max(num_frames - 1, 1)
        pitch = rng.uniform(-0.08, 0.12)
        cams = []
        for k in range(num_frames):
            c = start + k * step
            c[0] = np.clip(c[0], -w + 0.3, w - 0.3)
            cams.append(look_camera(c, yaw0 + k * dyaw, pitch))
        return cams


def _cast(room: Room, textures: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray, h: int, w: int):
    """Colour (h, w, 3) in [0, 1] and depth (h, w) along the rays of pixel centres (u, v) of camera (R, t, K)."""
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
    d_cam = pix @ np.linalg.inv(K).T  # camera-space directions with z = 1: the ray parameter is the depth
    d = d_cam @ R  # world directions (R^T d_cam, row-wise)
    o = -R.T @ t
    best = np.full(d.shape[0], np.inf)
    color = np.zeros((d.shape[0], 3))
    for axis, value, (lo_a, hi_a), (lo_b, hi_b), tex, repeat, shade in room.faces:
        a, b = [i for i in range(3) if i != axis]
        with np.errstate(divide="ignore", invalid="ignore"):
            s = (value - o[axis]) / d[:, axis]
        pa, pb = o[a] + s * d[:, a], o[b] + s * d[:, b]
        hit = (s > 1e-6) & (s < best) & (pa >= lo_a) & (pa <= hi_a) & (pb >= lo_b) & (pb <= hi_b)
        if not hit.any():
            continue
        # texture coordinates in [0, repeat) along the face's two axes (scaled by its size), bilinear, wrapping
        ta = (pa[hit] - lo_a) / (hi_a - lo_a) * repeat * max(1.0, (hi_a - lo_a) / 2.0)
        tb = (pb[hit] - lo_b) / (hi_b - lo_b) * repeat * max(1.0, (hi_b - lo_b) / 2.0)
        color[hit] = _bilinear(textures[tex], tb, ta) * shade
        best[hit] = s[hit]
    return np.clip(color, 0.0, 1.0).reshape(h, w, 3), best.reshape(h, w)


def _bilinear(tex: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Wrap-around bilinear lookup of ``tex`` (S, S, 3) at texture coordinates (x, y) in texture units (1 = one
    texture width)."""
    n = tex.shape[0]
    x, y = (x % 1.0) * n - 0.5, (y % 1.0) * n - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0, x1, y1 = x0 % n, y0 % n, (x0 + 1) % n, (y0 + 1) % n
    top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
    bottom = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def render_view(
    room: Room, textures: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One view: colour (h, w, 3) float32 in [0, 1], 2x2 supersampled, and depth (h, w) float32 at pixel centres."""
    h, w = size
    # the 2x grid: high-res pixel centre u' maps to u = (u' - 0.5) / 2, i.e. u' = 2u + 0.5
    K2 = K.copy()
    K2[:2] = 2.0 * K[:2] + 0.5 * K[2:3]
    color, _ = _cast(room, textures, R, t, K2, 2 * h, 2 * w)
    color = color.reshape(h, 2, w, 2, 3).mean(axis=(1, 3))
    _, depth = _cast(room, textures, R, t, K, h, w)
    return color.astype(np.float32), depth.astype(np.float32)


def _thirds_pair(num_frames: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """(dst, src, label) as the paper's RealEstate10KSparseTrain: two distinct thirds of the sequence (dst third, src
    third), a random frame in each. Label: 0 / 1 the destination is ahead by one / two thirds (forward small / large),
    2 / 3 behind (backward)."""
    third = num_frames // 3
    dst_third, src_third = rng.choice(3, size=2, replace=False)
    dst = int(dst_third * third + rng.integers(third))
    src = int(src_third * third + rng.integers(third))
    gap = int(dst_third) - int(src_third)
    label = (0 if gap == 1 else 1) if gap > 0 else (2 if gap == -1 else 3)
    return dst, src, label


class SyntheticScenes(Dataset):
    """Rendered rooms: ``num_scenes`` scenes, each a walk of ``num_frames`` cameras, fixed by ``seed``.

    ``kind``:
      - ``"pairs"``: one item per scene (the paper's pairing; fixed by (seed, index, :meth:`set_epoch`), or drawn anew
        on every access with ``fresh_pairs``, as the training datamodule does): ``src_img``,
        ``dst_img`` (3, H, W) in [-1, 1], ``R_rel``, ``t_rel`` (world-to-camera relative pose src -> dst), ``K``,
        ``K_inv``, ``src_points`` (num_points, 3), ``src_mono_disparity``, ``src_depth``, ``dst_depth`` (H, W),
        ``has_points``, ``label``;
      - ``"frames"``: every frame of every scene as ``{"image": (3, H, W)}`` (the VQGAN's training data);
      - ``"depth"``: every frame's normalised disparity ``2 (1/z) / max(1/z) - 1`` as ``{"image": (1, H, W)}`` (the
        depth VQGAN's input, as the paper encodes MiDaS disparity).
    Renders are cached per worker (``cache``: at most that many views).
    """

    def __init__(
        self,
        num_scenes: int = 2000,
        num_frames: int = 12,
        size: Sequence[int] = (32, 48),
        kind: str = "pairs",
        seed: int = 0,
        num_points: int = 64,
        fov_x_deg: float = 60.0,
        max_boxes: int = 3,
        texture_size: int = TEXTURE_SIZE,
        cache: int = 50_000,
        fresh_pairs: bool = False,
    ) -> None:
        if kind not in ("pairs", "frames", "depth"):
            raise ValueError(f"SyntheticScenes: kind must be pairs | frames | depth, got {kind!r}")
        h, w = (int(s) for s in size)
        if num_scenes < 1 or num_frames < 3 or h < 4 or w < 4 or num_points < 2:
            raise ValueError(
                "SyntheticScenes: need num_scenes >= 1, num_frames >= 3 (three thirds), size >= 4x4 and "
                f"num_points >= 2, got {num_scenes}, {num_frames}, {size}, {num_points}"
            )
        self.num_scenes, self.num_frames, self.size, self.kind = num_scenes, num_frames, (h, w), kind
        self.seed, self.num_points, self.max_boxes, self.texture_size = seed, num_points, max_boxes, texture_size
        self.K = default_intrinsics(h, w, fov_x_deg)
        self.epoch = 0
        self.fresh_pairs = bool(fresh_pairs)
        self._view = functools.lru_cache(maxsize=cache)(self._render)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_scenes if self.kind == "pairs" else self.num_scenes * self.num_frames

    def scene(self, i: int) -> tuple[Room, list[tuple[np.ndarray, np.ndarray]]]:
        rng = np.random.default_rng([self.seed, i])
        room = Room(rng, len(load_textures(self.texture_size)[0]), self.max_boxes)
        return room, room.trajectory(rng, self.num_frames)

    def _render(self, i: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
        room, cams = self.scene(i)
        R, t = cams[frame]
        return render_view(room, load_textures(self.texture_size)[0], R, t, self.K, self.size)

    def camera(self, i: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
        return self.scene(i)[1][frame]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.kind != "pairs":
            color, depth = self._view(index // self.num_frames, index % self.num_frames)
            if self.kind == "frames":
                return {"image": torch.from_numpy(color).permute(2, 0, 1) * 2 - 1}
            disp = 1.0 / depth
            return {"image": torch.from_numpy(2 * disp / disp.max() - 1)[None].float()}
        if self.fresh_pairs:
            rng = pair_rng(self.seed, self.epoch, index, fresh=True)
        else:
            rng = np.random.default_rng([self.seed, index, self.epoch, 7])
        dst, src, label = _thirds_pair(self.num_frames, rng)
        return self.pair(index, src, dst, rng, label)

    def pair(
        self, i: int, src: int, dst: int, rng: np.random.Generator | None = None, label: int = -1
    ) -> dict[str, Any]:
        """The item for frames ``src`` -> ``dst`` of scene ``i`` (``rng`` draws the sparse points and the
        monocular-estimate distortion)."""
        rng = rng if rng is not None else np.random.default_rng([self.seed, i, src, dst])
        (c_src, d_src), (c_dst, d_dst) = self._view(i, src), self._view(i, dst)
        (R_s, t_s), (R_d, t_d) = self.camera(i, src), self.camera(i, dst)
        R_rel = R_d @ R_s.T
        t_rel = t_d - R_rel @ t_s
        h, w = self.size
        # sparse points: num_points random pixel centres with their exact depth (COLMAP-like), some padding rows
        n = int(rng.integers(self.num_points // 2, self.num_points + 1))
        flat = rng.choice(h * w, size=n, replace=False)
        pts = -np.ones((self.num_points, 3), dtype=np.float32)
        pts[:n, 0], pts[:n, 1], pts[:n, 2] = flat % w, flat // w, d_src.reshape(-1)[flat]
        # the monocular stand-in: disparity under an unknown affine map (MiDaS is affine-invariant in disparity)
        a, b = rng.uniform(0.3, 3.0), rng.uniform(0.0, 0.5)
        f32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)
        return {
            "src_img": f32(c_src).permute(2, 0, 1) * 2 - 1,
            "dst_img": f32(c_dst).permute(2, 0, 1) * 2 - 1,
            "R_rel": f32(R_rel),
            "t_rel": f32(t_rel),
            "K": f32(self.K),
            "K_inv": f32(np.linalg.inv(self.K)),
            "src_points": f32(pts),
            "has_points": torch.tensor(True),
            "src_mono_disparity": f32(a / d_src + b),
            "src_depth": f32(d_src),
            "dst_depth": f32(d_dst),
            "label": label,
        }


def SyntheticScenesDataModule(
    kind: str = "pairs",
    size: Sequence[int] = (32, 48),
    num_scenes: int = 2000,
    num_val_scenes: int = 100,
    num_frames: int = 12,
    seed: int = 0,
    num_points: int = 64,
    **loader_kwargs: Any,
):
    """A gencore DataModule over :class:`SyntheticScenes`: training scenes from ``seed`` (a new pair of each scene on
    every access), validation scenes from another seed (never seen in training; fixed pairs)."""
    from gencore.data import DataModule

    common = dict(num_frames=num_frames, size=tuple(size), kind=kind, num_points=num_points)
    dm = DataModule(
        train=lambda: SyntheticScenes(num_scenes, seed=seed, fresh_pairs=True, **common),
        val=lambda: SyntheticScenes(num_val_scenes, seed=seed + 1_000_003, **common),
        **loader_kwargs,
    )
    dm.image_size = tuple(int(s) for s in size)
    dm.channels = 1 if kind == "depth" else 3
    return dm
