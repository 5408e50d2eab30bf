"""Repository contracts: pins, CI entry, package layout, the dependency DAG, configs, library-code hygiene."""

import ast
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.parent.name for p in (ROOT / "packages").glob("*/pyproject.toml"))
# shared/design/ARCHITECTURE.md: who may import whom (transitively closed below)
DEPENDS = {
    "gencore": set(),
    "taming": {"gencore"},
    "ldm": {"gencore", "taming"},
    "sd3_flow": {"gencore"},
    "ladd_turbo": {"sd3_flow"},
    "gen1_video": {"ldm"},
    "twostream_inpaint": {"gencore"},
    "imagebart": {"taming"},
    "geofree": {"taming"},
    "net2net": {"gencore"},
    "shapebias": {"gencore"},
}


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep in DEPENDS[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def source_files():
    yield "gencore", sorted((ROOT / "shared" / "src" / "gencore").rglob("*.py"))
    for pkg in PACKAGES:
        yield pkg, sorted((ROOT / "packages" / pkg / "src").rglob("*.py"))


def test_torch_pins_and_ci_entry():
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "torch==2.14.1 torchvision==0.29.1" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_every_package_has_the_standard_layout():
    assert set(PACKAGES) <= set(DEPENDS), f"unknown package folders: {set(PACKAGES) - set(DEPENDS)}"
    for pkg in PACKAGES:
        base = ROOT / "packages" / pkg
        meta = tomllib.loads((base / "pyproject.toml").read_text())["project"]
        assert meta["name"] == f"genlab-{pkg.replace('_', '-')}" or meta["name"] == f"genlab-{pkg}"
        assert (base / "src" / pkg / "__init__.py").is_file() and (base / "README.md").is_file()
        assert (base / "tests").is_dir()
        train = base / "src" / pkg / "configs" / "train.yaml"
        assert train.is_file() and "pkg://gencore.configs" in train.read_text()
        scripts = meta.get("scripts", {})
        assert any(name.endswith("-train") for name in scripts), f"{pkg}: no <name>-train console script"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dependency_graph_is_respected():
    bad = []
    for pkg, files in source_files():
        allowed = closure(pkg) | {pkg}
        for f in files:
            used = _imports(f) & set(DEPENDS)
            bad += [f"{f.relative_to(ROOT)} imports {u}" for u in sorted(used - allowed)]
    assert not bad, "\n".join(bad)


def test_every_yaml_config_parses():
    files = [p for p in ROOT.glob("**/configs/**/*.yaml") if ".venv" not in p.parts]
    assert files
    for f in files:
        OmegaConf.load(f)


FORBIDDEN = [
    (re.compile(r"\.cuda\("), "hard-coded .cuda()"),
    (re.compile(r"""device\s*=\s*["']cuda"""), "hard-coded cuda device"),
    (re.compile(r"^\s*print\(", re.M), "print in library code (use logging)"),
    (re.compile(r"sys\.path\.(insert|append)"), "sys.path edits"),
]
PRINT_OK = {"train_features.py", "cli.py"}  # console-script output (cli.py: the one-line user errors)


def test_library_code_hygiene():
    bad = []
    for _pkg, files in source_files():
        for f in files:
            text = f.read_text()
            for pattern, why in FORBIDDEN:
                if why.startswith("print") and f.name in PRINT_OK:
                    continue
                if pattern.search(text):
                    bad.append(f"{f.relative_to(ROOT)}: {why}")
    assert not bad, "\n".join(bad)


def test_no_large_or_generated_files_are_tracked():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    big = []
    for name in files.splitlines():
        p = ROOT / name
        if p.is_file() and p.stat().st_size > 8 * 2**20:
            big.append(f"{name}: {p.stat().st_size / 2**20:.1f} MiB")
        assert not name.startswith((".venv/", "runs/")) and not name.endswith((".ckpt", ".pt", ".pth")), name
    assert not big, big


def test_ruff_is_clean():
    ruff = ROOT / ".venv" / "bin" / "ruff"
    if not ruff.is_file():
        pytest.skip("ruff not installed in .venv")
    proc = subprocess.run([str(ruff), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
