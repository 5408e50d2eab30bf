"""The ``ldm-sample``, ``ldm-inpaint``, ``ldm-superres`` and ``ldm-eval`` tasks (Hydra configs in ldm/configs).

Each loads a trained model from a run folder, an export folder or a genlab ``.ckpt`` — or an official LDM / SD v1
``.ckpt`` when ``official_config`` (its yaml) is given — and writes PNG grids / ``samples.npz`` / ``metrics.json``.
Test inputs for inpainting and super-resolution default to the Fashion-MNIST test split.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gencore import io, run
from gencore.viz import save_grid, to_uint8

log = logging.getLogger(__name__)

__all__ = ["evaluate", "inpaint", "load_model", "sample", "superres"]


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def load_model(cfg: Any) -> torch.nn.Module:
    """The model named by ``cfg.checkpoint`` (+ ``official_config``, ``clip_path``, ``use_ema``) on ``cfg.device``."""
    cfg = _cfg(cfg)
    device = run.pick_device(cfg.get("device", "auto"))
    if cfg.get("official_config"):
        from ldm.convert import load_ldm

        module = load_ldm(
            cfg.checkpoint,
            config=cfg.official_config,
            clip_path=cfg.get("clip_path"),
            use_ema=bool(cfg.get("use_ema", True)),
        )
    else:
        module = run.load_module(cfg.checkpoint, use_ema=bool(cfg.get("use_ema", True)))
    return module.to(device).eval()


def _sample_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.get("sample") or OmegaConf.create({}), resolve=True)
    return {k: v for k, v in kw.items() if v is not None}


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def sample(cfg: Any) -> Path:
    """``ldm-sample``: ``num_samples`` images (class ``labels`` / text ``captions`` cycled) -> grid.png, samples.npz."""
    cfg = _cfg(cfg)
    module = load_model(cfg)
    out = run.generate(
        module, int(cfg.num_samples), batch_size=int(cfg.batch_size), seed=int(cfg.seed), **_sample_kwargs(cfg)
    )
    out_dir = Path(str(cfg.out_dir))
    save_grid(out["images"][: int(cfg.grid_size)], out_dir / "grid.png", nrow=cfg.get("nrow"))
    arrays = {"images": to_uint8(out["images"]).numpy()}
    if "labels" in out:
        arrays["labels"] = np.asarray(out["labels"])
    if "captions" in out:
        arrays["captions"] = np.asarray(out["captions"])
    _write_npz(out_dir / "samples.npz", **arrays)
    log.info("wrote %s", out_dir)
    return out_dir


def _test_images(module: torch.nn.Module, n: int) -> torch.Tensor:
    from gencore.data import FashionMNIST

    channels = module.first_stage_model.in_channels
    ds = FashionMNIST(split="test", image_size=module.image_size, channels=channels, limit=n)
    return ds.tensors()[0]


def inpaint(cfg: Any) -> Path:
    """``ldm-inpaint``: fill random box holes in test images; grid rows: masked input, inpainted, original."""
    from ldm.conditioning import random_masks

    cfg = _cfg(cfg)
    module = load_model(cfg)
    torch.manual_seed(int(cfg.seed))
    images = _test_images(module, int(cfg.num_samples)).to(module.device)
    masks = random_masks(
        len(images), images.shape[-1], generator=torch.Generator().manual_seed(int(cfg.seed)), device=module.device
    )
    filled = torch.cat(
        [
            module.inpaint(
                images[i : i + int(cfg.batch_size)], masks[i : i + int(cfg.batch_size)], **_sample_kwargs(cfg)
            )
            for i in range(0, len(images), int(cfg.batch_size))
        ]
    )
    out_dir = Path(str(cfg.out_dir))
    n = min(len(images), 8)
    save_grid(
        torch.cat([images[:n] * (1 - masks[:n]) + masks[:n], filled[:n], images[:n]]), out_dir / "grid.png", nrow=n
    )
    hole = masks.expand_as(images) > 0
    err = (filled - images)[hole].square().mean().item()
    metrics = {"n": len(images), "hole_mse": err, "outside_changed": float((filled - images)[~hole].abs().max())}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out_dir


def superres(cfg: Any) -> Path:
    """``ldm-superres``: 4x upsample downsampled test images; grid rows: low-res (nearest), output, original."""
    from taming.lit import psnr

    cfg = _cfg(cfg)
    module = load_model(cfg)
    torch.manual_seed(int(cfg.seed))
    images = _test_images(module, int(cfg.num_samples)).to(module.device)
    f = module.sr_factor
    low = torch.nn.functional.avg_pool2d(images, f)
    bs = int(cfg.batch_size)
    out = torch.cat([module.superres(low[i : i + bs], **_sample_kwargs(cfg)) for i in range(0, len(low), bs)])
    bicubic = torch.nn.functional.interpolate(low, scale_factor=f, mode="bicubic").clamp(-1, 1)
    out_dir = Path(str(cfg.out_dir))
    n = min(len(images), 8)
    save_grid(
        torch.cat([torch.nn.functional.interpolate(low[:n], scale_factor=f), out[:n], images[:n]]),
        out_dir / "grid.png",
        nrow=n,
    )
    metrics = {
        "n": len(images),
        "psnr": float(psnr(out, images).mean()),
        "psnr_bicubic": float(psnr(bicubic, images).mean()),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out_dir


def evaluate(cfg: Any) -> dict[str, float]:
    """``ldm-eval``: an autoencoder's reconstructions (PSNR, FID-FMNIST) or a diffusion model's samples (FID-FMNIST,
    KID, precision / recall, class accuracy for class / text models, seconds per image)."""
    from gencore.metrics import fid_fmnist, fmnist_report
    from ldm.lit import AutoencoderKLModule, LatentDiffusion
    from taming.lit import psnr

    cfg = _cfg(cfg)
    module = load_model(cfg)
    n, bs = int(cfg.num_samples), int(cfg.batch_size)
    t0 = time.perf_counter()
    if isinstance(module, AutoencoderKLModule):
        from gencore.data import FashionMNIST

        enc = module.model.encoder
        images = (
            FashionMNIST(split="test", image_size=enc.resolution, channels=enc.in_channels, limit=n)
            .tensors()[0]
            .to(module.device)
        )
        with torch.no_grad():
            rec = torch.cat(
                [module(images[i : i + bs], sample_posterior=False)[0].clamp(-1, 1) for i in range(0, len(images), bs)]
            )
        metrics = {
            "n": float(len(rec)),
            "psnr": float(psnr(rec, images).mean()),
            "fid_fmnist": fid_fmnist(rec.cpu()),
            "seconds_per_image": (time.perf_counter() - t0) / len(rec),
        }
    elif isinstance(module, LatentDiffusion):
        kwargs = _sample_kwargs(cfg)
        if module.cond_kind == "class":
            kwargs.setdefault("labels", list(range(module.num_classes)))
        out = run.generate(module, n, batch_size=bs, seed=int(cfg.seed), **kwargs)
        seconds = (time.perf_counter() - t0) / n
        labels = out.get("labels") if module.cond_kind in ("class", "text") else None
        metrics = {**fmnist_report(out["images"], labels), "seconds_per_image": seconds}
    else:
        raise ValueError(f"ldm-eval: {cfg.checkpoint} holds a {type(module).__name__}, not an ldm model")
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    log.info("metrics: %s", metrics)
    return metrics
