"""Console scripts ``gen1-train``, ``gen1-sample``, ``gen1-eval``, ``gen1-edit`` (configs: gen1_video/configs)."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "gen1_video.tasks:train")
sample = hydra_app(CONFIGS, "sample", "gen1_video.tasks:sample")
evaluate = hydra_app(CONFIGS, "eval", "gen1_video.tasks:evaluate")
edit = hydra_app(CONFIGS, "edit", "gen1_video.tasks:edit")
