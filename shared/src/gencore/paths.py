"""Paths a config may name, torch-free (console scripts check them before importing torch)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PACKAGE_SCHEME", "eval_dir", "resolve_path"]

#: ``pkg://<package>/<path>``: a file or folder shipped inside an installed package (its checkpoints)
PACKAGE_SCHEME = "pkg://"


def resolve_path(path: str | os.PathLike) -> Path:
    """A path, with ``pkg://<package>/<relative path>`` read as the file or folder inside the installed package
    ``<package>`` (e.g. ``pkg://ladd_turbo/checkpoints/fmnist_turbo``: a checkpoint shipped with ladd_turbo). Where a
    shipped checkpoint's config names another shipped checkpoint (its teacher, its first stage), it uses this form, so
    it loads wherever the packages are installed. A missing package or file is a FileNotFoundError naming it."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text.startswith(PACKAGE_SCHEME):
        return Path(text)
    package, _, relative = text[len(PACKAGE_SCHEME) :].partition("/")
    import importlib.resources

    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise FileNotFoundError(f"{text}: package {package!r} is not installed (pip install -e packages/...)") from None
    found = Path(str(root.joinpath(relative))) if relative else Path(str(root))
    if not found.exists():
        raise FileNotFoundError(f"{text}: {found} does not exist (is the checkpoint shipped with {package}?)")
    return found


def eval_dir(checkpoint: str) -> str:
    """Where ``<name>-eval`` writes by default (the eval configs' ``out_dir: ${eval_dir:${checkpoint}}``):
    ``<checkpoint>/eval`` beside a run, ``runs/eval/<package>-<name>`` for a checkpoint shipped inside a package
    (``pkg://...``: never into the installed package, nor a folder named ``pkg:``)."""
    text = str(checkpoint)
    if text.startswith(PACKAGE_SCHEME):
        parts = [p for p in text[len(PACKAGE_SCHEME) :].split("/") if p]
        return f"runs/eval/{parts[0]}-{parts[-1]}" if parts else "runs/eval"
    return f"{text.rstrip('/')}/eval"
