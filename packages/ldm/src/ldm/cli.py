"""Console scripts: ``ldm-train``, ``ldm-sample``, ``ldm-inpaint``, ``ldm-superres``, ``ldm-eval`` (Hydra)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "ldm.tasks:sample")
inpaint = hydra_app(CONFIGS, "inpaint", "ldm.tasks:inpaint")
superres = hydra_app(CONFIGS, "superres", "ldm.tasks:superres")
evaluate = hydra_app(CONFIGS, "eval", "ldm.tasks:evaluate")
