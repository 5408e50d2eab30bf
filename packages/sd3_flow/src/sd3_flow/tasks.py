"""``sd3-sample`` (prompts from the command line or a prompt file) and ``sd3-eval`` (FID-FMNIST etc. at several
sampler step counts) over a trained :class:`sd3_flow.lit.RectifiedFlowModule`."""

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

__all__ = ["evaluate", "read_prompts", "sample"]


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def _sample_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.get("sample") or OmegaConf.create({}), resolve=True)
    return {k: v for k, v in kw.items() if v is not None}


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompt file (``#`` starts a comment line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    prompts = [line.strip() for line in p.read_text().splitlines()]
    prompts = [q for q in prompts if q and not q.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {p} holds no prompts")
    return prompts


def _load(cfg: DictConfig) -> torch.nn.Module:
    device = run.pick_device(cfg.get("device", "auto"))
    return run.load_module(cfg.checkpoint, use_ema=bool(cfg.get("use_ema", True))).to(device).eval()


def sample(cfg: Any) -> Path:
    """Images for ``prompts`` / ``prompts_file`` (each ``num_per_prompt`` times) or class ``labels``."""
    cfg = _cfg(cfg)
    module = _load(cfg)
    kwargs = _sample_kwargs(cfg)
    if cfg.get("prompts_file"):
        prompts = read_prompts(cfg.prompts_file)
    elif cfg.get("prompts"):
        prompts = [str(p) for p in cfg.prompts]
    else:
        prompts = None
    per = int(cfg.get("num_per_prompt", 1))
    if prompts is not None:
        captions = [p for p in prompts for _ in range(per)]
        out = run.generate(
            module, len(captions), batch_size=int(cfg.batch_size), seed=int(cfg.seed), captions=captions, **kwargs
        )
    else:
        labels = list(cfg.labels) if cfg.get("labels") is not None else list(range(10))
        out = run.generate(
            module, len(labels) * per, batch_size=int(cfg.batch_size), seed=int(cfg.seed), labels=labels, **kwargs
        )
    out_dir = Path(str(cfg.out_dir))
    save_grid(out["images"][: int(cfg.grid_size)], out_dir / "grid.png", nrow=cfg.get("nrow"))
    from PIL import Image

    images = to_uint8(out["images"]).permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out_dir / f"{i:05d}.png")
    arrays = {"images": to_uint8(out["images"]).numpy(), "captions": np.asarray(out["captions"])}
    if "labels" in out:
        arrays["labels"] = np.asarray(out["labels"])
    with io.atomic_path(out_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    (out_dir / "prompts.txt").write_text("\n".join(out["captions"]) + "\n")
    log.info("wrote %d images to %s", len(images), out_dir)
    return out_dir


def evaluate(cfg: Any) -> dict[str, dict[str, float]]:
    """Sample metrics on Fashion-MNIST captions (the ten classes in turn) for each step count in ``cfg.steps``."""
    from gencore.metrics import fmnist_report

    cfg = _cfg(cfg)
    module = _load(cfg)
    kwargs = _sample_kwargs(cfg)
    steps = [int(s) for s in (cfg.get("steps") or [kwargs.get("steps", 28)])]
    n = int(cfg.num_samples)
    results: dict[str, dict[str, float]] = {}
    for s in steps:
        t0 = time.perf_counter()
        out = run.generate(
            module,
            n,
            batch_size=int(cfg.batch_size),
            seed=int(cfg.seed),
            labels=list(range(10)),
            **{**kwargs, "steps": s},
        )
        seconds = (time.perf_counter() - t0) / n
        results[f"steps_{s}"] = {**fmnist_report(out["images"], out["labels"]), "seconds_per_image": seconds}
        log.info("%d steps: %s", s, results[f"steps_{s}"])
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    return results
