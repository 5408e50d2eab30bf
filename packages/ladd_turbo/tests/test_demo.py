"""make demo (ladd-demo) from the shipped checkpoints and make demo-train (ladd-train-demo) at a smoke budget: what
they write (the side-by-side grid, samples with class ids, metrics, the summary, the user's prompt) and their
errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gencore.cli import compose
from gencore.data.fashion_mnist import DEFAULT_ROOT
from ladd_turbo.cli import CONFIGS
from ladd_turbo.demo import demo

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing (make data)"
    ),
]
BIN = Path(sys.executable).parent


def _cfg(tmp_path: Path, *overrides: str):
    return compose(CONFIGS, "demo", [f"out_dir={tmp_path / 'demo'}", "num_samples=20", "grid_rows=2", *overrides])


def test_demo_from_the_shipped_checkpoints(tmp_path):
    metrics = demo(_cfg(tmp_path, "prompt=a photo of a sneaker", "prompt_samples=4"))
    out = tmp_path / "demo"
    # the samples, with the class id each was prompted with, for anyone to re-score
    data = np.load(out / "samples.npz")
    for who in ("teacher", "student"):
        assert data[f"{who}_images"].shape == (20, 1, 32, 32) and data[f"{who}_images"].dtype == np.uint8
        assert data[f"{who}_labels"].tolist() == [i % 10 for i in range(20)]
        row = metrics[who]
        assert row["n"] == 20 and 0 <= row["class_accuracy"] <= 1 and row["fid"] > 0 and row["seconds_per_image"] > 0
    assert metrics["student"]["class_accuracy"] >= 0.5  # the shipped student draws the classes it is asked for
    # same prompts and noise: the student's images are close to the teacher's (far closer than to another seed's)
    t, s = (data[f"{w}_images"].astype(np.float32) for w in ("teacher", "student"))
    same = np.abs(t - s).mean()
    shifted = np.abs(t - np.roll(s, 10, axis=0)).mean()  # same classes, other noise
    assert same < shifted, (same, shifted)
    assert json.loads((out / "metrics.json").read_text())["student"]["n"] == 20
    # the grid: two panels of 10 columns x grid_rows rows (32 px + 2 px padding, x3), side by side, with captions
    width, height = Image.open(out / "grid.png").size
    panel = (10 * 34 + 2) * 3
    assert width == 2 * panel + 16 + 2 * 8 and height > 2 * 34 * 3
    assert Image.open(out / "prompt.png").size[0] == 2 * (4 * 34 + 2) * 3 + 16 + 2 * 8
    assert "sneaker" in metrics["prompt"]["student_seen"]
    text = "\n".join(metrics["summary"])
    assert "FID-FMNIST" in text and "faster" in text and "prompt 'a photo of a sneaker'" in text
    assert metrics["summary"][-1].startswith("total")
    assert (out / "summary.txt").read_text().splitlines() == metrics["summary"]
    assert metrics["summary"][1].split() == ["FID-FMNIST", "class", "acc", "s", "/", "image"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("student=pkg://sd3_flow/checkpoints/fmnist_rf_lognorm", "is not a ladd-train run or export"),
        ("student_steps=5", "student_steps must be in 1..4"),
        ("num_samples=5", "num_samples must be >= 10"),
        ("student=runs/no_such_run", "not found|does not exist|no model.safetensors"),
    ],
)
def test_demo_bad_input(tmp_path, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        demo(_cfg(tmp_path, override))
    assert not (tmp_path / "demo" / "grid.png").exists()


def test_make_demo_command_line(tmp_path):
    """The console script as `make demo PROMPT=...` calls it: the prompt through the environment, so any characters
    (an apostrophe, a comma) arrive as typed; and as a user types it (Hydra-quoted)."""
    import os

    out = tmp_path / "cli"
    env = {**os.environ, "GENLAB_DEMO_PROMPT": "a kid's bag, small"}
    args = [str(BIN / "ladd-demo"), f"out_dir={out}", "num_samples=10", "grid_rows=1", "prompt_samples=2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'prompt "a kid\'s bag, small"' in proc.stdout and (out / "prompt.png").is_file()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("total")  # the summary, printed
    quoted = subprocess.run([*args, 'prompt="a photo of a bag, small"'], capture_output=True, text=True, timeout=300)
    assert quoted.returncode == 0 and "prompt 'a photo of a bag, small'" in quoted.stdout
    plain = subprocess.run(args, capture_output=True, text=True, timeout=300)  # no prompt: no stale prompt.png
    assert plain.returncode == 0 and not (out / "prompt.png").exists()
    bad = subprocess.run([str(BIN / "ladd-demo"), "student_steps=9"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "student_steps must be in 1..4" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*")
def test_demo_train_smoke(tmp_path):
    """make demo-train's four stages at 0.5 % of their budgets, then the summary from the student it trained; run
    again, every finished stage is kept."""
    from ladd_turbo.demo_train import STAGES, main

    args = ["--run-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--num-samples", "10"]
    metrics = main([*args, "--budget-scale", "0.005"])
    for stage in STAGES:
        folder = tmp_path / "runs" / stage.name
        assert (folder / ("index.json" if stage.name == "synthetic" else "export/model.safetensors")).is_file()
    assert metrics["student"]["checkpoint"] == str(tmp_path / "runs" / "student")
    assert (tmp_path / "out" / "grid.png").is_file() and metrics["train_minutes"] > 0
    again = main([*args, "--budget-scale", "0.005"])
    assert again["train_minutes"] < 0.1  # nothing retrained
    with pytest.raises(SystemExit):
        main([*args, "--budget-scale", "0"])
