"""AdaIN (shapebias.adain): official pytorch-AdaIN layout, closed-form AdaIN statistics, safe strict loading."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from gencore.io import CheckpointKeyError, MissingWeightsError, UnsafeCheckpointError
from shapebias.adain import (
    AdaINStylizer,
    adain_decoder,
    adaptive_instance_normalization,
    calc_mean_std,
    vgg_normalised,
)


def _pad() -> nn.Module:
    return nn.ReflectionPad2d((1, 1, 1, 1))


def _pool() -> nn.Module:
    return nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True)


def official_vgg() -> nn.Sequential:
    """generate_stylized_voc/net.py ``vgg``, written out module by module."""
    c = nn.Conv2d
    r = nn.ReLU
    return nn.Sequential(
        c(3, 3, (1, 1)),
        _pad(), c(3, 64, (3, 3)), r(),
        _pad(), c(64, 64, (3, 3)), r(),
        _pool(),
        _pad(), c(64, 128, (3, 3)), r(),
        _pad(), c(128, 128, (3, 3)), r(),
        _pool(),
        _pad(), c(128, 256, (3, 3)), r(),
        _pad(), c(256, 256, (3, 3)), r(),
        _pad(), c(256, 256, (3, 3)), r(),
        _pad(), c(256, 256, (3, 3)), r(),
        _pool(),
        _pad(), c(256, 512, (3, 3)), r(),  # relu4_1: the last module used
        _pad(), c(512, 512, (3, 3)), r(),
        _pad(), c(512, 512, (3, 3)), r(),
        _pad(), c(512, 512, (3, 3)), r(),
        _pool(),
        _pad(), c(512, 512, (3, 3)), r(),
        _pad(), c(512, 512, (3, 3)), r(),
        _pad(), c(512, 512, (3, 3)), r(),
        _pad(), c(512, 512, (3, 3)), r(),
    )  # fmt: skip


def official_decoder() -> nn.Sequential:
    """generate_stylized_voc/net.py ``decoder``, written out module by module."""
    c = nn.Conv2d
    r = nn.ReLU
    up = lambda: nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Sequential(
        _pad(), c(512, 256, (3, 3)), r(),
        up(),
        _pad(), c(256, 256, (3, 3)), r(),
        _pad(), c(256, 256, (3, 3)), r(),
        _pad(), c(256, 256, (3, 3)), r(),
        _pad(), c(256, 128, (3, 3)), r(),
        up(),
        _pad(), c(128, 128, (3, 3)), r(),
        _pad(), c(128, 64, (3, 3)), r(),
        up(),
        _pad(), c(64, 64, (3, 3)), r(),
        _pad(), c(64, 3, (3, 3)),
    )  # fmt: skip


def _official_adain(c: torch.Tensor, s: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """function.py's adaptive_instance_normalization, written independently."""
    n, ch = c.shape[:2]
    cm, cs = c.view(n, ch, -1).mean(2).view(n, ch, 1, 1), (c.view(n, ch, -1).var(2) + eps).sqrt().view(n, ch, 1, 1)
    sm, ss = s.view(n, ch, -1).mean(2).view(n, ch, 1, 1), (s.view(n, ch, -1).var(2) + eps).sqrt().view(n, ch, 1, 1)
    return (c - cm) / cs * ss + sm


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    vgg, dec = official_vgg(), official_decoder()
    with torch.no_grad():  # small weights keep the random 16-conv stack in a sane range
        for m in [*vgg.modules(), *dec.modules()]:
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                m.bias.uniform_(-0.05, 0.05)
    folder = tmp_path_factory.mktemp("adain")
    torch.save(vgg.state_dict(), folder / "vgg_normalised.pth")
    torch.save(dec.state_dict(), folder / "decoder.pth")
    return vgg.eval(), dec.eval(), folder


def test_layout_matches_official_keys_and_shapes(official):
    vgg, dec, _ = official
    for ours, theirs in ((vgg_normalised(), vgg), (adain_decoder(), dec)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert list(a) == list(b)
        assert all(a[k].shape == b[k].shape for k in a)
        assert [type(m) for m in ours] == [type(m) for m in theirs]
    conv_vgg = sorted({int(k.split(".")[0]) for k in vgg.state_dict()})
    assert conv_vgg == [0, 2, 5, 9, 12, 16, 19, 22, 25, 29, 32, 35, 38, 42, 45, 48, 51]
    conv_dec = sorted({int(k.split(".")[0]) for k in dec.state_dict()})
    assert conv_dec == [1, 5, 8, 11, 14, 18, 21, 25, 28]
    ours = vgg_normalised()
    assert isinstance(ours[30], nn.ReLU) and isinstance(ours[29], nn.Conv2d) and ours[29].out_channels == 512
    assert all(m.ceil_mode for m in ours if isinstance(m, nn.MaxPool2d))


def test_from_files_loads_strictly_and_matches_official_pipeline(official):
    vgg, dec, folder = official
    st = AdaINStylizer.from_files(folder / "vgg_normalised.pth", folder / "decoder.pth")
    assert len(st.encoder) == 31
    assert not any(p.requires_grad for p in st.parameters())
    st.train()
    assert not st.training and not st.encoder.training
    g = torch.Generator().manual_seed(1)
    content, style = torch.rand(2, 3, 32, 32, generator=g), torch.rand(1, 3, 40, 48, generator=g)
    enc = nn.Sequential(*list(vgg.children())[:31])
    with torch.no_grad():
        f_c, f_s = enc(content), enc(style).expand(2, -1, -1, -1)
        for alpha in (1.0, 0.3):
            feat = alpha * _official_adain(f_c, f_s) + (1 - alpha) * f_c
            want = dec(feat).clamp(0, 1)
            got = st.stylize(content, style, alpha=alpha)
            assert got.shape == (2, 3, 32, 32)
            assert ((got > 0) & (got < 1)).float().mean() > 0.1  # not a comparison of clamped constants
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # alpha = 0: the decoder of the content features
        torch.testing.assert_close(st.stylize(content, style, alpha=0.0), dec(f_c).clamp(0, 1), rtol=1e-5, atol=1e-5)
    assert st.stylize(content, style).requires_grad is False


def test_adain_statistics_closed_form():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 5, 6, 7, generator=g) * 2 + 1
    s = torch.randn(3, 5, 9, 4, generator=g) * 0.5 - 3
    out = adaptive_instance_normalization(c, s)
    s_mean, s_std = calc_mean_std(s)
    # calc_mean_std: sqrt(unbiased var + eps)
    torch.testing.assert_close(s_std, (s.flatten(2).var(2, unbiased=True) + 1e-5).sqrt()[..., None, None])
    var_c = c.flatten(2).var(2)[..., None, None]
    torch.testing.assert_close(out.flatten(2).mean(2)[..., None, None], s_mean, rtol=1e-5, atol=1e-5)
    want_std = s_std * (var_c / (var_c + 1e-5)).sqrt()  # σ_out = σ_s · sqrt(var_c) / sqrt(var_c + eps)
    torch.testing.assert_close(out.flatten(2).std(2)[..., None, None], want_std, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, _official_adain(c, s))
    with pytest.raises(ValueError, match="batch and channels"):
        adaptive_instance_normalization(c, s[:, :4])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        calc_mean_std(c[0])


def test_alpha_and_input_validation(official):
    vgg, dec, _ = official
    st = AdaINStylizer(vgg, dec)
    x = torch.rand(1, 3, 16, 16)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha must be in"):
            st.stylize(x, x, alpha=bad)
    with pytest.raises(ValueError, match="content must be"):
        st.stylize(x[:, :1], x)
    with pytest.raises(ValueError, match="style batch"):
        st.stylize(torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 31"):
        AdaINStylizer(nn.Sequential(*list(vgg.children())[:10]), dec)


def test_missing_file_names_it(official, tmp_path):
    _, _, folder = official
    with pytest.raises(MissingWeightsError, match=r"decoder\.pth.*pytorch-AdaIN"):
        AdaINStylizer.from_files(folder / "vgg_normalised.pth", tmp_path / "decoder.pth")
    with pytest.raises(MissingWeightsError, match=r"nope\.pth"):
        AdaINStylizer.from_files(tmp_path / "nope.pth", folder / "decoder.pth")


def test_mismatched_state_dict_raises(official, tmp_path):
    _, _, folder = official
    # the decoder's weights given as the VGG: keys and shapes do not match
    with pytest.raises(CheckpointKeyError, match="missing key"):
        AdaINStylizer.from_files(folder / "decoder.pth", folder / "decoder.pth")
    state = adain_decoder().state_dict()
    state["1.weight"] = torch.zeros(256, 512, 1, 1)
    torch.save(state, tmp_path / "bad_decoder.pth")
    with pytest.raises(CheckpointKeyError, match="shape mismatch"):
        AdaINStylizer.from_files(folder / "vgg_normalised.pth", tmp_path / "bad_decoder.pth")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(official, tmp_path):
    _, _, folder = official
    marker = tmp_path / "pwned"
    torch.save({"0.weight": torch.zeros(1), "payload": _Evil(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        AdaINStylizer.from_files(tmp_path / "evil.pth", folder / "decoder.pth")
    assert not marker.exists()
