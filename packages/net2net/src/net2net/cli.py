"""Console scripts: ``net2net-train``, ``net2net-sample``, ``net2net-translate``, ``net2net-bias-report``,
``net2net-eval`` (Hydra)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "net2net.tasks:sample")
translate = hydra_app(CONFIGS, "translate", "net2net.tasks:translate")
bias_report = hydra_app(CONFIGS, "bias_report", "net2net.tasks:bias_report")
evaluate = hydra_app(CONFIGS, "eval", "net2net.tasks:evaluate")
