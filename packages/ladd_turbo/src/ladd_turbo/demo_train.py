"""make demo-train / ladd-train-demo: the flagship chain retrained from scratch in under 30 minutes on 2 cores.

The same four stages, CLIs' code paths and recipes as the shipped checkpoints, with shorter budgets (the shipped ones
took ~75 minutes; see each checkpoint's MADE_BY.md):

1. ``ldm-train experiment=autoencoder_fmnist_c16`` (the 16-channel KL autoencoder),
2. ``sd3-train experiment=fmnist_rf_lognorm`` (the MMDiT rectified-flow text-to-image teacher over its latents),
3. ``ladd-synth`` (the teacher's guided samples: the student's training data),
4. ``ladd-train experiment=fmnist_turbo`` (the 4-step LADD student: the paper's m = 1 recipe at lr 5e-5, measured
   at this 800-step budget; the shipped student's ``fmnist_turbo_toy`` (m = 0, lr 2e-5) needs 3,000 steps to pay off
   and has not been measured at 800),

then the demo's summary (``ladd-demo student=<run>/student``). Each stage shows its progress (a bar in a terminal,
``step k/N, ETA`` lines in a log) and the chain's time estimate; a stage already finished in ``--run-dir`` is kept
(run it again to go on after an interruption).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ladd_turbo.demo_train")

__all__ = ["STAGES", "main"]


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the console script it stands for (its package's cli module has the configs)
    cli: str
    experiment: str | None
    steps: int  # the stage's budget, in units
    seconds_per_step: float  # per unit, measured on 2 CPU cores (Intel Xeon), for the time estimate
    unit: str = "steps"


# budgets: the shipped checkpoints' recipes, shortened to fit 30 minutes on 2 cores
STAGES = (
    Stage("autoencoder", "ldm-train", "ldm.cli", "autoencoder_fmnist_c16", 800, 0.48),
    Stage("teacher", "sd3-train", "sd3_flow.cli", "fmnist_rf_lognorm", 1400, 0.46),
    Stage("synthetic", "ladd-synth", "ladd_turbo.cli", None, 800, 0.125, "samples"),  # 80 per class caption
    Stage("student", "ladd-train", "ladd_turbo.cli", "fmnist_turbo", 800, 0.36),
)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _estimate(stages: tuple[Stage, ...]) -> float:
    return sum(s.steps * s.seconds_per_step for s in stages) + 60 * len(stages)


def _overrides(stage: Stage, run_dir: Path) -> list[str]:
    """The stage's command line (what ``<stage.command>`` would be given)."""
    where = {s.name: run_dir / s.name for s in STAGES}
    if stage.name == "synthetic":
        return [
            f"teacher={where['teacher']}",
            f"num_per_prompt={max(1, stage.steps // 10)}",  # the ten class captions
            "batch_size=100",
            f"out_dir={where[stage.name]}",
        ]
    common = [f"run_dir={where[stage.name]}", f"trainer.max_steps={stage.steps}", "resume=auto"]
    if stage.name == "autoencoder":
        return [f"experiment={stage.experiment}", *common, f"callbacks.images.every_n_steps={stage.steps}"]
    if stage.name == "teacher":
        return [f"experiment={stage.experiment}", f"first_stage={where['autoencoder']}", *common]
    if stage.name == "student":
        return [
            f"experiment={stage.experiment}",
            f"teacher={where['teacher']}",
            f"datamodule.path={where['synthetic']}",
            f"checkpoint.every_n_train_steps={stage.steps // 2}",
            *common,
        ]
    raise ValueError(stage.name)


def _done(stage: Stage, run_dir: Path) -> bool:
    folder = run_dir / stage.name
    if stage.name == "synthetic":
        return (folder / "index.json").is_file()
    return (folder / "export" / "model.safetensors").is_file()


def main(argv: list[str] | None = None) -> dict:
    from gencore import run
    from gencore.cli import compose
    from ladd_turbo.demo import demo

    parser = argparse.ArgumentParser(prog="ladd-train-demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-dir", default="runs/demo-train", help="where the four stages train (default: runs/demo-train)"
    )
    parser.add_argument(
        "--out",
        default="outputs/demo-train",
        help="where the summary (grid.png, metrics.json, ...) goes (default: outputs/demo-train)",
    )
    parser.add_argument("--num-samples", type=int, default=300, help="samples per model in the summary (default: 300)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="scale every stage's steps (smoke tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    stages = tuple(dataclasses.replace(s, steps=max(1, round(s.steps * args.budget_scale))) for s in STAGES)
    run_dir = Path(args.run_dir)
    total = _estimate(stages)
    log.info(
        "demo-train: autoencoder -> teacher -> synthetic data -> 4-step student, from scratch in %s; estimate "
        "%s on 2 CPU cores",
        run_dir,
        _minutes(total),
    )
    t0 = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        elapsed = time.perf_counter() - t0
        left = _estimate(stages[i - 1 :])
        if _done(stage, run_dir):
            log.info("demo-train [%d/%d] %s: already in %s, kept", i, len(stages), stage.name, run_dir / stage.name)
            continue
        log.info(
            "demo-train [%d/%d] %s (%s, %d %s): %s elapsed, about %s to go",
            i,
            len(stages),
            stage.name,
            stage.command,
            stage.steps,
            stage.unit,
            _minutes(elapsed),
            _minutes(left),
        )
        configs = importlib.import_module(stage.cli).CONFIGS
        if stage.name == "synthetic":
            from ladd_turbo.tasks import synth

            synth(compose(configs, "synth", _overrides(stage, run_dir)))
        else:
            run.train(compose(configs, "train", _overrides(stage, run_dir)))
    minutes = (time.perf_counter() - t0) / 60
    log.info("demo-train: the chain took %.1f min; the summary from its student:", minutes)
    metrics = demo(
        compose(
            Path(__file__).parent / "configs",
            "demo",
            [
                f"student={run_dir / 'student'}",
                f"out_dir={args.out}",
                f"num_samples={args.num_samples}",
                f"grid_rows={max(1, min(4, args.num_samples // 10))}",
            ],
        )
    )
    metrics["train_minutes"] = minutes
    run.write_metrics(metrics, Path(args.out))
    return metrics
