"""net2net.data: the three real members, their union (balancing, flips, fingerprint), the posterior-moment encode
function and the latent / image datamodules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gencore.latents import DiffusersVAECodec, IdentityCodec
from ldm.first_stage import KLCodec
from ldm.models.autoencoder import build_autoencoder
from net2net.data import (
    MEMBERS,
    DatasetUnion,
    LatentUnionDataModule,
    UnionDataModule,
    balanced_indices,
    load_member,
    member_indices,
    posterior_moments,
)


def tiny_kl_codec(scale: float = 0.5, shift: float = 0.1) -> KLCodec:
    """ldm's tiny KL autoencoder on 1-channel 32x32 images (4 x 8 x 8 latents), random weights."""
    torch.manual_seed(0)
    ae = build_autoencoder("tiny", ddconfig={"in_channels": 1, "out_ch": 1, "attn_resolutions": []})
    return KLCodec(ae, scale=scale, shift=shift)


@pytest.fixture(scope="module")
def kl_codec() -> KLCodec:
    return tiny_kl_codec()


# ---------------------------------------------------------------------------------------------------- members


@pytest.mark.parametrize(
    ("name", "split", "n"),
    [("digits", "train", 1500), ("digits", "val", 297), ("lfw", "train", 84), ("lfw", "val", 16)],
)
def test_small_members_shapes_ranges_and_split_sizes(name, split, n):
    images, labels = load_member(name, split)
    assert images.shape == (n, 1, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.long
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.min() < -0.98 and images.max() > 0.5  # uses the range, not a sliver of it
    if name == "digits":
        assert images[..., :2].mean() < -0.99 and (images < -0.9).float().mean() > 0.4  # dark background
    x3, _ = load_member(name, split, image_size=16, channels=3)
    assert x3.shape == (n, 3, 16, 16)
    torch.testing.assert_close(x3[:, 0], x3[:, 2])


def test_fashion_member_shapes_and_split_sizes():
    images, labels = load_member("fashion_mnist", "val")
    assert images.shape == (10_000, 1, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.long and set(labels.tolist()) == set(range(10))
    assert images.min() == -1.0 and images.max() == 1.0
    assert (images[..., :2, :] == -1).all() and (images[..., :, -2:] == -1).all()  # 28 -> 32: dark padding
    # the 60,000-image train split: counted, not materialised at float
    assert DatasetUnion(("fashion_mnist",), "train").counts == (60_000,)
    assert len(DatasetUnion(("fashion_mnist",), "val")) == 10_000
    item = DatasetUnion(("fashion_mnist",), "train", channels=3, limit=2)[1]
    assert item["image"].shape == (3, 32, 32) and 0 <= item["label"] < 10 and item["dataset"] == 0


@pytest.mark.parametrize(("name", "total", "n_val"), [("digits", 1797, 297), ("lfw", 200, 30)])
def test_splits_are_fixed_disjoint_and_cover_the_source(name, total, n_val):
    train, val = member_indices(name, "train"), member_indices(name, "val")
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    covered = 100 if name == "lfw" else total  # lfw: the faces of lfw_subset's 200 crops (the first 100)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(covered))
    perm = np.random.default_rng(0).permutation(total)
    last = perm[-n_val:]  # the permutation's last items are val (lfw: its faces)
    assert np.array_equal(val, last[last < covered])
    np.testing.assert_array_equal(member_indices(name, "train"), train)


def test_digits_are_sklearns_images_and_targets():
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split in ("train", "val"):
        idx = member_indices("digits", split)
        images, labels = load_member("digits", split)
        assert labels.tolist() == digits.target[idx].tolist()
        raw = torch.from_numpy(digits.images[idx[:5]]).float().unsqueeze(1) / 16 * 2 - 1
        ref = F.interpolate(raw, size=(32, 32), mode="bicubic", align_corners=False).clamp(-1, 1)
        torch.testing.assert_close(images[:5], ref)
        at8, _ = load_member("digits", split, image_size=8)
        torch.testing.assert_close(at8[:5], raw)  # at 8x8: the originals, only rescaled


def test_lfw_are_skimages_faces_without_labels():
    from skimage.data import lfw_subset

    faces = lfw_subset()
    idx = member_indices("lfw", "val")
    images, labels = load_member("lfw", "val", image_size=25)
    assert (labels == -1).all()
    torch.testing.assert_close(images[:, 0], torch.from_numpy(faces[idx]).float() * 2 - 1)


def test_load_member_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"'mnist'.*fashion_mnist.*digits.*lfw"):
        load_member("mnist", "train")
    with pytest.raises(ValueError, match="split"):
        load_member("digits", "test")
    with pytest.raises(ValueError, match="image_size"):
        load_member("digits", "train", image_size=4)
    with pytest.raises(ValueError, match="channels"):
        load_member("digits", "train", channels=2)


# ------------------------------------------------------------------------------------------------------ union


def test_union_items_dataset_indices_and_counts():
    union = DatasetUnion(limit=5)
    assert union.names == MEMBERS and union.num_datasets == 3
    assert len(union) == 15 and union.counts == (5, 5, 5) and union.sizes == (5, 5, 5)
    items = [union[i] for i in range(len(union))]
    assert [it["dataset"] for it in items] == [0] * 5 + [1] * 5 + [2] * 5
    assert all(it["image"].shape == (1, 32, 32) and it["image"].dtype == torch.float32 for it in items)
    assert all(it["image"].min() >= -1 and it["image"].max() <= 1 for it in items)
    assert [it["label"] for it in items[10:]] == [-1] * 5
    assert [it["label"] for it in items[5:10]] == load_member("digits", "train")[1][:5].tolist()
    assert union.dataset_index("lfw") == 2 and union.dataset_index("fashion_mnist") == 0
    with pytest.raises(ValueError, match=r"'mnist'.*fashion_mnist"):
        union.dataset_index("mnist")
    # a reordered union numbers its members in its own order
    swapped = DatasetUnion(("lfw", "digits"), split="val")
    assert swapped.counts == (16, 297) and swapped[0]["dataset"] == 0 and swapped[0]["label"] == -1
    assert swapped.dataset_index("digits") == 1
    full = swapped.tensors()
    assert full["images"].shape == (313, 1, 32, 32) and full["dataset"].tolist() == [0] * 16 + [1] * 297
    torch.testing.assert_close(full["images"][16:], load_member("digits", "val")[0])
    assert full["label"][16:].tolist() == load_member("digits", "val")[1].tolist()
    capped = swapped.tensors(max_per_member=4)
    assert capped["images"].shape[0] == 8 and capped["dataset"].tolist() == [0] * 4 + [1] * 4


def test_per_member_tiles_and_subsamples_exactly():
    union = DatasetUnion(("digits", "lfw"), per_member=400)
    assert union.counts == (400, 400) and len(union) == 800
    digits, lfw = union.index[union.index[:, 0] == 0, 1], union.index[union.index[:, 0] == 1, 1]
    assert len(np.unique(digits)) == 400 and digits.max() < 1500  # subsampled without repeats
    assert sorted(np.unique(lfw).tolist()) == list(range(84))  # every face, tiled
    assert set(np.bincount(lfw).tolist()) == {4, 5}  # 400 = 4 x 84 + 64
    assert all(union[i]["dataset"] == 1 and union[i]["label"] == -1 for i in (400, 799))
    # deterministic with the seed, another seed draws other items
    np.testing.assert_array_equal(DatasetUnion(("digits", "lfw"), per_member=400).index, union.index)
    other = DatasetUnion(("digits", "lfw"), per_member=400, seed=1).index
    assert not np.array_equal(other[:400], union.index[:400]) and not np.array_equal(other[400:], union.index[400:])
    # a member's choice does not depend on the others
    alone = DatasetUnion(("lfw",), per_member=400).index[:, 1]
    np.testing.assert_array_equal(alone, lfw)
    # with limit: the first `limit` items are balanced
    small = DatasetUnion(per_member=7, limit=3)
    assert small.counts == (7, 7, 7) and small.sizes == (3, 3, 3) and small.index[:, 1].max() == 2
    np.testing.assert_array_equal(balanced_indices(5, None), np.arange(5))
    np.testing.assert_array_equal(balanced_indices(4, 8, seed=3, name="x"), [0, 1, 2, 3, 0, 1, 2, 3])


def test_random_flip_only_flips_lfw_and_fashion():
    plain = DatasetUnion(limit=3)
    flipping = DatasetUnion(limit=3, random_flip=True)
    torch.manual_seed(0)
    flipped = {k: 0 for k in range(3)}
    for _ in range(12):
        for i in range(len(flipping)):
            item, ref = flipping[i], plain[i]["image"]
            if torch.equal(item["image"], ref):
                continue
            torch.testing.assert_close(item["image"], ref.flip(-1), rtol=0, atol=0)
            flipped[item["dataset"]] += 1
    assert flipped[1] == 0  # digits never
    assert 6 <= flipped[0] <= 30 and 6 <= flipped[2] <= 30  # about half of 36 draws each
    # evaluation tensors are never flipped
    torch.testing.assert_close(flipping.tensors()["images"], plain.tensors()["images"])


def test_fingerprint_names_what_decides_the_images():
    base = DatasetUnion(limit=4)
    assert base.fingerprint == DatasetUnion(limit=4).fingerprint
    assert base.fingerprint == DatasetUnion(limit=4, random_flip=True).fingerprint  # flips are not the data
    others = [
        DatasetUnion(("fashion_mnist", "digits"), limit=4),
        DatasetUnion(("digits", "fashion_mnist", "lfw"), limit=4),
        DatasetUnion(limit=4, per_member=6),
        DatasetUnion(limit=4, per_member=6, seed=1),
        DatasetUnion(split="val", limit=4),
        DatasetUnion(limit=5),
        DatasetUnion(limit=4, image_size=16),
        DatasetUnion(limit=4, channels=3),
    ]
    prints = [base.fingerprint] + [u.fingerprint for u in others]
    assert len(set(prints)) == len(prints)
    assert all(isinstance(p, str) for p in prints)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"members": ("digits", "mnist")}, r"'mnist'.*known members.*fashion_mnist"),
        ({"members": ("digits", "lfw", "digits")}, r"'digits'.*more than once"),
        ({"members": ()}, "empty"),
        ({"members": "digits"}, "list of names"),
        ({"per_member": 0}, "per_member"),
        ({"per_member": -3}, "per_member"),
        ({"per_member": 2.5}, "per_member"),
        ({"per_member": True}, "per_member"),
        ({"limit": 0}, "limit"),
        ({"split": "test"}, "split"),
        ({"image_size": 4}, "image_size"),
        ({"channels": 2}, "channels"),
        ({"seed": -1}, "seed"),
    ],
)
def test_union_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DatasetUnion(**kwargs)


# ------------------------------------------------------------------------------------------ posterior moments


def test_posterior_moments_of_the_kl_autoencoder(kl_codec):
    x = DatasetUnion(limit=2).tensors()["images"]
    encode = posterior_moments(kl_codec)
    out = encode(x)
    with torch.no_grad():
        posterior = kl_codec.model.encode(x)
    assert set(out) == {"latents", "std"} and out["latents"].shape == (6, 4, 8, 8) == out["std"].shape
    torch.testing.assert_close(out["latents"], (posterior.mean - 0.1) * 0.5)
    torch.testing.assert_close(out["std"], posterior.std * 0.5)
    torch.testing.assert_close(out["latents"], kl_codec.encode(x))  # the codec's own (mode) encoding
    assert (out["std"] > 0).all()
    assert encode.__qualname__ == posterior_moments(tiny_kl_codec()).__qualname__ == "PosteriorMoments.posterior"
    with pytest.raises(ValueError, match="divisible"):
        encode(torch.zeros(1, 1, 30, 30))


def test_posterior_moments_of_deterministic_codecs():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    encode = posterior_moments(IdentityCodec(1))
    out = encode(x)
    torch.testing.assert_close(out["latents"], x)
    assert torch.equal(out["std"], torch.zeros_like(x))
    assert encode.__qualname__ == "PosteriorMoments.deterministic"
    with pytest.raises(ValueError, match="FrozenCodec"):
        posterior_moments(object())


def test_posterior_moments_of_a_diffusers_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.7,
    )
    codec = DiffusersVAECodec(vae)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = posterior_moments(codec)(x)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    torch.testing.assert_close(out["latents"], dist.mean * 0.7)
    torch.testing.assert_close(out["std"], dist.std * 0.7)


# ------------------------------------------------------------------------------------------------ datamodules


def test_latent_union_datamodule_builds_and_reuses_caches(tmp_path, kl_codec):
    calls = []

    def factory():
        calls.append(1)
        return kl_codec

    dm = LatentUnionDataModule(factory, tmp_path / "cache", limit=8, batch_size=5, encode_batch_size=7)
    assert calls == [] and dm.names == MEMBERS and dm.num_datasets == 3 and dm.latent_shape is None
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [1] and dm.codec is kl_codec and calls == [1]
    assert dm.latent_shape == (4, 8, 8)
    assert (tmp_path / "cache" / "train" / "index.json").is_file() and (tmp_path / "cache" / "val").is_dir()
    union = DatasetUnion(limit=8)
    assert len(dm.train_set) == 24 and len(dm.val_set) == 24
    item = dm.train_set[9]
    assert set(item) == {"latent", "std", "label", "dataset"}
    assert item["latent"].shape == (4, 8, 8) == item["std"].shape and (item["std"] > 0).all()
    assert isinstance(item["label"], int) and item["dataset"].dim() == 0
    assert [int(dm.train_set[i]["dataset"]) for i in range(24)] == union.index[:, 0].tolist()
    assert [dm.train_set[i]["label"] for i in range(24)] == [union[i]["label"] for i in range(24)]
    ref = posterior_moments(kl_codec)(union[9]["image"][None])
    torch.testing.assert_close(item["latent"], ref["latents"][0])
    torch.testing.assert_close(item["std"], ref["std"][0])
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (5, 4, 8, 8) and batch["dataset"].shape == (5,)
    assert batch["dataset"].dtype == torch.long and batch["std"].shape == (5, 4, 8, 8)
    # a second datamodule (and a second setup) reuse the caches
    index = tmp_path / "cache" / "train" / "index.json"
    mtimes = [index.stat().st_mtime_ns, (tmp_path / "cache" / "val" / "index.json").stat().st_mtime_ns]
    again = LatentUnionDataModule(kl_codec, tmp_path / "cache", limit=8)
    again.setup("fit")
    again.setup("validate")
    assert [index.stat().st_mtime_ns, (tmp_path / "cache" / "val" / "index.json").stat().st_mtime_ns] == mtimes
    torch.testing.assert_close(again.train_set[3]["latent"], dm.train_set[3]["latent"])


def test_latent_union_datamodule_balances_over_the_cache(tmp_path, kl_codec):
    dm = LatentUnionDataModule(kl_codec, tmp_path / "c", members=("digits", "lfw"), limit=8, per_member=12)
    dm.setup()
    assert len(dm.train_set) == 24 and len(dm.train_cache) == 16 and len(dm.val_set) == 16
    union = DatasetUnion(("digits", "lfw"), per_member=12, limit=8)
    datasets = torch.stack([dm.train_set[i]["dataset"] for i in range(24)])
    assert torch.bincount(datasets).tolist() == [12, 12]
    assert datasets.tolist() == union.index[:, 0].tolist()
    encode = posterior_moments(kl_codec)
    for i in (0, 11, 12, 23):  # the very items DatasetUnion's balancing picks
        torch.testing.assert_close(dm.train_set[i]["latent"], encode(union[i]["image"][None])["latents"][0])
    # the cache is the unbalanced union: another per_member reuses it
    mtime = (tmp_path / "c" / "train" / "index.json").stat().st_mtime_ns
    LatentUnionDataModule(kl_codec, tmp_path / "c", members=("digits", "lfw"), limit=8, per_member=5).setup()
    assert (tmp_path / "c" / "train" / "index.json").stat().st_mtime_ns == mtime


def test_latent_union_datamodule_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match="codec"):
        LatentUnionDataModule("not a codec", tmp_path)
    with pytest.raises(ValueError, match="'svhn'"):
        LatentUnionDataModule(IdentityCodec(1), tmp_path, members=("digits", "svhn"))
    with pytest.raises(ValueError, match="per_member"):
        LatentUnionDataModule(IdentityCodec(1), tmp_path, per_member=0)
    dm = LatentUnionDataModule(lambda: IdentityCodec(3), tmp_path, limit=2)
    with pytest.raises(ValueError, match="3-channel"):
        dm.setup()
    with pytest.raises(ValueError, match="not a FrozenCodec"):
        LatentUnionDataModule(lambda: "x", tmp_path).setup()


def test_union_datamodule_serves_images():
    dm = UnionDataModule(limit=6, per_member=4, random_flip=True, batch_size=4)
    assert dm.names == MEMBERS and dm.num_datasets == 3 and dm.image_size == 32 and dm.channels == 1
    dm.setup("fit")
    assert dm.train_set.counts == (4, 4, 4) and dm.train_set.random_flip
    assert dm.val_set.counts == (6, 6, 6) and not dm.val_set.random_flip and dm.val_set.split == "val"
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["dataset"].shape == (4,) and batch["label"].shape == (4,)
    val = next(iter(dm.val_dataloader()))
    assert val["dataset"].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="duplicate|more than once"):
        UnionDataModule(members=("lfw", "lfw"))


def test_lfw_member_holds_the_faces_only():
    """``lfw_subset()`` holds 100 faces, then 100 background crops without a face: only the faces are the member."""
    from skimage.data import lfw_subset

    faces = torch.from_numpy(np.asarray(lfw_subset()[:100], dtype=np.float32)) * 2 - 1
    for split in ("train", "val"):
        images = load_member("lfw", split, image_size=25)[0][:, 0]
        for img in images:
            assert (img - faces).abs().flatten(1).amax(1).min() < 1e-5  # each one is one of the 100 faces
