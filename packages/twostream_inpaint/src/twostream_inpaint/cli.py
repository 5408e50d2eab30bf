"""Console scripts: ``inpaint-train``, ``inpaint-sample``, ``inpaint-image``, ``inpaint-video``, ``inpaint-eval``."""

from pathlib import Path

from gencore.cli import hydra_app

CONFIGS = Path(__file__).parent / "configs"

train = hydra_app(CONFIGS, "train", "gencore.run:train")
sample = hydra_app(CONFIGS, "sample", "twostream_inpaint.tasks:sample")
image = hydra_app(CONFIGS, "image", "twostream_inpaint.tasks:image")
video = hydra_app(CONFIGS, "video", "twostream_inpaint.tasks:video")
evaluate = hydra_app(CONFIGS, "eval", "twostream_inpaint.tasks:evaluate")
