"""Console scripts: ``sd3-train``, ``sd3-sample``, ``sd3-eval`` (Hydra; configs ship in sd3_flow/configs)."""

from pathlib import Path

from gencore import run
from gencore.cli import hydra_app
from sd3_flow import tasks

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", run.train)
sample = hydra_app(CONFIGS, "sample", tasks.sample)
evaluate = hydra_app(CONFIGS, "eval", tasks.evaluate)
