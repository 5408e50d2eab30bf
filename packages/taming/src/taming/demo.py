"""``make demo`` / ``python -m taming.demo``: the whole taming pipeline on Fashion-MNIST in a few minutes on a CPU.

1. train a VQGAN briefly (``experiment=vqgan_fmnist``),
2. train a class-conditional transformer over its codes (``experiment=transformer_fmnist_class``),
3. write a grid of samples (one column per class) and the reconstruction PSNR / sample metrics.

Every stage is the same code path as the console scripts (``gencore.run.train`` on the composed Hydra configs), only
with short budgets; the numbers it prints are therefore far from the README table's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from gencore import run
from gencore.cli import compose
from taming.cli import CONFIGS
from taming.tasks import evaluate_reconstructions, evaluate_samples, sample

log = logging.getLogger("taming.demo")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder")
    parser.add_argument("--vqgan-batches", type=int, default=200)
    parser.add_argument("--transformer-steps", type=int, default=600)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out).resolve()
    # progress as log lines (gencore.progress): stage, step/total, elapsed, ETA; the same in a terminal and in a log
    # (overwrite=true: each `make demo` starts again in runs/demo)
    quiet = [
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "datamodule.num_workers=1",
        "overwrite=true",
    ]
    t0 = time.perf_counter()
    log.info("demo [1/4]: training a VQGAN on Fashion-MNIST for %d batches -> %s", args.vqgan_batches, out / "vqgan")

    vq_cfg = compose(
        CONFIGS,
        "train",
        [
            "experiment=vqgan_fmnist",
            f"run_dir={out / 'vqgan'}",
            f"trainer.max_steps={2 * args.vqgan_batches}",
            f"module.loss.disc_start={args.vqgan_batches // 2}",
            f"callbacks.images.every_n_steps={args.vqgan_batches}",
            *quiet,
        ],
    )
    vq = run.train(vq_cfg)
    t_vq = time.perf_counter() - t0
    log.info("demo [2/4]: reconstruction PSNR of 1000 test images")
    rec = evaluate_reconstructions(vq.module, num_images=1000)
    log.info("VQGAN: %d batches in %.0f s, reconstruction PSNR %.2f dB", args.vqgan_batches, t_vq, rec["psnr"])

    log.info("demo [3/4]: training the class-conditional transformer for %d steps", args.transformer_steps)
    tr_cfg = compose(
        CONFIGS,
        "train",
        [
            "experiment=transformer_fmnist_class",
            f"run_dir={out / 'transformer'}",
            f"first_stage={out / 'vqgan'}",
            f"trainer.max_steps={args.transformer_steps}",
            f"callbacks.images.every_n_steps={args.transformer_steps}",
            *quiet,
        ],
    )
    tr = run.train(tr_cfg)
    t_tr = time.perf_counter() - t0 - t_vq
    log.info("demo [4/4]: sampling a 10x10 grid and %d samples for the metrics", args.samples)
    grid = sample(
        {
            "checkpoint": str(out / "transformer"),
            "out_dir": str(out / "samples"),
            "num_samples": 100,
            "batch_size": 50,
            "nrow": 10,
            "grid_size": 100,
            "sample": {"labels": list(range(10)), "top_k": 100},
        }
    )
    metrics = evaluate_samples(tr.module, num_samples=args.samples, batch_size=50, labels=list(range(10)))
    summary = {
        "vqgan_batches": args.vqgan_batches,
        "vqgan_minutes": t_vq / 60,
        "reconstruction": rec,
        "transformer_steps": args.transformer_steps,
        "transformer_minutes": t_tr / 60,
        "samples": metrics,
        "grid": str(grid / "grid.png"),
        "total_minutes": (time.perf_counter() - t0) / 60,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "samples: %s (class accuracy %.2f, FID-FMNIST %.1f, precision %.2f, recall %.2f); %.1f minutes; summary: %s",
        grid / "grid.png",
        metrics.get("class_accuracy", float("nan")),
        metrics.get("fid", float("nan")),
        metrics.get("precision", float("nan")),
        metrics.get("recall", float("nan")),
        summary["total_minutes"],
        out / "summary.json",
    )
    return summary


if __name__ == "__main__":
    main()
