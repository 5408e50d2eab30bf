"""Tests for geofree.data.realestate: COLMAP IO, pair sampling, sparse / camera-file datasets (tiny scenes, CPU)."""

from __future__ import annotations

import struct
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from geofree.data.realestate import (
    ColmapCamera,
    ColmapFormatError,
    ColmapImage,
    ColmapPoint3D,
    RealEstate10KCameras,
    RealEstate10KSparse,
    UnsupportedCameraModelError,
    pair_label,
    parse_camera_file,
    qvec_to_rotmat,
    read_colmap_model,
    rotmat_to_qvec,
    sample_pair_by_thirds,
    write_colmap_model,
)

H, W = 24, 40  # original frame size
OUT = (16, 20)  # output (h, w): row 0 scaled by 0.5, row 1 by 2/3
FX, FY, CX, CY = 30.0, 32.0, 20.0, 12.0


def rot(axis: str, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def third_of(k: int, n: int) -> int:
    """Third that frame index k of n belongs to (third t covers [t n // 3, (t + 1) n // 3))."""
    return max(t for t in range(3) if t * n // 3 <= k)


def frame_name(i: int) -> str:
    # digit counts differ across frames on purpose: 9xxxxxx sorts before 1xxxxxxx numerically
    return f"{9_000_000 + 1_000_000 * i}.png"


def make_sparse_scene(root, seq, n_frames=9, binary=True, split="train", seed=0, model="PINHOLE"):
    """Write a COLMAP scene with known poses / points; return its ground truth."""
    rng = np.random.default_rng(seed)
    seq_dir = root / split / seq
    (seq_dir / "images").mkdir(parents=True)
    K = np.array([[FX, 0, CX], [0, FY, CY], [0, 0, 1.0]])
    params = [FX, FY, CX, CY] if model == "PINHOLE" else [FX, CX, CY]
    if model == "SIMPLE_PINHOLE":
        K[1, 1] = FX
    xyz = np.stack([rng.uniform(-1, 1, 12), rng.uniform(-0.5, 0.5, 12), rng.uniform(4, 8, 12)], axis=1)
    pids = np.arange(1, 13)
    gt = {"names": [], "R": {}, "t": {}, "K": K, "xyz": dict(zip(pids.tolist(), xyz)), "obs": {}}
    images = []
    for i in range(n_frames):
        name = frame_name(i)
        R = np.eye(3) if i == 0 else rot("y", 3.0 * i) @ rot("x", -1.5 * i)
        t = np.zeros(3) if i == 0 else np.array([0.1 * i, -0.05 * i, 0.2 * i])
        vis = [p for p in pids if (p + i) % 4 != 0]
        cam_pts = xyz[np.array(vis) - 1] @ R.T + t
        proj = cam_pts @ K.T
        xys = proj[:, :2] / proj[:, 2:]
        ids = np.array(vis, dtype=np.int64)
        # interleave "no 3-D point" rows (-1) with nonsense pixel coordinates
        xys_all = np.concatenate([[[1.0, 2.0]], xys[:3], [[3.0, 4.0]], xys[3:]])
        ids_all = np.concatenate([[-1], ids[:3], [-1], ids[3:]])
        images.append(ColmapImage(i + 1, rotmat_to_qvec(R), t, 1, name, xys_all, ids_all))
        gt["names"].append(name)
        gt["R"][name], gt["t"][name] = R, t
        gt["obs"][name] = (xys, ids, cam_pts[:, 2])
        img = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(img).save(seq_dir / "images" / name)
    points = [ColmapPoint3D(int(p), xyz[p - 1], np.array([p, 2 * p, 3 * p], np.uint8), 0.5) for p in pids]
    write_colmap_model(seq_dir / "sparse", [ColmapCamera(1, model, W, H, np.array(params))], images, points, binary)
    return gt


# ---------------------------------------------------------------------------------------------------------------------
# COLMAP IO
# ---------------------------------------------------------------------------------------------------------------------


def test_qvec_to_rotmat_known_and_orthonormal():
    th = np.deg2rad(30.0)
    q = np.array([np.cos(th / 2), 0.0, np.sin(th / 2), 0.0])  # 30 deg about +y
    np.testing.assert_allclose(qvec_to_rotmat(q), rot("y", 30.0), atol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(20):
        R = qvec_to_rotmat(rng.normal(size=4))
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(R) == pytest.approx(1.0)
        # inverse mapping recovers the rotation (q and -q are the same rotation)
        np.testing.assert_allclose(qvec_to_rotmat(rotmat_to_qvec(R)), R, atol=1e-12)
    # 180 degree rotations exercise the non-trace branches
    for axis in "xyz":
        np.testing.assert_allclose(qvec_to_rotmat(rotmat_to_qvec(rot(axis, 180.0))), rot(axis, 180.0), atol=1e-12)


@pytest.mark.parametrize("binary", [True, False])
def test_colmap_round_trip(tmp_path, binary):
    rng = np.random.default_rng(1)
    cams = [
        ColmapCamera(1, "PINHOLE", 640, 360, np.array([500.1, 501.2, 320.3, 180.4])),
        ColmapCamera(3, "SIMPLE_PINHOLE", 320, 180, np.array([250.5, 160.0, 90.25])),
    ]
    ims = [
        ColmapImage(
            1,
            rotmat_to_qvec(rot("z", 10)),
            rng.normal(size=3),
            1,
            "a b.png",
            rng.normal(size=(5, 2)),
            np.array([-1, 3, 7, -1, 2]),
        ),
        ColmapImage(7, np.array([1.0, 0, 0, 0]), np.zeros(3), 3, "sub/c.png"),  # no 2-D points
    ]
    pts = [
        ColmapPoint3D(3, rng.normal(size=3), np.array([1, 2, 3], np.uint8), 0.25, np.array([1, 7]), np.array([1, 0])),
        ColmapPoint3D(2, rng.normal(size=3)),  # empty track
        ColmapPoint3D(
            7, np.array([1e-17, 1e17, np.pi]), np.array([255, 0, 9], np.uint8), 1.5, np.array([1]), np.array([2])
        ),
    ]
    write_colmap_model(tmp_path, cams, ims, pts, binary=binary)
    ext = ".bin" if binary else ".txt"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}{ext}" for n in ("cameras", "images", "points3D"))
    c2, i2, p2 = read_colmap_model(tmp_path)
    assert sorted(c2) == [1, 3] and sorted(i2) == [1, 7] and sorted(p2) == [2, 3, 7]
    for c in cams:
        r = c2[c.id]
        assert (r.model, r.width, r.height) == (c.model, c.width, c.height)
        np.testing.assert_array_equal(r.params, c.params)
    for im in ims:
        r = i2[im.id]
        assert (r.name, r.camera_id) == (im.name, im.camera_id)
        np.testing.assert_array_equal(r.qvec, im.qvec)
        np.testing.assert_array_equal(r.tvec, im.tvec)
        np.testing.assert_array_equal(r.xys, np.asarray(im.xys).reshape(-1, 2))
        np.testing.assert_array_equal(r.point3D_ids, im.point3D_ids)
        assert r.xys.shape == (len(im.point3D_ids), 2) and r.point3D_ids.dtype == np.int64
    for p in pts:
        r = p2[p.id]
        np.testing.assert_array_equal(r.xyz, p.xyz)
        np.testing.assert_array_equal(r.rgb, p.rgb)
        assert r.error == p.error
        np.testing.assert_array_equal(r.image_ids, p.image_ids)
        np.testing.assert_array_equal(r.point2D_idxs, p.point2D_idxs)


def test_unsupported_camera_model_refused(tmp_path):
    # binary: OPENCV is model id 4 with 8 parameters
    b = tmp_path / "bin"
    b.mkdir()
    (b / "cameras.bin").write_bytes(struct.pack("<QiiQQ8d", 1, 1, 4, W, H, *range(8)))
    (b / "images.bin").write_bytes(struct.pack("<Q", 0))
    (b / "points3D.bin").write_bytes(struct.pack("<Q", 0))
    with pytest.raises(UnsupportedCameraModelError, match="OPENCV"):
        read_colmap_model(b)
    t = tmp_path / "txt"
    t.mkdir()
    (t / "cameras.txt").write_text("# comment\n1 SIMPLE_RADIAL 40 24 30 20 12 0.01\n")
    (t / "images.txt").write_text("")
    (t / "points3D.txt").write_text("")
    with pytest.raises(UnsupportedCameraModelError, match="SIMPLE_RADIAL"):
        read_colmap_model(t)
    with pytest.raises(UnsupportedCameraModelError, match="FULL_OPENCV"):
        write_colmap_model(tmp_path / "w", [ColmapCamera(1, "FULL_OPENCV", 4, 4, np.zeros(12))], [], [])
    # the dataset skips such a sequence instead of crashing, and counts it
    make_sparse_scene(tmp_path / "ds", "good")
    bad = tmp_path / "ds" / "train" / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "sparse").mkdir()
    for f in b.iterdir():
        (bad / "sparse" / f.name).write_bytes(f.read_bytes())
    with pytest.warns(RuntimeWarning, match="unsupported_camera"):
        ds = RealEstate10KSparse(tmp_path / "ds", size=OUT)
    assert ds.sequences == ["good"] and ds.skipped == {"unsupported_camera": 1}


def test_truncated_model_raises_named_error(tmp_path):
    make_sparse_scene(tmp_path, "s")
    sparse = tmp_path / "train" / "s" / "sparse"
    data = (sparse / "images.bin").read_bytes()
    (sparse / "images.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ColmapFormatError, match="images.bin"):
        read_colmap_model(sparse)


# ---------------------------------------------------------------------------------------------------------------------
# pair sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_pair_label_rule():
    assert [pair_label(d, s) for d, s in [(1, 0), (2, 1), (2, 0), (0, 1), (1, 2), (0, 2)]] == [0, 0, 1, 2, 2, 3]
    with pytest.raises(ValueError):
        pair_label(1, 1)


@pytest.mark.parametrize("n", [3, 10, 31])
def test_sample_pair_by_thirds(n):
    rng = np.random.default_rng(0)
    pairs = Counter()
    frames_seen = set()
    for _ in range(600):
        dst, src, label = sample_pair_by_thirds(n, rng)
        td, ts = third_of(dst, n), third_of(src, n)
        assert 0 <= dst < n and 0 <= src < n
        assert td != ts
        assert label == pair_label(td, ts)
        pairs[(td, ts)] += 1
        frames_seen.update((dst, src))
    assert set(pairs) == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)}
    assert frames_seen == set(range(n))
    with pytest.raises(ValueError, match="3 frames"):
        sample_pair_by_thirds(2, rng)


# ---------------------------------------------------------------------------------------------------------------------
# RealEstate10KSparse
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_sparse_custom_test_pose_K_points(tmp_path, binary):
    gt = make_sparse_scene(tmp_path, "seqA", binary=binary)
    n = gt["names"]
    a, b, c = n[0], n[4], n[8]  # frame a has the identity pose
    ff = tmp_path / "frames.txt"
    ff.write_text(f"seqA,{a},{b},{c}\n")
    ds = RealEstate10KSparse(tmp_path, split="train", size=OUT, max_points=20, mode="custom_test", frames_file=ff)
    assert len(ds) == 4
    expected = [(b, a, 0), (c, a, 1), (a, b, 2), (a, c, 3)]  # (dst, src, label): b|a, c|a, a|b, a|c
    assert [(it["dst_frame"], it["src_frame"], it["label"]) for it in ds] == expected

    # b|a: source is the identity camera, so the relative pose is the destination's absolute pose
    it = ds[0]
    Rb, tb = gt["R"][b], gt["t"][b]
    np.testing.assert_allclose(it["R_rel"].numpy(), Rb, atol=1e-6)
    np.testing.assert_allclose(it["t_rel"].numpy(), tb, atol=1e-6)
    # a|b: the inverse
    it2 = ds[2]
    np.testing.assert_allclose(it2["R_rel"].numpy(), Rb.T, atol=1e-6)
    np.testing.assert_allclose(it2["t_rel"].numpy(), -Rb.T @ tb, atol=1e-6)
    # a|c through the general formula
    Rc, tc = gt["R"][c], gt["t"][c]
    np.testing.assert_allclose(ds[3]["R_rel"].numpy(), Rc.T, atol=1e-6)
    np.testing.assert_allclose(ds[3]["t_rel"].numpy(), -Rc.T @ tc, atol=1e-6)

    # K: rows 0 / 1 rescaled to the output size
    K_exp = np.array([[FX * 0.5, 0, CX * 0.5], [0, FY * 16 / 24, CY * 16 / 24], [0, 0, 1]])
    np.testing.assert_allclose(it["K"].numpy(), K_exp, rtol=1e-6)
    np.testing.assert_allclose(it["K_inv"].numpy() @ K_exp, np.eye(3), atol=1e-6)

    # dtypes / shapes
    for key in ("src_img", "dst_img"):
        assert it[key].shape == (3, *OUT) and it[key].dtype == torch.float32
        assert it[key].min() >= -1 and it[key].max() <= 1
    for key in ("R_rel", "t_rel", "K", "K_inv", "src_points"):
        assert it[key].dtype == torch.float32
    assert bool(it["has_points"]) is True and it["has_points"].dtype == torch.bool

    # src_points of a|b (source b): only ids > 0, xy scaled, z = camera-space depth, -1 padding
    xys, ids, z = gt["obs"][b]
    pts = it2["src_points"].numpy()
    assert pts.shape == (20, 3)
    k = len(ids)
    np.testing.assert_allclose(pts[:k, 0], xys[:, 0] * OUT[1] / W, rtol=1e-5)
    np.testing.assert_allclose(pts[:k, 1], xys[:, 1] * OUT[0] / H, rtol=1e-5)
    np.testing.assert_allclose(pts[:k, 2], z, rtol=1e-5)
    assert (pts[k:] == -1).all()
    # the pixel xy re-project the 3-D point through the rescaled K (consistency of xy, z and K)
    X = np.stack([gt["xyz"][int(i)] for i in ids]) @ gt["R"][b].T + gt["t"][b]
    np.testing.assert_allclose((X @ K_exp.T)[:, :2] / X[:, 2:], pts[:k, :2], rtol=1e-5)

    # images: PIL LANCZOS resize of the stored PNG, mapped to [-1, 1]
    ref = Image.open(tmp_path / "train" / "seqA" / "images" / b).convert("RGB")
    ref = np.asarray(ref.resize((OUT[1], OUT[0]), Image.Resampling.LANCZOS), np.float32) / 127.5 - 1
    np.testing.assert_allclose(it["dst_img"].numpy(), ref.transpose(2, 0, 1), atol=1e-6)


def test_sparse_max_points_keeps_first(tmp_path):
    gt = make_sparse_scene(tmp_path, "s", n_frames=3)
    ff = tmp_path / "f.txt"
    n = gt["names"]
    ff.write_text(f"s,{n[0]},{n[1]},{n[2]}\n")
    ds = RealEstate10KSparse(tmp_path, size=OUT, max_points=3, mode="custom_test", frames_file=ff)
    it = ds[0]  # b|a, source a
    _, _, z = gt["obs"][n[0]]
    assert it["src_points"].shape == (3, 3)
    np.testing.assert_allclose(it["src_points"][:, 2].numpy(), z[:3], rtol=1e-5)


def test_sparse_simple_pinhole_size_none(tmp_path):
    make_sparse_scene(tmp_path, "s", n_frames=3, model="SIMPLE_PINHOLE")
    ds = RealEstate10KSparse(tmp_path, size=None, max_points=4)
    it = ds[0]
    assert it["src_img"].shape == (3, H, W)
    np.testing.assert_allclose(it["K"].numpy(), [[FX, 0, CX], [0, FX, CY], [0, 0, 1]], rtol=1e-6)


def test_sparse_without_points_has_points_false(tmp_path):
    # issue #12: triangulation can leave a sequence without 3-D points
    seq = tmp_path / "train" / "s"
    (seq / "images").mkdir(parents=True)
    ims = []
    for i in range(3):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(seq / "images" / f"{i}.png")
        ims.append(ColmapImage(i + 1, np.array([1.0, 0, 0, 0]), np.zeros(3), 1, f"{i}.png", [[1.0, 2.0]], [-1]))
    write_colmap_model(seq / "sparse", [ColmapCamera(1, "PINHOLE", W, H, np.array([FX, FY, CX, CY]))], ims, [])
    it = RealEstate10KSparse(tmp_path, size=OUT, max_points=4)[0]
    assert not bool(it["has_points"]) and (it["src_points"] == -1).all()
    np.testing.assert_allclose(it["R_rel"].numpy(), np.eye(3), atol=1e-7)
    np.testing.assert_allclose(it["t_rel"].numpy(), np.zeros(3), atol=1e-7)


def test_sparse_train_sampling_thirds_and_determinism(tmp_path):
    gt = make_sparse_scene(tmp_path, "seqA", n_frames=9)
    make_sparse_scene(tmp_path, "seqB", n_frames=6, seed=1)
    ds = RealEstate10KSparse(tmp_path, size=OUT, max_points=16, seed=3)
    assert len(ds) == 2 and ds.sequences == ["seqA", "seqB"]
    # frames sorted numerically by name: frame i of the scene is index i
    order = {name: i for i, name in enumerate(gt["names"])}
    it0 = ds[0]
    again = ds[0]
    assert (it0["src_frame"], it0["dst_frame"]) == (again["src_frame"], again["dst_frame"])
    assert torch.equal(it0["src_img"], again["src_img"]) and torch.equal(it0["R_rel"], again["R_rel"])
    seen_pairs, draws = set(), []
    for epoch in range(60):
        ds.set_epoch(epoch)
        it = ds[0]
        ts, td = third_of(order[it["src_frame"]], 9), third_of(order[it["dst_frame"]], 9)
        assert ts != td
        assert it["label"] == pair_label(td, ts)
        seen_pairs.add((td, ts))
        draws.append((it["dst_frame"], it["src_frame"]))
        # relative pose from the files matches the ground truth of the sampled frames
        Rd, td_ = gt["R"][it["dst_frame"]], gt["t"][it["dst_frame"]]
        Rs, ts_ = gt["R"][it["src_frame"]], gt["t"][it["src_frame"]]
        np.testing.assert_allclose(it["R_rel"].numpy(), Rd @ Rs.T, atol=1e-6)
        np.testing.assert_allclose(it["t_rel"].numpy(), td_ - Rd @ Rs.T @ ts_, atol=1e-6)
    assert len(seen_pairs) == 6
    assert len(set(draws)) > 10  # epochs give different pairs
    ds.set_epoch(5)
    assert (ds[0]["dst_frame"], ds[0]["src_frame"]) == draws[5]
    # another seed gives another sequence of draws
    other = RealEstate10KSparse(tmp_path, size=OUT, max_points=16, seed=4)
    other_draws = []
    for epoch in range(20):
        other.set_epoch(epoch)
        other_draws.append((other[0]["dst_frame"], other[0]["src_frame"]))
    assert other_draws != draws[:20]
    # batches collate with the default collate function
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["src_img"].shape == (2, 3, *OUT) and batch["src_points"].shape == (2, 16, 3)
    assert batch["label"].shape == (2,) and batch["has_points"].dtype == torch.bool


def test_sparse_custom_test_multiple_sequences_and_missing(tmp_path):
    ga = make_sparse_scene(tmp_path, "b_seq", n_frames=3)
    gb = make_sparse_scene(tmp_path, "a_seq", n_frames=4, seed=2)
    ff = tmp_path / "frames.txt"
    na, nb = ga["names"], gb["names"]
    ff.write_text(f"b_seq,{na[0]},{na[1]},{na[2]}\nnot_there,x.png,y.png,z.png\n\na_seq,{nb[0]},{nb[2]},{nb[3]}\n")
    with pytest.warns(RuntimeWarning, match="missing_sequence_dir"):
        ds = RealEstate10KSparse(tmp_path, size=OUT, mode="custom_test", frames_file=ff, max_points=8)
    assert len(ds) == 8 and ds.skipped == {"missing_sequence_dir": 1}
    items = [ds[i] for i in range(len(ds))]
    assert [it["seq"] for it in items] == ["a_seq"] * 4 + ["b_seq"] * 4  # sorted by sequence
    assert [it["label"] for it in items] == [0, 1, 2, 3] * 2
    a, b, c = nb[0], nb[2], nb[3]
    assert [(it["dst_frame"], it["src_frame"]) for it in items[:4]] == [(b, a), (c, a), (a, b), (a, c)]
    with pytest.raises(IndexError):
        ds[8]
    # 141 sequences x 4 = 564 in the official set: the item count is 4 per usable sequence
    assert len(ds) == 4 * len(ds.sequences)
    # malformed frames file line is reported with its line number
    bad = tmp_path / "bad.txt"
    bad.write_text(f"b_seq,{na[0]},{na[1]},{na[2]}\nb_seq,{na[0]}\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2"):
        RealEstate10KSparse(tmp_path, size=OUT, mode="custom_test", frames_file=bad)


def test_sparse_skips_unreadable_sequences(tmp_path):
    make_sparse_scene(tmp_path, "good", n_frames=4)
    (tmp_path / "train" / "no_model" / "images").mkdir(parents=True)
    make_sparse_scene(tmp_path, "corrupt", n_frames=4)
    p = tmp_path / "train" / "corrupt" / "sparse" / "images.bin"
    p.write_bytes(p.read_bytes()[:100])
    make_sparse_scene(tmp_path, "short", n_frames=2)
    g = make_sparse_scene(tmp_path, "holes", n_frames=4)
    (tmp_path / "train" / "holes" / "images" / g["names"][1]).unlink()
    (tmp_path / "train" / "holes" / "images" / g["names"][2]).unlink()
    with pytest.warns(RuntimeWarning) as rec:
        ds = RealEstate10KSparse(tmp_path, size=OUT)
    assert len(rec) == 1  # one summary warning
    msg = str(rec[0].message)
    assert "missing_sparse_model" in msg and "no_model" in msg
    assert ds.sequences == ["good"]
    assert ds.skipped == {"missing_sparse_model": 1, "corrupt_model": 1, "too_few_frames": 2, "missing_frame": 2}
    assert ds[0]["seq"] == "good"
    # limit stops after that many usable sequences
    make_sparse_scene(tmp_path, "zz", n_frames=3)
    with pytest.warns(RuntimeWarning):
        assert len(RealEstate10KSparse(tmp_path, size=OUT, limit=1)) == 1


def test_empty_roots_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        RealEstate10KSparse(tmp_path / "nothing")
    (tmp_path / "r" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no usable sequence.*sparse"):
        RealEstate10KSparse(tmp_path / "r")
    (tmp_path / "r" / "train" / "x").mkdir()
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="missing_sparse_model"):
        RealEstate10KSparse(tmp_path / "r")
    with pytest.raises(ValueError, match="txt camera files"):
        RealEstate10KCameras(tmp_path / "r", tmp_path / "frames")
    with pytest.raises(ValueError, match="frames_file"):
        RealEstate10KSparse(tmp_path / "r", mode="custom_test")
    with pytest.raises(ValueError, match="mode"):
        RealEstate10KSparse(tmp_path / "r", mode="val")


# ---------------------------------------------------------------------------------------------------------------------
# camera files (RealEstate10KCameras, parse_camera_file)
# ---------------------------------------------------------------------------------------------------------------------

KN = (0.9, 1.6, 0.5, 0.45)  # normalised fx, fy, cx, cy


def camera_line(ts, R, t):
    P = np.concatenate([R, t[:, None]], axis=1)
    return " ".join([str(ts), *map(repr, KN), "0.0", "0.0", *(repr(float(v)) for v in P.ravel())])


def make_camera_scene(root, frames_root, seq, n_frames, missing=(), jpg=(), split="train"):
    (root / split).mkdir(parents=True, exist_ok=True)
    fdir = frames_root / split / seq
    fdir.mkdir(parents=True)
    rng = np.random.default_rng(len(seq))
    lines = [f"https://www.youtube.com/watch?v={seq}"]
    poses = {}
    for i in range(n_frames):
        ts = 33_366_000 * (i + 1) // 10  # mixed digit counts
        R = rot("z", 2.0 * i) @ rot("y", -4.0 * i)
        t = np.array([0.3 * i, 0.02 * i, -0.1 * i])
        poses[ts] = (R, t)
        lines.append(camera_line(ts, R, t))
        if i in missing:
            continue
        img = Image.fromarray(rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8))
        if i in jpg:
            img.save(fdir / f"{ts}.jpg", quality=95)
        else:
            img.save(fdir / f"{ts}.png")
    (root / split / f"{seq}.txt").write_text("\n".join(lines) + "\n")
    return poses


def test_parse_camera_file(tmp_path):
    f = tmp_path / "s.txt"
    R = rot("x", 20.0)
    t = np.array([1.0, 2.0, 3.0])
    f.write_text(
        "https://www.youtube.com/watch?v=abc\n" + camera_line(1234, R, t) + "\n\n" + camera_line(99, np.eye(3), t)
    )
    url, frames = parse_camera_file(f)
    assert url == "https://www.youtube.com/watch?v=abc"
    assert [ts for ts, _, _ in frames] == [1234, 99]
    _, Kn, P = frames[0]
    np.testing.assert_allclose(Kn, [[0.9, 0, 0.5], [0, 1.6, 0.45], [0, 0, 1]])
    np.testing.assert_allclose(P[:, :3], R)
    np.testing.assert_allclose(P[:, 3], t)
    # malformed lines name file and line number
    lines = f.read_text().splitlines()
    bad = tmp_path / "bad_count.txt"
    bad.write_text("\n".join([*lines[:3], lines[3].rsplit(" ", 1)[0]]))
    with pytest.raises(ValueError, match=r"bad_count\.txt, line 4: expected 19 values.*got 18"):
        parse_camera_file(bad)
    bad2 = tmp_path / "bad_num.txt"
    bad2.write_text("\n".join([lines[0], lines[1].replace("0.9", "zero.9", 1)]))
    with pytest.raises(ValueError, match=r"bad_num\.txt, line 2: 'zero\.9' is not a number"):
        parse_camera_file(bad2)


def test_cameras_dataset(tmp_path):
    root, froot = tmp_path / "cams", tmp_path / "frames"
    poses = make_camera_scene(root, froot, "seqA", n_frames=10, missing=(3,), jpg=(5,))
    make_camera_scene(root, froot, "tiny", n_frames=4, missing=(0, 2))
    (root / "train" / "broken.txt").write_text("http://x\n1 2 3\n")
    (froot / "train" / "broken").mkdir()
    with pytest.warns(RuntimeWarning, match="missing_frame"):
        ds = RealEstate10KCameras(root, froot, size=OUT, max_points=5, seed=1)
    assert ds.sequences == ["seqA"]
    assert ds.skipped == {"missing_frame": 3, "too_few_frames": 1, "malformed_camera_file": 1}
    order = sorted(poses)
    present = [ts for i, ts in enumerate(order) if i != 3]
    seen = set()
    for epoch in range(40):
        ds.set_epoch(epoch)
        it = ds[0]
        src_ts, dst_ts = int(it["src_frame"].split(".")[0]), int(it["dst_frame"].split(".")[0])
        ps, pd = present.index(src_ts), present.index(dst_ts)
        t_src, t_dst = third_of(ps, len(present)), third_of(pd, len(present))
        assert t_src != t_dst and it["label"] == pair_label(t_dst, t_src)
        seen.add(it["src_frame"].rsplit(".", 1)[1])
        Rs, ts_ = poses[src_ts]
        Rd, td = poses[dst_ts]
        np.testing.assert_allclose(it["R_rel"].numpy(), Rd @ Rs.T, atol=1e-6)
        np.testing.assert_allclose(it["t_rel"].numpy(), td - Rd @ Rs.T @ ts_, atol=1e-6)
        assert it["src_img"].shape == (3, *OUT) and it["dst_img"].shape == (3, *OUT)
    assert seen == {"png", "jpg"}
    it = ds[0]
    K_exp = np.array([[0.9 * OUT[1], 0, 0.5 * OUT[1]], [0, 1.6 * OUT[0], 0.45 * OUT[0]], [0, 0, 1]])
    np.testing.assert_allclose(it["K"].numpy(), K_exp, rtol=1e-6)
    np.testing.assert_allclose(it["K_inv"].numpy(), np.linalg.inv(K_exp), rtol=1e-5)
    assert it["src_points"].shape == (5, 3) and (it["src_points"] == -1).all()
    assert it["has_points"].dtype == torch.bool and not bool(it["has_points"])

    # custom test mode matches frames by timestamp (.png in the frames file, .jpg on disk)
    ff = tmp_path / "ff.txt"
    a, b, c = order[0], order[5], order[9]
    ff.write_text(f"seqA,{a}.png,{b}.png,{c}.png\n")
    with pytest.warns(RuntimeWarning):
        test = RealEstate10KCameras(root, froot, size=OUT, mode="custom_test", frames_file=ff)
    assert [(x["dst_frame"], x["src_frame"], x["label"]) for x in test] == [
        (f"{b}.jpg", f"{a}.png", 0),
        (f"{c}.png", f"{a}.png", 1),
        (f"{a}.png", f"{b}.jpg", 2),
        (f"{a}.png", f"{c}.png", 3),
    ]
