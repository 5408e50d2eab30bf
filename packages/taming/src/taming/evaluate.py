"""``taming-eval``: reconstruction metrics of a VQGAN, or sample metrics of a transformer, on Fashion-MNIST.

- VQGAN / VQ-VAE (a :class:`~taming.lit.VQGANModule` run): reconstructions of the first ``num_samples`` test images
  -> PSNR, FID-FMNIST of the reconstructions against the 10,000 test images, codebook usage (perplexity, share of
  codes used, dead codes), and LPIPS when VGG16 weights are given.
- Transformer (:class:`~taming.lit.Net2NetTransformer`): ``num_samples`` samples (class models cycle through the ten
  classes) -> FID-FMNIST, KID, precision / recall, and class accuracy for class-conditional models.

Writes ``metrics.json`` to ``out_dir`` and returns the dict.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gencore import io, run
from gencore.data import FashionMNIST
from gencore.metrics import fid_fmnist, fmnist_report
from taming.lit import Net2NetTransformer, VQGANModule, psnr
from taming.models.quantize import codebook_usage

log = logging.getLogger(__name__)

__all__ = ["evaluate", "evaluate_reconstructions", "evaluate_samples"]


@torch.no_grad()
def evaluate_reconstructions(
    module: VQGANModule, num_images: int = 10_000, batch_size: int = 100, lpips_weights: str | None = None
) -> dict[str, float]:
    """PSNR / FID-FMNIST / codebook usage (/ LPIPS) of reconstructions of Fashion-MNIST test images."""
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2, got {num_images}")
    enc = module.model.encoder
    ds = FashionMNIST(split="test", image_size=enc.resolution, channels=enc.in_channels, limit=num_images)
    images, _ = ds.tensors()
    recs, idx = [], []
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        x = module._to_input(images[i : i + batch_size].to(module.device))
        rec, _, indices = module(x)
        recs.append(rec.clamp(-1, 1).cpu())
        idx.append(indices.cpu())
    seconds = time.perf_counter() - t0
    rec = torch.cat(recs)
    target = module._to_input(images)
    usage = codebook_usage(torch.cat(idx), module.model.vocab_size)
    out = {
        "n": float(len(rec)),
        "psnr": float(psnr(rec, target).mean()),
        "perplexity": float(usage["perplexity"]),
        "codebook_used": float(usage["used_fraction"]),
        "dead_codes": float(usage["dead_codes"]),
        "seconds_per_image": seconds / len(rec),
    }
    if module.condition is None:
        out["fid_fmnist"] = fid_fmnist(rec)
    if lpips_weights:
        from gencore.metrics import lpips_metric

        metric = lpips_metric("vgg", weights_path=lpips_weights)
        expand = (lambda t: t.expand(-1, 3, -1, -1)) if rec.shape[1] == 1 else (lambda t: t)
        out["lpips"] = float(
            sum(
                metric(expand(rec[i : i + batch_size]), expand(target[i : i + batch_size]))
                * len(rec[i : i + batch_size])
                for i in range(0, len(rec), batch_size)
            )
            / len(rec)
        )
    return out


@torch.no_grad()
def evaluate_samples(
    module: Net2NetTransformer, num_samples: int = 1000, batch_size: int = 100, seed: int = 0, **sample_kwargs: Any
) -> dict[str, float]:
    """FID-FMNIST / KID / precision-recall (/ class accuracy) of ``num_samples`` transformer samples."""
    if module.cond_kind == "class":
        sample_kwargs.setdefault("labels", list(range(module.cond_stage_model.n_classes)))
    t0 = time.perf_counter()
    out = run.generate(module, num_samples, batch_size=batch_size, seed=seed, **sample_kwargs)
    seconds = time.perf_counter() - t0
    labels = out.get("labels") if module.cond_kind == "class" else None
    report = fmnist_report(out["images"], labels)
    report["seconds_per_image"] = seconds / num_samples
    return report


def evaluate(cfg: DictConfig | dict) -> dict[str, float]:
    cfg = OmegaConf.create(cfg) if not isinstance(cfg, DictConfig) else cfg
    device = run.pick_device(cfg.get("device", "auto"))
    module = run.load_module(cfg.checkpoint, use_ema=cfg.get("use_ema", True)).to(device)
    n, bs = int(cfg.get("num_samples", 1000)), int(cfg.get("batch_size", 100))
    if isinstance(module, VQGANModule):
        metrics = evaluate_reconstructions(module, n, bs, cfg.get("lpips_weights"))
    elif isinstance(module, Net2NetTransformer):
        kwargs = OmegaConf.to_container(cfg.get("sample") or OmegaConf.create({}), resolve=True)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        metrics = evaluate_samples(module, n, bs, int(cfg.get("seed", 0)), **kwargs)
    else:
        raise ValueError(f"taming-eval: {cfg.checkpoint} holds a {type(module).__name__}, not a taming model")
    out = Path(str(cfg.get("out_dir") or Path(str(cfg.checkpoint)) / "eval"))
    out.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    log.info("metrics: %s", metrics)
    return metrics
