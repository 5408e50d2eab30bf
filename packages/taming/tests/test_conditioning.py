"""Conditioners (start token, class token, a second VQGAN's codes), the old-argument translation, and the condition
images derived from the data (edges, low resolution)."""

import pytest
import torch

from gencore.conditioning import Conditioner
from gencore.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST
from gencore.io import frozen_prefixes
from taming.conditioning import (
    ClassConditioner,
    SOSConditioner,
    SpatialConditioner,
    condition_transform,
    edge_map,
    legacy_conditioner,
    low_resolution,
)
from taming.lit import Net2NetTransformer
from taming.models.mingpt import GPT
from taming.models.vqgan import build_vqmodel

needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
)


def tiny_vq(**kw):
    torch.manual_seed(0)
    return build_vqmodel("tiny", **kw)  # 16x16 gray -> 8x8 codes, 64 entries


def images(n=3, size=16, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------------- start token
def test_sos_tokens_vocab_and_generation_batch():
    sos = SOSConditioner(3)
    assert isinstance(sos, Conditioner) and not sos.guidable
    assert sos.encode({}, 2).tolist() == [[3], [3]] and sos.vocab_end == 4
    assert sos({"image": images(5)}).tolist() == [[3]] * 5  # batch size read off the batch
    assert sos.encode({}, 2).dtype == torch.long and sos.state_dict() == {}  # the official SOSProvider has no state
    batch, out = sos.generation_batch(2, image_size=16)
    assert out == {} and sos.encode(batch, 2).tolist() == [[3], [3]]
    assert sos.window_conditioning(sos.encode(batch, 2), (8, 8)) == {"sos": 3}
    assert sos.evaluation_request() == {} and sos.log_conditioning({}, 2) == {}
    with pytest.raises(ValueError, match="does not take labels"):
        sos.generation_batch(2, image_size=16, labels=[0, 1])
    with pytest.raises(ValueError, match="does not take cond_images"):
        sos.generation_batch(2, image_size=16, cond_images=images(2))
    with pytest.raises(ValueError, match="cannot tell the batch size"):
        sos.encode({})
    with pytest.raises(ValueError, match="sos_token must be an integer >= 0"):
        SOSConditioner(-1)


# --------------------------------------------------------------------------------------------------- class token
def test_class_tokens_vocab_and_label_checks():
    cp = ClassConditioner(10, offset=512)
    assert cp.encode({"label": torch.tensor([0, 9])}).tolist() == [[512], [521]] and cp.vocab_end == 522
    assert cp({"label": torch.tensor([1, 2, 3])}, 2).tolist() == [[513], [514]]  # the first n items
    assert ClassConditioner(4).vocab_end == 4  # official Labelator: no offset
    with pytest.raises(ValueError, match="labels: index 10 is outside \\[0, 10\\)"):
        cp.encode({"label": torch.tensor([10])})
    with pytest.raises(ValueError, match="index -1 is outside"):
        cp.encode({"label": torch.tensor([-1, 3])})
    with pytest.raises(ValueError, match="labels must be \\(B,\\)"):
        cp.encode({"label": torch.zeros(2, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="needs batch\\['label'\\]"):
        cp.encode({"image": images(1)}, 1)
    with pytest.raises(ValueError, match="num_classes >= 1 and offset >= 0"):
        ClassConditioner(0)
    with pytest.raises(ValueError, match="num_classes >= 1 and offset >= 0"):
        ClassConditioner(10, offset=-1)


def test_class_generation_batch_defaults_and_errors():
    cp = ClassConditioner(6, offset=64)
    batch, out = cp.generation_batch(3, image_size=16, labels=[0, 5, 2])
    assert out["labels"].tolist() == [0, 5, 2] and cp.encode(batch, 3).tolist() == [[64], [69], [66]]
    torch.manual_seed(0)
    _, a = cp.generation_batch(200, image_size=16)
    torch.manual_seed(0)
    _, b = cp.generation_batch(200, image_size=16)
    assert torch.equal(a["labels"], b["labels"])  # default: uniform random classes from the global generator
    assert set(a["labels"].tolist()) == set(range(6))
    assert cp.evaluation_request() == {"labels": [0, 1, 2, 3, 4, 5]}  # evaluation: every class in turn
    assert cp.window_conditioning(torch.tensor([[64]]), (8, 8)).keys() == {"cond"}
    with pytest.raises(ValueError, match="3 samples need 3 labels, got 2"):
        cp.generation_batch(3, image_size=16, labels=[0, 1])
    with pytest.raises(ValueError, match="label 6 outside \\[0, 6\\)"):
        cp.generation_batch(2, image_size=16, labels=[0, 6])
    with pytest.raises(ValueError, match="does not take cond_images"):
        cp.generation_batch(2, image_size=16, cond_images=images(2))


# ------------------------------------------------------------------------------------------------------ spatial
def test_spatial_tokens_are_the_second_vqgans_codes_in_the_official_layout():
    vq = tiny_vq(n_embed=32)
    sp = SpatialConditioner(vq, cond_key="depth")
    x = images(2)
    assert torch.equal(sp.encode({"depth": x, "image": -x}), vq.encode_to_indices(x).flatten(1))  # (B, 64)
    assert sp.vocab_end == 32 and sp.encode({"depth": x}).dtype == torch.long
    # the VQGAN's own keys: cond_stage_model.encoder.* ... once it sits in a Net2NetTransformer
    assert set(sp.state_dict()) == set(vq.state_dict())
    assert all(not p.requires_grad for p in sp.parameters()) and not sp.train().training
    assert frozen_prefixes(torch.nn.ModuleDict({"cond_stage_model": sp})) == ["cond_stage_model."]
    grid = (8, 8)
    assert sp.window_conditioning(sp.encode({"depth": x}), grid)["cond_shape"] == grid
    assert set(sp.log_conditioning({"depth": x})) == {"conditioning"}
    # conditions derived from the data image
    edges = SpatialConditioner(vq, condition="edges")
    assert torch.equal(edges.condition_images({"image": x}), edge_map(x))
    assert torch.equal(edges.encode({"image": x}), vq.encode_to_indices(edge_map(x)).flatten(1))
    with pytest.raises(ValueError, match="needs batch\\['depth'\\]"):
        sp.encode({"image": x})
    with pytest.raises(ValueError, match="unknown condition 'depth'"):
        SpatialConditioner(vq, condition="depth")


def test_spatial_generation_batch_with_given_conditions_and_errors():
    sp = SpatialConditioner(tiny_vq(n_embed=32), condition="edges")
    cond = -torch.ones(3, 1, 16, 16)
    batch, out = sp.generation_batch(2, image_size=16, cond_images=cond)
    assert torch.equal(out["conditions"], cond[:2]) and "labels" not in out
    # given conditions are used as they are (not transformed again)
    assert torch.equal(sp.encode(batch, 2), sp.tokens(cond[:2]))
    with pytest.raises(ValueError, match="3 samples need cond_images of shape \\(3, C, H, W\\)"):
        sp.generation_batch(3, image_size=16, cond_images=cond[:2])
    with pytest.raises(ValueError, match="does not take labels"):
        sp.generation_batch(2, image_size=16, labels=[0, 1])
    with pytest.raises(ValueError, match="cond_images or cond_split, not both"):
        sp.generation_batch(2, image_size=16, cond_images=cond, cond_split="train")


@needs_fmnist
def test_spatial_generation_batch_defaults_to_conditions_of_random_fashion_mnist_images():
    sp = SpatialConditioner(tiny_vq(n_embed=32), condition="edges")
    torch.manual_seed(0)
    batch, out = sp.generation_batch(4, image_size=16)
    ds = FashionMNIST(split="test", image_size=16)
    torch.manual_seed(0)
    pick = torch.randint(0, len(ds), (4,))  # the same draw: random test images
    assert out["labels"].tolist() == ds.labels[pick].tolist()
    assert torch.equal(out["conditions"], edge_map(ds.to_model_range(ds.images[pick])))
    assert sp.encode(batch, 4).shape == (4, 64)
    torch.manual_seed(0)
    _, train = sp.generation_batch(4, image_size=16, cond_split="train")
    assert not torch.equal(train["conditions"], out["conditions"])
    with pytest.raises(ValueError, match="split must be one of"):
        sp.generation_batch(2, image_size=16, cond_split="val")


# ----------------------------------------------------------------------------------------- the old arguments
def test_legacy_arguments_translate_to_conditioners():
    assert legacy_conditioner().sos_token == 0 and isinstance(legacy_conditioner(), SOSConditioner)
    assert legacy_conditioner("sos", sos_token=5).encode({}, 1).tolist() == [[5]]
    cls = legacy_conditioner("class", n_classes=6, class_offset=64)
    assert isinstance(cls, ClassConditioner) and (cls.num_classes, cls.offset) == (6, 64)
    vq = tiny_vq()
    derived = legacy_conditioner(vq, condition="edges", cond_key="depth", image_key="img")
    assert (derived.cond_key, derived.condition) == ("img", "edges")  # the old code derived it from the data image
    given = legacy_conditioner(vq, cond_key="depth")
    assert (given.cond_key, given.condition) == ("depth", None)
    with pytest.raises(ValueError, match="cond_stage must be 'sos', 'class' or a VQGAN module, got 'depth'"):
        legacy_conditioner("depth")


def _gpt(vocab=74, block=128):
    torch.manual_seed(1)
    return GPT(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, n_embd=32)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({}, lambda: None),
        ({"cond_stage": "sos", "sos_token": 3}, lambda: SOSConditioner(3)),
        (
            {"cond_stage": "class", "n_classes": 10, "class_offset": 64, "sos_token": 0},
            lambda: ClassConditioner(10, 64),
        ),
        (
            {"cond_stage": "vq", "condition": "edges"},
            lambda: SpatialConditioner(tiny_vq(n_embed=32), cond_key="image", condition="edges"),
        ),
    ],
)
def test_the_old_constructor_builds_the_same_model_as_the_new_config(old, new):
    old = dict(old)
    if old.get("cond_stage") == "vq":
        old["cond_stage"] = tiny_vq(n_embed=32)
    legacy = Net2NetTransformer(_gpt(), tiny_vq(), **old) if old else Net2NetTransformer(_gpt(), tiny_vq())
    current = Net2NetTransformer(_gpt(), tiny_vq(), new())
    assert type(legacy.cond_stage_model) is type(current.cond_stage_model)
    a, b = legacy.state_dict(), current.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    batch = {"image": images(2), "label": torch.tensor([3, 7])}
    assert torch.equal(legacy.encode_to_c(batch, 2), current.encode_to_c(batch, 2))
    kw = {"labels": [1, 2]} if isinstance(current.cond_stage_model, ClassConditioner) else {}
    if isinstance(current.cond_stage_model, SpatialConditioner):
        kw = {"cond_images": -torch.ones(2, 1, 16, 16)}
    torch.manual_seed(0)
    x = legacy.generate(2, top_k=8, **kw)["images"]
    torch.manual_seed(0)
    assert torch.equal(x, current.generate(2, top_k=8, **kw)["images"])


def test_old_and_new_arguments_do_not_mix():
    with pytest.raises(ValueError, match="a conditioner or the old arguments \\(n_classes\\), not both"):
        Net2NetTransformer(_gpt(), tiny_vq(), ClassConditioner(10, 64), n_classes=10)
    with pytest.raises(TypeError, match="unexpected keyword argument\\(s\\) num_classes"):
        Net2NetTransformer(_gpt(), tiny_vq(), num_classes=10)
    old_positional = Net2NetTransformer(_gpt(), tiny_vq(), "class", class_offset=64)  # the old third argument
    assert old_positional.encode_to_c({"label": torch.tensor([2])}, 1).tolist() == [[66]]
    with pytest.raises(ValueError, match="conditioner or cond_stage, not both"):
        Net2NetTransformer(_gpt(), tiny_vq(), "class", cond_stage="sos")


# ---------------------------------------------------------------------------------------------- condition images
def test_edge_map_finds_the_outline():
    x = -torch.ones(1, 1, 16, 16)
    x[..., 4:12, 4:12] = 1.0  # a bright square
    e = edge_map(x)
    assert set(e.unique().tolist()) == {-1.0, 1.0}
    assert e[0, 0, 8, 3] == 1 and e[0, 0, 8, 8] == -1 and e[0, 0, 0, 0] == -1  # border on, inside / outside off


@needs_fmnist
def test_conditions_on_real_images():
    x, _ = FashionMNIST(split="test", image_size=32, limit=8).tensors()
    e = edge_map(x)
    share = (e > 0).float().mean().item()
    assert e.shape == x.shape and 0.05 < share < 0.5  # outlines, not everything or nothing
    lr = low_resolution(x, 4)
    assert lr.shape == x.shape and torch.equal(lr[..., ::4, ::4], lr[..., 3::4, 3::4])  # 4x4 blocks
    assert torch.allclose(lr.mean(), x.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by factor 3"):
        low_resolution(x, 3)
    assert condition_transform(None)(x) is x
    with pytest.raises(ValueError, match="unknown condition 'depth'"):
        condition_transform("depth")
