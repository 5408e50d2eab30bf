"""Train the Fashion-MNIST feature network with ``gencore.run.train`` and report its test accuracy.

    gencore-train-fmnist-features                    # the shipped recipe (7,000 steps, batch 128, ~15 min on 2 cores)
    gencore-train-fmnist-features publish=true       # ... and replace gencore/metrics/weights/fmnist_net.safetensors
    gencore-train-fmnist-features debug=fast         # a smoke run

The card beside the weights (``fmnist_net.json``) records the architecture, the test accuracy on all 10,000 test
images, the number of steps and the command.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

import torch
from omegaconf import DictConfig

from gencore import io, run
from gencore.cli import CORE_CONFIGS, hydra_app
from gencore.metrics.fmnist_net import CARD_PATH, WEIGHTS_PATH, FMNISTFeatureNet

log = logging.getLogger(__name__)


@torch.no_grad()
def test_accuracy(net: FMNISTFeatureNet, root: str | None = None) -> float:
    from gencore.data import FashionMNIST

    images, labels = FashionMNIST(root=root, split="test").tensors()
    net.eval()
    preds = torch.cat([net(images[i : i + 1000]).argmax(1) for i in range(0, len(images), 1000)])
    return float((preds == labels).double().mean())


def train_and_report(cfg: DictConfig) -> dict:
    result = run.train(cfg)
    net = result.module.net
    acc = test_accuracy(net, cfg.datamodule.get("root"))
    card = {
        "config": net.config,
        "test_accuracy": round(acc, 4),
        "steps": result.trainer.global_step,
        "batch_size": cfg.datamodule.batch_size,
        "command": "gencore-train-fmnist-features " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
    }
    (result.run_dir / "card.json").write_text(json.dumps(card, indent=2))
    log.info("test accuracy %.4f after %d steps", acc, result.trainer.global_step)
    print(json.dumps(card, indent=2))
    if cfg.get("publish"):
        io.save_safetensors(net.state_dict(), WEIGHTS_PATH, metadata={"test_accuracy": str(acc)})
        CARD_PATH.write_text(json.dumps(card, indent=2) + "\n")
        log.info("published to %s", WEIGHTS_PATH)
    return card


main = hydra_app(CORE_CONFIGS, "fmnist_features", train_and_report)  # also the console script, via gencore.cli

if __name__ == "__main__":
    main()
