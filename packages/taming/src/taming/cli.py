"""Console scripts: ``taming-train``, ``taming-sample``, ``taming-eval`` (Hydra; configs ship in taming/configs)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "taming.tasks:sample")
evaluate = hydra_app(CONFIGS, "eval", "taming.tasks:evaluate")
