"""``ladd-synth`` (synthetic teacher latents), ``ladd-eval`` (the student at its step counts against its teacher);
``ladd-sample`` is sd3_flow's sample task (the same command-line shape: prompts, prompts_file, labels, num_samples)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gencore import run

log = logging.getLogger(__name__)

__all__ = ["evaluate", "synth"]


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def synth(cfg: Any) -> Path:
    """The teacher's guided samples for the prompts (or, for an inpainting / editing teacher, for the items of the
    ``source`` dataset node) as a synthetic latent cache in ``out_dir``."""
    from hydra.utils import instantiate

    from gencore.io import check_targets, resolve_path
    from ladd_turbo.data import prompt_list
    from ladd_turbo.lit import load_teacher
    from ladd_turbo.synth import synthesize

    cfg = _cfg(cfg)
    if cfg.get("teacher") is None or not resolve_path(str(cfg.teacher)).exists():
        raise FileNotFoundError(f"teacher: {cfg.get('teacher')} does not exist (an sd3-train run or export)")
    source = cfg.get("source")
    dataset = instantiate(check_targets(source, key="source")) if source is not None else None
    prompts = None if dataset is not None else prompt_list(cfg.get("prompts_file"), cfg.get("prompts"))
    state = run.process_state(cfg.get("device", "auto"))
    teacher = load_teacher(str(cfg.teacher)).to(state.device)
    s = cfg.get("sample") or {}
    out = synthesize(
        teacher,
        prompts,
        Path(str(cfg.out_dir)),
        dataset=dataset,
        num_samples=cfg.get("num_samples"),
        num_per_prompt=int(cfg.num_per_prompt),
        guidance_scale=float(s.get("guidance_scale", 4.0)),
        num_steps=int(s.get("num_steps", 28)),
        shift=float(s.get("shift", 1.0)),
        batch_size=int(cfg.batch_size),
        shard_size=int(cfg.shard_size),
        seed=int(cfg.seed),
    )
    if state.is_main_process:
        log.info("train on it: ladd-train teacher=%s datamodule.path=%s", cfg.teacher, out)
    return out


def evaluate(cfg: Any) -> dict[str, dict[str, float]]:
    """FID-FMNIST / KID / precision-recall / class accuracy and seconds per image of the student at each of
    ``num_steps`` (unguided), and of its teacher for each ``teacher_rows`` entry (``{num_steps, guidance_scale}``),
    on the ten Fashion-MNIST captions in turn: ``{"student_<S>": {...}, "teacher_<S>_cfg<g>": {...}}`` in
    ``out_dir/metrics.json``."""
    from gencore.metrics import fmnist_report

    cfg = _cfg(cfg)
    run.check_sample_config(cfg)
    state = run.process_state(cfg.get("device", "auto"))
    device = run.task_device(cfg, state)
    module = run.load_for_sampling(cfg, device)
    n, batch = int(cfg.num_samples), int(cfg.batch_size)
    rows: list[tuple[str, Any, dict[str, Any]]] = []
    counts = cfg.get("num_steps")
    counts = [module.num_steps] if counts is None else ([counts] if isinstance(counts, int) else list(counts))
    rows += [(f"student_{int(s)}", module, {"num_steps": int(s)}) for s in counts]
    for row in cfg.get("teacher_rows") or []:
        steps, g = int(row.num_steps), float(row.guidance_scale)
        rows.append((f"teacher_{steps}_cfg{g:g}", module.teacher, {"num_steps": steps, "guidance_scale": g}))
    results: dict[str, dict[str, float]] = {}
    run.generate(module, 2, batch_size=2, labels=[0, 1], num_steps=1)  # warm-up: the first row's time is not start-up
    for name, model, kwargs in rows:
        t0 = time.perf_counter()
        out = run.generate_sharded(model, n, batch_size=batch, seed=int(cfg.seed), labels=list(range(10)), **kwargs)
        if out is None:
            continue
        results[name] = {
            **fmnist_report(out["images"], out["labels"]),
            "seconds_per_image": (time.perf_counter() - t0) / n,
        }
        log.info("%s: %s", name, results[name])
    if state.is_main_process:
        run.write_metrics(results, Path(str(cfg.out_dir)))
    return results
