"""Console scripts ``imagebart-train``, ``-sample``, ``-inpaint``, ``-eval`` (configs ship in imagebart/configs)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "imagebart.tasks:train")
sample = hydra_app(CONFIGS, "sample", "imagebart.tasks:sample")
inpaint = hydra_app(CONFIGS, "inpaint", "imagebart.tasks:inpaint")
evaluate = hydra_app(CONFIGS, "eval", "imagebart.tasks:evaluate")
