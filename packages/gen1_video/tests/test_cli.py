"""The package end to end on real clips with the tiny recipe: train a few steps, resume, sample, evaluate, and
``gen1-edit`` an opencv-doc sample video into an mp4 and a frame strip; bad input is one clear error naming the
problem. Training / sampling / evaluating run in process (the console scripts' tasks on the composed configs); the
edit and its user errors run the console script as a user does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gen1_video.cli import CONFIGS
from gen1_video.data import read_video
from gencore.cli import compose
from gencore.data.video import OPENCV_SAMPLES

TREE = OPENCV_SAMPLES / "tree.avi"
FRUITS = OPENCV_SAMPLES / "fruits.jpg"
pytestmark = pytest.mark.skipif(not (TREE.is_file() and FRUITS.is_file()), reason="opencv-doc samples missing")
BIN = Path(sys.executable).parent
TINY = [
    "experiment=tiny",
    f"datamodule.paths=[{TREE}]",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GENLAB_TRACEBACK", None)
    return subprocess.run([str(BIN / "gen1-edit"), *args], cwd=cwd, capture_output=True, text=True, env=env)


def _user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from gen1_video import tasks

    run_dir = tmp_path_factory.mktemp("gen1") / "run"
    result = tasks.train(compose(CONFIGS, "train", [*TINY, "trainer.max_steps=3", f"run_dir={run_dir}"]))
    assert result.trainer.global_step == 3 and (run_dir / "export" / "model.safetensors").is_file()
    again = tasks.train(compose(CONFIGS, "train", [*TINY, "trainer.max_steps=5", f"run_dir={run_dir}", "resume=auto"]))
    assert again.trainer.global_step == 5  # resumed at step 3, not restarted
    assert np.isfinite(again.metrics["train/loss"])
    return run_dir


def test_sample_and_eval(trained, tmp_path):
    from gen1_video import tasks

    out = tasks.sample(
        compose(
            CONFIGS,
            "sample",
            [f"checkpoint={trained}", f"out_dir={tmp_path / 's'}", "num_samples=3", "batch_size=2", f"paths=[{TREE}]"],
        )
    )
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (3, 3, 4, 8, 8) and data["images"].dtype == np.uint8
    assert data["sources"].shape == (3, 3, 4, 8, 8) and data["images"].std() > 0
    assert (out / "grid.png").is_file() and read_video(out / "sample_002.mp4")[0].shape[1] == 4
    metrics = tasks.evaluate(
        compose(
            CONFIGS,
            "eval",
            [
                f"checkpoint={trained}",
                f"out_dir={tmp_path / 'e'}",
                "num_samples=2",
                "sample.num_steps=4",
                f"paths=[{TREE}]",
            ],
        )
    )
    assert json.loads((tmp_path / "e" / "metrics.json").read_text()) == metrics
    assert set(metrics) == {
        "input",
        "wt1_ts0",
        "wt2_ts0",
        "frame_by_frame_ts0",
        "wt1_ts3",
        "wt2_ts3",
        "frame_by_frame_ts3",
    }
    for name, row in metrics.items():
        assert -1 <= row["frame_consistency"] <= 1 + 1e-6, name
        if name != "input":
            assert -1 <= row["content_consistency"] <= 1 + 1e-6 and row["seconds_per_frame"] > 0


def test_edit_cli_writes_mp4_and_strip(trained, tmp_path):
    out = tmp_path / "edit"
    proc = _cli(
        f"checkpoint={trained}",
        f"input={TREE}",
        f"image={FRUITS}",
        "ts=2",
        "omega_t=1.5",
        "num_steps=4",
        "stride=2",
        f"out_dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    edited, fps = read_video(out / "edited.mp4")
    assert edited.shape[1] == 4 and edited.std() > 0  # the model's 4 frames
    assert abs(fps - 15.0 / 2) < 0.01  # every 2nd frame of a 15 fps video plays at the input's speed
    assert read_video(out / "input.mp4")[0].shape[1] == 4
    from PIL import Image

    with Image.open(out / "strip.png") as im:
        assert im.width > im.height  # 4 frames across, input and edit in two rows
    with Image.open(out / "edit.gif") as im:
        assert im.n_frames == 4 and im.width > im.height  # input | edit, 4 frames


def test_edit_bad_input_is_one_clear_error(trained, tmp_path):
    from gen1_video import tasks
    from gencore.validate import ConfigError

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x13\x37" * 3000)
    base = [f"checkpoint={trained}", f"image={FRUITS}", "num_steps=4", f"out_dir={tmp_path / 'x'}"]
    # as a user sees it: exit 1, one line naming the file, no traceback, nothing written
    _user_error(_cli(*base, f"input={garbage}", cwd=tmp_path), "cannot decode video", "garbage.mp4")

    def edit(*overrides: str) -> None:
        tasks.edit(compose(CONFIGS, "edit", [*base, *overrides]))

    with pytest.raises(ValueError, match=r"tree\.avi has 68 decodable frames; 8 frames with stride 10 .* need 71"):
        edit(f"input={TREE}", "num_frames=8", "stride=10")
    with pytest.raises(ValueError, match=r"ts=9 is outside \[0, 5\]"):
        edit(f"input={TREE}", "ts=9")
    with pytest.raises(ValueError, match="needs a content encoder with a text tower"):
        edit(f"input={TREE}", "image=null", "prompt=a red car")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        edit(f"input={TREE}", f"image={tmp_path / 'nowhere.png'}")
    with pytest.raises(ConfigError, match=r"nowhere.*does not exist"):
        tasks.edit(compose(CONFIGS, "edit", [f"checkpoint={tmp_path / 'nowhere'}", f"input={TREE}", f"image={FRUITS}"]))
    assert not (tmp_path / "x").exists()  # failed edits leave nothing behind


def test_edit_content_can_be_a_frame_of_another_video(trained, tmp_path):
    import torch

    from gen1_video import tasks

    cfg = compose(CONFIGS, "edit", [f"checkpoint={trained}", f"input={TREE}", f"image={TREE}", "image_frame=30"])
    module = tasks.load_model(cfg)
    context, image = tasks._content_from(cfg, module)
    frame = read_video(TREE, 1, start=30, size=module.image_size, channels=module.image_channels)[0]
    torch.testing.assert_close(image, frame.permute(1, 0, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(context, module.encode_content(frame.permute(1, 0, 2, 3)))
    cfg.image_frame = 500  # past the end of tree.avi (68 frames)
    with pytest.raises(ValueError, match="tree.avi"):
        tasks._content_from(cfg, module)
