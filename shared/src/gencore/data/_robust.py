"""Skip-and-count for datasets over files: a bad file is reported once, counted, and never crashes an epoch.

A bad item is *replaced*, not dropped: the index keeps its length (a DataLoader's sampler has already drawn its
indices when a file turns out to be unreadable, so the index cannot shrink mid-epoch), and the slot is filled with a
readable item drawn at random. The draw is seeded by ``(seed, index)`` alone, so the same bad index gets the same
replacement in every worker process, every epoch and every run, whatever order the workers met the bad files in; and
bad items spread their replacements uniformly over the readable ones instead of doubling their neighbour.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Uniform draws tried before walking a full permutation (which is O(n) but guarantees an answer or a clear error).
_MAX_DRAWS = 64
_READ_ERRORS = (OSError, ValueError, RuntimeError, SyntaxError)


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
    """Mixin for datasets whose items come from files: a bad item is replaced by a random readable one.

    Subclasses provide ``_num_items()``, ``_load_item(i)`` and ``_item_path(i)``; a failing ``_load_item`` marks the
    item bad (warning + counter, see ``num_skipped`` / ``skipped``) and returns in its place the first readable
    index of a sequence of uniform draws seeded by ``(seed, i)``. The replacement of an index is therefore
    reproducible (the same in every worker, epoch and run) and uniform over the readable items; ``replacements``
    lists the ones made in this process. The index never shrinks, so ``len`` stays what the sampler was built on.
    """

    skip_log: SkipLog
    _bad: set[int]
    _replaced: dict[int, int]
    replacement_seed: int

    def _init_robust(self, owner: str, seed: int = 0) -> None:
        if int(seed) < 0:
            raise ValueError(f"{owner}: seed must be >= 0, got {seed}")
        self.skip_log = SkipLog(owner)
        self._bad = set()
        self._replaced = {}
        self.replacement_seed = int(seed)

    @property
    def num_skipped(self) -> int:
        """How many files were found unreadable so far (at indexing time and in this process since)."""
        return len(self.skip_log)

    @property
    def skipped(self) -> dict[str, str]:
        return dict(self.skip_log.skipped)

    @property
    def replacements(self) -> dict[int, int]:
        """``{bad index: index returned in its place}`` for the bad items met in this process."""
        return dict(self._replaced)

    def _num_items(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load_item(self, i: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _item_path(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return self._num_items()

    def _try_load(self, j: int) -> tuple[bool, Any]:
        if j in self._bad:
            return False, None
        try:
            return True, self._load_item(j)
        except _READ_ERRORS as err:
            self._bad.add(j)
            self.skip_log.skip(self._item_path(j), f"{type(err).__name__}: {err}")
            return False, None

    def _candidates(self, i: int, n: int):
        """The replacement candidates of bad index ``i``, in their fixed order: uniform draws, then a permutation."""
        rng = np.random.default_rng([self.replacement_seed, i])
        for j in rng.integers(0, n, size=_MAX_DRAWS):
            if j != i:
                yield int(j)
        for j in rng.permutation(n):
            if j != i:
                yield int(j)

    def _replace(self, i: int) -> tuple[int, Any]:
        """(index, item) returned in place of bad index ``i``: the first candidate that reads."""
        n = self._num_items()
        if i in self._replaced:
            ok, item = self._try_load(self._replaced[i])
            if ok:
                return self._replaced[i], item
        for j in self._candidates(i, n):
            ok, item = self._try_load(j)
            if ok:
                self._replaced[i] = j
                return j, item
        raise DataReadError(
            f"{self.skip_log.owner}: all {n} items are unreadable (skipped: {len(self.skip_log)} files)"
        )

    def __getitem__(self, i: int) -> Any:
        n = self._num_items()
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        i %= n
        ok, item = self._try_load(i)
        return item if ok else self._replace(i)[1]
