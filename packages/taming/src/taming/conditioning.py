"""Conditioning stages of the Net2NetTransformer (``taming/models/cond_transformer.py``, ``taming/modules/util.py``).

A conditioning stage turns whatever conditions an image into a sequence of tokens that precedes the image tokens:

- :class:`SOSProvider` — unconditional: one start-of-sequence token (official ``SOSProvider``);
- :class:`ClassProvider` — class-conditional: the class id as one token (official ``Labelator``, with an optional
  ``offset`` so class tokens need not share ids with image codes);
- a second, frozen VQGAN (spatial conditioning: depth, segmentation, edges, a low-resolution image), whose code
  indices of the condition image are the tokens.

Condition images derived from the data itself, for Fashion-MNIST experiments: :func:`edge_map` (edges -> image) and
:func:`low_resolution` (super-resolution).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CONDITION_TRANSFORMS", "ClassProvider", "SOSProvider", "condition_transform", "edge_map", "low_resolution"]


class SOSProvider(nn.Module):
    """Unconditional models: the condition is a single start token ``sos_token``."""

    def __init__(self, sos_token: int = 0) -> None:
        super().__init__()
        if sos_token < 0:
            raise ValueError(f"SOSProvider: sos_token must be >= 0, got {sos_token}")
        self.sos_token = sos_token
        self.vocab_end = sos_token + 1

    def encode(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        return torch.full((batch_size, 1), self.sos_token, dtype=torch.long, device=device)  # (B, 1)


class ClassProvider(nn.Module):
    """Class-conditional models: the class id (+ ``offset``) as one token."""

    def __init__(self, n_classes: int, offset: int = 0) -> None:
        super().__init__()
        if n_classes < 1 or offset < 0:
            raise ValueError(f"ClassProvider: need n_classes >= 1 and offset >= 0, got {n_classes}, {offset}")
        self.n_classes, self.offset = n_classes, offset
        self.vocab_end = offset + n_classes

    def encode(self, labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels).long()
        if labels.dim() != 1:
            raise ValueError(f"ClassProvider: labels must be (B,), got shape {tuple(labels.shape)}")
        bad = labels[(labels < 0) | (labels >= self.n_classes)]
        if bad.numel():
            raise ValueError(f"ClassProvider: label {int(bad[0])} outside [0, {self.n_classes})")
        return (labels + self.offset)[:, None]  # (B, 1)


def _gray01(x: Tensor) -> Tensor:
    return ((x.mean(dim=1, keepdim=True) if x.shape[1] > 1 else x) + 1) / 2  # (B, 1, H, W) in [0, 1]


def edge_map(x: Tensor, threshold: float = 0.15) -> Tensor:
    """Binary Sobel edge map of images in [-1, 1] -> (B, 1, H, W) in {-1, 1} (edges = 1)."""
    if x.dim() != 4:
        raise ValueError(f"edge_map: expected (B, C, H, W), got {tuple(x.shape)}")
    g = _gray01(x)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=g.dtype) / 4
    gx = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kx[None, None])
    gy = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kx.T[None, None])
    mag = (gx.square() + gy.square()).sqrt()
    return torch.where(mag > threshold, 1.0, -1.0).to(x.dtype)


def low_resolution(x: Tensor, factor: int = 4) -> Tensor:
    """Average-pool by ``factor`` and upsample back (nearest): the input of a super-resolution model."""
    if x.dim() != 4:
        raise ValueError(f"low_resolution: expected (B, C, H, W), got {tuple(x.shape)}")
    if factor < 1 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"low_resolution: image size {tuple(x.shape[-2:])} is not divisible by factor {factor}")
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


CONDITION_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {"edges": edge_map, "lowres": low_resolution}


def condition_transform(name: str | None) -> Callable[[Tensor], Tensor]:
    """The image -> condition-image map named ``name`` (``None``: identity)."""
    if name is None:
        return lambda x: x
    if name not in CONDITION_TRANSFORMS:
        raise ValueError(f"unknown condition {name!r}; valid: {', '.join(CONDITION_TRANSFORMS)}")
    return CONDITION_TRANSFORMS[name]
