"""Console scripts: ``taming-train``, ``taming-sample``, ``taming-eval`` (Hydra; configs ship in taming/configs)."""

from pathlib import Path

from gencore import run
from gencore.cli import hydra_app
from taming import tasks

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", run.train)
sample = hydra_app(CONFIGS, "sample", tasks.sample)
evaluate = hydra_app(CONFIGS, "eval", tasks.evaluate)
