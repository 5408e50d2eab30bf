"""ImageBART's first stage: a taming VQGAN whose indices are remapped to the codes it actually uses.

The official configs load the VQGAN with ``remap: data/vqgan_indices/<dataset>_indices.npy``: the sorted list of
codebook entries that occur on the training set (973 of 16,384 for ImageNet). The multinomial diffusion then runs
over K = that many codes (``quantize.re_embed``) instead of the whole codebook, so the uniform redraws never produce
codes the decoder has not learned to render. Here:

- :func:`used_codes` lists the codes a VQGAN picks on a set of images (what ``<dataset>_indices.npy`` holds);
- :func:`remapped_first_stage` (a Hydra target) loads a VQGAN (taming's :func:`~taming.first_stage.load_first_stage`:
  export / run folder, shipped ``pkg://`` checkpoint, genlab or official ``.ckpt``) and sets its remap: an
  ``.npy`` path (official), an explicit list, or ``None`` (the full codebook);
- :func:`resolve_auto_remap` turns ``remap: auto`` in a training config into the explicit list, computed once on the
  training images before the run starts (so the run's ``config.yaml`` and its export carry the list and sampling
  never needs the data).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from gencore.progress import Progress
from taming.first_stage import load_first_stage

__all__ = ["remapped_first_stage", "resolve_auto_remap", "used_codes"]

log = logging.getLogger(__name__)


@torch.no_grad()
def used_codes(vqgan: nn.Module, batches: Iterable[Tensor], *, total: int | None = None) -> Tensor:
    """Sorted codebook indices (long, CPU) that ``vqgan`` picks on the images of ``batches`` ((B, C, H, W) in
    [-1, 1] each), in the full codebook's index space (whatever remap the VQGAN has)."""
    quantize = vqgan.quantize
    n = quantize.codebook().num_embeddings
    counts = torch.zeros(n, dtype=torch.long)
    device = next(vqgan.parameters()).device
    progress = Progress("listing the used codes", total, unit="batch") if total else None
    for i, x in enumerate(batches):
        z = vqgan.encode_to_prequant(x.to(device))  # (B, D, h, w)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx = quantize.nearest(flat).cpu()
        counts.index_add_(0, idx, torch.ones_like(idx))
        if progress is not None:
            progress.update(i + 1)
    used = torch.nonzero(counts).flatten()
    if used.numel() == 0:
        raise ValueError("used_codes: no images given")
    return used


def remapped_first_stage(
    path: str | os.PathLike,
    *,
    remap: str | os.PathLike | Sequence[int] | None = None,
    unknown_index: str | int = "random",
    config: str | os.PathLike | None = None,
    prefix: str | None = None,
) -> nn.Module:
    """A frozen VQGAN whose indices live in the space of the codes ``remap`` lists (see the module docstring).

    ``remap='auto'`` is resolved by ``imagebart-train`` before the model is built; anywhere else it is an error."""
    if isinstance(remap, str) and remap == "auto":
        raise ValueError(
            "remap=auto is resolved by imagebart-train (which lists the codes used on the training images); "
            "elsewhere give the list or an .npy of used indices (data/vqgan_indices/<dataset>_indices.npy)"
        )
    vq = load_first_stage(path, config=config, prefix=prefix)
    quantize = vq.quantize
    if not hasattr(quantize, "set_remap"):
        raise ValueError(f"{type(quantize).__name__} cannot be remapped")
    if isinstance(remap, (str, os.PathLike)) and not os.path.isfile(remap):
        raise FileNotFoundError(f"remap file not found: {os.fspath(remap)} (an .npy of the used codebook indices)")
    if isinstance(remap, Sequence) and not isinstance(remap, str):
        remap = list(remap)
    if remap is not None or quantize.remap is not None:
        quantize.set_remap(remap, unknown_index)
    return vq


def resolve_auto_remap(cfg) -> list[int] | None:
    """``module.first_stage.remap: auto`` -> the explicit list of codes the VQGAN uses on the datamodule's training
    images (written into ``cfg``, also returned); ``None`` when the config does not ask for it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, "module.first_stage")
    if node is None or OmegaConf.select(node, "remap") != "auto":
        return None
    vq = load_first_stage(node.path, config=node.get("config"), prefix=node.get("prefix"))
    dm = instantiate(cfg.datamodule)
    dm.setup("fit")
    loader = dm.train_dataloader()
    key = OmegaConf.select(cfg, "module.image_key") or "image"
    used = used_codes(vq, (b[key] for b in loader), total=len(loader))
    codes = [int(i) for i in used]
    log.info(
        "remap=auto: the first stage uses %d of its %d codes on the training images (the model's vocabulary K)",
        len(codes),
        vq.quantize.codebook().num_embeddings,
    )
    OmegaConf.update(cfg, "module.first_stage.remap", codes, force_add=True)
    return codes
