"""Per-pixel readout of frozen features (Islam et al., "Shape or Texture: Understanding Discriminative Features in
CNNs", ICLR 2021, arXiv 2101.11604; official code ``islamamirul/shape_texture_neuron``, ``shape_decoding/``).

How much *localised* shape a frozen network's features hold is measured by training a small convolutional readout on
top of one stage's feature map to predict a per-pixel mask: binary (object vs background) or semantic (background +
20 VOC classes), and scoring it by mIoU on held-out images. This file implements:

- :class:`PosENet` -- the official readout head (``resnet50_binaryseg.py``): Conv3x3 C->256, BN, ReLU, Conv3x3
  256->128, BN, ReLU, Conv3x3 128->K (``layers=3``; 5.02 M parameters for C = 2048, K = 2), or the ``_single``
  files' one Conv3x3 C->K (``layers=1``). Parameter names as official (``conv1, bn1, conv2, bn2, conv3`` / ``conv``).
- :class:`StageReadout` -- a frozen feature extractor (:class:`shapebias.encoders.FeatureExtractor`) plus the head on
  one stage's map (``fuse="single"``) or on the official multistage fusion of every stage up to it
  (``fuse="multistage"``, ``resnet50_*_multistage*.py``); logits bilinearly upsampled to the input size.
- Targets (:func:`binary_target`, :func:`semantic_target`), the poly learning-rate rule (:func:`poly_lr`,
  :func:`poly_lambda`), the confusion-histogram metric (:func:`confusion_histogram`, :func:`iou_per_class`,
  :func:`mean_iou`, :func:`pixel_accuracy`) and the Lightning recipe (:class:`ReadoutModule`).

Official behaviour kept, and where we depart (each is a switch; the default is said):

- Binary target ``target[target > 0] = 1`` also turns VOC's 255 "ignore" boundary into foreground (train and val).
  Kept by default (``ignore_to_foreground=True``); ``False`` keeps 255 as ignore (our fix).
- The backbone is frozen (``requires_grad=False``) but the official config has ``FREEZE_BN: False``, so the backbone's
  BatchNorm layers run in train mode and their running statistics drift with the readout's training data. We default
  to ``freeze_bn=True`` (backbone always in eval mode: the features are exactly the pretrained network's);
  ``freeze_bn=False`` reproduces the official drift.
- Optimiser: SGD (momentum 0.9, weight decay 5e-4 on both groups), backbone group at LR, head group at 10 x LR
  (LR = 0.002), poly decay per iteration ``max(LR (1 - it/max_it)^0.9, 1e-7)`` (the head gets 10 x that, floor
  included, as the official ``poly_lr_scheduler`` sets ``lr`` and ``10 * lr``). With the frozen backbone the backbone
  group is empty; the two groups are kept so ``freeze_backbone=False`` (not an official setting) trains it at LR.
- Multistage fusion: the official files hard-code a 17 x 17 grid (stage 5 at 513 px); we resize to the chosen stage's
  own resolution, which is the same thing at 513 px and works at any size and stage.
- mIoU: the official ``fast_hist`` / ``scores`` (rows = target, cols = prediction, IoU = diag / (row + col - diag),
  nan for a class absent from both and left out of the mean). We also drop predictions outside [0, K) and the ignore
  label, and accumulate on the device without a host sync (``scatter_add_``, not ``bincount``, which waits for the
  device to size its output).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IGNORE_INDEX",
    "PolyLambda",
    "PosENet",
    "ReadoutModule",
    "StageReadout",
    "binary_target",
    "confusion_histogram",
    "iou_per_class",
    "mean_iou",
    "pixel_accuracy",
    "poly_lambda",
    "poly_lr",
    "posenet_num_parameters",
    "readout_loss",
    "semantic_target",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255  # VOC's "void" label (object boundaries, difficult regions)
_FUSE_MODES = ("single", "multistage")
_TASKS = ("binary", "semantic")


# ------------------------------------------------------------------------------------------------------ readout head


class PosENet(nn.Module):
    """The official readout head ("position encoding network", ``PosENet`` in ``resnet50_binaryseg.py``).

    ``layers=3`` (the paper's readout): ``conv1`` Conv3x3 input_dim->hidden[0], ``bn1``, ReLU, ``conv2`` Conv3x3
    hidden[0]->hidden[1], ``bn2``, ReLU, ``conv3`` Conv3x3 hidden[1]->num_classes. ``layers=2`` (the commented-out
    official variant): ``conv1``, ``bn1``, ReLU, ``conv2`` hidden[0]->num_classes. ``layers=1`` (the ``_single`` and
    multistage files): ``conv`` Conv3x3 input_dim->num_classes. All convolutions stride 1, padding 1, so the map keeps
    its size.

    ``bias``: whether ``conv1`` / ``conv2`` of the multi-layer heads have a bias (binary readout ``True``; the semantic
    file ``resnet50_seg.py`` uses ``False``); the last convolution always has one.
    """

    def __init__(
        self,
        input_dim: int,
        num_classes: int = 2,
        hidden: Sequence[int] = (256, 128),
        layers: int = 3,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if int(input_dim) < 1:
            raise ValueError(f"PosENet: input_dim must be >= 1, got {input_dim}")
        if int(num_classes) < 2:
            raise ValueError(f"PosENet: num_classes must be >= 2, got {num_classes}")
        if layers not in (1, 2, 3):
            raise ValueError(
                f"PosENet: layers must be 1, 2 or 3 (official: 3, or 1 for the _single files), got {layers}"
            )
        hidden = tuple(int(h) for h in hidden)
        if len(hidden) < layers - 1 or any(h < 1 for h in hidden[: layers - 1]):
            raise ValueError(f"PosENet: layers={layers} needs {layers - 1} positive hidden widths, got hidden={hidden}")
        self.input_dim, self.num_classes, self.layers = int(input_dim), int(num_classes), int(layers)
        self.hidden = hidden[: layers - 1]
        if layers == 1:
            self.conv = nn.Conv2d(self.input_dim, self.num_classes, 3, stride=1, padding=1)
            return
        self.conv1 = nn.Conv2d(self.input_dim, hidden[0], 3, stride=1, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(hidden[0])
        if layers == 2:
            self.conv2 = nn.Conv2d(hidden[0], self.num_classes, 3, stride=1, padding=1)
        else:
            self.conv2 = nn.Conv2d(hidden[0], hidden[1], 3, stride=1, padding=1, bias=bias)
            self.bn2 = nn.BatchNorm2d(hidden[1])
            self.conv3 = nn.Conv2d(hidden[1], self.num_classes, 3, stride=1, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        """(B, input_dim, h, w) features -> (B, num_classes, h, w) logits."""
        if x.dim() != 4 or x.shape[1] != self.input_dim:
            raise ValueError(f"PosENet: expected (B, {self.input_dim}, h, w) features, got shape {tuple(x.shape)}")
        if self.layers == 1:
            return self.conv(x)
        out = self.relu(self.bn1(self.conv1(x)))
        if self.layers == 2:
            return self.conv2(out)
        out = self.relu(self.bn2(self.conv2(out)))
        return self.conv3(out)


def posenet_num_parameters(
    input_dim: int, num_classes: int = 2, hidden: Sequence[int] = (256, 128), layers: int = 3, *, bias: bool = True
) -> int:
    """The closed-form parameter count of :class:`PosENet` (3x3 kernels; BN has a weight and a bias per channel).

    3 layers: 9 C h0 + 2 h0 + 9 h0 h1 + 2 h1 + 9 h1 K + K (+ h0 + h1 conv biases): 5,016,962 for C = 2048, K = 2.
    """
    widths = [int(input_dim), *[int(h) for h in hidden][: layers - 1], int(num_classes)]
    total = 0
    for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
        last = i == len(widths) - 2
        total += 9 * cin * cout + (cout if (bias or last) else 0) + (0 if last else 2 * cout)
    return total


# ------------------------------------------------------------------------------------------------ frozen + readout


def _stage_channels(extractor: nn.Module, stages: Sequence[str], probe_size: int) -> dict[str, int]:
    """Channels of each stage's map: from ``extractor.widths(probe_size)`` when it answers for every stage, else from
    one dummy forward (eval mode, no grad, training flags restored)."""
    widths = getattr(extractor, "widths", None)
    if callable(widths):
        try:
            answer = widths(probe_size)
        except (TypeError, ValueError):  # another signature, or a size it does not accept: measure instead
            answer = None
        if isinstance(answer, Mapping) and all(s in answer for s in stages):
            out = {}
            for s in stages:
                w = answer[s]
                out[s] = int(w[0] if isinstance(w, (tuple, list)) else w)
            return out
    modes = {m: m.training for m in extractor.modules()}
    extractor.eval()
    try:
        param = next(iter(extractor.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            feats = extractor(torch.zeros(1, 3, probe_size, probe_size, device=device), stages=list(stages), pool=False)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {s: int(feats[s].shape[1]) for s in stages}


class StageReadout(nn.Module):
    """A frozen feature extractor and a :class:`PosENet` readout on one stage (official ``resnet50_binaryseg.Net``,
    ``resnet50_seg.Net`` and the ``multistage`` variants, for any :class:`shapebias.encoders.FeatureExtractor`).

    - ``fuse="single"``: the head reads the chosen stage's (B, C, h, w) map (official: stage "5", 2048 ch).
    - ``fuse="multistage"``: every stage up to the chosen one (in the extractor's order): the first as it is (official
      ``stage0``, 64 ch after the max-pool), each later one through a 1x1 conv to ``project_dim`` (64) channels +
      ReLU (``stage<i>_feature``, i = the stage's 0-based position, as official: ``stage1_feature`` reads layer1),
      all resized bilinearly to the chosen stage's resolution and concatenated. The official multistage files use a
      one-layer head (``layers=1``).

    The extractor's parameters get ``requires_grad=False`` (``freeze_backbone=True``, official; ``False`` leaves them
    as the extractor has them: build it with ``frozen=False`` to train the backbone too). ``freeze_bn=True``
    keeps the extractor in eval mode whatever ``train()`` says (its BN running statistics never change);
    ``freeze_bn=False`` is the official quirk (BN in train mode during readout training: the running statistics drift,
    the features at evaluation are no longer the pretrained network's exactly). ``freeze_bn=False`` sets every module
    of the extractor to the readout's mode directly, so it holds also for a ``FeatureExtractor(frozen=True)`` (which
    otherwise keeps its model in eval mode); the extractor is shared state: the drift stays in it after training.

    ``forward(images (B, 3, H, W) in [-1, 1]) -> logits (B, K, H, W)`` (bilinear, align_corners False).
    """

    def __init__(
        self,
        extractor: nn.Module,
        stage: str,
        num_classes: int,
        *,
        hidden: Sequence[int] = (256, 128),
        layers: int = 3,
        bias: bool = True,
        freeze_bn: bool = True,
        fuse: str = "single",
        project_dim: int = 64,
        freeze_backbone: bool = True,
        probe_size: int = 64,
    ) -> None:
        super().__init__()
        names = [str(s) for s in getattr(extractor, "stage_names", ())]
        stage = str(stage)
        if stage not in names:
            raise ValueError(f"StageReadout: unknown stage {stage!r}; the extractor has stages {names}")
        if fuse not in _FUSE_MODES:
            raise ValueError(f"StageReadout: fuse must be one of {_FUSE_MODES}, got {fuse!r}")
        if int(project_dim) < 1:
            raise ValueError(f"StageReadout: project_dim must be >= 1, got {project_dim}")
        self.extractor = extractor
        self.stage, self.fuse, self.num_classes = stage, fuse, int(num_classes)
        self.freeze_bn, self.freeze_backbone = bool(freeze_bn), bool(freeze_backbone)
        if self.freeze_backbone:
            for p in self.extractor.parameters():
                p.requires_grad_(False)
        if not self.freeze_bn:
            logger.info("StageReadout: freeze_bn=False (official): the backbone's BN running statistics will drift")
        self.stages = names[: names.index(stage) + 1] if fuse == "multistage" else [stage]
        channels = _stage_channels(extractor, self.stages, int(probe_size))
        self.channels = channels
        self._proj_names: dict[str, str] = {}
        if fuse == "multistage":
            input_dim = channels[self.stages[0]]
            for i, s in enumerate(self.stages[1:], start=1):
                name = f"stage{i}_feature"
                self.add_module(name, nn.Conv2d(channels[s], int(project_dim), 1, stride=1, padding=0))
                self._proj_names[s] = name
                input_dim += int(project_dim)
        else:
            input_dim = channels[stage]
        self.input_dim = input_dim
        self.classifier = PosENet(input_dim, self.num_classes, hidden, layers, bias=bias)
        self.train()

    def train(self, mode: bool = True) -> StageReadout:
        super().train(mode)
        if self.freeze_bn:
            self.extractor.eval()
        else:  # the official quirk: the whole backbone follows the mode, also past a FeatureExtractor(frozen=True)
            for m in self.extractor.modules():
                m.training = mode
        return self

    @property
    def new_modules(self) -> list[nn.Module]:
        """The modules trained from scratch (official ``newly_added``): projections (multistage), then the head."""
        return [getattr(self, n) for n in self._proj_names.values()] + [self.classifier]

    def trainable_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, new parameters), as the official ``trainable_parameters`` (the backbone list holds
        the frozen parameters too; an optimizer skips those, they never get a gradient)."""
        head = [p for m in self.new_modules for p in m.parameters()]
        return list(self.extractor.parameters()), head

    def features(self, images: Tensor) -> Tensor:
        """The (B, C_in, h, w) map the head reads (the chosen stage's, or the multistage concatenation)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"StageReadout: images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if self.freeze_bn and any(m.training for m in self.extractor.modules()):  # extractor.train() called directly
            self.extractor.eval()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            feats = self.extractor(images, stages=list(self.stages), pool=False)
        if self.fuse == "single":
            return feats[self.stage]
        size = tuple(feats[self.stage].shape[-2:])
        parts = []
        for i, s in enumerate(self.stages):
            f = feats[s]
            if i > 0:
                f = F.relu(getattr(self, self._proj_names[s])(f))
            if tuple(f.shape[-2:]) != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            parts.append(f)
        return torch.cat(parts, dim=1)  # (B, C_first + (n - 1) project_dim, h, w)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.classifier(self.features(images))  # (B, K, h, w)
        return F.interpolate(logits, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------------- targets


def binary_target(target: Tensor, *, ignore_to_foreground: bool = True, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Object-vs-background target (int64): labels > 0 -> 1, 0 -> 0.

    ``ignore_to_foreground=True`` is the official ``target[target > 0] = 1``: the ignore label becomes foreground too.
    ``False`` keeps ``ignore_index`` as ignore (the loss and the metric then leave those pixels out)."""
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"binary_target: target must be an integer label map, got dtype {target.dtype}")
    out = (target > 0).long()
    if not ignore_to_foreground:
        out = torch.where(target == ignore_index, torch.full_like(out, ignore_index), out)
    return out


def semantic_target(target: Tensor) -> Tensor:
    """The semantic target as is (0 = background, 1..C = class + 1, ``ignore_index`` ignored by loss and metric)."""
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"semantic_target: target must be an integer label map, got dtype {target.dtype}")
    return target.long()


def readout_loss(logits: Tensor, target: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The official ``CrossEntropyLoss2d(ignore_index=255)``: mean pixel cross-entropy over non-ignored pixels."""
    if logits.dim() != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"readout_loss: logits (B, K, H, W) and target (B, H, W) must agree, got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------- poly LR


def poly_lr(step: int, base_lr: float, max_steps: int, power: float = 0.9, min_lr: float = 1e-7) -> float:
    """``max(base_lr (1 - step / max_steps)^power, min_lr)`` (official ``poly_lr_scheduler``); steps past
    ``max_steps`` stay at the floor."""
    if max_steps < 1:
        raise ValueError(f"poly_lr: max_steps must be >= 1, got {max_steps}")
    frac = 1.0 - min(max(float(step), 0.0), float(max_steps)) / float(max_steps)
    return max(base_lr * frac**power, min_lr)


class PolyLambda:
    """``step -> poly_lr(step, base_lr, ...) / base_lr``: the multiplier for ``LambdaLR`` (picklable, so Lightning
    checkpoints keep it). Applied to a group at ``m x base_lr`` it gives ``m x`` the backbone's rate, floor included,
    as the official scheduler's ``10 * new_lr`` for the head."""

    def __init__(self, max_steps: int, power: float = 0.9, *, base_lr: float, min_lr: float = 1e-7) -> None:
        if max_steps < 1:
            raise ValueError(f"poly_lambda: max_steps must be >= 1, got {max_steps}")
        if not base_lr > 0:
            raise ValueError(f"poly_lambda: base_lr must be > 0, got {base_lr}")
        self.max_steps, self.power, self.base_lr, self.min_lr = int(max_steps), float(power), float(base_lr), min_lr

    def __call__(self, step: int) -> float:
        return poly_lr(step, self.base_lr, self.max_steps, self.power, self.min_lr) / self.base_lr


def poly_lambda(max_steps: int, power: float = 0.9, *, base_lr: float, min_lr: float = 1e-7) -> PolyLambda:
    """The poly rule as a ``LambdaLR`` multiplier (see :class:`PolyLambda`)."""
    return PolyLambda(max_steps, power, base_lr=base_lr, min_lr=min_lr)


# ------------------------------------------------------------------------------------------------------- metric


def confusion_histogram(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(K, K) int64 counts, rows = target class, columns = predicted class (official ``fast_hist``).

    Pixels whose target is ``ignore_index`` or outside [0, K), or whose prediction is outside [0, K), are left out.
    Runs on the inputs' device without a host sync (a ``scatter_add_`` into K^2 + 1 bins, the last one a dump)."""
    if pred.shape != target.shape:
        raise ValueError(
            f"confusion_histogram: pred and target must have the same shape (label maps), got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if int(num_classes) < 1:
        raise ValueError(f"confusion_histogram: num_classes must be >= 1, got {num_classes}")
    k = int(num_classes)
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    valid = (t >= 0) & (t < k) & (p >= 0) & (p < k) & (t != ignore_index)
    idx = torch.where(valid, t * k + p, torch.full_like(t, k * k))
    hist = torch.zeros(k * k + 1, dtype=torch.int64, device=t.device)
    hist.scatter_add_(0, idx, torch.ones_like(idx))
    return hist[: k * k].reshape(k, k)


def _check_hist(hist: Tensor, who: str) -> None:
    if hist.dim() != 2 or hist.shape[0] != hist.shape[1]:
        raise ValueError(f"{who}: hist must be a square (K, K) confusion histogram, got shape {tuple(hist.shape)}")


def iou_per_class(hist: Tensor) -> Tensor:
    """(K,) float64 IoU per class: diag / (row sum + column sum - diag); nan where the class is in neither the targets
    nor the predictions (official ``scores``)."""
    _check_hist(hist, "iou_per_class")
    h = hist.double()
    tp = h.diagonal()
    denom = h.sum(1) + h.sum(0) - tp
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, math.nan))


def mean_iou(hist: Tensor) -> float:
    """Mean of :func:`iou_per_class` over the classes that occur (nanmean; nan if none does)."""
    return float(iou_per_class(hist).nanmean())


def pixel_accuracy(hist: Tensor) -> float:
    """Correct pixels / counted pixels (official ``Overall Acc``; nan for an empty histogram)."""
    _check_hist(hist, "pixel_accuracy")
    h = hist.double()
    total = h.sum()
    return float(h.diagonal().sum() / total) if float(total) > 0 else math.nan


# ------------------------------------------------------------------------------------------------------ Lightning


class ReadoutModule(L.LightningModule):
    """Training recipe of the readout (official ``trainval_shape_{bin,sem}seg.py``) on a :class:`StageReadout`.

    Batches are dicts with ``"image"`` (B, 3, H, W) in [-1, 1] and the target (B, H, W) int64: ``"mask"`` ({0, 1},
    255 = ignore may occur) for ``task="binary"`` (converted by :func:`binary_target`), ``"semantic"`` (0..C, 255 =
    ignore) for ``task="semantic"``. Loss: pixel cross-entropy with ``ignore_index`` (logged ``train/loss``,
    ``val/loss``). Optimiser: SGD over two groups, backbone at ``lr`` and head at ``head_lr_mult x lr``, with the poly
    rule per optimizer step (``LambdaLR``, interval "step"). Validation accumulates a (K, K) confusion histogram on the
    device and logs ``val/miou`` and ``val/pixel_acc`` at the end of the epoch (summed over processes under DDP).
    """

    def __init__(
        self,
        readout: StageReadout,
        task: str = "binary",
        lr: float = 0.002,
        head_lr_mult: float = 10.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        max_steps: int = 19830,
        poly_power: float = 0.9,
        min_lr: float = 1e-7,
        ignore_to_foreground: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        if task not in _TASKS:
            raise ValueError(f"ReadoutModule: task must be one of {_TASKS}, got {task!r}")
        k = int(getattr(readout, "num_classes", 0))
        if task == "binary" and k != 2:
            raise ValueError(f"ReadoutModule: the binary task needs a readout with num_classes=2, got {k}")
        if task == "semantic" and k < 2:
            raise ValueError(f"ReadoutModule: the semantic task needs num_classes >= 2 (background + classes), got {k}")
        if not lr > 0 or not head_lr_mult > 0:
            raise ValueError(
                f"ReadoutModule: lr and head_lr_mult must be > 0, got lr={lr}, head_lr_mult={head_lr_mult}"
            )
        if int(max_steps) < 1:
            raise ValueError(f"ReadoutModule: max_steps must be >= 1, got {max_steps}")
        self.save_hyperparameters(ignore=["readout"])
        self.readout = readout
        self.task, self.num_classes = task, k
        self.target_key = "mask" if task == "binary" else "semantic"
        self.lr, self.head_lr_mult = float(lr), float(head_lr_mult)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.max_steps, self.poly_power, self.min_lr = int(max_steps), float(poly_power), float(min_lr)
        self.ignore_to_foreground, self.ignore_index = bool(ignore_to_foreground), int(ignore_index)
        self.register_buffer("_val_hist", torch.zeros(k, k, dtype=torch.int64), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.readout(images)

    def target(self, batch: Mapping[str, Any]) -> Tensor:
        """The batch's (B, H, W) int64 target for this task."""
        if self.target_key not in batch or "image" not in batch:
            raise ValueError(
                f"ReadoutModule ({self.task}): a batch needs 'image' and {self.target_key!r}, got keys {sorted(batch)}"
            )
        t = batch[self.target_key]
        if self.task == "binary":
            return binary_target(t, ignore_to_foreground=self.ignore_to_foreground, ignore_index=self.ignore_index)
        return semantic_target(t)

    def _step(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        target = self.target(batch)
        logits = self.readout(batch["image"])
        return readout_loss(logits, target, ignore_index=self.ignore_index), logits, target

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss, _, _ = self._step(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_hist.zero_()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        loss, logits, target = self._step(batch)
        self.log("val/loss", loss, on_step=False, on_epoch=True)
        self._val_hist += confusion_histogram(logits.argmax(1), target, self.num_classes, self.ignore_index)

    def on_validation_epoch_end(self) -> None:
        hist = self._val_hist
        if self.trainer is not None and self.trainer.world_size > 1:
            hist = self.all_gather(hist).reshape(-1, self.num_classes, self.num_classes).sum(0)
        iou = iou_per_class(hist)
        h = hist.double()
        self.log("val/miou", iou.nanmean().float(), prog_bar=True)
        self.log("val/pixel_acc", (h.diagonal().sum() / h.sum().clamp(min=1)).float())
        self._val_hist.zero_()

    def configure_optimizers(self) -> dict[str, Any]:
        backbone, head = self.readout.trainable_parameters()
        groups = [
            {"params": [p for p in backbone if p.requires_grad], "lr": self.lr},
            {"params": [p for p in head if p.requires_grad], "lr": self.lr * self.head_lr_mult},
        ]
        opt = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        rule = poly_lambda(self.max_steps, self.poly_power, base_lr=self.lr, min_lr=self.min_lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=rule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    @torch.no_grad()
    def evaluate_miou(self, loader: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """mIoU, per-class IoU (nan for absent classes) and pixel accuracy of the readout over ``loader`` (eval mode,
        on this module's device; the training mode is restored afterwards)."""
        was_training = self.training
        self.eval()
        hist = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)
        try:
            for batch in loader:
                target = self.target(batch).to(self.device)
                logits = self.readout(batch["image"].to(self.device))
                hist += confusion_histogram(logits.argmax(1), target, self.num_classes, self.ignore_index)
        finally:
            self.train(was_training)
        return {
            "miou": mean_iou(hist),
            "iou": [float(v) for v in iou_per_class(hist).cpu()],
            "pixel_acc": pixel_accuracy(hist),
            "pixels": int(hist.sum()),
        }
