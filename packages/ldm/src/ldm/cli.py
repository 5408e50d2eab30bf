"""Console scripts: ``ldm-train``, ``ldm-sample``, ``ldm-inpaint``, ``ldm-superres``, ``ldm-eval`` (Hydra)."""

from pathlib import Path

from gencore import run
from gencore.cli import hydra_app
from ldm import tasks

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", run.train)
sample = hydra_app(CONFIGS, "sample", tasks.sample)
inpaint = hydra_app(CONFIGS, "inpaint", tasks.inpaint)
superres = hydra_app(CONFIGS, "superres", tasks.superres)
evaluate = hydra_app(CONFIGS, "eval", tasks.evaluate)
