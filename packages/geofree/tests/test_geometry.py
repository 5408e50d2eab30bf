"""Tests for geofree.geometry: cameras, depth-scale fit, summation splatting and the forward warp."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from geofree.geometry import (
    DEFAULT_FIXED_SCALE,
    camera_vector,
    check_intrinsics,
    check_rotation,
    fit_disparity_scale,
    fixed_scale_disparity,
    intrinsics_inverse,
    normalize_camera,
    relative_pose,
    render_forward,
    rescale_intrinsics,
    scaled_disparity,
    sparse_depth_map,
    splat_sum,
    warp_features,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_rotation(g: torch.Generator, batch: int, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(batch, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    det = torch.linalg.det(q)
    q[:, :, 0] *= det[:, None]  # force det = +1
    return q.to(dtype)


def _rot_y(angle: float, dtype=torch.float32) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=dtype)


def _K(fx=20.0, fy=22.0, cx=7.5, cy=5.0, batch=1, dtype=torch.float32) -> torch.Tensor:
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)
    return K.expand(batch, 3, 3).clone()


def _naive_splat(values: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Literal transcription of the pesser/splatting CPU loop (summation mode)."""
    B, _, H, W = values.shape
    out = torch.zeros_like(values)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                ox = x + float(flow[b, 0, y, x])
                oy = y + float(flow[b, 1, y, x])
                x0, y0 = math.floor(ox), math.floor(oy)
                taps = [
                    (x0, y0, (x0 + 1 - ox) * (y0 + 1 - oy)),
                    (x0 + 1, y0, (ox - x0) * (y0 + 1 - oy)),
                    (x0, y0 + 1, (x0 + 1 - ox) * (oy - y0)),
                    (x0 + 1, y0 + 1, (ox - x0) * (oy - y0)),
                ]
                for tx, ty, w in taps:
                    if 0 <= tx < W and 0 <= ty < H:
                        out[b, :, ty, tx] += w * values[b, :, y, x]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# cameras
# ---------------------------------------------------------------------------------------------------------------------


def test_relative_pose_identical_cameras_is_identity():
    g = _gen(0)
    R = _random_rotation(g, 3)
    t = torch.randn(3, 3, generator=g, dtype=torch.float64)
    R_rel, t_rel = relative_pose(R, t, R, t)
    torch.testing.assert_close(R_rel, torch.eye(3, dtype=torch.float64).expand(3, 3, 3), atol=1e-12, rtol=0)
    torch.testing.assert_close(t_rel, torch.zeros(3, 3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_relative_pose_maps_source_camera_points_to_target_camera():
    g = _gen(1)
    B, N = 4, 50
    R_s, R_d = _random_rotation(g, B), _random_rotation(g, B)
    t_s = torch.randn(B, 3, generator=g, dtype=torch.float64)
    t_d = torch.randn(B, 3, generator=g, dtype=torch.float64)
    x_w = torch.randn(B, N, 3, generator=g, dtype=torch.float64) * 5
    x_src = x_w @ R_s.transpose(1, 2) + t_s[:, None]
    x_dst = x_w @ R_d.transpose(1, 2) + t_d[:, None]
    R_rel, t_rel = relative_pose(R_s, t_s, R_d, t_d)
    torch.testing.assert_close(x_src @ R_rel.transpose(1, 2) + t_rel[:, None], x_dst, atol=1e-10, rtol=0)
    check_rotation(R_rel, "R_rel", atol=1e-9)


def test_relative_pose_checks_rotations():
    R = torch.eye(3).expand(2, 3, 3) * 2.0
    t = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="R_src.*not orthonormal"):
        relative_pose(R, t, torch.eye(3).expand(2, 3, 3), t)


def test_check_rotation_accepts_and_returns_rotation():
    R = _random_rotation(_gen(2), 5, dtype=torch.float32)
    assert check_rotation(R) is R
    assert check_rotation(torch.eye(3)) is not None


@pytest.mark.parametrize(
    ("matrix", "words"),
    [
        (torch.eye(3) * 1.1, r"Rcam is not orthonormal \(max \|R R\^T - I\| = 0\.21"),
        (torch.diag(torch.tensor([1.0, 1.0, -1.0])), r"Rcam is a reflection, det = -1"),
        (torch.eye(3)[:2], r"Rcam must have shape \(\.\.\., 3, 3\), got \(2, 3\)"),
        (torch.ones(4), r"Rcam must have shape"),
        (torch.full((3, 3), float("nan")), r"Rcam contains non-finite"),
    ],
)
def test_check_rotation_rejects(matrix, words):
    with pytest.raises(ValueError, match=words):
        check_rotation(matrix, name="Rcam")


def test_check_rotation_reports_worst_batch_item():
    R = torch.eye(3).repeat(3, 1, 1)
    R[1] *= 1.01
    R[2] *= 1.3
    with pytest.raises(ValueError, match=r"= 0\.69"):
        check_rotation(R)
    check_rotation(torch.eye(3) * 1.0004)  # within atol


def test_check_intrinsics_accepts_valid():
    K = _K(batch=2)
    assert check_intrinsics(K) is K
    assert check_intrinsics(K[0]) is not None


@pytest.mark.parametrize(
    ("K", "words"),
    [
        (torch.zeros(3, 4), r"intrinsics K must have shape \(B, 3, 3\) or \(3, 3\), got \(3, 4\)"),
        (torch.zeros(1, 1, 3, 3), r"got \(1, 1, 3, 3\)"),
        (torch.tensor([[20.0, 0, 5], [0, 20, 5], [0, 1, 1]]), r"last row must be \[0, 0, 1\], got \[0, 1, 1\]"),
        (torch.tensor([[0.0, 0, 5], [0, 20, 5], [0, 0, 1]]), r"focal lengths must be positive.*fx = 0"),
        (torch.tensor([[20.0, 0, 5], [0, -3, 5], [0, 0, 1]]), r"focal lengths must be positive.*fy = -3"),
        (torch.tensor([[20.0, 0, float("inf")], [0, 20, 5], [0, 0, 1]]), r"non-finite"),
    ],
)
def test_check_intrinsics_rejects(K, words):
    with pytest.raises(ValueError, match=words):
        check_intrinsics(K)


def test_intrinsics_inverse_and_rescale():
    K = torch.tensor(
        [[[300.0, 0.0, 184.0], [0.0, 310.0, 104.0], [0.0, 0.0, 1.0]], [[50.0, 2.0, 10.0], [0.0, 60.0, 8.0], [0, 0, 1]]],
        dtype=torch.float64,
    )
    K_inv = intrinsics_inverse(K)
    torch.testing.assert_close(K_inv, torch.linalg.inv(K), atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(K @ K_inv, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), atol=1e-12, rtol=0)

    K_small = rescale_intrinsics(K, (208, 368), (13, 23))
    assert K_small.dtype == torch.float64
    torch.testing.assert_close(K_small[:, 0], K[:, 0] * 23 / 368)
    torch.testing.assert_close(K_small[:, 1], K[:, 1] * 13 / 208)
    torch.testing.assert_close(K_small[:, 2], K[:, 2])
    assert K[0, 0, 0] == 300.0  # not mutated
    # a pixel grid point maps consistently: resizing by exact factors scales pixel coordinates of a 3D point
    x = torch.tensor([0.3, -0.2, 2.0], dtype=torch.float64)
    p = K[0] @ x
    p2 = rescale_intrinsics(K[0], (100, 200), (50, 50)) @ x
    torch.testing.assert_close(p2[:2] / p2[2], p[:2] / p[2] * torch.tensor([0.25, 0.5], dtype=torch.float64))


def test_camera_vector_order():
    B = 2
    vals = torch.arange(B * 30, dtype=torch.float32).reshape(B, 30) + 1000 * torch.arange(B)[:, None]
    R = vals[:, 0:9].reshape(B, 3, 3)
    t = vals[:, 9:12]
    K = vals[:, 12:21].reshape(B, 3, 3)
    K_inv = vals[:, 21:30].reshape(B, 3, 3)
    vec = camera_vector(R, t, K, K_inv)
    assert vec.shape == (B, 30)
    torch.testing.assert_close(vec, vals)
    assert vec[1, 1] == R[1, 0, 1]  # row-major
    assert vec[1, 11] == t[1, 2]
    assert vec[0, 12 + 5] == K[0, 1, 2]
    assert vec[0, 21 + 6] == K_inv[0, 2, 0]
    # unbatched intrinsics broadcast over the batch
    vec2 = camera_vector(R, t, K[0], K_inv[0])
    torch.testing.assert_close(vec2[1, 12:], vals[0, 12:])
    with pytest.raises(ValueError, match="translation t"):
        camera_vector(R, torch.zeros(B, 4), K, K_inv)


# ---------------------------------------------------------------------------------------------------------------------
# depth scale
# ---------------------------------------------------------------------------------------------------------------------


def test_sparse_depth_map_rasterises_like_official():
    pts = torch.tensor(
        [
            [
                [1.4, 2.6, 5.0],  # -> row 3, col 1
                [-3.0, 0.2, 2.0],  # clamped to col 0, row 0
                [9.7, 9.9, 4.0],  # clamped to (row 4, col 5)
                [1.2, 3.4, 7.0],  # same pixel as the first point: later wins
                [2.0, 1.0, 5e-4],  # too shallow: ignored
                [-1.0, -1.0, -1.0],  # padding row: ignored (does not clobber pixel (0, 0))
                [-1.0, -1.0, -1.0],
            ]
        ]
    )
    depth, valid = sparse_depth_map(pts, 5, 6)
    assert depth.shape == (1, 5, 6) and valid.dtype == torch.bool
    expected = torch.zeros(1, 5, 6)
    expected[0, 3, 1] = 7.0
    expected[0, 0, 0] = 2.0
    expected[0, 4, 5] = 4.0
    torch.testing.assert_close(depth, expected)
    assert valid.sum() == 3 and bool(valid[0, 0, 0]) and bool(valid[0, 3, 1])
    assert not bool(valid[0, 1, 2])


def _synthetic_fit_case(a: float, b: float, seed: int = 3):
    g = _gen(seed)
    B, H, W, N = 2, 12, 16, 40
    est = torch.rand(B, H, W, generator=g) + 0.1
    pts = torch.full((B, N + 10, 3), -1.0)
    for i in range(B):
        idx = torch.randperm(H * W, generator=g)[:N]
        r, c = idx // W, idx % W
        delta = a * est[i, r, c] + b
        real = torch.stack([c.float() + 0.3, r.float() - 0.4, 1.0 / delta], -1)  # subpixel, rounds back
        # mix the padding rows between the real ones
        perm = torch.randperm(N + 10, generator=g)
        rows = torch.cat([real, torch.full((10, 3), -1.0)])[perm]
        pts[i] = rows
    return est, pts


def test_fit_disparity_scale_recovers_affine_map():
    a, b = 0.37, 0.052
    est, pts = _synthetic_fit_case(a, b)
    s, c = fit_disparity_scale(est, pts)
    assert s.shape == (2,) and c.shape == (2,)
    torch.testing.assert_close(s, torch.full((2,), a), atol=1e-5, rtol=0)
    torch.testing.assert_close(c, torch.full((2,), b), atol=1e-5, rtol=0)

    # the paper's (uncentred) formula gives the same numbers
    depth, valid = sparse_depth_map(pts.double(), 12, 16)
    m = valid.double()
    d = est.double() * m
    delta = torch.where(valid, 1 / depth.clamp(min=1e-3), torch.zeros_like(depth))
    n = m.sum((1, 2))
    s_ref = ((d * delta).sum((1, 2)) - d.sum((1, 2)) * delta.sum((1, 2)) / n) / (
        (d**2).sum((1, 2)) - d.sum((1, 2)) ** 2 / n
    )
    c_ref = (delta.sum((1, 2)) - s_ref * d.sum((1, 2))) / n
    torch.testing.assert_close(s.double(), s_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(c.double(), c_ref, atol=1e-5, rtol=0)

    disp = scaled_disparity(est, pts)
    torch.testing.assert_close(disp, a * est + b, atol=1e-5, rtol=1e-5)


def test_scaled_disparity_clamps_to_positive():
    est, pts = _synthetic_fit_case(-0.5, 0.3)
    disp = scaled_disparity(est, pts)
    assert float(disp.min()) == pytest.approx(1e-8)
    assert bool((disp >= 1e-8).all())


def test_fit_disparity_scale_needs_two_points():
    est = torch.rand(3, 8, 8, generator=_gen(4)) + 0.5
    pts = torch.full((3, 5, 3), -1.0)
    pts[0, 0] = torch.tensor([1.0, 1.0, 2.0])
    pts[0, 1] = torch.tensor([5.0, 3.0, 4.0])
    pts[2, 2] = torch.tensor([2.0, 2.0, 3.0])  # a single point is not enough
    with pytest.raises(ValueError, match=r"no sparse points to fit the depth scale.*\[1, 2\]"):
        fit_disparity_scale(est, pts)
    with pytest.raises(ValueError, match="no sparse points"):
        scaled_disparity(est, pts)
    with pytest.raises(ValueError, match=r"\(3, N, 3\)"):
        fit_disparity_scale(est, pts[:2])


def test_fixed_scale_disparity_min_max():
    est = torch.rand(2, 6, 7, generator=_gen(5)) * 4 + 1
    disp = fixed_scale_disparity(est)
    lo, hi = DEFAULT_FIXED_SCALE
    torch.testing.assert_close(disp.amin((1, 2)), torch.full((2,), lo))
    torch.testing.assert_close(disp.amax((1, 2)), torch.full((2,), hi))
    # monotone in the estimate
    order_in = est.flatten(1).argsort(1)
    assert bool((disp.flatten(1).gather(1, order_in).diff(dim=1) >= 0).all())
    const = fixed_scale_disparity(torch.ones(1, 3, 3), scale=(0.2, 0.8))
    torch.testing.assert_close(const, torch.full((1, 3, 3), 0.2))


def test_normalize_camera():
    g = _gen(6)
    disp = torch.rand(3, 5, 7, generator=g) * 3 + 0.1
    t = torch.randn(3, 3, generator=g)
    disp0, t0 = disp.clone(), t.clone()
    disp_n, t_n, alpha = normalize_camera(disp, t)
    torch.testing.assert_close(alpha, disp.amax((1, 2)))
    torch.testing.assert_close(disp_n.amax((1, 2)), torch.ones(3))
    torch.testing.assert_close(disp_n * alpha[:, None, None], disp)
    torch.testing.assert_close(t_n, t * alpha[:, None])
    assert torch.equal(disp, disp0) and torch.equal(t, t0)  # inputs unchanged


# ---------------------------------------------------------------------------------------------------------------------
# summation splatting
# ---------------------------------------------------------------------------------------------------------------------


def test_splat_sum_zero_flow_is_identity():
    x = torch.randn(2, 3, 5, 6, generator=_gen(7))
    torch.testing.assert_close(splat_sum(x, torch.zeros(2, 2, 5, 6)), x, atol=0, rtol=0)


def test_splat_sum_integer_shift():
    x = torch.rand(1, 2, 5, 6, generator=_gen(8)) + 1
    flow = torch.zeros(1, 2, 5, 6)
    flow[:, 0] = 2.0  # two columns right
    flow[:, 1] = -1.0  # one row up
    out = splat_sum(x, flow)
    torch.testing.assert_close(out[:, :, :4, 2:], x[:, :, 1:, :4], atol=0, rtol=0)
    assert float(out[:, :, 4].abs().max()) == 0.0  # vacated bottom row
    assert float(out[:, :, :, :2].abs().max()) == 0.0  # vacated left columns


def test_splat_sum_half_pixel_splits_mass():
    x = torch.zeros(1, 1, 3, 4)
    x[0, 0, 1, 1] = 1.0
    flow = torch.zeros(1, 2, 3, 4)
    flow[0, 0, 1, 1] = 0.5
    out = splat_sum(x, flow)
    assert float(out[0, 0, 1, 1]) == pytest.approx(0.5)
    assert float(out[0, 0, 1, 2]) == pytest.approx(0.5)
    assert float(out.sum()) == pytest.approx(1.0)
    flow[0, 1, 1, 1] = 0.5  # diagonal: four quarters
    out = splat_sum(x, flow)
    for r, c in ((1, 1), (1, 2), (2, 1), (2, 2)):
        assert float(out[0, 0, r, c]) == pytest.approx(0.25)


def test_splat_sum_conserves_mass_inside_the_image():
    g = _gen(9)
    x = torch.rand(2, 3, 8, 9, generator=g)
    flow = (torch.rand(2, 2, 8, 9, generator=g) - 0.5) * 1.8
    flow[:, :, [0, -1], :] = 0.0  # border pixels stay put, so nothing leaves the image
    flow[:, :, :, [0, -1]] = 0.0
    out = splat_sum(x, flow)
    torch.testing.assert_close(out.sum((2, 3)), x.sum((2, 3)), atol=1e-5, rtol=1e-6)


def test_splat_sum_matches_naive_loop_and_drops_outside_and_nonfinite():
    g = _gen(10)
    x = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    flow = (torch.rand(2, 2, 5, 6, generator=g, dtype=torch.float64) - 0.5) * 6  # some land outside
    out = splat_sum(x, flow)
    torch.testing.assert_close(out, _naive_splat(x, flow), atol=1e-6, rtol=0)
    x32, flow32 = x.float(), flow.float()
    torch.testing.assert_close(splat_sum(x32, flow32), _naive_splat(x32, flow32), atol=1e-6, rtol=0)

    bad = flow.clone()
    bad[0, 0, 2, 3] = float("nan")
    bad[1, 1, 0, 0] = float("inf")
    bad[1, 0, 4, 4] = 1e30
    ref_flow = flow.clone()
    ref_flow[0, :, 2, 3] = 1e6  # "dropped" == sent far outside
    ref_flow[1, :, 0, 0] = 1e6
    ref_flow[1, :, 4, 4] = 1e6
    out_bad = splat_sum(x, bad)
    assert bool(torch.isfinite(out_bad).all())
    torch.testing.assert_close(out_bad, _naive_splat(x, ref_flow), atol=1e-6, rtol=0)


def test_splat_sum_gradients():
    g = _gen(11)
    x = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    flow = (0.1 + 0.8 * torch.rand(1, 2, 3, 4, generator=g, dtype=torch.float64)) * torch.where(
        torch.rand(1, 2, 3, 4, generator=g) > 0.5, 1.0, -1.0
    ).double()
    flow.requires_grad_(True)
    assert torch.autograd.gradcheck(splat_sum, (x, flow), eps=1e-6, atol=1e-6)


def test_splat_sum_shape_errors():
    with pytest.raises(ValueError, match=r"flow must have shape \(1, 2, 3, 4\)"):
        splat_sum(torch.zeros(1, 1, 3, 4), torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        splat_sum(torch.zeros(3, 4), torch.zeros(2, 3, 4))


# ---------------------------------------------------------------------------------------------------------------------
# forward warp
# ---------------------------------------------------------------------------------------------------------------------


def _identity_pose(B: int, dtype=torch.float32):
    return torch.eye(3, dtype=dtype).expand(B, 3, 3).clone(), torch.zeros(B, 3, dtype=dtype)


def test_render_forward_identity_reproduces_source():
    g = _gen(12)
    B, C, H, W = 2, 3, 10, 16
    src = torch.rand(B, C, H, W, generator=g)
    depth = torch.full((B, H, W), 2.5)
    K = _K(batch=B)
    R, t = _identity_pose(B)
    out, weight = render_forward(src, depth, R, t, intrinsics_inverse(K), K, return_weight=True)
    assert out.shape == src.shape and weight.shape == (B, 1, H, W)
    assert float((out - src).abs().max()) < 1e-4
    assert bool((weight > 0).all())
    # a Boltzmann factor does not matter without collisions either
    out_b = render_forward(src, depth, R, t, intrinsics_inverse(K), K, boltzmann=2.0)
    assert float((out_b - src).abs().max()) < 1e-4


def test_render_forward_identity_with_varying_depth_float64():
    # with varying depth the importance spans exp(10): fp32 round-off in the flow (~1e-6 px) leaks a near pixel's
    # weight into its neighbours and is amplified up to e^10 (a property of the official heuristic); in float64 the
    # identity warp is exact to round-off.
    g = _gen(19)
    B, C, H, W = 2, 3, 10, 16
    src = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    depth = torch.rand(B, H, W, generator=g, dtype=torch.float64) * 4 + 1
    K = _K(batch=B, dtype=torch.float64)
    R, t = _identity_pose(B, torch.float64)
    out = render_forward(src, depth, R, t, intrinsics_inverse(K), K)
    assert float((out - src).abs().max()) < 1e-8


def test_render_forward_translation_shifts_image_and_leaves_zero_holes():
    g = _gen(13)
    B, C, H, W = 1, 2, 6, 12
    fx, z, tx = 8.0, 2.0, 0.75  # shift = fx * tx / z = 3 pixels to the right
    src = torch.rand(B, C, H, W, generator=g) + 0.5
    depth = torch.full((B, H, W), z)
    K = _K(fx=fx, fy=9.0, cx=5.5, cy=2.5, batch=B)
    R = torch.eye(3).expand(B, 3, 3)
    t = torch.tensor([[tx, 0.0, 0.0]])
    out, weight = render_forward(src, depth, R, t, intrinsics_inverse(K), K, return_weight=True)
    assert float((out[..., 3:] - src[..., :-3]).abs().max()) < 1e-4
    assert float(out[..., :3].abs().max()) == 0.0  # holes are exactly 0
    assert float(weight[..., :3].abs().max()) == 0.0
    assert bool((weight[..., 3:] > 0).all())


def test_render_forward_occlusion_nearer_point_dominates():
    # one row, fx = 1, tx = 4: a pixel at depth z moves 4/z columns. Column 1 (z = 1) and column 3 (z = 2) both
    # land on column 5; every other pixel lands on an integer column elsewhere or leaves the image.
    depth = torch.tensor([[[4.0, 1.0, 4.0, 2.0, 0.5, 0.5, 4.0, 4.0]]], dtype=torch.float64)
    src = torch.arange(8, dtype=torch.float64).reshape(1, 1, 1, 8) * 10 + 1
    K = torch.tensor([[[1.0, 0.0, 3.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    R = torch.eye(3, dtype=torch.float64)[None]
    t = torch.tensor([[4.0, 0.0, 0.0]], dtype=torch.float64)
    out, weight = render_forward(src, depth, R, t, intrinsics_inverse(K), K, return_weight=True)

    inv_z = 1 / depth
    lo, hi = float(inv_z.min()), float(inv_z.max())

    def imp(z):
        return math.exp(10 * (1 / z - lo) / (hi - lo + 1e-6) - 10)

    w_near, w_far = imp(1.0), imp(2.0)
    assert w_near / w_far == pytest.approx(math.exp(10 * 0.5 / (1.75 + 1e-6)))
    expected = (w_near * 11.0 + w_far * 31.0) / (w_near + w_far)
    assert float(out[0, 0, 0, 5]) == pytest.approx(expected, rel=1e-9)
    assert float(weight[0, 0, 0, 5]) == pytest.approx(w_near + w_far, rel=1e-9)
    assert abs(float(out[0, 0, 0, 5]) - 11.0) < abs(float(out[0, 0, 0, 5]) - 31.0)  # near point dominates
    # uncontested targets keep their value: column 0 -> 1, column 2 -> 3
    assert float(out[0, 0, 0, 1]) == pytest.approx(1.0)
    assert float(out[0, 0, 0, 3]) == pytest.approx(21.0)
    assert float(weight[0, 0, 0, 0]) == 0.0 and float(out[0, 0, 0, 0]) == 0.0

    # with a Boltzmann factor b the weights are exp(b / z)
    b = 3.0
    out_b = render_forward(src, depth, R, t, intrinsics_inverse(K), K, boltzmann=b)
    wn, wf = math.exp(b / 1.0), math.exp(b / 2.0)
    assert float(out_b[0, 0, 0, 5]) == pytest.approx((wn * 11 + wf * 31) / (wn + wf), rel=1e-9)


def test_render_forward_matches_official_transcription():
    # the official render_forward's matmul chain, with the naive splat standing in for the CUDA extension
    g = _gen(20)
    B, C, H, W = 2, 2, 5, 6
    src = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    depth = torch.rand(B, H, W, generator=g, dtype=torch.float64) * 3 + 1
    K = _K(fx=6.0, fy=5.0, cx=2.5, cy=2.0, batch=B, dtype=torch.float64)
    K_inv = torch.linalg.inv(K)
    R = torch.stack([_rot_y(0.1, torch.float64), _rot_y(-0.2, torch.float64)])
    t = torch.tensor([[0.3, 0.1, -0.2], [-0.4, 0.0, 0.3]], dtype=torch.float64)

    u, v = torch.meshgrid(torch.arange(W, dtype=torch.float64), torch.arange(H, dtype=torch.float64), indexing="xy")
    coord = torch.stack([u, v, torch.ones_like(u)], -1)[None]  # 1, H, W, 3
    D = depth[:, :, :, None, None]
    pts = K[:, None, None] @ (
        R[:, None, None] @ (D * K_inv[:, None, None] @ coord[..., None]) + t[:, None, None, :, None]
    )
    pts = pts.squeeze(-1)
    new_z = pts[..., [2]].permute(0, 3, 1, 2)
    flow = (pts / pts[..., [2]].clamp(min=1e-8) - coord).permute(0, 3, 1, 2)[:, :2]
    imp = 1.0 / new_z
    lo, hi = imp.amin((1, 2, 3), keepdim=True), imp.amax((1, 2, 3), keepdim=True)
    imp = ((imp - lo) / (hi - lo + 1e-6) * 10 - 10).exp()
    splat = _naive_splat(torch.cat([imp * src, imp], 1), flow)
    expected = splat[:, :-1] / splat[:, -1:].clamp(min=1e-8)

    out = render_forward(src, depth, R, t, K_inv, K)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert float((splat[:, -1:] == 0).sum()) > 0  # the case has holes


def test_render_forward_shape_errors():
    src = torch.zeros(2, 3, 4, 5)
    depth = torch.ones(2, 4, 5)
    K = _K(batch=2)
    R, t = _identity_pose(2)
    with pytest.raises(ValueError, match=r"depth must have shape \(2, 4, 5\)"):
        render_forward(src, depth[:, :3], R, t, K, K)
    with pytest.raises(ValueError, match=r"rotation R must have shape \(2, 3, 3\)"):
        render_forward(src, depth, R[:1], t, K, K)
    with pytest.raises(ValueError, match=r"translation t must have shape \(2, 3\)"):
        render_forward(src, depth, R, t[:, :2], K, K)
    with pytest.raises(ValueError, match=r"intrinsics K_dst"):
        render_forward(src, depth, R, t, K, K[:, :2])
    with pytest.raises(ValueError, match=r"src must have shape"):
        render_forward(src[0], depth, R, t, K, K)


def test_warp_features_identity_returns_features():
    g = _gen(14)
    B, C, H, W, h, w = 2, 4, 32, 48, 8, 12
    feats = torch.randn(B, C, h, w, generator=g, dtype=torch.float64)
    depth = 2 + torch.rand(B, 1, 4, 6, generator=g, dtype=torch.float64)
    depth = F.interpolate(depth, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    K = _K(fx=40.0, fy=40.0, cx=23.5, cy=15.5, batch=B, dtype=torch.float64)
    R, t = _identity_pose(B, torch.float64)
    out = warp_features(feats, depth, R, t, intrinsics_inverse(K), K, image_size=(H, W))
    assert out.shape == feats.shape and out.dtype == torch.float64
    assert float((out - feats).abs().max()) < 1e-8
    # fp32, constant depth
    out32 = warp_features(
        feats.float(),
        torch.full((B, H, W), 3.0),
        R.float(),
        t.float(),
        K.inverse().float(),
        K.float(),
        image_size=(H, W),
    )
    assert float((out32 - feats.float()).abs().max()) < 1e-4


def test_warp_features_matches_official_quirk_for_208x368_to_13x23():
    g = _gen(15)
    B, C, H, W, h, w = 1, 8, 208, 368, 13, 23
    feats = torch.randn(B, C, h, w, generator=g)
    depth = 1.5 + 3 * torch.rand(B, 1, 6, 9, generator=g)
    depth = F.interpolate(depth, size=(H, W), mode="bicubic", align_corners=False)[:, 0].clamp(min=1.0)
    K = _K(fx=300.0, fy=300.0, cx=184.0, cy=104.0, batch=B)
    K_inv = intrinsics_inverse(K)
    R = _rot_y(0.05)[None]
    t = torch.tensor([[0.3, -0.1, 0.2]])
    ours = warp_features(feats, depth, R, t, K_inv, K, image_size=(H, W))

    # the official Midas.warp_features rescaling, including K_src_inv[1, 1] /= width ratio
    dms = F.interpolate(depth[:, None], size=(h, w), mode="bicubic", align_corners=False)[:, 0]
    K_dst = K.clone()
    K_dst[:, 0, :] *= w / W
    K_dst[:, 1, :] *= h / H
    K_src_inv = K_inv.clone()
    K_src_inv[:, 0, 0] /= w / W
    K_src_inv[:, 1, 1] /= w / W
    official = render_forward(feats, dms, R, t, K_src_inv, K_dst)
    assert float(ours.abs().max()) > 0.1 and not torch.allclose(ours, feats, atol=1e-2)  # a non-trivial warp
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)


def test_warp_features_uses_height_ratio_for_rows():
    # unequal ratios (h/H = 1/2, w/W = 1/4): a vertical translation moves the feature rows by fy*(h/H)*ty/z
    B, C, H, W, h, w = 1, 1, 16, 32, 8, 8
    feats = torch.rand(B, C, h, w, generator=_gen(16)) + 1
    depth = torch.full((B, H, W), 4.0)
    K = _K(fx=16.0, fy=16.0, cx=15.5, cy=7.5, batch=B)
    R = torch.eye(3)[None]
    t = torch.tensor([[0.0, 1.0, 0.0]])  # 16 * 0.5 * 1 / 4 = 2 rows down
    out = warp_features(feats, depth, R, t, intrinsics_inverse(K), K, image_size=(H, W))
    assert float((out[:, :, 2:] - feats[:, :, :-2]).abs().max()) < 1e-4
    assert float(out[:, :, :2].abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"depth must have shape \(1, 16, 30\)"):
        warp_features(feats, depth, R, t, intrinsics_inverse(K), K, image_size=(16, 30))


# ---------------------------------------------------------------------------------------------------------------------
# dtype / device
# ---------------------------------------------------------------------------------------------------------------------


def test_float64_inputs_give_float64_outputs():
    g = _gen(17)
    B, H, W = 1, 6, 8
    src = torch.rand(B, 2, H, W, generator=g, dtype=torch.float64)
    depth = torch.rand(B, H, W, generator=g, dtype=torch.float64) + 1
    K = _K(batch=B, dtype=torch.float64)
    R, t = _identity_pose(B, torch.float64)
    out, weight = render_forward(src, depth, R, t, intrinsics_inverse(K), K, return_weight=True)
    assert out.dtype == torch.float64 and weight.dtype == torch.float64
    assert float((out - src).abs().max()) < 1e-10
    assert splat_sum(src, torch.zeros(B, 2, H, W, dtype=torch.float64)).dtype == torch.float64
    assert warp_features(src[..., :3, :4], depth, R, t, K, K, image_size=(H, W)).dtype == torch.float64
    assert intrinsics_inverse(K).dtype == torch.float64
    assert rescale_intrinsics(K, (H, W), (3, 4)).dtype == torch.float64
    R_rel, t_rel = relative_pose(R, t, R, t)
    assert R_rel.dtype == torch.float64 and t_rel.dtype == torch.float64
    assert camera_vector(R, t, K, K).dtype == torch.float64
    est, pts = _synthetic_fit_case(0.4, 0.1)
    s, c = fit_disparity_scale(est.double(), pts.double())
    assert s.dtype == torch.float64 and c.dtype == torch.float64
    assert scaled_disparity(est.double(), pts.double()).dtype == torch.float64
    assert fixed_scale_disparity(est.double()).dtype == torch.float64
    d_n, t_n, alpha = normalize_camera(depth, t)
    assert d_n.dtype == t_n.dtype == alpha.dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = _gen(18)
    B, C, H, W = 2, 3, 12, 20
    src = torch.rand(B, C, H, W, generator=g)
    depth = torch.rand(B, H, W, generator=g) * 3 + 1
    K = _K(batch=B)
    R = _rot_y(0.1).expand(B, 3, 3)
    t = torch.tensor([[0.2, 0.0, 0.1], [-0.1, 0.05, 0.0]])
    args = (src, depth, R, t, intrinsics_inverse(K), K)
    ref = render_forward(*args)
    dev = render_forward(*(a.cuda() for a in args))
    assert dev.device.type == "cuda"
    torch.testing.assert_close(dev.cpu(), ref, atol=1e-4, rtol=1e-4)
    est, pts = _synthetic_fit_case(0.3, 0.05)
    s, c = fit_disparity_scale(est.cuda(), pts.cuda())
    assert s.device.type == "cuda" and c.device.type == "cuda"
    torch.testing.assert_close(s.cpu(), torch.full((2,), 0.3), atol=1e-5, rtol=0)
    torch.testing.assert_close(c.cpu(), torch.full((2,), 0.05), atol=1e-5, rtol=0)
