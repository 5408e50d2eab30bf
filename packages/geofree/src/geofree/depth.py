"""Monocular disparity for the source view: what the paper puts into the pose's scale (Sec. 3.2, "depth").

The paper runs MiDaS (``torch.hub`` "intel-isl/MiDaS", "MiDaS") on the source image and aligns its affine-invariant
disparity to the sparse COLMAP points by least squares (:func:`geofree.geometry.scaled_disparity`). Estimators here
are modules ``estimator(batch) -> (B, H, W)`` disparity (up to an affine map):

- :class:`BatchDisparity` reads it from the batch (the synthetic rooms carry a stand-in: the true disparity under an
  unknown affine map, which is exactly MiDaS's invariance; or any precomputed MiDaS maps a user stores);
- :class:`MidasDisparity` runs a MiDaS network with the official preprocessing (input [-1, 1] -> [0, 1], resized
  bicubic to fit 384 keeping the aspect ratio at multiples of 32, ImageNet-normalised, the output resized bicubic
  back to H x W and clamped >= 1e-8). MiDaS weights are not downloadable here: give the local torch.hub checkout of
  intel-isl/MiDaS and its weights file, or pass any network.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore import io

__all__ = ["BatchDisparity", "MidasDisparity", "midas_input_size"]

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class BatchDisparity(nn.Module):
    """The disparity estimate stored in the batch under ``key`` ((B, H, W) or (B, 1, H, W))."""

    def __init__(self, key: str = "src_mono_disparity") -> None:
        super().__init__()
        self.key = key

    def forward(self, batch: dict[str, Any]) -> Tensor:
        if self.key not in batch:
            raise ValueError(
                f"the batch has no {self.key!r} (a monocular disparity estimate of the source view); give the data "
                "that carries it, or a MiDaS estimator (module.depth_estimator: geofree.depth.MidasDisparity)"
            )
        d = batch[self.key]
        return d[:, 0] if d.dim() == 4 else d


def _multiple_of(x: float, m: int = 32) -> int:
    return max(m, round(x / m) * m)


def midas_input_size(height: int, width: int, target: int = 384) -> tuple[int, int]:
    """MiDaS's resize ("upper_bound" keep-aspect to ``target``, multiples of 32): the side that reaches the target first
    sets the scale (official ``Midas.get_size``)."""
    scale = min(target / height, target / width)
    return _multiple_of(height * scale), _multiple_of(width * scale)


class MidasDisparity(nn.Module):
    """MiDaS inverse depth of ``batch[image_key]`` with the official pre- and post-processing.

    ``network``: a module (B, 3, h, w) ImageNet-normalised -> (B, h, w) (or (B, 1, h, w)) disparity; or build MiDaS
    from ``hub_dir`` (a local clone of intel-isl/MiDaS, loaded with ``torch.hub.load(..., source="local")``) and load
    ``weights`` (a .pt state dict) into it. Frozen.
    """

    def __init__(
        self,
        network: nn.Module | None = None,
        *,
        hub_dir: str | os.PathLike | None = None,
        weights: str | os.PathLike | None = None,
        model: str = "MiDaS",
        image_key: str = "src_img",
        target_size: int = 384,
    ) -> None:
        super().__init__()
        if network is None:
            if hub_dir is None or weights is None:
                raise ValueError(
                    "MidasDisparity needs a network, or hub_dir (a local clone of github.com/isl-org/MiDaS) and "
                    "weights (its .pt file): MiDaS cannot be downloaded here"
                )
            hub = io.resolve_path(hub_dir)
            if not (hub / "hubconf.py").is_file():
                raise FileNotFoundError(f"MidasDisparity: {hub} is not a MiDaS checkout (no hubconf.py)")
            network = torch.hub.load(os.fspath(hub), model, source="local", pretrained=False)
            state = io.load_checkpoint(io.resolve_path(weights))
            io.load_state_dict(network, io.extract_state_dict(state), source=str(weights))
        self.model = network.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.image_key, self.target_size = image_key, target_size
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> MidasDisparity:  # frozen: always eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, batch: dict[str, Any] | Tensor) -> Tensor:
        x = batch[self.image_key] if isinstance(batch, dict) else batch
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"MiDaS takes (B, 3, H, W) images in [-1, 1], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        size = midas_input_size(h, w, self.target_size)
        y = (x.float() + 1.0) / 2.0
        y = F.interpolate(y, size=size, mode="bicubic", align_corners=False)
        y = (y - self.mean) / self.std
        d = self.model(y)
        d = d if d.dim() == 4 else d[:, None]
        d = F.interpolate(d.float(), size=(h, w), mode="bicubic", align_corners=False)[:, 0]
        return d.clamp(min=1e-8)
