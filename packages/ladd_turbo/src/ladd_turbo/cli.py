"""Console scripts ``ladd-synth``, ``ladd-train``, ``ladd-sample``, ``ladd-eval``, ``ladd-demo``, ``ladd-train-demo``
(configs: ladd_turbo/configs)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

synth = hydra_app(CONFIGS, "synth", "ladd_turbo.tasks:synth")
train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "sd3_flow.tasks:sample")
evaluate = hydra_app(CONFIGS, "eval", "ladd_turbo.tasks:evaluate")
demo = hydra_app(CONFIGS, "demo", "ladd_turbo.cli:_demo_and_print")


def _demo_and_print(cfg):
    """``ladd-demo``: the demo, then its summary on the terminal."""
    from ladd_turbo.demo import demo as run_demo

    metrics = run_demo(cfg)
    print("\n" + "\n".join(metrics["summary"]), flush=True)
    return metrics


def train_demo() -> None:
    """``ladd-train-demo`` (``make demo-train``): the chain from scratch, then the demo's summary; a mistake is one
    line and exit 1, as the other genlab commands."""
    from gencore.cli import one_line_errors
    from ladd_turbo.demo_train import main

    with one_line_errors("ladd-train-demo"):
        metrics = main()
    print("\n" + "\n".join(metrics["summary"]), flush=True)
