"""``sd3-sample`` (prompts from the command line or a prompt file) and ``sd3-eval`` (FID-FMNIST etc. at several
sampler step counts) over a trained :class:`sd3_flow.lit.RectifiedFlowModule`, on :mod:`gencore.run` (one process,
or split over the processes of ``torchrun`` / ``accelerate launch``, written by the main one)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gencore import run
from gencore.viz import to_uint8

log = logging.getLogger(__name__)

__all__ = ["evaluate", "read_prompts", "sample", "sample_request", "write_images"]


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def _sample_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.sample`` as ``generate`` keyword arguments; ``None`` values dropped ("the model's default")."""
    kwargs = OmegaConf.to_container(cfg.get("sample") or OmegaConf.create({}), resolve=True)
    assert isinstance(kwargs, dict)
    if "steps" in kwargs:
        raise ValueError("sample.steps is now sample.num_steps")
    return {k: v for k, v in kwargs.items() if v is not None}


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


def sample_request(cfg: DictConfig, module: torch.nn.Module | None = None) -> tuple[int, dict[str, Any]]:
    """(number of samples, ``generate`` keyword arguments) of an ``sd3-sample`` config: ``prompts_file`` or
    ``prompts`` (each ``num_per_prompt`` times in a row), else class ``labels`` (default: the ten Fashion-MNIST
    classes) cycled ``num_per_prompt`` times; ``num_samples``, when given, overrides the count (prompts or labels
    cycled to it); ``sample`` holds the sampler settings (``None``: the model's default)."""
    kwargs = _sample_kwargs(cfg)
    per = int(cfg.get("num_per_prompt", 1))
    if per < 1:
        raise ValueError(f"num_per_prompt must be >= 1, got {per}")
    if cfg.get("prompts_file"):
        prompts = read_prompts(cfg.prompts_file)
    elif cfg.get("prompts"):
        if isinstance(cfg.prompts, str):
            raise ValueError('prompts must be a list of strings, e.g. prompts=["a photo of a bag"]')
        prompts = [str(p) for p in cfg.prompts]
    else:
        prompts = None
    if prompts is not None:
        kwargs["captions"] = [p for p in prompts for _ in range(per)]
        count = len(kwargs["captions"])
    else:
        labels = [int(c) for c in cfg.labels] if cfg.get("labels") is not None else list(range(10))
        if not labels:
            raise ValueError("labels is empty")
        kwargs["labels"] = labels
        count = len(labels) * per
    if cfg.get("num_samples") is not None:
        count = int(cfg.num_samples)
        if count < 1:
            raise ValueError(f"num_samples must be >= 1, got {count}")
    return count, kwargs


def write_images(out: dict[str, Any], out_dir: Path, cfg: DictConfig | None = None) -> None:
    """Every image as ``<index>.png`` and the captions, one per line, as ``prompts.txt`` (beside ``grid.png`` and
    ``samples.npz``)."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = to_uint8(out["images"]).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    for i, img in enumerate(images):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out_dir / f"{i:05d}.png")
    if out.get("captions") is not None:
        (out_dir / "prompts.txt").write_text("\n".join(out["captions"]) + "\n")


def sample(cfg: Any) -> Path:
    """Images for ``prompts`` / ``prompts_file`` (each ``num_per_prompt`` times) or class ``labels``: ``grid.png``,
    ``samples.npz``, one PNG per image and ``prompts.txt`` in ``out_dir`` (returned)."""
    return run.sample(_cfg(cfg), request=sample_request, write=write_images)


def evaluate(cfg: Any) -> dict[str, dict[str, float]]:
    """Sample metrics on Fashion-MNIST captions (the ten classes in turn) for each step count in ``cfg.num_steps``
    (a list, or one number; default: the model's), ``{"steps_<S>": {fid, ..., seconds_per_image}}``, written to
    ``out_dir/metrics.json`` by the main process (the others return ``{}``)."""
    from gencore.metrics import fmnist_report

    cfg = _cfg(cfg)
    if cfg.get("steps") is not None:
        raise ValueError("steps is now num_steps (e.g. num_steps=[5,10,25])")
    run.check_sample_config(cfg)  # counts, checkpoint, device: before anything loads
    kwargs = _sample_kwargs(cfg)
    state = run.process_state(cfg.get("device", "auto"))
    module = run.load_for_sampling(cfg, run.task_device(cfg, state))
    counts = cfg.get("num_steps")
    if counts is None:
        counts = [kwargs.get("num_steps", module.sample_kwargs["num_steps"])]
    elif isinstance(counts, int | str):
        counts = [counts]
    n = int(cfg.num_samples)
    results: dict[str, dict[str, float]] = {}
    for steps in (int(s) for s in counts):
        t0 = time.perf_counter()
        out = run.generate_sharded(
            module,
            n,
            batch_size=int(cfg.batch_size),
            seed=int(cfg.seed),
            labels=list(range(10)),
            **{**kwargs, "num_steps": steps},
        )
        if out is None:  # not the main process
            continue
        seconds = (time.perf_counter() - t0) / n
        results[f"steps_{steps}"] = {**fmnist_report(out["images"], out["labels"]), "seconds_per_image": seconds}
        log.info("%d steps: %s", steps, results[f"steps_{steps}"])
    if state.is_main_process:
        run.write_metrics(results, Path(str(cfg.out_dir)))
    return results
