"""Shared fixtures: a few real Fashion-MNIST training images and the shipped taming VQGAN remapped to the codes they
use (what ``remap: auto`` does), plus a builder of tiny ImageBART models over it."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch

from gencore.data.fashion_mnist import DEFAULT_ROOT

VQGAN = "pkg://taming/checkpoints/vqgan_fmnist"
HAVE_FMNIST = (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file()


@pytest.fixture(scope="session")
def fmnist() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (64, 1, 32, 32) in [-1, 1], labels (64,)) of the Fashion-MNIST training split."""
    if not HAVE_FMNIST:
        pytest.skip("Fashion-MNIST not installed")
    from gencore.data import FashionMNIST

    return FashionMNIST(split="train", image_size=32, channels=1, limit=64).tensors()


@pytest.fixture(scope="session")
def used(fmnist) -> list[int]:
    """The codes the shipped VQGAN picks on the 64 images (sorted): the remap, K = its length."""
    from imagebart.first_stage import used_codes
    from taming.first_stage import load_first_stage

    return [int(i) for i in used_codes(load_first_stage(VQGAN), [fmnist[0]])]


@pytest.fixture(scope="session")
def build_imagebart(used):
    """``build(**overrides)`` -> a tiny class-conditional ImageBART (T = 3 by default) over the remapped VQGAN."""
    from imagebart.first_stage import remapped_first_stage
    from imagebart.lit import ImageBART
    from imagebart.models.xtransformer import ResidualScaledXTransformer
    from taming.conditioning import ClassConditioner
    from taming.models.mingpt import GPT

    def build(seed: int = 0, first_stage: Any = None, **overrides: Any) -> ImageBART:
        torch.manual_seed(seed)
        kwargs: dict[str, Any] = dict(
            num_steps=3,
            alpha=[0.0, 1.0, 1.0],
            scale_lr=False,
            learning_rate=1.0,  # x the LambdaLR values below: a constant 3e-3
            warmup_steps=1,
            lr_start=3e-3,
            lr_max=3e-3,
            lr_min=3e-3,
        )
        kwargs.update(overrides)
        return ImageBART(
            remapped_first_stage(VQGAN, remap=used) if first_stage is None else first_stage,
            functools.partial(
                ResidualScaledXTransformer, dim=32, enc_depth=1, enc_heads=2, dec_depth=1, dec_heads=2, attn_dim_head=16
            ),
            functools.partial(GPT, n_layer=1, n_head=2, n_embd=32),
            ClassConditioner(10, offset=0),
            **kwargs,
        )

    return build
