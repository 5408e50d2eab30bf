"""The ``taming-sample`` and ``taming-eval`` tasks (Hydra configs in taming/configs), on Fashion-MNIST.

- :func:`sample`: images from a trained transformer (:func:`gencore.run.sample`: ``grid.png`` and ``samples.npz``
  with the labels of class-conditional samples).
- :func:`evaluate`: for a VQGAN / VQ-VAE (a :class:`~taming.lit.VQGANModule` run), reconstructions of the first
  ``num_samples`` test images -> PSNR, FID-FMNIST of the reconstructions against the 10,000 test images, codebook
  usage (perplexity, share of codes used, dead codes), and LPIPS when VGG16 weights are given; for a transformer
  (:class:`~taming.lit.Net2NetTransformer`), ``num_samples`` samples (with what the conditioner asks for by
  default: class models cycle through their classes) -> FID-FMNIST, KID, precision / recall, and class accuracy for
  class-conditional models. Under ``torchrun`` / ``accelerate launch`` the samples are split over the processes
  (:func:`gencore.run.generate_sharded`) and the main process scores them.

Both write to ``out_dir`` (``metrics.json`` for the evaluation) and return their value (the folder, the metrics).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gencore import run
from gencore.data import FashionMNIST
from gencore.metrics import fid_fmnist, fmnist_report, psnr
from taming.lit import Net2NetTransformer, VQGANModule
from taming.models.quantize import codebook_usage

__all__ = ["evaluate", "evaluate_reconstructions", "evaluate_samples", "sample"]


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def sample(cfg: Any) -> Path:
    """``taming-sample``: ``num_samples`` images of the transformer at ``cfg.checkpoint`` (``sample.labels`` cycled for
    class models, ``sample.image_size`` for larger images) -> ``out_dir``; returns ``out_dir``."""
    return run.sample(cfg)


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
) -> dict[str, float] | None:
    """FID-FMNIST / KID / precision-recall (/ class accuracy) of ``num_samples`` transformer samples. The requested
    labels (the conditioner's default request: every class in turn for class models) are the classes the samples
    are scored against. ``None`` on the processes other than the main one of a distributed launch."""
    kwargs = {**module.cond_stage_model.evaluation_request(), **sample_kwargs}
    t0 = time.perf_counter()
    out = run.generate_sharded(module, num_samples, batch_size=batch_size, seed=seed, **kwargs)
    if out is None:
        return None
    seconds = time.perf_counter() - t0
    labels = out.get("labels") if kwargs.get("labels") is not None else None
    report = fmnist_report(out["images"], labels)
    report["seconds_per_image"] = seconds / num_samples
    return report


def evaluate(cfg: Any) -> dict[str, float]:
    """``taming-eval``: the metrics of the VQGAN or transformer at ``cfg.checkpoint``, written to
    ``out_dir/metrics.json`` (default ``<checkpoint>/eval``) and returned (``{}`` on the processes other than the
    main one of a distributed launch)."""
    cfg = _cfg(cfg)
    run.check_sample_config(cfg)  # counts, checkpoint, device: before anything loads
    missing = [k for k in ("checkpoint", "num_samples", "batch_size") if cfg.get(k) is None]
    if missing:
        raise ValueError(f"taming-eval: config is missing {', '.join(missing)} (see taming/configs/eval.yaml)")
    state = run.process_state(cfg.get("device"))
    device = run.task_device(cfg, state)
    module = run.load_module(cfg.checkpoint, use_ema=cfg.get("use_ema", True)).to(device)
    n, bs = int(cfg.num_samples), int(cfg.batch_size)
    if isinstance(module, VQGANModule):
        metrics = evaluate_reconstructions(module, n, bs, cfg.get("lpips_weights")) if state.is_main_process else None
    elif isinstance(module, Net2NetTransformer):
        _, kwargs = run.sample_request(cfg, module)
        metrics = evaluate_samples(module, n, bs, int(cfg.get("seed", 0)), **kwargs)
    else:
        run.check_module_package(module, cfg.checkpoint)  # another package's model: which command fits
        raise ValueError(f"{cfg.checkpoint} holds a {type(module).__name__}, not a taming model")
    if metrics is None:
        return {}
    run.write_metrics(metrics, Path(str(cfg.get("out_dir") or Path(str(cfg.checkpoint)) / "eval")))
    return metrics
