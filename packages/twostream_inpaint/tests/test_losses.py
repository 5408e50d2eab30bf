"""The LaMa objective pieces against closed forms (masked L1, feature matching, NonSaturatingWithR1 with the hole-only
fake target and R1 on reals), the ResNetPL encoder's structure, the integral score."""

import math

import pytest
import torch
import torch.nn.functional as F

from twostream_inpaint.losses import (
    FMNISTPL,
    ADE20kResNet50Dilated,
    NonSaturatingWithR1,
    ResNetPL,
    build_perceptual,
    feature_matching_loss,
    lpips_fid100_f1,
    masked_l1_loss,
)


def test_masked_l1_counts_only_known_pixels_with_the_official_weights():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    pred = target.clone()
    pred[..., 2:6, 2:6] += 5.0  # wrong only inside the hole
    assert masked_l1_loss(pred, target, mask, 10.0, 0.0) == 0
    pred2 = target + 0.25
    known = (1 - mask).expand_as(target)
    assert masked_l1_loss(pred2, target, mask, 10.0, 0.0).item() == pytest.approx(10 * 0.25 * known.mean().item())
    # weight_missing: the hole counts too, averaged over all pixels (not over the hole)
    expected = (10 * 0.25 * known.sum() + 2 * 0.25 * (1 - known).sum()) / known.numel()
    assert masked_l1_loss(pred2, target, mask, 10.0, 2.0).item() == pytest.approx(expected.item())


def test_feature_matching_is_the_mean_of_per_layer_mse():
    a = [torch.ones(2, 4, 8, 8), torch.zeros(2, 8, 4, 4)]
    b = [torch.zeros(2, 4, 8, 8), torch.full((2, 8, 4, 4), 3.0)]
    assert feature_matching_loss(a, b).item() == pytest.approx((1.0 + 9.0) / 2)
    mask = torch.ones(2, 1, 16, 16)  # everything a hole: nothing left to match
    assert feature_matching_loss(a, b, mask).item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="equally many"):
        feature_matching_loss(a, b[:1])


def test_discriminator_loss_labels_only_the_hole_of_a_fake_as_fake_and_penalises_reals_only():
    loss = NonSaturatingWithR1(weight=10, gp_coef=0.0, mask_as_fake_target=True)
    real_logits = torch.zeros(1, 1, 4, 4)
    fake_logits = torch.full((1, 1, 4, 4), 2.0)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1  # the top half is the hole: the top 2 logit rows are "fake"
    real = torch.zeros(1, 3, 16, 16, requires_grad=True)
    total, _ = loss.discriminator_loss(real, real_logits, fake_logits, mask)
    sp = F.softplus
    per = torch.cat([sp(torch.tensor(2.0)).expand(8), sp(torch.tensor(-2.0)).expand(8)])
    expected = (sp(torch.tensor(0.0)) + per).mean()  # the adversarial weight is not applied to D (official)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    plain = NonSaturatingWithR1(gp_coef=0.0, mask_as_fake_target=False)
    total2, _ = plain.discriminator_loss(real, real_logits, fake_logits, mask)
    assert total2.item() == pytest.approx((sp(torch.tensor(0.0)) + sp(torch.tensor(2.0))).item(), rel=1e-6)


def test_r1_penalty_is_the_squared_gradient_norm_on_reals():
    w = torch.randn(3 * 4 * 4, generator=torch.Generator().manual_seed(1))
    real = torch.rand(2, 3, 4, 4, requires_grad=True)
    logits = (real.flatten(1) @ w).view(2, 1, 1, 1)  # linear D: grad = w for every item
    loss = NonSaturatingWithR1(gp_coef=0.5, mask_as_fake_target=False)
    _, logs = loss.discriminator_loss(real, logits, torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 4, 4))
    assert logs["train/d_r1"].item() == pytest.approx(0.5 * w.square().sum().item(), rel=1e-5)
    with torch.no_grad():  # no graph: no penalty (validation)
        _, logs = loss.discriminator_loss(real, logits.detach(), torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 4, 4))
    assert logs["train/d_r1"].item() == 0.0


def test_generator_adversarial_term_is_weighted_softplus():
    loss = NonSaturatingWithR1(weight=10)
    logits = torch.tensor([[[[0.0, 1.0]]]])
    assert loss.generator_loss(logits).item() == pytest.approx(10 * F.softplus(-logits).mean().item())
    with pytest.raises(ValueError, match=">= 0"):
        NonSaturatingWithR1(weight=-1)


def test_ade20k_encoder_has_the_official_names_dilation_and_output_stride():
    enc = ADE20kResNet50Dilated()
    keys = set(enc.state_dict())
    for k in (
        "conv1.weight",
        "bn3.running_mean",
        "conv3.weight",
        "layer1.0.conv1.weight",
        "layer1.0.downsample.0.weight",
        "layer4.2.bn3.weight",
    ):
        assert k in keys, k
    assert enc.conv3.weight.shape == (128, 64, 3, 3) and enc.layer1[0].conv1.weight.shape == (64, 128, 1, 1)
    assert enc.layer3[0].conv2.stride == (1, 1) and enc.layer3[0].conv2.dilation == (1, 1)
    assert enc.layer3[1].conv2.dilation == (2, 2) and enc.layer4[0].conv2.dilation == (2, 2)
    assert enc.layer4[1].conv2.dilation == (4, 4)
    feats = enc.eval()(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
    assert [f.shape[-1] for f in feats] == [16, 8, 8, 8]  # output stride 8


def test_resnet_pl_needs_weights_and_loads_an_official_style_file(tmp_path):
    from gencore.io import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="encoder_epoch_20.pth"):
        ResNetPL()
    with pytest.raises(MissingWeightsError, match="not found"):
        ResNetPL(tmp_path / "nowhere.pth")
    torch.manual_seed(0)
    src = ADE20kResNet50Dilated()
    torch.save(src.state_dict(), tmp_path / "encoder_epoch_20.pth")
    pl = ResNetPL(tmp_path / "encoder_epoch_20.pth")
    assert torch.equal(pl.impl.conv1.weight, src.conv1.weight)
    assert not any(p.requires_grad for p in pl.parameters())
    x = torch.rand(1, 3, 32, 32)
    assert pl(x, x).item() == 0.0
    y = torch.rand(1, 3, 32, 32, requires_grad=True)
    pl(y, x).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_build_perceptual_kinds():
    assert build_perceptual("none") is None
    assert isinstance(build_perceptual("fmnist"), FMNISTPL)
    with pytest.raises(ValueError, match="unknown perceptual loss 'vgg'"):
        build_perceptual("vgg")
    fm = FMNISTPL()
    x = torch.rand(2, 3, 32, 32)
    assert fm(x, x).item() == pytest.approx(0.0, abs=1e-6) and fm(x, x.flip(-1)).item() > 0


def test_lpips_fid100_f1_closed_forms():
    assert lpips_fid100_f1(0.0, 0.0) == pytest.approx(2 / 2.001)
    assert lpips_fid100_f1(1.0, 0.0) == 0.0 and lpips_fid100_f1(0.0, 150.0) == 0.0
    assert lpips_fid100_f1(0.2, 20.0) == pytest.approx(2 * 0.8 * 0.8 / (1.6 + 1e-3))
    assert math.isfinite(lpips_fid100_f1(0.5, 100.0))
