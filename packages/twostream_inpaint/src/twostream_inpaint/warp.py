"""Backward warping by optical flow (the official ``gi/modules/RAFT/flow_utils.py`` conventions).

A flow ``f`` (B, 2, H, W) maps each target pixel (x, y) to its position (x + f_x, y + f_y) in the source; channel 0 is
the x (width) displacement and channel 1 the y (height) displacement, in pixels of the map it is given at.

- :func:`resize_flows`: bilinear resize (``align_corners=True``) with each component scaled by its own axis ratio;
- :func:`flow_sample`: ``grid_sample`` of a source at ``grid + flow`` (bilinear, zero padding, ``align_corners=True``,
  computed in float32 whatever the input dtype, as the official code insists: half precision cannot hold the grid);
  the flow is resized to the input's size first (``resized_flow_sample``);
- :func:`forward_backward_error`: |f + warp(f_b, f)| per axis, rescaled, averaged over the two components: the
  forward-backward consistency error the deformable write layers see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["flow_sample", "flow_to_grid", "forward_backward_error", "pixel_grid", "resize_flows"]


def _check_flow(flow: Tensor, name: str = "flow") -> None:
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"{name} must be (B, 2, H, W), got {tuple(flow.shape)}")


def pixel_grid(
    h: int, w: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(1, 2, h, w) pixel coordinates: channel 0 = x (column), channel 1 = y (row)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype), indexing="ij"
    )
    return torch.stack((xs, ys))[None]


def resize_flows(flows: Tensor, hw: tuple[int, int] | torch.Size) -> Tensor:
    """``flows`` (B, 2, h, w) at size ``hw``: bilinear (``align_corners=True``), x scaled by W/w and y by H/h."""
    _check_flow(flows, "flows")
    hw = (int(hw[0]), int(hw[1]))
    h, w = flows.shape[-2:]
    if (h, w) == hw:
        return flows
    out = F.interpolate(flows, size=hw, mode="bilinear", align_corners=True)
    scale = torch.tensor([hw[1] / w, hw[0] / h], device=flows.device, dtype=flows.dtype).view(1, 2, 1, 1)
    return out * scale


def flow_to_grid(flow: Tensor) -> Tensor:
    """(B, H, W, 2) normalised ``grid_sample`` grid (``align_corners=True``) of ``pixel grid + flow``, float32."""
    _check_flow(flow)
    flow = flow.float()
    h, w = flow.shape[-2:]
    pos = pixel_grid(h, w, device=flow.device) + flow
    factor = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=flow.device).view(1, 2, 1, 1)
    return (pos * factor - 1.0).permute(0, 2, 3, 1)


def flow_sample(source: Tensor, flow: Tensor, *, mode: str = "bilinear", padding_mode: str = "zeros") -> Tensor:
    """``source`` (B, C, H, W) warped into the target frame by ``flow`` (B, 2, h, w; resized to H x W first): the
    official ``resized_flow_sample(..., align_corners=True)``. Sampled in float32, returned in ``source``'s dtype."""
    _check_flow(flow)
    if source.dim() != 4 or source.shape[0] != flow.shape[0]:
        raise ValueError(
            f"source must be (B, C, H, W) with B = {flow.shape[0]} like the flow, got {tuple(source.shape)}"
        )
    grid = flow_to_grid(resize_flows(flow, source.shape[-2:]))
    out = F.grid_sample(source.float(), grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    return out.to(source.dtype)


def forward_backward_error(flow: Tensor, flow_b: Tensor, scale: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """(B, 1, H, W) consistency error of a flow pair: mean over x, y of |f + f_b(x + f)| with the x part times
    ``scale[0]`` and the y part times ``scale[1]`` (the official RAFT wrapper passes w/256, h/256). Zero for (f, -f)
    with f constant."""
    _check_flow(flow)
    _check_flow(flow_b, "flow_b")
    err = (flow + flow_sample(flow_b, flow)).abs()
    err = err * torch.tensor(scale, device=err.device, dtype=err.dtype).view(1, 2, 1, 1)
    return err.mean(dim=1, keepdim=True)
