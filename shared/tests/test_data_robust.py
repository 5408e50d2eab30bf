"""Honest data readers (issue 10): no wrong frames, no doubled neighbours, no white 16-bit images, in silence."""

import importlib.util
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from gencore.data import DataReadError, ImageFolder, ImageFolderDataModule, VideoClips, read_frames, video_info
from gencore.data._robust import RobustItems
from gencore.data.images import load_image, to_model_range
from gencore.data.video import OPENCV_SAMPLE_VIDEOS, OPENCV_SAMPLES, avi_truncated

needs_opencv = pytest.mark.skipif(
    not (OPENCV_SAMPLES / "vtest.avi").is_file(), reason="Debian package opencv-doc not installed (make data)"
)
needs_decord = pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord not installed")
# mean absolute difference of two clips in [-1, 1], as levels of 255
TOL = 2.0


def _levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean()) * 127.5


# --- 1. video: decord's wrong seeks and the cut last frame of a truncated AVI -------------------------------------


@pytest.fixture(scope="module")
def cut_vtest(tmp_path_factory) -> Path:
    """vtest.avi cut at 60 % of its bytes (an interrupted copy): 486 frames decode, the last one only in part."""
    data = (OPENCV_SAMPLES / "vtest.avi").read_bytes()
    path = tmp_path_factory.mktemp("cut") / "vtest_cut60.avi"
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def _reference_clip(path: Path, start: int, num_frames: int, stride: int, size: int) -> torch.Tensor:
    """The clip decoded sequentially by OpenCV from the intact file, as VideoClips would return it."""
    from gencore.data.images import resize_center_crop

    frames = read_frames(path, range(start, start + num_frames * stride, stride), backend="opencv")
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return resize_center_crop(x, size).permute(1, 0, 2, 3)


@needs_opencv
def test_avi_truncation_is_detected(cut_vtest):
    assert avi_truncated(cut_vtest)
    assert not any(avi_truncated(OPENCV_SAMPLES / n) for n in OPENCV_SAMPLE_VIDEOS)
    assert not avi_truncated(Path(__file__))  # not an AVI at all


@needs_opencv
@needs_decord
def test_truncated_avi_read_with_decord_returns_the_right_frames(cut_vtest):
    # the user's case: span-13 clips of the cut file; decord alone seeks into a lost index (it takes every frame for
    # a keyframe) and returned wrong frames for 36 of 37 clips with nothing skipped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clips = VideoClips([cut_vtest], num_frames=13, size=32, backend="decord", max_clips_per_video=5)
    said = [str(w.message) for w in caught]
    assert any(re.search(r"decord reads wrong frames from .*vtest_cut60.avi.*OpenCV", m) for m in said), said
    assert any("vtest_cut60.avi is a truncated AVI" in m for m in said), said
    assert clips.videos[0].backend == "opencv" and "OpenCV" in clips.notes[str(cut_vtest)]
    assert clips.num_skipped == 0
    starts = [s for _, s, _ in clips.clips]
    assert starts[0] == 0 and starts[-1] == 13 * 36  # the 37 clips of 485 complete frames, spread
    for i in range(1, len(clips)):  # clip 0 decodes from frame 0 and was right before, too
        item = clips[i]
        ref = _reference_clip(OPENCV_SAMPLES / "vtest.avi", item["start"], 13, 1, 32)
        assert _levels(item["video"], ref) < TOL, f"clip {i} (start {item['start']}) is not the file's frames"
    assert clips.num_skipped == 0


@needs_opencv
@pytest.mark.parametrize("backend", [pytest.param("decord", marks=needs_decord), "opencv"])
def test_truncated_avi_last_frame_is_not_used(cut_vtest, backend):
    # 486 frames decode, the 486th only down to a row in the middle: it is not counted and not read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = video_info(cut_vtest, backend=backend)
        assert info.num_frames == 485 and "incomplete" in info.note
        assert any("truncated AVI" in str(w.message) for w in caught)
        with pytest.raises(OSError, match="incomplete last frame|485 requested, video has 485 complete"):
            read_frames(cut_vtest, [480, 485], backend=backend)
        last = read_frames(cut_vtest, [484], backend=backend)  # the last complete frame reads, and is right
    ref = read_frames(OPENCV_SAMPLES / "vtest.avi", [484], backend="opencv")
    assert np.abs(last.astype(int) - ref).mean() < TOL


@needs_opencv
@needs_decord
def test_read_frames_with_decord_checks_its_seeks(cut_vtest):
    with pytest.warns(RuntimeWarning, match="decord reads wrong frames"):
        got = read_frames(cut_vtest, [200, 201, 230], backend="decord")
    ref = read_frames(OPENCV_SAMPLES / "vtest.avi", [200, 201, 230], backend="opencv")
    assert np.abs(got.astype(int) - ref).mean() < TOL


@needs_opencv
@needs_decord
def test_decord_seeks_checked_on_the_sample_videos():
    # Megamind.avi (complete, MPEG-4 with packed B-frames): decord's seeks land one frame off, so 26 of its 33
    # 8-frame clips were wrong; it is read with OpenCV now. vtest.avi's and tree.avi's seeks are right: decord stays.
    with pytest.warns(RuntimeWarning, match="Megamind.avi"):
        clips = VideoClips(
            [OPENCV_SAMPLES / "Megamind.avi", OPENCV_SAMPLES / "tree.avi"],
            num_frames=8,
            size=32,
            backend="decord",
            max_clips_per_video=3,
        )
    backends = {Path(v.path).name: v.backend for v in clips.videos}
    assert backends == {"Megamind.avi": "opencv", "tree.avi": "decord"}
    assert set(clips.notes) == {str(OPENCV_SAMPLES / "Megamind.avi")}
    for i in range(len(clips)):
        item = clips[i]
        ref = _reference_clip(Path(item["path"]), item["start"], 8, 1, 32)
        assert _levels(item["video"], ref) < TOL
    assert video_info(OPENCV_SAMPLES / "vtest.avi", backend="decord").backend == "decord"


# --- 2. a bad item is replaced by a random readable one, reproducibly ---------------------------------------------


class _Items(RobustItems, Dataset):
    """n items, ``bad`` of them unreadable; an item says which index it really is."""

    def __init__(self, n: int, bad: set[int], seed: int = 0) -> None:
        self._init_robust("Items", seed)
        self.n, self.bad = n, set(bad)

    def _num_items(self) -> int:
        return self.n

    def _item_path(self, i: int) -> str:
        return f"item{i}"

    def _load_item(self, i: int) -> dict[str, int]:
        if i in self.bad:
            raise OSError(f"item {i} is corrupt")
        return {"index": i}


def _epoch(ds, order) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [ds[i]["index"] for i in order]


def test_bad_items_are_replaced_uniformly_not_by_their_neighbour():
    n, bad = 40, set(range(10, 20))  # ten corrupt files in a row
    ds = _Items(n, bad)
    seen = _epoch(ds, range(n))
    counts = Counter(seen)
    assert len(seen) == n and not bad & set(counts)  # the length holds, no bad item is returned
    assert ds.num_skipped == 10 and set(ds.skipped) == {f"item{i}" for i in bad}
    # before: item 20 filled all ten slots (11 times per epoch); now the replacements spread over the 30 readable
    # items: one item seen 4 times in an epoch has chance ~1 % under uniform replacement
    assert max(counts.values()) <= 3
    assert sum(ds.replacements[i] == i + 1 for i in bad) < 3  # not the neighbour
    # the same index gets the same replacement: again, in another process that met the bad files in reverse order
    assert _epoch(ds, range(n)) == seen
    other = _Items(n, bad)
    assert _epoch(other, reversed(range(n))) == seen[::-1] and other.replacements == ds.replacements
    # another seed, other replacements
    assert _epoch(_Items(n, bad, seed=1), range(n)) != seen


def test_replacement_is_uniform_over_readable_items():
    n, bad = 12, {3, 4, 5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        picks = Counter(_Items(n, bad, seed=s)[4]["index"] for s in range(900))
    assert set(picks) == set(range(n)) - bad  # every readable item, never a bad one
    assert all(60 <= c <= 140 for c in picks.values()), picks  # 100 expected each; binomial sd ~9.4
    with pytest.raises(ValueError, match="seed must be >= 0"):
        _Items(n, bad, seed=-1)


def test_replacements_agree_across_dataloader_workers():
    n, bad = 24, {0, 1, 7, 8, 9, 23}
    ds = _Items(n, bad)
    expected = _epoch(_Items(n, bad), range(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
        got = torch.cat([b["index"] for b in loader]).tolist()
    assert got == expected


def test_every_item_bad_still_raises():
    ds = _Items(5, set(range(5)))
    with pytest.warns(RuntimeWarning), pytest.raises(DataReadError, match="all 5 items are unreadable"):
        ds[2]
    assert ds.num_skipped == 5


def _write_jpegs(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


def test_image_folder_corrupt_files_do_not_double_their_neighbour(tmp_path):
    _write_jpegs(tmp_path, 12)
    for i in (4, 5, 6):  # three corrupt files in a row, found only when read
        (tmp_path / f"{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 20)
    ds = ImageFolder(tmp_path, size=16, verify="none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epoch = [ds[i]["image"] for i in range(len(ds))]
    said = " ".join(str(w.message) for w in caught)
    assert all(f"skipping unreadable file {tmp_path / f'{i:02d}.png'}" in said for i in (4, 5, 6))
    assert len(epoch) == 12 and ds.num_skipped == 3
    names = [Path(ds._item_path(j)).name for j in ds.replacements.values()]
    assert ds.replacements.keys() == {4, 5, 6} and not {"04.png", "05.png", "06.png"} & set(names)
    assert names != ["07.png"] * 3  # before: 07.png filled all three slots
    again = ds[5]["image"]
    assert torch.equal(again, epoch[5]) and torch.equal(epoch[5], ds[ds.replacements[5]]["image"])


# --- 3. images keep their bit depth --------------------------------------------------------------------------------


def _gradients(h: int = 6, w: int = 1024) -> np.ndarray:
    """16-bit gradients: R rises, G falls, B mid-grey; steps finer than 8 bits."""
    ramp = np.linspace(0, 65535, w).round().astype(np.uint16)
    rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 30_000)], axis=-1)
    return np.repeat(rgb[None], h, axis=0)


def _to8(a16: np.ndarray) -> np.ndarray:
    return (a16.astype(np.float64) / 257).round().astype(np.uint8)


@pytest.mark.parametrize("kind", ["gray", "rgb", "rgba", "gray_tiff"])
def test_16bit_images_scale_by_their_bit_depth(tmp_path, kind):
    import cv2

    rgb16 = _gradients()
    ext = ".tif" if kind == "gray_tiff" else ".png"
    if kind.startswith("gray"):
        a16, channels = rgb16[..., 0], 1
    elif kind == "rgb":
        a16, channels = rgb16, 3
    else:
        a16, channels = np.concatenate([rgb16, np.full_like(rgb16[..., :1], 40_000)], axis=-1), 3
    bgr = lambda a: a if a.ndim == 2 else a[..., [2, 1, 0, 3][: a.shape[-1]]]  # OpenCV writes BGR(A)
    assert cv2.imwrite(str(tmp_path / f"deep{ext}"), bgr(a16))
    assert cv2.imwrite(str(tmp_path / f"flat{ext}"), bgr(_to8(a16)))
    deep, flat = load_image(tmp_path / f"deep{ext}", channels), load_image(tmp_path / f"flat{ext}", channels)
    assert deep.dtype == np.uint16 and flat.dtype == np.uint8 and deep.shape == flat.shape
    assert len(np.unique(deep[..., 0])) > 256  # all 16 bits kept, not only the high byte
    x16, x8 = to_model_range(deep), to_model_range(flat)
    assert x16.min() == -1 and x16.max() == 1  # black and white where the gradient ends, not all white
    assert (x16 - x8).abs().max() <= 1.0 / 255 + 1e-6  # within half an 8-bit level (in [-1, 1])
    # through the dataset, and as grey from colour
    ds = ImageFolder(tmp_path, size=(6, 1024), channels=channels)
    items = {Path(p).stem: ds[i]["image"] for i, p in enumerate(ds.paths)}
    assert (items["deep"] - items["flat"]).abs().max() <= 1.0 / 255 + 1e-6
    if channels == 3:
        g16, g8 = load_image(tmp_path / f"deep{ext}", 1), load_image(tmp_path / f"flat{ext}", 1)
        assert g16.dtype == np.uint16 and np.abs(g16 / 65535 - g8 / 255).max() < 1.5 / 255


@needs_decord
def test_16bit_colour_png_after_decord(tmp_path):
    # decord's wheel bundles an old zlib: imported before cv2 it breaks OpenCV's PNG reader for the whole process.
    # gencore imports cv2 first; where a user imported decord first, the image reads at 8 bits, with a warning.
    import cv2

    assert cv2.imwrite(str(tmp_path / "deep.png"), _gradients()[..., ::-1])
    code = (
        "import sys, warnings, numpy as np\n"
        "if sys.argv[1] == 'user':\n"
        "    import decord\n"
        "from gencore.data import video\n"
        "video._resolve_backend('auto')\n"  # gencore's own decord import
        "from gencore.data.images import load_image\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = load_image(sys.argv[2])\n"
        "print(a.dtype, int(a[0, 1, 0]), any('zlib clash' in str(x.message) for x in w))\n"
    )
    import subprocess
    import sys

    runs = {
        who: subprocess.run(
            [sys.executable, "-c", code, who, str(tmp_path / "deep.png")], capture_output=True, text=True, check=True
        ).stdout.split()
        for who in ("gencore", "user")
    }
    ramp1 = int(_gradients()[0, 1, 0])
    assert runs["gencore"] == ["uint16", str(ramp1), "False"]
    assert runs["user"] == ["uint8", str(ramp1 >> 8), "True"]


def test_images_without_a_known_range_are_skipped(tmp_path):
    import cv2

    _write_jpegs(tmp_path, 2)
    assert cv2.imwrite(str(tmp_path / "float.tif"), np.full((8, 8), 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match="float.tif holds floating-point pixels"):
        load_image(tmp_path / "float.tif")
    from PIL import Image

    Image.fromarray(np.full((4, 4), 70_000, dtype=np.int32)).save(tmp_path / "int32.tiff")
    with pytest.raises(ValueError, match="int32.tiff holds 32-bit integer pixels"):
        load_image(tmp_path / "int32.tiff")
    (tmp_path / "int32.tiff").unlink()
    with pytest.warns(RuntimeWarning, match="float.tif"):
        ds = ImageFolder(tmp_path, size=8, verify="full")
    assert len(ds) == 2 and ds.num_skipped == 1 and "floating-point" in ds.skipped[str(tmp_path / "float.tif")]
    with pytest.raises(ValueError, match="expected uint8 or uint16"):
        to_model_range(np.zeros((2, 2, 3), dtype=np.float32))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    from PIL import Image, ImageOps

    img = np.random.default_rng(1).integers(0, 256, (10, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(tmp_path / "phone.png", exif=exif)
    upright = np.array(ImageOps.exif_transpose(Image.open(tmp_path / "phone.png")))
    got = load_image(tmp_path / "phone.png")
    assert got.shape == upright.shape and np.array_equal(got, upright)
    assert got.shape[:2] == ((10, 16) if orientation == 3 else (16, 10))


# --- 4. what else read wrong in silence ----------------------------------------------------------------------------


def test_validation_split_is_not_augmented(tmp_path):
    from PIL import Image

    img = np.zeros((16, 16, 3), dtype=np.uint8)
    img[:, :4] = 255  # asymmetric: a flip shows
    for i in range(10):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    dm = ImageFolderDataModule(tmp_path, size=16, random_flip=True, val_fraction=0.3, batch_size=2)
    dm.setup("fit")
    torch.manual_seed(0)
    val = torch.stack([dm.val_set[0]["image"] for _ in range(20)])
    train = torch.stack([dm.train_set[0]["image"] for _ in range(20)])
    assert torch.all(val == val[0]) and torch.all(val[0, :, :, 0] == 1)  # never flipped
    assert not torch.all(train == train[0])  # training still flips
    assert dm.train_set.dataset.random_flip


def test_images_outside_class_folders_warn(tmp_path):
    _write_jpegs(tmp_path / "cats", 2)
    _write_jpegs(tmp_path, 1)
    with pytest.warns(RuntimeWarning, match="1 image.*directly under the root.*label -1"):
        ds = ImageFolder(tmp_path, size=8, labels="subfolder")
    assert sorted(ds[i]["label"] for i in range(len(ds))) == [-1, 0, 0]
