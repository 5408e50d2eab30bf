"""No training step of sd3_flow's recipes waits for the device (gencore.testing.assert_no_host_sync): rectified flow in
pixel space and the eps/linear baseline over a tiny SD3-style VAE, on real Fashion-MNIST captions and images, with the
latent scale / shift estimated (in the warm-up batch) and the text encoder dropped per sample."""

import pytest
import torch
from diffusers import AutoencoderKL

from gencore.data import FashionMNISTDataModule
from gencore.data.fashion_mnist import DEFAULT_ROOT, caption_for
from gencore.latents import DiffusersVAECodec
from gencore.testing import assert_no_host_sync, sync_test_devices
from sd3_flow.conditioning import SD3TextConditioner
from sd3_flow.lit import RectifiedFlowModule
from sd3_flow.models.mmdit import mmdit_from_preset

pytestmark = [
    pytest.mark.skipif(
        not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed"
    ),
]
DEVICES = sync_test_devices()


def data() -> FashionMNISTDataModule:
    return FashionMNISTDataModule(image_size=16, limit_train=64, limit_val=8, batch_size=8, num_workers=0)


def tiny_vae() -> DiffusersVAECodec:
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return DiffusersVAECodec(vae)  # 16x16 -> 4 x 8 x 8


def recipe(objective: str, device: str) -> RectifiedFlowModule:
    torch.manual_seed(0)
    # the offline MiniLM; the ten class captions and "" encoded once on the device (the encoder's cache), as a run's
    # first batches would, so that no guarded batch tokenises (a host -> device copy)
    text = SD3TextConditioner(minilm_max_length=8).to(torch.device(device))
    text.encode_text([caption_for(c) for c in range(10)] + [""])
    pixel = objective.startswith("rf")
    first_stage = None if pixel else tiny_vae()
    channels, patch, size = (1, 4, 16) if pixel else (4, 2, 8)
    net = mmdit_from_preset(
        "tiny",
        in_channels=channels,
        out_channels=channels,
        patch_size=patch,
        sample_size=size,
        pos_embed_max_size=4,
        joint_attention_dim=384,
        pooled_projection_dim=384,
    )
    return RectifiedFlowModule(
        net,
        first_stage,
        text,
        objective=objective,
        p_drop_text=0.5,
        image_channels=1,
        image_size=16,
        latent_scale=None,  # estimated in the warm-up batch, then known on the host
        latent_shift=None,
        learning_rate=1e-4,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("objective", ["rf/lognorm(0.00,1.00)", "eps/linear"])
def test_training_step_does_not_sync(device, objective):
    module = recipe(objective, device)
    assert_no_host_sync(module, data(), steps=3, warmup=1, device=device)
    assert module.latent_norm.ready and torch.isfinite(module.latent_scale)
    assert module.loss_buckets["train"].compute()  # the guarded steps filled the per-timestep buckets
