"""Clips of the real opencv-doc videos (grey / RGB, cached or read per clip), joint image batches, one video for
editing, and the errors for undecodable files and too-short videos."""

from __future__ import annotations

import pytest
import torch

from gen1_video.data import Clips, Gen1DataModule, JointClips, read_video, to_channels, write_video
from gencore.data import DataReadError
from gencore.data.video import OPENCV_SAMPLES

TREE = OPENCV_SAMPLES / "tree.avi"  # 68 real frames, 320x240
pytestmark = pytest.mark.skipif(not TREE.is_file(), reason="opencv-doc sample videos missing (make data)")


def test_cached_clips_equal_clips_read_one_by_one():
    kw = dict(num_frames=4, stride=3, size=16, max_clips_per_video=3)
    cached = Clips([TREE], channels=1, cache=True, **kw)
    direct = Clips([TREE], channels=1, cache=False, **kw)
    assert len(cached) == len(direct) == 3
    for i in range(3):
        a, b = cached[i]["video"], direct[i]["video"]
        assert a.shape == (1, 4, 16, 16)
        torch.testing.assert_close(a, b)
        assert a.std() > 0.05  # real frames, not a constant
    rgb = Clips([TREE], channels=3, **kw)[1]["video"]
    torch.testing.assert_close(to_channels(rgb, 1, dim=0), direct[1]["video"])


def test_undecodable_and_short_videos_are_skipped_and_counted(tmp_path):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(torch.randint(0, 256, (4000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.warns(RuntimeWarning, match="garbage.mp4"):
        clips = Clips([bad, TREE], num_frames=4, size=8)
    assert clips.num_skipped == 1 and str(bad) in clips.skipped
    assert len(clips) > 0
    with pytest.raises(DataReadError, match=r"garbage\.mp4"), pytest.warns(RuntimeWarning):
        Clips([bad], num_frames=4, size=8)
    with pytest.raises(DataReadError, match=r"tree\.avi.*only 68 decodable frame\(s\), a clip needs 100"):
        with pytest.warns(RuntimeWarning):
            Clips([TREE], num_frames=100, size=8)


def test_read_video_errors_name_the_file_and_counts(tmp_path):
    video, fps = read_video(TREE, 5, stride=2, size=16, channels=3)
    assert video.shape == (3, 5, 16, 16) and fps == pytest.approx(7.5, rel=1e-3)
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(b"\x00not a video" * 500)
    with pytest.raises(ValueError, match=r"cannot decode video .*garbage\.mp4"):
        read_video(bad, 4)
    with pytest.raises(ValueError, match=r"tree\.avi has 68 decodable frames; 8 frames with stride 10 .* need 71"):
        read_video(TREE, 8, stride=10)
    with pytest.raises(FileNotFoundError, match="nowhere.mp4"):
        read_video(tmp_path / "nowhere.mp4", 4)


def test_write_video_round_trip(tmp_path):
    clip, _ = read_video(TREE, 6, size=32, channels=1)
    path = write_video(clip, tmp_path / "out.mp4", fps=5, min_size=32)
    back, fps = read_video(path, channels=1)
    assert back.shape == (1, 6, 32, 32) and fps == pytest.approx(5)
    assert (back - clip).abs().mean() < 0.1  # mp4v is lossy, but it is the same clip


def test_joint_clips_pair_clips_with_images():
    clips = Clips([TREE], num_frames=4, size=8, channels=1, cache=True, max_clips_per_video=4)
    images = [{"image": torch.full((1, 8, 8), float(i) / 10)} for i in range(10)]
    joint = JointClips(clips, images, images_per_clip=3)
    item = joint[0]
    assert item["video"].shape == (1, 4, 8, 8) and item["image"].shape == (3, 1, 8, 8)
    assert len(joint) == len(clips)
    with pytest.raises(ValueError, match="give both the same channels and size"):
        JointClips(clips, [{"image": torch.zeros(3, 8, 8)}], images_per_clip=2)


def test_datamodule_batches():
    dm = Gen1DataModule(
        paths=[str(TREE)],
        num_frames=4,
        stride=2,
        size=8,
        channels=1,
        cache=True,
        images=lambda: [{"image": torch.zeros(1, 8, 8)}] * 5,
        images_per_clip=2,
        batch_size=2,
        val_fraction=0.2,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 1, 4, 8, 8) and batch["image"].shape == (2, 2, 1, 8, 8)
    assert next(iter(dm.val_dataloader()))["video"].shape[1:] == (1, 4, 8, 8)
