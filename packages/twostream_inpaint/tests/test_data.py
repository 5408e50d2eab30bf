"""Masks, keyframe samples from real photos, masked video clips and the datamodule."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gencore.data._robust import DataReadError
from gencore.data.images import _skimage_photo
from gencore.data.video import OPENCV_SAMPLES, write_video
from twostream_inpaint.data import (
    VAL_PHOTOS,
    KeyframeDataModule,
    KeyframeImages,
    VideoInpaintClips,
    load_photos,
    photo_split,
    real_photos,
    split_range,
    video_frames,
)
from twostream_inpaint.masks import MixedMasks, box_mask, irregular_mask, moving_masks

needs_opencv_doc = pytest.mark.skipif(
    not (OPENCV_SAMPLES / "fruits.jpg").is_file(), reason="opencv-doc sample images are not installed"
)
needs_opencv_videos = pytest.mark.skipif(
    not (OPENCV_SAMPLES / "tree.avi").is_file(), reason="opencv-doc sample videos are not installed"
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _is_rectangle(m: np.ndarray) -> bool:
    ys, xs = np.nonzero(m)
    box = np.zeros_like(m)
    box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
    return bool(np.array_equal(box, m))


def _binary(t: torch.Tensor) -> bool:
    return bool(((t == 0) | (t == 1)).all())


# -- masks ---------------------------------------------------------------------------------------------------------


def test_mask_functions_are_binary_and_deterministic():
    for h, w in ((64, 64), (256, 256), (48, 80)):
        for seed in range(5):
            for fn in (irregular_mask, box_mask):
                kw = {} if fn is irregular_mask else {"margin": 2, "bbox_min_size": 4, "bbox_max_size": 30}
                m = fn(np.random.default_rng(seed), h, w, **kw)
                assert m.shape == (h, w) and m.dtype == np.float32
                assert set(np.unique(m)) <= {0.0, 1.0} and m.any()
                assert np.array_equal(m, fn(np.random.default_rng(seed), h, w, **kw))


def test_mixed_masks_never_empty_nor_full():
    rng = np.random.default_rng(0)
    masks = MixedMasks()
    for h, w in ((64, 64), (32, 48), (16, 16)):
        for _ in range(40):
            m = masks(rng, h, w)
            assert m.shape == (1, h, w) and m.dtype == torch.float32 and _binary(m)
            assert 0 < m.mean() < 1
    # huge unscaled strokes on a tiny image are often full, boxes with min_times 0 often empty: both redrawn
    big = MixedMasks(irregular_kwargs={"max_width": 100, "min_width": 20}, box_kwargs={"min_times": 0}, scale_to=None)
    for _ in range(30):
        assert 0 < big(rng, 24, 24).mean() < 1
    always_full = MixedMasks(
        box_proba=0, irregular_kwargs={"min_width": 100, "max_width": 1}, scale_to=None, max_attempts=5
    )
    with pytest.raises(RuntimeError, match="empty or full"):
        always_full(rng, 16, 16)


def test_mask_sizes_scale_with_the_image():
    masks = MixedMasks()
    irr, box = masks.kwargs_for(64, 64)
    assert (irr["max_len"], irr["max_width"]) == (50, 25)
    assert (box["margin"], box["bbox_min_size"], box["bbox_max_size"]) == (2, 8, 38)
    assert masks.kwargs_for(256, 256) == (masks.irregular_kwargs, masks.box_kwargs)
    assert masks.kwargs_for(64, 512) == masks.kwargs_for(64, 64)  # the short side decides
    rng = np.random.default_rng(1)
    frac = {s: np.mean([masks(rng, s, s).mean().item() for _ in range(150)]) for s in (64, 256)}
    assert 0.05 < frac[64] < 0.6
    assert frac[256] / 1.5 < frac[64] < frac[256] * 1.5  # the same fraction of the image at both sizes
    raw = MixedMasks(scale_to=None)
    assert np.mean([raw(rng, 64, 64).mean().item() for _ in range(60)]) > frac[64] * 1.3  # unscaled: far too big


def test_mixed_probabilities_pick_the_kind():
    rng = np.random.default_rng(2)
    one_box = {"min_times": 1, "max_times": 1}
    boxes = MixedMasks(irregular_proba=0, box_kwargs=one_box)
    assert all(_is_rectangle(boxes(rng, 64, 64)[0].numpy()) for _ in range(40))
    strokes = MixedMasks(box_proba=0)
    assert sum(_is_rectangle(strokes(rng, 64, 64)[0].numpy()) for _ in range(40)) <= 2
    mixed = MixedMasks(irregular_proba=1, box_proba=3, box_kwargs=one_box)
    share = np.mean([_is_rectangle(mixed(rng, 64, 64)[0].numpy()) for _ in range(200)])
    assert 0.6 < share < 0.9  # ~3/4 boxes (renormalised probabilities)
    assert np.allclose(mixed.probas, [0.25, 0.75])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"irregular_proba": -1}, ValueError),
        ({"irregular_proba": 0, "box_proba": 0}, ValueError),
        ({"box_proba": float("nan")}, ValueError),
        ({"irregular_kwargs": {"min_times": 3, "max_times": 2}}, ValueError),
        ({"irregular_kwargs": {"max_len": 0}}, ValueError),
        ({"box_kwargs": {"bbox_min_size": 60, "bbox_max_size": 50}}, ValueError),
        ({"box_kwargs": {"margin": -1}}, ValueError),
        ({"box_kwargs": {"max_times": 0, "min_times": 0}}, ValueError),
        ({"scale_to": 0}, ValueError),
        ({"irregular_kwargs": {"max_lenght": 5}}, TypeError),
    ],
)
def test_mixed_masks_reject_bad_arguments(kwargs, error):
    with pytest.raises(error):
        MixedMasks(**kwargs)


def test_box_mask_rejects_an_image_smaller_than_its_margins():
    with pytest.raises(ValueError, match="no room"):
        box_mask(np.random.default_rng(0), 16, 16, margin=10)


@pytest.mark.parametrize("kind", ["box", "stroke", "mixed"])
def test_moving_masks_move_smoothly_and_stay_valid(kind):
    for seed in range(6):
        m = moving_masks(np.random.default_rng(seed), 10, 48, 64, kind=kind)
        assert m.shape == (10, 1, 48, 64) and m.dtype == torch.float32 and _binary(m)
        area = m.flatten(1).mean(1)
        assert (area > 0).all() and (area < 1).all()
        ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
        w = m[:, 0]
        cent = torch.stack([(w * xs).sum((1, 2)), (w * ys).sum((1, 2))], 1) / w.sum((1, 2))[:, None]
        total = cent[-1] - cent[0]
        assert total.norm() > 8  # it moves (the path is >= 35% of the short side; a clipped stroke a bit less)
        along = (cent - cent[0]) @ (total / total.norm())
        assert (along.diff() > -1.5).all()  # monotonic along its path, up to pixel rounding
        assert along.diff().abs().max() < 0.35 * total.norm() + 2  # no jumps: a smooth motion
    with pytest.raises(ValueError, match="kind"):
        moving_masks(np.random.default_rng(0), 4, 32, 32, kind="blob")


def test_moving_boxes_keep_their_shape():
    m = moving_masks(np.random.default_rng(0), 6, 40, 40, kind="box")[:, 0].numpy()
    assert all(_is_rectangle(f) for f in m)
    assert len({int(f.sum()) for f in m}) == 1


# -- photos and keyframe samples -----------------------------------------------------------------------------------


def test_real_photos_split_is_fixed_and_disjoint():
    train, val = real_photos(split="train"), real_photos(split="val")
    everything = real_photos()
    assert set(train.names).isdisjoint(val.names)
    assert sorted(train.names + val.names) == sorted(everything.names)
    assert set(val.names) <= VAL_PHOTOS and all(photo_split(n) == "val" for n in val.names)
    assert {"skimage:astronaut", "skimage:motorcycle_left", "skimage:motorcycle_right"} <= set(train.names)
    for _, img in everything:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert 0.1 < len(val) / len(everything) < 0.35
    with pytest.raises(ValueError, match="split"):
        real_photos(split="test")


@needs_opencv_doc
def test_real_photos_include_the_opencv_samples_and_count_missing_ones(tmp_path):
    photos = real_photos()
    assert "opencv:fruits.jpg" in photos.names and photos.num_skipped == 0
    assert len(photos) == 29
    # a folder with only a corrupt copy of one sample: everything else is missing, that one is unreadable
    (tmp_path / "fruits.jpg").write_bytes(b"not a jpeg")
    partial = real_photos(opencv_dir=tmp_path)
    assert partial.names == [n for n in photos.names if n.startswith("skimage:")]
    assert partial.num_skipped == len(photos) - len(partial)
    assert "unreadable" in partial.skipped["opencv:fruits.jpg"]
    small = real_photos(size=100)
    assert all(min(img.shape[:2]) <= 100 for _, img in small)


def _photo_folder(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_skimage_photo("astronaut")[:256, :256]).save(folder / "a.png")
    Image.fromarray(_skimage_photo("coffee")[:, :400]).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def test_keyframe_items_have_the_documented_shapes():
    ds = KeyframeImages(split="train", size=64, n_references=3)
    assert len(ds) == 50 * len(ds.photos)
    item = ds[0]
    assert set(item) == {"image", "mask", "srcs", "srcs_masks"}
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["srcs"].shape == (3, 3, 64, 64) and item["srcs_masks"].shape == (3, 1, 64, 64)
    for k, v in item.items():
        assert v.dtype == torch.float32 and 0 <= v.min() and v.max() <= 1, k
    for key in ("mask", "srcs_masks"):
        assert _binary(item[key])
        assert (item[key].flatten(-3).mean(-1) > 0).all() and (item[key].flatten(-3).mean(-1) < 1).all()
    assert item["image"].std() > 0.03  # real content, not a flat pad
    val = KeyframeImages(split="val", fresh=False)
    assert len(val) == len(val.photos)


def test_validation_items_are_a_function_of_seed_and_index():
    a = KeyframeImages(split="val", fresh=False, seed=3)
    b = KeyframeImages(split="val", fresh=False, seed=3)
    a.set_epoch(5)  # no effect without fresh
    for i in (0, 2):
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    n = len(a.photos)
    longer = KeyframeImages(split="val", fresh=False, seed=3, length=3 * n)
    assert longer[0]["image"].equal(a[0]["image"])
    assert not torch.equal(longer[n]["image"], longer[0]["image"])  # the same photo, another crop
    other_seed = KeyframeImages(split="val", fresh=False, seed=4)
    assert not torch.equal(other_seed[0]["image"], a[0]["image"])


def test_set_epoch_redraws_training_items():
    ds = KeyframeImages(split="train", fresh=True)
    first = ds[7]
    assert ds[7]["image"].equal(first["image"])  # fixed within an epoch
    ds.set_epoch(1)
    second = ds[7]
    assert not torch.equal(second["image"], first["image"])
    assert not torch.equal(second["mask"], first["mask"])
    ds.set_epoch(0)
    assert ds[7]["srcs"].equal(first["srcs"])  # a resumed run sees the same stream
    with pytest.raises(ValueError):
        ds.set_epoch(-1)


def test_frames_share_the_photo_and_colour_but_not_the_distortion():
    ds = KeyframeImages(split="train", fresh=False, n_references=2, length=40)
    within, across, differ = [], [], 0
    prev = None
    for i in range(0, 40, 3):
        it = ds[i]
        mean_t = it["image"].mean((1, 2))
        within += [(it["srcs"][t].mean((1, 2)) - mean_t).norm().item() for t in range(2)]
        if prev is not None:
            across.append((prev - mean_t).norm().item())
        prev = mean_t
        differ += sum((it["srcs"][t] - it["image"]).abs().mean().item() > 0.01 for t in range(2))
        differ += (it["srcs"][0] - it["srcs"][1]).abs().mean().item() > 0.01
        for t in range(2):  # masks drawn independently
            assert not torch.equal(it["mask"], it["srcs_masks"][t])
    assert np.mean(within) < 0.35 * np.mean(across)
    assert differ >= 0.9 * 3 * 14  # the frames of a sample are different views


def test_easy_frames_are_shifted_crops_of_one_view():
    ds = KeyframeImages(split="train", easy=True, size=64, n_references=2, fresh=False, length=6)
    assert ds.max_shift == 6
    for i in range(6):
        it = ds[i]
        target = it["image"]
        for src in it["srcs"]:
            found = False
            for dy in range(-6, 7):
                for dx in range(-6, 7):
                    a = target[:, max(0, dy) : 64 + min(0, dy), max(0, dx) : 64 + min(0, dx)]
                    b = src[:, max(0, -dy) : 64 + min(0, -dy), max(0, -dx) : 64 + min(0, -dx)]
                    found = found or torch.equal(a, b)
            assert found


def test_keyframe_images_from_a_folder_skip_unreadable_files(tmp_path):
    folder = _photo_folder(tmp_path)
    ds = KeyframeImages(folder, size=32, fresh=False)
    assert len(ds.photos) == 2 and ds.num_skipped == 1 and "broken.png" in next(iter(ds.skipped))
    assert ds[1]["srcs"].shape == (2, 3, 32, 32)
    photos = load_photos([("flat", np.full((40, 50), 128, np.uint8))])
    assert photos[0][1].shape == (40, 50, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_references": 0},
        {"size": 60},
        {"size": 0},
        {"size": -8},
        {"photos": []},
        {"split": "test"},
        {"crop_scale": (0.5, 0.2)},
        {"length": 0},
        {"p_affine": 1.5},
    ],
)
def test_keyframe_images_reject_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        KeyframeImages(**kwargs)


# -- video clips ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_video(tmp_path_factory) -> Path:
    """A 40-frame clip of a real photo panning to the right (96 x 128)."""
    photo = torch.from_numpy(_skimage_photo("astronaut")[::2, ::2].copy()).permute(2, 0, 1).float() / 127.5 - 1
    frames = torch.stack([photo[:, 40:136, 3 * t : 3 * t + 128] for t in range(40)], 1)  # (C, T, H, W)
    return write_video(frames, tmp_path_factory.mktemp("video") / "pan.mp4", fps=10)


def test_video_clips_have_the_documented_shapes(synthetic_video):
    ds = VideoInpaintClips([synthetic_video], split="train", size=(32, 48), num_frames=6, stride=2)
    assert len(ds) == 2 and ds.num_skipped == 0  # 28 training frames hold two 11-frame spans
    item = ds[1]
    assert item["frames"].shape == (6, 3, 32, 48) and item["masks"].shape == (6, 1, 32, 48)
    assert 0 <= item["frames"].min() and item["frames"].max() <= 1 and item["frames"].std() > 0.05
    assert _binary(item["masks"]) and (item["masks"].flatten(1).mean(1) > 0).all()
    assert item["keyframe_index"].dtype == torch.long and item["keyframe_index"].tolist() == [0, 5]
    assert item["name"] == "pan.mp4@11"
    assert ds.frame_indices(1) == [11, 13, 15, 17, 19, 21]
    again = VideoInpaintClips([synthetic_video], split="train", size=(32, 48), num_frames=6, stride=2)
    assert again[1]["masks"].equal(item["masks"])  # masks fixed by (seed, index)
    keyed = VideoInpaintClips([synthetic_video], split="val", size=32, num_frames=4, keyframes=[-1, 1])
    assert keyed[0]["keyframe_index"].tolist() == [1, 3] and keyed[0]["frames"].shape == (4, 3, 32, 32)


def test_video_train_and_val_never_share_frames(synthetic_video):
    assert split_range(40, "train") == (0, 28) and split_range(40, "val") == (28, 40)
    kw = {"size": 32, "num_frames": 4, "clip_step": 1}
    train, val = VideoInpaintClips([synthetic_video], split="train", **kw), VideoInpaintClips([synthetic_video], **kw)
    seen_train = {f for i in range(len(train)) for f in train.frame_indices(i)}
    seen_val = {f for i in range(len(val)) for f in val.frame_indices(i)}
    assert seen_train == set(range(28)) and seen_val == set(range(28, 40))
    frames = video_frames("train", size=64, every=5, paths=[synthetic_video])
    assert [int(n.rsplit("#", 1)[1]) for n in frames.names] == [0, 5, 10, 15, 20, 25]
    held_out = video_frames("val", size=64, every=5, paths=[synthetic_video])
    assert [int(n.rsplit("#", 1)[1]) for n in held_out.names] == [28, 33, 38]
    assert all(min(f.shape[:2]) == 64 and f.dtype == np.uint8 for _, f in frames)


def test_unreadable_videos_are_skipped_and_counted(synthetic_video, tmp_path):
    bad = tmp_path / "corrupt.avi"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00AVI LIST" + bytes(range(256)) * 4)
    ds = VideoInpaintClips([bad, synthetic_video], split="val", size=32, num_frames=4)
    assert ds.num_skipped == 1 and str(bad) in ds.skipped
    assert len(ds) == 3 and ds[0]["frames"].shape == (4, 3, 32, 32)
    with pytest.raises(DataReadError):
        VideoInpaintClips([bad], size=32)
    with pytest.raises(ValueError, match="multiples of 8"):
        VideoInpaintClips([synthetic_video], size=30)


def test_a_split_shorter_than_a_clip_is_skipped(synthetic_video):
    train = VideoInpaintClips([synthetic_video], split="train", size=32, num_frames=20)  # 28 frames: one clip
    assert len(train) == 1
    with pytest.raises(DataReadError, match="no readable video"):  # the val segment holds only 12 frames
        VideoInpaintClips([synthetic_video], split="val", size=32, num_frames=20)


@needs_opencv_videos
def test_opencv_sample_video_clips():
    ds = VideoInpaintClips(["/usr/share/doc/opencv-doc/examples/data/tree.avi"], split="val", size=(64, 96))
    item = ds[0]
    assert item["frames"].shape == (12, 3, 64, 96) and item["name"].startswith("tree.avi@")
    assert ds.frame_indices(0)[0] >= split_range(ds.videos[0].num_frames, "train")[1]


@needs_opencv_videos
def test_video_frames_join_the_photo_pool_of_their_split():
    ds = KeyframeImages(split="val", include_video_frames=True, fresh=False)
    frames = [n for n in ds.names if n.startswith("video:")]
    assert frames and len(ds.names) == len(real_photos(split="val")) + len(frames)
    for name in frames:
        file, index = name[len("video:") :].rsplit("#", 1)
        total = next(v.num_frames for v in VideoInpaintClips([OPENCV_SAMPLES / file], size=8, num_frames=2).videos)
        assert int(index) >= split_range(total, "val")[0]
    assert ds[len(ds.names) - 1]["image"].shape == (3, 64, 64)


# -- datamodule -----------------------------------------------------------------------------------------------------


def test_datamodule_builds_loaders_and_forwards_the_epoch_to_workers():
    dm = KeyframeDataModule(size=32, n_references=2, batch_size=4, num_workers=2, train_length=8, val_length=6)
    dm.setup("fit")
    assert set(dm.train_set.names).isdisjoint(dm.val_set.names)
    assert dm.train_set.fresh and not dm.val_set.fresh and len(dm.val_set) == 6
    loader = dm.train_dataloader()
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)  # what Lightning does before every epoch
        assert dm.train_set.epoch == epoch
        order = list(loader.sampler)
        batches = list(loader)  # persistent workers: they must see the new epoch
        assert len(batches) == 2
        b = batches[0]
        assert b["image"].shape == (4, 3, 32, 32) and b["mask"].shape == (4, 1, 32, 32)
        assert b["srcs"].shape == (4, 2, 3, 32, 32) and b["srcs_masks"].shape == (4, 2, 1, 32, 32)
        assert torch.equal(b["image"][0], dm.train_set[order[0]]["image"])  # worker items = main-process items
        epochs.append(b["image"])
    assert not torch.equal(epochs[0], epochs[1])
    val = next(iter(dm.val_dataloader()))
    assert val["srcs"].shape == (4, 2, 3, 32, 32)
    assert torch.equal(val["image"][0], dm.val_set[0]["image"])


def test_datamodule_rejects_bad_arguments_early():
    with pytest.raises(ValueError):
        KeyframeDataModule(size=36)
    with pytest.raises(ValueError):
        KeyframeDataModule(n_references=0)
