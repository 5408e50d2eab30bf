"""ldm.conditioning: every conditioner's conditions, unconditional condition, dropout, generation requests and errors;
the router; the concat inputs; the translation of the older LatentDiffusion arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gencore.conditioning import NoConditioner
from gencore.testing import randomize_parameters, tiny_clip
from ldm.conditioning import (
    ClassConditioner,
    DiffusionWrapper,
    HybridConditioner,
    InpaintingConditioner,
    LowResolutionConditioner,
    SemanticConditioner,
    TextConditioner,
    Unconditional,
    conditioner_from_legacy,
    inpainting_condition,
    low_resolution_condition,
    one_hot_map,
    random_masks,
)
from ldm.first_stage import KLCodec
from ldm.models.autoencoder import build_autoencoder
from ldm.models.unet import unet_from_preset

LATENT = (4, 8, 8)  # the tiny KL codec: 32x32x3 -> 4x8x8


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(1)
    return unet_from_preset("tiny")  # context 16


@pytest.fixture(scope="module")
def codec():
    torch.manual_seed(0)
    return KLCodec(randomize_parameters(build_autoencoder("tiny"), seed=3, std=0.02))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"), hidden_size=32)


def images(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def bound(conditioner, unet, codec=None):
    conditioner.bind(
        model=unet,
        encode=None if codec is None else codec.encode,
        latent_shape=LATENT,
        image_size=32,
        image_key="image",
    )
    return conditioner


def assert_dropout_replaces_exactly_the_dropped_rows(conditioner, batch, key, p=0.5, seed=11):
    """forward(drop=p) = the unconditional condition in the rows of gencore's dropout mask, the condition elsewhere."""
    cond = conditioner.encode(batch)
    b = cond[key].shape[0]
    null = conditioner.unconditional(b)[key]
    dropped = torch.rand(b, generator=torch.Generator().manual_seed(seed)) < p  # what dropout_masks draws
    assert 0 < int(dropped.sum()) < b
    out = conditioner(batch, drop=p, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out[key][dropped], null[dropped], rtol=0, atol=0)
    torch.testing.assert_close(out[key][~dropped], cond[key][~dropped], rtol=0, atol=0)
    for other in set(cond) - {key}:  # concat inputs are never dropped
        assert torch.equal(out[other], cond[other])
    everything = conditioner(batch, drop=1.0)
    torch.testing.assert_close(everything[key], null, rtol=0, atol=0)
    assert torch.equal(conditioner(batch, drop=0.0)[key], cond[key])


# ------------------------------------------------------------------------------------------------------- classes


def test_class_conditioner_cross_attention_token(unet):
    c = bound(ClassConditioner(10), unet)
    assert set(c.state_dict()) == {"embedding.weight"}  # official ClassEmbedder name, sized at bind
    assert c.embedding.weight.shape == (11, 16) and c.null_index == 10 and c.guidable
    assert c.conditioning_key == "crossattn" and c.produces == ("c_crossattn",)
    batch = {"label": torch.arange(64) % 10}
    cond = c.encode(batch, 3)
    assert set(cond) == {"c_crossattn"} and cond["c_crossattn"].shape == (3, 1, 16)
    torch.testing.assert_close(cond["c_crossattn"][:, 0], c.embedding.weight[:3])
    null = c.unconditional(2)["c_crossattn"]
    assert null.shape == (2, 1, 16) and torch.equal(null[1, 0], c.embedding.weight[10])
    assert_dropout_replaces_exactly_the_dropped_rows(c, batch, "c_crossattn")
    with pytest.raises(ValueError, match=r"class labels: index 11 is outside \[0, 11\)"):
        c.encode({"label": torch.tensor([3, 11])})
    with pytest.raises(ValueError, match=r"needs batch\['label'\]"):
        c.encode({"caption": ["a"]})
    explicit = ClassConditioner(10, embed_dim=16, null_class=False)
    assert explicit.embedding.weight.shape == (10, 16) and not explicit.guidable
    with pytest.raises(ValueError, match="no null class"):
        explicit.unconditional(1)
    with pytest.raises(ValueError, match="no unconditional condition to drop to"):
        explicit(batch, drop=0.1)
    with pytest.raises(ValueError, match="embed_dim 8 != the UNet's context_dim 16"):
        bound(ClassConditioner(10, embed_dim=8), unet)
    with pytest.raises(ValueError, match="needs a UNet with context_dim"):
        bound(ClassConditioner(10), unet_from_preset("tiny", context_dim=None, use_spatial_transformer=False))
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        ClassConditioner(0)


def test_class_conditioner_adm_routing():
    adm_unet = unet_from_preset("tiny", num_classes=11, context_dim=None, use_spatial_transformer=False)
    c = bound(ClassConditioner(10, conditioning_key="adm"), adm_unet)
    assert c.conditioning_key == "adm" and c.produces == ("y",) and not list(c.parameters())
    batch = {"label": torch.arange(40) % 10}
    assert torch.equal(c.encode(batch, 4)["y"], torch.arange(4))
    assert c.unconditional(3)["y"].tolist() == [10, 10, 10]
    assert_dropout_replaces_exactly_the_dropped_rows(c, batch, "y")
    small = unet_from_preset("tiny", num_classes=10, context_dim=None, use_spatial_transformer=False)
    with pytest.raises(ValueError, match="needs a UNet with num_classes >= 11"):
        bound(ClassConditioner(10, conditioning_key="adm"), small)
    bound(ClassConditioner(10, conditioning_key="adm", null_class=False), small)  # no null class: 10 fit
    with pytest.raises(ValueError, match="'crossattn' or 'adm'"):
        ClassConditioner(10, conditioning_key="concat")


def test_class_generation_batch_defaults_and_errors(unet):
    c = bound(ClassConditioner(10), unet)
    torch.manual_seed(0)
    batch, out = c.generation_batch(5)
    assert batch["label"].shape == (5,) and torch.equal(out["labels"], batch["label"])
    assert int(batch["label"].min()) >= 0 and int(batch["label"].max()) < 10
    batch, out = c.generation_batch(3, labels=[7, 8, 9])
    assert batch["label"].tolist() == [7, 8, 9] == out["labels"].tolist()
    with pytest.raises(ValueError, match=r"label 10 outside \[0, 10\)"):
        c.generation_batch(1, labels=[10])
    with pytest.raises(ValueError, match="3 samples need 3 labels"):
        c.generation_batch(3, labels=[1])
    with pytest.raises(ValueError, match="ClassConditioner does not take captions"):
        c.generation_batch(1, captions=["a photo of a bag"])
    assert c.evaluation_request() == {"labels": list(range(10))}
    # a request's conditions, or the unconditional ones when nothing is asked
    torch.testing.assert_close(c.request_condition(2, labels=[4, 5])["c_crossattn"][:, 0], c.embedding.weight[4:6])
    torch.testing.assert_close(c.request_condition(2)["c_crossattn"], c.unconditional(2)["c_crossattn"])


# ---------------------------------------------------------------------------------------------------------- text


def test_text_conditioner(clip_dir, tmp_path):
    c = TextConditioner(clip_dir, max_length=8, projection=False)
    c.bind(model=unet_from_preset("tiny", context_dim=32))
    assert not any(p.requires_grad for p in c.parameters()) and c.guidable
    captions = ["a photo of a bag", "a photo of a sneaker", "a photo of a bag", "a photo of a shirt"] * 8
    batch = {"caption": captions}
    cond = c.encode(batch, 2)
    assert set(cond) == {"c_crossattn"} and cond["c_crossattn"].shape == (2, 8, 32)
    torch.testing.assert_close(cond["c_crossattn"], c.encoder.encode(captions[:2]))
    null = c.unconditional(3)["c_crossattn"]
    assert null.shape == (3, 8, 32)
    torch.testing.assert_close(null, c.encoder.encode([""]).expand(3, -1, -1))
    assert_dropout_replaces_exactly_the_dropped_rows(c, batch, "c_crossattn")
    # default request: the Fashion-MNIST caption of each label (random labels unless given)
    batch, out = c.generation_batch(2, labels=[7, 8])
    assert batch["caption"] == ["a photo of a sneaker", "a photo of a bag"] == out["captions"]
    assert out["labels"].tolist() == [7, 8]
    torch.manual_seed(0)
    batch, out = c.generation_batch(4)
    assert len(batch["caption"]) == 4 and out["labels"].shape == (4,)
    batch, out = c.generation_batch(1, captions=["a red dress"])
    assert batch == {"caption": ["a red dress"]} and "labels" not in out
    with pytest.raises(ValueError, match="a single string"):
        c.generation_batch(1, captions="a red dress")
    with pytest.raises(ValueError, match="2 samples need 2 captions"):
        c.generation_batch(2, captions=["a"])
    with pytest.raises(ValueError, match="does not take segmentation"):
        c.generation_batch(1, segmentation=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="does not match the UNet's context_dim 16"):
        c.bind(model=unet_from_preset("tiny"))
    # precomputed features stand in for the encoder
    from gencore.text import save_text_features

    feats = save_text_features(c.encoder, ["", "a photo of a bag"], tmp_path / "text.safetensors")
    pre = TextConditioner(feats, max_length=8)
    torch.testing.assert_close(pre.encode({"caption": ["a photo of a bag"]})["c_crossattn"], cond["c_crossattn"][:1])
    torch.testing.assert_close(pre.unconditional(2)["c_crossattn"], null[:2])


# -------------------------------------------------------------------------------------------------------- concat


def test_low_resolution_conditioner(unet):
    c = bound(LowResolutionConditioner(4), unet)
    x = images()
    cond = c.encode({"image": x})
    assert set(cond) == {"c_concat"} and cond["c_concat"].shape == (4, 3, 8, 8)
    torch.testing.assert_close(cond["c_concat"], low_resolution_condition(x, 4, (8, 8)))
    assert c.sr_factor == 4 and c.conditioning_key == "concat" and not c.guidable and c.unconditional(2) is None
    with pytest.raises(ValueError, match="no unconditional condition to drop to"):
        c({"image": x}, drop=0.1)
    torch.testing.assert_close(c.superres_condition(x)["c_concat"], cond["c_concat"])  # targets' size
    low = F.avg_pool2d(x, 4)
    up = F.interpolate(low, scale_factor=4, mode="bicubic")
    torch.testing.assert_close(c.superres_condition(low)["c_concat"], c.encode({"image": up})["c_concat"])
    with pytest.raises(ValueError, match="samples with superres"):
        c.generation_batch(1)
    with pytest.raises(ValueError, match="does not take labels"):
        c.superres_condition(x, labels=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="sr_factor must be an integer >= 1"):
        LowResolutionConditioner(0)
    with pytest.raises(ValueError, match="not divisible by sr_factor 3"):
        bound(LowResolutionConditioner(3), unet)
    with pytest.raises(ValueError, match="not bound"):
        LowResolutionConditioner(4).encode({"image": x})


def test_inpainting_conditioner(unet, codec):
    c = bound(InpaintingConditioner(), unet, codec)
    x = images()
    masks = torch.zeros(4, 1, 32, 32)
    masks[..., :16, :] = 1
    cond = c.encode({"image": x, "mask": masks})
    assert set(cond) == {"c_concat"} and cond["c_concat"].shape == (4, 5, 8, 8)
    torch.testing.assert_close(cond["c_concat"], inpainting_condition(x, masks, codec.encode))
    assert torch.equal(cond["c_concat"][:, 4:, :4], torch.ones(4, 1, 4, 8))
    random = c.encode({"image": x})["c_concat"]  # training: random boxes
    assert random.shape == (4, 5, 8, 8) and set(random[:, 4].unique().tolist()) <= {0.0, 1.0}
    cond2, masked = c.inpainting(x, masks)
    assert not masked and torch.equal(cond2["c_concat"], cond["c_concat"])
    assert not c.guidable and c.unconditional(1) is None
    with pytest.raises(ValueError, match="samples with inpaint"):
        c.generation_batch(1)
    with pytest.raises(ValueError, match="does not take labels"):
        c.inpainting(x, masks, labels=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="not bound"):
        InpaintingConditioner().encode({"image": x})
    with pytest.raises(ValueError, match=r"mask must be \(B, 1, H, W\)"):
        c.encode({"image": x, "mask": torch.zeros(4, 1, 16, 16)})


def test_semantic_conditioner_and_one_hot_maps(unet):
    c = bound(SemanticConditioner(n_stages=2, method="nearest", in_channels=5, out_channels=3), unet)
    assert set(c.state_dict()) == {"channel_mapper.weight"}  # official SpatialRescaler names
    seg = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(one_hot_map(seg, 5), F.one_hot(seg, 5).permute(0, 3, 1, 2).float())
    cond = c.encode({"segmentation": seg})
    assert set(cond) == {"c_concat"} and cond["c_concat"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(cond["c_concat"], c.rescale(one_hot_map(seg, 5)))
    wide = bound(SemanticConditioner(n_stages=1, method="nearest", in_channels=5), unet)  # 16x16 -> latent grid
    assert wide.encode({"segmentation": seg})["c_concat"].shape == (2, 5, 8, 8)
    with pytest.raises(ValueError, match=r"segmentation labels: index 9 is outside \[0, 5\)"):
        c.encode({"segmentation": seg + 5})
    with pytest.raises(ValueError, match="needs segmentation maps"):
        c.generation_batch(1)
    batch, out = c.generation_batch(2, segmentation=seg)
    assert batch["segmentation"] is seg and out == {}
    with pytest.raises(ValueError, match="unknown method"):
        SemanticConditioner(method="cubic")


# ---------------------------------------------------------------------------------------------------- hybrid, none


def test_hybrid_conditioner(unet, codec):
    h = bound(HybridConditioner(ClassConditioner(10), InpaintingConditioner()), unet, codec)
    assert h.conditioning_key == "hybrid" and h.guidable and h.requests == ("labels",)
    assert set(h.state_dict()) == {"crossattn.embedding.weight"}
    x = images(32)
    masks = random_masks(32, 32, generator=torch.Generator().manual_seed(0))
    batch = {"image": x, "mask": masks, "label": torch.arange(32) % 10}
    cond = h.encode(batch)
    assert set(cond) == {"c_crossattn", "c_concat"} and cond["c_concat"].shape == (32, 5, 8, 8)
    assert set(h.unconditional(2)) == {"c_crossattn"}  # the concat input is shared by both halves of guidance
    assert_dropout_replaces_exactly_the_dropped_rows(h, batch, "c_crossattn")
    cond, masked = h.inpainting(x[:2], masks[:2], labels=[3, 4])
    assert not masked and set(cond) == {"c_crossattn", "c_concat"}
    torch.testing.assert_close(cond["c_crossattn"][:, 0], h.crossattn.embedding.weight[3:5])
    with pytest.raises(ValueError, match="HybridConditioner does not take captions"):
        h.generation_batch(1, captions=["a"])
    sr = bound(HybridConditioner(ClassConditioner(10), LowResolutionConditioner(4)), unet)
    assert sr.sr_factor == 4 and set(sr.superres_condition(x[:2], labels=[1, 2])) == {"c_crossattn", "c_concat"}
    sem = bound(HybridConditioner(ClassConditioner(10), SemanticConditioner(2, "nearest", 0.5, 5, 3)), unet)
    seg = torch.randint(0, 5, (2, 32, 32))
    batch, out = sem.generation_batch(2, labels=[1, 2], segmentation=seg)
    assert batch["label"].tolist() == [1, 2] and batch["segmentation"] is seg and out["labels"].tolist() == [1, 2]
    assert set(sem.encode(batch)) == {"c_crossattn", "c_concat"}
    with pytest.raises(ValueError, match="crossattn must be an ldm conditioner with conditioning_key='crossattn'"):
        HybridConditioner(LowResolutionConditioner(4), InpaintingConditioner())
    with pytest.raises(ValueError, match="concat must be"):
        HybridConditioner(ClassConditioner(10), ClassConditioner(10))


def test_unconditional():
    c = Unconditional()
    assert isinstance(c, NoConditioner) and c.conditioning_key is None and not c.guidable
    assert c.encode({"image": images(1)}) is None and c({"image": images(1)}) is None
    assert c.generation_batch(3) == ({}, {}) and c.request_condition(3) is None
    with pytest.raises(ValueError, match="does not take labels"):
        c.generation_batch(1, labels=[1])
    cond, masked = c.inpainting(images(1), torch.zeros(1, 1, 32, 32))
    assert cond is None and masked


def test_router_names_missing_conditions():
    seen = {}

    def fake(x, t, context=None, y=None):
        seen.update(x=x.shape, context=context, y=y)
        return x[:, :1]

    x, t = torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long)
    DiffusionWrapper(fake, "hybrid")(x, t, c_concat=torch.ones(2, 3, 8, 8), c_crossattn=torch.ones(2, 5, 16))
    assert seen["x"] == (2, 7, 8, 8) and seen["context"].shape == (2, 5, 16)
    DiffusionWrapper(fake, "adm")(x, t, y=torch.tensor([1, 2]))
    assert seen["y"].tolist() == [1, 2] and seen["context"] is None
    with pytest.raises(ValueError, match="needs c_crossattn"):
        DiffusionWrapper(fake, "crossattn")(x, t)
    with pytest.raises(ValueError, match="conditioning_key must be one of"):
        DiffusionWrapper(fake, "film")


def test_random_masks_are_boxes_drawn_without_host_syncs():
    m = random_masks(64, 32, generator=torch.Generator().manual_seed(0))
    assert m.shape == (64, 1, 32, 32) and set(m.unique().tolist()) == {0.0, 1.0}
    rows, cols = m[:, 0].amax(2), m[:, 0].amax(1)  # (64, 32) each: which rows / columns the box covers
    h, w = rows.sum(1), cols.sum(1)
    assert torch.equal(m[:, 0].sum((1, 2)), h * w)  # one solid rectangle per mask
    assert int(h.min()) >= 8 and int(h.max()) <= 19 and int(w.min()) >= 8 and int(w.max()) <= 19  # [0.25, 0.6] x 32
    assert torch.equal(m, random_masks(64, 32, generator=torch.Generator().manual_seed(0)))
    assert random_masks(2, 16, device="cpu").shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="min_frac"):
        random_masks(1, 8, min_frac=0.7, max_frac=0.5)


def test_inputs_of_the_concat_conditions():
    x = images(2)
    with pytest.raises(ValueError, match="not divisible by 3"):
        low_resolution_condition(x, 3, (8, 8))
    with pytest.raises(ValueError, match="segmentation must be"):
        one_hot_map(torch.zeros(2, 32), 5)
    maps = torch.rand(2, 5, 4, 4)
    assert torch.equal(one_hot_map(maps, 5), maps)


# ------------------------------------------------------------------------------------ the older arguments


def test_conditioner_from_legacy_builds_the_conditioners_of_the_older_arguments():
    c, renames = conditioner_from_legacy()
    assert isinstance(c, Unconditional) and renames == {}
    c, renames = conditioner_from_legacy(cond_stage="class", num_classes=7, null_class=False, label_key="y")
    assert isinstance(c, ClassConditioner) and (c.num_classes, c.null_class, c.label_key) == (7, False, "y")
    assert renames == {}  # cond_stage_model.embedding.weight: the same key
    c, _ = conditioner_from_legacy(cond_stage="class", conditioning_key="adm")
    assert c.conditioning_key == "adm"
    c, _ = conditioner_from_legacy(concat="lowres", sr_factor=2)
    assert isinstance(c, LowResolutionConditioner) and c.sr_factor == 2
    c, _ = conditioner_from_legacy(concat="inpaint", num_classes=10)  # num_classes was always passed
    assert isinstance(c, InpaintingConditioner)
    c, renames = conditioner_from_legacy(concat="semantic", semantic={"in_channels": 5}, segmentation_key="seg")
    assert isinstance(c, SemanticConditioner) and c.segmentation_key == "seg" and renames == {}
    c, renames = conditioner_from_legacy(cond_stage="class", concat="semantic", semantic={"in_channels": 5})
    assert isinstance(c, HybridConditioner) and isinstance(c.concat, SemanticConditioner)
    assert renames == {
        "cond_stage_model.embedding.": "cond_stage_model.crossattn.embedding.",
        "semantic_model.": "cond_stage_model.concat.",
    }
    given = ClassConditioner(3)
    assert conditioner_from_legacy(cond_stage=given)[0] is given
    with pytest.raises(ValueError, match="concat must be"):
        conditioner_from_legacy(concat="depth")
    with pytest.raises(ValueError, match="cond_stage must be"):
        conditioner_from_legacy(cond_stage="layout")
    with pytest.raises(ValueError, match=r"semantic=\{in_channels"):
        conditioner_from_legacy(concat="semantic")


def test_conditioner_from_legacy_text(clip_dir):
    c, renames = conditioner_from_legacy(cond_stage="text", text_encoder={"path": clip_dir, "max_length": 8})
    assert isinstance(c, TextConditioner) and c.encoder.max_length == 8 and c.caption_key == "caption"
    assert renames == {"cond_stage_model.transformer.": "cond_stage_model.encoder.transformer."}
    c, renames = conditioner_from_legacy(cond_stage="text", text_encoder={"path": clip_dir}, concat="inpaint")
    assert isinstance(c, HybridConditioner)
    assert renames == {"cond_stage_model.transformer.": "cond_stage_model.crossattn.encoder.transformer."}
