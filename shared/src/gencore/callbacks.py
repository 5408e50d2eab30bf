"""Lightning callbacks shared by the packages: EMA of the weights, image / video grids written to the run folder, and
``torch.compile`` of a recipe's networks (``callbacks=compile``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from gencore.viz import save_grid

log = logging.getLogger(__name__)

__all__ = ["EMA", "Compile", "ImageGridLogger"]


def _target(pl_module: nn.Module, attr: str | None, who: str = "EMA") -> nn.Module:
    if not attr:
        return pl_module
    mod: Any = pl_module
    for part in attr.split("."):
        if not hasattr(mod, part):
            raise ValueError(f"{who}: {type(pl_module).__name__} has no submodule {attr!r}")
        mod = getattr(mod, part)
    if not isinstance(mod, nn.Module):
        raise ValueError(f"{who}: {attr!r} is a {type(mod).__name__}, not an nn.Module")
    return mod


class Compile(L.Callback):
    """``torch.compile`` the recipe's trainable networks in place before training (``nn.Module.compile``: the state
    dict keeps its keys, so checkpoints, exports and resuming are unchanged).

    Args:
        modules: submodule names to compile (dotted); None: every direct child of the LightningModule that has
            trainable parameters (the denoiser, the transformer, ...; frozen first stages and text encoders stay
            eager).
        mode / fullgraph / dynamic / backend: passed to ``torch.compile`` (``backend="eager"`` checks the plumbing
            without code generation).
    """

    def __init__(
        self,
        modules: list[str] | None = None,
        mode: str | None = "default",
        fullgraph: bool = False,
        dynamic: bool | None = None,
        backend: str = "inductor",
    ) -> None:
        self.modules, self.mode, self.fullgraph, self.dynamic, self.backend = modules, mode, fullgraph, dynamic, backend
        self.compiled: list[str] = []

    def _names(self, pl_module: nn.Module) -> list[str]:
        if self.modules is not None:
            return [str(m) for m in self.modules]
        return [
            name
            for name, child in pl_module.named_children()
            if any(p.requires_grad for p in child.parameters()) and not getattr(child, "_genlab_frozen", False)
        ]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.compiled:
            return
        names = self._names(pl_module)
        if not names:
            raise ValueError(f"Compile: {type(pl_module).__name__} has no trainable submodule to compile")
        kwargs: dict[str, Any] = {"fullgraph": self.fullgraph, "dynamic": self.dynamic, "backend": self.backend}
        if self.backend == "inductor":
            kwargs["mode"] = self.mode
        for name in names:
            _target(pl_module, name, "Compile").compile(**kwargs)
        self.compiled = names
        log.info("torch.compile (%s, backend %s): %s", self.mode, self.backend, ", ".join(names))


class EMA(L.Callback):
    """Exponential moving average of the trainable parameters: ``ema = d·ema + (1 − d)·θ`` after each training batch.

    Args:
        decay: d. With ``warmup`` the decay is ``min(decay, (1 + n) / (10 + n))`` after n updates (LDM's ``LitEma``).
        update_every: update every k training batches (counted in batches, not optimizer steps, so GAN recipes
            with two optimizers behave the same).
        start_step: batches before the first update (the EMA copies the weights until then).
        target: dotted attribute of the submodule to average (default: the whole LightningModule).
        use_for_validation: evaluate validation with the EMA weights.

    The EMA state lives in Lightning checkpoints (resuming keeps it); :meth:`averaged_state_dict` gives the full
    state dict of the LightningModule with EMA weights substituted (``gencore.run`` exports that).
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every: int = 1,
        start_step: int = 0,
        target: str | None = None,
        use_for_validation: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        if update_every < 1 or start_step < 0:
            raise ValueError(f"EMA: update_every must be >= 1 and start_step >= 0, got {update_every}, {start_step}")
        self.decay, self.warmup, self.update_every, self.start_step = decay, warmup, update_every, start_step
        self.target, self.use_for_validation = target, use_for_validation
        self.shadow: dict[str, Tensor] = {}
        self.num_updates = 0
        self.batches_seen = 0
        self._pending: dict[str, Any] | None = None
        self._backup: dict[str, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target)

    def _params(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in _target(pl_module, self.target).named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.shadow:
            self.shadow = {n: p.detach().clone() for n, p in self._params(pl_module).items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning restores callback state (load_state_dict) between setup and on_fit_start.
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        params = self._params(pl_module)
        shadow = state["shadow"]
        if set(shadow) != set(params):
            raise ValueError(
                f"EMA: checkpoint averages {len(shadow)} tensors, the module has {len(params)} trainable parameters "
                f"(first differences: {sorted(set(shadow) ^ set(params))[:5]})"
            )
        self.shadow = {n: shadow[n].to(params[n].device, params[n].dtype).clone() for n in params}
        self.num_updates, self.batches_seen = int(state["num_updates"]), int(state["batches_seen"])

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.batches_seen += 1
        params = self._params(pl_module)
        if self.shadow and next(iter(self.shadow.values())).device != next(iter(params.values())).device:
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}
        if self.batches_seen <= self.start_step:
            for n, p in params.items():
                self.shadow[n].copy_(p)
            return
        if self.batches_seen % self.update_every:
            return
        d = self.current_decay()
        names = list(params)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach() for n in names], 1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def averaged(self, pl_module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``pl_module``'s target (restored on exit)."""
        params = self._params(pl_module)
        if not self.shadow:
            yield pl_module
            return
        backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])
        try:
            yield pl_module
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])

    def averaged_state_dict(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """``pl_module.state_dict()`` with the EMA weights in place of the trainable ones."""
        with self.averaged(pl_module):
            return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def _swap_in(self, pl_module: nn.Module) -> None:
        params = self._params(pl_module)
        if not self.shadow or self._backup is not None:
            return
        self._backup = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.shadow[n])

    def _swap_out(self, pl_module: nn.Module) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for n, p in self._params(pl_module).items():
                p.copy_(self._backup[n])
        self._backup = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.use_for_validation and not trainer.sanity_checking:
            self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "shadow": {n: t.detach().cpu() for n, t in self.shadow.items()},
            "num_updates": self.num_updates,
            "batches_seen": self.batches_seen,
            "decay": self.decay,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # applied in on_fit_start, once the module is known


class ImageGridLogger(L.Callback):
    """Every ``every_n_steps`` training batches (and at the end of training) call ``pl_module.log_images(batch,
    n=max_images)`` and write each returned tensor as a PNG grid: ``<run_dir>/images/<key>/step_XXXXXXX.png``.

    ``log_images`` returns ``{name: (B, C, H, W) images or (B, C, T, H, W) videos in [-1, 1]}`` (the official
    taming / ldm convention). Runs in eval mode under ``no_grad``; the EMA weights are used when an :class:`EMA`
    callback is present. Grids also go to TensorBoard when that logger is active.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        max_images: int = 16,
        dirname: str = "images",
        at_train_end: bool = True,
        use_ema: bool = True,
        log_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if every_n_steps < 1 or max_images < 1:
            raise ValueError(
                f"ImageGridLogger: every_n_steps and max_images must be >= 1, got {every_n_steps}, {max_images}"
            )
        self.every_n_steps, self.max_images, self.dirname = every_n_steps, max_images, dirname
        self.at_train_end, self.use_ema, self.log_kwargs = at_train_end, use_ema, dict(log_kwargs or {})
        self.batches_seen = 0
        self._last_batch: Any = None
        self.written: list[Path] = []

    def _root(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.dirname

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.batches_seen += 1
        self._last_batch = batch
        if self.batches_seen % self.every_n_steps == 0:
            self.write_grids(trainer, pl_module, batch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and self._last_batch is not None and self.batches_seen % self.every_n_steps:
            self.write_grids(trainer, pl_module, self._last_batch)

    def write_grids(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> list[Path]:
        if not hasattr(pl_module, "log_images"):
            raise ValueError(f"ImageGridLogger: {type(pl_module).__name__} has no log_images(batch, n) method")
        if not trainer.is_global_zero:
            return []
        ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None) if self.use_ema else None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), ema.averaged(pl_module) if ema else contextlib.nullcontext():
                images = pl_module.log_images(batch, n=self.max_images, **self.log_kwargs)
        finally:
            pl_module.train(was_training)
        paths = []
        step = trainer.global_step
        for key, value in images.items():
            if not isinstance(value, Tensor) or value.dim() not in (4, 5):
                continue
            path = save_grid(value[: self.max_images], self._root(trainer) / key / f"step_{step:07d}.png")
            paths.append(path)
            for lg in trainer.loggers:
                exp = getattr(lg, "experiment", None)
                if hasattr(exp, "add_image"):
                    from gencore.viz import make_grid

                    exp.add_image(key, (make_grid(value[: self.max_images]) + 1) / 2, step)
        self.written.extend(paths)
        return paths
