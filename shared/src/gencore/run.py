"""Run plumbing: ``train(cfg)``, ``sample(cfg)``, ``evaluate(cfg)`` over Hydra configs and a Lightning Trainer.

A training config has these nodes (the packages' ``train.yaml`` build them from the shared groups in ``configs/``)::

    run_dir: runs/<task>/<timestamp>   # everything of the run goes here
    seed: 0
    resume: null                       # null | auto (this run_dir's last checkpoint) | a .ckpt | a run folder
    datamodule: {_target_: ...}        # a LightningDataModule
    module: {_target_: ...}            # the LightningModule (networks, objectives injected as nested nodes)
    trainer: {max_steps: ..., accelerator: ..., strategy: ..., precision: ...}   # lightning.Trainer kwargs
    logger: {csv: {_target_: ...}}     # name -> logger node (null disables)
    callbacks: {ema: {...}, images: {...}}
    checkpoint: {every_n_train_steps: 500, save_top_k: 1}
    export: {enabled: true, use_ema: true}

Checkpoints (``<run_dir>/checkpoints/step*.ckpt`` and ``last.ckpt``) are written atomically and read back with the
safe loader; a final ``last.ckpt`` is written when training ends, an ``on_exception.ckpt`` when it crashes. At the end
the weights (EMA if present) are exported with ``gencore.io.export`` to ``<run_dir>/export``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from gencore import io
from gencore.callbacks import EMA
from gencore.progress import Progress
from gencore.validate import ConfigError
from gencore.viz import save_grid, to_uint8

log = logging.getLogger(__name__)

__all__ = [
    "ExceptionCheckpoint",
    "SafeCheckpointIO",
    "TrainResult",
    "check_sample_config",
    "evaluate",
    "find_resume_checkpoint",
    "generate",
    "generate_sharded",
    "load_for_sampling",
    "load_module",
    "pick_device",
    "process_state",
    "sample",
    "sample_request",
    "sweep_value",
    "train",
    "write_metrics",
    "write_samples",
]

CKPT_DIR = "checkpoints"
LAST = "last.ckpt"


CRASH = "on_exception.ckpt"
SIDECAR = ".json"  # <checkpoint>.json: its step, written after the checkpoint itself (so it marks a complete file)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: writes atomically (temp file + rename) and then a small ``<file>.json`` with the
    checkpoint's step (what ``resume=auto`` compares); reads with ``gencore.io.load_checkpoint``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO does not take storage_options")
        with io.atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        meta = {"global_step": int(checkpoint.get("global_step", 0)), "epoch": int(checkpoint.get("epoch", 0))}
        with io.atomic_path(str(path) + SIDECAR) as tmp:
            tmp.write_text(json.dumps(meta))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return io.load_checkpoint(path, map_location=map_location if map_location is not None else "cpu")

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        Path(str(path) + SIDECAR).unlink(missing_ok=True)


class ExceptionCheckpoint(L.Callback):
    """Write ``on_exception.ckpt`` when training dies after it started (checkpoint restored, first batch on its way),
    and its weights are finite: a run that fails while being set up (a wrong data path) has nothing to save, and
    its crash checkpoint must not shadow the run's real ones."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)
        self.started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from gencore.guards import NonFiniteError, check_finite

        if not self.started or isinstance(exception, NonFiniteError):
            return
        bad = check_finite(pl_module)
        if bad:
            log.warning("not writing %s: %d weight tensors are not finite (%s, ...)", CRASH, len(bad), bad[0])
            return
        trainer.save_checkpoint(self.dirpath / CRASH, weights_only=False)


@dataclass
class TrainResult:
    module: L.LightningModule
    trainer: L.Trainer
    run_dir: Path
    checkpoint_dir: Path
    export_dir: Path | None
    metrics: dict[str, float]  # the trainer's last logged / callback metrics, as floats


def _cfg(cfg: Any) -> DictConfig:
    if isinstance(cfg, DictConfig):
        return cfg
    if isinstance(cfg, Mapping):
        return OmegaConf.create(dict(cfg))
    raise ValueError(f"expected a config mapping / DictConfig, got {type(cfg).__name__}")


def _require(cfg: DictConfig, *keys: str, where: str) -> None:
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{where}: config is missing {', '.join(missing)} (top-level keys: {sorted(cfg.keys())})")


def _instantiate(node: Any, **kwargs: Any) -> Any:
    from hydra.utils import instantiate

    return instantiate(node, _convert_="all", **kwargs)


def _build(node: Any, where: str) -> Any:
    """Instantiate a config node; a ValueError / FileNotFoundError of a constructor becomes a ConfigError naming the
    node's config path (``module.unet: num_head_channels=24 does not divide ...``) instead of Hydra's traceback."""
    from hydra.errors import InstantiationException

    try:
        return _instantiate(node)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if not isinstance(cause, (ValueError, FileNotFoundError)):
            raise
        text = str(err)
        key = text.rsplit("full_key: ", 1)[-1].strip() if "full_key: " in text else ""
        path = f"{where}.{key}" if key and not key.startswith(where) else (key or where)
        raise ConfigError(f"{path}: {cause}") from cause
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}: {err}") from err


def _ddp_child_run_dir(run_dir: Path) -> Path:
    """A DDP process that Lightning started for rank > 0 re-runs the command line with ``hydra.run.dir`` set to the
    first process's folder; a default run_dir (a timestamp) would differ, so the child takes Hydra's."""
    if _is_main_process():
        return run_dir
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().run.dir).expanduser().resolve() if HydraConfig.initialized() else run_dir
    except (ImportError, ValueError):
        return run_dir


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; anything else is passed to ``torch.device``."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint file: from its ``.json`` sidecar, else by reading it (None if it cannot be read)."""
    path = Path(path)
    sidecar = Path(str(path) + SIDECAR)
    try:
        return int(json.loads(sidecar.read_text())["global_step"])
    except (OSError, ValueError, KeyError):
        pass
    try:
        return int(io.load_checkpoint(path).get("global_step", 0))
    except Exception as err:  # a truncated or foreign file is not a resume point
        log.warning("resume: %s cannot be read (%s: %s); ignoring it", path, type(err).__name__, err)
        return None


def find_resume_checkpoint(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """Where to resume from: ``None`` -> fresh start; ``auto`` -> the complete checkpoint in ``run_dir/checkpoints``
    with the highest step (``last.ckpt``, ``step*.ckpt`` or ``on_exception.ckpt``; on a tie the regular one); a
    ``.ckpt`` file; a run folder (its checkpoint with the highest step)."""
    if resume in (None, "", False):
        return None
    if str(resume) == "auto":
        return newest_checkpoint(Path(run_dir) / CKPT_DIR)
    p = Path(resume)
    if p.is_file():
        return p
    for folder in (p / CKPT_DIR, p):
        found = newest_checkpoint(folder, quiet=True)
        if found is not None:
            return found
    raise FileNotFoundError(f"resume={resume!r}: no checkpoint file, and no readable checkpoint in {p / CKPT_DIR}")


def newest_checkpoint(folder: Path, *, quiet: bool = False) -> Path | None:
    """The readable ``*.ckpt`` of ``folder`` with the highest step (regular ones before the crash checkpoint)."""
    steps = {p: checkpoint_step(p) for p in sorted(folder.glob("*.ckpt"))} if folder.is_dir() else {}
    steps = {p: s for p, s in steps.items() if s is not None}
    if not steps:
        if not quiet:
            log.info("resume=auto: no checkpoint in %s, starting fresh", folder)
        return None
    return max(steps, key=lambda p: (steps[p], p.name != CRASH, p.name == LAST))


def check_resume_fits(module: nn.Module, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` into a ``module`` of another shape (a run folder resumed with a different
    experiment or model size) before anything in the run folder is rewritten: tensors the two share by name must
    agree in shape. (Keys only one side has are left to Lightning's load: a module may rename old keys itself.)"""
    state = io.extract_state_dict(io.load_checkpoint(checkpoint))
    mine = module.state_dict()
    bad = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(mine[k].shape)} now"
        for k, v in state.items()
        if k in mine and hasattr(v, "shape") and tuple(v.shape) != tuple(mine[k].shape)
    ]
    if bad:
        raise ConfigError(
            f"resume: {checkpoint} was trained with another model ({len(bad)} tensors differ in shape, e.g. "
            f"{bad[0]}): resume it with the config it was trained with (its run folder's config.yaml), or start a "
            "new run_dir"
        )


def remove_stray_temporaries(folder: Path) -> int:
    """Delete the ``.<name>.*.tmp`` files a killed atomic write left behind (call it holding the run lock)."""
    stray = list(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stray:
        p.unlink(missing_ok=True)
    if stray:
        log.info("removed %d unfinished temporary file(s) from %s", len(stray), folder)
    return len(stray)


def _build_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        cb = _instantiate(node)
        if not isinstance(cb, L.Callback):
            raise ValueError(f"callbacks.{name} built a {type(cb).__name__}, not a lightning Callback")
        callbacks.append(cb)
    ck = cfg.get("checkpoint") or {}
    every = ck.get("every_n_train_steps", 1000)
    if every is not None and every < 1:
        raise ValueError(f"checkpoint.every_n_train_steps must be >= 1, got {every}")
    callbacks.append(
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step:07d}",
            every_n_train_steps=every,
            save_top_k=ck.get("save_top_k", 1),
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
    )
    callbacks.append(ExceptionCheckpoint(ckpt_dir))
    from gencore.guards import FiniteGuard
    from gencore.progress import ProgressLog

    bar = bool((cfg.get("trainer") or {}).get("enable_progress_bar", True))
    if not any(isinstance(c, ProgressLog) for c in callbacks) and not (bar and sys.stderr.isatty()):
        callbacks.append(ProgressLog())  # no bar drawn (turned off, or a log file): progress as log lines
    from gencore.resume import ExactResume

    if not any(isinstance(c, FiniteGuard) for c in callbacks):
        callbacks.append(FiniteGuard())  # the default guard; callbacks.finite_guard configures it
    callbacks.append(ExactResume())
    return callbacks


def _build_loggers(cfg: DictConfig) -> list[Any]:
    loggers = []
    for _name, node in (cfg.get("logger") or {}).items():
        if node is not None:
            loggers.append(_instantiate(node))
    return loggers


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], loggers: list[Any], module: Any = None
) -> L.Trainer:
    """``lightning.Trainer(**cfg.trainer)`` with the run folder, callbacks, loggers and the safe checkpoint IO. A
    module whose steps leave some parameters out of a backward pass by design (the two players of a GAN:
    ``ddp_find_unused_parameters = True``) gets DDP's ``find_unused_parameters``."""
    kwargs = OmegaConf.to_container(cfg.get("trainer") or OmegaConf.create({}), resolve=True)
    assert isinstance(kwargs, dict)
    strategy = kwargs.get("strategy")
    if isinstance(strategy, Mapping) and str(strategy.get("_target_", "")).endswith("DDPStrategy"):
        if getattr(module, "ddp_find_unused_parameters", False):
            kwargs["strategy"] = {**strategy, "find_unused_parameters": True}
    for key in ("strategy", "plugins", "profiler"):
        value = kwargs.get(key)
        if isinstance(value, Mapping) and "_target_" in value:
            kwargs[key] = _instantiate(value)
    plugins = kwargs.pop("plugins", None) or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, TorchCheckpointIO) for p in plugins):
        plugins.append(SafeCheckpointIO())
    return L.Trainer(
        default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers or False, plugins=plugins, **kwargs
    )


# Lightning warnings that every genlab run would print, each by design: GAN recipes use manual optimization and their
# checkpoints hold the state after the step (what resuming needs); frozen first / condition stages stay in eval mode;
# a deprecation inside Lightning's own pytree helper.
EXPECTED_LIGHTNING_WARNINGS = (
    r"Using ModelCheckpoint with manual optimization",
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Checkpoint directory .* exists and is not empty",  # resume=auto continues in the run's own folder
    r".*your dataloader is not resumable",  # gencore.resume.ExactResume restores the data stream itself
    r"The dirpath has changed from",  # a new run from another run's weights: its top-k bookkeeping stays there
)


class _NoAdverts(logging.Filter):
    """Lines Lightning prints on every run that say nothing about it: the "💡 Tip: ... litlogger" advert, the TPU /
    HPU counts of a machine that has neither, and the default ``limit_val_batches=1.0`` restated."""

    SILENT = ("💡 Tip", "TPU available: False", "HPU available: False", "`Trainer(limit_val_batches=1.0)`")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.SILENT)


def quiet_lightning() -> None:
    """Lightning's console lines said once (under Hydra's logging) and without its adverts: for `train` and for
    a task that runs its own short Trainer fits (shapebias's readouts)."""
    # a configured root (Hydra's job logging): Lightning's own console handlers would print every line twice
    if logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in logger.filters):
            logger.addFilter(_NoAdverts())


def _is_main_process() -> bool:
    """Rank 0 of a distributed run (from the launcher's environment, before any Trainer exists), or a lone process."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _script(name: str) -> str:
    """A console script of this environment (beside the interpreter), else from PATH."""
    import shutil

    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"stages: the command {name!r} is not installed here (make install)")
    return found


def _refers_to(node: Any, key: str) -> bool:
    """Whether a config node still interpolates the top-level ``key`` (``${key}`` or ``${key.…}``) anywhere."""
    if node is None:
        return False
    tree = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    pattern = re.compile(r"\$\{\s*" + re.escape(key) + r"\s*[}.]")
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and pattern.search(item):
            return True
    return False


def train_missing_stages(cfg: DictConfig, run_dir: Path) -> None:
    """Stages a recipe needs and the config does not give, trained first (``stages`` in an experiment's YAML)::

        stages:
          first_stage: {command: ldm-train, experiment: autoencoder_fmnist_c16}

    For each ``stages.<key>`` whose top-level ``<key>`` (e.g. ``first_stage``) is null: ``<command>
    experiment=<experiment> run_dir=<run_dir>/<key> <stage_overrides>`` runs first (``debug=fast`` passes
    ``stage_overrides: [debug=fast]``, so the stage trains a few steps too), and ``<key>`` becomes its export. A stage
    already trained there (a resumed run, or another DDP process) is reused. Each one is announced with its command,
    so it can be rerun or replaced (``<key>=<a run or export you have>``)."""
    for key, spec in (cfg.get("stages") or {}).items():
        if spec is None or cfg.get(key) is not None or not _refers_to(cfg.get("module"), key):
            continue  # given, or not used (e.g. module.first_stage=null: a pixel-space run)
        folder = run_dir / key
        export = folder / "export"
        if not (export / io.WEIGHTS_NAME).is_file():
            if not _is_main_process():
                raise ConfigError(f"{key}: not given, and the first process has not trained it into {folder}")
            command = [
                _script(str(spec.command)),
                f"experiment={spec.experiment}",
                f"run_dir={folder}",
                *[str(o) for o in (spec.get("overrides") or [])],
                *[str(o) for o in (cfg.get("stage_overrides") or [])],
            ]
            shown = " ".join([Path(command[0]).name, *command[1:]])
            log.info(
                "%s not given: training it first: %s   (pass %s=<run or export> to use one you have)", key, shown, key
            )
            proc = subprocess.run(command, env=os.environ.copy())
            if proc.returncode != 0 or not (export / io.WEIGHTS_NAME).is_file():
                raise ConfigError(f"{key}: training it failed (exit {proc.returncode}): {shown}")
        else:
            log.info("%s: using the one trained earlier in %s", key, folder)
        OmegaConf.update(cfg, key, str(export), force_add=True)


def train(cfg: Any) -> TrainResult:
    """Train the module a config describes (see the module docstring), in this order, so that a bad config or a
    second run in the same folder loses nothing: validate the config (:func:`gencore.validate.validate_config`),
    take the run folder's lock, build datamodule and module and check they fit, write ``config.yaml``, fit (resuming
    if asked, exactly: :mod:`gencore.resume`), write ``last.ckpt``, export the (EMA) weights if they are finite."""
    from gencore.guards import NonFiniteError, RunLock, check_finite
    from gencore.validate import check_fits, validate_config

    cfg = _cfg(cfg)
    _require(cfg, "module", "datamodule", "run_dir", where="gencore.run.train")
    validate_config(cfg)
    quiet_lightning()
    L.seed_everything(int(cfg.get("seed", 0)), workers=True)
    run_dir = _ddp_child_run_dir(Path(str(cfg.run_dir)).expanduser().resolve())
    ckpt_dir = run_dir / CKPT_DIR
    main = _is_main_process()  # in DDP every process runs this; the main one holds the lock and writes
    with RunLock(run_dir) if main else contextlib.nullcontext():
        if main:
            log.info("run folder: %s", run_dir)
        train_missing_stages(cfg, run_dir)
        datamodule = _build(cfg.datamodule, "datamodule")
        module = _build(cfg.module, "module")
        if not isinstance(module, L.LightningModule):
            raise ValueError(f"module config built a {type(module).__name__}, not a LightningModule")
        check_fits(module, datamodule)
        resume_from = find_resume_checkpoint(cfg.get("resume"), run_dir)
        if resume_from is not None:
            check_resume_fits(module, resume_from)  # before config.yaml is rewritten
        if resume_from is None and main and (ckpt_dir / LAST).is_file() and not cfg.get("overwrite", False):
            raise ConfigError(
                f"run folder {run_dir} already holds a trained run ({ckpt_dir / LAST}): resume=auto continues it, a "
                "new run_dir starts another (overwrite=true replaces it)"
            )
        if main:
            remove_stray_temporaries(ckpt_dir)
            with io.atomic_path(run_dir / "config.yaml") as tmp:
                tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        callbacks = _build_callbacks(cfg, ckpt_dir)
        trainer = build_trainer(cfg, run_dir, callbacks, _build_loggers(cfg), module)
        if resume_from is not None and trainer.is_global_zero:
            log.info("resuming from %s", resume_from)
        with warnings.catch_warnings():
            for message in EXPECTED_LIGHTNING_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        if trainer.interrupted and trainer.is_global_zero:
            log.warning("training was interrupted at step %d; see %s", trainer.global_step, ckpt_dir)
        trainer.save_checkpoint(ckpt_dir / LAST, weights_only=False)

        export_dir = None
        ex = cfg.get("export") or {}
        if ex.get("enabled", True) and trainer.is_global_zero:
            ema = next((c for c in callbacks if isinstance(c, EMA)), None)
            state = ema.averaged_state_dict(module) if (ema is not None and ex.get("use_ema", True)) else None
            bad = check_finite(state if state is not None else module.state_dict())
            if bad:
                raise NonFiniteError(
                    f"not exporting: {len(bad)} tensors are not finite ({', '.join(bad[:3])}, ...); the checkpoints "
                    f"in {ckpt_dir} are kept"
                )
            export_dir = io.export(
                module,
                cfg,
                run_dir / "export",
                state_dict=state,
                metadata={"global_step": str(trainer.global_step), "ema": str(state is not None)},
            )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if trainer.is_global_zero:
        log.info("trained %d steps; run folder: %s", trainer.global_step, run_dir)
        if generates(module):
            log.info("sample from it: %s checkpoint=%s num_samples=16", _sibling_script("sample", module), run_dir)
        else:  # a first stage: evaluated by its reconstructions, used by the model trained over it
            log.info("evaluate it: %s checkpoint=%s", _sibling_script("eval", module), run_dir)
    return TrainResult(module, trainer, run_dir, ckpt_dir, export_dir, metrics)


def _sibling_script(verb: str, module: Any = None) -> str:
    """``ldm-train`` -> ``ldm-sample``: the console script of the same package for ``verb``; from Python (a demo, a
    notebook) the package's script whose entry point lives in the module's top-level package."""
    from importlib.metadata import entry_points

    scripts = entry_points(group="console_scripts")
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if name.endswith("-train") and f"{name.rsplit('-', 1)[0]}-{verb}" in scripts.names:
        return f"{name.rsplit('-', 1)[0]}-{verb}"
    if module is not None:  # e.g. ladd-train-demo (make demo-train): ladd-sample
        package = type(module).__module__.split(".", 1)[0]
        for ep in scripts:
            if ep.name.endswith(f"-{verb}") and _entry_point_package(ep.value) == package:
                return ep.name
    return f"<name>-{verb}"


# ----------------------------------------------------------------------------------------------------- sampling


def load_module(
    path: str | os.PathLike, module_cfg: Any = None, *, use_ema: bool = True, map_location: Any = "cpu"
) -> nn.Module:
    """A trained module from an export folder, a run folder (its ``export/``), or a Lightning ``.ckpt`` (built from
    ``module_cfg``, or the run's ``config.yaml`` beside ``checkpoints/``; EMA weights substituted when present)."""
    p = io.resolve_path(path)
    if p.is_dir():
        for folder in (p, p / "export"):
            if (folder / io.WEIGHTS_NAME).is_file():
                return io.load(folder, map_location=map_location)
        raise FileNotFoundError(f"{p}: no {io.WEIGHTS_NAME} here or in {p / 'export'}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if module_cfg is None:
        run_cfg = p.parent.parent / "config.yaml"
        if not run_cfg.is_file():
            raise ValueError(f"{p}: a .ckpt needs the module config (pass module=..., or keep the run's config.yaml)")
        # a shared run folder is somebody else's code too: only allowed targets (gencore.io.check_targets)
        module_cfg = io.check_targets(OmegaConf.load(run_cfg).module, source=str(run_cfg))
    module = _instantiate(module_cfg)
    ckpt = io.load_checkpoint(p, map_location=map_location)
    state = io.extract_state_dict(ckpt)
    if use_ema:
        for key, value in (ckpt.get("callbacks") or {}).items():
            if str(key).startswith("EMA") and isinstance(value, Mapping) and value.get("shadow"):
                named = dict(module.named_parameters())
                state = dict(state)
                for n, t in value["shadow"].items():
                    if n in named:
                        state[n] = t
                break
    io.load_state_dict(module, state, allow_missing=io.frozen_prefixes(module), source=str(p))
    return module.eval()


PER_SAMPLE_KWARGS = ("labels", "captions", "prompts")
#: images a ``generate`` may return beside its samples: the conditioning images (an inpainting model's masked
#: inputs, an editing model's sources) and known ground truth (exact edits); kept, gathered and written like labels
CONDITION_IMAGES = ("sources", "targets")


def _split_per_sample(kwargs: dict[str, Any], num_samples: int) -> tuple[dict[str, list], dict[str, Any]]:
    """(per-sample lists cycled to ``num_samples``, the other keyword arguments)."""
    rest = dict(kwargs)
    per_sample = {}
    for key in PER_SAMPLE_KWARGS:
        if rest.get(key) is not None:
            values = list(rest.pop(key))
            if not values:
                raise ValueError(f"generate: {key} is empty")
            per_sample[key] = [values[i % len(values)] for i in range(num_samples)]
        else:
            rest.pop(key, None)
    return per_sample, rest


def _generate_batch(
    module: nn.Module, start: int, n: int, seed: int, per_sample: dict[str, list], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Samples [start, start + n), seeded by their position (the same images whichever process makes them)."""
    torch.manual_seed(seed + start)
    out = module.generate(n, **kwargs, **{k: v[start : start + n] for k, v in per_sample.items()})
    if isinstance(out, Tensor):
        out = {"images": out}
    result: dict[str, Any] = {"images": out["images"].detach().float().cpu()[:n]}
    if out.get("labels") is not None:
        result["labels"] = torch.as_tensor(out["labels"]).cpu()[:n]
    if out.get("captions") is not None:
        result["captions"] = list(out["captions"])[:n]
    for key in CONDITION_IMAGES:
        if out.get(key) is not None:
            result[key] = out[key].detach().float().cpu()[:n]
    return result


def _concat(batches: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {"images": torch.cat([b["images"] for b in batches])}
    for key in ("labels", *CONDITION_IMAGES):
        if all(key in b for b in batches):
            result[key] = torch.cat([b[key] for b in batches])
    if all("captions" in b for b in batches):
        result["captions"] = [c for b in batches for c in b["captions"]]
    return result


def generates(module: nn.Module) -> bool:
    """Whether a trained module is a generative model (``generate(n, ...)``, or ``generates = True`` for one sampled
    through its package's own tasks, e.g. geofree's view synthesis from a source image), not a first stage."""
    return hasattr(module, "generate") or bool(getattr(module, "generates", False))


def _check_generate_args(module: nn.Module, num_samples: int, batch_size: int) -> None:
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"generate: num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    if not hasattr(module, "generate"):
        raise ValueError(
            f"{type(module).__name__} does not generate images (no generate(n, ...)): this checkpoint is a first stage "
            "(an autoencoder), not a generative model; sample from a run of the model trained over it (a "
            "transformer / diffusion run), or reconstruct with <name>-eval"
        )


@torch.no_grad()
def generate(
    module: nn.Module, num_samples: int, *, batch_size: int = 16, seed: int = 0, **kwargs: Any
) -> dict[str, Any]:
    """Call ``module.generate(n, **kwargs)`` batch by batch (batch at sample index i seeded with ``seed + i``) and
    concatenate the results, in one process (:func:`generate_sharded` splits the batches over processes).

    ``generate`` returns a (n, C, H, W) / (n, C, T, H, W) tensor in [-1, 1], or a dict with ``images`` and optional
    ``labels`` / ``captions``. Per-sample keyword arguments (``labels``, ``captions``, ``prompts``) are cycled to
    ``num_samples`` and sliced per batch, so ``labels=[0, 1, ..., 9]`` asks for every class in turn.
    """
    _check_generate_args(module, num_samples, batch_size)
    per_sample, rest = _split_per_sample(kwargs, num_samples)
    starts = range(0, num_samples, batch_size)
    return _concat(
        [_generate_batch(module, i, min(batch_size, num_samples - i), seed, per_sample, rest) for i in starts]
    )


def process_state(device: str | torch.device | None = "auto") -> Any:
    """accelerate's ``PartialState`` for this process: one process, or one of a ``torchrun`` / ``accelerate launch``
    group (gloo on CPUs, NCCL on GPUs); ``.device`` is this process's device (its own GPU in a group)."""
    from accelerate import PartialState

    wanted = None if device in (None, "auto") else torch.device(device)
    cpu = not torch.cuda.is_available() if wanted is None else wanted.type == "cpu"
    state = PartialState(cpu=cpu)
    if state.num_processes > 1:
        _destroy_group_at_exit()
    return state


@functools.cache
def _destroy_group_at_exit() -> None:
    """Tear the process group down when the interpreter exits: a gloo group left to the C++
    destructors at teardown sometimes aborts the process ("terminate called without an active exception"), which
    torchrun reports as a failed run although every sample was written. Registered once per process."""
    import atexit

    import torch.distributed as dist

    def destroy() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(destroy)


@torch.no_grad()
def generate_sharded(
    module: nn.Module, num_samples: int, *, batch_size: int = 16, seed: int = 0, **kwargs: Any
) -> dict[str, Any] | None:
    """:func:`generate` with its batches split over the processes of a distributed launch (contiguous runs of
    batches per process, accelerate's ``split_between_processes``), gathered on the main process: the same samples as
    one process makes, each once. Returns the result on the main process and ``None`` on the others."""
    import torch.distributed as dist

    _check_generate_args(module, num_samples, batch_size)
    state = process_state(next(iter(module.parameters()), torch.empty(0)).device)
    per_sample, rest = _split_per_sample(kwargs, num_samples)
    starts = list(range(0, num_samples, batch_size))
    with state.split_between_processes(starts) as mine:
        # each process makes its share at the same pace: the main one's count stands for all
        progress = Progress(f"sampling {num_samples}", len(mine), unit="batch", enabled=state.is_main_process)
        made = []
        for done, i in enumerate(mine):
            made.append((i, _generate_batch(module, i, min(batch_size, num_samples - i), seed, per_sample, rest)))
            progress.update(done + 1)
    if state.num_processes == 1:
        return _concat([b for _, b in made])
    gathered: list[Any] | None = [None] * state.num_processes if state.is_main_process else None
    dist.gather_object(made, gathered, dst=0)
    if not state.is_main_process:
        return None
    batches = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    if [i for i, _ in batches] != starts:
        raise RuntimeError(f"generate_sharded: gathered batches {[i for i, _ in batches]} != {starts}")
    return _concat([b for _, b in batches])


def write_samples(out: Mapping[str, Any], out_dir: str | os.PathLike, *, grid_size: int = 64, nrow: int | None = None):
    """``grid.png`` (the first ``grid_size`` images) and ``samples.npz`` (uint8 images, labels, captions)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(out["images"][:grid_size], out_dir / "grid.png", nrow=nrow)
    arrays: dict[str, np.ndarray] = {"images": to_uint8(out["images"]).numpy()}
    if "labels" in out:
        arrays["labels"] = np.asarray(out["labels"])
    if "captions" in out:
        arrays["captions"] = np.asarray(out["captions"])
    for key in CONDITION_IMAGES:
        if key in out:
            arrays[key] = to_uint8(out[key]).numpy()
    with io.atomic_path(out_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return out_dir


def _entry_point_package(value: str) -> str:
    """``"sd3_flow.cli:sample"`` -> ``"sd3_flow"``: the top-level package of a console script's entry point."""
    return value.split(":", 1)[0].split(".", 1)[0]


def _script_package() -> str | None:
    """The top-level package of the genlab console script running now (``sd3-sample`` -> ``sd3_flow``), or None."""
    from importlib.metadata import entry_points

    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    for ep in entry_points(group="console_scripts", name=name):
        return _entry_point_package(ep.value)
    return None


def check_module_package(module: nn.Module, checkpoint: Any) -> None:
    """A console script loads only its own package's models: ``sd3-sample`` on a taming run says so in one line
    (which command fits) instead of failing inside the other model's sampler."""
    package, theirs = _script_package(), type(module).__module__.split(".", 1)[0]
    if package is None or package == theirs or package == "gencore" or not generates(module):
        return  # (a first stage of another package: the "first stage, not a generative model" error says more)
    script = Path(sys.argv[0]).name
    verb = script.rsplit("-", 1)[-1]
    other = _sibling_script(verb, module)
    name = type(module).__name__
    hint = f"use {other} for it" if not other.startswith("<") else f"{theirs} has no -{verb} command"
    raise ValueError(
        f"{checkpoint} holds {_article(name)} {name} ({theirs}), not {_article(package)} {package} model: {hint}"
    )


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def task_device(cfg: DictConfig, state: Any = None) -> torch.device:
    """A sampling / evaluation task's device: ``cfg.device``, or for ``auto`` (or unset) this process's device in a
    distributed launch (``state``: its :func:`process_state`, when the caller has it already)."""
    device = cfg.get("device", "auto")
    if device in (None, "auto"):
        return (state if state is not None else process_state(device)).device
    return pick_device(device)


def load_for_sampling(cfg: DictConfig, device: torch.device) -> nn.Module:
    """The trained module of ``cfg.checkpoint`` (export, run folder or .ckpt; optional ``cfg.module``) on ``device``;
    from a console script, one of that script's package (:func:`check_module_package`)."""
    module = load_module(cfg.checkpoint, cfg.get("module"), use_ema=cfg.get("use_ema", True))
    check_module_package(module, cfg.checkpoint)
    return module.to(device).eval()


def sample_request(cfg: DictConfig, module: nn.Module) -> tuple[int, dict[str, Any]]:
    """(``cfg.num_samples``, keyword arguments for ``module.generate`` from ``cfg.sample``; ``None`` values dropped:
    "the model's default")."""
    kwargs = OmegaConf.to_container(cfg.get("sample") or OmegaConf.create({}), resolve=True)
    assert isinstance(kwargs, dict)
    n = cfg.get("num_samples")
    return (64 if n is None else int(n)), {k: v for k, v in kwargs.items() if v is not None}


def check_sample_config(cfg: DictConfig, counts: Sequence[str] = ()) -> None:
    """Before anything loads: the counts of a sample / eval config (and the task's own ``counts``) are positive
    integers, the checkpoint exists, the device is there (:func:`gencore.validate.sample_config_errors`)."""
    from gencore.validate import errors_message, sample_config_errors

    errors = sample_config_errors(cfg, counts)
    if errors:
        raise ConfigError(errors_message(errors))


def sample(
    cfg: Any,
    *,
    load: Callable[[DictConfig, torch.device], nn.Module] = load_for_sampling,
    request: Callable[[DictConfig, nn.Module], tuple[int, dict[str, Any]]] = sample_request,
    write: Callable[[dict[str, Any], Path, DictConfig], None] | None = None,
) -> Path:
    """The ``<name>-sample`` task: generate with a trained module; write ``grid.png`` and ``samples.npz`` to
    ``out_dir``. Under ``torchrun`` / ``accelerate launch`` every process samples its share (:func:`generate_sharded`)
    and the main process writes.

    Config: ``checkpoint``, ``out_dir``, ``num_samples``, ``batch_size``, ``seed``, ``device`` (auto), ``grid_size``,
    ``nrow``, ``sample`` (keyword arguments for ``module.generate``). A package extends it with ``load`` (how to
    build its model, e.g. from an official checkpoint), ``request`` (how its config becomes ``num_samples`` and the
    ``generate`` arguments, e.g. from a prompt file) and ``write`` (extra files next to the grid).
    """
    cfg = _cfg(cfg)
    _require(cfg, "checkpoint", "out_dir", where="gencore.run.sample")
    check_sample_config(cfg)
    state = process_state(cfg.get("device", "auto"))
    module = load(cfg, task_device(cfg, state))
    num_samples, kwargs = request(cfg, module)
    out = generate_sharded(
        module, num_samples, batch_size=int(cfg.get("batch_size", 16)), seed=int(cfg.get("seed", 0)), **kwargs
    )
    out_dir = Path(str(cfg.out_dir))
    if out is not None:
        write_samples(out, out_dir, grid_size=int(cfg.get("grid_size", 64)), nrow=cfg.get("nrow"))
        if write is not None:
            write(out, out_dir, cfg)
        log.info("wrote %d samples to %s", len(out["images"]), out_dir)
    return out_dir


def write_metrics(metrics: Mapping[str, Any], out_dir: str | os.PathLike) -> Path:
    """``metrics.json`` in ``out_dir``, written atomically; logged."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    log.info("metrics: %s", dict(metrics))
    return out / "metrics.json"


def evaluate(cfg: Any) -> dict[str, float]:
    """Metrics of generated samples: ``samples`` (a samples.npz; produced by :func:`sample` first when absent) scored
    by ``evaluator`` (a partial over ``(images, labels) -> dict``; default: the Fashion-MNIST report). In a
    distributed launch every process samples and the main process scores (the others return ``{}``)."""
    from gencore.metrics import fmnist_report

    cfg = _cfg(cfg)
    path = cfg.get("samples")
    if path is None:
        path = sample(cfg) / "samples.npz"
        if not process_state(cfg.get("device", "auto")).is_main_process:
            return {}
    data = np.load(str(path), allow_pickle=False)
    images = torch.from_numpy(data["images"]).float().div(127.5).sub(1.0)
    labels = torch.from_numpy(data["labels"]) if "labels" in data.files else None
    evaluator = _instantiate(cfg.evaluator) if cfg.get("evaluator") is not None else fmnist_report
    metrics = {k: float(v) for k, v in evaluator(images, labels).items()}
    write_metrics(metrics, cfg.get("out_dir") or Path(str(path)).parent)
    return metrics


def sweep_value(cfg: Any, result: Any) -> Any:
    """What a Hydra entry point returns: the number named by ``cfg.optimized_metric`` (a logged metric of a training
    run, or a dotted key of an evaluation's metrics, e.g. ``steps_25.fid``) when set, so that a sweeper (Optuna,
    Nevergrad) can optimise it; otherwise the task's own return value."""
    name = cfg.get("optimized_metric") if isinstance(cfg, Mapping | DictConfig) else None
    if not name:
        return result
    metrics = result.metrics if isinstance(result, TrainResult) else result
    value: Any = metrics
    if isinstance(metrics, Mapping) and name in metrics:
        value = metrics[name]
    else:
        for part in str(name).split("."):
            if not isinstance(value, Mapping) or part not in value:
                known = sorted(metrics) if isinstance(metrics, Mapping) else type(metrics).__name__
                raise ValueError(f"optimized_metric={name!r} is not among the task's metrics ({known})")
            value = value[part]
    return float(value)
