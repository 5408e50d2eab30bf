"""Flow estimation and mask-aware flow inpainting (official gi/modules/warp/raft.py, gi/modules/RAFT/flow_utils.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.optical_flow import raft_large, raft_small

from gencore.io import CheckpointKeyError, MissingWeightsError
from twostream_inpaint.flow import (
    DISFlow,
    FlowEstimator,
    RAFTFlow,
    ZeroFlow,
    build_flow,
    inpaint_flows,
    keyframe_flows,
    mask_boundary,
    princeton_raft_key,
)
from twostream_inpaint.warp import flow_sample, forward_backward_error

# ------------------------------------------------------------------------------------------------ flow inpainting


def official_inpaint(flows: np.ndarray, masks: np.ndarray, n_samples: int = 20) -> np.ndarray:
    """The official ``_inpaint_flows`` with naive loops (float64): cross erosion, border excluded, row-major points,
    ``default_rng(1).choice`` per item, 1/d^6 weights with d^6 = 0 -> 1e-10, soft blend with the mask."""
    b, _, h, w = flows.shape
    out = flows.copy()
    for i in range(b):
        m = masks[i, 0]
        points = []
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                eroded = min(m[y, x], m[y - 1, x], m[y + 1, x], m[y, x - 1], m[y, x + 1])
                if m[y, x] > 0.5 and eroded <= 0.5:
                    points.append((y, x))
        if not points:
            points = [(0, 0)]
        chosen = [points[j] for j in np.random.default_rng(1).choice(len(points), n_samples)]
        for y in range(h):
            for x in range(w):
                acc, acc_w = np.zeros(2), 0.0
                for py, px in chosen:
                    denom = float((y - py) ** 2 + (x - px) ** 2) ** 3
                    wt = 1.0 / (denom if denom != 0 else 1e-10)
                    acc += wt * flows[i, :, py, px]
                    acc_w += wt
                out[i, :, y, x] = (1 - m[y, x]) * flows[i, :, y, x] + m[y, x] * acc / acc_w
    return out


def _random_case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flows = torch.randn(5, 2, 18, 23, generator=g) * 4
    masks = torch.zeros(5, 1, 18, 23)
    masks[0, :, 4:11, 6:15] = 1  # a box
    masks[1] = (torch.rand(1, 18, 23, generator=g) > 0.6).float()  # scattered pixels: many boundary points
    masks[2, :, 2:9, 3:8] = 1  # two boxes, one touching the image border
    masks[2, :, 10:, 15:] = 1
    masks[3] = 1  # all hole: no boundary point -> the point (0, 0)
    # masks[4] stays empty
    return flows, masks


def test_inpaint_flows_matches_official_algorithm():
    flows, masks = _random_case()
    ours = inpaint_flows(flows, masks)
    ref = official_inpaint(flows.double().numpy(), masks.double().numpy())
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5)
    # the all-hole item takes the flow at (0, 0) everywhere
    assert torch.allclose(ours[3], flows[3, :, :1, :1].expand(2, 18, 23))


def test_inpaint_flows_soft_mask_and_options():
    flows, masks = _random_case(1)
    soft = masks * torch.rand(masks.shape, generator=torch.Generator().manual_seed(2))  # official blend (1-m)f + m i
    np.testing.assert_allclose(
        inpaint_flows(flows, soft).numpy(),
        official_inpaint(flows.double().numpy(), soft.double().numpy()),
        rtol=1e-5,
        atol=1e-5,
    )
    few = inpaint_flows(flows, masks, n_samples=3)
    np.testing.assert_allclose(
        few.numpy(), official_inpaint(flows.double().numpy(), masks.double().numpy(), 3), rtol=1e-5, atol=1e-5
    )


def test_inpaint_flows_unchanged_outside_and_identity_for_empty_mask():
    flows, masks = _random_case()
    out = inpaint_flows(flows, masks)
    keep = (masks == 0).expand_as(flows)
    assert torch.equal(out[keep], flows[keep])
    assert not torch.allclose(out[0], flows[0])
    empty = torch.zeros_like(masks)
    assert torch.equal(inpaint_flows(flows, empty), flows)


def test_inpaint_flows_constant_inside_and_batch_independent():
    flows = torch.tensor([1.5, -2.25]).view(1, 2, 1, 1).expand(3, 2, 18, 20).contiguous()
    _, masks = _random_case()
    masks = masks[:3, :, :, :20]
    out = inpaint_flows(flows, masks)
    assert torch.allclose(out, flows, atol=1e-5)
    # each item is inpainted on its own (same rng draw per item): batching does not change it
    f, m = _random_case(3)
    full = inpaint_flows(f, m)
    for i in range(f.shape[0]):
        assert torch.allclose(full[i : i + 1], inpaint_flows(f[i : i + 1], m[i : i + 1]))


def test_inpaint_flows_device_and_dtype():
    flows, masks = _random_case()
    out = inpaint_flows(flows.double(), masks.double())
    assert out.dtype == torch.float64 and out.device == flows.device
    assert torch.allclose(out.float(), inpaint_flows(flows, masks), atol=1e-5)
    if torch.cuda.is_available():  # the official hard-codes cuda; ours follows the inputs
        gpu = inpaint_flows(flows.cuda(), masks.cuda())
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), inpaint_flows(flows, masks), atol=1e-4)
    with pytest.raises(ValueError, match="masks must be"):
        inpaint_flows(flows, masks[:, :, :5])


def test_mask_boundary():
    m = torch.zeros(1, 1, 7, 8)
    m[0, 0, 2:5, 2:6] = 1
    b = mask_boundary(m)[0, 0]
    expect = torch.zeros(7, 8, dtype=torch.bool)
    expect[2:5, 2:6] = True
    expect[3, 3:5] = False  # interior of the 3x4 box
    assert torch.equal(b, expect)
    full = mask_boundary(torch.ones(1, 1, 5, 5))
    assert not full.any()  # the image border is never boundary


def test_forward_backward_error_zero_for_constant_pair():
    f = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(2, 2, 24, 30)
    err = forward_backward_error(f, -f, scale=(0.5, 2.0))
    assert err.shape == (2, 1, 24, 30)
    assert err[..., 3:-3, 3:-3].abs().max() < 1e-5


# -------------------------------------------------------------------------------------------------------- RAFT


@pytest.fixture(scope="module")
def small_raft() -> RAFTFlow:
    torch.manual_seed(0)
    return RAFTFlow(size="small", allow_random=True, resolution=(128, 128), iters=2)


def _images(b: int = 2, h: int = 48, w: int = 80, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    im1 = torch.nn.functional.avg_pool2d(torch.rand(b, 3, h, w, generator=g), 5, 1, 2)
    im2 = torch.roll(im1, (2, 3), (2, 3))
    mask = torch.zeros(b, 1, h, w)
    mask[:, :, 10:30, 20:50] = 1
    return im1, im2, mask


def test_raft_flow_shapes_and_hole_inpainting(small_raft):
    assert isinstance(small_raft, FlowEstimator) and isinstance(small_raft, nn.Module)
    assert not any(p.requires_grad for p in small_raft.parameters())
    small_raft.train()
    assert not small_raft.training and not small_raft.raft.training
    im1, im2, mask = _images()
    flow, err = small_raft(im1, im2)
    assert flow.shape == (2, 2, 48, 80) and err.shape == (2, 1, 48, 80)
    assert torch.isfinite(flow).all() and (err >= 0).all()
    flow4, err4 = small_raft(torch.cat([im1 * (1 - mask), mask], 1), torch.cat([im2, torch.zeros_like(mask)], 1))
    assert flow4.shape == (2, 2, 48, 80) and err4.shape == (2, 1, 48, 80)
    # RGB part identical -> the raw flow is identical; only the hole is inpainted
    flow4b, _ = small_raft(torch.cat([im1, mask], 1), im2)
    outside = (mask == 0).expand_as(flow)
    assert torch.equal(flow4b[outside], flow[outside])
    assert torch.allclose(flow4b, inpaint_flows(flow, mask))


def test_raft_flow_error_scale(small_raft):
    assert small_raft.error_scale(48, 80) == (80 / 128, 48 / 128)


def test_raft_weights_round_trip_torchvision_format(tmp_path):
    torch.manual_seed(1)
    ref = raft_small(weights=None)
    path = tmp_path / "raft_small_tv.pth"
    torch.save(ref.state_dict(), path)
    est = RAFTFlow(size="small", weights=path, resolution=(128, 128), iters=2)
    for k, v in ref.state_dict().items():
        assert torch.equal(est.raft.state_dict()[k], v), k


def test_raft_weights_princeton_format(tmp_path, to_princeton):
    torch.manual_seed(2)
    ref = raft_large(weights=None)
    with torch.no_grad():
        for name, buf in ref.named_buffers():
            if "running_" in name:
                buf.uniform_(0.5, 1.5)
    state = {new: v for k, v in ref.state_dict().items() for new in to_princeton(k)}
    assert len(state) == len(ref.state_dict()) + 10  # cnet's layer2.0 / layer3.0 norm3 duplicates
    path = tmp_path / "raft-things.pth"
    torch.save(state, path)
    est = RAFTFlow(size="large", weights=path, resolution=(128, 128), iters=1)
    for k, v in ref.state_dict().items():
        assert torch.equal(est.raft.state_dict()[k], v), k
    assert princeton_raft_key("update_block.gru.convq", "small") == "update_block.gru.convq"  # no param: unchanged
    assert (
        princeton_raft_key("update_block.gru.convq.weight", "small")
        == "update_block.recurrent_block.convgru1.convq.weight"
    )
    assert princeton_raft_key("fnet.layer1.0.norm4.weight", "small") is None
    assert princeton_raft_key("fnet.layer1.0.conv3.bias", "small") == "feature_encoder.layer1.0.convnormrelu3.0.bias"


def test_raft_weights_errors(tmp_path):
    missing = tmp_path / "nope" / "raft-things.pth"
    with pytest.raises(MissingWeightsError, match=re.escape(str(missing))):
        RAFTFlow(weights=missing)
    with pytest.raises(MissingWeightsError, match="RAFT weights"):
        RAFTFlow()
    bad = tmp_path / "bad.pth"
    torch.save({"fnet.conv1.weight": torch.zeros(64, 3, 7, 7), "something.else": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointKeyError, match="missing key") as info:
        RAFTFlow(size="large", weights=bad)
    assert "something.else" in info.value.unexpected
    with pytest.raises(ValueError, match="multiples of 8"):
        RAFTFlow(allow_random=True, resolution=(130, 128))
    with pytest.raises(ValueError, match="at least 128"):
        RAFTFlow(allow_random=True, resolution=(64, 64))
    with pytest.raises(ValueError, match="size"):
        RAFTFlow(size="huge", allow_random=True)


def test_estimator_input_checks(small_raft):
    im1, im2, _ = _images()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        small_raft(im1 * 2 - 1, im2)
    with pytest.raises(ValueError, match="differ"):
        small_raft(im1, im2[:, :, :40])
    with pytest.raises(ValueError, match="3 or 4"):
        small_raft(im1[:, :2], im2)


# --------------------------------------------------------------------------------------------------------- DIS


def test_dis_recovers_translation():
    skdata = pytest.importorskip("skimage.data")
    img = skdata.astronaut()[::2, ::2]  # (256, 256, 3) uint8
    shifted = np.roll(img, (3, 5), axis=(0, 1))  # image1 pixel (x, y) sits at (x + 5, y + 3) in image2

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255.0

    im1, im2 = t(img), t(shifted)
    flow, err = DISFlow()(im1, im2)
    assert flow.shape == (1, 2, 256, 256) and err.shape == (1, 1, 256, 256)
    med = flow[0, :, 64:192, 64:192].flatten(1).median(1).values
    assert abs(med[0] - 5.0) < 0.5 and abs(med[1] - 3.0) < 0.5
    # sign convention of flow_sample: warping image2 by the flow gives image1
    warped = flow_sample(im2, flow)
    inner = (slice(None), slice(None), slice(16, -16), slice(16, -16))
    assert (warped - im1)[inner].abs().mean() < 0.2 * (im2 - im1)[inner].abs().mean()
    # RGBA: the hole is inpainted from the (constant) flow around it (unmasked image1 with its mask, as in the
    # official training; a masked image1 gives DIS a black box whose edges disturb the boundary flow)
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 100:150, 90:160] = 1
    flow4, _ = DISFlow()(torch.cat([im1, mask], 1), im2)
    hole = flow4[0, :, 110:140, 100:150].flatten(1).median(1).values
    assert abs(hole[0] - 5.0) < 0.5 and abs(hole[1] - 3.0) < 0.5


def test_dis_bad_preset():
    with pytest.raises(ValueError, match="ultrafast, fast, medium"):
        DISFlow(preset="slow")


# ------------------------------------------------------------------------------------------- zero / build / keyframes


def test_zero_flow_and_build_flow():
    im1, im2, mask = _images(h=16, w=24)
    flow, err = build_flow("zero")(torch.cat([im1, mask], 1), im2)
    assert flow.shape == (2, 2, 16, 24) and err.shape == (2, 1, 16, 24)
    assert not flow.any() and not err.any()
    assert isinstance(build_flow("dis", preset="fast"), DISFlow)
    assert isinstance(build_flow("zero"), ZeroFlow)
    with pytest.raises(ValueError, match="raft, dis, zero"):
        build_flow("farneback")
    with pytest.raises(MissingWeightsError):
        build_flow("raft")


class _Recorder(FlowEstimator):
    """A differentiable toy estimator (flow = a learnable scale times the colour difference) that records its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, image1, image2):
        self.calls.append((image1, image2))
        flow = self.scale * (image2[:, :2] - image1[:, :2])
        return flow, flow.abs().mean(1, keepdim=True)


def test_keyframe_flows_shapes_batching_and_no_graph():
    b, t, h, w = 2, 3, 16, 24
    g = torch.Generator().manual_seed(0)
    target = torch.rand(b, 3, h, w, generator=g, requires_grad=True)
    mask = torch.zeros(b, 1, h, w)
    mask[..., 4:10, 5:15] = 1
    srcs = torch.rand(b, t, 3, h, w, generator=g)
    srcs_masks = (torch.rand(b, t, 1, h, w, generator=g) > 0.8).float()
    est = _Recorder()
    flows, errs = keyframe_flows(est, target, mask, srcs, srcs_masks)
    assert flows.shape == (b, t, 2, h, w) and errs.shape == (b, t, 1, h, w)
    assert not flows.requires_grad and flows.grad_fn is None and errs.grad_fn is None
    assert len(est.calls) == 1  # all keyframes in one call
    image1, image2 = est.calls[0]
    assert image1.shape == (b * t, 4, h, w) and image2.shape == (b * t, 4, h, w)
    masked = target.detach() * (1 - mask)
    for i in range(b):
        for j in range(t):
            assert torch.equal(image1[i * t + j, :3], masked[i]) and torch.equal(image1[i * t + j, 3:], mask[i])
            assert torch.equal(image2[i * t + j], torch.cat([srcs[i, j], srcs_masks[i, j]]))
            assert torch.allclose(flows[i, j], srcs[i, j, :2] - masked[i, :2])
    flows3, _ = keyframe_flows(ZeroFlow(), target, mask, srcs, None)
    assert flows3.shape == (b, t, 2, h, w)
    with pytest.raises(ValueError, match="srcs_masks"):
        keyframe_flows(est, target, mask, srcs, srcs_masks[:, :1])


def test_keyframe_flows_with_raft(small_raft):
    im1, im2, mask = _images(b=1)
    srcs = torch.stack([im2, im1], 1)
    flows, errs = keyframe_flows(small_raft, im1, mask, srcs)
    assert flows.shape == (1, 2, 2, 48, 80) and errs.shape == (1, 2, 1, 48, 80)
    direct, _ = small_raft(torch.cat([im1 * (1 - mask), mask], 1), im2)
    assert torch.allclose(flows[:, 0], direct, atol=1e-5)
