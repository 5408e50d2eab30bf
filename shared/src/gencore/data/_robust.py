"""Skip-and-count for datasets over files: a bad file is reported once, counted, and never crashes an epoch."""

from __future__ import annotations

import logging
import warnings
from typing import Any

log = logging.getLogger(__name__)


class DataReadError(RuntimeError):
    """No readable sample left: every file of a dataset failed to load."""


class SkipLog:
    """Which files were skipped and why. Each worker process keeps its own copy; the ones found while indexing
    (in the main process, at construction) are always visible."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.skipped: dict[str, str] = {}

    def skip(self, path: str, reason: str) -> None:
        if path not in self.skipped:
            self.skipped[path] = reason
            msg = f"{self.owner}: skipping unreadable file {path}: {reason}"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def __len__(self) -> int:
        return len(self.skipped)


class RobustItems:
    """Mixin for datasets whose items come from files: ``__getitem__`` falls back to the next readable item.

    Subclasses provide ``_num_items()``, ``_load_item(i)`` and ``_item_path(i)``; a failing ``_load_item`` marks
    the item bad (warning + counter) and the next index is tried, so one truncated file never kills an epoch.
    """

    skip_log: SkipLog
    _bad: set[int]

    def _init_robust(self, owner: str) -> None:
        self.skip_log = SkipLog(owner)
        self._bad = set()

    @property
    def num_skipped(self) -> int:
        """How many files were found unreadable so far (at indexing time and in this process since)."""
        return len(self.skip_log)

    @property
    def skipped(self) -> dict[str, str]:
        return dict(self.skip_log.skipped)

    def _num_items(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_item(self, i: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _item_path(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return self._num_items()

    def __getitem__(self, i: int) -> Any:
        n = self._num_items()
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i %= n
        for step in range(n):
            j = (i + step) % n
            if j in self._bad:
                continue
            try:
                return self._load_item(j)
            except (OSError, ValueError, RuntimeError, SyntaxError) as err:
                self._bad.add(j)
                self.skip_log.skip(self._item_path(j), f"{type(err).__name__}: {err}")
        raise DataReadError(
            f"{self.skip_log.owner}: all {n} items are unreadable (skipped: {len(self.skip_log)} files)"
        )
