"""Structure conditioning of Gen-1 (Esser et al. 2023, arXiv 2302.03011, Sec. 3.1 / 3.2): per-frame structure maps
and the structure-fidelity level t_s.

**Estimators.** A structure estimator is any callable ``frames (N, 3, H, W) in [-1, 1] -> maps (N, 1, H, W) in
[-1, 1]``. The paper uses MiDaS depth (DPT-Large): :class:`DPTDepth` runs a transformers ``DPTForDepthEstimation``
from a local folder (no depth weights can be downloaded here; tests use a tiny random DPT). The offline defaults are
what OpenCV-style image processing computes without weights, and they are **not depth**: :class:`SobelEdges`
(gradient magnitude of the luminance, the default), :class:`CannyEdges` (OpenCV's binary edges) and
:class:`Luminance` (grey levels; carries appearance, so content leaks into structure). Edges share depth's key
property for Gen-1, that they describe shapes and layout but little colour or texture. :func:`structure_estimator`
builds one by name from :data:`STRUCTURE_ESTIMATORS`.

**The t_s pyramid.** The structure map goes through t_s iterations of blur + 2x downsampling (one level of a Gaussian
pyramid: the 5-tap binomial filter [1, 4, 6, 4, 1] / 16 with reflected borders, then every second row and column,
as ``cv2.pyrDown``) and is resized back to the latent size (bilinear, antialiased): larger t_s = coarser structure,
and more freedom for the content to change shapes. :func:`structure_pyramid` does it for one t_s;
:func:`structure_condition` for a per-sample t_s without a host sync (every level computed, one gathered per
sample), for images (N, C, H, W) and clips (B, C, T, H, W) alike. The levels are taken at the resolution of the
maps passed in: with pixel-resolution maps (the paper's setting) the first log2(f) levels differ little at latent
size (f = the autoencoder's downsampling factor), because resizing to the latent grid blurs as much; pass maps at
latent resolution to make every level count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gencore.io import model_folder
from gencore.modules import FrozenModule, check_index_range

__all__ = [
    "STRUCTURE_ESTIMATORS",
    "CannyEdges",
    "DPTDepth",
    "Luminance",
    "SobelEdges",
    "StructureEstimator",
    "blur_downsample",
    "luminance",
    "structure_condition",
    "structure_estimator",
    "structure_pyramid",
]

_BINOMIAL = (1.0, 4.0, 6.0, 4.0, 1.0)  # cv2.pyrDown's kernel (x 1/16 per axis)


def _check_frames(frames: Tensor, who: str) -> None:
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"{who}: frames must be (N, 3, H, W) RGB in [-1, 1], got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"{who}: frames must be floating point in [-1, 1], got dtype {frames.dtype}")


def luminance(frames: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [-1, 1] -> (N, 1, H, W) luma in [-1, 1] (ITU-R BT.601 weights, as ``cv2.COLOR_RGB2GRAY``)."""
    w = frames.new_tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)
    return (frames * w).sum(dim=1, keepdim=True)


def _normalize_per_frame(maps: Tensor) -> Tensor:
    """Each map's [min, max] mapped to [-1, 1] (whatever its scale; a constant map becomes -1)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(torch.finfo(maps.dtype).tiny) * 2 - 1


# --------------------------------------------------------------------------------------------------- estimators


class StructureEstimator(FrozenModule):
    """Base of the structure estimators: frames (N, 3, H, W) in [-1, 1] -> (N, 1, H, W) in [-1, 1], no gradients,
    frozen (left out of a release's trainable weights). Subclasses implement :meth:`estimate`."""

    #: what the map is, for logs and the README ("depth", "edges", ...)
    kind: str = "structure"

    def estimate(self, frames: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, frames: Tensor) -> Tensor:
        _check_frames(frames, type(self).__name__)
        out = self.estimate(frames)
        return out.to(frames.dtype).clamp_(-1.0, 1.0)


class Luminance(StructureEstimator):
    """Grey levels as the structure map (not depth: carries shading and colour contrast, i.e. some content)."""

    kind = "luminance"

    def __init__(self) -> None:
        super().__init__()
        self.freeze()

    def estimate(self, frames: Tensor) -> Tensor:
        return luminance(frames)


class SobelEdges(StructureEstimator):
    """Gradient magnitude of the luminance (3x3 Sobel, as ``cv2.Sobel(ksize=3)`` with reflected borders),
    normalised per frame to [-1, 1]; ``blur_sigma`` > 0 smooths the luminance first (Gaussian, in pixels). Not
    depth: edges of shapes and textures alike. Runs on the frames' device."""

    kind = "edges"

    def __init__(self, blur_sigma: float = 1.0) -> None:
        super().__init__()
        if blur_sigma < 0:
            raise ValueError(f"blur_sigma must be >= 0, got {blur_sigma}")
        self.blur_sigma = float(blur_sigma)
        self.freeze()

    def estimate(self, frames: Tensor) -> Tensor:
        y = luminance(frames.float())
        if self.blur_sigma > 0:
            y = _gaussian_blur(y, self.blur_sigma)
        smooth = y.new_tensor([1.0, 2.0, 1.0])
        diff = y.new_tensor([-1.0, 0.0, 1.0])
        kx = (smooth[:, None] * diff[None]).reshape(1, 1, 3, 3)  # d/dx
        padded = F.pad(y, (1, 1, 1, 1), mode="reflect")
        gx = F.conv2d(padded, kx)
        gy = F.conv2d(padded, kx.transpose(-1, -2))
        return _normalize_per_frame(torch.sqrt(gx * gx + gy * gy))


class CannyEdges(StructureEstimator):
    """OpenCV's Canny edges of the luminance (thresholds on 8-bit grey levels), 1 on edges, -1 elsewhere. Not depth.
    Runs on the CPU (the result moves back to the frames' device)."""

    kind = "edges"

    def __init__(self, low: float = 100.0, high: float = 200.0) -> None:
        super().__init__()
        if not 0 <= low <= high:
            raise ValueError(f"Canny thresholds need 0 <= low <= high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)
        self.freeze()

    def estimate(self, frames: Tensor) -> Tensor:
        import cv2

        grey = ((luminance(frames.float()) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        edges = [cv2.Canny(g[0].cpu().numpy(), self.low, self.high) for g in grey]  # (H, W) uint8 in {0, 255}
        out = torch.from_numpy(np.stack(edges)).to(frames.device)[:, None]
        return out.float() / 127.5 - 1


class DPTDepth(StructureEstimator):
    """MiDaS / DPT monocular depth (the paper's structure, DPT-Large) through transformers'
    ``DPTForDepthEstimation`` from a local folder (config.json + weights, e.g. a snapshot of Intel/dpt-large; an
    image-processor config beside them sets the normalisation, else mean = std = 0.5).

    Frames are resized to the model's square input (``config.image_size``, or ``input_size``), the predicted relative
    inverse depth (near = large) is resized back to (H, W) and normalised per frame to [-1, 1]."""

    kind = "depth"

    def __init__(self, path: str | os.PathLike, *, input_size: int | None = None) -> None:
        super().__init__()
        from transformers import DPTForDepthEstimation

        folder = model_folder(
            path,
            "DPTDepth needs a local DPT / MiDaS model folder in transformers format (e.g. a snapshot of "
            "Intel/dpt-large)",
        )
        self.model = DPTForDepthEstimation.from_pretrained(folder, local_files_only=True)
        mean, std = [0.5] * 3, [0.5] * 3
        if (folder / "preprocessor_config.json").is_file():
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            mean, std = list(getattr(proc, "image_mean", mean)), list(getattr(proc, "image_std", std))
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.input_size = int(input_size or self.model.config.image_size)
        self.freeze()

    def estimate(self, frames: Tensor) -> Tensor:
        h, w = frames.shape[-2:]
        x = (frames.float() + 1) / 2  # [0, 1]
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        depth = self.model(pixel_values=x.to(next(self.model.parameters()).dtype)).predicted_depth  # (N, h', w')
        depth = F.interpolate(depth[:, None].float(), size=(h, w), mode="bicubic", align_corners=False)
        return _normalize_per_frame(depth)


STRUCTURE_ESTIMATORS: dict[str, type[StructureEstimator]] = {
    "sobel": SobelEdges,
    "canny": CannyEdges,
    "luminance": Luminance,
    "dpt": DPTDepth,
}


def structure_estimator(name: str = "sobel", **kwargs: Any) -> StructureEstimator:
    """The estimator registered as ``name`` (:data:`STRUCTURE_ESTIMATORS`), built with ``kwargs`` (``dpt`` needs
    ``path=``)."""
    if name not in STRUCTURE_ESTIMATORS:
        raise ValueError(f"unknown structure estimator {name!r}; choose from {sorted(STRUCTURE_ESTIMATORS)}")
    return STRUCTURE_ESTIMATORS[name](**kwargs)


# --------------------------------------------------------------------------------------------------- the pyramid


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, round(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def blur_downsample(x: Tensor) -> Tensor:
    """One Gaussian-pyramid step, as ``cv2.pyrDown``: 5x5 binomial blur ([1, 4, 6, 4, 1] / 16 per axis, reflected
    borders without repeating the edge), then the even rows and columns: (N, C, H, W) -> (N, C, ceil(H/2),
    ceil(W/2)). A 1-pixel side stays 1 pixel; sides of 2 pixels use replicated borders."""
    c = x.shape[1]
    k = x.new_tensor(_BINOMIAL) / 16
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode=mode), (k[:, None] * k[None]).expand(c, 1, 5, 5), groups=c)
    return x[..., ::2, ::2]


def _check_maps(maps: Tensor) -> None:
    if maps.dim() != 4:
        raise ValueError(f"structure maps must be (N, C, H, W), got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise ValueError(f"structure maps must be floating point, got dtype {maps.dtype}")


def _check_level(level: Any, max_level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int | np.integer):
        raise ValueError(f"t_s must be an integer, got {level!r}")
    if not 0 <= int(level) <= max_level:
        raise ValueError(f"t_s={int(level)} is outside [0, {max_level}] (the structure levels this model knows)")
    return int(level)


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    out = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return out  # type: ignore[return-value]


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def structure_pyramid(maps: Tensor, t_s: int, size: int | Sequence[int], *, max_level: int) -> Tensor:
    """t_s iterations of :func:`blur_downsample` on ``maps`` (N, C, H, W), then resized to ``size`` (the latent
    grid): (N, C, h, w). ``t_s`` must lie in [0, max_level]."""
    _check_maps(maps)
    level = _check_level(t_s, max_level)
    x = maps
    for _ in range(level):
        x = blur_downsample(x)
    return _resize(x, _size(size))


def structure_condition(
    maps: Tensor, t_s: int | Tensor | Sequence[int], size: int | Sequence[int], *, max_level: int
) -> Tensor:
    """The structure input of the video UNet: ``maps`` (N, C, H, W), or clips (B, C, T, H, W), at level ``t_s`` (an
    int, or one per image / clip: (N,) or (B,)) resized to ``size``; returns (N, C, h, w) or (B, C, T, h, w).

    A per-sample ``t_s`` computes every level up to ``max_level`` and gathers each sample's one: no host sync (on
    an accelerator the range check is an asynchronous device assertion)."""
    clips = maps.dim() == 5
    if clips:
        b, c, frames = maps.shape[:3]
        maps = maps.permute(0, 2, 1, 3, 4).reshape(b * frames, c, *maps.shape[-2:])  # (B·T, C, H, W)
    _check_maps(maps)
    hw = _size(size)
    if isinstance(t_s, int | np.integer) and not isinstance(t_s, bool):
        out = structure_pyramid(maps, int(t_s), hw, max_level=max_level)
    else:
        level = torch.as_tensor(t_s, device=maps.device)
        n = b if clips else maps.shape[0]
        if level.is_floating_point() or level.dtype == torch.bool or level.shape != (n,):
            raise ValueError(f"t_s must be an int or {n} integers (one per {'clip' if clips else 'map'}), got {t_s!r}")
        check_index_range(level, max_level + 1, "t_s")
        if clips:
            level = level.repeat_interleave(frames)
        levels, x = [_resize(maps, hw)], maps
        for _ in range(max_level):
            x = blur_downsample(x)
            levels.append(_resize(x, hw))
        stacked = torch.stack(levels)  # (L + 1, N, C, h, w)
        idx = level.long().reshape(1, -1, 1, 1, 1).expand(1, *stacked.shape[1:])
        out = stacked.gather(0, idx)[0]  # (N, C, h, w)
    if clips:
        out = out.reshape(b, frames, c, *hw).permute(0, 2, 1, 3, 4)  # (B, C, T, h, w)
    return out
