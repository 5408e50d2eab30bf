"""The package end to end on the synthetic rooms: the two VQGANs trained by the ``geofree-train`` console script
(``debug=fast``), the tiny view-synthesis transformer over them (then resumed), ``geofree-sample`` (grid and
samples), ``geofree-render`` (the room's own walk with its true views, and a generated orbit), ``geofree-eval``
(view metrics and the depth probe), the hybrid and expl_img experiments; user errors run the console scripts
themselves. The tasks run in process on the composed configs, as the console scripts run them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gencore import run
from gencore.cli import compose
from gencore.testing import logged_values
from geofree.cli import CONFIGS

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SIZE = (32, 48)  # the toy's views (8 x 12 tokens)


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GENLAB_TRACEBACK", None)
    return env


def _scripts(commands: list[list[str]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run console scripts of this environment side by side (one thread each) and wait for all."""
    procs = [
        subprocess.Popen(
            [str(BIN / cmd[0]), *cmd[1:]],
            cwd=cwd,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    ]
    done = []
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


@pytest.fixture(scope="module")
def stages(tmp_path_factory) -> tuple[Path, Path]:
    """The image and depth VQGANs, a few steps each, trained by the console script."""
    root = tmp_path_factory.mktemp("geofree_stages")
    vq, dvq = root / "vq", root / "dvq"
    results = _scripts(
        [
            ["geofree-train", "experiment=vqgan_scenes", "debug=fast", f"run_dir={vq}"],
            ["geofree-train", "experiment=depth_vqgan_scenes", "debug=fast", f"run_dir={dvq}"],
        ],
        root,
    )
    for res in results:
        assert res.returncode == 0, res.stderr[-3000:]
    for folder in (vq, dvq):
        assert (folder / "export" / "model.safetensors").is_file()
        assert (folder / "checkpoints" / "last.ckpt").is_file()
    return vq, dvq


@pytest.fixture(scope="module")
def trained(stages, tmp_path_factory) -> Path:
    """experiment=tiny over the two stages: 4 steps, then resumed to 6."""
    vq, dvq = stages
    run_dir = tmp_path_factory.mktemp("geofree_tiny") / "run"
    overrides = ["experiment=tiny", f"first_stage={vq}", f"depth_stage={dvq}", f"run_dir={run_dir}", *QUIET]
    res = run.train(compose(CONFIGS, "train", overrides))
    assert res.trainer.global_step == 4 and (run_dir / "export" / "model.safetensors").is_file()
    again = run.train(compose(CONFIGS, "train", [*overrides, "resume=auto", "trainer.max_steps=6"]))
    assert again.trainer.global_step == 6  # resumed at step 4, not restarted
    losses = logged_values(run_dir, "train/loss")
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)  # two runs' logs: 4 + 2 steps
    module = again.module
    assert module.grid == (8, 12) and module.n_unmasked == 30 + 96 and module.transformer.block_size == 30 + 2 * 96 - 1
    assert module.merge_conv.in_channels == 128  # the two fmnist_f4 codebooks, 64 wide each
    return run_dir


def _held_out(num_scenes: int):
    from geofree.data.synthetic import SyntheticScenes
    from geofree.tasks import VAL_SEED

    return SyntheticScenes(num_scenes, size=SIZE, seed=VAL_SEED)


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def _video(path: Path) -> list[np.ndarray]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])  # BGR -> RGB
    cap.release()
    return frames


# ---------------------------------------------------------------------------------------------------------- sample
def test_sample(trained, tmp_path):
    from geofree import tasks

    out = tasks.sample(
        compose(
            CONFIGS,
            "sample",
            [
                f"checkpoint={trained}",
                "indices=[0,1]",
                "num_samples=4",
                "samples_per_view=2",
                "num_scenes=4",
                f"out_dir={tmp_path}",
            ],
        )
    )
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (4, 3, *SIZE) and data["images"].dtype == np.uint8
    assert data["sources"].shape == (2, 3, *SIZE) and data["targets"].shape == (2, 3, *SIZE)
    assert data["pairs"].tolist() == [0, 1]
    held_out = _held_out(4)
    for k in (0, 1):  # the held-out rooms' pairs, as asked
        item = held_out[k]
        assert np.array_equal(data["sources"][k], _uint8(item["src_img"]))
        assert np.array_equal(data["targets"][k], _uint8(item["dst_img"]))
    # one row per pair: source, target, warp, 2 samples (make_grid: 2 px padding)
    assert Image.open(out / "grid.png").size == (5 * (SIZE[1] + 2) + 2, 2 * (SIZE[0] + 2) + 2)


# ---------------------------------------------------------------------------------------------------------- render
def test_render_the_scene_walk_and_an_orbit(trained, tmp_path):
    from geofree import tasks

    steps = 3
    common = [f"checkpoint={trained}", f"steps={steps}", "num_scenes=2", "index=1"]
    scene = tasks.render(compose(CONFIGS, "render", [*common, "trajectory=scene", f"out_dir={tmp_path / 'scene'}"]))
    video, truth = _video(scene / "video.mp4"), _video(scene / "truth.mp4")
    assert len(video) == len(truth) == steps + 1  # the source, then one frame per camera
    assert video[0].shape == (128, 192, 3)  # enlarged to min_size 128 (x4, nearest)
    held_out = _held_out(2)
    views = [held_out.pair(1, 0, f)["dst_img"] for f in range(1, steps + 1)]
    for k, view in enumerate(views, start=1):  # truth.mp4 is the room's own walk (mp4 is lossy: a loose bound)
        expected = _uint8(view).transpose(1, 2, 0).repeat(4, 0).repeat(4, 1).astype(np.float32)
        err = np.abs(truth[k].astype(np.float32) - expected).mean()
        other = np.abs(truth[k % steps + 1].astype(np.float32) - expected).mean()
        assert err < 12 and err < other, (k, err, other)
    assert (scene / "frames.png").is_file()

    orbit = tasks.render(compose(CONFIGS, "render", [*common, "trajectory=orbit", f"out_dir={tmp_path / 'orbit'}"]))
    assert len(_video(orbit / "video.mp4")) == steps + 1
    assert not (orbit / "truth.mp4").exists()  # a generated path has no true views


# ------------------------------------------------------------------------------------------------------------ eval
def test_eval_with_the_depth_probe(trained, tmp_path):
    from geofree import tasks

    metrics = tasks.evaluate(
        compose(
            CONFIGS,
            "eval",
            [
                f"checkpoint={trained}",
                "num_samples=8",
                "samples_per_view=2",
                "batch_size=4",
                "num_scenes=12",
                "probe.enabled=true",
                "probe.num_train=6",
                "probe.num_test=4",
                f"out_dir={tmp_path}",
            ],
        )
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    expected = {"psnr", "psnr_best", "ssim", "warp/psnr", "warp/ssim", "reconstruction/psnr", "reconstruction/ssim"}
    expected |= {"probe/layer0", "probe/layer1", "probe/control/layer0", "probe/control/layer1"}
    assert expected <= set(metrics), expected - set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["psnr_best"] >= metrics["psnr"]
    assert -1 <= metrics["ssim"] <= 1 and all(metrics[f"probe/{k}"] <= 1 for k in ("layer0", "control/layer0"))
    assert metrics["warp/psnr"] > 14  # the exact sparse points put the stand-in depth into the pose's scale


# ----------------------------------------------------------------------------------------------------- user errors
def test_bad_inputs_are_one_clear_line(trained, tmp_path):
    sample_out, render_out = tmp_path / "s", tmp_path / "r"
    bad_index, bad_path = _scripts(
        [
            ["geofree-sample", f"checkpoint={trained}", "indices=[999]", "num_scenes=4", f"out_dir={sample_out}"],
            ["geofree-render", f"checkpoint={trained}", "trajectory=spiral", f"out_dir={render_out}"],
        ],
        tmp_path,
    )
    for proc, script in ((bad_index, "geofree-sample"), (bad_path, "geofree-render")):
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{script}: error:")]
        assert len(errors) == 1, proc.stderr
    assert "999" in bad_index.stderr and "outside the 4 pairs" in bad_index.stderr
    assert not (sample_out / "samples.npz").exists()
    for name in ("spiral", "scene", "forward", "backward", "left", "right", "orbit", "turn"):
        assert name in bad_path.stderr, bad_path.stderr
    assert not (render_out / "video.mp4").exists()


# ----------------------------------------------------------------------------------------------- other experiments
@pytest.mark.parametrize("experiment", ["hybrid", "expl_img"])
def test_other_experiments_train(experiment, stages, tmp_path):
    from geofree.lit import WarpingTransformer
    from geofree.models.geogpt import WarpGPT

    vq, dvq = stages
    res = run.train(
        compose(
            CONFIGS,
            "train",
            [
                f"experiment={experiment}",
                "debug=fast",
                f"first_stage={vq}",
                f"depth_stage={dvq}",
                f"run_dir={tmp_path}",
                "datamodule.num_scenes=8",
                "datamodule.num_val_scenes=2",
            ],
        )
    )
    assert res.trainer.global_step == 4 and (tmp_path / "export" / "model.safetensors").is_file()
    losses = logged_values(tmp_path, "train/loss")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    module = res.module
    if experiment == "hybrid":
        assert isinstance(module.transformer, WarpGPT) and module.transformer.warper.start_idx == 30
        assert module.n_unmasked == 30 + 96 and module.depth_stage_model is not None
    else:
        assert isinstance(module, WarpingTransformer) and not isinstance(module.transformer, WarpGPT)
        assert module.n_unmasked == 96 and module.depth_stage_model is None
