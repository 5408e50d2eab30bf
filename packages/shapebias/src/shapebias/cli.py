"""Console scripts: ``shapebias-train``, ``-sample``, ``-eval``, ``-data``, ``-dims``, ``-dynamics``, ``-readout``
(Hydra)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "shapebias.tasks:sample")
evaluate = hydra_app(CONFIGS, "eval", "shapebias.tasks:evaluate")
data = hydra_app(CONFIGS, "data", "shapebias.tasks:data")
dims = hydra_app(CONFIGS, "dims", "shapebias.tasks:dims")
dynamics = hydra_app(CONFIGS, "dynamics", "shapebias.tasks:dynamics")
readout = hydra_app(CONFIGS, "readout", "shapebias.tasks:readout")
