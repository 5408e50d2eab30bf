"""LPIPSWithDiscriminator, the KL-autoencoder loss (ldm.losses): hand computations of every term."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gencore.io import load_state_dict
from ldm.losses import LPIPSWithDiscriminator
from ldm.models.autoencoder import DiagonalGaussianDistribution, build_autoencoder


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, h):
        return self.conv_out(h)


def _loss(**kw) -> LPIPSWithDiscriminator:
    defaults = dict(disc_start=5, disc_in_channels=1, disc_ndf=8, disc_num_layers=2, perceptual="none")
    return LPIPSWithDiscriminator(**{**defaults, **kw})


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dec = _Decoder()
    x = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    rec = dec(torch.randn(2, 4, 16, 16, generator=g))
    post = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4, generator=g))
    return dec, x, rec, post


def _kl_by_hand(post) -> torch.Tensor:
    m, lv = post.mean, post.logvar
    return (0.5 * (m**2 + lv.exp() - 1 - lv)).sum() / m.shape[0]


def test_nll_is_a_sum_over_pixels_divided_by_batch_and_kl_is_weighted():
    torch.manual_seed(0)
    dec, x, rec, post = _batch()
    loss_fn = _loss(logvar_init=0.5, kl_weight=1e-3)
    loss, log = loss_fn.generator_loss(x, rec, post, step=0, last_layer=dec.conv_out.weight)
    # nll = Σ(|x − x̂| / e^0.5 + 0.5) / B: a SUM over C·H·W = 256 pixels (taming's VQ loss takes the mean)
    nll = ((x - rec).abs() / math.exp(0.5) + 0.5).sum() / 2
    assert log["train/nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)
    assert log["train/kl_loss"].item() == pytest.approx(_kl_by_hand(post).item(), rel=1e-6)
    assert loss.item() == pytest.approx((nll + 1e-3 * _kl_by_hand(post)).item(), rel=1e-6)
    assert log["train/rec_loss"].item() == pytest.approx((x - rec).abs().mean().item(), rel=1e-6)
    assert log["train/logvar"].item() == pytest.approx(0.5)
    mean_nll = ((x - rec).abs() / math.exp(0.5) + 0.5).mean()
    assert nll.item() == pytest.approx(256 * mean_nll.item(), rel=1e-6)  # the parity trap, spelled out
    # kl_weight 0 drops the KL term; per-pixel weights (official `weights=`) scale the nll that enters the total
    zero_kl, _ = _loss(logvar_init=0.5, kl_weight=0.0).generator_loss(x, rec, post, step=0)
    assert zero_kl.item() == pytest.approx(nll.item(), rel=1e-6)
    w = torch.rand(2, 1, 16, 16)
    weighted, log = _loss(logvar_init=0.5, kl_weight=0.0).generator_loss(x, rec, post, step=0, weights=w)
    expected = (w * ((x - rec).abs() / math.exp(0.5) + 0.5)).sum() / 2
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    assert log["train/nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)  # logged unweighted, as officially


def test_perceptual_term_is_broadcast_to_every_pixel():
    _, x, rec, post = _batch()
    loss_fn = _loss(kl_weight=0.0, pixelloss_weight=2.0)
    loss_fn.perceptual_loss = lambda a, b: torch.tensor([0.1, 0.3]).view(2, 1, 1, 1)  # a stand-in LPIPS (B,1,1,1)
    loss_fn.perceptual_weight = 0.5
    loss, log = loss_fn.generator_loss(x, rec, post, step=0)
    per_pixel = 2.0 * (x - rec).abs() + 0.5 * torch.tensor([0.1, 0.3]).view(2, 1, 1, 1)
    assert loss.item() == pytest.approx((per_pixel.sum() / 2).item(), rel=1e-6)
    assert log["train/p_loss"].item() == pytest.approx(0.2)


def test_learned_logvar_gets_the_closed_form_gradient():
    dec, x, rec, post = _batch()
    loss_fn = _loss(kl_weight=0.0)
    assert isinstance(loss_fn.logvar, nn.Parameter) and loss_fn.logvar.shape == () and loss_fn.logvar.item() == 0
    loss, _ = loss_fn.generator_loss(x, rec.detach(), post, step=0)
    loss.backward()
    # d/dlv Σ(r e^-lv + lv)/B at lv = 0: (N − Σr)/B, N = pixels per sample ... summed over the batch
    r = (x - rec.detach()).abs()
    expected = (r.numel() - r.sum()) / 2
    assert loss_fn.logvar.grad.item() == pytest.approx(expected.item(), rel=1e-5)
    # it must be put in the AUTOENCODER optimiser to learn (the official configure_optimizers leaves it out)
    opt = torch.optim.Adam([*dec.parameters(), loss_fn.logvar], lr=0.1)
    opt.step()
    assert loss_fn.logvar.item() != 0.0


def test_adaptive_weight_after_disc_start_and_hinge_sign():
    torch.manual_seed(0)
    dec, x, _, post = _batch()
    loss_fn = _loss(disc_weight=0.5, kl_weight=1e-6)
    rec = dec(torch.randn(2, 4, 16, 16))
    loss, log = loss_fn.generator_loss(x, rec, post, step=5, last_layer=dec.conv_out.weight)
    nll = (x - rec).abs().sum() / 2
    g = -loss_fn.discriminator(rec).mean()  # generator hinge: −mean D(x̂)
    gn = torch.autograd.grad(nll, dec.conv_out.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, dec.conv_out.weight, retain_graph=True)[0].norm()
    lam = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.5
    assert log["train/d_weight"].item() == pytest.approx(lam.item(), rel=1e-5)
    assert log["train/g_loss"].item() == pytest.approx(g.item(), rel=1e-5)
    assert loss.item() == pytest.approx((nll + 1e-6 * _kl_by_hand(post) + lam * g).item(), rel=1e-5)
    loss.backward()
    dec_grad = dec.conv_out.weight.grad.clone()

    # discriminator hinge: ½(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))
    d_loss, dlog = loss_fn.discriminator_loss(x, rec, step=5)
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(rec.detach())
    assert d_loss.item() == pytest.approx((0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())).item(), rel=1e-6)
    assert dlog["train/logits_real"].item() == pytest.approx(real.mean().item(), rel=1e-5)
    loss_fn.discriminator.zero_grad()
    d_loss.backward()
    assert torch.equal(dec.conv_out.weight.grad, dec_grad)  # inputs detached: nothing reaches the decoder
    assert loss_fn.discriminator.main[0].weight.grad.abs().sum() > 0
    # the sign: confident correct logits cost nothing, reversed ones cost 3
    fn = loss_fn.disc_loss
    assert fn(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert fn(torch.full((4,), -2.0), torch.full((4,), 2.0)).item() == pytest.approx(3.0)
    vanilla = _loss(disc_loss="vanilla").disc_loss
    r, f = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert vanilla(r, f).item() == pytest.approx((0.5 * (F.softplus(-r).mean() + F.softplus(f).mean())).item())


def test_adaptive_weight_is_clamped():
    loss_fn = _loss(disc_weight=0.5)
    w = torch.ones(3, requires_grad=True)
    nll = (w * 1e6).sum()
    g = (w * 0.0).sum()  # zero generator gradient: ratio 1e6·√3 / 1e-4 → clamped to 1e4
    assert loss_fn.calculate_adaptive_weight(nll, g, w).item() == pytest.approx(1e4 * 0.5)
    assert loss_fn.calculate_adaptive_weight((w * 0).sum(), (w * 2).sum(), w).item() == 0.0


def test_disc_factor_is_zero_before_disc_start():
    dec, x, rec, post = _batch()
    loss_fn = _loss(disc_start=5, kl_weight=1e-6)
    loss, log = loss_fn.generator_loss(x, rec, post, step=4, last_layer=dec.conv_out.weight)
    assert log["train/disc_factor"] == 0 and log["train/g_loss"] == 0 and log["train/d_weight"] == 0
    assert loss.item() == pytest.approx(((x - rec).abs().sum() / 2 + 1e-6 * _kl_by_hand(post)).item(), rel=1e-6)
    d_loss, dlog = loss_fn.discriminator_loss(x, rec, step=4)
    assert d_loss is None and dlog == {}  # the official code computes it and multiplies by 0
    after, alog = loss_fn.discriminator_loss(x, rec, step=5)
    assert after.item() > 0 and after.requires_grad and "train/disc_loss" in alog
    # validation (no grad): the adaptive weight is 0, as in the official try/except
    with torch.no_grad():
        _, vlog = loss_fn.generator_loss(x, rec, post, 10, last_layer=dec.conv_out.weight, split="val")
    assert vlog["val/d_weight"] == 0 and "val/total_loss" in vlog and vlog["val/disc_factor"] == 1


def test_bad_arguments_raise_clear_errors():
    _, x, rec, post = _batch()
    with pytest.raises(ValueError, match="disc_loss must be 'hinge' or 'vanilla'"):
        _loss(disc_loss="wgan")
    with pytest.raises(ValueError, match="unknown perceptual loss 'vgg'"):
        _loss(perceptual="vgg")
    with pytest.raises(ValueError, match="disc_start must be >= 0"):
        _loss(disc_start=-1)
    with pytest.raises(ValueError, match="kl_weight must be >= 0"):
        _loss(kl_weight=-1.0)
    loss_fn = _loss()
    assert "forward" not in vars(LPIPSWithDiscriminator)  # no optimizer_idx switch: generator / discriminator_loss
    with pytest.raises(ValueError, match="differ in shape"):
        loss_fn.generator_loss(x, rec[:, :, :8], post, step=0)
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, rec, post, step=10)
    with pytest.raises(ValueError, match="unconditional, cond given"):
        loss_fn.discriminator_loss(x, rec, step=10, cond=x)


def test_official_loss_keys_load(tmp_path):
    # logvar + discriminator.main.* with the official indices (perceptual_loss.* is taming's LPIPS, tested there)
    ours = LPIPSWithDiscriminator(disc_start=50001, kl_weight=1e-6, disc_weight=0.5, perceptual="none")
    keys = set(ours.state_dict())
    assert "logvar" in keys and {k.split(".")[2] for k in keys if k.startswith("discriminator.")} == {
        "0", "2", "3", "5", "6", "8", "9", "11"}  # fmt: skip
    official = {f"loss.{k}": v.clone().normal_() if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    official["loss.logvar"] = torch.tensor(-0.7)
    official["loss.perceptual_loss.lin0.model.1.weight"] = torch.rand(1, 64, 1, 1)
    fresh = LPIPSWithDiscriminator(disc_start=50001, perceptual="none")
    load_state_dict(fresh, official, prefix="loss.", ignore_prefixes=("perceptual_loss.",))
    assert fresh.logvar.item() == pytest.approx(-0.7)
    assert torch.equal(fresh.discriminator.main[11].weight, official["loss.discriminator.main.11.weight"])


def test_fmnist_perceptual_one_training_step_with_the_autoencoder():
    torch.manual_seed(0)
    ae = build_autoencoder("fmnist_kl_f4").train()
    loss_fn = LPIPSWithDiscriminator(
        disc_start=0, kl_weight=1e-6, disc_weight=0.5, disc_in_channels=1, disc_ndf=8, disc_num_layers=2,
        perceptual="fmnist",
    )  # fmt: skip
    assert not any(p.requires_grad for p in loss_fn.perceptual_loss.parameters())
    opt_ae = torch.optim.Adam([*ae.parameters(), loss_fn.logvar], lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    rec, post = ae(x)
    loss, log = loss_fn.generator_loss(x, rec, post, step=0, last_layer=ae.get_last_layer())
    assert torch.isfinite(loss) and log["train/p_loss"] > 0 and log["train/d_weight"] > 0
    opt_ae.zero_grad()
    loss.backward()
    assert loss_fn.logvar.grad is not None and ae.encoder.conv_in.weight.grad is not None
    opt_ae.step()
    d_loss, _ = loss_fn.discriminator_loss(x, rec, step=0)
    opt_d.zero_grad()
    d_loss.backward()
    opt_d.step()
    assert loss_fn.logvar.item() != 0.0


def test_official_loss_keys_load_strictly_with_lpips(tmp_path, monkeypatch):
    vgg = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
           (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]  # fmt: skip
    features = {
        f"features.{i}.{n}": torch.zeros(s)
        for i, cin, cout in vgg
        for n, s in (("weight", (cout, cin, 3, 3)), ("bias", (cout,)))
    }
    torch.save(features, tmp_path / "vgg16.pth")  # a stand-in for torchvision's VGG16 file (names and shapes)
    ours = LPIPSWithDiscriminator(disc_start=50001, perceptual="lpips", perceptual_weights=tmp_path / "vgg16.pth")
    sd = ours.state_dict()
    assert {"logvar", "perceptual_loss.scaling_layer.shift", "perceptual_loss.net.slice1.0.weight",
            "perceptual_loss.lin4.model.1.weight", "discriminator.main.11.weight"} <= set(sd)  # fmt: skip
    official = {f"loss.{k}": v.clone() for k, v in sd.items()}
    official["loss.logvar"] = torch.tensor(0.3)
    fresh = LPIPSWithDiscriminator(disc_start=50001, perceptual="lpips", perceptual_weights=tmp_path / "vgg16.pth")
    load_state_dict(fresh, official, prefix="loss.")  # strict: every official name has a home
    assert fresh.logvar.item() == pytest.approx(0.3)
    assert not any(p.requires_grad for p in fresh.perceptual_loss.parameters())
