"""Camera geometry and forward warping for Geometry-Free View Synthesis.

Rombach, Esser, Ommer, "Geometry-Free View Synthesis: Transformers and no 3D Priors", ICCV 2021 (arXiv 2104.07652).

The paper's approach section conditions an autoregressive transformer on the source image and the relative camera
``T = (R, t, K)``. Two kinds of conditioning are compared, and both need the geometry in this module:

* **Implicit ("geometry-free") variants** feed the camera as 30 extra scalar tokens
  ``[vec(R), t, vec(K), vec(K^-1)]`` (:func:`camera_vector`). Poses come from COLMAP / RealEstate10K, whose
  translation scale is arbitrary, so the scale is resolved with a monocular depth estimate: MiDaS gives a disparity
  ``d̂`` up to an unknown affine map, the sparse structure-from-motion points give metric disparities ``δ = 1/z`` at a
  few pixels, and a closed-form least-squares fit ``δ ≈ s·d̂ + c`` (:func:`fit_disparity_scale`) puts the estimate
  into the pose scale. The scene is then normalised so that the nearest point has depth 1 (``α = max disparity``,
  ``t ← α·t``; :func:`normalize_camera`).
* **Explicit variants** (``expl_img``, ``expl_feat``, ``expl_emb``, ``hybrid``) forward-warp the source image, its
  encoder features or its token embeddings into the target view with the scaled depth: every pixel is unprojected
  with ``K_src^-1``, moved by ``(R, t)``, projected with ``K_dst`` and splatted with softmax splatting whose
  importance favours near points (:func:`render_forward`, :func:`warp_features`). The official code uses the
  ``pesser/splatting`` CUDA extension; :func:`splat_sum` is a pure-torch equivalent of its "summation" mode.

Conventions: cameras are world-to-camera, ``x_c = R x_w + t`` with OpenCV axes (x right, y down, z forward). Pixel
``(u, v)`` = (column, row) with pixel centres at integer coordinates. ``K`` is the 3x3 pixel intrinsics matrix
``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]``. Batched tensors carry a leading batch dimension ``B``. Every function
computes on the device and in the dtype of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_FIXED_SCALE",
    "camera_vector",
    "check_intrinsics",
    "check_rotation",
    "fit_disparity_scale",
    "fixed_scale_disparity",
    "intrinsics_inverse",
    "normalize_camera",
    "relative_pose",
    "render_forward",
    "rescale_intrinsics",
    "scaled_disparity",
    "sparse_depth_map",
    "splat_sum",
    "warp_features",
]

#: Disparity range of the official demo path (``Midas.fixed_scale_depth``) used when no sparse points exist.
DEFAULT_FIXED_SCALE: tuple[float, float] = (0.18577382, 0.93059154)

#: Sparse depths below this value are treated as missing (official ``scaled_depth``).
_MIN_SPARSE_DEPTH = 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def _shape(x: Tensor) -> str:
    return "(" + ", ".join(str(int(s)) for s in x.shape) + ")"


def _float_dtype(*tensors: Tensor) -> torch.dtype:
    """Common floating dtype of ``tensors`` (integer inputs promote to the default float dtype)."""
    dtype = tensors[0].dtype
    for x in tensors[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    if not dtype.is_floating_point:
        dtype = torch.promote_types(dtype, torch.get_default_dtype())
    return dtype


def _batched(x: Tensor, batch: int, tail: tuple[int, ...], name: str, what: str) -> Tensor:
    """Return ``x`` as ``(batch, *tail)``; an unbatched ``tail``-shaped tensor is broadcast over the batch."""
    if tuple(x.shape) == tail:
        return x.expand(batch, *tail)
    if x.dim() == len(tail) + 1 and tuple(x.shape[1:]) == tail and x.shape[0] == batch:
        return x
    tail_s = ", ".join(str(s) for s in tail)
    raise ValueError(f"{what} {name} must have shape ({batch}, {tail_s}) or ({tail_s}), got {_shape(x)}")


# ---------------------------------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------------------------------


def check_rotation(R: Tensor, name: str = "R", atol: float = 1e-3) -> Tensor:
    """Validate rotation matrices ``R`` of shape ``(..., 3, 3)`` and return ``R`` unchanged.

    The world-to-camera rotation of the paper's camera ``T = (R, t, K)`` must be a proper rotation: ``R Rᵀ = I`` (to
    ``atol``, max-abs over all entries and batch items) and ``det R = +1``.

    Raises:
        ValueError: wrong shape, non-finite entries, not orthonormal, or a reflection; the message names ``name``,
            the problem and the worst value.
    """
    if not isinstance(R, Tensor):
        raise ValueError(f"rotation {name} must be a torch.Tensor, got {type(R).__name__}")
    if R.dim() < 2 or tuple(R.shape[-2:]) != (3, 3):
        raise ValueError(f"rotation {name} must have shape (..., 3, 3), got {_shape(R)}")
    if R.numel() == 0:
        return R
    Rf = R.to(_float_dtype(R))
    if not bool(torch.isfinite(Rf).all()):
        raise ValueError(f"rotation {name} contains non-finite values")
    eye = torch.eye(3, dtype=Rf.dtype, device=Rf.device)
    err = float((Rf @ Rf.transpose(-1, -2) - eye).abs().amax())
    if err > atol:
        raise ValueError(f"rotation {name} is not orthonormal (max |R R^T - I| = {err:.3g} > atol = {atol:g})")
    # det via the scalar triple product r0 · (r1 × r2): no linalg kernel needed on any device
    r0, r1, r2 = Rf[..., 0, :], Rf[..., 1, :], Rf[..., 2, :]
    det = (r0 * torch.cross(r1, r2, dim=-1)).sum(-1)
    det_min = float(det.amin())
    if det_min < 0:
        raise ValueError(f"rotation {name} is a reflection, det = {det_min:.3g} (a rotation needs det = +1)")
    return R


def check_intrinsics(K: Tensor, name: str = "K") -> Tensor:
    """Validate pinhole intrinsics ``K`` of shape ``(B, 3, 3)`` or ``(3, 3)`` and return ``K`` unchanged.

    ``K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]`` maps camera coordinates to pixels (``p = K x_c``), as in the
    camera ``T = (R, t, K)`` the paper conditions on.

    Raises:
        ValueError: wrong shape, non-finite entries, last row not ``[0, 0, 1]``, or ``fx`` / ``fy`` not positive.
    """
    if not isinstance(K, Tensor):
        raise ValueError(f"intrinsics {name} must be a torch.Tensor, got {type(K).__name__}")
    if K.dim() not in (2, 3) or tuple(K.shape[-2:]) != (3, 3):
        raise ValueError(f"intrinsics {name} must have shape (B, 3, 3) or (3, 3), got {_shape(K)}")
    if K.numel() == 0:
        return K
    Kf = K.to(_float_dtype(K))
    if not bool(torch.isfinite(Kf).all()):
        raise ValueError(f"intrinsics {name} contains non-finite values")
    last = Kf[..., 2, :]
    expected = torch.tensor([0.0, 0.0, 1.0], dtype=Kf.dtype, device=Kf.device)
    dev = (last - expected).abs()
    if bool((dev > 1e-6).any()):
        worst = last.reshape(-1, 3)[int(dev.reshape(-1, 3).amax(-1).argmax())]
        vals = ", ".join(f"{float(v):.4g}" for v in worst)
        raise ValueError(f"intrinsics {name}: last row must be [0, 0, 1], got [{vals}]")
    fx_min = float(Kf[..., 0, 0].amin())
    fy_min = float(Kf[..., 1, 1].amin())
    if fx_min <= 0 or fy_min <= 0:
        raise ValueError(
            f"intrinsics {name}: focal lengths must be positive, got min fx = {fx_min:.4g}, min fy = {fy_min:.4g}"
        )
    return K


# ---------------------------------------------------------------------------------------------------------------------
# cameras
# ---------------------------------------------------------------------------------------------------------------------


def relative_pose(R_src: Tensor, t_src: Tensor, R_dst: Tensor, t_dst: Tensor) -> tuple[Tensor, Tensor]:
    """Relative pose mapping source-camera coordinates to target-camera coordinates.

    Implements the paper's relative camera (official ``load_sparse_model_example``) for world-to-camera extrinsics
    ``x_c = R x_w + t``::

        R_rel = R_dst R_srcᵀ,    t_rel = t_dst − R_rel t_src,    so  x_dst = R_rel x_src + t_rel.

    Args:
        R_src, R_dst: ``(..., 3, 3)`` rotations (validated with :func:`check_rotation`).
        t_src, t_dst: ``(..., 3)`` translations.

    Returns:
        ``(R_rel (..., 3, 3), t_rel (..., 3))``.
    """
    check_rotation(R_src, "R_src")
    check_rotation(R_dst, "R_dst")
    for name, t in (("t_src", t_src), ("t_dst", t_dst)):
        if t.dim() < 1 or t.shape[-1] != 3:
            raise ValueError(f"translation {name} must have shape (..., 3), got {_shape(t)}")
    R_rel = R_dst @ R_src.transpose(-1, -2)
    t_rel = t_dst - (R_rel @ t_src.unsqueeze(-1)).squeeze(-1)
    return R_rel, t_rel


def rescale_intrinsics(K: Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> Tensor:
    """Intrinsics for an image resized from ``from_size = (h, w)`` to ``to_size = (h', w')``.

    As the official data loaders and ``Midas.warp_features``: ``K' = diag(w'/w, h'/h, 1) K`` (row 0 times ``w'/w``,
    row 1 times ``h'/h``). Returns a new tensor; ``K`` is not modified.
    """
    h, w = (int(s) for s in from_size)
    h2, w2 = (int(s) for s in to_size)
    if min(h, w, h2, w2) <= 0:
        raise ValueError(f"image sizes must be positive, got from_size={tuple(from_size)}, to_size={tuple(to_size)}")
    if K.dim() < 2 or tuple(K.shape[-2:]) != (3, 3):
        raise ValueError(f"intrinsics K must have shape (B, 3, 3) or (3, 3), got {_shape(K)}")
    dtype = _float_dtype(K)
    row_scale = torch.tensor([w2 / w, h2 / h, 1.0], dtype=dtype, device=K.device)
    return K.to(dtype) * row_scale[:, None]


def intrinsics_inverse(K: Tensor) -> Tensor:
    """Closed-form inverse of upper-triangular pinhole intrinsics ``K = [[fx, s, cx], [0, fy, cy], [0, 0, 1]]``.

    ``K⁻¹ = [[1/fx, −s/(fx fy), (s cy − cx fy)/(fx fy)], [0, 1/fy, −cy/fy], [0, 0, 1]]`` (the ``K_inv`` of the
    camera tokens and of the unprojection ``K_src⁻¹ [u, v, 1]ᵀ``). ``K``: ``(..., 3, 3)``; entries below the diagonal
    are assumed to be ``0, 0, 0`` and ``K[2, 2] = 1`` (validate with :func:`check_intrinsics`).
    """
    if K.dim() < 2 or tuple(K.shape[-2:]) != (3, 3):
        raise ValueError(f"intrinsics K must have shape (B, 3, 3) or (3, 3), got {_shape(K)}")
    K = K.to(_float_dtype(K))
    fx, s, cx = K[..., 0, 0], K[..., 0, 1], K[..., 0, 2]
    fy, cy = K[..., 1, 1], K[..., 1, 2]
    zero = torch.zeros_like(fx)
    one = torch.ones_like(fx)
    rows = [
        torch.stack([1.0 / fx, -s / (fx * fy), (s * cy - cx * fy) / (fx * fy)], -1),
        torch.stack([zero, 1.0 / fy, -cy / fy], -1),
        torch.stack([zero, zero, one], -1),
    ]
    return torch.stack(rows, -2)


def camera_vector(R: Tensor, t: Tensor, K: Tensor, K_inv: Tensor) -> Tensor:
    """The 30 camera scalars of the implicit variants: ``[vec(R), t, vec(K), vec(K⁻¹)]``.

    Order as the official ``MultiEmbedder`` keys ``R, t, K, K_inv``: ``R`` row-major (positions 0-8), ``t`` (9-11),
    ``K`` row-major (12-20), ``K⁻¹`` row-major (21-29). Each scalar becomes one token ``e_i = v_i·w``.

    Args:
        R: ``(B, 3, 3)``; t: ``(B, 3)``; K, K_inv: ``(B, 3, 3)`` (or ``(3, 3)``, broadcast over the batch).

    Returns:
        ``(B, 30)`` in the promoted floating dtype of the inputs.
    """
    if R.dim() != 3 or tuple(R.shape[1:]) != (3, 3):
        raise ValueError(f"rotation R must have shape (B, 3, 3), got {_shape(R)}")
    B = R.shape[0]
    t = _batched(t, B, (3,), "t", "translation")
    K = _batched(K, B, (3, 3), "K", "intrinsics")
    K_inv = _batched(K_inv, B, (3, 3), "K_inv", "intrinsics")
    dtype = _float_dtype(R, t, K, K_inv)
    parts = [R.reshape(B, 9), t.reshape(B, 3), K.reshape(B, 9), K_inv.reshape(B, 9)]
    return torch.cat([p.to(dtype) for p in parts], dim=1)


# ---------------------------------------------------------------------------------------------------------------------
# depth scale
# ---------------------------------------------------------------------------------------------------------------------


def sparse_depth_map(points: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Rasterise sparse SfM points into a depth map (official ``Midas.scaled_depth``).

    Each point ``(x, y, z)`` (pixel column, pixel row, depth) lands on pixel ``(round(y), round(x))`` clamped into
    the image; when several points share a pixel the later one (larger index) wins, as the official ``scatter_`` on
    CPU. Unlike the official code, rows with ``z < 1e-3`` or non-finite values (including the ``-1`` padding rows of
    ``pad_points``) are ignored instead of overwriting pixel ``(0, 0)`` with ``-1``. The winner is chosen with a
    max-reduction, so the result is deterministic on every device.

    Args:
        points: ``(B, N, 3)``.
        height, width: output size ``(H, W)``.

    Returns:
        ``depth (B, H, W)`` (0 where no point) and ``valid (B, H, W)`` bool (``depth >= 1e-3``).
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"sparse points must have shape (B, N, 3) = (x, y, depth), got {_shape(points)}")
    H, W = int(height), int(width)
    if H <= 0 or W <= 0:
        raise ValueError(f"image size must be positive, got ({H}, {W})")
    points = points.to(_float_dtype(points))
    B, N, _ = points.shape
    z = points[..., 2]
    ok = torch.isfinite(points).all(-1) & (z >= _MIN_SPARSE_DEPTH)  # (B, N)
    x = torch.where(ok, points[..., 0], 0.0).round().clamp(0, W - 1).long()
    y = torch.where(ok, points[..., 1], 0.0).round().clamp(0, H - 1).long()
    flat = torch.where(ok, y * W + x, torch.full_like(x, H * W))  # invalid rows go to a dump bin at H*W
    order = torch.arange(N, device=points.device).expand(B, N)
    winner = torch.full((B, H * W + 1), -1, dtype=torch.long, device=points.device)
    winner = winner.scatter_reduce(1, flat, order, reduce="amax", include_self=True)[:, : H * W]
    valid = winner >= 0
    depth = torch.gather(z, 1, winner.clamp(min=0)) if N > 0 else z.new_zeros(B, H * W)
    depth = torch.where(valid, depth, torch.zeros_like(depth))
    return depth.reshape(B, H, W), valid.reshape(B, H, W)


def fit_disparity_scale(estimate: Tensor, points: Tensor, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """Closed-form least-squares scale and shift aligning a monocular disparity to the sparse points.

    The paper's scale fit (official ``Midas.scaled_depth``): with ``d̂`` the MiDaS disparity and ``δ = 1/z`` at the
    ``N`` valid sparse pixels (:func:`sparse_depth_map`), minimise ``Σ (s d̂ + c − δ)²``::

        s = [Σ d̂δ − (Σ d̂)(Σ δ)/N] / [Σ d̂² − (Σ d̂)²/N],    c = (Σ δ − s Σ d̂) / N.

    Evaluated in the algebraically identical centred form ``s = Σ(d̂ − d̄)(δ − δ̄) / Σ(d̂ − d̄)²``,
    ``c = δ̄ − s d̄``, which avoids cancellation in float32.

    Args:
        estimate: ``(B, H, W)`` monocular disparity ``d̂``.
        points: ``(B, N, 3)`` sparse points (pixel x, pixel y, depth z), ``-1`` padding rows allowed.
        check: raise on items that cannot be fitted (reads counts back to the host); ``False`` in a training step,
            where such items give scale 0 and shift 0 (clamped to 1e-8 disparity downstream) without a host sync.

    Returns:
        ``(scale (B,), shift (B,))``.

    Raises:
        ValueError: a batch item has fewer than 2 valid sparse points (the official repo's issue #12) or the estimate
            is constant over its sparse pixels.
    """
    if estimate.dim() != 3:
        raise ValueError(f"disparity estimate must have shape (B, H, W), got {_shape(estimate)}")
    B, H, W = estimate.shape
    if points.dim() != 3 or points.shape[0] != B or points.shape[-1] != 3:
        raise ValueError(f"sparse points must have shape ({B}, N, 3) to match the estimate, got {_shape(points)}")
    dtype = _float_dtype(estimate, points)
    estimate = estimate.to(dtype)
    depth, valid = sparse_depth_map(points.to(dtype), H, W)
    n = valid.flatten(1).sum(1)
    few = (n < 2).nonzero().flatten().tolist() if check else []
    if few:
        raise ValueError(
            f"no sparse points to fit the depth scale: batch item(s) {few} have fewer than 2 valid points "
            f"(counts {[int(n[i]) for i in few]})"
        )
    m = valid.to(dtype)
    nf = n.to(dtype).clamp(min=1)
    delta = torch.where(valid, 1.0 / torch.where(valid, depth, torch.ones_like(depth)), torch.zeros_like(depth))
    d_mean = (m * estimate).flatten(1).sum(1) / nf
    delta_mean = delta.flatten(1).sum(1) / nf
    d_c = m * (estimate - d_mean[:, None, None])
    delta_c = m * (delta - delta_mean[:, None, None])
    var = (d_c * d_c).flatten(1).sum(1)
    flat = (var <= 0).nonzero().flatten().tolist() if check else []
    if flat:
        raise ValueError(f"cannot fit the depth scale: the estimate is constant at the sparse points of item(s) {flat}")
    scale = (d_c * delta_c).flatten(1).sum(1) / var.clamp(min=torch.finfo(dtype).tiny)
    shift = delta_mean - scale * d_mean
    return scale, shift


def scaled_disparity(estimate: Tensor, points: Tensor, *, check: bool = True) -> Tensor:
    """Monocular disparity in the pose scale: ``disp = max(s d̂ + c, 1e-8)`` with ``(s, c)`` from
    :func:`fit_disparity_scale` (official ``scaled_depth(..., return_inverse_depth=True)``). Returns ``(B, H, W)``."""
    scale, shift = fit_disparity_scale(estimate, points, check=check)
    est = estimate.to(scale.dtype)
    return (scale[:, None, None] * est + shift[:, None, None]).clamp(min=1e-8)


def fixed_scale_disparity(estimate: Tensor, scale: Sequence[float] = DEFAULT_FIXED_SCALE) -> Tensor:
    """Per-image min-max map of a disparity ``(B, H, W)`` onto ``[scale[0], scale[1]]``.

    The official demo path without sparse points (``Midas.fixed_scale_depth``):
    ``disp = (d̂ − min d̂)/(max d̂ − min d̂)·(scale[1] − scale[0]) + scale[0]``. A constant image maps to ``scale[0]``.
    """
    if estimate.dim() != 3:
        raise ValueError(f"disparity estimate must have shape (B, H, W), got {_shape(estimate)}")
    lo, hi = float(scale[0]), float(scale[1])
    est = estimate.to(_float_dtype(estimate))
    dmin = est.amin(dim=(1, 2), keepdim=True)
    dmax = est.amax(dim=(1, 2), keepdim=True)
    rng = (dmax - dmin).clamp(min=torch.finfo(est.dtype).tiny)
    return (est - dmin) / rng * (hi - lo) + lo


def normalize_camera(disparity: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise the scene so that the nearest point has depth 1 (official ``get_normalized_c``).

    ``α = max_pixels disp`` per image, ``disp_n = disp/α`` (max 1; the depth VQGAN encodes ``2 disp_n − 1``) and
    ``t' = α t`` (the translation of the camera tokens). Returns new tensors; the inputs are not modified.

    Args:
        disparity: ``(B, ...)`` (e.g. ``(B, H, W)``), positive.
        t: ``(B, 3)``.

    Returns:
        ``(disparity_n, t_scaled, alpha (B,))``.
    """
    if disparity.dim() < 2:
        raise ValueError(f"disparity must have shape (B, H, W), got {_shape(disparity)}")
    B = disparity.shape[0]
    if t.dim() != 2 or tuple(t.shape) != (B, 3):
        raise ValueError(f"translation t must have shape ({B}, 3), got {_shape(t)}")
    alpha = disparity.flatten(1).amax(1)
    view = (B,) + (1,) * (disparity.dim() - 1)
    return disparity / alpha.reshape(view), t * alpha[:, None].to(t.dtype), alpha


# ---------------------------------------------------------------------------------------------------------------------
# forward warping
# ---------------------------------------------------------------------------------------------------------------------


def splat_sum(values: Tensor, flow: Tensor) -> Tensor:
    """Forward summation splatting with bilinear weights (pure torch; "summation" mode of ``pesser/splatting``).

    Source pixel ``(u, v)`` deposits ``values[:, :, v, u]·w`` into the four integer pixels around
    ``(u + dx, v + dy)``, with the bilinear weights ``(1 − fx)(1 − fy)``, ``fx(1 − fy)``, ``(1 − fx)fy``, ``fx·fy``
    of the fractional offsets ``fx, fy``. Targets outside the image and pixels with non-finite flow are dropped. This
    is the ``Σ`` of softmax splatting used by the paper's explicit warps. Differentiable w.r.t. ``values`` and
    (through the weights) ``flow``.

    Args:
        values: ``(B, C, H, W)``.
        flow: ``(B, 2, H, W)`` in pixels, ``flow[:, 0] = dx`` (columns), ``flow[:, 1] = dy`` (rows).

    Returns:
        ``(B, C, H, W)``.
    """
    if values.dim() != 4:
        raise ValueError(f"splat values must have shape (B, C, H, W), got {_shape(values)}")
    B, C, H, W = values.shape
    if tuple(flow.shape) != (B, 2, H, W):
        raise ValueError(f"flow must have shape ({B}, 2, {H}, {W}) to match values, got {_shape(flow)}")
    dtype = _float_dtype(values, flow)
    values = values.to(dtype)
    flow = flow.to(dtype)
    HW = H * W
    v_grid, u_grid = torch.meshgrid(
        torch.arange(H, dtype=dtype, device=values.device),
        torch.arange(W, dtype=dtype, device=values.device),
        indexing="ij",
    )
    finite = torch.isfinite(flow).all(1)  # (B, H, W)
    x = u_grid + torch.where(finite, flow[:, 0], torch.zeros_like(flow[:, 0]))
    y = v_grid + torch.where(finite, flow[:, 1], torch.zeros_like(flow[:, 1]))
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0

    idx_parts, w_parts, in_parts = [], [], []
    for ox, oy, w in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        tx = x0 + ox
        ty = y0 + oy
        inside = finite & (tx >= 0) & (tx <= W - 1) & (ty >= 0) & (ty <= H - 1)
        # clamp before the integer cast so huge (finite) flows cannot overflow; masked anyway
        idx = ty.clamp(0, H - 1).long() * W + tx.clamp(0, W - 1).long()
        idx_parts.append(torch.where(inside, idx, torch.zeros_like(idx)).reshape(B, HW))
        w_parts.append(torch.where(inside, w, torch.zeros_like(w)).reshape(B, 1, HW))
        in_parts.append(inside.reshape(B, 1, HW))
    index = torch.cat(idx_parts, dim=1)  # (B, 4HW)
    weight = torch.cat(w_parts, dim=2)  # (B, 1, 4HW)
    inside = torch.cat(in_parts, dim=2)  # (B, 1, 4HW)
    src = values.reshape(B, C, 1, HW).expand(B, C, 4, HW).reshape(B, C, 4 * HW) * weight
    src = torch.where(inside, src, torch.zeros_like(src))  # dropped taps contribute exactly 0 (even for inf values)
    out = values.new_zeros(B, C, HW).scatter_add(2, index[:, None, :].expand(B, C, 4 * HW), src)
    return out.reshape(B, C, H, W)


def render_forward(
    src: Tensor,
    depth: Tensor,
    R: Tensor,
    t: Tensor,
    K_src_inv: Tensor,
    K_dst: Tensor,
    boltzmann: float | Tensor | None = None,
    return_weight: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Forward-warp ``src`` into the target view with softmax splatting (official ``render_forward``).

    The explicit-geometry warp of the paper::

        p = K_dst (R (D(u, v) K_src⁻¹ [u, v, 1]ᵀ) + t),     flow = p_xy / max(p_z, 1e-8) − (u, v)
        w = exp(b / z')                                      if ``boltzmann`` = b is given, z' = p_z
        w = exp(10 (1/z' − min 1/z') / (max 1/z' − min 1/z' + 1e-6) − 10)   otherwise (min/max per image)
        out = Σ_splat(w · src) / max(Σ_splat(w), 1e-8)

    so near points dominate where several source pixels land on one target; holes (nothing lands) are 0.

    Args:
        src: ``(B, C, H, W)`` image or features.
        depth: ``(B, H, W)`` source *depth* (not disparity) in the units of ``t``.
        R, t: relative pose source → target, ``(B, 3, 3)`` and ``(B, 3)``.
        K_src_inv: ``(B, 3, 3)`` inverse source intrinsics; K_dst: ``(B, 3, 3)`` target intrinsics (both at the
            resolution of ``src``; unbatched ``(3, 3)`` / ``(3,)`` inputs are broadcast over the batch).
        boltzmann: optional Boltzmann factor ``b`` (float or ``(B,)``) of the importance ``exp(b/z')``.
        return_weight: also return the splatted importance ``Σ_splat(w)`` ``(B, 1, H, W)``; ``weight > 0`` marks the
            pixels that received any source pixel.

    Returns:
        the warped ``(B, C, H, W)``, or ``(warped, weight)`` with ``return_weight``.
    """
    if src.dim() != 4:
        raise ValueError(f"src must have shape (B, C, H, W), got {_shape(src)}")
    B, C, H, W = src.shape
    if tuple(depth.shape) != (B, H, W):
        raise ValueError(f"depth must have shape ({B}, {H}, {W}) to match src {_shape(src)}, got {_shape(depth)}")
    R = _batched(R, B, (3, 3), "R", "rotation")
    t = _batched(t, B, (3,), "t", "translation")
    K_src_inv = _batched(K_src_inv, B, (3, 3), "K_src_inv", "intrinsics")
    K_dst = _batched(K_dst, B, (3, 3), "K_dst", "intrinsics")
    dtype = _float_dtype(src, depth, R, t, K_src_inv, K_dst)
    device = src.device
    src, depth, R, t, K_src_inv, K_dst = (
        x.to(device=device, dtype=dtype) for x in (src, depth, R, t, K_src_inv, K_dst)
    )

    v_grid, u_grid = torch.meshgrid(
        torch.arange(H, dtype=dtype, device=device), torch.arange(W, dtype=dtype, device=device), indexing="ij"
    )
    pix = torch.stack([u_grid, v_grid, torch.ones_like(u_grid)], dim=-1)  # (H, W, 3) homogeneous [u, v, 1]
    rays = torch.einsum("bij,hwj->bhwi", K_src_inv, pix)
    cam_src = depth.unsqueeze(-1) * rays
    cam_dst = torch.einsum("bij,bhwj->bhwi", R, cam_src) + t[:, None, None, :]
    p = torch.einsum("bij,bhwj->bhwi", K_dst, cam_dst)  # (B, H, W, 3)
    new_z = p[..., 2].unsqueeze(1)  # (B, 1, H, W)
    p_xy = p[..., :2] / p[..., 2:3].clamp(min=1e-8)
    flow = (p_xy - pix[..., :2]).permute(0, 3, 1, 2)  # (B, 2, H, W)

    if boltzmann is not None:
        b = torch.as_tensor(boltzmann, dtype=dtype, device=device)
        if b.dim() == 1:
            b = b.reshape(-1, 1, 1, 1)
        importance = torch.exp(b / new_z)
    else:
        inv_z = 1.0 / new_z
        lo = inv_z.amin(dim=(1, 2, 3), keepdim=True)
        hi = inv_z.amax(dim=(1, 2, 3), keepdim=True)
        importance = torch.exp((inv_z - lo) / (hi - lo + 1e-6) * 10.0 - 10.0)

    splatted = splat_sum(torch.cat([importance * src, importance], dim=1), flow)
    num, weight = splatted[:, :C], splatted[:, C:]
    rendered = num / weight.clamp(min=1e-8)
    if return_weight:
        return rendered, weight
    return rendered


def warp_features(
    features: Tensor,
    depth: Tensor,
    R: Tensor,
    t: Tensor,
    K_src_inv: Tensor,
    K_dst: Tensor,
    image_size: Sequence[int],
    boltzmann: float | Tensor | None = None,
    return_weight: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Forward-warp a low-resolution feature map with image-resolution depth and intrinsics.

    The explicit feature / embedding warps of the paper (``expl_feat``, ``expl_emb``, ``hybrid``; official
    ``Midas.warp_features``): ``depth`` (image size ``(H, W)``) is resized bicubically (``align_corners=False``) to
    the feature size ``(h, w)``, the intrinsics are rescaled to the feature grid, ``K_dst' = diag(w/W, h/H, 1) K_dst``
    and ``K_src'⁻¹ = K_src⁻¹ diag(W/w, H/h, 1)``, and the features are warped with :func:`render_forward`.
    (The official code divides ``K_src_inv[1, 1]`` by the *width* ratio; identical whenever ``h/H = w/W``.)

    Args:
        features: ``(B, C, h, w)``.
        depth: ``(B, H, W)`` source depth at image resolution, ``(H, W) = image_size``.
        R, t, K_src_inv, K_dst, boltzmann, return_weight: as in :func:`render_forward`, intrinsics at image size.
        image_size: ``(H, W)`` of the image the intrinsics refer to.

    Returns:
        the warped ``(B, C, h, w)`` features (and the splat weight with ``return_weight``).
    """
    if features.dim() != 4:
        raise ValueError(f"features must have shape (B, C, h, w), got {_shape(features)}")
    B, _, h, w = features.shape
    H, W = (int(s) for s in image_size)
    if tuple(depth.shape) != (B, H, W):
        raise ValueError(f"depth must have shape ({B}, {H}, {W}) (batch, image_size), got {_shape(depth)}")
    K_src_inv = _batched(K_src_inv, B, (3, 3), "K_src_inv", "intrinsics")
    K_dst = _batched(K_dst, B, (3, 3), "K_dst", "intrinsics")
    dtype = _float_dtype(features, depth, K_src_inv, K_dst)
    depth = depth.to(dtype)
    if (h, w) != (H, W):
        depth = F.interpolate(depth.unsqueeze(1), size=(h, w), mode="bicubic", align_corners=False).squeeze(1)
    K_dst_f = rescale_intrinsics(K_dst.to(dtype), (H, W), (h, w))
    col_scale = torch.tensor([W / w, H / h, 1.0], dtype=dtype, device=K_src_inv.device)
    K_src_inv_f = K_src_inv.to(dtype) * col_scale  # K⁻¹ diag(W/w, H/h, 1): scales columns 0 and 1
    return render_forward(features, depth, R, t, K_src_inv_f, K_dst_f, boltzmann=boltzmann, return_weight=return_weight)
