"""``make demo`` / ``ladd-demo``: genlab's flagship chain from the shipped checkpoints, in about a minute on 2 cores.

Fashion-MNIST text-to-image: the 16-channel autoencoder (ldm) -> the MMDiT rectified-flow teacher (sd3_flow) -> its
LADD 4-step student (ladd_turbo). The teacher samples with 28 guided Euler steps, the student with 4 unguided ones,
from the same prompts and the same initial noise; both are scored on ``num_samples`` images (the ten class captions
in turn) with FID-FMNIST, class accuracy and seconds per image. Written to ``out_dir``:

- ``grid.png``: teacher | student side by side, one column per class prompt, one row per seed;
- ``prompt.png`` (with ``prompt=``): the same for the user's prompt, and what the classifier sees in it;
- ``samples.npz``: ``teacher_images`` / ``student_images`` (uint8, N x 1 x 28 x 28) and ``*_labels`` (the class id
  each was prompted with), for anyone to re-score; ``metrics.json``; ``summary.txt`` (what the terminal showed).

``student=`` takes any ladd-train run or export (``make demo-train`` passes its own), ``teacher=`` any sd3-train
run or export (default: the student's own teacher).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["demo", "summary_lines"]


def _timed_samples(model: Any, n: int, *, batch_size: int, seed: int, **kwargs: Any) -> tuple[dict[str, Any], float]:
    from gencore import run

    t0 = time.perf_counter()
    out = run.generate(model, n, batch_size=batch_size, seed=seed, labels=list(range(10)), **kwargs)
    return out, (time.perf_counter() - t0) / n


def summary_lines(metrics: dict[str, dict[str, float]], n: int, out_dir: Path) -> list[str]:
    """The terminal summary: one row per model (FID-FMNIST, class accuracy, seconds per image, speed-up)."""
    teacher, student = metrics["teacher"], metrics["student"]
    threads = torch.get_num_threads()
    lines = [
        "genlab demo: Fashion-MNIST text-to-image, autoencoder (ldm) -> MMDiT rectified flow (sd3_flow) -> "
        "LADD student (ladd_turbo)",
        f"{'':40s}{'FID-FMNIST':>11s}{'class acc':>11s}{'s / image':>11s}",
    ]
    for row in (teacher, student):
        lines.append(
            f"{row['label']:40s}{row['fid']:11.2f}{row['class_accuracy']:11.3f}{row['seconds_per_image']:11.4f}"
        )
    lines.append(
        f"student is {teacher['seconds_per_image'] / student['seconds_per_image']:.1f}x faster; {n} samples each "
        f"(the ten class prompts in turn), {threads} CPU thread{'s' if threads > 1 else ''}"
        + (f"; FID at N={n} reads higher than at the README's N=1,000" if n < 1000 else "")
    )
    files = ["grid.png", "samples.npz", "metrics.json", "summary.txt"] + (["prompt.png"] if "prompt" in metrics else [])
    lines.append(f"wrote {out_dir}/: {', '.join(files)}")
    if "prompt" in metrics:
        p = metrics["prompt"]
        seen = f"teacher: {p['teacher_seen']}; student: {p['student_seen']}"
        lines.append(f"prompt {p['text']!r}: the classifier sees, {seen}")
    return lines


def _seen(images: torch.Tensor) -> str:
    """``"sneaker 7/8, sandal 1/8"``: what the Fashion-MNIST classifier calls the images."""
    from gencore.data.fashion_mnist import CAPTION_NOUNS
    from gencore.metrics import classify_fmnist

    counts = torch.bincount(classify_fmnist(images), minlength=10)
    order = [int(i) for i in counts.argsort(descending=True) if counts[i] > 0]
    return ", ".join(f"{CAPTION_NOUNS[i]} {int(counts[i])}/{len(images)}" for i in order)


def demo(cfg: Any) -> dict[str, Any]:
    """Run the demo for the config (see ``configs/demo.yaml``); returns the metrics written to ``metrics.json``
    (``summary``: the lines ``ladd-demo`` prints, also in ``summary.txt``)."""
    from gencore import io, run
    from gencore.data.fashion_mnist import CLASS_NAMES
    from gencore.metrics import fmnist_report
    from gencore.viz import save_panels, to_uint8
    from ladd_turbo.lit import load_teacher

    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    n, rows, seed, batch = int(cfg.num_samples), int(cfg.grid_rows), int(cfg.seed), int(cfg.batch_size)
    if n < 10 or rows < 1:
        raise ValueError(f"demo: num_samples must be >= 10 (one per class prompt) and grid_rows >= 1, got {n}, {rows}")
    rows = min(rows, n // 10)  # the grid shows the first samples: one row per seed
    t_s, t_g, s_s = int(cfg.teacher_steps), float(cfg.guidance_scale), int(cfg.student_steps)
    if s_s < 1 or t_s < 1:
        raise ValueError(f"demo: student_steps and teacher_steps must be >= 1, got {s_s} and {t_s}")
    device = run.pick_device(cfg.get("device", "auto"))
    t_start = time.perf_counter()
    log.info("demo [1/4]: loading the student %s and its teacher", cfg.student)
    student = run.load_module(str(cfg.student)).to(device).eval()
    if not hasattr(student, "teacher") or not hasattr(student, "sigmas"):
        raise ValueError(f"demo: student={cfg.student} is not a ladd-train run or export (no LADD student in it)")
    if s_s > student.num_steps:
        raise ValueError(f"demo: student_steps must be in 1..{student.num_steps} (its training steps), got {s_s}")
    teacher = student.teacher if cfg.get("teacher") in (None, "") else load_teacher(str(cfg.teacher)).to(device)
    run.generate(student, 2, batch_size=2, labels=[0, 1], num_steps=1)  # warm-up: the timings are not start-up

    label_t = f"teacher: {t_s} Euler steps, guidance {t_g:g}"
    label_s = f"student: {s_s} step{'s' if s_s > 1 else ''}, unguided"
    log.info("demo [2/4]: %s, %d samples", label_t, n)
    t_out, t_sec = _timed_samples(teacher, n, batch_size=batch, seed=seed, num_steps=t_s, guidance_scale=t_g)
    log.info("demo [3/4]: %s, %d samples", label_s, n)
    s_out, s_sec = _timed_samples(student, n, batch_size=batch, seed=seed, num_steps=s_s)
    log.info("demo [4/4]: scoring (FID-FMNIST, class accuracy)")
    metrics: dict[str, Any] = {}
    for name, out, sec, label in (("teacher", t_out, t_sec, label_t), ("student", s_out, s_sec, label_s)):
        report = fmnist_report(out["images"], out["labels"], metrics=("fid", "class_accuracy"))
        metrics[name] = {"label": label, **report, "seconds_per_image": sec}
    metrics["teacher"]["checkpoint"] = str(cfg.teacher or f"{cfg.student} (its teacher)")
    metrics["student"]["checkpoint"] = str(cfg.student)

    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = 10 * rows
    panels = [
        (f"{label_t} - FID {metrics['teacher']['fid']:.2f}", t_out["images"][:cells]),
        (f"{label_s} - FID {metrics['student']['fid']:.2f}", s_out["images"][:cells]),
    ]
    title = f"the same prompts (columns) and initial noise (rows); {t_sec / s_sec:.1f}x faster"
    save_panels(panels, out_dir / "grid.png", nrow=10, column_labels=CLASS_NAMES, title=title, scale=3)

    prompt = cfg.get("prompt")
    (out_dir / "prompt.png").unlink(missing_ok=True)  # not an old run's
    if prompt:
        k = int(cfg.prompt_samples)
        ask = {"batch_size": k, "seed": seed, "captions": [str(prompt)]}
        p_t = run.generate(teacher, k, **ask, num_steps=t_s, guidance_scale=t_g)
        p_s = run.generate(student, k, **ask, num_steps=s_s)
        save_panels(
            [(label_t, p_t["images"]), (label_s, p_s["images"])],
            out_dir / "prompt.png",
            nrow=min(k, 8),
            scale=3,
            title=f"prompt: {prompt!r}",
        )
        seen = {"teacher_seen": _seen(p_t["images"]), "student_seen": _seen(p_s["images"])}
        metrics["prompt"] = {"text": str(prompt), **seen}

    arrays = {
        "teacher_images": to_uint8(t_out["images"]).numpy(),
        "teacher_labels": np.asarray(t_out["labels"]),
        "student_images": to_uint8(s_out["images"]).numpy(),
        "student_labels": np.asarray(s_out["labels"]),
    }
    with io.atomic_path(out_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    metrics["seconds_total"] = time.perf_counter() - t_start
    lines = summary_lines(metrics, n, out_dir.resolve() if os.path.isabs(str(cfg.out_dir)) else out_dir)
    lines.append(f"total {metrics['seconds_total']:.0f} s")
    metrics["summary"] = lines  # what the console scripts print (ladd_turbo.cli)
    run.write_metrics(metrics, out_dir)
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    return metrics
