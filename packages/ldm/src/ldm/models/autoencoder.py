"""KL-regularised first-stage autoencoder of Latent Diffusion (Rombach et al., CVPR 2022, arXiv 2112.10752).

Sec. 3.1 and App. G of the paper: an encoder E maps an image x (H×W×3) to a latent z = E(x) (h×w×c, h = H/f) and a
decoder D reconstructs x̃ = D(z). The "KL-reg." variant puts a slight KL penalty towards N(0, I) on the diagonal
Gaussian posterior q(z|x), as in a VAE; the diffusion model is trained on samples of q(z|x) (times a scale factor).
This module implements, with the official names of ``ldm/models/autoencoder.py`` so official checkpoints load with a
prefix strip:

- :class:`DiagonalGaussianDistribution` — q(z|x) from the ``2·embed_dim`` moments (mean, log-variance clamped to
  [-30, 20]); ``sample``, ``mode``, ``kl`` (summed over C, H, W) and ``nll`` (official ``distributions.py``);
- :class:`AutoencoderKL` — ``x → encoder → quant_conv → q(z|x)``, ``z → post_quant_conv → decoder``, pure torch. The
  encoder / decoder are taming's :class:`~taming.models.vqgan.Encoder` / :class:`~taming.models.vqgan.Decoder`
  (LDM's ``model.py`` copy of them, used with ``double_z=True``); the training loss lives in :mod:`ldm.losses`;
- presets :data:`AUTOENCODER_PRESETS` — the released kl-f4 / f8 (the Stable Diffusion VAE) / f16 / f32 configs
  (``models/first_stage_models/kl-*/config.yaml``), Fashion-MNIST toys and a unit-test size; :func:`build_autoencoder`.

The autoencoder as a frozen gencore ``LatentCodec`` (``KLCodec``, ``kl_codec``) is in :mod:`ldm.first_stage`, the
official-checkpoint and diffusers key maps in :mod:`ldm.convert`.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from taming.models.vqgan import Decoder, Encoder

__all__ = ["AUTOENCODER_PRESETS", "AutoencoderKL", "DiagonalGaussianDistribution", "build_autoencoder"]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# ------------------------------------------------------------------------------------------------ posterior


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from ``parameters`` = cat([mean, logvar], dim=1), (B, 2C, ...).

    ``logvar`` is clamped to [-30, 20] as officially; ``deterministic`` makes it a point mass (std 0, KL 0).
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        if not isinstance(parameters, Tensor) or parameters.dim() < 2 or parameters.shape[1] % 2:
            shape = tuple(parameters.shape) if isinstance(parameters, Tensor) else type(parameters).__name__
            raise ValueError(f"DiagonalGaussianDistribution needs (B, 2C, ...) moments, got {shape}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, ...) each
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def _dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.mean.dim()))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std·ε, ε ~ N(0, I) (reparameterised: gradients flow to mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) summed over all but the batch dim, (B,); ``other=None`` means N(0, I)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=self._dims())
        if other.mean.shape != self.mean.shape:
            raise ValueError(f"kl: shapes differ, {tuple(self.mean.shape)} vs {tuple(other.mean.shape)}")
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=self._dims(),
        )

    def nll(self, sample: Tensor, dims: Iterable[int] = (1, 2, 3)) -> Tensor:
        """−log N(sample; mean, var) summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

    def __repr__(self) -> str:
        return f"DiagonalGaussianDistribution(shape={tuple(self.mean.shape)}, deterministic={self.deterministic})"


# ------------------------------------------------------------------------------------------------ the model

_DD_REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels")


def _kl_ddconfig(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(ddconfig, Mapping):
        raise ValueError(f"ddconfig must be a mapping, got {type(ddconfig).__name__}")
    dd = dict(ddconfig)
    missing = [k for k in _DD_REQUIRED if k not in dd]
    if missing:
        raise ValueError(f"ddconfig lacks {missing}")
    if not dd.setdefault("double_z", True):
        raise ValueError("AutoencoderKL needs ddconfig double_z=True (the encoder outputs mean and log-variance)")
    if dd.pop("use_linear_attn", False):
        raise ValueError("ddconfig use_linear_attn=True (LDM's linear attention) is not implemented")
    dd["ch_mult"] = tuple(dd.get("ch_mult", (1, 2, 4, 8)))
    dd["attn_resolutions"] = tuple(dd["attn_resolutions"])
    return dd


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder (official ``ldm.models.autoencoder.AutoencoderKL`` without the Lightning and
    loss parts).

    Args:
        ddconfig: Encoder / Decoder arguments (official ``ddconfig``; ``double_z`` must be True, the default here).
        embed_dim: latent channels c; ``quant_conv`` maps the 2·z_channels encoder output to 2·embed_dim moments,
            ``post_quant_conv`` maps embed_dim back to z_channels.

    ``encode(x)`` returns the posterior :class:`DiagonalGaussianDistribution`; LDM trains on ``posterior.sample()``.
    State-dict keys are the official ones without ``loss.*`` (e.g. ``encoder.down.0.block.0.conv1.weight``).
    """

    def __init__(self, *, ddconfig: Mapping[str, Any], embed_dim: int) -> None:
        super().__init__()
        dd = _kl_ddconfig(ddconfig)
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.ddconfig, self.embed_dim = dd, int(embed_dim)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quant_conv = nn.Conv2d(2 * dd["z_channels"], 2 * self.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.embed_dim, dd["z_channels"], 1)

    @property
    def downsample_factor(self) -> int:
        """f = 2^(number of levels − 1): an H×W image gives (H/f)×(W/f) latents."""
        return 2 ** (self.encoder.num_resolutions - 1)

    @property
    def in_channels(self) -> int:
        return self.encoder.in_channels

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def latent_shape(self, h: int, w: int) -> tuple[int, int, int]:
        """(embed_dim, h/f, w/f) for an h×w image."""
        f = self.downsample_factor
        if h < 1 or w < 1 or h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of the downsampling factor {f}")
        return self.embed_dim, h // f, w // f

    def get_last_layer(self) -> Tensor:
        """The decoder's last conv weight: the adaptive GAN weight of :class:`ldm.losses.LPIPSWithDiscriminator`."""
        return self.decoder.conv_out.weight

    def _check_images(self, x: Tensor) -> None:
        c, f = self.in_channels, self.downsample_factor
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"AutoencoderKL.encode expects images (B, {c}, H, W), got {shape}")
        if x.shape[1] != c:
            raise ValueError(f"AutoencoderKL.encode expects {c} image channels, got {x.shape[1]}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the downsampling factor {f}")

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """q(z|x) for images (B, in_channels, H, W); its mean / logvar are (B, embed_dim, H/f, W/f)."""
        self._check_images(x)
        moments = self.quant_conv(self.encoder(x))  # (B, 2·embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, out_ch, H, W) from latents (B, embed_dim, h, w) (unscaled: divide by the scale factor first)."""
        if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != self.embed_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"AutoencoderKL.decode expects latents (B, {self.embed_dim}, h, w), got {shape}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior); the reconstruction decodes a sample of q(z|x), or its mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# ------------------------------------------------------------------------------------------------------ presets


def _dd(**kw: Any) -> dict[str, Any]:
    base = dict(double_z=True, in_channels=3, out_ch=3, resolution=256, ch=128, num_res_blocks=2, dropout=0.0)
    return {**base, **kw}


def _fmnist(z: int) -> dict[str, Any]:
    dd = _dd(in_channels=1, out_ch=1, resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[])
    return dict(ddconfig={**dd, "z_channels": z}, embed_dim=z)


AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # models/first_stage_models/kl-f*/config.yaml (all: ch 128, 2 res blocks, resolution 256)
    "kl_f4": dict(ddconfig=_dd(z_channels=3, ch_mult=[1, 2, 4], attn_resolutions=[]), embed_dim=3),
    # the Stable Diffusion v1 / v2 VAE (latents scaled by 0.18215 there)
    "kl_f8": dict(ddconfig=_dd(z_channels=4, ch_mult=[1, 2, 4, 4], attn_resolutions=[]), embed_dim=4),
    "kl_f16": dict(ddconfig=_dd(z_channels=16, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16]), embed_dim=16),
    "kl_f32": dict(ddconfig=_dd(z_channels=64, ch_mult=[1, 1, 2, 2, 4, 4], attn_resolutions=[16, 8]), embed_dim=64),
    # Fashion-MNIST toys: 32x32 grey images -> 4 x 8 x 8 latents, and 16 channels for sd3_flow's toy runs
    "fmnist_kl_f4": _fmnist(4),
    "fmnist_kl_f4_c16": _fmnist(16),
    # unit tests / parity (ldm.md reference config, 182 state-dict keys): 32x32 RGB -> 4 x 8 x 8, attention at 8x8
    "tiny": dict(
        ddconfig=_dd(resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=4),
        embed_dim=4,
    ),
}


def build_autoencoder(
    preset: str | None = None, *, init_from: str | os.PathLike | None = None, **overrides: Any
) -> AutoencoderKL:
    """An :class:`AutoencoderKL` from a preset of :data:`AUTOENCODER_PRESETS` plus keyword overrides.

    ``ddconfig`` overrides are merged into the preset's (``build_autoencoder("tiny", ddconfig={"in_channels": 1,
    "out_ch": 1})``); without a preset, ``ddconfig`` and ``embed_dim`` are required. ``init_from`` starts from the
    weights of another KL autoencoder of the same shape (a genlab export / run folder / ``pkg://`` checkpoint /
    official ``.ckpt``: :func:`ldm.first_stage.load_kl_first_stage`), e.g. to fine-tune a shipped one on new data; a
    checkpoint of another shape is a ValueError naming the mismatched tensors.
    """
    if preset is None:
        kwargs: dict[str, Any] = {}
    elif preset in AUTOENCODER_PRESETS:
        kwargs = copy.deepcopy(AUTOENCODER_PRESETS[preset])
    else:
        raise ValueError(f"unknown AutoencoderKL preset {preset!r}; choose from {sorted(AUTOENCODER_PRESETS)}")
    overrides = copy.deepcopy(overrides)
    if "ddconfig" in overrides:
        kwargs["ddconfig"] = {**kwargs.get("ddconfig", {}), **dict(overrides.pop("ddconfig"))}
    kwargs.update(overrides)
    if "ddconfig" not in kwargs or "embed_dim" not in kwargs:
        raise ValueError("build_autoencoder needs a preset, or both ddconfig and embed_dim")
    model = AutoencoderKL(**kwargs)
    if init_from is not None:
        _init_from(model, init_from, preset)
    return model


def _init_from(model: AutoencoderKL, path: str | os.PathLike, preset: str | None) -> None:
    from gencore.io import resolve_path
    from ldm.first_stage import load_kl_first_stage  # (imports this module)

    if not resolve_path(path).exists():
        raise FileNotFoundError(f"build_autoencoder: init_from={path} not found")
    source, _ = load_kl_first_stage(path)
    ours, theirs = model.state_dict(), source.state_dict()
    bad = sorted(k for k in ours if k not in theirs or theirs[k].shape != ours[k].shape)
    extra = sorted(set(theirs) - set(ours))
    if bad or extra:
        raise ValueError(
            f"build_autoencoder: init_from={path} is not a {preset or 'KL'} autoencoder of this shape ({len(bad)} "
            f"missing / mismatched tensors, {len(extra)} unexpected, e.g. {(bad or extra)[:3]})"
        )
    model.load_state_dict(theirs)


# ------------------------------------------------------------------------------- names that moved to first_stage

_MOVED = ("KLCodec", "kl_codec", "load_kl_first_stage")


def __getattr__(name: str) -> Any:
    """``KLCodec``, ``kl_codec`` and ``load_kl_first_stage`` live in :mod:`ldm.first_stage` (checkpoint loading stays
    out of the model files); configs written before name ``ldm.models.autoencoder.kl_codec`` as a target, so the
    names resolve here too, imported on first use (not when this module loads)."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module("ldm.first_stage"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
