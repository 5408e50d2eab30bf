"""A trained VQGAN as a frozen first stage for other models, from any of the places one lives.

- :func:`load_first_stage` — a genlab export folder or run folder (of a :class:`~taming.lit.VQGANModule`), a genlab
  Lightning ``.ckpt``, or an official taming ``.ckpt`` (with its ``*-project.yaml``);
- :class:`VQGANCodec` — the gencore ``LatentCodec`` over a VQGAN, so ldm / imagebart / geofree / net2net use a
  trained VQGAN by config (``_target_: taming.first_stage.vqgan_codec``). ``encode`` returns the pre-quantisation
  latents (``quant_conv(encoder(x))``, LDM's ``VQModelInterface``); ``decode`` quantises first. Token models use
  ``encode_to_indices`` / ``decode_indices``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from gencore import io
from gencore.latents import FrozenCodec
from gencore.modules import freeze

__all__ = ["VQGANCodec", "load_first_stage", "vqgan_codec"]


def _vq_from(module: nn.Module) -> nn.Module:
    model = getattr(module, "model", module)  # a VQGANModule holds the VQModel as .model
    if not hasattr(model, "quantize") or not hasattr(model, "encode_to_indices"):
        raise ValueError(f"{type(module).__name__} is not a VQGAN (no quantize / encode_to_indices)")
    return model


def load_first_stage(
    path: str | os.PathLike | None, *, config: str | os.PathLike | None = None, prefix: str | None = None
) -> nn.Module:
    """A frozen, eval-mode VQModel from an export / run folder (also a shipped ``pkg://<package>/...`` one), a genlab
    ``.ckpt`` or an official taming ``.ckpt``.

    ``config``: the official ``*-project.yaml`` for an official checkpoint; ``prefix``: the key prefix inside a
    bigger official checkpoint (``first_stage_model.`` / ``cond_stage_model.`` of a Net2NetTransformer).
    """
    from gencore.run import load_module

    if path is None:
        raise ValueError("no first stage given: pass the VQGAN (first_stage=<run folder | export folder | .ckpt>)")
    p = io.resolve_path(path)
    if not p.exists():
        raise FileNotFoundError(f"first stage not found: {path}")
    if p.is_dir():
        return freeze(_vq_from(load_module(p)))
    ckpt = io.load_checkpoint(p)
    state = io.extract_state_dict(ckpt)
    official = prefix is not None or any(k.startswith("encoder.") for k in state)
    if official:
        from taming.convert import load_vqgan

        return freeze(load_vqgan(p, config=config, prefix=prefix).eval())
    return freeze(_vq_from(load_module(p)))


class VQGANCodec(FrozenCodec):
    """A VQGAN as a ``LatentCodec`` (continuous pre-quantisation latents; decode quantises)."""

    def __init__(
        self, model: nn.Module, *, quantize_on_decode: bool = True, scale: float = 1.0, shift: float = 0.0
    ) -> None:
        model = _vq_from(model)
        ddconfig = model.encoder
        super().__init__(
            in_channels=ddconfig.in_channels,
            latent_channels=model.quant_conv.out_channels,
            downsample_factor=model.downsample_factor,
            scale=scale,
            shift=shift,
        )
        self.model = model
        self.quantize_on_decode = quantize_on_decode
        self.vocab_size = model.vocab_size  # token ids of encode_to_indices (n_embed, or the remapped size)
        self.freeze()

    def _encode(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model.encode_to_prequant(x)

    def _decode(self, z: Tensor) -> Tensor:
        if self.quantize_on_decode:
            z = self.model.quantize(z)[0]
        return self.model.decode(z)

    @torch.no_grad()
    def encode_to_indices(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> code indices (B, H/f, W/f)."""
        self._check_size(x.shape[-2], x.shape[-1])
        return self.model.encode_to_indices(x)

    def decode_indices(self, indices: Tensor) -> Tensor:
        return self.model.decode_code(indices)


def vqgan_codec(
    path: str | os.PathLike, *, config: str | os.PathLike | None = None, prefix: str | None = None, **kwargs: Any
) -> VQGANCodec:
    """Hydra target: ``{_target_: taming.first_stage.vqgan_codec, path: runs/vqgan/export}``."""
    return VQGANCodec(load_first_stage(path, config=config, prefix=prefix), **kwargs)
