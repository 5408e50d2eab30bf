"""Console scripts ``ladd-synth``, ``ladd-train``, ``ladd-sample``, ``ladd-eval``, ``ladd-demo`` (configs:
ladd_turbo/configs)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

synth = hydra_app(CONFIGS, "synth", "ladd_turbo.tasks:synth")
train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "sd3_flow.tasks:sample")
evaluate = hydra_app(CONFIGS, "eval", "ladd_turbo.tasks:evaluate")
demo = hydra_app(CONFIGS, "demo", "ladd_turbo.demo:demo")
