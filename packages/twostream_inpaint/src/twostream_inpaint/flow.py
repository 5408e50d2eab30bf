"""Optical flow from the target to each keyframe, with mask-aware flow inpainting (official ``gi/modules/warp/raft.py``
and ``gi/modules/RAFT/flow_utils.py``).

- :func:`inpaint_flows`: inside a hole the flow is replaced by an inverse-distance (1/d^6) blend of the flow at
  ``n_samples`` points drawn (numpy ``default_rng(seed)``, the same draw for every item) from the hole's inner boundary;
  outside it the flow is kept. Device-agnostic (the official hard-codes cuda) and vectorised over the batch.
- :class:`FlowEstimator`: the frozen interface ``forward(image1, image2) -> (flow, error)``; images (B, 3 or 4, H, W) in
  [0, 1], the 4th channel of ``image1`` its hole mask (1 = hole). The flow maps each image1 pixel to its position in
  image2 (``flow_sample(image2, flow)`` looks like image1); with a mask, the forward and the backward flow are both
  inpainted with image1's mask (as the official does), and the error is :func:`~twostream_inpaint.warp.
  forward_backward_error` of the pair.
- :class:`RAFTFlow` (torchvision's RAFT; loads torchvision and princeton-vl ``raft-things.pth`` weights),
  :class:`DISFlow` (OpenCV's classical DIS: weight-free, for CPU toy runs), :class:`ZeroFlow` (the official
  ``Identity`` ablation) and :func:`build_flow`.
- :func:`keyframe_flows`: flows / errors from a (masked) target to T keyframes in one estimator call.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.io import MissingWeightsError, load_state_dict, read_state_dict
from gencore.modules import FrozenModule, on_accelerator
from twostream_inpaint.warp import forward_backward_error, pixel_grid, resize_flows

__all__ = [
    "DISFlow",
    "FlowEstimator",
    "RAFTFlow",
    "ZeroFlow",
    "build_flow",
    "inpaint_flows",
    "keyframe_flows",
    "mask_boundary",
    "princeton_raft_key",
]

RAFT_WEIGHTS_HELP = (
    "torchvision's Raft_Large_Weights.C_T_V1 (the port of raft-things.pth, which the paper uses: "
    "https://download.pytorch.org/models/raft_large_C_T_V1-22a6c225.pth; or C_T_V2, raft_large_C_T_V2-1bb1363a.pth; "
    "raft_small_C_T_V1-ad48884c.pth for size='small'), or the official princeton-vl RAFT checkpoint raft-things.pth "
    "(raft-small.pth; https://github.com/princeton-vl/RAFT, download_models.sh)"
)


# ------------------------------------------------------------------------------------------------ flow inpainting


def mask_boundary(masks: Tensor) -> Tensor:
    """(B, 1, H, W) bool inner boundary of the holes: ``mask > 0.5`` pixels with a 4-neighbour ``<= 0.5`` (the official
    ``(m > 0.5) & (erosion(m, 3x3 cross) <= 0.5)``); the image's outer rows and columns are never boundary."""
    hole = masks > 0.5
    inner = hole[:, :, 1:-1, 1:-1]
    eroded = (
        inner & hole[:, :, :-2, 1:-1] & hole[:, :, 2:, 1:-1] & hole[:, :, 1:-1, :-2] & hole[:, :, 1:-1, 2:]
    )  # the cross erosion of the interior pixels (their neighbours all lie inside the image)
    return F.pad(inner & ~eroded, (1, 1, 1, 1), value=False)


@functools.lru_cache(maxsize=4096)
def _boundary_draw(n_boundary: int, n_samples: int, seed: int) -> tuple[int, ...]:
    """Indices into the row-major boundary points: ``np.random.default_rng(seed).choice(n, n_samples)``, the official
    draw (with replacement; a fresh generator per item, so the draw depends only on the number of points)."""
    return tuple(int(i) for i in np.random.default_rng(seed).choice(n_boundary, n_samples))


def inpaint_flows(flows: Tensor, masks: Tensor, n_samples: int = 20, seed: int = 1) -> Tensor:
    """``flows`` (B, 2, H, W) with the holes of ``masks`` (B, 1, H, W; 1 = hole) filled in: the official
    ``_inpaint_flows``.

    Per item, ``n_samples`` points are drawn with ``np.random.default_rng(seed).choice(n, n_samples)`` among the ``n``
    boundary points (:func:`mask_boundary`) in row-major order, or all at (0, 0) when there are none. Every pixel gets
    ``sum_i w_i f(p_i) / sum_i w_i`` with ``w_i = 1 / d_i^6`` (``d^6 = 0`` counts as 1e-10), and the result is
    ``(1 - m) f + m interp`` (float32, returned in ``flows``' dtype): an all-zero mask leaves the flow unchanged.

    Host syncs: exactly one, reading the B boundary-point counts (the numpy draw needs them); the draw itself is cached
    per count, and the points are then gathered on the flows' device (cumsum + searchsorted), with no per-item sync.
    """
    if flows.dim() != 4 or flows.shape[1] != 2:
        raise ValueError(f"flows must be (B, 2, H, W), got {tuple(flows.shape)}")
    b, _, h, w = flows.shape
    if masks.shape != (b, 1, h, w):
        raise ValueError(f"masks must be (B, 1, H, W) = {(b, 1, h, w)} like the flows, got {tuple(masks.shape)}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if b == 0:
        return flows
    device = flows.device
    masks = masks.to(dtype=torch.float32)
    flows32 = flows.float()

    boundary = mask_boundary(masks).flatten(1)  # (B, HW), row-major like torch.nonzero
    cums = boundary.cumsum(1)  # (B, HW) int64
    counts = cums[:, -1]
    draws = [_boundary_draw(max(int(n), 1), n_samples, seed) for n in counts.tolist()]  # the one host sync
    idx = torch.tensor(draws, dtype=torch.int64).to(device)  # (B, N)
    pos = torch.searchsorted(cums, idx + 1)  # flat position of the idx-th boundary point
    pos = torch.where(counts[:, None] > 0, pos, torch.zeros_like(pos))  # no boundary: the point (0, 0)

    values = torch.gather(flows32.flatten(2), 2, pos[:, None, :].expand(b, 2, n_samples))  # (B, 2, N)
    py = (pos // w).to(torch.float32)[:, :, None, None]  # (B, N, 1, 1)
    px = (pos % w).to(torch.float32)[:, :, None, None]
    grid = pixel_grid(h, w, device=device)  # (1, 2, H, W): x, y
    dist = (grid[:, 1:2] - py) ** 2 + (grid[:, 0:1] - px) ** 2  # (B, N, H, W)
    denom = dist**3
    weight = 1.0 / torch.where(denom == 0, torch.full_like(denom, 1e-10), denom)
    interp = torch.einsum("bnhw,bcn->bchw", weight, values) / weight.sum(1, keepdim=True)
    out = (1.0 - masks) * flows32 + masks * interp
    return out.to(flows.dtype)


# ------------------------------------------------------------------------------------------------ estimators


def _check_images(image1: Tensor, image2: Tensor) -> None:
    for name, im in (("image1", image1), ("image2", image2)):
        if im.dim() != 4 or im.shape[1] not in (3, 4):
            raise ValueError(f"{name} must be (B, 3 or 4, H, W), got {tuple(im.shape)}")
    if image1.shape[0] != image2.shape[0] or image1.shape[-2:] != image2.shape[-2:]:
        raise ValueError(f"image1 {tuple(image1.shape)} and image2 {tuple(image2.shape)} differ in batch or size")
    if not on_accelerator(image1) and image1.numel() and image2.numel():  # a host check costs nothing on the CPU
        lo = min(float(image1.min()), float(image2.min()))
        hi = max(float(image1.max()), float(image2.max()))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")


class FlowEstimator(FrozenModule):
    """Frozen flow estimator: ``forward(image1, image2) -> (flow (B, 2, H, W), error (B, 1, H, W))``.

    Images are (B, 3 or 4, H, W) in [0, 1]; the 4th channel of ``image1`` is its hole mask (1 = hole), a 4th channel
    of ``image2`` is ignored. ``flow`` goes from image1 to image2 (the position in image2 of each image1 pixel, so
    ``flow_sample(image2, flow)`` reproduces image1). With a mask the forward and the backward flow are inpainted
    inside image1's hole (:func:`inpaint_flows`), and ``error`` is their forward-backward consistency error scaled by
    :meth:`error_scale`. Subclasses implement :meth:`estimate` and call ``self.freeze()`` at the end of ``__init__``.
    """

    def estimate(self, image1: Tensor, image2: Tensor) -> tuple[Tensor, Tensor]:
        """(forward flow image1 -> image2, backward flow image2 -> image1), each (B, 2, H, W) float32 at the images'
        size, from RGB float32 images in [0, 1]."""
        raise NotImplementedError

    def error_scale(self, h: int, w: int) -> tuple[float, float]:
        """(x, y) factors of the forward-backward error (the official RAFT wrapper: w / 256, h / 256)."""
        return (1.0, 1.0)

    def forward(self, image1: Tensor, image2: Tensor) -> tuple[Tensor, Tensor]:
        _check_images(image1, image2)
        h, w = image1.shape[-2:]
        flow, flow_b = self.estimate(image1[:, :3].float(), image2[:, :3].float())
        if image1.shape[1] == 4:
            mask = image1[:, 3:4].float()
            both = inpaint_flows(torch.cat([flow, flow_b]), torch.cat([mask, mask]))  # one host sync for both
            flow, flow_b = both.chunk(2)
        return flow, forward_backward_error(flow, flow_b, scale=self.error_scale(h, w))


class ZeroFlow(FlowEstimator):
    """Zero flow and zero error whatever the images (the official ``Identity`` ablation of ``configs/lama.yaml``)."""

    def __init__(self) -> None:
        super().__init__()
        self.freeze()

    def forward(self, image1: Tensor, image2: Tensor) -> tuple[Tensor, Tensor]:
        _check_images(image1, image2)
        b, _, h, w = image1.shape
        return image1.new_zeros((b, 2, h, w), dtype=torch.float32), image1.new_zeros((b, 1, h, w), dtype=torch.float32)


# -------------------------------------------------------------------------------------------------------- RAFT

_PRINCETON_ENCODERS = {"fnet": "feature_encoder", "cnet": "context_encoder"}
_PRINCETON_UPDATE = {
    "encoder.convc1": "motion_encoder.convcorr1.0",
    "encoder.convc2": "motion_encoder.convcorr2.0",
    "encoder.convf1": "motion_encoder.convflow1.0",
    "encoder.convf2": "motion_encoder.convflow2.0",
    "encoder.conv": "motion_encoder.conv.0",
    "gru.convz1": "recurrent_block.convgru1.convz",
    "gru.convr1": "recurrent_block.convgru1.convr",
    "gru.convq1": "recurrent_block.convgru1.convq",
    "gru.convz2": "recurrent_block.convgru2.convz",
    "gru.convr2": "recurrent_block.convgru2.convr",
    "gru.convq2": "recurrent_block.convgru2.convq",
    "gru.convz": "recurrent_block.convgru1.convz",  # raft-small's ConvGRU
    "gru.convr": "recurrent_block.convgru1.convr",
    "gru.convq": "recurrent_block.convgru1.convq",
    "flow_head.conv1": "flow_head.conv1",
    "flow_head.conv2": "flow_head.conv2",
}


def princeton_raft_key(key: str, size: str = "large") -> str | None:
    """torchvision's name for a key of the official princeton-vl RAFT (``raft-things.pth`` / ``raft-small.pth``,
    ``module.`` already stripped); ``None`` for the residual blocks' ``norm3`` (large) / ``norm4`` (small), which
    the official registers twice (it is also ``downsample.1``). Unknown keys come back unchanged (and then fail
    the strict load)."""
    enc = re.fullmatch(r"(fnet|cnet)\.(.+)", key)
    if enc:
        name, rest = _PRINCETON_ENCODERS[enc.group(1)], enc.group(2)
        m = re.fullmatch(r"(conv|norm)1\.(weight|bias|running_mean|running_var|num_batches_tracked)", rest)
        if m:
            return f"{name}.convnormrelu.{0 if m.group(1) == 'conv' else 1}.{m.group(2)}"
        if rest.startswith("conv2."):
            return f"{name}.conv.{rest[len('conv2.') :]}"
        m = re.fullmatch(r"(layer\d\.\d)\.(conv|norm)(\d)\.(.+)", rest)
        if m:
            block, kind, k, param = m.groups()
            if kind == "norm" and int(k) == (3 if size == "large" else 4):
                return None
            return f"{name}.{block}.convnormrelu{k}.{0 if kind == 'conv' else 1}.{param}"
        return f"{name}.{rest}"  # layerX.Y.downsample.{0,1}.*
    if key.startswith("update_block."):
        rest = key[len("update_block.") :]
        m = re.fullmatch(r"mask\.(0|2)\.(weight|bias)", rest)
        if m:
            return f"mask_predictor.{'convrelu.0' if m.group(1) == '0' else 'conv'}.{m.group(2)}"
        module, _, param = rest.rpartition(".")
        if module in _PRINCETON_UPDATE:
            return f"update_block.{_PRINCETON_UPDATE[module]}.{param}"
    return key


def load_raft_weights(raft: nn.Module, weights: str | os.PathLike | Mapping[str, Any], size: str = "large") -> None:
    """Load torchvision-format or princeton-vl-format (``module.fnet...``) RAFT weights into torchvision's ``raft``
    (strict: a :class:`gencore.io.CheckpointKeyError` names missing / unexpected / mismatched keys)."""
    if isinstance(weights, (str, os.PathLike)) and not Path(weights).is_file():
        raise MissingWeightsError(f"RAFT weights file not found: {os.fspath(weights)} (expected {RAFT_WEIGHTS_HELP})")
    state, source = read_state_dict(weights)
    if state and all(k.startswith("module.") for k in state):  # saved from nn.DataParallel (the official format)
        state = {k[len("module.") :]: v for k, v in state.items()}
    key_map = None
    if any(k.startswith(("fnet.", "cnet.")) for k in state):
        key_map = functools.partial(princeton_raft_key, size=size)
    load_state_dict(raft, state, key_map=key_map, source=f"RAFT weights {source}")


class RAFTFlow(FlowEstimator):
    """RAFT (torchvision's ``raft_large`` / ``raft_small``) as the official wrapper runs it: images mapped to [-1, 1]
    and resized to ``resolution`` (bilinear, align_corners=True), ``iters`` refinement steps (the last, upsampled
    prediction), flows resized back with per-axis magnitude scaling, error scaled by (w / res_w, h / res_h).

    ``weights``: a torchvision RAFT state dict file (or mapping), or the official princeton-vl ``raft-things.pth``
    (``raft-small.pth`` for ``size="small"``), read with gencore's restricted unpickler. ``weights=None`` (random
    init) needs ``allow_random=True`` (tests only). ``resolution`` must be multiples of 8, at least 128 (torchvision's
    limit; below it the official's coarsest correlation level has one pixel and its lookup divides by zero). Both
    directions run as one batched RAFT call. RAFT runs in
    float32 (the official autocasts it to float16 on CUDA).
    """

    def __init__(
        self,
        size: str = "large",
        weights: str | os.PathLike | Mapping[str, Any] | None = None,
        resolution: tuple[int, int] = (256, 256),
        iters: int = 20,
        allow_random: bool = False,
    ) -> None:
        super().__init__()
        from torchvision.models.optical_flow import raft_large, raft_small

        if size not in ("large", "small"):
            raise ValueError(f"RAFTFlow size must be 'large' or 'small', got {size!r}")
        resolution = tuple(int(r) for r in resolution)
        if len(resolution) != 2 or any(r < 128 or r % 8 for r in resolution):
            raise ValueError(
                f"RAFTFlow resolution must be (h, w), multiples of 8 and at least 128 (RAFT works at 1/8 scale with a "
                f"4-level correlation pyramid whose coarsest level needs 2 pixels), got {resolution}"
            )
        if int(iters) < 1:
            raise ValueError(f"RAFTFlow iters must be >= 1, got {iters}")
        self.size, self.resolution, self.iters = size, resolution, int(iters)
        self.raft = (raft_large if size == "large" else raft_small)(weights=None, progress=False)
        if weights is None:
            if not allow_random:
                raise MissingWeightsError(
                    f"RAFTFlow needs pretrained RAFT weights: pass weights=<path> to {RAFT_WEIGHTS_HELP}; "
                    "allow_random=True builds a randomly initialised RAFT (tests only)"
                )
        else:
            load_raft_weights(self.raft, weights, size)
        self.freeze()

    def error_scale(self, h: int, w: int) -> tuple[float, float]:
        return (w / self.resolution[1], h / self.resolution[0])

    def estimate(self, image1: Tensor, image2: Tensor) -> tuple[Tensor, Tensor]:
        h, w = image1.shape[-2:]
        x1, x2 = (
            F.interpolate(2.0 * im - 1.0, size=self.resolution, mode="bilinear", align_corners=True)
            for im in (image1, image2)
        )
        with torch.no_grad():
            flows = self.raft(torch.cat([x1, x2]), torch.cat([x2, x1]), num_flow_updates=self.iters)[-1]
        return resize_flows(flows, (h, w)).chunk(2)


# --------------------------------------------------------------------------------------------------------- DIS

_DIS_PRESETS = ("ultrafast", "fast", "medium")


class DISFlow(FlowEstimator):
    """OpenCV's DIS optical flow (Kroeger et al. 2016) on grayscale uint8 frames, per item on the host: a classical,
    weight-free estimator for CPU toy runs. Same RGBA / inpainting / error semantics as :class:`RAFTFlow`; the error
    is scaled by (w / res_w, h / res_h) with ``error_resolution`` (default 256 x 256, RAFTFlow's default), so that it
    has the magnitude the generator is trained with."""

    def __init__(self, preset: str = "medium", error_resolution: tuple[int, int] = (256, 256)) -> None:
        super().__init__()
        if preset not in _DIS_PRESETS:
            raise ValueError(f"DISFlow preset must be one of {', '.join(_DIS_PRESETS)}, got {preset!r}")
        self.preset = preset
        self.error_resolution = (int(error_resolution[0]), int(error_resolution[1]))
        self.freeze()

    def error_scale(self, h: int, w: int) -> tuple[float, float]:
        return (w / self.error_resolution[1], h / self.error_resolution[0])

    def estimate(self, image1: Tensor, image2: Tensor) -> tuple[Tensor, Tensor]:
        import cv2

        dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{self.preset.upper()}"))

        def gray(x: Tensor) -> np.ndarray:  # (B, 3, H, W) in [0, 1] -> (B, H, W) uint8
            rgb = (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            return np.stack([cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2GRAY) for im in rgb])

        g1, g2 = gray(image1), gray(image2)
        fw = np.stack([dis.calc(a, b, None) for a, b in zip(g1, g2)])  # (B, H, W, 2): x, y
        bw = np.stack([dis.calc(b, a, None) for a, b in zip(g1, g2)])
        to = functools.partial(torch.as_tensor, device=image1.device, dtype=torch.float32)
        return to(fw).permute(0, 3, 1, 2).contiguous(), to(bw).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------------ factory

_KINDS = {"raft": RAFTFlow, "dis": DISFlow, "zero": ZeroFlow}


def build_flow(kind: str = "raft", **kwargs: Any) -> FlowEstimator:
    """A flow estimator by name: ``"raft"`` (:class:`RAFTFlow`), ``"dis"`` (:class:`DISFlow`) or ``"zero"``
    (:class:`ZeroFlow`); ``kwargs`` go to its constructor."""
    if kind not in _KINDS:
        raise ValueError(f"unknown flow estimator kind {kind!r}; valid kinds: {', '.join(_KINDS)}")
    return _KINDS[kind](**kwargs)


# ------------------------------------------------------------------------------------------------- keyframes


@torch.no_grad()
def keyframe_flows(
    estimator: nn.Module, target: Tensor, mask: Tensor, srcs: Tensor, srcs_masks: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Flows (B, T, 2, H, W) from the target to each keyframe and their errors (B, T, 1, H, W), without a graph.

    Keyframe t gets ``estimator(cat(target * (1 - mask), mask), cat(srcs[:, t], srcs_masks[:, t]))``; all T pairs go
    through one estimator call of batch B * T. Note: the target is given *masked* (an inference call cannot see the
    hole), whereas the official training code passes the unmasked target; the flow inside the hole is replaced by the
    inpainted flow either way, so only the flow near the hole (and the backward flow's view of it) can differ.
    The keyframes' masks ride along as a 4th channel, which the estimators ignore (as the official does).
    """
    if target.dim() != 4 or target.shape[1] != 3:
        raise ValueError(f"target must be (B, 3, H, W), got {tuple(target.shape)}")
    b, _, h, w = target.shape
    if mask.shape != (b, 1, h, w):
        raise ValueError(f"mask must be (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(mask.shape)}")
    if srcs.dim() != 5 or srcs.shape[0] != b or srcs.shape[2] != 3 or srcs.shape[-2:] != (h, w):
        raise ValueError(f"srcs must be (B, T, 3, H, W) with B, H, W = {b}, {h}, {w}, got {tuple(srcs.shape)}")
    t = srcs.shape[1]
    if srcs_masks is not None:
        if srcs_masks.shape != (b, t, 1, h, w):
            raise ValueError(f"srcs_masks must be (B, T, 1, H, W) = {(b, t, 1, h, w)}, got {tuple(srcs_masks.shape)}")
        srcs = torch.cat([srcs, srcs_masks.to(srcs.dtype)], dim=2)
    image1 = torch.cat([target * (1 - mask), mask.to(target.dtype)], dim=1)  # (B, 4, H, W)
    image1 = image1[:, None].expand(b, t, 4, h, w).reshape(b * t, 4, h, w)
    flows, errs = estimator(image1, srcs.reshape(b * t, -1, h, w))
    return flows.reshape(b, t, 2, h, w), errs.reshape(b, t, 1, h, w)
