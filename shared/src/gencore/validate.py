"""Configs are checked before anything is built or written, and errors name the field.

:func:`validate_config` runs first in ``gencore.run.train``:

- every node with a ``_target_`` (module, its nested networks / losses / conditioners, datamodule, callbacks,
  loggers) is compared with the signature of what it builds: an argument it does not take is an error (with the
  closest name it does take), and a value of the wrong kind for a ``int`` / ``float`` / ``bool`` / ``str``
  annotation (``module.learning_rate=fast``) is an error naming ``module.learning_rate``;
- ``trainer`` is compared with ``lightning.Trainer``'s signature the same way, and its step counts must train
  something (``trainer.max_steps=0`` exports an untrained model: refused);
- ``checkpoint.every_n_train_steps`` and ``seed`` must be integers of the right range.

All problems are reported at once, in a :class:`ConfigError` (a ``ValueError``). :func:`check_fits` then compares
the built module with the built datamodule (image size, channels, the first stage's downsampling factor), before
training starts.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ConfigError", "check_fits", "validate_config"]


class ConfigError(ValueError):
    """One or more config values cannot work; the message names each field."""


_SCALARS = (bool, int, float, str)


def _resolve(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ImportError(f"{target!r} is not a dotted path")
    try:
        obj: Any = importlib.import_module(module_name)
        return getattr(obj, attr)
    except (ImportError, AttributeError):
        # a nested attribute (module.Class.method): walk from the longest importable prefix
        parts = target.split(".")
        for i in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for name in parts[i:]:
                obj = getattr(obj, name)
            return obj
        raise


def _signature(obj: Any) -> tuple[inspect.Signature | None, dict[str, Any]]:
    fn = obj.__init__ if isinstance(obj, type) else obj
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None, {}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations naming what only a type checker sees: no type checks then
        hints = {}
    return sig, hints


def _inherited(obj: Any, key: str) -> Any:
    """The annotation of ``key`` in a base class's ``__init__`` (a subclass that forwards ``**kwargs`` to it)."""
    for base in obj.__mro__[1:] if isinstance(obj, type) else ():
        sig, hints = _signature(base)
        if sig is not None and key in sig.parameters:
            return hints.get(key, sig.parameters[key].annotation)
    return None


def _allowed_scalars(annotation: Any) -> set[type] | None:
    """The scalar types an annotation admits (None: not a plain scalar annotation, don't judge)."""
    if annotation in _SCALARS:
        return {annotation}
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if args and all(a in _SCALARS for a in args):
            return set(args)
    return None


def _kind_ok(value: Any, allowed: set[type]) -> bool:
    if value is None:
        return True  # None-ness is the callee's business (many scalars default to None)
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed
    if isinstance(value, str):
        return str in allowed
    return True  # containers / nodes: not a scalar question


def _kind_name(allowed: set[type]) -> str:
    if allowed <= {int, float}:
        return "a number" if float in allowed else "an integer"
    return " or ".join(sorted(t.__name__ for t in allowed))


def _check_call(node: Mapping[str, Any], obj: Any, path: str, errors: list[str], *, what: str) -> None:
    sig, hints = _signature(obj)
    if sig is None:
        return
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key, value in node.items():
        if str(key).startswith("_"):
            continue
        annotation = hints.get(key, params[key].annotation) if key in params else _inherited(obj, key)
        if key not in params:
            if not takes_kwargs:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                errors.append(f"{path}.{key}: {what} has no argument {key!r}{hint}")
            if annotation is None:
                continue
        allowed = _allowed_scalars(annotation)
        if allowed is not None and not isinstance(value, Mapping) and not _kind_ok(value, allowed):
            errors.append(f"{path}.{key}: expected {_kind_name(allowed)}, got {value!r}")


def _walk(node: Any, path: str, errors: list[str]) -> None:
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if isinstance(target, str):
            try:
                obj = _resolve(target)
            except Exception as err:
                errors.append(f"{path}._target_: cannot import {target!r} ({type(err).__name__}: {err})")
                obj = None
            if obj is not None and not node.get("_partial_"):
                _check_call(node, obj, path, errors, what=target)
        for key, value in node.items():
            if not str(key).startswith("_"):
                _walk(value, f"{path}.{key}", errors)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _walk(value, f"{path}[{i}]", errors)


def _plain(cfg: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def validate_config(cfg: Any) -> None:
    """Raise :class:`ConfigError` listing every field of a training config that cannot work (see the module doc)."""
    import lightning as L

    cfg = _plain(cfg)
    errors: list[str] = []
    for section in ("module", "datamodule"):
        _walk(cfg.get(section), section, errors)
    for section in ("callbacks", "logger"):
        for name, node in (cfg.get(section) or {}).items():
            _walk(node, f"{section}.{name}", errors)
    trainer = dict(cfg.get("trainer") or {})
    _check_call(
        {k: v for k, v in trainer.items() if not isinstance(v, Mapping)},
        L.Trainer,
        "trainer",
        errors,
        what="lightning.Trainer",
    )
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            errors.append(f"trainer.accelerator={accelerator}: no CUDA device on this machine (trainer=cpu)")
    steps, epochs = trainer.get("max_steps", -1), trainer.get("max_epochs")
    if isinstance(steps, int) and not isinstance(steps, bool):
        if steps == 0 or steps < -1:
            errors.append(
                f"trainer.max_steps: {steps} trains nothing; give a number of steps >= 1 (or -1 with max_epochs)"
            )
        elif steps == -1 and isinstance(epochs, int) and epochs in (0, -1):
            errors.append(
                "trainer.max_steps=-1 with trainer.max_epochs unset / -1 would train forever; set one of them"
            )
    every = (cfg.get("checkpoint") or {}).get("every_n_train_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        errors.append(f"checkpoint.every_n_train_steps: expected an integer >= 1, got {every!r}")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        errors.append(f"seed: expected an integer, got {seed!r}")
    errors += _data_model_mismatches(cfg.get("module"), cfg.get("datamodule"))
    if errors:
        raise ConfigError(errors_message(errors))


def _data_model_mismatches(module: Any, datamodule: Any) -> list[str]:
    """The image size and channels the config gives both the data and the model, when they differ: found from the
    config alone, so before any stage a recipe trains first (the built objects are checked again by check_fits)."""
    if not isinstance(module, Mapping) or not isinstance(datamodule, Mapping):
        return []
    out = []
    for data_keys, model_key in ((("image_size", "size"), "image_size"), (("channels",), "image_channels")):
        want = module.get(model_key)
        for key in data_keys:
            got = datamodule.get(key)
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (want, got))
            if ints and got != want:
                out.append(f"datamodule.{key}={got} but module.{model_key}={want}")
    return out


def errors_message(errors: list[str]) -> str:
    """``invalid config:`` and one indented line per problem (what ConfigError carries and the CLI prints)."""
    return "invalid config:\n  " + "\n  ".join(errors)


def check_fits(module: Any, datamodule: Any) -> None:
    """The built module against the built datamodule: ``module.check_datamodule(datamodule)`` when the module has
    it (a package's own rules), else the generic ones: equal ``image_size``, equal image channels, and an image size
    divisible by the first stage's ``downsample_factor``."""
    hook = getattr(module, "check_datamodule", None)
    if callable(hook):
        hook(datamodule)
        return
    size, channels = getattr(datamodule, "image_size", None), getattr(datamodule, "channels", None)
    problems = []
    want = getattr(module, "image_size", None)
    if isinstance(size, int) and isinstance(want, int) and size != want:
        problems.append(f"datamodule.image_size={size} but module.image_size={want}")
    stage = getattr(module, "first_stage_model", None) or getattr(module, "model", None)
    factor = getattr(stage, "downsample_factor", None)
    if isinstance(size, int) and isinstance(factor, int) and factor > 1 and size % factor:
        problems.append(
            f"datamodule.image_size={size} is not divisible by the first stage's downsampling factor {factor}"
        )
    in_ch = getattr(stage, "in_channels", None)
    if in_ch is None:
        in_ch = getattr(getattr(stage, "encoder", None), "in_channels", None)
    if isinstance(channels, int) and isinstance(in_ch, int) and channels != in_ch:
        problems.append(f"datamodule.channels={channels} but the model takes {in_ch}-channel images")
    if problems:
        raise ConfigError("the data does not fit the model:\n  " + "\n  ".join(problems))


def sample_config_errors(cfg: Mapping[str, Any], counts: Sequence[str] = ()) -> list[str]:
    """What is wrong with a sample / eval config's counts (``num_samples``, ``batch_size``, ``grid_size`` and a
    task's own ``counts``: integers >= 1 when set), its ``checkpoint`` (must exist) and ``device`` (``cuda`` needs
    one); torch is imported only to look for a CUDA device, so console scripts answer these before loading anything."""
    from pathlib import PurePath

    errors = []
    for key in ("num_samples", "batch_size", "grid_size", *counts):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            errors.append(f"{key}: expected an integer >= 1, got {value!r}")
    checkpoint = cfg.get("checkpoint")  # (a training config's ``checkpoint`` is the checkpointing node)
    if isinstance(checkpoint, (str, PurePath)):
        from gencore.paths import resolve_path

        try:
            found = resolve_path(str(checkpoint)).exists()
        except FileNotFoundError as err:
            errors.append(f"checkpoint: {err}")
        else:
            if not found:
                errors.append(f"checkpoint: {checkpoint} does not exist (a run folder, its export/ or a .ckpt)")
    device = str(cfg.get("device", "auto"))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            errors.append(f"device={device}: no CUDA device here (device=cpu, or auto)")
    return errors
