"""Paths a config may name, torch-free (console scripts check them before importing torch)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PACKAGE_SCHEME", "resolve_path"]

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
