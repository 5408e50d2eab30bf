"""``make gallery`` (gencore.gallery): entries, the page, every landed package present, and the real page in
headless Chromium (every image decoded, every video playable), with the screenshot kept in outputs/test-artifacts/."""

from __future__ import annotations

import json
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from gencore import gallery
from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.gallery import Entry

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "outputs" / "test-artifacts"


def landed(pyproject: Path) -> bool:
    """A package has landed unless its pyproject says ``[tool.genlab] status = "in-progress"``."""
    return tomllib.loads(pyproject.read_text()).get("tool", {}).get("genlab", {}).get("status") != "in-progress"


LANDED = sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml") if landed(p))

WRITE_PNG = (
    "import sys, pathlib, numpy as np; from PIL import Image; out = pathlib.Path(sys.argv[1]); "
    "out.mkdir(parents=True, exist_ok=True); Image.fromarray(np.full((8, 12), 200, np.uint8)).save(out / 'a.png')"
)


def test_entry_checks_its_fields():
    with pytest.raises(ValueError, match="empty command"):
        Entry("p", "t", [], ["a.png"], "h")
    with pytest.raises(ValueError, match="image or video files"):
        Entry("p", "t", ["x"], ["a.txt"], "h")
    with pytest.raises(ValueError, match="image or video files"):
        Entry("p", "t", ["x"], [], "h")
    assert (
        Entry("p", "Text to image: 28 steps, guidance 4", ["x"], ["a.png"], "h").slug
        == "text_to_image_28_steps_guidance_4"
    )


def test_build_runs_each_command_and_reports_failures(tmp_path):
    entries = [
        Entry("pkg_a", "A picture", [sys.executable, "-c", WRITE_PNG, "{out}"], ["a.png"], "metric 1.0 <b>"),
        Entry("pkg_a", "Fails", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], ["a.png"], "h"),
        Entry("pkg_b", "Writes nothing", [sys.executable, "-c", "pass"], ["clip.webm"], "h"),
    ]
    results = gallery.build(tmp_path / "g", entries)
    assert [r.ok for r in results] == [True, False, False]
    assert "exit 3" in results[1].error and "boom" in results[1].error
    assert results[2].missing == ["clip.webm"] and "did not write" in results[2].error
    assert (tmp_path / "g" / "pkg_a" / "a_picture" / "a.png").is_file()
    page = (tmp_path / "g" / "index.html").read_text()
    assert '<img src="pkg_a/a_picture/a.png"' in page
    assert "metric 1.0 &lt;b&gt;" in page  # escaped
    assert page.count('class="failed"') == 2 and "1 of 3 entries made" in page
    assert str(tmp_path / "g" / "pkg_a" / "a_picture") in page  # the exact command, with its real output folder
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert [m["ok"] for m in manifest] == [True, False, False]


def test_main_exits_1_on_unknown_package(capsys):
    from gencore.cli import gallery_main

    assert gallery_main(["--only", "no_such_package"]) == 1
    assert "no entries for ['no_such_package']" in capsys.readouterr().err


def test_every_landed_package_has_an_entry():
    entries = gallery.discover()
    assert sorted({e.package for e in entries}) == LANDED
    assert [e.package for e in entries] == sorted((e.package for e in entries), key=gallery.PACKAGE_ORDER.index)
    for e in entries:
        assert "{out}" in " ".join(e.command) and e.headline


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing (make data)"
)
def test_gallery_page_in_headless_chromium():
    """The real gallery (every installed package's commands on its shipped checkpoints), opened in Chromium."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium on PATH (make browser: apt-get install chromium); the gallery was not opened")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -c constraints.txt -e 'shared[dev]')")
    out = ARTIFACTS / "gallery"
    results = gallery.build(out)
    failed = [f"{r.package}: {r.command}\n{r.error}" for r in results if not r.ok]
    assert not failed, "\n\n".join(failed)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--allow-file-access-from-files"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto((out / "index.html").as_uri(), wait_until="load")
            page.wait_for_function(
                "Array.from(document.querySelectorAll('video')).every(v => v.readyState >= 2)", timeout=20_000
            )
            images = page.evaluate(
                "Array.from(document.images)"
                ".map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight}))"
            )
            videos = page.evaluate(
                "Array.from(document.querySelectorAll('video'))"
                ".map(v => ({src: v.getAttribute('src'), state: v.readyState}))"
            )
            sections = page.evaluate("Array.from(document.querySelectorAll('section')).map(s => s.id)")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)
        finally:
            browser.close()
    media = [m for r in results for m in r.media]
    assert sorted([i["src"] for i in images] + [v["src"] for v in videos]) == sorted(media)
    assert all(i["w"] > 0 and i["h"] > 0 for i in images), images
    assert all(v["state"] >= 2 for v in videos), videos
    assert sections == list(dict.fromkeys(r.package for r in results)) and set(sections) == set(LANDED)
    assert (ARTIFACTS / "gallery.png").stat().st_size > 10_000
