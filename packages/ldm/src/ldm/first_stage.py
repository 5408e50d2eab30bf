"""LDM's KL autoencoder as a first stage: the frozen gencore codec and its loaders (Rombach et al., CVPR 2022).

A latent diffusion model trains on ``scale · z`` with z a sample (training) or the mode of the frozen autoencoder's
posterior q(z|x) (Sec. 3.1, App. G). This module turns an :class:`~ldm.models.autoencoder.AutoencoderKL` into a
gencore ``LatentCodec`` and finds one on disk; the network itself (:mod:`ldm.models.autoencoder`) never touches paths.

- :class:`KLCodec` — the autoencoder as a frozen ``FrozenCodec`` (posterior mode or sample, ``scale`` / ``shift``);
- :func:`load_kl_first_stage` — (autoencoder, stored scale) from a genlab export / run folder / ``.ckpt`` or an
  official LDM / Stable Diffusion checkpoint (:func:`ldm.convert.load_autoencoder`);
- :func:`kl_codec` — the Hydra target ``{_target_: ldm.first_stage.kl_codec, path: ...}`` of the diffusion recipes
  (``ldm.models.autoencoder.kl_codec``, the name older configs use, resolves to it).

VQ first stages are taming's (:mod:`taming.first_stage`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from gencore.io import extract_state_dict, load_checkpoint, resolve_path
from gencore.latents import FrozenCodec, estimate_scale
from ldm.convert import load_autoencoder, scale_factor_from
from ldm.models.autoencoder import AutoencoderKL

__all__ = ["KLCodec", "kl_codec", "load_kl_first_stage"]


def _ae_from(module: nn.Module) -> AutoencoderKL:
    model = getattr(module, "model", module)  # a LightningModule holds the autoencoder as .model
    if not all(hasattr(model, a) for a in ("encoder", "decoder", "quant_conv", "post_quant_conv", "embed_dim")):
        raise ValueError(f"{type(module).__name__} is not a KL autoencoder (no encoder / quant_conv / embed_dim)")
    if hasattr(model, "quantize"):
        raise ValueError(f"{type(model).__name__} is a VQ model: use taming.first_stage.VQGANCodec")
    return model


class KLCodec(FrozenCodec):
    """An :class:`AutoencoderKL` as a frozen gencore ``LatentCodec``: ``encode(x) = (z − shift)·scale`` with z the
    posterior mode (default) or a sample (``sample_posterior=True``, LDM's training encoding); ``decode`` inverts the
    scaling and decodes.

    The wrapped model is frozen in place; use :meth:`from_autoencoder` to freeze a copy of a model still training.
    ``scale`` 1.0 is the default (all LDM configs but SD's 0.18215); :func:`gencore.latents.estimate_scale` sets
    1/std of the latents (LDM's ``scale_by_std``).
    """

    def __init__(
        self, model: nn.Module, *, sample_posterior: bool = False, scale: float = 1.0, shift: float = 0.0
    ) -> None:
        model = _ae_from(model)
        super().__init__(
            in_channels=model.encoder.in_channels,
            latent_channels=model.embed_dim,
            downsample_factor=2 ** (model.encoder.num_resolutions - 1),
            scale=scale,
            shift=shift,
        )
        self.model = model
        self.sample_posterior = bool(sample_posterior)
        self.freeze()

    @classmethod
    def from_autoencoder(
        cls,
        ae: nn.Module,
        scale: float | None = None,
        *,
        shift: float = 0.0,
        sample_posterior: bool = False,
        images: Tensor | Iterable[Tensor] | None = None,
    ) -> KLCodec:
        """A codec over a frozen deep copy of ``ae`` (an AutoencoderKL or a module with ``.model``), which stays
        trainable. ``scale=None``: 1/std of the latents of ``images`` when given (:func:`estimate_scale`), else 1.0.
        """
        codec = cls(
            copy.deepcopy(_ae_from(ae)),
            sample_posterior=sample_posterior,
            scale=1.0 if scale is None else scale,
            shift=shift,
        )
        if scale is None and images is not None:
            estimate_scale(codec, images)
        return codec

    def _encode(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            posterior = self.model.encode(x)
            return posterior.sample() if self.sample_posterior else posterior.mode()

    def _decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z)


def load_kl_first_stage(
    path: str | os.PathLike | None,
    *,
    config: Any = None,
    preset: str | None = None,
    prefix: str | None = None,
) -> tuple[AutoencoderKL, float | None]:
    """(eval-mode autoencoder, scale factor found in the checkpoint / config or None) from a genlab export or run
    folder, a genlab Lightning ``.ckpt``, or an official LDM / Stable Diffusion ``.ckpt`` / ``.safetensors``.

    Official files are recognised by ``encoder.*`` or ``first_stage_model.encoder.*`` keys (or an explicit
    ``prefix``); ``config`` / ``preset`` / ``prefix`` are passed to :func:`ldm.convert.load_autoencoder`.
    The scale is the root ``scale_factor`` buffer (LDM ``scale_by_std``) or ``model.params.scale_factor`` of
    ``config``.
    """
    from gencore.run import load_module

    if path is None:
        raise ValueError("no first stage given: pass the autoencoder (first_stage=<run folder | export | .ckpt>)")
    p = resolve_path(path)
    if not p.exists():
        raise FileNotFoundError(f"KL first stage not found: {p}")
    if p.is_dir():
        return _ae_from(load_module(p)).eval(), None
    ckpt = load_checkpoint(p)
    state = extract_state_dict(ckpt)
    official = prefix is not None or any(k.startswith(("encoder.", "first_stage_model.encoder.")) for k in state)
    if not official:
        return _ae_from(load_module(p)).eval(), None
    model = load_autoencoder(ckpt, config=config, preset=preset, prefix=prefix)
    return model, scale_factor_from(state, config)


def kl_codec(
    path: str | os.PathLike,
    *,
    config: Any = None,
    preset: str | None = None,
    prefix: str | None = None,
    scale: float | None = None,
    shift: float = 0.0,
    sample_posterior: bool = False,
) -> KLCodec:
    """Hydra target ``{_target_: ldm.first_stage.kl_codec, path: runs/kl_f4/export}``: a :class:`KLCodec`
    from a genlab export / run folder or an official ``.ckpt`` (see :func:`load_kl_first_stage`).

    ``scale=None`` takes the scale stored with an official checkpoint (``scale_factor`` buffer or config), else 1.0;
    for the Stable Diffusion VAE pass ``scale=0.18215`` (SD's config value) unless its yaml is given as ``config``.
    """
    model, found = load_kl_first_stage(path, config=config, preset=preset, prefix=prefix)
    if scale is None:
        scale = found if found is not None else 1.0
    return KLCodec(model, sample_posterior=sample_posterior, scale=scale, shift=shift)
