"""The ``ldm-sample``, ``ldm-inpaint``, ``ldm-superres`` and ``ldm-eval`` tasks (Hydra configs in ldm/configs).

Each loads a trained model from a run folder, an export folder or a genlab ``.ckpt`` — or an official LDM / SD v1
``.ckpt`` when ``official_config`` (its yaml) is given — and writes PNG grids / ``samples.npz`` / ``metrics.json``
through :mod:`gencore.run`; each returns its value (the output folder, or the metrics). Test inputs for inpainting and
super-resolution default to the Fashion-MNIST test split.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gencore import run
from gencore.viz import save_grid

log = logging.getLogger(__name__)

__all__ = ["evaluate", "inpaint", "load_model", "sample", "superres"]


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def load_model(cfg: Any, device: torch.device | str | None = None) -> torch.nn.Module:
    """The model named by ``cfg.checkpoint`` (+ ``official_config``, ``clip_path``, ``use_ema``) on ``device``
    (default: :func:`_device`), in eval mode; the ``load`` of :func:`gencore.run.sample`."""
    cfg = _cfg(cfg)
    device = run.task_device(cfg) if device is None else torch.device(device)
    if not cfg.get("official_config"):
        return run.load_for_sampling(cfg, device)
    from ldm.convert import load_ldm

    module = load_ldm(
        cfg.checkpoint,
        config=cfg.official_config,
        clip_path=cfg.get("clip_path"),
        use_ema=bool(cfg.get("use_ema", True)),
    )
    return module.to(device).eval()


def sample(cfg: Any) -> Path:
    """``ldm-sample``: ``num_samples`` images (class ``labels`` / text ``captions`` cycled) -> grid.png, samples.npz
    (:func:`gencore.run.sample`, sharded over the processes of a distributed launch)."""
    return run.sample(_cfg(cfg), load=load_model)


def _test_images(module: torch.nn.Module, n: int) -> torch.Tensor:
    from gencore.data import FashionMNIST

    channels = module.first_stage_model.in_channels
    ds = FashionMNIST(split="test", image_size=module.image_size, channels=channels, limit=n)
    return ds.tensors()[0]


def _batches(fn: Any, inputs: tuple[torch.Tensor, ...], batch_size: int, **kwargs: Any) -> torch.Tensor:
    n = len(inputs[0])
    return torch.cat([fn(*(x[i : i + batch_size] for x in inputs), **kwargs) for i in range(0, n, batch_size)])


def inpaint(cfg: Any) -> Path:
    """``ldm-inpaint``: fill random box holes in test images; grid rows: masked input, inpainted, original."""
    from ldm.conditioning import random_masks

    cfg = _cfg(cfg)
    run.check_sample_config(cfg)  # counts, checkpoint, device: before anything loads
    module = load_model(cfg)
    _, opts = run.sample_request(cfg, module)
    torch.manual_seed(int(cfg.seed))
    images = _test_images(module, int(cfg.num_samples)).to(module.device)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    masks = random_masks(len(images), images.shape[-1], generator=generator, device=module.device)
    filled = _batches(module.inpaint, (images, masks), int(cfg.batch_size), **opts)
    out_dir = Path(str(cfg.out_dir))
    n = min(len(images), 8)
    rows = torch.cat([images[:n] * (1 - masks[:n]) + masks[:n], filled[:n], images[:n]])
    save_grid(rows, out_dir / "grid.png", nrow=n)
    hole = masks.expand_as(images) > 0
    metrics = {
        "n": len(images),
        "hole_mse": float((filled - images)[hole].square().mean()),
        "outside_changed": float((filled - images)[~hole].abs().max()),
    }
    run.write_metrics(metrics, out_dir)
    return out_dir


def superres(cfg: Any) -> Path:
    """``ldm-superres``: upsample downsampled test images by the model's ``sr_factor``; grid rows: low-res
    (nearest), output, original; metrics: PSNR, and bicubic's for reference."""
    from gencore.metrics import psnr

    cfg = _cfg(cfg)
    run.check_sample_config(cfg)  # counts, checkpoint, device: before anything loads
    module = load_model(cfg)
    f = module.cond_stage_model.sr_factor
    if f is None:
        raise ValueError(
            f"ldm-superres: {cfg.checkpoint} is not a super-resolution model (no LowResolutionConditioner)"
        )
    _, opts = run.sample_request(cfg, module)
    torch.manual_seed(int(cfg.seed))
    images = _test_images(module, int(cfg.num_samples)).to(module.device)
    low = torch.nn.functional.avg_pool2d(images, f)
    out = _batches(module.superres, (low,), int(cfg.batch_size), **opts)
    bicubic = torch.nn.functional.interpolate(low, scale_factor=f, mode="bicubic").clamp(-1, 1)
    out_dir = Path(str(cfg.out_dir))
    n = min(len(images), 8)
    rows = torch.cat([torch.nn.functional.interpolate(low[:n], scale_factor=f), out[:n], images[:n]])
    save_grid(rows, out_dir / "grid.png", nrow=n)
    metrics = {
        "n": len(images),
        "psnr": float(psnr(out, images).mean()),
        "psnr_bicubic": float(psnr(bicubic, images).mean()),
    }
    run.write_metrics(metrics, out_dir)
    return out_dir


def evaluate(cfg: Any) -> dict[str, float]:
    """``ldm-eval``: an autoencoder's reconstructions (PSNR, FID-FMNIST) or a diffusion model's samples (FID-FMNIST,
    KID, precision / recall, class accuracy for class / text models, seconds per image). Under a distributed launch
    every process samples its share (:func:`gencore.run.generate_sharded`) and the main process scores and writes
    (the others return ``{}``)."""
    from gencore.metrics import fid_fmnist, fmnist_report, psnr
    from ldm.lit import AutoencoderKLModule, LatentDiffusion

    cfg = _cfg(cfg)
    run.check_sample_config(cfg)  # counts, checkpoint, device: before anything loads
    module = load_model(cfg)
    n, bs = int(cfg.num_samples), int(cfg.batch_size)
    t0 = time.perf_counter()
    if isinstance(module, AutoencoderKLModule):
        if not run.process_state(module.device).is_main_process:
            return {}
        from gencore.data import FashionMNIST

        enc = module.model.encoder
        data = FashionMNIST(split="test", image_size=enc.resolution, channels=enc.in_channels, limit=n)
        images = data.tensors()[0].to(module.device)
        with torch.no_grad():
            rec = _batches(lambda x: module(x, sample_posterior=False)[0].clamp(-1, 1), (images,), bs)
        metrics = {
            "n": float(len(rec)),
            "psnr": float(psnr(rec, images).mean()),
            "fid_fmnist": fid_fmnist(rec.cpu()),
            "seconds_per_image": (time.perf_counter() - t0) / len(rec),
        }
        from gencore.viz import save_panels

        k = min(40, len(rec))  # a picture of the first test images and their reconstructions, side by side
        panels = [
            ("test images", images[:k].cpu()),
            (f"reconstructions (PSNR {metrics['psnr']:.1f} dB)", rec[:k].cpu()),
        ]
        Path(str(cfg.out_dir)).mkdir(parents=True, exist_ok=True)
        save_panels(panels, Path(str(cfg.out_dir)) / "reconstructions.png", nrow=min(10, k), scale=2)
    elif isinstance(module, LatentDiffusion):
        num_samples, kwargs = run.sample_request(cfg, module)
        kwargs = {**module.cond_stage_model.evaluation_request(), **kwargs}  # e.g. every class in turn
        out = run.generate_sharded(module, num_samples, batch_size=bs, seed=int(cfg.seed), **kwargs)
        if out is None:
            return {}
        seconds = (time.perf_counter() - t0) / num_samples
        metrics = {**fmnist_report(out["images"], out.get("labels")), "seconds_per_image": seconds}
    else:
        run.check_module_package(module, cfg.checkpoint)  # another package's model: which command fits
        raise ValueError(f"{cfg.checkpoint} holds a {type(module).__name__}, not an ldm model")
    run.write_metrics(metrics, Path(str(cfg.out_dir)))
    return metrics
