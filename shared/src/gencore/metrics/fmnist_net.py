"""The in-project Fashion-MNIST feature network: a small VGG-style CNN classifier whose penultimate features define
FID-FMNIST, KID and precision/recall for generated Fashion-MNIST images, and whose predictions give class accuracy.

Trained by ``gencore-train-fmnist-features`` (``python -m gencore.metrics.train_features``) on the 60,000 training
images; the weights ship as ``gencore/metrics/weights/fmnist_net.safetensors`` with a JSON card (test accuracy,
command). Inputs are images in [-1, 1]: (B, 1 or 3, H, W); 3 channels are averaged to gray; 32×32 inputs are
centre-cropped to 28 (undoing the 2-pixel pad of ``FashionMNIST(image_size=32)``); other sizes are resized.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.modules import FrozenModule

__all__ = ["WEIGHTS_PATH", "FMNISTClassifierModule", "FMNISTFeatureNet", "FMNISTPerceptual", "load_feature_net"]

WEIGHTS_PATH = Path(__file__).parent / "weights" / "fmnist_net.safetensors"
CARD_PATH = WEIGHTS_PATH.with_suffix(".json")


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FMNISTFeatureNet(nn.Module):
    """28×28 gray -> conv(w)×2 -> pool -> conv(2w)×2 -> pool -> conv(4w) -> pool -> fc(feature_dim) -> fc(10)."""

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10, dropout: float = 0.3) -> None:
        super().__init__()
        if width < 1 or feature_dim < 1:
            raise ValueError(f"FMNISTFeatureNet: width and feature_dim must be >= 1, got {width}, {feature_dim}")
        w = width
        self.body = nn.Sequential(
            *_conv_block(1, w),
            *_conv_block(w, w),
            nn.MaxPool2d(2),  # 14×14
            *_conv_block(w, 2 * w),
            *_conv_block(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 7×7
            *_conv_block(2 * w, 4 * w),
            nn.MaxPool2d(2),  # 3×3
            nn.Flatten(),
        )
        self.embed = nn.Sequential(
            nn.Linear(4 * w * 9, feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes, "dropout": dropout}

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, 1, 28, 28)."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FMNISTFeatureNet: expected (B, 1|3, H, W) images, got {getattr(x, 'shape', x)}")
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        h, w = x.shape[-2:]
        if (h, w) == (32, 32):
            x = x[..., 2:30, 2:30]
        elif (h, w) != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (B, feature_dim)."""
        return self.embed(self.body(self.prepare(x)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.dropout(self.features(x)))


class FrozenFeatures(FrozenModule):
    """The trained network as a frozen feature extractor (``num_features`` for torchmetrics FID / KID)."""

    def __init__(self, net: FMNISTFeatureNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features
        self.freeze()

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x.to(next(self.net.parameters()).device))

    def logits(self, x: Tensor) -> Tensor:
        return self.net(x.to(next(self.net.parameters()).device))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> FrozenFeatures:
    from gencore.io import load_checkpoint, load_state_dict

    p = Path(path)
    card = p.with_suffix(".json")
    config = json.loads(card.read_text())["config"] if card.is_file() else {}
    net = FMNISTFeatureNet(**config)
    load_state_dict(net, {k: v.float() for k, v in load_checkpoint(p).items()}, source=str(p))
    return FrozenFeatures(net)


def load_feature_net(path: str | Path | None = None) -> FrozenFeatures:
    """The trained feature network (frozen, eval), from the shipped weights or ``path``; cached per process."""
    p = Path(path) if path is not None else WEIGHTS_PATH
    if not p.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST feature network weights not found at {p}; train them with "
            "`gencore-train-fmnist-features` (see shared/README.md)"
        )
    return _load_cached(str(p.resolve()))


class FMNISTPerceptual(FrozenModule):
    """LPIPS-form distance over the conv blocks of the frozen Fashion-MNIST network: a perceptual term for offline
    runs where no ImageNet backbone weights exist (taming / ldm autoencoders, twostream_inpaint's toy recipe).

    Activations after each of the 5 conv layers are unit-normalised over channels; squared differences are averaged
    over channels and space and summed over layers. Returns (B, 1, 1, 1) like LPIPS.
    """

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.net = copy.deepcopy(load_feature_net(weights).net)  # own copy: not moved with the metric's
        self.taps = [i for i, m in enumerate(self.net.body) if isinstance(m, nn.ReLU)]
        self.freeze()

    def _features(self, x: Tensor) -> list[Tensor]:
        h = self.net.prepare(x)
        feats = []
        for i, layer in enumerate(self.net.body):
            h = layer(h)
            if i in self.taps:
                feats.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return feats

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx, fy = self._features(x), self._features(y)
        return sum((a - b).square().mean(dim=(1, 2, 3), keepdim=True) for a, b in zip(fx, fy))


class FMNISTClassifierModule(L.LightningModule):
    """Trains :class:`FMNISTFeatureNet` with cross-entropy (label smoothing), AdamW and a one-cycle schedule. Its
    steps serve any image classifier over ``{"image", "label"}`` batches (shapebias's shape classifier subclasses it
    with its own optimizer)."""

    def __init__(
        self,
        net: FMNISTFeatureNet,
        lr: float = 3e-3,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.05,
        max_steps: int = 10_000,
        augment: bool = True,
    ) -> None:
        super().__init__()
        self.net = net
        self.lr, self.weight_decay, self.label_smoothing = lr, weight_decay, label_smoothing
        self.max_steps, self.augment = max_steps, augment

    #: training augmentation: random horizontal flips and translations of up to ``augment_shift`` pixels (None: 1/16
    #: of the image side), the vacated border filled with ``augment_fill`` (a subclass for other images sets them)
    augment_shift: int | None = 2
    augment_fill: float = -1.0

    def _augment(self, x: Tensor) -> Tensor:
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
        x = torch.where(flip, x.flip(-1), x)
        shift = self.augment_shift if self.augment_shift is not None else max(1, x.shape[-1] // 16)
        pad = F.pad(x, (shift, shift, shift, shift), value=self.augment_fill)
        dx, dy = torch.randint(0, 2 * shift + 1, (2,)).tolist()  # (CPU generator: no device sync)
        return pad[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, y = batch["image"], batch["label"]
        if self.augment:
            x = self._augment(x)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.net(batch["image"])
        self.log("val/loss", F.cross_entropy(logits, batch["label"]), prog_bar=True)
        self.log("val/acc", (logits.argmax(1) == batch["label"]).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.max_steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        return {"inputs": batch["image"][:n]}
