import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gencore.data import (
    CLASS_NAMES,
    DataModule,
    DataReadError,
    FashionMNIST,
    FashionMNISTDataModule,
    ImageFolder,
    ImageFolderDataModule,
    SkimagePhotos,
    SkimagePhotosDataModule,
    VideoClips,
    VideoDataModule,
    caption_for,
    find_fashion_mnist,
)
from gencore.data.fashion_mnist import DEFAULT_ROOT, read_idx
from gencore.data.video import OPENCV_SAMPLES, read_frames, video_info

needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (make data)",
)
needs_opencv = pytest.mark.skipif(
    not (OPENCV_SAMPLES / "vtest.avi").is_file(), reason="Debian package opencv-doc not installed (make data)"
)


@needs_fmnist
def test_fashion_mnist_is_the_real_dataset():
    test = FashionMNIST(split="test")
    assert len(test) == 10_000 and len(FashionMNIST(split="train", limit=5)) == 5
    counts = torch.bincount(test.labels, minlength=10)
    assert torch.all(counts == 1000)  # the test split is balanced
    item = test[0]
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["label"] == 9 and item["caption"] == "a photo of an ankle boot"  # first test image: an ankle boot
    assert CLASS_NAMES[item["label"]] == "Ankle boot"
    # the real data, not a stand-in: the published pixel mean of the training set is 0.2860 (in [0, 1])
    assert FashionMNIST(split="train").images.float().mean().item() / 255 == pytest.approx(0.2860, abs=5e-4)
    assert item["image"][0, 0].max() == -1  # background border


@needs_fmnist
def test_fashion_mnist_sizes_channels_classes():
    padded = FashionMNIST(split="test", image_size=32, limit=4)
    raw = FashionMNIST(split="test", limit=4)
    x32, x28 = padded[1]["image"], raw[1]["image"]
    assert x32.shape == (1, 32, 32)
    assert torch.equal(x32[:, 2:30, 2:30], x28) and torch.all(x32[:, :2] == -1)
    assert FashionMNIST(split="test", image_size=64, limit=2)[0]["image"].shape == (1, 64, 64)
    assert FashionMNIST(split="test", image_size=16, limit=2)[0]["image"].shape == (1, 16, 16)
    rgb = FashionMNIST(split="test", channels=3, limit=2)[0]["image"]
    assert rgb.shape == (3, 28, 28) and torch.equal(rgb[0], rgb[2])
    sneakers = FashionMNIST(split="test", classes=[7])
    assert len(sneakers) == 1000 and {sneakers[i]["caption"] for i in range(3)} == {"a photo of a sneaker"}
    images, labels = FashionMNIST(split="test", limit=8).tensors()
    assert images.shape == (8, 1, 28, 28) and labels.shape == (8,)


def test_captions():
    assert caption_for(7) == "a photo of a sneaker"
    assert caption_for(1) == "a photo of a pair of trousers"
    assert caption_for(8, "{name}") == "bag"
    with pytest.raises(ValueError, match="label must be in"):
        caption_for(10)


def test_fashion_mnist_any_folder_and_bad_files(tmp_path, monkeypatch):
    # a folder of (uncompressed) IDX files works through root= and through the environment variable
    imgs = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    labels = np.array([1, 2, 3], dtype=np.uint8)
    for split, (iname, lname) in {"test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}.items():
        (tmp_path / iname).write_bytes(
            bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in imgs.shape) + imgs.tobytes()
        )
        (tmp_path / lname).write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + labels.tobytes())
        ds = FashionMNIST(root=tmp_path, split=split)
        assert len(ds) == 3 and ds[2]["label"] == 3
    monkeypatch.setenv("GENLAB_FASHION_MNIST", str(tmp_path))
    assert find_fashion_mnist() == tmp_path
    # a truncated file is named
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + b"\x01")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.*truncated"):
        FashionMNIST(root=tmp_path, split="test")
    (tmp_path / "junk.gz").write_bytes(gzip.compress(b"\x12\x34\x56\x78"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "junk.gz")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        FashionMNIST(root=tmp_path, split="val")


def _write_photos(folder: Path, n: int = 3) -> list[Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(["astronaut", "coffee", "chelsea"][:n]):
        p = folder / f"{i}_{name}.jpg"
        Image.fromarray(getattr(data, name)()).save(p, quality=90)
        paths.append(p)
    return paths


def test_image_folder_skips_corrupt_and_truncated_jpegs(tmp_path):
    good = _write_photos(tmp_path / "imgs")
    garbage = tmp_path / "imgs" / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg" * 10)
    truncated = tmp_path / "imgs" / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:5000])  # header fine, pixels missing
    with pytest.warns(RuntimeWarning, match="garbage.jpg"):
        ds = ImageFolder(tmp_path / "imgs", size=32)
    # the header check caught the garbage file; the truncated one fails on decode and is skipped then
    assert len(ds) == 4 and ds.num_skipped == 1
    with pytest.warns(RuntimeWarning, match="truncated.jpg"):
        items = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2 and set(ds.skipped) == {str(garbage), str(truncated)}
    assert all(it["image"].shape == (3, 32, 32) for it in items)
    # with full verification both are found up front
    with pytest.warns(RuntimeWarning):
        full = ImageFolder(tmp_path / "imgs", size=32, verify="full")
    assert len(full) == 3 and full.num_skipped == 2


def test_image_folder_where_every_file_is_bad_raises(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"nope")
    (tmp_path / "b.png").write_bytes(b"nope")
    with pytest.warns(RuntimeWarning), pytest.raises(DataReadError, match="none of the 2 image files"):
        ImageFolder(tmp_path)
    with pytest.warns(RuntimeWarning):
        lazy = ImageFolder(tmp_path, verify="none")
        with pytest.raises(DataReadError, match="all 2 items are unreadable"):
            lazy[0]
    with pytest.raises(DataReadError, match="no image files"):
        ImageFolder(tmp_path / "..", extensions=(".xyz",))


def test_image_folder_labels_and_captions(tmp_path):
    _write_photos(tmp_path / "cats", 1)
    _write_photos(tmp_path / "people", 2)
    (tmp_path / "people" / "0_astronaut.txt").write_text("an astronaut\n")
    ds = ImageFolder(tmp_path, size=(16, 24), labels="subfolder")
    assert ds.classes == ["cats", "people"]
    labels = sorted(ds[i]["label"] for i in range(len(ds)))
    assert labels == [0, 1, 1]
    people_first = [ds[i] for i in range(len(ds)) if "caption" in ds[i]]
    assert len(people_first) == 1 and people_first[0]["caption"] == "an astronaut"
    assert ds[0]["image"].shape == (3, 16, 24)


def test_skimage_photos_are_real_and_offline():
    ds = SkimagePhotos(size=48)
    assert len(ds) == 9
    astro = ds[0]["image"]
    assert astro.shape == (3, 48, 48) and astro.std() > 0.2  # a real photo has contrast
    crops = SkimagePhotos(size=32, names=["coffee"], crops_per_image=5)
    a, b = crops[0]["image"], crops[1]["image"]
    assert not torch.equal(a, b) and torch.equal(
        a, SkimagePhotos(size=32, names=["coffee"], crops_per_image=5)[0]["image"]
    )
    with pytest.raises(ValueError, match="unknown photo 'brain'"):
        SkimagePhotos(names=["brain"])


@needs_opencv
def test_opencv_videos_real_frame_counts():
    info = video_info(OPENCV_SAMPLES / "tree.avi")
    assert info.num_frames == 68 and info.fps == pytest.approx(15, abs=0.01)  # the header claims 444
    assert (info.height, info.width) == (240, 320)
    both = [read_frames(OPENCV_SAMPLES / "tree.avi", [0, 10, 20], backend=b) for b in ("decord", "opencv")]
    assert both[0].shape == (3, 240, 320, 3)
    assert np.abs(both[0].astype(int) - both[1].astype(int)).mean() < 3  # same frames, two decoders
    assert video_info(OPENCV_SAMPLES / "tree.avi", backend="opencv").num_frames == 68


@needs_opencv
@pytest.mark.parametrize("backend", ["decord", "opencv"])
def test_video_clips_shapes_stride_fps(backend):
    clips = VideoClips(
        [OPENCV_SAMPLES / "vtest.avi", OPENCV_SAMPLES / "tree.avi"],
        num_frames=4,
        stride=3,
        size=(32, 48),
        backend=backend,
    )
    item = clips[0]
    assert item["video"].shape == (3, 4, 32, 48) and item["start"] == 0
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    span = 3 * 3 + 1
    assert len(clips) == 795 // span + 68 // span
    # consecutive frames of a real street video differ, but not by much
    v = item["video"]
    assert 0 < (v[:, 1] - v[:, 0]).abs().mean() < 0.3
    # fps resampling: vtest is 10 fps, asking for 5 fps takes every 2nd frame
    half = VideoClips([OPENCV_SAMPLES / "vtest.avi"], num_frames=2, fps=5, size=16, backend=backend)
    assert half.clips[0][2] == 2 and half[0]["fps"] == pytest.approx(5.0)


@needs_opencv
def test_video_clips_skip_truncated_and_unreadable(tmp_path):
    shutil.copy(OPENCV_SAMPLES / "tree.avi", tmp_path / "tree.avi")
    (tmp_path / "cut.avi").write_bytes((OPENCV_SAMPLES / "vtest.avi").read_bytes()[:12_000])  # one cut frame
    (tmp_path / "noise.avi").write_bytes(np.random.default_rng(0).bytes(4000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clips = VideoClips(tmp_path, num_frames=8, size=32)
    assert clips.num_skipped == 2 and {Path(p).name for p in clips.skipped} == {"cut.avi", "noise.avi"}
    assert any("cut.avi" in str(w.message) for w in caught)
    # its one decodable frame is cut mid-picture (the decoder conceals the rest): not a usable frame
    assert "truncated AVI without one complete frame" in clips.skipped[str(tmp_path / "cut.avi")]
    assert len(clips) == 68 // 8 and clips[0]["video"].shape == (3, 8, 32, 32)
    # a file that breaks after indexing is skipped at read time (a random readable clip would take its place)
    (tmp_path / "tree.avi").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="tree.avi"), pytest.raises(DataReadError, match="unreadable"):
        clips[0]
    # every file bad -> a clear error at construction
    with pytest.warns(RuntimeWarning), pytest.raises(DataReadError, match="no readable clip in 3 file"):
        VideoClips(tmp_path, num_frames=8)
    with pytest.raises(ValueError, match="unknown video backend 'ffmpeg'"):
        VideoClips(tmp_path, backend="ffmpeg")


@needs_fmnist
def test_fashion_mnist_datamodule_batches():
    dm = FashionMNISTDataModule(image_size=32, batch_size=8, limit_train=64, limit_val=16, num_workers=0)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32) and batch["label"].shape == (8,) and len(batch["caption"]) == 8
    assert len(dm.val_dataloader().dataset) == 16


def test_generic_datamodule_split_and_errors(tmp_path):
    _write_photos(tmp_path, 3)
    dm = ImageFolderDataModule(tmp_path, size=16, batch_size=2, val_fraction=0.34, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 2 and len(dm.val_set) == 1
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 16, 16)
    sk = SkimagePhotosDataModule(size=16, crops_per_image=2, batch_size=4, num_workers=0)
    sk.setup("fit")
    assert len(sk.train_set) == 18 and len(sk.val_set) == 9
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        DataModule(batch_size=0)
    empty = DataModule(train=sk.train_set)
    empty.setup()
    with pytest.raises(ValueError, match="no val dataset"):
        empty.val_dataloader()


@needs_opencv
def test_video_datamodule():
    dm = VideoDataModule(
        paths=[str(OPENCV_SAMPLES / "tree.avi")],
        num_frames=4,
        stride=2,
        size=16,
        batch_size=2,
        val_fraction=0.25,
        num_workers=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 3, 4, 16, 16)


@needs_fmnist
def test_instruction_edits_are_exact_and_fixed_per_index():
    from gencore.data import EDITS, FashionMNISTDataModule, InstructionEdits, apply_edit

    base = FashionMNIST(split="test", image_size=32, limit=40)
    ds = InstructionEdits(base, seed=3)
    item = ds[7]
    assert torch.equal(item["source"], base[7]["image"]) and item["label"] == base[7]["label"]
    assert item["source_caption"] == base[7]["caption"] and item["caption"] in EDITS
    assert torch.equal(item["image"], apply_edit(item["caption"], item["source"]))
    assert [ds[i]["caption"] for i in range(40)] == [InstructionEdits(base, seed=3)[i]["caption"] for i in range(40)]
    assert len({ds[i]["caption"] for i in range(40)}) == len(EDITS)  # every edit is used
    x = base[0]["image"]
    assert torch.equal(apply_edit("invert the colors", x), -x)
    assert torch.equal(
        apply_edit("rotate it a quarter turn", apply_edit("rotate it a quarter turn", x)), x.flip(-1).flip(-2)
    )
    with pytest.raises(ValueError, match="unknown edit instruction 'paint it red'"):
        apply_edit("paint it red", x)
    with pytest.raises(ValueError, match="unknown instructions"):
        InstructionEdits(base, ["paint it red"])
    dm = FashionMNISTDataModule(image_size=32, limit_train=16, limit_val=8, batch_size=4, wrap=InstructionEdits)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].shape == batch["image"].shape == (4, 1, 32, 32) and batch["caption"][0] in EDITS


@needs_fmnist
def test_masked_images_have_one_fixed_box_each():
    from gencore.data import MaskedImages

    ds = MaskedImages(FashionMNIST(split="test", image_size=32, limit=20), seed=1, min_frac=0.25, max_frac=0.5)
    m = ds[4]["mask"]
    assert m.shape == (1, 32, 32) and torch.equal(m, ds[4]["mask"]) and not torch.equal(m, ds[5]["mask"])
    rows, cols = m[0].sum(1), m[0].sum(0)
    h, w = int((rows > 0).sum()), int((cols > 0).sum())
    assert 8 <= h <= 16 and 8 <= w <= 16 and m.sum() == h * w  # one box, sides in [0.25, 0.5] x 32
    with pytest.raises(ValueError, match="min_frac <= max_frac"):
        MaskedImages(ds.dataset, min_frac=0.7, max_frac=0.5)
