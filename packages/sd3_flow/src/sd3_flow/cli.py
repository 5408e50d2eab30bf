"""Console scripts: ``sd3-train``, ``sd3-sample``, ``sd3-eval`` (Hydra; configs ship in sd3_flow/configs)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "sd3_flow.tasks:sample")
evaluate = hydra_app(CONFIGS, "eval", "sd3_flow.tasks:evaluate")
