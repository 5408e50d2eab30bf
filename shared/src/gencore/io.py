"""Weights in and out: safe checkpoint reading, strict state-dict loading with clear errors, safetensors export.

Official checkpoints of the CompVis / Stability papers are PyTorch Lightning 1.x pickles. Besides tensors they
name Lightning classes (``ModelCheckpoint`` as a dict key, ``AttributeDict`` hparams), OmegaConf configs and numpy
scalars. ``torch.load(weights_only=True)`` refuses them, and ``weights_only=False`` would run whatever the pickle
says. :func:`load_checkpoint` first tries ``weights_only=True``; if that refuses, it unpickles again with a
restricted unpickler:

- torch's own weights-only allow-list (tensors, storages, dtypes, containers) and numpy scalars / arrays load;
- classes from metadata namespaces (Lightning, OmegaConf, argparse) become inert :class:`OpaqueObject`
  placeholders: nothing of theirs is imported or run, their pickled state is kept as plain data;
- any other global (``os.system``, ``builtins.eval``, a model class, ...) is refused with
  :class:`UnsafeCheckpointError` naming it, before anything executes.

:func:`export` / :func:`load` write and read a release folder: ``model.safetensors`` plus the resolved
``config.yaml`` that rebuilds the module with ``hydra.utils.instantiate``. Files are written atomically. A shared
config is code as much as a pickle is, so :func:`load` first checks every ``_target_`` of the module node
(:func:`check_targets`): classes and functions defined in genlab's packages (:data:`GENLAB_NAMESPACES`, minus its
file-writing entry points) build, as do targets the user trusts (``load(..., allow=("mypkg.",))`` or
``GENLAB_ALLOWED_TARGETS=mypkg.,other.Model``); anything else (``builtins.open``, ``gencore.io.os.system``, ...)
raises :class:`UnsafeConfigError` naming it and its place, before anything is instantiated.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import logging
import os
import pickle
import tempfile
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gencore.paths import resolve_path

log = logging.getLogger(__name__)

__all__ = [
    "GENLAB_NAMESPACES",
    "SAFE_TARGETS",
    "CheckpointError",
    "CheckpointKeyError",
    "MissingWeightsError",
    "OpaqueObject",
    "UnsafeCheckpointError",
    "UnsafeConfigError",
    "accept_legacy_keys",
    "allowed_targets",
    "atomic_path",
    "check_targets",
    "export",
    "extract_state_dict",
    "find_prefix",
    "frozen_prefixes",
    "load",
    "load_checkpoint",
    "load_state_dict",
    "model_folder",
    "plain_config",
    "read_state_dict",
    "rename_legacy_keys",
    "resolve_path",
    "save_safetensors",
    "ship",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"
MADE_BY_NAME = "MADE_BY.md"


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: missing, unreadable, unsafe or not matching the module."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle names a global outside the allow-list; nothing was executed."""


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights (a backbone, an encoder, a metric's network) are not on this machine; says which file."""


def model_folder(path: str | os.PathLike, needs: str) -> Path:
    """``path`` as a local model folder in transformers format (it has a ``config.json``), else
    :class:`MissingWeightsError` saying who ``needs`` it and which file is missing."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"{needs}: {folder / 'config.json'} does not exist")
    return folder


class CheckpointKeyError(CheckpointError):
    """State-dict keys or shapes do not match the module."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched


# ----------------------------------------------------------------------------------------------- atomic files


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set and return)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors(
    tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` to ``path`` atomically (tensors sharing storage are written as separate copies)."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"save_safetensors: value for {key!r} is {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ident in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(ident)
        out[key] = t
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


# --------------------------------------------------------------------------------------- restricted unpickling

# Namespaces whose classes carry only training metadata in released checkpoints. They are never imported:
# their objects become OpaqueObject placeholders.
OPAQUE_NAMESPACES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "argparse", "typing", "enum")


class OpaqueObject(dict):
    """Inert stand-in for an object of a class the checkpoint names but that is not imported.

    Keeps what the pickle said about it as data: ``qualname``, constructor ``args``, ``state`` (from BUILD), dict
    items (from SETITEMS) and list items (``items``, from APPENDS).
    """

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items.append(item)

    def extend(self, items: Iterable[Any]) -> None:
        self.items.extend(items)

    __hash__ = object.__hash__  # usable as a dict key, like the classes it replaces

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


_OPAQUE_CLASSES: dict[str, type[OpaqueObject]] = {}


def _opaque_class(qualname: str) -> type[OpaqueObject]:
    if qualname not in _OPAQUE_CLASSES:
        _OPAQUE_CLASSES[qualname] = type(qualname.rsplit(".", 1)[-1], (OpaqueObject,), {"qualname": qualname})
    return _OPAQUE_CLASSES[qualname]


def _safe_reconstructor(cls: Any, base: type, state: Any) -> Any:
    """``copyreg._reconstructor`` limited to placeholders and plain containers."""
    if isinstance(cls, type) and issubclass(cls, OpaqueObject):
        obj = cls()
        obj.state = state
        return obj
    if cls in (dict, list, set, tuple, object) and base is cls:
        return base() if state is None else base(state)
    raise UnsafeCheckpointError(f"refusing copyreg._reconstructor({cls!r}, {base!r})")


def _numpy_globals() -> dict[str, Any]:
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[str, Any] = {"numpy.dtype": np.dtype, "numpy.ndarray": np.ndarray}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{mod}.scalar"] = multiarray.scalar
        allowed[f"{mod}._reconstruct"] = multiarray._reconstruct
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            allowed[f"numpy.dtypes.{name}"] = getattr(np.dtypes, name)
    return allowed


def _allowed_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {}
    try:  # torch's own weights_only allow-list (tensor rebuild functions, dtypes, containers)
        from torch import _weights_only_unpickler as wou

        allowed.update(wou._get_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover - older torch
        allowed.update(
            {
                "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
                "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
                "collections.OrderedDict": __import__("collections").OrderedDict,
            }
        )
    for obj in torch.serialization.get_safe_globals():
        if not isinstance(obj, tuple):
            allowed[f"{obj.__module__}.{obj.__qualname__}"] = obj
    allowed.update(_numpy_globals())
    allowed.update(
        {
            "builtins.dict": dict,
            "builtins.list": list,
            "builtins.tuple": tuple,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "builtins.object": object,
            "builtins.slice": slice,
            "builtins.int": int,
            "builtins.float": float,
            "builtins.str": str,
            "builtins.bool": bool,
            "copyreg._reconstructor": _safe_reconstructor,
            "collections.defaultdict": __import__("collections").defaultdict,
        }
    )
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _allowed: dict[str, Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        # protocol-2 pickles (torch.save) spell some names the Python 2 way (__builtin__.dict, copy_reg, ...)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if module.split(".", 1)[0] in OPAQUE_NAMESPACES:
            return _opaque_class(full)
        raise UnsafeCheckpointError(
            f"refusing to unpickle global {full!r}: it is not a tensor, container or known metadata class, and "
            f"loading it could execute code. Nothing was executed. (allowed: torch's weights-only list, numpy "
            f"scalars; placeholders for {', '.join(OPAQUE_NAMESPACES)})"
        )


_SAFE_PICKLE = types.SimpleNamespace(
    __name__="gencore_restricted_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
    UnpicklingError=pickle.UnpicklingError,
)


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> Any:
    """Read a checkpoint safely: ``.safetensors`` directly, torch pickles (``.ckpt/.pt/.pth/.bin``) as described above.

    Raises ``FileNotFoundError`` naming the path when it does not exist, :class:`UnsafeCheckpointError` when the
    pickle asks for code outside the allow-list, :class:`CheckpointError` when the file is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(
                str(path), device=str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
            )
        except Exception as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        log.info("%s: weights_only load refused (%s); reading with the restricted unpickler", path, str(err)[:200])
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err
    try:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_SAFE_PICKLE)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot be read safely ({type(err).__name__}: {err})") from err


def extract_state_dict(ckpt: Any, key: str | None = None) -> dict[str, Tensor]:
    """The tensor dict inside a loaded checkpoint: ``ckpt[key]``, else ``state_dict`` / ``model`` / ``module`` /
    ``ema``, else ``ckpt`` itself if it maps names to tensors."""
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"expected a checkpoint dict, got {type(ckpt).__name__}")
    keys = [key] if key is not None else ["state_dict", "model", "module", "ema"]
    for k in keys:
        if k in ckpt and isinstance(ckpt[k], Mapping):
            ckpt = ckpt[k]
            break
    else:
        if key is not None:
            raise CheckpointError(f"checkpoint has no entry {key!r}; top-level keys: {sorted(map(str, ckpt))[:20]}")
    state = {k: v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint holds no tensors; top-level keys: {sorted(map(str, ckpt))[:20]}")
    return state


def read_state_dict(path_or_state: Any, *, map_location: Any = "cpu") -> tuple[dict[str, Tensor], str]:
    """(tensor dict, source name) from a checkpoint path (read with :func:`load_checkpoint`) or an already loaded
    checkpoint / state dict (a mapping); the source name ("state dict" or the path) is what errors quote."""
    if isinstance(path_or_state, (str, os.PathLike)):
        return extract_state_dict(load_checkpoint(path_or_state, map_location=map_location)), os.fspath(path_or_state)
    if isinstance(path_or_state, Mapping):
        return extract_state_dict(path_or_state), "state dict"
    raise ValueError(f"path_or_state must be a path or a mapping, got {type(path_or_state).__name__}")


# ------------------------------------------------------------------------------------------ state-dict loading


def frozen_prefixes(module: nn.Module) -> list[str]:
    """State-dict prefixes of submodules marked frozen (``_genlab_frozen = True``, e.g. a latent codec), under every
    name a shared one is registered by (geofree's ``cond_stage_model`` is its ``first_stage_model``)."""
    return [
        f"{name}."
        for name, m in module.named_modules(remove_duplicate=False)
        if name and getattr(m, "_genlab_frozen", False)
    ]


def rename_legacy_keys(
    renames: Mapping[str, str],
    state: Mapping[str, Tensor],
    prefix: str = "",
    defaults: Mapping[str, Tensor | float] | None = None,
) -> dict[str, Tensor]:
    """``state`` with keys that an older genlab version (or an official checkpoint) stored elsewhere moved to where the
    module keeps them now. ``renames`` maps an old key, or an old prefix ending in ``"."``, to the new one; only keys
    under ``prefix`` are looked at, and a key whose new name is already present stays as it is. When anything was
    renamed (an old-layout state dict), entries of ``defaults`` (new key -> value) that it lacks are filled in: the
    numbers the old layout did not store because they were constant (e.g. LDM's latent shift, 0)."""
    out = dict(state)
    renamed = False
    for key in list(state):
        if not key.startswith(prefix):
            continue
        rel = key[len(prefix) :]
        for old, new in renames.items():
            if rel == old or (old.endswith(".") and rel.startswith(old)):
                target = prefix + new + rel[len(old) :]
                if target not in out:
                    out[target] = out.pop(key)
                    renamed = True
                break
    if renamed:
        for key, value in (defaults or {}).items():
            out.setdefault(prefix + key, torch.as_tensor(value))
    return out


def accept_legacy_keys(
    module: nn.Module, renames: Mapping[str, str], *, defaults: Mapping[str, Tensor | float] | None = None
) -> None:
    """Let ``module`` load state dicts that keep some of its entries under older names (``renames``: old key or
    ``"prefix."`` -> new; ``defaults``: values of new keys that such old state dicts lack), through
    ``module.load_state_dict`` (Lightning's resume) and :func:`load_state_dict` alike."""
    renames, defaults = dict(renames), dict(defaults or {})
    module._genlab_legacy_keys = (renames, defaults)  # type: ignore[attr-defined]

    def hook(mod: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        upgraded = rename_legacy_keys(renames, state_dict, prefix, defaults)
        state_dict.clear()
        state_dict.update(upgraded)

    module._register_load_state_dict_pre_hook(hook, with_module=True)


def find_prefix(
    state: Mapping[str, Tensor], marker: str, candidates: Iterable[str], *, what: str, source: str = "checkpoint"
) -> str:
    """The prefix under which ``state`` holds ``marker`` (a key every such model has, e.g. ``encoder.conv_in.weight``
    of a first stage): ``""`` or the first of ``candidates`` (e.g. ``first_stage_model.`` of a whole LDM); a
    CheckpointKeyError naming ``what`` was looked for otherwise."""
    candidates = list(candidates)
    for p in ("", *candidates):
        if f"{p}{marker}" in state:
            return p
    raise CheckpointKeyError(
        f"{source}: no {what} weights found: expected {marker}, optionally under {' / '.join(candidates)}; pass "
        f"prefix=... (first keys: {sorted(state)[:6]})",
        [marker],
        [],
        [],
    )


def _preview(keys: list[str], n: int = 8) -> str:
    head = ", ".join(keys[:n])
    return f"{head}, ... (+{len(keys) - n} more)" if len(keys) > n else head


def load_state_dict(
    module: nn.Module,
    state: Mapping[str, Tensor],
    *,
    prefix: str = "",
    ignore_prefixes: Iterable[str] = (),
    key_map: Callable[[str], str | None] | Mapping[str, str] | None = None,
    strict: bool = True,
    allow_missing: Iterable[str] = (),
    source: str = "checkpoint",
) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``module`` and say exactly what did not match.

    Keys are selected by ``prefix`` (and stripped of it), keys under ``ignore_prefixes`` are dropped (e.g.
    ``"loss."`` for training-only discriminator weights), then renamed by ``key_map`` (a dict, or a callable
    returning the new name or ``None`` to drop). With ``strict`` any missing key (outside ``allow_missing``
    prefixes), unexpected key or shape mismatch raises :class:`CheckpointKeyError` naming them.
    Returns ``(missing, unexpected)``.
    """
    ignore = tuple(ignore_prefixes)
    allow = tuple(allow_missing)
    selected: dict[str, Tensor] = {}
    for key, value in state.items():
        if prefix:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix) :]
        if ignore and key.startswith(ignore):
            continue
        if key_map is not None:
            key = key_map(key) if callable(key_map) else key_map.get(key, key)
            if key is None:
                continue
        selected[key] = value
    if prefix and not selected:
        raise CheckpointKeyError(f"{source}: no keys start with prefix {prefix!r}", [], [], [])
    renames, defaults = getattr(module, "_genlab_legacy_keys", ({}, {}))
    selected = rename_legacy_keys(renames, selected, defaults=defaults)
    own = module.state_dict()
    missing = [k for k in own if k not in selected and not (allow and k.startswith(allow))]
    unexpected = [k for k in selected if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(selected[k].shape)} vs module {tuple(own[k].shape)}"
        for k in selected
        if k in own and selected[k].shape != own[k].shape
    ]
    if strict and (missing or unexpected or mismatched):
        parts = [f"{source} does not match {type(module).__name__}:"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_preview(mismatched, 4)}")
        raise CheckpointKeyError("\n  ".join(parts), missing, unexpected, mismatched)
    loadable = {k: v for k, v in selected.items() if k in own and v.shape == own[k].shape}
    module.load_state_dict(loadable, strict=False)
    return missing, unexpected


# ------------------------------------------------------------------------------------------- official configs


def plain_config(cfg: Any) -> Any:
    """An official yaml (a path), a DictConfig or a mapping as plain resolved dicts / lists (papers' ``*.yaml``)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if isinstance(cfg, Mapping):
        return OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True)
    raise ValueError(f"config must be a path, a mapping or a DictConfig, got {type(cfg).__name__}")


# ------------------------------------------------------------------------------------------- config targets

# Top-level packages of genlab: a release's config may build anything they define (classes and functions whose
# ``__module__`` is under one of them), except the entry points below.
GENLAB_NAMESPACES = (
    "gencore",
    "taming",
    "ldm",
    "sd3_flow",
    "ladd_turbo",
    "gen1_video",
    "twostream_inpaint",
    "imagebart",
    "geofree",
    "net2net",
    "shapebias",
)

# Targets outside genlab that a module node of ours needs. Every ``_target_`` that can appear in a module node (the
# packages' configs/, gencore/configs/, the legacy_v0 exports) is a genlab class or function: optimizers are made in
# ``configure_optimizers``, diffusers / transformers models through genlab loaders (``gencore.latents.diffusers_vae``,
# ``gencore.text``), and the non-genlab targets of the configs (Lightning loggers and strategies, ``builtins.set``
# for FSDP's wrap policy) live in trainer / logger nodes, which :func:`load` never instantiates. Hence empty.
SAFE_TARGETS: tuple[str, ...] = ()

# Environment variable extending the allow-list: comma-separated prefixes / names (``mypkg.,other.Model``).
ALLOWED_TARGETS_ENV = "GENLAB_ALLOWED_TARGETS"

# Genlab modules that write files, train or run whole tasks; a module node never needs them, so they are refused even
# though genlab defines them (``gencore.io.save_safetensors`` would overwrite any path; ``gencore.run.train`` runs).
_ENTRY_POINT_MODULES = frozenset({"io", "run", "cli", "tasks", "demo", "__main__"})
_FILE_WRITERS = frozenset(
    {
        "gencore.viz.save_grid",
        "gencore.text.save_text_features",
        "gencore.latents.build_latent_cache",
        "gencore.testing.tiny_clip",
    }
)


class UnsafeConfigError(CheckpointError):
    """A config names a ``_target_`` outside the allow-list; nothing was instantiated.

    ``target`` is the refused value, ``key`` where it sits (``module.first_stage._target_``)."""

    def __init__(self, message: str, target: Any, key: str):
        super().__init__(message)
        self.target, self.key = target, key


def _allow_entries(allow: Iterable[str]) -> tuple[str, ...]:
    if isinstance(allow, str):
        allow = (allow,)
    extra = [a.strip() for a in os.environ.get(ALLOWED_TARGETS_ENV, "").split(",")]
    entries = []
    for entry in (*allow, *extra):
        if not isinstance(entry, str):
            raise ValueError(f"allow: entries must be strings (module prefixes or names), got {entry!r}")
        if entry and entry.rstrip(".") not in entries:
            entries.append(entry.rstrip("."))
    return tuple(entries)


def allowed_targets(allow: Iterable[str] = ()) -> tuple[str, ...]:
    """The allow-list in force: genlab's namespaces, :data:`SAFE_TARGETS`, ``allow`` and the comma-separated
    entries of ``$GENLAB_ALLOWED_TARGETS``. An entry (a trailing ``.`` is optional) allows the target of that exact
    name, and targets under it whose object is defined under it (its ``__module__``)."""
    return tuple(dict.fromkeys((*GENLAB_NAMESPACES, *SAFE_TARGETS, *_allow_entries(allow))))


def _under(name: str, entry: str) -> bool:
    return name == entry or name.startswith(entry + ".")


def _locate(path: str) -> Any:
    """The object a dotted path names, resolved as Hydra does (import the first part, then attribute or submodule)."""
    import importlib

    parts = path.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not isinstance(obj, types.ModuleType):
                raise
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def _refusal(target: Any, entries: tuple[str, ...]) -> str | None:
    """Why ``target`` may not be instantiated, or None when it may."""
    if not isinstance(target, str):
        return f"a _target_ must be a dotted name, got {type(target).__name__}"
    parts = target.split(".")
    if not all(p.isidentifier() for p in parts):
        return "not a valid dotted name"
    if any(p.startswith("__") for p in parts):
        return "dunder attributes are not targets"
    matching = [e for e in entries if _under(target, e)]
    if not matching:  # checked on the name alone: nothing is imported for a target outside the allow-list
        return "outside the allow-list"
    try:
        obj = _locate(target)
    except Exception as err:
        return f"cannot be resolved ({type(err).__name__}: {err})"
    if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return f"resolves to a {type(obj).__name__}, not a class or function"
    where = getattr(obj, "__module__", None)
    if not isinstance(where, str):
        return "its defining module is unknown"
    defined = f"{where}.{getattr(obj, '__qualname__', '')}"
    if where.split(".")[0] in GENLAB_NAMESPACES and (
        _ENTRY_POINT_MODULES.intersection(where.split(".")[1:]) or defined in _FILE_WRITERS or target in _FILE_WRITERS
    ):
        return f"{defined} is a genlab entry point / file writer, never part of a module"
    if target in matching:  # named exactly by an entry: allowed wherever the object is defined
        return None
    if not any(_under(where, e) for e in matching):
        return f"resolves to {defined}, defined outside {' / '.join(matching)}"
    return None


def _walk_targets(node: Any, key: str) -> Iterator[tuple[str, Any, bool]]:
    """(place, value, is a ``_target_``) of every target, and of every string that is still an interpolation."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            sub = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                yield sub, v, True
            else:
                yield from _walk_targets(v, sub)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk_targets(v, f"{key}[{i}]")
    elif isinstance(node, str) and "${" in node:
        yield key, node, False  # left by an escaped \${...}: Hydra would resolve it again while instantiating


def check_targets(node: Any, *, allow: Iterable[str] = (), key: str = "module", source: str = "config") -> Any:
    """Resolve ``node`` (a config node: DictConfig or plain containers) and check every ``_target_`` in it
    (nested mappings, lists, ``_args_``, ``_partial_`` nodes alike) against :func:`allowed_targets`; return the
    resolved plain container, the one to instantiate (interpolations can change targets, so check what is built).

    Raises :class:`UnsafeConfigError` naming the first refused target and its place (``module.unet._target_``).
    Checking imports only modules of allowed targets, instantiates nothing and writes nothing.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    try:
        if isinstance(node, (DictConfig, ListConfig)):
            plain = OmegaConf.to_container(node, resolve=True)
        elif isinstance(node, (Mapping, list, tuple)):
            plain = OmegaConf.to_container(OmegaConf.create({"node": node}), resolve=True)["node"]  # type: ignore[index]
        else:
            plain = node
    except Exception as err:
        raise CheckpointError(f"{source}: cannot resolve the {key} config ({type(err).__name__}: {err})") from err
    entries = allowed_targets(allow)
    for where, target, is_target in _walk_targets(plain, key):
        if not is_target:
            raise UnsafeConfigError(
                f"{source}: refusing {where} = {target!r}: an interpolation is left after resolving the config. "
                "Nothing was instantiated.",
                target,
                where,
            )
        reason = _refusal(target, entries)
        if reason is not None:
            raise UnsafeConfigError(
                f"{source}: refusing to instantiate {target!r} ({where}): {reason}. Nothing was instantiated. "
                f"Allowed: classes / functions of {', '.join(entries)}; trust more with "
                f"allow=('mypkg.',) or {ALLOWED_TARGETS_ENV}=mypkg.,other.Name",
                target,
                where,
            )
    return plain


# ---------------------------------------------------------------------------------------------- release folders


def _to_container(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return OmegaConf.to_container(OmegaConf.create(dict(cfg)), resolve=True)  # type: ignore[return-value]
    raise ValueError(f"export: cfg must be a mapping / DictConfig, got {type(cfg).__name__}")


def _module_node(cfg: Any) -> Mapping:
    node = cfg.get("module", cfg) if isinstance(cfg, Mapping) else cfg
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ValueError("config must have a `module` node (or be one) with a `_target_` that builds the module")
    return node


def export(
    module: nn.Module,
    cfg: Any,
    out_dir: str | os.PathLike,
    *,
    state_dict: Mapping[str, Tensor] | None = None,
    include_frozen: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model.safetensors`` and the resolved ``config.yaml`` to ``out_dir`` (both atomically).

    ``cfg`` is the run config (with a ``module`` node) or the module node itself. Frozen submodules (codecs, text
    encoders) are rebuilt from the config on :func:`load`, so their weights are left out unless ``include_frozen``.
    """
    from omegaconf import OmegaConf

    if not isinstance(module, nn.Module):
        raise ValueError(f"export: module must be an nn.Module, got {type(module).__name__}")
    container = _to_container(cfg)
    _module_node(container)
    state = dict(module.state_dict() if state_dict is None else state_dict)
    if not include_frozen:
        skip = tuple(frozen_prefixes(module))
        if skip:
            state = {k: v for k, v in state.items() if not k.startswith(skip)}
    out = Path(out_dir)
    meta = {"format": "genlab", "module": type(module).__qualname__, **(metadata or {})}
    save_safetensors(state, out / WEIGHTS_NAME, metadata=meta)
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
    return out


def ship(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    paths: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = torch.float16,
    keep_float32_below: int = 4096,
    made_by: str = "",
) -> Path:
    """Copy the export ``src`` to ``dest`` as a checkpoint to commit: floating tensors with at least
    ``keep_float32_below`` elements stored as ``dtype`` (half the size; loading casts them back to the module's
    dtype), config strings in ``paths`` replaced (``{"runs/x/export": "pkg://ldm/checkpoints/x"}``: the run folders
    it was made from -> where they are shipped), ``MADE_BY.md`` with ``made_by`` (the commands and commit). Loads the
    result once (:func:`load`) before returning ``dest``, so a broken checkpoint is never left behind silently."""
    from omegaconf import OmegaConf

    folder = resolve_path(src)
    if (folder / "export" / WEIGHTS_NAME).is_file():
        folder = folder / "export"
    for f in (folder / WEIGHTS_NAME, folder / CONFIG_NAME):
        if not f.is_file():
            raise FileNotFoundError(f"ship: {f} not found (expected an export folder)")
    state = load_checkpoint(folder / WEIGHTS_NAME)
    if dtype is not None:
        state = {
            k: v.to(dtype) if v.is_floating_point() and v.numel() >= keep_float32_below else v for k, v in state.items()
        }
    swap = dict(paths or {})

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: rewrite(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return swap.get(node, node) if isinstance(node, str) else node

    config = rewrite(OmegaConf.to_container(OmegaConf.load(folder / CONFIG_NAME), resolve=False))
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "genlab", "shipped_from": str(folder)}
    save_safetensors(state, out / WEIGHTS_NAME, metadata=meta)
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    if made_by:
        with atomic_path(out / MADE_BY_NAME) as tmp:
            tmp.write_text(made_by.rstrip() + "\n")
    load(out)
    return out


def load(
    path: str | os.PathLike, *, map_location: Any = "cpu", strict: bool = True, allow: Iterable[str] = ()
) -> nn.Module:
    """Rebuild the module exported to ``path`` (a folder from :func:`export`) and load its weights; eval mode.

    An export's ``config.yaml`` is code: before anything is built, every ``_target_`` of its module node is checked
    by :func:`check_targets`. Genlab's own classes and functions are allowed; trust other packages with
    ``allow=("mypkg.",)`` (prefixes or exact names) or ``GENLAB_ALLOWED_TARGETS=mypkg.,other.Model`` (which also
    reaches exports loaded from inside a module, e.g. a first stage); anything else raises
    :class:`UnsafeConfigError` naming the target and where it is, and nothing is instantiated.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    folder = resolve_path(path)
    weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"load: {f} not found (expected a folder written by gencore.io.export)")
    cfg = OmegaConf.load(config)
    node = cfg.get("module", cfg) if isinstance(cfg, Mapping) else cfg
    checked = check_targets(node, allow=allow, key="module", source=str(config))
    module = instantiate(_module_node(checked), _convert_="all")
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"{config}: module config built a {type(module).__name__}, not an nn.Module")
    state = load_checkpoint(weights, map_location=map_location)
    load_state_dict(module, state, strict=strict, allow_missing=frozen_prefixes(module), source=str(weights))
    return module.eval()
