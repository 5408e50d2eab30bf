"""The package end to end: the tiny model trained on the real photos by ``inpaint-train`` (then resumed), and
``inpaint-sample``, ``inpaint-image`` (your own files), ``inpaint-video`` (an OpenCV sample video in, mp4 out) and
``inpaint-eval`` from it; the paper presets compose; user errors are one line from the console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from gencore import run
from gencore.cli import compose
from gencore.data.video import video_info
from gencore.testing import logged_values
from twostream_inpaint.cli import CONFIGS

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
VTEST = Path("/usr/share/doc/opencv-doc/examples/data/vtest.avi")


def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GENLAB_TRACEBACK", None)
    return subprocess.run([str(BIN / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tsi") / "run"
    cfg = compose(CONFIGS, "train", ["experiment=tiny", f"run_dir={run_dir}", *QUIET])
    run.train(cfg)
    return run_dir


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A photo, a keyframe of the same scene (shifted), a hole, and bad masks, as image files."""
    from skimage import data

    folder = tmp_path_factory.mktemp("files")
    photo = cv2.resize(data.astronaut()[60:460, 60:460], (64, 64), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(folder / "img.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "key.png"), cv2.cvtColor(np.roll(photo, 6, axis=1), cv2.COLOR_RGB2BGR))
    hole = np.zeros((64, 64), np.uint8)
    hole[20:40, 24:44] = 255
    cv2.imwrite(str(folder / "mask.png"), hole)
    cv2.imwrite(str(folder / "small_mask.png"), hole[:32, :32])
    cv2.imwrite(str(folder / "full_mask.png"), np.full((64, 64), 255, np.uint8))
    return folder


def test_train_then_resume_logs_and_exports(trained):
    assert (trained / "export").is_dir()
    assert logged_values(trained, "train/g_total")
    assert logged_values(trained, "val/psnr_hole")
    cfg = compose(
        CONFIGS, "train", ["experiment=tiny", f"run_dir={trained}", "resume=auto", "trainer.max_steps=8", *QUIET]
    )
    result = run.train(cfg)
    assert result.trainer.global_step == 8  # resumed at 4 (2 batches), not restarted: 2 more batches


def test_sample_writes_the_inpainted_held_out_images(trained, tmp_path):
    from twostream_inpaint.tasks import sample

    cfg = compose(CONFIGS, "sample", [f"checkpoint={trained}", "num_samples=3", f"out_dir={tmp_path}"])
    sample(cfg)
    arrays = np.load(tmp_path / "samples.npz")
    images, targets, masks = arrays["images"], arrays["targets"], arrays["masks"]
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8
    known = ~masks.repeat(3, axis=1)
    assert np.array_equal(images[known], targets[known])  # composited: the known pixels are the photo's
    assert (tmp_path / "grid.png").is_file()


def test_inpaint_image_from_files_and_its_bad_inputs(trained, files, tmp_path):
    common = [f"checkpoint={trained}", f"image={files / 'img.png'}", f"keyframes=[{files / 'key.png'}]"]
    ok = cli("inpaint-image", *common, f"mask={files / 'mask.png'}", f"out_dir={tmp_path / 'ok'}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    out = cv2.imread(str(tmp_path / "ok" / "inpainted.png"))
    src = cv2.imread(str(files / "img.png"))
    assert out.shape == (64, 64, 3)
    hole = cv2.imread(str(files / "mask.png"), cv2.IMREAD_GRAYSCALE) > 127
    assert np.abs(out[~hole].astype(int) - src[~hole].astype(int)).max() <= 1  # known pixels kept
    bad = cli("inpaint-image", *common, f"mask={files / 'small_mask.png'}", f"out_dir={tmp_path / 'b1'}", cwd=tmp_path)
    one_line_error(bad, "mask size (32, 32) differs from the image size (64, 64)")
    full = cli("inpaint-image", *common, f"mask={files / 'full_mask.png'}", f"out_dir={tmp_path / 'b2'}", cwd=tmp_path)
    one_line_error(full, "the mask covers the whole image")
    single = cli(  # one keyframe without brackets, and the model run at another size than the photo's
        "inpaint-image",
        *common[:2],
        f"keyframes={files / 'key.png'}",
        f"mask={files / 'mask.png'}",
        "size=[32,32]",
        f"out_dir={tmp_path / 'one'}",
        cwd=tmp_path,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    assert cv2.imread(str(tmp_path / "one" / "inpainted.png")).shape == (64, 64, 3)  # the photo's own size
    odd = cli("inpaint-image", *common, f"mask={files / 'mask.png'}", "size=[30,32]", cwd=tmp_path)
    one_line_error(odd, "size 30x32 is not divisible by the generator's downsampling factor 4")
    none = cli(
        "inpaint-image",
        f"checkpoint={trained}",
        f"image={files / 'img.png'}",
        f"mask={files / 'mask.png'}",
        f"out_dir={tmp_path / 'b3'}",
        cwd=tmp_path,
    )
    one_line_error(none, "give at least one keyframe")
    assert not any((tmp_path / b).exists() for b in ("b1", "b2", "b3"))


@pytest.mark.skipif(not VTEST.is_file(), reason="OpenCV sample videos missing (make data)")
def test_inpaint_video_end_to_end_from_the_console_script(trained, tmp_path):
    proc = cli(
        "inpaint-video",
        f"checkpoint={trained}",
        f"video={VTEST}",
        "num_frames=10",
        "stride=3",
        f"out_dir={tmp_path / 'v'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frames/s" in proc.stdout + proc.stderr
    info = video_info(tmp_path / "v" / "inpainted.mp4")
    assert info.num_frames == 10
    assert (tmp_path / "v" / "masked.mp4").is_file() and (tmp_path / "v" / "inpainted.gif").is_file()
    bad = cli("inpaint-video", f"checkpoint={trained}", f"video={VTEST}", "num_frames=4", "keyframes=[7]", cwd=tmp_path)
    one_line_error(bad, "must be within the clip's 4 frames")
    none = cli("inpaint-video", f"checkpoint={trained}", f"video={VTEST}", "num_frames=4", "keyframes=[]", cwd=tmp_path)
    one_line_error(none, "give at least one frame index")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    junk = cli("inpaint-video", f"checkpoint={trained}", f"video={text}", cwd=tmp_path)
    one_line_error(junk, "is not a readable video")


def test_video_keyframes_are_written_whole_and_mask_videos_follow_the_clip(trained, tmp_path):
    from skimage import data

    from gencore.data.video import read_frames, write_video

    photo = torch.from_numpy(data.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float() / 127.5 - 1  # 128 x 128
    clip = torch.stack([photo.roll(2 * i, dims=-1)[:, 16:112, :] for i in range(8)], dim=1)  # (3, 8, 96, 128)
    write_video(clip, tmp_path / "clip.mp4", fps=8)
    hole = -torch.ones(1, 8, 96, 128)
    hole[..., 30:60, 40:90] = 1
    write_video(hole, tmp_path / "holes.mp4", fps=8)
    proc = cli(
        "inpaint-video",
        f"checkpoint={trained}",
        f"video={tmp_path / 'clip.mp4'}",
        f"mask={tmp_path / 'holes.mp4'}",
        "start=2",
        "num_frames=4",
        "keyframes=0",
        "size=[32,48]",
        f"out_dir={tmp_path / 'v'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_frames(tmp_path / "v" / "masked.mp4", [0, 1]).astype(float)
    gray = (np.abs(out - 127.5) < 8).all(-1)  # the gray hole drawn on the masked frames
    assert gray[0].mean() < 0.02 and gray[1].mean() > 0.06  # the keyframe (frame 0) has no hole; the next has one
    write_video(hole[:, :5], tmp_path / "short.mp4", fps=8)  # 5 mask frames: the clip's frames 2..5 need 6
    bad = cli(
        "inpaint-video",
        f"checkpoint={trained}",
        f"video={tmp_path / 'clip.mp4'}",
        f"mask={tmp_path / 'short.mp4'}",
        "start=2",
        "num_frames=4",
        cwd=tmp_path,
    )
    one_line_error(bad, "has 5 frames; the clip's frames 2..5 need 6")


def test_eval_reports_hole_metrics_references_and_video(trained, tmp_path):
    from twostream_inpaint.tasks import evaluate

    cfg = compose(
        CONFIGS,
        "eval",
        [f"checkpoint={trained}", "num_samples=8", "batch_size=4", "video_clips=1", f"out_dir={tmp_path}"],
    )
    metrics = evaluate(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    for key in ("images/psnr_hole", "images/ssim_hole", "images/lpips_fmnist", "images/fid_fmnist"):
        assert np.isfinite(metrics[key]), key
    assert "images/mean_fill/psnr_hole" in metrics and "images/warp/psnr_hole" in metrics
    if VTEST.is_file():
        assert metrics["video/clips"] == 1 and metrics["video/fps"] > 0


@pytest.mark.parametrize("experiment", ["twostream", "global_only", "local_only", "places_ours", "places_ours_big"])
def test_experiments_compose(experiment):
    cfg = compose(CONFIGS, "train", [f"experiment={experiment}"])
    gen = cfg.module.generator
    assert gen._target_ == "twostream_inpaint.models.GIResNetGenerator"
    if experiment == "global_only":
        assert not gen.is_deformable and cfg.module.flow is None
    if experiment == "local_only":
        assert not gen.is_crossattending and gen.is_deformable
    if experiment.startswith("places"):
        assert gen.ngf == 64 and cfg.datamodule.size == 256 and cfg.module.perceptual == "resnet_pl"
        assert gen.n_blocks == (12 if experiment.endswith("big") else 4)
