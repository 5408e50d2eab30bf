"""Cue-conflict data (shapebias.data): textures, silhouettes, pairings, factor pairs, official-naming folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from gencore.data.fashion_mnist import DEFAULT_ROOT
from shapebias import data as sbdata
from shapebias.data import (
    DEFAULT_TEXTURES,
    OPENCV_DATA,
    TEXTURES,
    CueConflict,
    CueConflictDataModule,
    FactorPairs,
    StylizedFolder,
    load_texture,
    write_dataset,
)

HAVE_FMNIST = (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file()
HAVE_OPENCV = OPENCV_DATA.is_dir()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST (make data) is not installed")
needs_opencv = pytest.mark.skipif(not HAVE_OPENCV, reason="opencv-doc sample images (make data) are not installed")

SK = ["brick", "gravel", "cells", "stars"]  # scikit-image textures: need no opencv-doc


def small(**kw) -> CueConflict:
    args = dict(split="test", num_contents=20, textures=SK, image_size=32, seed=0)
    args.update(kw)
    return CueConflict(**args)


# ---------------------------------------------------------------------------------------------------- textures


def test_skimage_textures_load_and_unknown_name_lists_known():
    for name in [*SK, "grass"]:
        img = load_texture(name)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256
        assert img.std() > 10  # a texture, not a flat image
    with pytest.raises(ValueError, match="known textures: brick"):
        load_texture("velvet")


@needs_opencv
def test_default_textures_are_distinct():
    assert len(DEFAULT_TEXTURES) == 8 and set(DEFAULT_TEXTURES) <= set(TEXTURES)
    means = np.array([load_texture(n).reshape(-1, 3).mean(0) for n in DEFAULT_TEXTURES])
    stds = np.array([load_texture(n).std() for n in DEFAULT_TEXTURES])
    assert all(s > 15 for s in stds)
    # no two default textures share both colour and contrast
    d = np.abs(means[:, None] - means[None]).sum(-1) + 3 * np.abs(stds[:, None] - stds[None])
    assert d[~np.eye(len(d), dtype=bool)].min() > 5


def test_missing_opencv_texture_says_make_data(monkeypatch, tmp_path):
    load_texture.cache_clear()
    monkeypatch.setattr(sbdata, "OPENCV_DATA", tmp_path)
    try:
        with pytest.raises(FileNotFoundError, match=r"baboon\.jpg.*make data"):
            load_texture("fur")
    finally:
        load_texture.cache_clear()


# ------------------------------------------------------------------------------------------------ cue conflict


@needs_fmnist
def test_deterministic_across_constructions_and_access_order():
    a, b = small(), small()
    for name in ("labels", "textures", "contents", "source_indices"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    idx = (7, 0, 55, 79)
    from_b = {i: b[i] for i in reversed(idx)}  # b reads in another order
    for i in idx:
        ia, ib = a[i], from_b[i]
        torch.testing.assert_close(ia["image"], ib["image"], rtol=0, atol=0)
        assert ia["mask"].equal(ib["mask"])
    c = small(seed=1)
    assert not np.array_equal(a.source_indices, c.source_indices)


@needs_fmnist
def test_all_pairing_layout_and_class_balance():
    ds = small(num_contents=30)
    T = len(SK)
    assert len(ds) == 30 * T and ds.num_classes == 10 and ds.num_textures == T
    np.testing.assert_array_equal(ds.contents, np.arange(len(ds)) // T)
    np.testing.assert_array_equal(ds.textures, np.arange(len(ds)) % T)
    np.testing.assert_array_equal(np.bincount(ds.content_labels, minlength=10), np.full(10, 3))
    assert ds.class_names[0] == "T-shirt/top" and ds.texture_names == SK
    for i in (0, 5):  # a content keeps its silhouette and place under every texture; its images differ
        items = [ds[i * T + t] for t in range(T)]
        assert all(it["mask"].equal(items[0]["mask"]) for it in items)
        assert all(it["label"] == items[0]["label"] and it["content"] == i for it in items)
        assert not torch.allclose(items[0]["image"], items[1]["image"])
    assert ds.layout(0) != ds.layout(1)
    assert len(small(limit=7)) == 7


@needs_fmnist
def test_item_mask_semantic_and_pixels():
    ds = small()
    for i in (0, 13, 42):
        it = ds[i]
        S = ds.image_size
        assert it["image"].shape == (3, S, S) and it["image"].dtype == torch.float32
        assert it["mask"].dtype == torch.int64 and it["semantic"].dtype == torch.int64
        assert it["mask"].equal((it["semantic"] > 0).long())
        assert set(it["semantic"].unique().tolist()) == {0, it["label"] + 1}
        assert 0.1 < it["mask"].float().mean() < 0.95
        alpha = ds.alpha(it["content"])
        crop = torch.from_numpy(ds.texture_crop(i)).permute(2, 0, 1) * 2 - 1
        inside, outside = torch.from_numpy(alpha == 1.0), torch.from_numpy(alpha == 0.0)
        # the object is the texture crop, pixel for pixel; the background is flat mid-grey
        torch.testing.assert_close(it["image"][:, inside], crop[:, inside])
        assert it["image"][:, outside].abs().max() == 0
        obj = it["image"][:, it["mask"].bool()].flatten()
        assert np.corrcoef(obj, crop[:, it["mask"].bool()].flatten())[0, 1] > 0.95
        other = torch.from_numpy(ds.texture_crop(i + 1 if i % 4 != 3 else i - 1)).permute(2, 0, 1) * 2 - 1
        assert abs(np.corrcoef(obj, other[:, it["mask"].bool()].flatten())[0, 1]) < 0.5
    dim = small(background="dim")
    it, crop = dim[1], torch.from_numpy(dim.texture_crop(1)).permute(2, 0, 1)
    outside = torch.from_numpy(dim.alpha(it["content"]) == 0.0)
    bg = it["image"][:, outside].flatten()
    assert np.corrcoef(bg, crop[:, outside].flatten())[0, 1] > 0.99  # the same texture behind, at low contrast
    assert bg.std() < 0.5 * (crop[:, outside] * 2).std()


@needs_fmnist
def test_class_texture_pairing_predicts_class_at_consistency():
    for p in (0.0, 0.7, 1.0):
        ds = small(num_contents=1000, pairing="class_texture", texture_consistency=p)
        assert len(ds) == 1000 and len(np.unique(ds.contents)) == 1000
        hit = np.mean(ds.textures == ds.labels % len(SK))
        assert abs(hit - p) < 0.04, (p, hit)
    # the off-class textures are spread over all the other textures, evenly
    miss = small(num_contents=1000, pairing="class_texture", texture_consistency=0.0)
    off = np.bincount((miss.textures - miss.labels % len(SK)) % len(SK), minlength=len(SK))
    assert off[0] == 0 and off[1:].min() > 280


BAD = [
    ("split", "val"),
    ("image_size", 8),
    ("num_contents", 1),
    ("background", "white"),
    ("pairing", "random"),
    ("texture_consistency", 1.5),
    ("texture_consistency", -0.1),
    ("textures", ["brick"]),
    ("textures", ["brick", "velvet"]),
    ("object_scale", (0.5, 1.5)),
    ("limit", 0),
    ("seed", -1),
]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_arguments_name_themselves(name, value):
    with pytest.raises(ValueError, match=name):
        small(**{name: value})


@needs_fmnist
def test_too_many_contents_for_a_split():
    with pytest.raises(ValueError, match="num_contents"):
        small(num_contents=10_001)


# ------------------------------------------------------------------------------------------------ factor pairs


@needs_fmnist
def test_factor_pairs_share_the_right_factor():
    ds = small(num_contents=40)
    pairs = FactorPairs(ds, seed=3)
    seen = set()
    for i in range(0, len(ds), 3):
        p = pairs[i]
        seen.add(p["factor"])
        assert (p["class1"], p["texture1"], p["content1"]) == (ds.labels[i], ds.textures[i], ds.contents[i])
        if p["factor"] == 0:
            assert p["content1"] == p["content2"] and p["texture1"] != p["texture2"] and p["class1"] == p["class2"]
        else:
            assert p["texture1"] == p["texture2"] and p["class1"] != p["class2"]
        _, j = pairs.factor_and_partner(i)
        torch.testing.assert_close(p["example2"], ds[j]["image"])
        torch.testing.assert_close(p["example1"], ds[i]["image"])
    assert seen == {0, 1}
    again = FactorPairs(ds, seed=3)
    assert all(again.factor_and_partner(i) == pairs.factor_and_partner(i) for i in range(len(ds)))


@needs_fmnist
def test_factor_frequencies_uniform_and_official():
    ds = small(num_contents=1000)  # 4000 items; no image is loaded to draw
    fp = FactorPairs(ds, seed=0)
    uni = np.array([fp.factor_and_partner(i)[0] for i in range(len(ds))])
    assert set(np.unique(uni)) == {0, 1} and abs(uni.mean() - 0.5) < 0.03
    off = FactorPairs(ds, seed=0, sampling="official")
    fac = np.array([off.factor_and_partner(i)[0] for i in range(len(ds))])
    assert set(np.unique(fac)) == {0, 1, 2, 3}
    assert abs(np.mean(fac == 0) - 0.25) < 0.03
    for i in np.flatnonzero(fac >= 2)[:50]:  # values 2, 3 take the texture branch
        _, j = off.factor_and_partner(i)
        assert ds.textures[j] == ds.textures[i] and ds.labels[j] != ds.labels[i]


class _Arrays(torch.utils.data.Dataset):
    def __init__(self, labels, textures, contents):
        self.labels, self.textures, self.contents = (np.asarray(a) for a in (labels, textures, contents))

    def __len__(self):
        return len(self.labels)


def test_factor_pairs_refuse_datasets_without_pairs():
    with pytest.raises(ValueError, match="single texture"):
        FactorPairs(_Arrays([0, 1], [0, 0], [0, 1]))
    with pytest.raises(ValueError, match="single class"):
        FactorPairs(_Arrays([0, 0], [0, 1], [0, 0]))
    with pytest.raises(ValueError, match=r"content\(s\) appear under a single texture"):
        FactorPairs(_Arrays([0, 0, 1, 1, 1], [0, 1, 0, 1, 0], [0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"texture\(s\) \[2\]"):
        FactorPairs(_Arrays([0, 0, 1, 1, 0, 0], [0, 2, 0, 1, 0, 1], [0, 0, 1, 1, 2, 2]))
    with pytest.raises(ValueError, match="sampling"):
        FactorPairs(_Arrays([0, 1], [0, 1], [0, 0]), sampling="skewed")
    with pytest.raises(ValueError, match="has no 'labels' array"):
        FactorPairs(torch.utils.data.TensorDataset(torch.zeros(2)))


@needs_fmnist
def test_factor_pairs_on_class_texture_pairing_raise():
    with pytest.raises(ValueError, match="pairing='all'"):
        FactorPairs(small(pairing="class_texture"))


# ------------------------------------------------------------------------------------------- folders and writer


@needs_fmnist
def test_write_dataset_round_trip(tmp_path):
    ds = small(num_contents=12)
    out = write_dataset(ds, tmp_path / "svoc")
    names = sorted(p.name for p in out.glob("*.png"))
    assert len(names) == len(ds) and f"{ds.textures[0]}_{ds.labels[0] + 1}_{ds.contents[0]:06d}.png" in names
    assert len(list((out / "masks").glob("*.png"))) == 12
    index = json.loads((out / "index.json").read_text())
    assert index["class_names"] == ds.class_names and index["texture_names"] == SK and index["num_items"] == len(ds)
    back = StylizedFolder(out, image_size=32)
    order = np.lexsort((back.textures, back.contents))  # folder order is by file name
    want = np.lexsort((ds.textures, ds.contents))
    np.testing.assert_array_equal(back.labels[order], ds.labels[want])
    np.testing.assert_array_equal(back.textures[order], ds.textures[want])
    np.testing.assert_array_equal(back.contents[order], ds.contents[want])
    assert back.class_names == ds.class_names and back.texture_names == SK
    assert (back.num_classes, back.num_textures, back.num_skipped) == (10, len(SK), 0)
    for k in (0, 17):
        a, b = ds[int(want[k])], back[int(order[k])]
        assert (a["label"], a["texture"], a["content"]) == (b["label"], b["texture"], b["content"])
        assert (a["image"] - b["image"]).abs().max() <= 1 / 127.5 + 1e-6
        assert a["semantic"].equal(b["semantic"]) and a["mask"].equal(b["mask"])
    pairs = FactorPairs(back, seed=0)  # a folder gives pairs as well
    assert pairs[0]["content1"] == back.contents[0]


def _write_rgb(path, seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_stylized_folder_official_naming_masks_and_corrupt_files(tmp_path):
    root = tmp_path / "stl"
    (root / "masks").mkdir(parents=True)
    files = {
        "0_12_2008_000123.jpg": (12, "2008_000123"),
        "3_12_2008_000123.jpg": (12, "2008_000123"),
        "1_7_2007_000042.jpg": (7, "2007_000042"),
        "4_7_2007_000042.png": (7, "2007_000042"),
    }
    for k, name in enumerate(files):
        _write_rgb(root / name, k)
    (root / "2_7_2009_999999.jpg").write_bytes(b"not a jpeg at all")  # corrupt: skipped and counted
    (root / "notes.txt").write_text("ignored")
    (root / "readme.jpg").write_bytes(b"")  # does not match the naming: ignored
    for imgid, cls in (("2008_000123", 12), ("2007_000042", 7), ("2009_999999", 7)):
        m = np.zeros((40, 30), np.uint8)
        m[10:30, 5:25] = cls
        m[10, 5:25] = 255  # VOC boundary: ignore
        pal = Image.fromarray(m, mode="P")
        pal.putpalette([0, 0, 0] + [128, 0, 0] * 254 + [224, 224, 192])
        pal.save(root / "masks" / f"{imgid}.png")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        ds = StylizedFolder(root, image_size=24)
    assert len(ds) == 4 and ds.num_skipped == 1 and "2_7_2009_999999.jpg" in next(iter(ds.skipped))
    assert ds.class_names == ["car", "dog"] and ds.num_classes == 2  # VOC classes 7 and 12
    by_name = {p.name: k for k, p in enumerate(ds.paths)}
    k = by_name["0_12_2008_000123.jpg"]
    assert (ds.labels[k], ds.textures[k]) == (1, 0)
    assert ds.contents[k] == ds.contents[by_name["3_12_2008_000123.jpg"]]
    assert ds.contents[k] != ds.contents[by_name["1_7_2007_000042.jpg"]]
    assert ds.texture_names == ["texture0", "texture1", "texture3", "texture4"]
    it = ds[by_name["4_7_2007_000042.png"]]
    assert it["image"].shape == (3, 24, 24) and it["image"].min() >= -1 and it["image"].max() <= 1
    assert (it["label"], it["texture"]) == (0, 3)
    assert set(it["semantic"].unique().tolist()) == {0, 1, 255}
    assert set(it["mask"].unique().tolist()) == {0, 1, 255}
    assert it["mask"].eq(1).equal(it["semantic"].eq(1))
    with pytest.warns(RuntimeWarning, match="unreadable"):
        no_masks = StylizedFolder(root, image_size=24, masks=False)
    assert "mask" not in no_masks[0]


def test_stylized_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        StylizedFolder(tmp_path / "nowhere")
    (tmp_path / "cat.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="<texIdx>_<cls>_<imgid>"):
        StylizedFolder(tmp_path)
    _write_rgb(tmp_path / "0_1_a.jpg", 0)
    with pytest.raises(FileNotFoundError, match="masks=True"):
        StylizedFolder(tmp_path, masks=True)
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match=r"a\.png"):
        StylizedFolder(tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        StylizedFolder(tmp_path, image_size=0, masks=False)
    with pytest.raises(ValueError, match="verify"):
        StylizedFolder(tmp_path, verify="full", masks=False)


# ------------------------------------------------------------------------------------------------- datamodule


@needs_fmnist
def test_datamodule_batches_and_interpolated_limit():
    cfg = OmegaConf.create({"debug_limit": 12, "limit": "${oc.select:debug_limit,null}"})
    dm = CueConflictDataModule(
        num_contents=20, val_contents=10, textures=SK, image_size=32, batch_size=4, limit=cfg.limit, seed=0
    )
    dm.setup("fit")
    assert len(dm.train_set) == 12 and len(dm.val_set) == 12
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == torch.int64
    assert batch["semantic"].shape == (4, 32, 32) and batch["texture"].dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 3, 32, 32)
    unlimited = OmegaConf.create({"limit": "${oc.select:debug_limit,null}"})
    dm2 = CueConflictDataModule(num_contents=10, val_contents=10, textures=SK, image_size=32, limit=unlimited.limit)
    dm2.setup("fit")
    assert len(dm2.train_set) == 40
    pairs = CueConflictDataModule(
        num_contents=10, val_contents=10, textures=SK, image_size=32, batch_size=5, pairs="official"
    )
    pairs.setup("fit")
    pb = next(iter(pairs.train_dataloader()))
    assert pb["example1"].shape == (5, 3, 32, 32) and pb["factor"].dtype == torch.int64
    for bad, match in (({"pairing": "x"}, "pairing"), ({"limit": "abc"}, "limit"), ({"pairs": "x"}, "pairs")):
        with pytest.raises(ValueError, match=match):
            CueConflictDataModule(textures=SK, **bad)
    with pytest.raises(ValueError, match="val_contents"):
        CueConflictDataModule(textures=SK, val_contents=1)


def test_one_texture_name_given_bare_is_a_list_of_one():
    # textures=brick on the command line: not the letters b, r, i, c, k
    with pytest.raises(ValueError, match=r"at least 2|two|>= 2"):
        small(textures="brick")
