"""The training recipe of shapebias: a CNN classifying the *shape* (the object class) of cue-conflict images, with a
snapshot of its weights after every epoch, for the training-dynamics study of Islam et al., "Shape or Texture:
Understanding Discriminative Features in CNNs" (ICLR 2021, arXiv 2101.11604), Sec. 5 ("when is shape learned?").

The paper estimates shape and texture dimensions of ImageNet ResNets checkpointed after successive epochs (those
checkpoints were never released); here the same study runs on networks trained in-project on the offline
cue-conflict data (:class:`shapebias.data.CueConflict`): a stylised-ImageNet-like run where every content appears
under every texture (texture carries no class information), or an ImageNet-like control where each class mostly
wears its own texture (``pairing=class_texture``).

:class:`EpochSnapshots` writes ``<run>/epochs/epoch_000.safetensors`` (the initialisation), ``epoch_001`` ... after
each epoch, atomically, and keeps them across ``resume=auto``; ``shapebias-dynamics`` estimates every one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from gencore import io
from gencore.metrics.fmnist_net import FMNISTClassifierModule

__all__ = ["EpochSnapshots", "ShapeClassifier", "list_snapshots", "snapshot_path"]

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "epochs"


def snapshot_path(run_dir: str | Path, epoch: float | None = None, *, step: int | None = None) -> Path:
    """``<run>/epochs/epoch_<k>.safetensors`` after ``epoch`` full epochs, or ``step_<n>.safetensors`` after
    optimizer step ``step`` (the finer snapshots inside the first epochs)."""
    if (epoch is None) == (step is None):
        raise ValueError("snapshot_path: give an epoch or a step")
    name = f"epoch_{int(epoch):03d}" if step is None else f"step_{int(step):06d}"
    return Path(run_dir) / SNAPSHOT_DIR / f"{name}.safetensors"


def list_snapshots(run_dir: str | Path) -> list[tuple[float, Path]]:
    """(epoch, file) of every snapshot of a run in training order: ``epoch_<k>`` files at epoch k, ``step_<n>``
    files at the (fractional) epoch their metadata records."""
    from safetensors import safe_open

    folder = Path(run_dir) / SNAPSHOT_DIR
    found: list[tuple[float, Path]] = []
    for p in folder.glob("*.safetensors"):
        kind, _, number = p.stem.partition("_")
        if not number.isdigit():
            continue
        if kind == "epoch":
            found.append((float(int(number)), p))
        elif kind == "step":
            with safe_open(str(p), "pt") as f:
                epoch = (f.metadata() or {}).get("epoch")
            if epoch is not None:
                found.append((float(epoch), p))
    return sorted(found)  # (by number: epoch_1000 after epoch_999)


class EpochSnapshots(L.Callback):
    """The network's weights before training (epoch 0), after every ``every_n_epochs``-th epoch
    (``<run>/epochs/epoch_<k>.safetensors``), after the optimizer steps in ``at_steps`` and where training ended
    mid-epoch (``step_<n>.safetensors``, metadata ``epoch`` = the fraction of epochs done).
    Written atomically by the main process. A resumed run keeps and continues the series; a run started afresh in
    the folder (``overwrite=true``) removes the earlier run's snapshots first."""

    def __init__(self, every_n_epochs: int = 1, at_steps: Sequence[int] = ()) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"snapshot every_n_epochs must be >= 1, got {every_n_epochs}")
        steps = [int(s) for s in at_steps]
        if any(s < 1 for s in steps):
            raise ValueError(f"snapshot steps must be >= 1, got {steps}")
        self.every_n_epochs, self.at_steps = every_n_epochs, frozenset(steps)

    def _write(self, trainer: L.Trainer, module: ShapeClassifier, path: Path, epoch: float) -> None:
        if not trainer.is_global_zero or path.is_file():
            return
        meta = {"epoch": f"{epoch:.6g}", "global_step": str(trainer.global_step)}
        io.save_safetensors(module.net.state_dict(), path, metadata=meta)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.global_step != 0:
            return
        if trainer.is_global_zero:
            stale = list_snapshots(trainer.default_root_dir)
            if stale:
                log.info("removing %d snapshots of an earlier run in this folder", len(stale))
                for _, p in stale:
                    p.unlink(missing_ok=True)
        self._write(trainer, module, snapshot_path(trainer.default_root_dir, 0), 0.0)  # type: ignore[arg-type]

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step in self.at_steps:
            path = snapshot_path(trainer.default_root_dir, step=step)
            self._write(trainer, module, path, step / _steps_per_epoch(trainer))  # type: ignore[arg-type]

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """The weights training ended with, when that was not at the end of an epoch (max_steps mid-epoch): the last
        point of the series is the trained network."""
        step, per_epoch = trainer.global_step, _steps_per_epoch(trainer)
        root = trainer.default_root_dir
        if step == 0 or (step % per_epoch == 0 and snapshot_path(root, step // per_epoch).is_file()):
            return
        self._write(trainer, module, snapshot_path(root, step=step), step / per_epoch)  # type: ignore[arg-type]

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not _epoch_complete(trainer):  # (not an epoch cut short by max_steps)
            return
        done = _epochs_done(trainer)
        if done % self.every_n_epochs == 0:
            self._write(trainer, module, snapshot_path(trainer.default_root_dir, done), float(done))  # type: ignore[arg-type]


def _epoch_complete(trainer: L.Trainer) -> bool:
    """Whether the epoch that just ended ran all its batches (not stopped by max_steps part-way)."""
    total = trainer.num_training_batches
    progress = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    return math.isfinite(total) and progress >= total


def _epochs_done(trainer: L.Trainer) -> int:
    """Full passes over the training data so far, counted from the optimizer steps. (Lightning's ``current_epoch``
    also counts an epoch that max_steps cut short, so after ``resume=auto`` it runs one ahead of the data: the
    resumed run's first complete epoch would be named one too high.)"""
    return trainer.global_step // _steps_per_epoch(trainer)


def _steps_per_epoch(trainer: L.Trainer) -> int:
    return max(1, math.ceil(trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)))


class ShapeClassifier(FMNISTClassifierModule):
    """A network (:class:`shapebias.models.cnn.SmallResNet`, or any torchvision-style classifier) trained with
    cross-entropy on the shape class of cue-conflict images (the training and validation steps of gencore's image
    classifier module); SGD with Nesterov momentum, linear warm-up then cosine decay; flips and translations of up to
    1/16 of the side, the border filled with the stimuli's grey.

    Args:
        net: the classifier; its stages (``stages``: stage name -> module path, default the ResNet map of the paper's
            code) are what ``shapebias-dims`` / ``-dynamics`` / ``-readout`` read.
        num_classes: shape classes (10 for the Fashion-MNIST silhouettes).
        data: the cue-conflict settings the network was trained on (image_size, textures, background, ...), kept so
            that sampling and evaluation draw held-out stimuli of the same kind.
        snapshot_every_n_epochs: per-epoch snapshots for ``shapebias-dynamics`` (None: none).
        snapshot_steps: optimizer steps after which to snapshot as well (a finer look inside the first epochs).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        *,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_steps: int = 100,
        max_steps: int = 2000,
        label_smoothing: float = 0.0,
        augment: bool = True,
        stages: Mapping[str, str] | None = None,
        data: Mapping[str, Any] | None = None,
        snapshot_every_n_epochs: int | None = 1,
        snapshot_steps: Sequence[int] = (),
    ) -> None:
        super().__init__(
            net, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, max_steps=max_steps, augment=augment
        )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        for name, value in (("lr", lr), ("max_steps", max_steps)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if snapshot_every_n_epochs is not None and snapshot_every_n_epochs < 1:
            raise ValueError(
                f"snapshot_every_n_epochs must be >= 1 (or None: no snapshots), got {snapshot_every_n_epochs}"
            )
        out = _output_width(net)
        if out is not None and out != num_classes:
            raise ValueError(f"the network has {out} outputs but num_classes={num_classes}")
        self.num_classes, self.momentum, self.warmup_steps = num_classes, momentum, warmup_steps
        from shapebias.encoders import STAGE_MAPS

        self.stages = dict(stages) if stages is not None else dict(STAGE_MAPS["resnet"])
        self.data = dict(data or {})
        self.snapshot_every_n_epochs = snapshot_every_n_epochs
        self.snapshot_steps = [int(x) for x in snapshot_steps]
        if any(x < 1 for x in self.snapshot_steps):
            raise ValueError(f"snapshot_steps must be optimizer steps >= 1, got {self.snapshot_steps}")
        self._stimuli: Any = None

    # ------------------------------------------------------------------------------------------ training

    augment_shift = None  # 1/16 of the side
    augment_fill = 0.0  # the stimuli's grey

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _lr_lambda(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min((step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.net.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.net.named_parameters() if p.ndim <= 1]  # BN and biases: no weight decay
        opt = torch.optim.SGD(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            momentum=self.momentum,
            nesterov=True,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def configure_callbacks(self) -> list[L.Callback]:
        if self.snapshot_every_n_epochs is None:
            return []
        return [EpochSnapshots(self.snapshot_every_n_epochs, self.snapshot_steps)]

    # ----------------------------------------------------------------------------------------- analysis

    def extractor(self, *, frozen: bool = True) -> Any:
        """A :class:`shapebias.encoders.FeatureExtractor` over this network's stages (inputs in [-1, 1], as it was
        trained). ``frozen`` (the analyses): the network is put in eval mode and out of autograd for good."""
        from shapebias.encoders import FeatureExtractor

        return FeatureExtractor(self.net, self.stages, name=type(self.net).__name__, frozen=frozen)

    def stimuli(self, split: str = "test") -> Any:
        """Held-out cue-conflict stimuli of the kind the network was trained on (every content under every texture)."""
        from shapebias.data import CueConflict

        if self._stimuli is None or self._stimuli.split != split:
            keys = ("image_size", "textures", "background", "object_scale", "seed")
            kwargs = {k: self.data[k] for k in keys if self.data.get(k) is not None}
            kwargs["num_contents"] = int(self.data.get("eval_contents", 200))
            self._stimuli = CueConflict(split=split, pairing="all", **kwargs)
        return self._stimuli

    @torch.no_grad()
    def generate(self, n: int, split: str = "test") -> dict[str, Any]:
        """``n`` held-out cue-conflict stimuli (drawn with the global generator: seeded per batch by
        ``shapebias-sample``) and the network's prediction for each: images, predicted classes as ``labels``, and
        a caption naming the true shape, the texture and the prediction."""
        ds = self.stimuli(split)
        idx = torch.randint(0, len(ds), (n,)).tolist()
        items = [ds[i] for i in idx]
        x = torch.stack([it["image"] for it in items]).to(self.device)
        pred = self.net(x).argmax(1).cpu()
        names = ds.class_names
        captions = [
            f"shape: {names[it['label']]} | texture: {ds.texture_names[it['texture']]} | predicted: {names[p]}"
            for it, p in zip(items, pred.tolist(), strict=True)
        ]
        return {"images": x.cpu(), "labels": pred, "captions": captions}


def _output_width(net: nn.Module) -> int | None:
    fc = getattr(net, "fc", None)
    return int(fc.out_features) if isinstance(fc, nn.Linear) else None
