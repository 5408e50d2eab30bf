"""``make gallery``: one static HTML page of every installed package's shipped checkpoint at work.

``gencore-gallery`` (:func:`gencore.cli.gallery_main`) builds it.

Each package declares its entries under the entry-point group ``genlab.gallery`` (in its ``pyproject.toml``)::

    [project.entry-points."genlab.gallery"]
    sd3_flow = "sd3_flow.gallery:entries"

``entries()`` returns :class:`Entry` objects: the console command that makes the pictures from the package's shipped
(``pkg://``) checkpoint, the files it writes (images, videos, plots), and the package's headline number. The
gallery runs every command exactly as shown on the page (``{out}`` is the entry's folder under the gallery), then
writes ``index.html`` (relative links: the folder can be copied or served as it is) and ``manifest.json``. A failed
command is shown on the page with the end of its output, and the command exits 1.
"""

from __future__ import annotations

import html
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gencore.io import GENLAB_NAMESPACES

log = logging.getLogger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "PACKAGE_ORDER", "Entry", "Result", "build", "class_grid", "discover", "render"]

ENTRY_POINT_GROUP = "genlab.gallery"
#: the page's order (the design card's, as gencore.io's list of genlab packages); others follow in name order
PACKAGE_ORDER = tuple(name for name in GENLAB_NAMESPACES if name != "gencore")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".webm")


@dataclass(frozen=True)
class Entry:
    """One picture (or a few) on the gallery page.

    Args:
        package: the package's import name (the page's section).
        title: what the pictures show, in a few words.
        command: the console command, argv style; ``{out}`` in an argument is replaced by the entry's folder.
        media: the files the command writes, relative to ``{out}``: images (png, jpg, gif, svg, webp; plots are
            images) and videos (mp4, webm).
        headline: the package's headline number, with what it was measured on (``"FID-FMNIST 4.33 (1,000
            samples)"``).
        note: one more line under the pictures (optional).
    """

    package: str
    title: str
    command: Sequence[str]
    media: Sequence[str]
    headline: str
    note: str = ""

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(f"gallery entry {self.package}/{self.title!r}: empty command")
        bad = [m for m in self.media if not m.lower().endswith(IMAGE_SUFFIXES + VIDEO_SUFFIXES)]
        if not self.media or bad:
            raise ValueError(
                f"gallery entry {self.package}/{self.title!r}: media must be image or video files "
                f"({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)}), got {list(self.media) or 'none'}"
            )

    @property
    def slug(self) -> str:
        """The entry's folder name: its title in lower case, runs of other characters as one ``_``."""
        words = "".join(c if c.isalnum() else " " for c in self.title.lower()).split()
        slug = ""
        for word in words:  # whole words, at most 64 characters
            if len(slug) + len(word) + 1 > 64:
                break
            slug = f"{slug}_{word}" if slug else word
        return slug or (words[0][:64] if words else "entry")


def class_grid(
    package: str, title: str, script: str, checkpoint: str, *options: str, headline: str, note: str = ""
) -> Entry:
    """The usual entry of a class- or caption-conditional Fashion-MNIST model: ``<script> checkpoint=...`` samples 40
    images, the ten classes in turn, as ``grid.png`` with one column per class (``options``: the sampler's own, e.g.
    ``sample.num_steps=4``)."""
    command = [script, f"checkpoint={checkpoint}", "num_samples=40", "nrow=10", "batch_size=40", *options]
    return Entry(package, title, [*command, "out_dir={out}"], ["grid.png"], headline, note)


@dataclass
class Result:
    """What happened when an entry's command ran (``manifest.json`` holds one per entry)."""

    package: str
    title: str
    command: str
    media: list[str]
    headline: str
    note: str
    ok: bool
    seconds: float
    error: str = ""
    missing: list[str] = field(default_factory=list)


def discover(packages: Iterable[str] | None = None) -> list[Entry]:
    """Every installed package's entries (entry points ``genlab.gallery``), in package order; ``packages``: only
    these (an unknown name is an error that lists the known ones)."""
    from importlib.metadata import entry_points

    def rank(ep: Any) -> tuple[int, str]:
        return (PACKAGE_ORDER.index(ep.name) if ep.name in PACKAGE_ORDER else len(PACKAGE_ORDER), ep.name)

    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=rank)
    wanted = None if packages is None else list(packages)
    if wanted is not None:
        unknown = sorted(set(wanted) - {ep.name for ep in eps})
        if unknown:
            raise ValueError(f"gallery: no entries for {unknown}; installed: {[ep.name for ep in eps]}")
    entries: list[Entry] = []
    for ep in eps:
        if wanted is None or ep.name in wanted:
            made = ep.load()()
            if not all(isinstance(e, Entry) for e in made):
                raise TypeError(f"gallery: {ep.value} must return gencore.gallery.Entry objects")
            entries.extend(made)
    return entries


def _argv(entry: Entry, out: Path) -> list[str]:
    return [str(a).replace("{out}", str(out)) for a in entry.command]


def _executable(name: str) -> str:
    """A console script of this environment (beside the running interpreter), else from ``PATH``."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else name


def _run_entry(entry: Entry, root: Path, timeout: float) -> Result:
    out = root / entry.package / entry.slug
    if out.exists():
        shutil.rmtree(out)
    cwd = Path.cwd()
    argv = _argv(entry, out.relative_to(cwd) if out.is_relative_to(cwd) else out)  # shown as typed in the repo
    shown = shlex.join(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    log.info("gallery: %s: %s", entry.package, shown)
    try:
        proc = subprocess.run(
            [_executable(argv[0]), *argv[1:]],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        error = "" if proc.returncode == 0 else f"exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    missing = [m for m in entry.media if not (out / m).is_file()] if not error else list(entry.media)
    if missing and not error:
        error = f"the command finished but did not write {missing}"
    return Result(
        package=entry.package,
        title=entry.title,
        command=shown,
        media=[f"{entry.package}/{entry.slug}/{m}" for m in entry.media],
        headline=entry.headline,
        note=entry.note,
        ok=not error,
        seconds=seconds,
        error=error,
        missing=missing,
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .lead { color: #555; margin-top: 0; }
section { border-top: 1px solid #ddd; padding: 1em 0; }
h2 { margin: 0.2em 0; } h2 code { font-size: 0.8em; color: #666; }
.headline { font-weight: 600; margin: 0.3em 0 0.6em; }
figure { margin: 0.5em 0 1em; } figcaption { color: #555; font-size: 0.9em; }
img, video { max-width: 100%; image-rendering: pixelated; border: 1px solid #eee; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
.failed { background: #fff0f0; border-left: 4px solid #c00; padding: 0.5em 1em; }
"""


def _display_width(root: Path | None, media: str) -> str:
    """`` width="N"``: small pictures (28-pixel samples) shown at twice their size, at most 1400 pixels wide."""
    if root is None or not media.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".webp")):
        return ""
    try:
        from PIL import Image

        with Image.open(root / media) as im:
            return f' width="{min(2 * im.width, 1400)}"'
    except OSError:
        return ""


def render(results: Sequence[Result], *, title: str = "genlab gallery", root: Path | None = None) -> str:
    """The page: one section per package, each entry's pictures with its command and headline number (``root``:
    the gallery folder, to size the pictures)."""
    esc = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<p class="lead">Each picture was made just now by the command under it, from the checkpoint the package '
        "ships (trained here with its own CLI on real data; the folder's MADE_BY.md has the command and commit). "
        f"{sum(r.ok for r in results)} of {len(results)} entries made.</p>",
    ]
    for package in dict.fromkeys(r.package for r in results):
        parts.append(f'<section id="{esc(package)}"><h2>{esc(package)}</h2>')
        for r in (r for r in results if r.package == package):
            parts.append(f"<h3>{esc(r.title)}</h3>")
            parts.append(f'<p class="headline">{esc(r.headline)}</p>')
            if r.ok:
                for m in r.media:
                    if m.lower().endswith(VIDEO_SUFFIXES):
                        media = f'<video src="{esc(m)}" controls autoplay loop muted playsinline></video>'
                    else:
                        media = f'<img src="{esc(m)}" alt="{esc(r.title)}"{_display_width(root, m)}>'
                    parts.append(f"<figure>{media}<figcaption>{esc(m)}</figcaption></figure>")
            else:
                parts.append(f'<div class="failed"><p>this command failed:</p><pre>{esc(r.error)}</pre></div>')
            if r.note:
                parts.append(f"<p>{esc(r.note)}</p>")
            parts.append(f"<pre><code>{esc(r.command)}</code></pre><p>({r.seconds:.0f} s)</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build(out_dir: str | os.PathLike = "outputs/gallery", entries: Sequence[Entry] | None = None, *, timeout=600.0):
    """Run every entry's command into ``out_dir/<package>/<entry>/`` and write ``index.html`` and
    ``manifest.json``; returns the results (``ok`` False for an entry whose command failed)."""
    from gencore.io import atomic_path

    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    entries = discover() if entries is None else list(entries)
    if not entries:
        raise ValueError("gallery: no entries (no installed package declares the 'genlab.gallery' entry point)")
    results = [_run_entry(e, root, timeout) for e in entries]
    with atomic_path(root / "index.html") as tmp:
        tmp.write_text(render(results, root=root))
    with atomic_path(root / "manifest.json") as tmp:
        tmp.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results
