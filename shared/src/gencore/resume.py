"""Exact resume: a killed run, resumed from its last checkpoint, ends with the weights an uninterrupted run has.

Lightning restores the weights, optimizers, schedulers, callbacks and loop counters, but not where the epoch's data
stream was nor the random number generators, so a run resumed mid-epoch feeds the epoch's first batches again and
draws other timesteps / noise / dropout masks from then on. Two pieces close that gap:

- :class:`ResumableSampler` — the epoch's order is a function of (seed, epoch) only (a ``torch.Generator`` seeded
  per epoch, never the global RNG), split over the processes of a distributed run like ``DistributedSampler``, and it
  can start an epoch after the items a checkpointed run had already consumed;
- :class:`ExactResume` — a callback that stores the torch (CPU and CUDA), numpy and Python RNG states in every
  checkpoint and, when a run resumes, puts them back and tells the sampler where the epoch was, just before the first
  resumed batch.

``gencore.data.DataModule`` builds its training loader on a :class:`ResumableSampler` and ``gencore.run.train``
adds :class:`ExactResume`, so every recipe resumes exactly (with ``num_workers=0``; worker processes keep their own
RNG streams, seeded per epoch, so augmentations drawn inside workers may differ after a resume).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

log = logging.getLogger(__name__)

__all__ = ["ExactResume", "ResumableSampler", "get_rng_states", "set_rng_states"]


class ResumableSampler(Sampler[int]):
    """Indices of one epoch: ``randperm(num_items)`` from a generator seeded with ``seed + epoch`` (or ``range`` when
    not shuffling), this process's share of them (every ``num_replicas``-th, padded to equal shares as
    ``DistributedSampler``), optionally starting after the first ``skip`` of that share.

    ``num_replicas`` / ``rank`` default to the ``torch.distributed`` group when one is initialised at iteration
    time, else 1 / 0. ``len()`` is the full share (what Lightning counts an epoch in), also in an epoch that resumes.
    """

    def __init__(
        self,
        num_items: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if num_items < 1:
            raise ValueError(f"ResumableSampler: num_items must be >= 1, got {num_items}")
        self.num_items, self.shuffle, self.seed = int(num_items), bool(shuffle), int(seed)
        self._replicas, self._rank = num_replicas, rank
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, items of this process's share already consumed)

    def _group(self) -> tuple[int, int]:
        import torch.distributed as dist

        if self._replicas is not None:
            return self._replicas, self._rank or 0
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at the start of every epoch."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, consumed: int) -> None:
        """The next iteration over ``epoch`` starts after its first ``consumed`` indices (this process's share)."""
        if consumed < 0:
            raise ValueError(f"ResumableSampler.resume_at: consumed must be >= 0, got {consumed}")
        self._resume = (int(epoch), int(consumed))

    def order(self, epoch: int) -> list[int]:
        """This process's indices of ``epoch``, from its start."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        replicas, rank = self._group()
        share = -(-self.num_items // replicas)
        order += order[: share * replicas - len(order)]  # pad so every process gets the same number
        return order[rank::replicas]

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        if self._resume is not None and self._resume[0] == self.epoch:
            order = order[self._resume[1] :]
        self._resume = None
        return iter(order)

    def __len__(self) -> int:
        replicas, _ = self._group()
        return -(-self.num_items // replicas)


def resumable_loader(loader: DataLoader) -> ResumableSampler | None:
    """The :class:`ResumableSampler` a DataLoader draws from (directly, or through its batch sampler), if any."""
    for candidate in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        if isinstance(candidate, ResumableSampler):
            return candidate
    return None


def get_rng_states() -> dict[str, Any]:
    """The torch (CPU, every CUDA device), numpy and Python RNG states, as tensors and plain values (checkpoints are
    read back with a restricted unpickler)."""
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global generator is what code uses
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_version), "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class ExactResume(L.Callback):
    """RNG states in every checkpoint; on resume, the RNGs and the data stream continue where the checkpoint was."""

    KEY = "genlab_rng_states"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[self.KEY] = get_rng_states()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(self.KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The data stream: the resumed epoch starts after the batches the checkpointed run had processed."""
        if self._pending is None:
            return
        loop = trainer.fit_loop
        batches_done = loop.epoch_loop.batch_progress.current.processed  # the checkpointed batch ran its step
        sampler = resumable_loader(trainer.train_dataloader) if trainer.train_dataloader is not None else None
        if sampler is not None:
            batch_size = trainer.train_dataloader.batch_size or 1
            sampler.resume_at(loop.epoch_progress.current.processed, batches_done * batch_size)
        elif batches_done:
            log.warning(
                "resuming mid-epoch (after %d batches) with a dataloader that cannot skip them: the epoch's first "
                "batches are fed again (gencore.resume.ResumableSampler resumes exactly)",
                batches_done,
            )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        """The RNGs, once, just before the first resumed step (after the epoch's iterator exists: creating it may
        draw from the global RNG, as it did before the checkpoint in the run that wrote it)."""
        if self._pending is not None:
            states, self._pending = self._pending, None
            set_rng_states(states)
