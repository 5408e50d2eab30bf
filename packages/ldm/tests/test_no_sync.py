"""No training step of an ldm recipe waits on the device: the class-conditional, text-conditional and inpainting
LatentDiffusion recipes and the KL autoencoder with its GAN on, trained on real Fashion-MNIST batches under
gencore.testing.assert_no_host_sync (on the CPU a proxy that refuses .item(), .tolist(), bool / int / float of
tensors, boolean masks, ...; on CUDA torch's sync-debug mode)."""

import pytest
import torch

from gencore.data import FashionMNISTDataModule
from gencore.data.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, caption_for
from gencore.testing import assert_no_host_sync, sync_test_devices
from ldm.conditioning import ClassConditioner, InpaintingConditioner, TextConditioner
from ldm.first_stage import KLCodec
from ldm.lit import AutoencoderKLModule, LatentDiffusion
from ldm.losses import LPIPSWithDiscriminator
from ldm.models.autoencoder import build_autoencoder
from ldm.models.unet import unet_from_preset

pytestmark = [
    pytest.mark.skipif(not (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing"),
]
DEVICES = sync_test_devices()


def data(size: int = 16) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(image_size=size, batch_size=4, num_workers=0, limit_train=32, limit_val=4)


def pixel_unet(**kw):
    torch.manual_seed(0)
    return unet_from_preset("tiny", in_channels=1, out_channels=1, image_size=16, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_class_recipe(device):
    """Labels through the class token (range check on the device), 50% dropout to the null class, the latent scale
    estimated at the first batch (the warmup), per-timestep loss buckets."""
    m = LatentDiffusion(
        pixel_unet(), None, ClassConditioner(10), image_channels=1, image_size=16, p_uncond=0.5, scale_by_std=True
    )
    assert_no_host_sync(m, data(), steps=3, warmup=1, device=device)
    assert m.latent_norm.ready


@pytest.mark.parametrize("device", DEVICES)
def test_text_recipe(device):
    """Captions through the frozen MiniLM encoder (features cached: the ten captions and "" encoded beforehand, on
    the training device), 50% caption dropout to ""."""
    m = LatentDiffusion(
        pixel_unet(context_dim=384), None, TextConditioner(max_length=8), image_channels=1, image_size=16, p_uncond=0.5
    )
    encoder = m.cond_stage_model.to(device).encoder
    encoder([caption_for(c) for c in range(len(CLASS_NAMES))] + [""])  # warm the feature cache
    assert_no_host_sync(m, data(), steps=3, warmup=1, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_inpainting_recipe(device):
    """Random training masks drawn on the device, the masked image through a KL first stage."""
    torch.manual_seed(0)
    ae = build_autoencoder("tiny", ddconfig={"in_channels": 1, "out_ch": 1, "attn_resolutions": []})
    unet = unet_from_preset("tiny", in_channels=9, context_dim=None, use_spatial_transformer=False)
    m = LatentDiffusion(unet, KLCodec(ae), InpaintingConditioner(), image_size=32, scale_factor=0.5)
    assert_no_host_sync(m, data(32), steps=2, warmup=1, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_autoencoder_gan_recipe(device):
    """The KL autoencoder's generator step (NLL with the Fashion-MNIST perceptual distance, KL, adaptive GAN weight)
    and discriminator step, the discriminator on from the first batch."""
    torch.manual_seed(0)
    ae = build_autoencoder("tiny", ddconfig={"in_channels": 1, "out_ch": 1})
    loss = LPIPSWithDiscriminator(
        disc_start=0, kl_weight=1e-6, disc_in_channels=1, disc_ndf=8, disc_num_layers=2, perceptual="fmnist"
    )
    m = AutoencoderKLModule(ae, loss, learning_rate=1e-4, scale_lr=False)
    assert_no_host_sync(m, data(32), steps=2, warmup=1, device=device)
