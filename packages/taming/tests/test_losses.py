import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gencore.metrics import MissingWeightsError
from gencore.training import adopt_weight, hinge_d_loss, vanilla_d_loss
from taming.losses import LPIPS, ActNorm, FMNISTPerceptual, NLayerDiscriminator, VQLPIPSWithDiscriminator


def test_discriminator_layout_and_patch_output():
    d = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    keys = [k for k in d.state_dict() if not k.endswith("num_batches_tracked")]
    # the official indices of loss.discriminator.main.* (taming.md: 0, 2, 3, 5, 6, 8, 9, 11)
    assert sorted({int(k.split(".")[1]) for k in keys}) == [0, 2, 3, 5, 6, 8, 9, 11]
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)  # 70x70 PatchGAN receptive field at 64x64
    assert d.main[0].weight.std().item() == pytest.approx(0.02, rel=0.1)  # official weights_init
    assert NLayerDiscriminator(1, 16, 2)(torch.randn(2, 1, 32, 32)).shape == (2, 1, 6, 6)
    act = NLayerDiscriminator(3, 8, 2, use_actnorm=True).train()
    act(torch.randn(4, 3, 32, 32) * 5 + 3)
    assert act.main[3].initialized.item() == 1


def test_actnorm_initialises_once_from_the_first_training_batch_and_knows_it_on_the_host():
    torch.manual_seed(0)
    norm = ActNorm(3)
    assert set(norm.state_dict()) == {"loc", "scale", "initialized"}  # the official layout
    norm.eval()
    x = torch.randn(8, 3, 4, 4) * 5 + 3
    assert torch.equal(norm(x), x) and norm.initialized.item() == 0  # eval mode: no initialisation
    norm.train()
    y = norm(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # zero mean, unit std per channel
    assert torch.allclose(y.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    assert norm.initialized.item() == 1 and norm._initialized
    loc = norm.loc.detach().clone()
    norm(x * 10)
    assert torch.equal(norm.loc, loc)  # only the first batch initialises
    fresh = ActNorm(3)
    fresh.load_state_dict(norm.state_dict())
    assert fresh._initialized  # a loaded initialised layer is not initialised again
    fresh.train()(x * 10)
    assert torch.equal(fresh.loc, loc)
    restarted = ActNorm(3)
    restarted.load_state_dict(ActNorm(3).state_dict())
    assert not restarted._initialized


def test_gan_losses_closed_forms():
    """The loss pieces are gencore's (one copy for taming and ldm); the hinge / vanilla choice picks them."""
    assert _loss().disc_loss is hinge_d_loss and _loss(disc_loss="vanilla").disc_loss is vanilla_d_loss
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: 0.5 (mean relu(1 - r) + mean relu(1 + f)) = 0.5 ((0 + .5)/2 + (0 + 1.5)/2)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(
        0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean()).item()
    )
    assert adopt_weight(1.0, 9, threshold=10) == 0.0 and adopt_weight(1.0, 10, threshold=10) == 1.0


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, h):
        return self.conv_out(h)


def _loss(**kw):
    defaults = dict(disc_start=5, disc_in_channels=1, disc_ndf=8, disc_num_layers=2, perceptual="none")
    return VQLPIPSWithDiscriminator(**{**defaults, **kw})


def test_generator_loss_before_and_after_disc_start():
    torch.manual_seed(0)
    dec = _Decoder()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    qloss = torch.tensor(0.3)
    loss_fn = _loss(disc_weight=0.8)
    rec = dec(torch.randn(2, 4, 16, 16))
    before, log = loss_fn.generator_loss(qloss, x, rec, step=4, last_layer=dec.conv_out.weight)
    # nll is a MEAN of |x - x̂| (not a sum), and the GAN term is off before disc_start
    assert before.item() == pytest.approx((x - rec).abs().mean().item() + 0.3, rel=1e-6)
    assert log["train/disc_factor"] == 0 and log["train/g_loss"] == 0
    after, log = loss_fn.generator_loss(qloss, x, rec, step=5, last_layer=dec.conv_out.weight)
    nll = (x - rec).abs().mean()
    g = -loss_fn.discriminator(rec).mean()
    gn = torch.autograd.grad(nll, dec.conv_out.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, dec.conv_out.weight, retain_graph=True)[0].norm()
    lam = (gn / (gg + 1e-4)).clamp(0, 1e4) * 0.8
    assert log["train/d_weight"].item() == pytest.approx(lam.item(), rel=1e-5)
    assert after.item() == pytest.approx((nll + lam * g + 0.3).item(), rel=1e-5)
    after.backward()
    assert dec.conv_out.weight.grad is not None


def test_adaptive_weight_is_clamped():
    loss_fn = _loss(disc_weight=1.0)
    w = torch.ones(3, requires_grad=True)
    nll = (w * 1e6).sum()
    g = (w * 1e-9).sum()
    assert loss_fn.calculate_adaptive_weight(nll, g, w).item() == pytest.approx(1e4)


def test_discriminator_loss_sign_and_schedule():
    loss_fn = _loss(disc_start=3)
    x, rec = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert loss_fn.discriminator_loss(x, rec, step=2) == (None, {})
    d_loss, log = loss_fn.discriminator_loss(x, rec, step=3)
    expected = hinge_d_loss(loss_fn.discriminator(x), loss_fn.discriminator(rec))
    assert d_loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert log["train/logits_real"].item() == pytest.approx(loss_fn.discriminator(x).mean().item(), rel=1e-6)
    assert log["train/logits_fake"].item() == pytest.approx(loss_fn.discriminator(rec).mean().item(), rel=1e-6)
    halved = _loss(disc_start=3, disc_factor=0.5)
    halved.discriminator.load_state_dict(loss_fn.discriminator.state_dict())
    half, _ = halved.discriminator_loss(x, rec, step=3)  # disc_factor scales the discriminator loss
    assert half.item() == pytest.approx(0.5 * d_loss.item(), rel=1e-6)
    assert (
        type(loss_fn).forward is torch.nn.Module.forward
    )  # no forward(optimizer_idx): generator_ / discriminator_loss


def test_l2_pixel_loss_and_bad_arguments():
    x, rec = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)
    loss, _ = _loss(pixel_loss="l2", disc_weight=0.0).generator_loss(torch.tensor(0.0), x, rec, step=100)
    assert loss.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="pixel_loss"):
        _loss(pixel_loss="l3")
    with pytest.raises(ValueError, match="disc_loss"):
        _loss(disc_loss="wgan")
    with pytest.raises(ValueError, match="unknown perceptual loss 'vgg'"):
        _loss(perceptual="vgg")


def test_fmnist_perceptual_is_a_distance():
    p = FMNISTPerceptual()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    assert torch.allclose(p(x, x), torch.zeros(4, 1, 1, 1), atol=1e-7)
    near, far = p(x, x + 0.05 * torch.randn_like(x)), p(x, torch.rand_like(x) * 2 - 1)
    assert (near < far).all()
    y = x.clone().requires_grad_()
    p(x, y).sum().backward()  # gradients reach the reconstruction, not the frozen network
    assert y.grad is not None and all(not q.requires_grad for q in p.parameters())


def test_lpips_reads_vgg16_weights_from_a_file_and_names_missing_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        LPIPS()
    vgg_features = {
        f"features.{i}.{n}": torch.randn(*s) * 0.01
        for i, cin, cout in [
            (0, 3, 64),
            (2, 64, 64),
            (5, 64, 128),
            (7, 128, 128),
            (10, 128, 256),
            (12, 256, 256),
            (14, 256, 256),
            (17, 256, 512),
            (19, 512, 512),
            (21, 512, 512),
            (24, 512, 512),
            (26, 512, 512),
            (28, 512, 512),
        ]
        for n, s in (("weight", (cout, cin, 3, 3)), ("bias", (cout,)))
    }
    path = tmp_path / "vgg16.pth"
    torch.save(vgg_features, path)
    lp = LPIPS(path)
    assert torch.equal(getattr(lp.net.slice1, "0").weight, vgg_features["features.0.weight"])
    assert torch.equal(getattr(lp.net.slice5, "28").weight, vgg_features["features.28.weight"])
    keys = set(lp.state_dict())
    assert {"scaling_layer.shift", "lin0.model.1.weight", "net.slice3.14.weight"} <= keys  # official names
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert lp(x, x).abs().max() < 1e-6 and (lp(x, -x) > 0).all()
