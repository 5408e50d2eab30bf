"""Tests for geofree.depth (the MiDaS wrapper's official pre- / post-processing, the batch's stand-in estimate) and
geofree.probe (the closed-form ridge probe and its R² score)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from geofree.depth import BatchDisparity, MidasDisparity, midas_input_size
from geofree.probe import cell_disparity, depth_probe, fit_ridge, r2_score

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


class Recorder(nn.Module):
    """A stand-in MiDaS: remembers its input; returns ``value`` (or the first channel plus ``value``), (B, h, w)."""

    def __init__(self, value: float = 2.0, *, from_input: bool = False, keepdim: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.value, self.from_input, self.keepdim = value, from_input, keepdim
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        out = x[:, 0] * self.scale + self.value if self.from_input else torch.full_like(x[:, 0], self.value)
        return out[:, None] if self.keepdim else out


# ------------------------------------------------------------------------------------------------------ MiDaS input
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((208, 368), (224, 384)),  # the paper's views: the width reaches 384 first, 217.0 -> 224
        ((32, 48), (256, 384)),
        ((8, 12), (256, 384)),
        ((384, 384), (384, 384)),
        ((100, 50), (384, 192)),  # portrait: the height sets the scale
        ((200, 370), (192, 384)),  # 207.6 rounds down to 192
        ((10, 400), (32, 384)),  # never below one multiple of 32
    ],
)
def test_midas_input_size(size, expected):
    got = midas_input_size(*size)
    assert got == expected
    h, w = size
    scale = min(384 / h, 384 / w)  # the documented rule: keep the aspect, fit 384, nearest multiple of 32 (>= 32)
    assert got == tuple(max(32, round(s * scale / 32) * 32) for s in (h, w))
    assert got[0] % 32 == 0 and got[1] % 32 == 0 and max(got) == 384


def test_midas_preprocessing_size_and_imagenet_normalisation():
    net = Recorder(3.0)
    midas = MidasDisparity(net)
    value = torch.tensor([-1.0, 0.2, 0.6])  # a constant image per channel (bicubic keeps constants)
    x = value.view(1, 3, 1, 1).expand(2, 3, 32, 48).contiguous()
    out = midas({"src_img": x})
    assert out.shape == (2, 32, 48)
    torch.testing.assert_close(out, torch.full((2, 32, 48), 3.0))
    (seen,) = net.seen
    assert seen.shape == (2, 3, 256, 384)  # midas_input_size(32, 48)
    expected = ((value + 1) / 2 - MEAN) / STD  # [-1, 1] -> [0, 1] -> ImageNet statistics
    torch.testing.assert_close(seen, expected.view(1, 3, 1, 1).expand_as(seen), atol=1e-5, rtol=0)


def test_midas_output_is_resized_back_bicubic_and_clamped():
    net = Recorder(0.0, from_input=True, keepdim=True)  # (B, 1, h, w) outputs are accepted too
    midas = MidasDisparity(net, image_key="img")
    x = torch.rand(1, 3, 20, 36, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = midas({"img": x})
    assert out.shape == (1, 20, 36)
    (seen,) = net.seen
    assert seen.shape[-2:] == midas_input_size(20, 36) == (224, 384)
    expected = F.interpolate(seen[:, :1], size=(20, 36), mode="bicubic", align_corners=False)[:, 0]
    torch.testing.assert_close(out, expected.clamp(min=1e-8))
    assert (out >= 1e-8).all() and (expected < 0).any()  # normalised inputs go negative: clamped
    assert torch.equal(MidasDisparity(Recorder(-5.0))(x), torch.full((1, 20, 36), 1e-8))


def test_midas_is_frozen_and_checks_its_input():
    net = Recorder()
    midas = MidasDisparity(net)
    assert not any(p.requires_grad for p in midas.parameters())
    midas.train()
    assert not midas.training and not net.training
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        midas(torch.zeros(1, 1, 8, 8))


def test_midas_without_network_needs_hub_dir_and_weights(tmp_path):
    with pytest.raises(ValueError, match="hub_dir .* and weights"):
        MidasDisparity()
    with pytest.raises(ValueError, match="hub_dir"):
        MidasDisparity(hub_dir=tmp_path)
    with pytest.raises(ValueError, match="weights"):
        MidasDisparity(weights=tmp_path / "midas.pt")
    with pytest.raises(FileNotFoundError, match="hubconf.py"):
        MidasDisparity(hub_dir=tmp_path, weights=tmp_path / "midas.pt")


def test_batch_disparity():
    d = torch.rand(2, 4, 6)
    assert torch.equal(BatchDisparity()({"src_mono_disparity": d}), d)
    assert torch.equal(BatchDisparity("midas")({"midas": d[:, None]}), d)  # (B, 1, H, W) -> (B, H, W)
    with pytest.raises(ValueError, match="'midas'"):
        BatchDisparity("midas")({"src_mono_disparity": d})


# ------------------------------------------------------------------------------------------------------------- probe
def test_fit_ridge_recovers_a_planted_linear_map():
    g = torch.Generator().manual_seed(0)
    n, d = 600, 12
    x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 5.0, d) + 3.0  # unequal scales, non-zero means
    w_true, b_true = torch.randn(d, generator=g), 0.7
    y = x @ w_true + b_true + 0.01 * torch.randn(n, generator=g)
    w = fit_ridge(x[:500], y[:500], ridge=1e-4)
    assert w.shape == (d + 1,)
    pred = x[500:] @ w[:-1] + w[-1]
    assert r2_score(pred, y[500:]) > 0.99
    torch.testing.assert_close(w[:-1], w_true, atol=0.05, rtol=0.05)
    assert abs(float(w[-1]) - b_true) < 0.3
    # a strong ridge shrinks the weights but not the intercept: the fitted values keep the training targets' mean
    w_big = fit_ridge(x[:500], y[:500], ridge=100.0)
    assert w_big[:-1].norm() < 0.1 * w[:-1].norm()
    fitted = x[:500] @ w_big[:-1] + w_big[-1]
    assert float(fitted.mean()) == pytest.approx(float(y[:500].mean()), abs=1e-3)


def test_r2_score_closed_forms():
    y = torch.tensor([1.0, 2.0, 4.0, 7.0])
    assert r2_score(y, y) == 1.0
    assert r2_score(torch.full_like(y, float(y.mean())), y) == pytest.approx(0.0, abs=1e-7)
    assert r2_score(-y, y) < 0  # worse than the mean
    half = y.mean() + 0.5 * (y - y.mean())  # residual = half the deviation: R² = 1 - 1/4
    assert r2_score(half, y) == pytest.approx(0.75, abs=1e-6)


def test_cell_disparity_averages_normalised_true_disparity_per_token_cell():
    depth = 1.0 + torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(1)) * 4
    cells = cell_disparity({"src_depth": depth}, SimpleNamespace(grid=(2, 3)))
    assert cells.shape == (2, 6)
    disp = 1 / depth
    disp = disp / disp.flatten(1).amax(1)[:, None, None]
    expected = disp.view(2, 2, 4, 3, 4).mean(dim=(2, 4)).flatten(1)  # 4x4 pixel blocks in raster order
    torch.testing.assert_close(cells, expected)
    assert (cells <= 1).all() and (cells > 0).all()


def test_depth_probe_checks_the_pair_counts():
    data = [None] * 10
    with pytest.raises(ValueError, match="at most the data's 10"):
        depth_probe(None, data, num_train=8, num_test=3)
    with pytest.raises(ValueError, match="num_train >= 2"):
        depth_probe(None, data, num_train=1, num_test=3)
