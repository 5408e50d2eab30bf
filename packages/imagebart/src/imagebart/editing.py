"""Masked editing: masks, the autoregressive baseline, and the comparison of Sec. 4.3 / Fig. 6 of ImageBART.

The paper's claim: a purely autoregressive transformer (taming's) can only condition an edit on the tokens *before*
the hole in raster order, while ImageBART's reverse stages see the whole (partly noisy) map and so use the context
after the hole too. Both models are edited the same way (the official guide: kept tokens forced, the hole sampled):

- :func:`named_mask` / :func:`read_mask`: keep masks (1 = keep) named ``upper`` / ``lower`` / ``left`` / ``right`` /
  ``center`` (the hole), or read from an image (white = the hole: the usual inpainting convention);
- :func:`token_keep_mask`: a pixel mask -> the token grid (a token is kept only if its whole cell is kept);
- :func:`ar_inpaint`: taming's ``Net2NetTransformer`` completing the hole token by token in raster order with the
  kept tokens forced (KV-cached; same sampler as ImageBART's stages, :func:`imagebart.sampling.sample_sequence`);
- :func:`editing_metrics`: FID-FMNIST of the edits against the test set, the share classified as the original's
  class, and PSNR inside the hole.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imagebart.sampling import gpt_session, keep_guide, sample_sequence

__all__ = [
    "MASKS",
    "ar_inpaint",
    "editing_metrics",
    "mask_from_spec",
    "masked_view",
    "named_mask",
    "read_mask",
    "token_keep_mask",
]

MASKS = ("upper", "lower", "left", "right", "center")


def named_mask(name: str, size: int) -> Tensor:
    """(size, size) keep mask (1 = keep) whose hole is the named half (``upper`` ...) or the central square of half
    the side (``center``)."""
    keep = torch.ones(size, size)
    h = size // 2
    if name == "upper":
        keep[:h] = 0
    elif name == "lower":
        keep[h:] = 0
    elif name == "left":
        keep[:, :h] = 0
    elif name == "right":
        keep[:, h:] = 0
    elif name == "center":
        q = size // 4
        keep[q : q + h, q : q + h] = 0
    else:
        raise ValueError(f"unknown mask {name!r}: use one of {', '.join(MASKS)} or a mask image (white = resample)")
    return keep


def mask_from_spec(spec: str | os.PathLike, size: int) -> Tensor:
    """A keep mask (size, size) from a mask name (:data:`MASKS`) or a mask image path (white = resample)."""
    name = os.fspath(spec)
    if name in MASKS:
        return named_mask(name, size)
    if not os.path.isfile(name):
        what = "mask image not found" if os.path.splitext(name)[1] else "unknown mask"
        raise ValueError(f"{what}: {name!r}; use one of {', '.join(MASKS)} or a mask image (white = resample)")
    return read_mask(name, (size, size))


def read_mask(path: str | os.PathLike, size: tuple[int, int]) -> Tensor:
    """A mask image (white / nonzero = the hole to resample) of exactly ``size`` (H, W) -> keep mask (H, W)."""
    from gencore.data import load_image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask image not found: {os.fspath(path)}")
    arr = load_image(path, channels=1)[..., 0]
    if arr.shape != tuple(size):
        raise ValueError(
            f"mask {os.fspath(path)} is {arr.shape[0]}x{arr.shape[1]} but the image is {size[0]}x{size[1]}: "
            "draw the mask at the image's size"
        )
    hole = torch.from_numpy(np.asarray(arr, dtype=np.float32)) > (0.5 * float(np.iinfo(arr.dtype).max))
    return (~hole).float()


def token_keep_mask(keep: Tensor, grid: tuple[int, int], size: tuple[int, int] | None = None) -> Tensor:
    """A pixel mask (H, W) / (B, H, W) / (B, 1, H, W), 1 = keep, or one already on the token grid -> the token mask
    (B, h·w) bool: a token is kept only when every pixel of its f x f cell is kept (any pixel in the hole resamples
    it; the official script's nearest-neighbour downsampling can keep a token whose cell is partly in the hole).
    ``size``: the images' (H, W), when known; a pixel mask must then have exactly that size."""
    if not isinstance(keep, Tensor):
        raise ValueError(f"mask must be a tensor, got {type(keep).__name__}")
    if keep.dim() == 2:
        keep = keep[None]
    if keep.dim() == 4:
        if keep.shape[1] != 1:
            raise ValueError(f"a mask has one channel, got shape {tuple(keep.shape)}")
        keep = keep[:, 0]
    if keep.dim() != 3:
        raise ValueError(f"mask must be (H, W), (B, H, W) or (B, 1, H, W), got shape {tuple(keep.shape)}")
    h, w = grid
    mh, mw = keep.shape[-2:]
    if (mh, mw) == (h, w):
        return (keep > 0.5).flatten(1)
    if size is not None and (mh, mw) != tuple(size):
        raise ValueError(
            f"mask of size {mh}x{mw} matches neither the image size {size[0]}x{size[1]} nor the {h}x{w} token grid"
        )
    if mh % h or mw % w or mh // h != mw // w:
        raise ValueError(
            f"mask of size {mh}x{mw} matches neither the image size (a multiple of the {h}x{w} token grid) nor the "
            "token grid"
        )
    hole = F.max_pool2d((keep <= 0.5).float()[:, None], mh // h)[:, 0]  # (B, h, w): any hole pixel in the cell
    return (hole < 0.5).flatten(1)


def masked_view(images: Tensor, keep_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """The images with the resampled cells grey (0): what an edit keeps, for figures."""
    cells = keep_tokens.view(images.shape[0], 1, *grid).float()
    return images * F.interpolate(cells, size=images.shape[-2:], mode="nearest").to(images.dtype)


def expand_masks(keep: Tensor, n: int, grid: tuple[int, int], size: tuple[int, int] | None = None) -> Tensor:
    """Token keep masks (n, h·w) for ``n`` images (of ``size`` (H, W)) from one mask or one per image; refuses a
    mask that keeps nothing (that is sampling, not editing)."""
    tmask = token_keep_mask(keep, grid, size)
    if tmask.shape[0] == 1 and n > 1:
        tmask = tmask.expand(n, -1)
    if tmask.shape[0] != n:
        raise ValueError(f"{tmask.shape[0]} masks for {n} images")
    if not bool(tmask.any(dim=1).all()):
        raise ValueError("a mask covers the whole image: nothing is kept to edit around (sample instead)")
    if bool(tmask.all()):
        raise ValueError("the mask keeps the whole image: nothing to resample (white = the region to resample)")
    return tmask


@torch.no_grad()
def ar_inpaint(
    module: nn.Module,
    images: Tensor,
    keep: Tensor,
    labels: Sequence[int] | Tensor | None = None,
    *,
    top_k: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Edit ``images`` with taming's autoregressive ``Net2NetTransformer``: tokens in raster order, the kept ones
    forced by the same guide as ImageBART's, so the hole sees only what precedes it. ``labels`` condition a
    class-conditional transformer and are ignored by an unconditional one. Returns ``images`` (the edits),
    ``sources`` and ``keep`` (the token mask)."""
    device = next(module.transformer.parameters()).device
    images = images.to(device)
    z, grid = module.encode_to_z(images)  # (B, L) in the VQGAN's own index space
    n, length = z.shape
    tmask = expand_masks(keep.to(device), n, grid, tuple(images.shape[-2:]))
    # an unconditional baseline (SOS token) is edited without the labels: the class must come from the context
    class_model = bool(getattr(module.cond_stage_model, "num_classes", 0))
    batch, _ = module.cond_stage_model.generation_batch(n, labels=labels if class_model else None)
    c = module.encode_to_c(batch, n).to(device)  # (B, Lc): start / class tokens
    codes = module.first_stage_model.vocab_size
    session = gpt_session(module.transformer, c)
    module.transformer.eval()
    tokens = sample_sequence(
        session,
        length,
        guide=keep_guide(z, tmask, codes),
        top_k=top_k,
        temperature=temperature,
        vocab_limit=codes,
        generator=generator,
    )
    return {"images": module.decode_to_img(tokens, grid), "sources": masked_view(images, tmask, grid), "keep": tmask}


def hole_psnr(edits: Tensor, originals: Tensor, keep_tokens: Tensor, grid: tuple[int, int]) -> float:
    """Mean PSNR (dB, data range 2) over the resampled cells only (one value per image, averaged)."""
    return float(hole_psnrs(edits, originals, keep_tokens, grid).mean())


def hole_psnrs(edits: Tensor, originals: Tensor, keep_tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per-image PSNR (B,) in dB (data range 2) over the resampled cells only."""
    hole = 1.0 - F.interpolate(
        keep_tokens.view(edits.shape[0], 1, *grid).float(), size=edits.shape[-2:], mode="nearest"
    )  # (B, 1, H, W)
    sq = (edits.float() - originals.float()).square() * hole
    mse = sq.flatten(1).sum(1) / (hole.flatten(1).sum(1) * edits.shape[1]).clamp_min(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def editing_metrics(edits: Tensor, originals: Tensor, labels: Tensor, keep_tokens: Tensor, grid: Any) -> dict:
    """FID-FMNIST of the edits (test split), the share classified as the original's class, PSNR in the hole (the
    mean over images and its standard error)."""
    from gencore.metrics import class_accuracy, fid_fmnist

    per_image = hole_psnrs(edits, originals, keep_tokens, tuple(grid))
    return {
        "n": float(len(edits)),
        "fid": fid_fmnist(edits),
        "class_accuracy": class_accuracy(edits, labels),
        "hole_psnr": float(per_image.mean()),
        "hole_psnr_se": float(per_image.std() / len(per_image) ** 0.5) if len(per_image) > 1 else float("nan"),
    }
