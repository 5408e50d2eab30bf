"""ImageBART's first stage: a taming VQGAN whose indices are remapped to the codes it actually uses.

The official configs load the VQGAN with ``remap: data/vqgan_indices/<dataset>_indices.npy``: the sorted list of
codebook entries that occur on the training set (973 of 16,384 for ImageNet). The multinomial diffusion then runs
over K = that many codes (``quantize.re_embed``) instead of the whole codebook, so the uniform redraws never produce
codes the decoder has not learned to render. Here:

- :func:`used_codes` lists the codes a VQGAN picks on a set of images (what ``<dataset>_indices.npy`` holds);
- :func:`remapped_first_stage` (a Hydra target) loads a VQGAN (taming's :func:`~taming.first_stage.load_first_stage`:
  export / run folder, shipped ``pkg://`` checkpoint, genlab or official ``.ckpt``) and sets its remap: an
  ``.npy`` path (official), an explicit list, or ``None`` (the full codebook);
- :func:`resolve_auto_remap` turns ``remap: auto`` in a training config into the explicit list, computed on the
  training images before the run starts (so the run's ``config.yaml`` and its export carry the list and sampling
  never needs the data), once per VQGAN and data: listings are kept by fingerprint in genlab's cache folder, and the
  shipped VQGAN's listing on Fashion-MNIST ships with the package (``imagebart/remaps``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gencore.progress import Progress
from taming.first_stage import load_first_stage

__all__ = ["remap_fingerprint", "remapped_first_stage", "resolve_auto_remap", "used_codes"]

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


#: the listings shipped with the package (the equivalent of the official data/vqgan_indices/*.npy), by fingerprint
SHIPPED_REMAPS = Path(__file__).parent / "remaps"
_DATA_KEYS_IGNORED = ("batch_size", "num_workers", "limit_val", "val_fraction", "pin_memory", "persistent_workers")


def remap_fingerprint(vqgan: nn.Module, datamodule_cfg: Any, limit: int | None) -> str:
    """What a listing of used codes depends on: the VQGAN's encoder / quant_conv / codebook weights, and which training
    images (the datamodule config without its loader settings, the image count)."""
    from omegaconf import OmegaConf

    h = hashlib.sha256()
    for key, value in sorted(vqgan.state_dict().items()):
        if key.startswith(("encoder.", "quant_conv.", "quantize.embedding.")):
            h.update(key.encode())
            h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    data = OmegaConf.to_container(datamodule_cfg, resolve=True)
    data = {k: v for k, v in sorted(data.items()) if k not in _DATA_KEYS_IGNORED}
    h.update(json.dumps({"data": data, "limit": limit}, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _cached(fingerprint: str) -> tuple[list[int], Path] | None:
    from gencore.metrics.generative import cache_dir

    for folder in (SHIPPED_REMAPS, cache_dir() / "imagebart_remaps"):
        f = folder / f"{fingerprint}.json"
        if f.is_file():
            try:
                return [int(c) for c in json.loads(f.read_text())["codes"]], f
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable remap listing %s", f)
    return None


def resolve_auto_remap(cfg: Any) -> list[int] | None:
    """``module.first_stage.remap: auto`` -> the explicit list of codes the VQGAN uses on the datamodule's training
    images (the first ``cfg.remap_images`` of them; all with ``null``), written into ``cfg`` and returned; ``None``
    when the config does not ask for it. A listing is computed once per VQGAN and data (:func:`remap_fingerprint`)
    and kept in genlab's cache folder; the shipped VQGAN's listing on Fashion-MNIST ships in ``imagebart/remaps``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Subset

    from gencore import io
    from gencore.metrics.generative import cache_dir
    from gencore.validate import ConfigError

    node = OmegaConf.select(cfg, "module.first_stage")
    if node is None or OmegaConf.select(node, "remap") != "auto":
        return None
    try:
        vq = load_first_stage(node.path, config=node.get("config"), prefix=node.get("prefix"))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"module.first_stage: {err}") from err
    limit = cfg.get("remap_images")
    limit = None if limit is None else int(limit)
    fingerprint = remap_fingerprint(vq, cfg.datamodule, limit)
    found = _cached(fingerprint)
    if found is not None:
        codes, where = found
        log.info("remap=auto: %d used codes, listed earlier (%s)", len(codes), where)
    else:
        dm = instantiate(cfg.datamodule)
        dm.setup("fit")
        data = getattr(dm, "train_set", None)
        if data is None:
            raise ConfigError("remap=auto needs a datamodule with a train_set (the images whose codes are listed)")
        if limit is not None and limit < len(data):
            data = Subset(data, range(limit))
        loader = DataLoader(data, batch_size=500, shuffle=False, num_workers=0)
        key = OmegaConf.select(cfg, "module.image_key") or "image"
        codes = [int(i) for i in used_codes(vq, (b[key] for b in loader), total=len(loader))]
        log.info(
            "remap=auto: the first stage uses %d of its %d codes on %d training images (the model's vocabulary K)",
            len(codes),
            vq.quantize.codebook().num_embeddings,
            len(data),
        )
        record = {"codes": codes, "images": len(data), "first_stage": str(node.path), "fingerprint": fingerprint}
        target = cache_dir() / "imagebart_remaps" / f"{fingerprint}.json"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with io.atomic_path(target) as tmp:
                tmp.write_text(json.dumps(record))
        except OSError as err:  # a read-only cache only costs the listing next time
            log.warning("could not keep the remap listing in %s: %s", target, err)
    OmegaConf.update(cfg, "module.first_stage.remap", codes, force_add=True)
    return codes
