"""The package end to end through its console scripts: ``net2net-train experiment=tiny`` (which trains the tiny union
autoencoder first, then the cINN over its cached latents; then resumed), and ``net2net-sample``,
``net2net-translate`` (held-out images and your own file), ``net2net-bias-report`` and ``net2net-eval`` from that
run; user errors are one line from the console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gencore.testing import logged_values

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
NAMES = ["fashion_mnist", "digits", "lfw"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GENLAB_TRACEBACK", None)
    return env


def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=_env())


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """One tiny run for the whole file: (run folder, the training command's output)."""
    cwd = tmp_path_factory.mktemp("n2n")
    run_dir = cwd / "run"
    out = ok(cli("net2net-train", "experiment=tiny", f"run_dir={run_dir}", *QUIET, cwd=cwd))
    return run_dir, out


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    """A user's own gray PNG of another size and aspect (resized and centre-cropped by the task)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :30]
    face = ((np.hypot(yy - 20, xx - 15) < 12) * 180 + rng.integers(0, 60, (40, 30))).astype(np.uint8)
    Image.fromarray(face).save(folder / "x.png")
    return folder / "x.png"


def test_train_trains_the_first_stage_then_the_cinn_and_resumes(trained):
    run_dir, out = trained
    assert "first_stage not given" in out
    assert (run_dir / "first_stage" / "export").is_dir() and (run_dir / "export").is_dir()
    assert (run_dir / "latents" / "train").is_dir() and (run_dir / "latents" / "val").is_dir()
    assert len(logged_values(run_dir, "train/loss")) == 4  # log_every_n_steps 1, max_steps 4
    assert logged_values(run_dir, "val/bits_per_dim")
    resumed = ok(cli("net2net-train", "experiment=tiny", f"run_dir={run_dir}", "resume=auto",
                     "trainer.max_steps=6", *QUIET, cwd=run_dir.parent))  # fmt: skip
    assert "trained 6 steps" in resumed
    assert "first_stage not given" not in resumed  # the run's own first stage is reused
    assert len(logged_values(run_dir, "train/loss")) == 6  # continued from step 4, not restarted


def test_sample(trained, tmp_path):
    run_dir, _ = trained
    ok(cli("net2net-sample", f"checkpoint={run_dir}", "num_samples=3", f"out_dir={tmp_path}/s", cwd=tmp_path))
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["images"].shape == (3, 1, 16, 16) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 1, 2]  # one block per dataset by default
    assert (tmp_path / "s" / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_translate_held_out_images_with_an_interpolation(trained, tmp_path):
    run_dir, _ = trained
    ok(cli("net2net-translate", f"checkpoint={run_dir}", "num_images=2", "alphas=[0,0.5,1]",
           f"out_dir={tmp_path}/t", cwd=tmp_path))  # fmt: skip
    out = tmp_path / "t"
    data = np.load(out / "projections.npz")
    assert data["projections"].shape == (6, 3, 1, 16, 16) and data["projections"].dtype == np.uint8
    assert data["inputs"].shape == (6, 1, 16, 16)
    assert data["sources"].tolist() == [0, 0, 1, 1, 2, 2] and data["targets"].tolist() == [0, 1, 2]
    assert data["names"].tolist() == NAMES
    assert (out / "translate.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "interpolation.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "interpolation.gif").read_bytes()[:6] in (b"GIF89a", b"GIF87a")


def test_translate_your_own_image(trained, image_file, tmp_path):
    run_dir, _ = trained
    ok(cli("net2net-translate", f"checkpoint={run_dir}", f"images=[{image_file.name}]", "source=lfw",
           "targets=[digits,fashion_mnist]", f"out_dir={tmp_path}/own", cwd=image_file.parent))  # fmt: skip
    data = np.load(tmp_path / "own" / "projections.npz")
    assert data["inputs"].shape == (1, 1, 16, 16) and data["projections"].shape == (1, 2, 1, 16, 16)
    assert data["sources"].tolist() == [2] and data["targets"].tolist() == [1, 0]
    assert data["inputs"].max() > 150 and data["inputs"].min() < 80  # the bright disc on its darker ground


def test_bias_report(trained):
    run_dir, _ = trained
    ok(cli("net2net-bias-report", f"checkpoint={run_dir}", "num_images=8", "classifier_images=40", cwd=run_dir))
    out = run_dir / "eval" / "bias"  # the default: next to the checkpoint
    report = json.loads((out / "report.json").read_text())
    assert report["datasets"] == NAMES and set(report["real"]) == set(NAMES)
    pairs = {(p["source"], p["target"]) for p in report["pairs"]}
    assert len(report["pairs"]) == 9 and pairs == {(s, t) for s in NAMES for t in NAMES}
    for p in report["pairs"]:
        assert p["n"] == 8 and 0 <= p["recognised_as_target"] <= 1
        assert set(p["shift"]) == {"brightness", "contrast", "ink", "centre_mass"}
        assert len(p["attributes"]["fmnist_classes"]) == 10
    assert 0 <= report["classifier_train_accuracy"] <= 1 and set(report["real_recognised"]) == set(NAMES)
    md = (out / "report.md").read_text()
    assert "| source -> target |" in md and "| lfw -> digits | 8 |" in md
    assert (out / "bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "projection_grid.png").is_file()


def test_eval(trained):
    run_dir, _ = trained
    ok(cli("net2net-eval", f"checkpoint={run_dir}", "num_samples=6", "num_images=8", "classifier_images=40",
           cwd=run_dir))  # fmt: skip
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    for name in NAMES:
        assert np.isfinite(metrics[f"bits_per_dim/{name}"])
        assert metrics[f"round_trip_max_abs/{name}"] < 1e-4
        assert 0 <= metrics[f"likelihood_picks_dataset/{name}"] <= 1
        assert 0 <= metrics[f"sample_recognised/{name}"] <= 1  # 6 samples: 2 of each dataset
        assert np.isfinite(metrics[f"recon_psnr/{name}"])
    assert metrics["num_images_per_dataset"] == 8 and metrics["num_samples"] == 6
    assert (run_dir / "eval" / "samples.png").is_file() and (run_dir / "eval" / "projections.png").is_file()


def test_eval_of_the_union_autoencoder(trained, tmp_path):
    run_dir, _ = trained
    out = ok(cli("net2net-eval", f"checkpoint={run_dir / 'first_stage'}", "num_images=4", f"out_dir={tmp_path}",
                 cwd=tmp_path))  # fmt: skip
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert sorted(metrics) == sorted([*(f"recon_psnr/{n}" for n in NAMES), "num_images_per_dataset"]), metrics
    assert all(np.isfinite(metrics[f"recon_psnr/{n}"]) for n in NAMES) and "recon_psnr/lfw" in out
    assert (tmp_path / "reconstructions.png").is_file()


# ---------------------------------------------------------------------------------------------------- user errors

ERRORS = {
    "unknown_label": (
        ["net2net-sample", "num_samples=2", "sample.labels=[cats]"],
        "unknown dataset 'cats'; this model knows 0=fashion_mnist, 1=digits, 2=lfw",
    ),
    "unknown_source": (["net2net-translate", "source=cats"], "unknown dataset 'cats'"),
    "images_without_source": (["net2net-translate", "images=[x.png]"], "say which dataset your images are from"),
    "missing_image": (["net2net-translate", "images=[nope.png]", "source=lfw"], "image not found: nope.png"),
    "no_targets": (["net2net-translate", "num_images=1", "targets=[]"], "targets=[] is empty"),
    "zero_images": (["net2net-translate", "num_images=0"], "num_images: expected an integer >= 1, got 0"),
    "no_alphas": (["net2net-translate", "num_images=1", "alphas=[]"], "alphas=[] is empty"),
    "bad_mode": (["net2net-translate", "num_images=1", "mode=foo"], "mode='foo' is not one of latent, label"),
}


@pytest.fixture(scope="module")
def errors(trained, image_file) -> dict[str, tuple[int, str]]:
    """Every user-error command at once (they are independent): {case: (exit code, stderr)}."""
    run_dir, _ = trained
    procs = {
        case: subprocess.Popen(
            [str(BIN / script), f"checkpoint={run_dir}", *args, f"out_dir={image_file.parent}/{case}"],
            cwd=image_file.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for case, ((script, *args), _) in ERRORS.items()
    }
    return {case: (p.wait(timeout=300), p.stderr.read()) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_are_one_line(errors, case):
    code, stderr = errors[case]
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if ": error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    message = stderr[stderr.index(lines[0]) :]  # the error line, and gencore's list of config errors under it
    assert len(message.splitlines()) <= 4 and ERRORS[case][1] in message, stderr[-3000:]
