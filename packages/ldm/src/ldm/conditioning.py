"""Conditioning of Latent Diffusion (Sec. 3.3; ``ldm/modules/encoders/modules.py``, ``DiffusionWrapper``).

- :class:`ClassEmbedder` — class label -> one context token (official names: ``embedding``); index ``n_classes - 1``
  is the null class of classifier-free guidance when ``null_class=True`` (as ``cin256-v2``: 1001 classes, 1000 null).
- text: :class:`gencore.text.FrozenTextEncoder` (MiniLM offline by default, CLIP ViT-L/14 from a local path for SD).
- :class:`DiffusionWrapper` — routes conditions into the UNet the official way: ``concat`` (channel
  concatenation: super-resolution, inpainting, semantic maps), ``crossattn`` (context), ``hybrid`` (both), ``adm``
  (a class vector ``y``).
- :func:`inpainting_condition` / :func:`low_resolution_condition` — the concat inputs of the inpainting and
  super-resolution models, built from a batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONDITIONING_KEYS",
    "ClassEmbedder",
    "DiffusionWrapper",
    "SpatialRescaler",
    "inpainting_condition",
    "low_resolution_condition",
    "random_masks",
]

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")


class ClassEmbedder(nn.Module):
    """``nn.Embedding(n_classes, embed_dim)`` -> (B, 1, embed_dim) context; ``null_class`` reserves the last index."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, null_class: bool = False) -> None:
        super().__init__()
        if embed_dim < 1 or n_classes < 1:
            raise ValueError(f"ClassEmbedder: embed_dim and n_classes must be >= 1, got {embed_dim}, {n_classes}")
        self.embedding = nn.Embedding(n_classes + int(null_class), embed_dim)
        self.n_classes, self.null_class = n_classes, null_class

    @property
    def null_index(self) -> int:
        if not self.null_class:
            raise ValueError("this ClassEmbedder has no null class (build it with null_class=True for guidance)")
        return self.n_classes

    def forward(self, labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels, device=self.embedding.weight.device).long()
        if labels.dim() != 1:
            raise ValueError(f"ClassEmbedder: labels must be (B,), got shape {tuple(labels.shape)}")
        hi = self.n_classes + int(self.null_class)
        bad = labels[(labels < 0) | (labels >= hi)]
        if bad.numel():
            raise ValueError(f"ClassEmbedder: label {int(bad[0])} outside [0, {hi})")
        return self.embedding(labels)[:, None]  # (B, 1, D)


class DiffusionWrapper(nn.Module):
    """The official router; the UNet lives under ``diffusion_model`` (``model.diffusion_model.*`` keys)."""

    def __init__(self, diffusion_model: nn.Module, conditioning_key: str | None = None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key must be one of {CONDITIONING_KEYS}, got {conditioning_key!r}")
        self.diffusion_model, self.conditioning_key = diffusion_model, conditioning_key

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        c_concat: Tensor | None = None,
        c_crossattn: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        key = self.conditioning_key
        needs = {
            "concat": ("c_concat",),
            "crossattn": ("c_crossattn",),
            "hybrid": ("c_concat", "c_crossattn"),
            "adm": ("y",),
        }.get(key, ())
        given = {"c_concat": c_concat, "c_crossattn": c_crossattn, "y": y}
        missing = [n for n in needs if given[n] is None]
        if missing:
            raise ValueError(f"conditioning_key={key!r} needs {', '.join(missing)}")
        if c_concat is not None and key in ("concat", "hybrid"):
            x = torch.cat([x, c_concat], dim=1)
        context = c_crossattn if key in ("crossattn", "hybrid") else None
        return self.diffusion_model(x, t, context=context, y=y if key == "adm" else None)


class SpatialRescaler(nn.Module):
    """Semantic-map conditioning (official ``SpatialRescaler``): ``n_stages`` resizes by ``multiplier``, then a 1x1
    ``channel_mapper`` (e.g. 182 COCO-Stuff classes -> 3 channels for ``semantic_synthesis256``)."""

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}")
        if method not in ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area"):
            raise ValueError(f"SpatialRescaler: unknown method {method!r}")
        self.n_stages, self.method, self.multiplier, self.in_channels = n_stages, method, multiplier, in_channels
        self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias) if out_channels else None
        self.out_channels = out_channels or in_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SpatialRescaler: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return x if self.channel_mapper is None else self.channel_mapper(x)

    def encode(self, x: Tensor) -> Tensor:
        return self(x)


def one_hot_map(seg: Tensor, n_classes: int) -> Tensor:
    """(B, H, W) integer label map -> (B, n_classes, H, W) float one-hot (a (B, C, H, W) map passes through)."""
    if seg.dim() == 4:
        return seg.float()
    if seg.dim() != 3:
        raise ValueError(f"segmentation must be (B, H, W) labels or (B, C, H, W) maps, got {tuple(seg.shape)}")
    if int(seg.min()) < 0 or int(seg.max()) >= n_classes:
        raise ValueError(f"segmentation labels must lie in [0, {n_classes}), got [{int(seg.min())}, {int(seg.max())}]")
    return F.one_hot(seg.long(), n_classes).permute(0, 3, 1, 2).float()


def random_masks(
    n: int,
    size: int,
    *,
    generator: torch.Generator | None = None,
    min_frac: float = 0.25,
    max_frac: float = 0.6,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n, 1, size, size) box masks, 1 = hole to fill (the LDM inpainting training masks are boxes / strokes)."""
    masks = torch.zeros(n, 1, size, size, device=device)
    for i in range(n):
        hw = (torch.rand(2, generator=generator) * (max_frac - min_frac) + min_frac) * size
        h, w = max(1, int(hw[0])), max(1, int(hw[1]))
        top = int(torch.randint(0, size - h + 1, (), generator=generator))
        left = int(torch.randint(0, size - w + 1, (), generator=generator))
        masks[i, :, top : top + h, left : left + w] = 1.0
    return masks


def inpainting_condition(image: Tensor, mask: Tensor, encode: Any) -> Tensor:
    """LDM inpainting concat input: [encode(masked image), mask resized to the latent grid] (``inpainting_big``:
    3 + 1 channels next to the 3 latent channels). ``mask`` = 1 marks the hole."""
    if mask.shape[-2:] != image.shape[-2:] or mask.shape[1] != 1:
        raise ValueError(f"inpainting mask must be (B, 1, H, W) like the image, got {tuple(mask.shape)}")
    z = encode(image * (1 - mask))  # the hole is set to 0 (gray) before encoding
    m = F.interpolate(mask, size=z.shape[-2:], mode="nearest")
    return torch.cat([z, m], dim=1)


def low_resolution_condition(image: Tensor, factor: int, size: tuple[int, int]) -> Tensor:
    """Super-resolution concat input: the image downsampled by ``factor`` (bicubic, antialiased), resized to the
    latent grid ``size`` (``bsr_sr``: the low-resolution image concatenated to the latents)."""
    if factor < 1 or image.shape[-1] % factor or image.shape[-2] % factor:
        raise ValueError(f"low_resolution_condition: image size {tuple(image.shape[-2:])} not divisible by {factor}")
    lr = F.interpolate(image, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(lr.clamp(-1, 1), size=size, mode="bicubic", align_corners=False)
