"""The autoencoder trained on the union of datasets (Sec. 2 of the note: one first stage shared by all datasets).

Any gencore codec works as the frozen first stage of the cINN (``ldm.first_stage.kl_codec`` in the configs;
``taming.first_stage.vqgan_codec`` too). To train one, the configs use ldm's KL autoencoder recipe
(:class:`ldm.lit.AutoencoderKLModule`) over :class:`net2net.data.UnionDataModule`; :func:`union_autoencoder` builds
its network, optionally starting from the weights of another KL autoencoder of the same shape (the toy starts from
ldm's shipped Fashion-MNIST autoencoder and fine-tunes it on the union).

The official ``BigAE`` (ResNet-101 encoder, BigGAN decoder, z 128) is not re-implemented: its released checkpoints'
autoencoder weights do not load here (the flow's do: :func:`net2net.convert.load_official`).
"""

from __future__ import annotations

import os
from typing import Any

from ldm.models.autoencoder import AutoencoderKL, build_autoencoder

__all__ = ["union_autoencoder"]


def union_autoencoder(
    preset: str | None = "fmnist_kl_f4", init_from: str | os.PathLike | None = None, **overrides: Any
) -> AutoencoderKL:
    """ldm's :class:`AutoencoderKL` from ``preset`` (+ overrides), its weights copied from the KL autoencoder at
    ``init_from`` (a genlab export / run folder / ``pkg://`` checkpoint / official ``.ckpt``) when given; a
    checkpoint of another shape is a ValueError naming the mismatched tensors."""
    model = build_autoencoder(preset, **overrides)
    if init_from is None:
        return model
    from gencore.io import resolve_path
    from ldm.first_stage import load_kl_first_stage

    if not resolve_path(init_from).exists():
        raise FileNotFoundError(f"union_autoencoder: init_from={init_from} not found")
    source, _ = load_kl_first_stage(init_from)
    ours, theirs = model.state_dict(), source.state_dict()
    bad = sorted(k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape)
    extra = sorted(set(theirs) - set(ours))
    if bad or extra:
        raise ValueError(
            f"union_autoencoder: init_from={init_from} is not a {preset} autoencoder ({len(bad)} missing / "
            f"mismatched tensors, e.g. {(bad or extra)[:3]})"
        )
    model.load_state_dict(theirs)
    return model
