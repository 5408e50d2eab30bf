"""shapebias.encoders: preprocessing modes, stage maps, one-pass per-stage features that stop early, official
stage-5 parity, timm / torchvision ViT pooling, local weights (safe, strict, prefixes, heads) and errors."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from gencore.io import CheckpointKeyError, MissingWeightsError, UnsafeCheckpointError, save_safetensors
from shapebias.encoders import (
    OFFICIAL_BGR_MEAN,
    OFFICIAL_BGR_STD,
    STAGE_MAPS,
    FeatureExtractor,
    Preprocess,
    build_encoder,
    encoder_names,
    extractor_for,
    stage_map,
)


def _images(batch: int = 1, size: int | tuple[int, int] = 64, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, h, w, generator=g) * 2 - 1


def _count_calls(model: nn.Module, names: list[str]) -> Counter:
    calls: Counter = Counter()
    for n in names:
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: calls.update([n]))
    return calls


# ----------------------------------------------------------------------------------------------- ResNet, official


def test_resnet50_at_513_matches_the_official_modified_forward():
    torch.manual_seed(0)
    enc = build_encoder("resnet50")
    assert enc.stage_names == ("1", "2", "3", "4", "5")
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    x = _images(1, 513)
    feats = enc(x)
    assert {s: tuple(f.shape) for s, f in feats.items()} == {
        "1": (1, 64),
        "2": (1, 256),
        "3": (1, 512),
        "4": (1, 1024),
        "5": (1, 2048),
    }
    # official dim_estimation/models/resnet.py: avgpool + flatten after maxpool / layer1 / ... / layer4
    m = enc.model
    with torch.no_grad():
        h = m.maxpool(m.relu(m.bn1(m.conv1(enc.preprocess(x)))))
        official = {"1": h}
        for stage, layer in zip("2345", (m.layer1, m.layer2, m.layer3, m.layer4)):
            h = layer(h)
            official[stage] = h
    for stage, h in official.items():
        torch.testing.assert_close(feats[stage], torch.flatten(m.avgpool(h), 1), rtol=0, atol=1e-6)


def test_only_the_requested_stages_run():
    torch.manual_seed(0)
    enc = build_encoder("resnet18")
    calls = _count_calls(enc.model, ["maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"])
    out = enc(_images(2, 64), stages="2")
    assert list(out) == ["2"] and out["2"].shape == (2, 64)
    assert calls == Counter({"maxpool": 1, "layer1": 1})
    calls.clear()
    out = enc(_images(2, 64), stages=["4", "2"])  # any order; returned in stage order
    assert list(out) == ["2", "4"]
    assert calls == Counter({"maxpool": 1, "layer1": 1, "layer2": 1, "layer3": 1})


def test_spatial_maps_equal_the_layer_outputs():
    torch.manual_seed(0)
    enc = build_encoder("resnet18", preprocess="none")
    x = _images(2, 64)
    maps = enc(x, ["3", "5"], pool=False)
    m = enc.model
    with torch.no_grad():
        l2 = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
        l4 = m.layer4(m.layer3(l2))
    torch.testing.assert_close(maps["3"], l2, rtol=0, atol=0)
    torch.testing.assert_close(maps["5"], l4, rtol=0, atol=0)


def test_kept_maps_survive_later_in_place_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1))
    enc = FeatureExtractor(net, {"conv": "0", "relu": "1"}, name="toy")
    x = _images(1, 8)
    with torch.no_grad():
        conv = net[0](x)
    maps = enc(x, pool=False)
    assert (conv < 0).any()
    torch.testing.assert_close(maps["conv"], conv, rtol=0, atol=0)  # not clipped by the in-place ReLU
    torch.testing.assert_close(maps["relu"], conv.clamp_min(0), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ other families

FAMILIES = {
    # name: (widths, spatial sizes at 64 px)
    "vgg16": ((64, 128, 256, 512, 512), (32, 16, 8, 4, 2)),
    "densenet121": ((64, 256, 512, 1024, 1024), (16, 16, 8, 4, 2)),
    "mobilenet_v2": ((16, 24, 32, 96, 1280), (32, 16, 8, 4, 2)),
    "googlenet": ((64, 192, 480, 832, 1024), (32, 16, 8, 4, 2)),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stage_widths_and_resolutions_at_64px(name):
    torch.manual_seed(0)
    enc = build_encoder(name)
    widths, sizes = FAMILIES[name]
    assert enc.stages == STAGE_MAPS[name.removesuffix("121")]  # VGG / MobileNetV2: derived from the module
    assert enc.widths(64) == dict(zip("12345", widths))
    maps = enc(_images(1, 64), pool=False)
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(s, s) for s in sizes]


def test_derived_maps_equal_the_listed_ones():
    from torchvision.models.vgg import cfgs, make_layers

    for name, cfg in {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}.items():
        for suffix, bn in (("", False), ("_bn", True)):
            features = make_layers(cfgs[cfg], batch_norm=bn)  # VGG's `features`: stage k = its k-th MaxPool2d
            pools = [f"features.{i}" for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
            assert list(STAGE_MAPS[name + suffix].values()) == pools
    assert stage_map(torchvision.models.mobilenet_v2(weights=None)).stages == STAGE_MAPS["mobilenet_v2"]


def test_final_stages_equal_the_official_pooled_features():
    """DenseNet: relu(features) -> avgpool (the official forward); MobileNetV2 / GoogLeNet: what their heads pool."""
    torch.manual_seed(0)
    x = _images(2, 64)
    dense = build_encoder("densenet121", preprocess=None)
    with torch.no_grad():
        ref = torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(dense.model.features(x)), 1), 1)
    torch.testing.assert_close(dense(x, "5")["5"], ref, rtol=0, atol=1e-6)
    mobile = build_encoder("mobilenet_v2", preprocess=None)
    with torch.no_grad():
        ref = nn.functional.adaptive_avg_pool2d(mobile.model.features(x), 1).flatten(1)
    torch.testing.assert_close(mobile(x, "5")["5"], ref, rtol=0, atol=1e-6)


def test_inception_v3_and_small_resnet_by_name():
    torch.manual_seed(0)
    enc = build_encoder("inceptionv3")  # the official code's name
    assert enc.name == "inception_v3"
    assert enc.widths(96) == {"1": 64, "2": 192, "3": 288, "4": 768, "5": 2048}
    small = build_encoder("small_resnet:tiny", num_classes=3)
    assert small.widths(32) == {"1": 8, "2": 8, "3": 8, "4": 16, "5": 16}
    assert small.model.fc.out_features == 3


# ------------------------------------------------------------------------------------------------- transformers


def test_timm_vit_final_is_the_models_own_pre_logits():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny_patch16_224")
    model = enc.model
    assert enc.stage_names == (*(f"block{i}" for i in range(12)), "final")
    x = _images(1, 224)
    feats = enc(x, ["block3", "final"])
    with torch.no_grad():
        tokens = model.forward_features(enc.preprocess(x))
        ref_final = model.forward_head(tokens, pre_logits=True)
        h = model.norm_pre(model._pos_embed(model.patch_embed(enc.preprocess(x))))
        block3 = model.blocks[:4](h)
    torch.testing.assert_close(feats["final"], ref_final, rtol=0, atol=1e-6)
    torch.testing.assert_close(feats["block3"], block3[:, 0], rtol=0, atol=1e-6)  # the class token
    maps = enc(x, "block3", pool=False)["block3"]
    assert maps.shape == (1, 192, 14, 14)
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), block3[:, 1:], rtol=0, atol=0)
    # stops after the deepest requested block
    calls = _count_calls(model, ["blocks.3", "blocks.4", "norm"])
    enc(x, "block3")
    assert calls == Counter({"blocks.3": 1})
    # without a class token: blocks pool the token mean, "final" is still the model's own (avg + fc_norm) pool
    gap = build_encoder(
        "timm:vit_tiny_patch16_224", class_token=False, global_pool="avg", fc_norm=True, preprocess=None
    )
    assert isinstance(gap.model, timm.models.VisionTransformer)
    with torch.no_grad():
        tokens = gap.model.forward_features(x)
        ref_final = gap.model.forward_head(tokens, pre_logits=True)
    feats = gap(x, ["block11", "final"])
    torch.testing.assert_close(feats["final"], ref_final, rtol=0, atol=1e-6)
    assert feats["block11"].shape == (1, 192)


def test_torchvision_vit_tiny_config():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    enc = extractor_for(vit, name="vit_tiny")
    assert enc.stage_names == ("block0", "block1", "final")
    x = _images(2, 32)
    feats = enc(x)
    assert enc.model.heads(feats["final"]).allclose(vit(x), atol=1e-6)  # "final" = torchvision's pre-logits
    maps = enc(x, "final", pool=False)["final"]
    assert maps.shape == (2, 16, 4, 4)


def test_timm_cnn_uses_feature_info():
    torch.manual_seed(0)
    enc = build_encoder("timm:resnet18")
    assert enc.stages == {"1": "act1", "2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"}
    assert enc.widths(64) == {"1": 64, "2": 64, "3": 128, "4": 256, "5": 512}


# ------------------------------------------------------------------------------------------------- preprocessing


def test_official_preprocessing_is_bgr_with_the_quirky_stats():
    x = _images(2, (8, 10))
    hand = ((x + 1) / 2)[:, [2, 1, 0]]  # RGB -> BGR
    hand = (hand - torch.tensor([0.456, 0.406, 0.485]).view(1, 3, 1, 1)) / torch.tensor([0.224, 0.225, 0.229]).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(Preprocess("official")(x), hand, rtol=0, atol=1e-6)
    assert OFFICIAL_BGR_MEAN != (0.406, 0.456, 0.485) and OFFICIAL_BGR_STD != (0.225, 0.224, 0.229)  # the quirk
    imagenet = ((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(Preprocess("imagenet")(x), imagenet, rtol=0, atol=1e-6)
    assert torch.equal(Preprocess("none")(x), x)


def test_official_resize_matches_cv2_inter_linear():
    cv2 = pytest.importorskip("cv2")
    x = _images(1, (40, 56), seed=1)
    for size in (53, 23):  # up- and downscale (official: 513x513)
        ours = Preprocess("official", size=size)(x)[0].permute(1, 2, 0).numpy()
        bgr255 = (((x[0] + 1) / 2).flip(0) * 255).permute(1, 2, 0).numpy().astype(np.float32)  # cv2.imread
        resized = cv2.resize(bgr255, (size, size), interpolation=cv2.INTER_LINEAR)
        ref = (resized / 255.0 - np.array(OFFICIAL_BGR_MEAN)) / np.array(OFFICIAL_BGR_STD)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_preprocess_errors():
    with pytest.raises(ValueError, match="unknown mode 'bgr'; modes: imagenet, official, none"):
        Preprocess("bgr")
    with pytest.raises(ValueError, match="size must be"):
        Preprocess(size=0)
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        Preprocess()(torch.zeros(1, 1, 8, 8))


# ------------------------------------------------------------------------------------------------------ weights


def _source_resnet18() -> tuple[FeatureExtractor, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    enc = build_encoder("resnet18")
    return enc, enc.model.state_dict()


@pytest.mark.parametrize("layout", ["plain", "dataparallel", "state_dict", "lightning", "safetensors"])
def test_weights_round_trip(tmp_path, layout):
    src, sd = _source_resnet18()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        save_safetensors(sd, path)
    else:
        obj = {
            "plain": sd,
            "dataparallel": {f"module.{k}": v for k, v in sd.items()},
            "state_dict": {"state_dict": sd, "epoch": 3},
            "lightning": {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "loss.w": torch.ones(2)}},
        }[layout]
        torch.save(obj, path)
    torch.manual_seed(8)  # a different init: everything must come from the file
    enc = build_encoder("resnet18", weights=str(path))
    x = _images(2, 64)
    for stage, f in enc(x).items():
        torch.testing.assert_close(f, src(x)[stage], rtol=0, atol=0)


def test_classifier_head_dropped_only_when_num_classes_differs(tmp_path):
    src, sd = _source_resnet18()
    torch.save(sd, tmp_path / "w.pth")
    enc = build_encoder("resnet18", weights=tmp_path / "w.pth", num_classes=10)
    assert enc.model.fc.out_features == 10
    x = _images(1, 64)
    torch.testing.assert_close(enc(x, "5")["5"], src(x, "5")["5"], rtol=0, atol=0)
    torch.save(
        {k: v for k, v in sd.items() if not k.startswith("fc.")} | {"fc.weight": torch.zeros(10, 512)},
        tmp_path / "x.pth",
    )
    with pytest.raises(CheckpointKeyError, match=r"shape mismatch.*fc\.weight") as err:
        build_encoder("resnet18", weights=tmp_path / "x.pth")  # 1000-class model: no head may be dropped
    assert "fc.bias" in err.value.missing


def test_wrong_architecture_names_the_keys(tmp_path):
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointKeyError, match=r"unexpected key\(s\): layer1\.2\.") as err:
        build_encoder("resnet18", weights=tmp_path / "r34.pth")
    assert isinstance(err.value, ValueError) and "r34.pth" in str(err.value)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(CheckpointKeyError, match=r"shape mismatch\(es\): .*layer1\.0\.conv1\.weight"):
        build_encoder("resnet18", weights=tmp_path / "r50.pth")


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.remove, (self.path,))


def test_malicious_pickle_is_refused(tmp_path):
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("still here")
    torch.save({"state_dict": {"conv1.weight": _Evil(str(sentinel))}}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="remove"):
        build_encoder("resnet18", weights=tmp_path / "evil.pth")
    assert sentinel.exists()


def test_missing_or_odd_weights_file(tmp_path):
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        build_encoder("resnet18", weights=tmp_path / "nowhere.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ValueError, match=r"suffix '\.txt'"):
        build_encoder("resnet18", weights=tmp_path / "w.txt")


# ------------------------------------------------------------------------------------------ modes, names, errors


def test_frozen_by_default_and_trainable_on_request():
    torch.manual_seed(0)
    enc = build_encoder("small_resnet:tiny")
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    live = build_encoder("small_resnet:tiny", frozen=False).train()
    before = live.model.bn1.running_mean.clone()
    live.widths(32)  # a dry run must not touch BN statistics, and restores train mode
    assert live.model.training and torch.equal(live.model.bn1.running_mean, before)
    feats = live(_images(2, 32), ["3", "5"])
    (feats["3"].sum() + feats["5"].sum()).backward()  # hooks do not detach
    assert live.model.conv1.weight.grad is not None and live.model.layer3[0].conv1.weight.grad is not None
    assert live.model.layer4[0].conv1.weight.grad.abs().sum() > 0


def test_unknown_stage_and_encoder_errors():
    enc = build_encoder("small_resnet:tiny")
    with pytest.raises(ValueError, match=r"stage '7' is not a stage of small_resnet:tiny; its stages: 1, 2, 3, 4, 5"):
        enc(_images(1, 32), "7")
    with pytest.raises(ValueError, match=r"stage '7' is not a stage of resnet50; its stages: 1, 2, 3, 4, 5"):
        build_encoder("resnet50", stages=["5", "7"])
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet51'; did you mean .*resnet50"):
        build_encoder("resnet51")
    with pytest.raises(ValueError, match="unknown preset"):
        build_encoder("small_resnet:huge")
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        enc(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="no submodule 'layer9'"):
        FeatureExtractor(enc.model, {"x": "layer9"})


def test_restricted_stages_and_names():
    enc = build_encoder("small_resnet", stages=["2", "5"])
    assert enc.stage_names == ("2", "5")
    names = encoder_names()
    assert {"resnet50", "vgg16", "densenet121", "mobilenet_v2", "googlenet", "inception_v3", "vit_b_16"} <= set(names)
    assert "small_resnet:tiny" in names and "alexnet" not in names


def test_a_vit_without_image_size_resizes_to_its_fixed_input():
    pytest.importorskip("timm")
    from shapebias.encoders import fixed_input_size

    enc = build_encoder("vit_tiny_patch16_224", stages="final")
    assert fixed_input_size(enc.model) == (224, 224) and enc.preprocess.size == (224, 224)
    assert enc(_images(2, 64))["final"].shape == (2, 192)  # 64 px stimuli, resized for the position table
    assert fixed_input_size(build_encoder("resnet18").model) is None  # CNNs take any size
