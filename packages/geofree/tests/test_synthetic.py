"""Tests for geofree.data.synthetic: the rendered rooms' geometry is exact (the true depth and relative camera warp
the source onto the target), the depth path's inputs (sparse points, the affine "MiDaS" stand-in) are consistent with
the true depth, pairs follow the paper's thirds, items are deterministic, textures are real photographs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from geofree.data.synthetic import SyntheticScenes, SyntheticScenesDataModule, load_textures
from geofree.geometry import render_forward, scaled_disparity

SIZE = (32, 48)


@pytest.fixture(scope="module")
def scenes() -> SyntheticScenes:
    return SyntheticScenes(num_scenes=8, size=SIZE)


@pytest.fixture(scope="module")
def items(scenes) -> list[dict]:
    return [scenes[i] for i in range(len(scenes))]


def _pixels(h: int, w: int) -> torch.Tensor:
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.stack([u, v, torch.ones_like(u)], dim=-1)  # (H, W, 3) homogeneous pixel centres


def _smooth(depth: torch.Tensor, ratio: float = 1.05) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has no depth discontinuity (max / min depth below ``ratio``)."""
    d = depth[None, None]
    return (F.max_pool2d(d, 3, 1, 1) / -F.max_pool2d(-d, 3, 1, 1))[0, 0] < ratio


def _forward_warp_errors(item: dict, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp the source with its true depth and (R_rel, t, K): per covered, smooth target pixel the colour error and
    the relative error of the splatted target-camera depth against ``dst_depth``."""
    d, R, K, K_inv = item["src_depth"], item["R_rel"], item["K"], item["K_inv"]
    h, w = d.shape
    points = d[..., None] * (_pixels(h, w) @ K_inv.T)  # source-camera 3-D points
    z_dst = (points @ R.T + t)[..., 2]  # their depth in the target camera, splatted along as a 4th channel
    src = torch.cat((item["src_img"], z_dst[None]), dim=0)[None]
    out, weight = render_forward(src, d[None], R[None], t[None], K_inv[None], K[None], return_weight=True)
    dst_depth = item["dst_depth"]
    ok = (weight[0, 0] > 0) & _smooth(dst_depth)
    color = (out[0, :3] - item["dst_img"]).abs().mean(0)
    return color[ok], ((out[0, 3] - dst_depth).abs() / dst_depth)[ok]


# --------------------------------------------------------------------------------------------------------- geometry
def test_the_true_depth_and_pose_warp_the_source_onto_the_target(items):
    right, wrong, depth_err = [], [], []
    for item in items:
        color, rel = _forward_warp_errors(item, item["t_rel"])
        assert color.numel() > 0.1 * SIZE[0] * SIZE[1]  # a good part of the target is seen in the source
        right.append(color)
        depth_err.append(rel)
        wrong.append(_forward_warp_errors(item, -item["t_rel"])[0])
    right, wrong, depth_err = torch.cat(right), torch.cat(wrong), torch.cat(depth_err)
    # colours in [-1, 1]: bilinear textures and 2x2 supersampling blur a little, the geometry adds nothing
    assert right.median() < 0.08, float(right.median())
    assert wrong.median() > 3 * right.median(), (float(wrong.median()), float(right.median()))
    # the splatted target-camera depth lands where the target's own depth says (bilinear splat of smooth surfaces)
    assert depth_err.median() < 1e-3, float(depth_err.median())


def test_target_pixels_project_exactly_into_the_source(items):
    """Backward check at float precision: unproject every target pixel with dst_depth, move it into the source camera
    (inverse relative pose) and project; 1/z is linear over a plane in the image, so the source's disparity sampled
    bilinearly there equals 1/z of the point wherever the four source pixels lie on one face."""
    rel = []
    for item in items:
        K, K_inv, R, t = (item[k].double() for k in ("K", "K_inv", "R_rel", "t_rel"))
        dst, src = item["dst_depth"].double(), item["src_depth"].double()
        h, w = dst.shape
        x_dst = dst[..., None] * (_pixels(h, w).double() @ K_inv.T)
        x_src = (x_dst - t) @ R  # R^T (x - t)
        p = x_src @ K.T
        uv = p[..., :2] / p[..., 2:3]
        inside = (uv[..., 0] >= 0) & (uv[..., 0] <= w - 1) & (uv[..., 1] >= 0) & (uv[..., 1] <= h - 1)
        grid = torch.stack((uv[..., 0] / (w - 1) * 2 - 1, uv[..., 1] / (h - 1) * 2 - 1), dim=-1)[None]
        disp = F.grid_sample((1 / src)[None, None], grid, mode="bilinear", align_corners=True)[0, 0]
        rel.append(((disp - 1 / x_src[..., 2]).abs() * x_src[..., 2])[inside])
    rel = torch.cat(rel)
    assert rel.numel() > 0.5 * len(items) * SIZE[0] * SIZE[1]
    assert rel.median() < 1e-5, float(rel.median())
    assert (rel < 1e-4).float().mean() > 0.7  # the rest: pixels next to an occlusion edge


def test_sparse_points_lie_on_the_true_depth(items, scenes):
    for item in items:
        pts = item["src_points"]
        assert pts.shape == (scenes.num_points, 3)
        valid = pts[:, 2] > 0
        n = int(valid.sum())
        assert scenes.num_points // 2 <= n <= scenes.num_points
        assert valid[:n].all() and (pts[n:] == -1).all()  # points first, then -1 padding rows
        x, y, z = pts[:n, 0], pts[:n, 1], pts[:n, 2]
        assert torch.equal(x, x.round()) and torch.equal(y, y.round())  # pixel centres
        assert torch.equal(z, item["src_depth"][y.long(), x.long()])
        assert len({(int(a), int(b)) for a, b in zip(x, y)}) == n  # distinct pixels
        assert bool(item["has_points"])


def test_mono_disparity_is_affine_in_the_true_disparity_and_the_fit_recovers_it(items):
    for item in items:
        true = 1.0 / item["src_depth"].double()
        mono = item["src_mono_disparity"].double()
        A = torch.stack((true.flatten(), torch.ones(true.numel(), dtype=torch.float64)), dim=1)
        (a, b), *_ = torch.linalg.lstsq(A, mono.flatten()[:, None])
        a, b = float(a), float(b)
        assert 0.3 <= a <= 3.0 and 0.0 <= b <= 0.5  # an unknown map, not the identity
        torch.testing.assert_close(mono, a * true + b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(mono, true, rtol=0.01)
    batch = default_collate(items)
    disp = scaled_disparity(batch["src_mono_disparity"], batch["src_points"])
    torch.testing.assert_close(disp, 1.0 / batch["src_depth"], rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------------------------ pairs
def _frames_of(ds: SyntheticScenes, index: int, item: dict) -> tuple[int, int]:
    """(src, dst) frames whose cameras give the item's relative pose (searched over all frame pairs)."""
    found = []
    cams = [ds.camera(index, f) for f in range(ds.num_frames)]
    for s, (R_s, t_s) in enumerate(cams):
        for d, (R_d, t_d) in enumerate(cams):
            R_rel = R_d @ R_s.T
            t_rel = t_d - R_rel @ t_s
            if np.allclose(R_rel, item["R_rel"].numpy(), atol=1e-5) and np.allclose(
                t_rel, item["t_rel"].numpy(), atol=1e-5
            ):
                found.append((s, d))
    assert len(found) == 1, found
    return found[0]


def test_pairs_come_from_two_distinct_thirds_with_consistent_labels():
    ds = SyntheticScenes(num_scenes=3, num_frames=9, size=(8, 12))
    labels = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            src, dst = _frames_of(ds, i, item)
            gap = dst // 3 - src // 3  # thirds of 9 frames: 0-2, 3-5, 6-8
            assert gap != 0, (src, dst)
            assert item["label"] == {1: 0, 2: 1, -1: 2, -2: 3}[gap]
            labels.add(item["label"])
            assert torch.equal(item["src_img"], torch.from_numpy(ds._view(i, src)[0]).permute(2, 0, 1) * 2 - 1)
            assert torch.equal(item["dst_depth"], torch.from_numpy(ds._view(i, dst)[1]))
    assert labels == {0, 1, 2, 3}


def test_items_are_deterministic_and_set_epoch_redraws_the_pair():
    a, b = SyntheticScenes(num_scenes=3, size=(8, 12)), SyntheticScenes(num_scenes=3, size=(8, 12))
    for i in range(3):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)
    before = [a[i] for i in range(3)]
    a.set_epoch(1)
    after = [a[i] for i in range(3)]
    assert all(not torch.equal(p["src_points"], q["src_points"]) for p, q in zip(before, after))
    assert any(
        not torch.equal(p["R_rel"], q["R_rel"]) or not torch.equal(p["t_rel"], q["t_rel"])
        for p, q in zip(before, after)
    )
    b.set_epoch(1)
    assert torch.equal(b[2]["dst_img"], after[2]["dst_img"])
    other_seed = SyntheticScenes(num_scenes=3, size=(8, 12), seed=1)
    assert not torch.equal(other_seed[0]["src_img"], before[0]["src_img"])


def test_pair_item_layout(items):
    item = items[0]
    h, w = SIZE
    shapes = {
        "src_img": (3, h, w),
        "dst_img": (3, h, w),
        "R_rel": (3, 3),
        "t_rel": (3,),
        "K": (3, 3),
        "K_inv": (3, 3),
        "src_mono_disparity": (h, w),
        "src_depth": (h, w),
        "dst_depth": (h, w),
    }
    for key, shape in shapes.items():
        assert tuple(item[key].shape) == shape and item[key].dtype == torch.float32, key
    for key in ("src_img", "dst_img"):
        assert item[key].min() >= -1 and item[key].max() <= 1 and item[key].std() > 0.05
    torch.testing.assert_close(item["K"] @ item["K_inv"], torch.eye(3), atol=1e-5, rtol=0)
    R = item["R_rel"].double()
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.linalg.det(R) > 0
    assert (item["src_depth"] > 0).all() and torch.isfinite(item["src_depth"]).all()


# ------------------------------------------------------------------------------------------------ other kinds, args
def test_frames_and_depth_kinds():
    frames = SyntheticScenes(num_scenes=2, num_frames=4, size=(8, 12), kind="frames")
    depth = SyntheticScenes(num_scenes=2, num_frames=4, size=(8, 12), kind="depth")
    pairs = SyntheticScenes(num_scenes=2, num_frames=4, size=(8, 12))
    assert len(frames) == len(depth) == 8 and len(pairs) == 2
    for index in (0, 5):
        img, dep = frames[index]["image"], depth[index]["image"]
        assert img.shape == (3, 8, 12) and img.dtype == torch.float32 and -1 <= img.min() and img.max() <= 1
        assert dep.shape == (1, 8, 12) and dep.dtype == torch.float32 and -1 <= dep.min() and dep.max() <= 1
        assert float(dep.max()) == pytest.approx(1.0)  # normalised disparity: the nearest point is 1
        scene, frame = divmod(index, 4)
        item = pairs.pair(scene, frame, (frame + 1) % 4)
        assert torch.equal(img, item["src_img"])
        disp = 1.0 / item["src_depth"]
        torch.testing.assert_close(dep[0], 2 * disp / disp.max() - 1, rtol=0, atol=1e-6)
    with pytest.raises(IndexError):
        frames[8]


def test_textures_are_real_photos():
    textures, names = load_textures()
    skimage = [n for n in names if n.startswith("skimage:")]
    assert len(skimage) >= 9 and names[: len(skimage)] == tuple(skimage)
    assert "skimage:astronaut" in names
    assert textures.shape == (len(names), 64, 64, 3) and textures.dtype == np.float32
    assert textures.min() >= 0 and textures.max() <= 1
    assert (textures.reshape(len(names), -1).std(1) > 0.03).all()  # photos, not flat colours
    flat = textures.reshape(len(names), -1)
    assert len({f.tobytes() for f in flat}) == len(names)  # all different


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="video"),
        dict(num_scenes=0),
        dict(num_frames=2),
        dict(size=(3, 12)),
        dict(num_points=1),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="SyntheticScenes"):
        SyntheticScenes(**kwargs)
    with pytest.raises(IndexError):
        SyntheticScenes(num_scenes=2, size=(8, 12))[2]


@pytest.mark.parametrize(("kind", "channels"), [("pairs", 3), ("frames", 3), ("depth", 1)])
def test_datamodule_factory(kind, channels):
    dm = SyntheticScenesDataModule(kind=kind, size=(8, 12), num_scenes=5, num_val_scenes=2, batch_size=2)
    assert dm.image_size == (8, 12) and dm.channels == channels
    dm.setup("fit")
    per_scene = 1 if kind == "pairs" else 12
    assert len(dm.train_set) == 5 * per_scene and len(dm.val_set) == 2 * per_scene
    assert dm.train_set.kind == kind and dm.train_set.seed != dm.val_set.seed  # held-out rooms
    batch = next(iter(dm.val_dataloader()))
    key = "src_img" if kind == "pairs" else "image"
    assert batch[key].shape == (2, channels, 8, 12)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_training_epochs_redraw_the_pairs():
    import lightning as L

    class Record(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen: dict[int, set[bytes]] = {}

        def training_step(self, batch, batch_idx):
            points = {p.numpy().tobytes() for p in batch["src_points"]}
            self.seen.setdefault(self.current_epoch, set()).update(points)
            return self.w * 0.0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = SyntheticScenesDataModule(size=(8, 12), num_scenes=4, num_val_scenes=1, batch_size=4, num_workers=0)
    module = Record()
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    assert len(module.seen[0]) == len(module.seen[1]) == 4
    assert module.seen[0].isdisjoint(module.seen[1])  # the second epoch draws new pairs (new sparse points)
