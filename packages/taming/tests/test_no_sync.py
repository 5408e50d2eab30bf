"""No training step of taming's recipes waits for the device (gencore.testing.assert_no_host_sync): the VQGAN with its
discriminator on from the first batch, and the transformers over a VQGAN's codes, on real Fashion-MNIST."""

import pytest
import torch

from gencore.data import FashionMNISTDataModule
from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.testing import assert_no_host_sync, sync_test_devices
from taming.conditioning import ClassConditioner, SOSConditioner, SpatialConditioner
from taming.lit import Net2NetTransformer, VQGANModule
from taming.losses import VQLPIPSWithDiscriminator
from taming.models.mingpt import GPT
from taming.models.vqgan import build_vqmodel

pytestmark = [
    pytest.mark.skipif(
        not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
    ),
]
DEVICES = sync_test_devices()


def data() -> FashionMNISTDataModule:
    return FashionMNISTDataModule(image_size=16, limit_train=64, limit_val=8, batch_size=8, num_workers=0)


def vqgan(*, use_actnorm: bool = False, condition: str | None = None, **model: object) -> VQGANModule:
    torch.manual_seed(0)
    loss = VQLPIPSWithDiscriminator(
        disc_start=0,  # the discriminator and the adaptive weight run in every guarded batch
        disc_in_channels=1,
        disc_ndf=8,
        disc_num_layers=2,
        disc_weight=0.8,
        perceptual="fmnist",
        use_actnorm=use_actnorm,
    )
    model = build_vqmodel("tiny", **model)
    return VQGANModule(model, loss, learning_rate=1e-4, scale_lr=False, condition=condition, usage_every=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "variant",
    [
        "recipe",  # vqgan_fmnist: BatchNorm discriminator, codebook usage windows
        "actnorm_restarts_remap",  # ActNorm, dead-code counting, remapped indices
        "edges",  # the conditioning VQGAN of edges -> image
    ],
)
def test_vqgan_training_step_does_not_sync(device, variant):
    module = {
        "recipe": lambda: vqgan(),
        # restarts every 2nd pass and a usage window every 2nd batch: both run in guarded batches
        "actnorm_restarts_remap": lambda: vqgan(
            use_actnorm=True, restart_unused_after=2, remap=list(range(0, 64, 2)), unknown_index="random"
        ),
        "edges": lambda: vqgan(condition="edges"),
    }[variant]()
    assert_no_host_sync(module, data(), steps=3, warmup=1, device=device)


def transformer(kind: str) -> Net2NetTransformer:
    torch.manual_seed(0)
    first = build_vqmodel("tiny")  # 16x16 -> 8x8 codes, 64 entries
    conditioner = {
        "class": lambda: ClassConditioner(10, offset=64),
        "sos": lambda: SOSConditioner(0),
        "edges": lambda: SpatialConditioner(build_vqmodel("tiny", n_embed=32), condition="edges"),
    }[kind]()
    gpt = GPT(vocab_size=74, block_size=128, n_layer=2, n_head=2, n_embd=32)
    return Net2NetTransformer(gpt, first, conditioner, pkeep=0.9, learning_rate=1e-4, scale_lr=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["class", "sos", "edges"])
def test_transformer_training_step_does_not_sync(device, kind):
    assert_no_host_sync(transformer(kind), data(), steps=3, warmup=1, device=device)
