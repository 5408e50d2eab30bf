"""GuidedInpainting: the batch contract, the two GAN steps (the generator's backward leaves the discriminator alone),
the warm-up + cosine schedule on both players, input checks, the ablation switches, and a generator loss that drops
when the model fits real photos."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from twostream_inpaint.data import KeyframeImages
from twostream_inpaint.flow import ZeroFlow, build_flow
from twostream_inpaint.lit import GuidedInpainting, check_holes, check_inputs, hole_psnr
from twostream_inpaint.models import GIResNetGenerator, NLayerDiscriminator

FFC = {"ratio_gin": 0.75, "ratio_gout": 0.75, "enable_lfu": False}


def tiny_module(deformable: bool = True, crossattending: bool = True, flow=None, **kw) -> GuidedInpainting:
    torch.manual_seed(0)
    gen = GIResNetGenerator(
        4,
        3,
        ngf=8,
        n_downsampling=2,
        n_blocks=2,
        block_type="ffc",
        num_latents_sqrt=4,
        read_write_heads=2,
        num_heads=2,
        fourier_bands=4,
        fourier_max_resolution=(8, 8),
        is_deformable=deformable,
        is_crossattending=crossattending,
        n_cross=2,
        add_out_act="sigmoid",
        resnet_conv_kwargs=FFC,
    )
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2)
    if flow is None and deformable:
        flow = ZeroFlow()
    kw.setdefault("perceptual", "none")
    kw.setdefault("perceptual_weight", 0.0)
    return GuidedInpainting(gen, disc, flow, warm_up_steps=2, max_decay_steps=10, **kw)


@pytest.fixture(scope="module")
def photos_batch():
    ds = KeyframeImages(split="train", size=32, n_references=2, fresh=False, length=8, seed=0)
    return default_collate([ds[i] for i in range(8)])


def test_forward_keeps_known_pixels_and_predicts_in_unit_range(photos_batch):
    module = tiny_module().eval()
    out = module(photos_batch)
    m, x = photos_batch["mask"], photos_batch["image"]
    assert out["predicted_image"].shape == x.shape
    assert 0 < out["predicted_image"].min() and out["predicted_image"].max() < 1
    assert torch.equal(out["inpainted"] * (1 - m), x * (1 - m))
    assert hole_psnr(x, x, m).min() >= 99


def test_hole_psnr_counts_only_the_hole():
    x = torch.zeros(1, 3, 4, 4)
    y = x.clone()
    y[..., :2, :] = 0.1  # errors only in the top half
    top = torch.zeros(1, 1, 4, 4)
    top[..., :2, :] = 1
    assert hole_psnr(y, x, top).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 inside
    assert hole_psnr(y, x, 1 - top).item() >= 99


def test_generator_backward_leaves_the_discriminator_alone_and_both_steps_run(photos_batch):
    module = tiny_module()
    loss, logs, fake = module.generator_step(photos_batch, 0)
    assert {"train/gen_l1", "train/gen_adv", "train/gen_fm"} <= set(logs)
    loss.backward()
    assert all(p.grad is None for p in module.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.generator.parameters())
    d_loss, d_logs = module.discriminator_step(photos_batch, fake, 0)
    assert all(p.requires_grad for p in module.discriminator.parameters())
    d_loss.backward()
    assert all(p.grad is not None for p in module.discriminator.parameters())
    assert d_logs["train/d_r1"] > 0 and torch.isfinite(d_loss)


def test_fitting_real_photos_lowers_the_generator_loss(photos_batch):
    module = tiny_module()
    opt = torch.optim.Adam(module.generator.parameters(), lr=2e-3)
    losses = []
    for step in range(30):
        loss, logs, _ = module.generator_step(photos_batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        module._set_discriminator_grad(True)
        losses.append(logs["train/gen_l1"].item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_schedule_scales_both_players_from_lr_start():
    module = tiny_module(learning_rate=1e-3, discriminator_lr_factor=0.1, lr_start=0.1, lr_max=1.0, lr_min=0.01)
    assert module.lr_lambda(0) == pytest.approx(0.1) and module.lr_lambda(2) == pytest.approx(1.0)
    assert module.lr_lambda(10) == pytest.approx(0.01)
    assert module.discriminator_learning_rate == pytest.approx(1e-4)


def test_ablations_need_and_use_flow_only_with_the_local_stream(photos_batch):
    class Counting(ZeroFlow):
        calls = 0

        def forward(self, a, b):
            Counting.calls += 1
            return super().forward(a, b)

    with pytest.raises(ValueError, match="no flow estimator"):
        GuidedInpainting(tiny_module().generator, NLayerDiscriminator(3, ndf=8, n_layers=2), None, perceptual="none")
    global_only = tiny_module(deformable=False, flow=Counting()).eval()
    global_only(photos_batch)
    assert Counting.calls == 0
    local_only = tiny_module(crossattending=False, flow=Counting()).eval()
    local_only(photos_batch)
    assert Counting.calls == 1  # one batched call for all keyframes


def test_bad_inputs_name_the_problem():
    x = torch.rand(1, 3, 32, 32)
    m = torch.zeros(1, 1, 32, 32)
    s = torch.rand(1, 2, 3, 32, 32)
    check_inputs(x, m, s)
    with pytest.raises(ValueError, match=r"mask size \(16, 16\) differs from the image size \(32, 32\)"):
        check_inputs(x, torch.zeros(1, 1, 16, 16), s)
    with pytest.raises(ValueError, match="no keyframes"):
        check_inputs(x, m, s[:, :0])
    with pytest.raises(ValueError, match="keyframe size"):
        check_inputs(x, m, torch.rand(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\)"):
        check_inputs(x[:, :1], m, s)
    with pytest.raises(ValueError, match="covers the whole image"):
        check_holes(torch.ones(2, 1, 8, 8))
    check_holes(m)
    with pytest.raises(ValueError, match="unknown flow"):
        build_flow("magic")
