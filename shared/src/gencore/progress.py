"""Progress for long work, in log lines: ``<stage>: step 40/400 (10%), 12 s elapsed, ETA 1 min 48 s``.

Log lines rather than a redrawn bar, so progress shows the same in a terminal, in ``make demo | tee``, in a CI log and
in a batch job's output file. :class:`Progress` paces itself (at most one line per ``every_s`` seconds, plus the
first and the last) and :class:`ProgressLog` is its Lightning callback for training (rank 0 only; the step counter is
the trainer's global step, so a resumed run counts from where it resumed).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L

log = logging.getLogger("gencore.progress")


def format_seconds(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Counts ``done`` out of ``total`` units of ``stage`` and logs elapsed time and an ETA (from the rate since it
    was created; ``initial``: units already done then, e.g. the step a run resumed at).

    ``update(done)`` logs the first update, the last unit, and in between at most one line per ``every_s`` seconds;
    ``enabled=False`` (other ranks) makes it silent.
    """

    def __init__(
        self,
        stage: str,
        total: int,
        *,
        unit: str = "step",
        initial: int = 0,
        every_s: float = 10.0,
        enabled: bool = True,
    ) -> None:
        if total < 0:
            raise ValueError(f"Progress: total must be >= 0, got {total}")
        self.stage, self.total, self.unit, self.every_s, self.enabled = stage, int(total), unit, every_s, enabled
        self.initial = int(initial)
        self.start = time.perf_counter()
        self._last_log = -float("inf")
        self.lines: list[str] = []

    def line(self, done: int, extra: str = "") -> str:
        elapsed = time.perf_counter() - self.start
        text = f"{self.stage}: {self.unit} {done}/{self.total}" if self.total else f"{self.stage}: {self.unit} {done}"
        if self.total:
            text += f" ({100 * done / self.total:.0f}%)"
        text += f", {format_seconds(elapsed)} elapsed"
        if self.initial < done < self.total and elapsed > 0:
            text += f", ETA {format_seconds((self.total - done) * elapsed / (done - self.initial))}"
        return text + (f", {extra}" if extra else "")

    def due(self, done: int) -> bool:
        """Whether :meth:`update` with ``done`` would write a line."""
        if not self.enabled:
            return False
        return not self.lines or done >= self.total or time.perf_counter() - self._last_log >= self.every_s

    def update(self, done: int, extra: str = "") -> bool:
        """Log ``done``/``total`` when due; returns whether a line was written."""
        if not self.due(done):
            return False
        self._last_log = time.perf_counter()
        text = self.line(done, extra)
        self.lines.append(text)
        log.info(text)
        return True


class ProgressLog(L.Callback):
    """Training progress as log lines: ``<stage>: step k/max_steps (p%), elapsed, ETA, <metrics>``.

    ``stage`` defaults to the module's class name; ``metrics`` are the logged values shown with each line (read
    from ``trainer.callback_metrics`` only when a line is due; by default the logged ``train/...loss`` values)."""

    def __init__(self, stage: str | None = None, every_s: float = 10.0, metrics: tuple[str, ...] = ()) -> None:
        self.stage, self.every_s, self.metrics = stage, every_s, tuple(metrics)
        self.progress: Progress | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0
        if not total and trainer.max_epochs and trainer.num_training_batches != float("inf"):
            total = int(trainer.max_epochs * trainer.num_training_batches)
        stage = self.stage or type(pl_module).__name__
        self.progress = Progress(
            stage, total, initial=trainer.global_step, every_s=self.every_s, enabled=trainer.is_global_zero
        )

    def _extra(self, trainer: L.Trainer) -> str:
        names = (
            self.metrics
            or tuple(k for k in trainer.callback_metrics if k.startswith("train/") and k.endswith("loss"))[:2]
        )
        shown = []
        for name in names:
            value: Any = trainer.callback_metrics.get(name)
            if value is not None:
                shown.append(f"{name} {float(value):.4g}")
        return ", ".join(shown)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.progress is not None and self.progress.due(trainer.global_step):
            self.progress.update(trainer.global_step, self._extra(trainer))
