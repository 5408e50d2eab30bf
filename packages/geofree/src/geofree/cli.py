"""Console scripts: ``geofree-train``, ``geofree-sample``, ``geofree-render``, ``geofree-eval``."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "geofree.tasks:sample")
render = hydra_app(CONFIGS, "render", "geofree.tasks:render")
evaluate = hydra_app(CONFIGS, "eval", "geofree.tasks:evaluate")
