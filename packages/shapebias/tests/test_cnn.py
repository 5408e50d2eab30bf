"""SmallResNet (shapebias.models.cnn): shapes, stage widths through the extractor, gradients, determinism,
safetensors round trip, torchvision resnet18 key layout and numerical parity."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from gencore.io import load_checkpoint, load_state_dict, save_safetensors
from shapebias.encoders import STAGE_MAPS, extractor_for
from shapebias.models.cnn import PRESETS, SmallResNet, small_resnet


def _images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("stem, size", [("small", 32), ("small", 64), ("imagenet", 64)])
def test_output_shape(stem, size):
    torch.manual_seed(0)
    model = small_resnet("tiny", stem=stem, num_classes=7).eval()
    assert model(_images(2, size)).shape == (2, 7)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_stage_widths_and_resolutions_through_the_extractor(preset):
    torch.manual_seed(0)
    model = small_resnet(preset)
    extractor = extractor_for(model, name=f"small_resnet:{preset}")
    assert extractor.stages == STAGE_MAPS["resnet"]
    w = model.widths
    assert extractor.widths(64) == {"1": w[0], "2": w[0], "3": w[1], "4": w[2], "5": w[3]}
    maps = extractor(_images(1, 64), pool=False)
    assert {s: tuple(m.shape[-2:]) for s, m in maps.items()} == {
        "1": (32, 32),  # small stem: stride-1 conv, then the stride-2 max-pool
        "2": (32, 32),
        "3": (16, 16),
        "4": (8, 8),
        "5": (4, 4),
    }


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = small_resnet("tiny", num_classes=4).train()
    logits = model(_images(4, 32))
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_determinism_under_a_seed():
    x = _images(2, 32)
    torch.manual_seed(3)
    a = small_resnet("tiny").eval()
    torch.manual_seed(3)
    b = small_resnet("tiny").eval()
    torch.manual_seed(4)
    c = small_resnet("tiny").eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.allclose(a(x), c(x))


def test_kaiming_init_as_torchvision():
    torch.manual_seed(0)
    model = small_resnet("resnet18_width")
    conv = model.layer3[0].conv1  # fan_out = 256 * 3 * 3 -> std = sqrt(2 / fan_out)
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.02
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = small_resnet("tiny").train()
    model(_images(4, 32))  # move BN running statistics away from their init
    model.eval()
    path = save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    torch.manual_seed(1)
    clone = small_resnet("tiny").eval()
    missing, unexpected = load_state_dict(clone, load_checkpoint(path), source=str(path))
    assert missing == [] and unexpected == []
    x = _images(2, 32)
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_resnet18_width_matches_torchvision_resnet18_keys_and_outputs():
    ours = small_resnet("resnet18_width", stem="imagenet", num_classes=1000).eval()
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    load_state_dict(ours, ref_sd, source="torchvision resnet18")  # strict
    x = _images(1, 64)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(widths=(8, 8, 16)), "widths must be 4 positive integers"),
        (dict(widths=(8, 0, 16, 16)), "widths must be 4 positive integers"),
        (dict(widths=(8, 8, 16, 16.5)), "widths must be 4 positive integers"),
        (dict(blocks=(1, 1, -1, 1)), "blocks must be 4 positive integers"),
        (dict(blocks=3), "blocks must be 4 positive integers"),
        (dict(stem="cifar"), "unknown stem 'cifar'; choose one of small, imagenet"),
        (dict(num_classes=0), "num_classes must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmallResNet(**kwargs)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown preset 'huge'; presets: tiny, toy, resnet18_width"):
        small_resnet("huge")


def test_bad_input_shape():
    model = small_resnet("tiny")
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model(torch.zeros(3, 32, 32))
