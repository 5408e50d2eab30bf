"""What keeps a run from losing work or writing garbage: a lock on the run folder, and a guard against non-finite
weights.

- :class:`RunLock` — one training process per run folder. A second run started with the same ``run_dir`` stops with
  a clear error instead of both writing (and one losing) checkpoints; a lock left by a killed run (its process is
  gone) is taken over, with a warning.
- :class:`FiniteGuard` — a callback that notices when the weights stop being finite (a learning rate of 1e6, an
  overflow) and stops the run with the step at which it happened, before a checkpoint or an export holds such
  weights, so the last finite checkpoint is kept. It adds no host sync per step: each step folds "are all trainable
  weights finite" into a device-side flag (one fused ``_foreach_norm``), read on the host every ``check_every_n_steps``
  steps, before every checkpoint and at the end. ``skip_bad_steps=True`` instead drops each update whose gradients
  are not finite (a host read per step: the opt-in cost) and stops after ``max_skipped`` in a row.
- :func:`check_finite` — the same question for a state dict (exports, crash checkpoints).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["FiniteGuard", "NonFiniteError", "RunLock", "RunLockedError", "check_finite"]


class RunLockedError(RuntimeError):
    """Another live process trains in this run folder."""


class NonFiniteError(RuntimeError):
    """The weights (or the gradients of every recent step) stopped being finite."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``<run_dir>/.lock`` holding the owner's pid, host and start time, created atomically (``O_EXCL``).

    ``acquire()`` raises :class:`RunLockedError` naming the owner when a live process holds it; a lock whose process
    no longer exists on this host (a killed run) is replaced. Use as a context manager."""

    NAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / self.NAME
        self.held = False

    def _owner(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                    log.warning("run folder %s: taking over the lock of pid %d, which is gone", self.path.parent, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"pid {pid} on {host} since {owner.get('since')}" if owner else "an unknown process"
                raise RunLockedError(
                    f"run folder {self.path.parent} is in use by {who}: wait for that run, pick another run_dir, or "
                    f"delete {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunLockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            if self._owner().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _trainable(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def check_finite(state: Mapping[str, Tensor] | nn.Module) -> list[str]:
    """Names of the floating-point tensors of a state dict (or a module's parameters) that hold NaN or inf."""
    items: Iterable[tuple[str, Tensor]] = state.named_parameters() if isinstance(state, nn.Module) else state.items()
    named = [(k, v) for k, v in items if isinstance(v, Tensor) and v.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu()
    return [k for (k, _), ok in zip(named, finite.tolist()) if not ok]


class FiniteGuard(L.Callback):
    """Stop (or, opt-in, skip updates) when the weights stop being finite; see the module docstring.

    Args:
        check_every_n_steps: how often the device-side flag is read on the host (optimizer steps).
        skip_bad_steps: drop an update whose gradients are not finite instead of applying it (reads the gradients'
            finiteness on the host every step).
        max_skipped: with ``skip_bad_steps``, stop after this many skipped updates in a row.
    """

    def __init__(self, check_every_n_steps: int = 50, skip_bad_steps: bool = False, max_skipped: int = 100) -> None:
        if check_every_n_steps < 1 or max_skipped < 1:
            raise ValueError(
                f"FiniteGuard: check_every_n_steps and max_skipped must be >= 1, got {check_every_n_steps}, "
                f"{max_skipped}"
            )
        self.check_every_n_steps, self.skip_bad_steps, self.max_skipped = (
            check_every_n_steps,
            skip_bad_steps,
            max_skipped,
        )
        self._first_bad: Tensor | None = None  # device: the first step whose weights were not finite, -1 if none
        self._step: Tensor | None = None  # device copy of the step counter
        self.skipped, self._skipped_in_a_row = 0, 0

    def _flag(self, device: torch.device, step: int) -> None:
        if self._first_bad is None or self._first_bad.device != device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=device)
            self._step = torch.full((), step, dtype=torch.long, device=device)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        params = _trainable(pl_module)
        if not params:
            return
        self._flag(params[0].device, trainer.global_step)
        norms = torch.stack([n.to(params[0].device) for n in torch._foreach_norm(params)])
        bad = ~torch.isfinite(norms).all()
        self._step.fill_(trainer.global_step)  # the step just finished (a device fill, no sync)
        self._first_bad = torch.where(bad & (self._first_bad < 0), self._step, self._first_bad)
        if trainer.global_step % self.check_every_n_steps == 0:
            self.check(trainer)

    def check(self, trainer: L.Trainer | None = None) -> None:
        """Read the flag (one host sync); raise :class:`NonFiniteError` with the step if the weights went bad."""
        if self._first_bad is None:
            return
        first = int(self._first_bad)
        if first >= 0:
            at = f"at step {first}" if first > 0 else "at the first step"
            raise NonFiniteError(
                f"the weights stopped being finite {at} (NaN or inf; a learning rate too large, or an overflow): "
                "stopped; the last finite checkpoint is kept and nothing non-finite is exported. Lower the "
                "learning rate, clip gradients (trainer.gradient_clip_val), or resume with callbacks.finite_guard."
                "skip_bad_steps=true"
            )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.check(trainer)  # refuse to write a checkpoint of non-finite weights

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if not self.skip_bad_steps:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        if bool(torch.isfinite(torch.stack([n.to(grads[0].device) for n in torch._foreach_norm(grads)])).all()):
            self._skipped_in_a_row = 0
            return
        for group in optimizer.param_groups:  # a parameter without a gradient is left alone by every torch optimizer
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        self._skipped_in_a_row += 1
        log.warning("step %d: non-finite gradients, update skipped (%d so far)", trainer.global_step, self.skipped)
        if self._skipped_in_a_row >= self.max_skipped:
            raise NonFiniteError(
                f"{self._skipped_in_a_row} updates in a row had non-finite gradients (last at step "
                f"{trainer.global_step}): stopped"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
