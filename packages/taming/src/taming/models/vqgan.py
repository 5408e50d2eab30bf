"""VQGAN of Taming Transformers (Esser, Rombach, Ommer, CVPR 2021, arXiv 2012.09841), with the official names.

Section 3.1 of the paper: a convolutional encoder E maps an image x (H×W) to ẑ (h×w×n_z, h = H/f), an element-wise
quantiser q(·) replaces each vector by its nearest codebook entry, and a decoder G reconstructs x̂ = G(z_q). The
encoder / decoder (Sec. 3.1 and App. Tab. 7) are the DDPM-style ResNet stacks of
``taming/modules/diffusionmodules/model.py``:

- helpers: :func:`Normalize` (GroupNorm 32 groups, eps 1e-6), :func:`nonlinearity` (swish);
- blocks: :class:`Upsample`, :class:`Downsample` (asymmetric pad (0,1,0,1) + 3x3 stride-2 conv),
  :class:`ResnetBlock`, :class:`AttnBlock` (single-head self-attention over the h·w positions, computed with
  :func:`gencore.attention.attention`);
- :class:`Encoder` / :class:`Decoder` (``attn_type`` "vanilla" | "none", as in LDM's copy, which reuses them for its
  KL autoencoder with ``double_z=True``); ``decoder.up[i]`` is indexed by resolution level, ``up[0]`` = full size;
- the model: :class:`VQModel` (``encoder → quant_conv → quantize → post_quant_conv → decoder``, official
  ``taming/models/vqgan.py``) and :class:`GumbelVQ` (the Gumbel-softmax variant of the released f8 model);
- presets: :data:`VQGAN_PRESETS` (published configs and Fashion-MNIST toy sizes) and :func:`build_vqmodel`.

State-dict keys equal the official ones (``encoder.down.0.block.0.conv1.weight``, ``quantize.embedding.weight``, …)
minus the training-only ``loss.*`` entries, so official checkpoints load with a strict prefix strip
(:func:`taming.convert.load_vqgan`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.attention import attention
from gencore.modules import upsample_nearest_2x
from taming.models.quantize import (
    GumbelQuantize,
    LambdaWarmUpCosineScheduler,
    RemapSpec,
    VectorQuantizer,
    _check_indices,
)

__all__ = [
    "GUMBEL_PRESETS",
    "VQGAN_PRESETS",
    "AttnBlock",
    "Decoder",
    "Downsample",
    "Encoder",
    "GumbelVQ",
    "Normalize",
    "ResnetBlock",
    "Upsample",
    "VQModel",
    "build_vqmodel",
    "make_attn",
    "nonlinearity",
]

ATTN_TYPES = ("vanilla", "none")


# ------------------------------------------------------------------------------------------------------ helpers


def nonlinearity(x: Tensor) -> Tensor:
    """swish, x·σ(x) (= SiLU)."""
    return F.silu(x)


swish = nonlinearity


def Normalize(in_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6 (LDM's UNet uses 1e-5: a classic parity trap)."""
    if in_channels % 32:
        raise ValueError(f"GroupNorm(32) needs a channel count divisible by 32, got {in_channels}")
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def _check_attn_type(attn_type: str) -> None:
    if attn_type not in ATTN_TYPES:
        hint = " (linear attention of LDM is not implemented)" if attn_type == "linear" else ""
        raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}{hint}")


# ------------------------------------------------------------------------------------------------------- blocks


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3x3 conv when ``with_conv``."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = upsample_nearest_2x(x)  # (B, C, 2H, 2W), same values as F.interpolate(nearest), faster on CPU
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a 3x3 stride-2 conv (no padding); 2x2 average pooling without a conv."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # torch convs pad symmetrically only
            return self.conv(x)  # (B, C, H/2, W/2)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm1 → swish → conv1 (+ temb_proj) → norm2 → swish → dropout → conv2, plus a (1x1 or 3x3) shortcut."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels, self.use_conv_shortcut = in_channels, out_channels, conv_shortcut
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))  # (B, C_out, H, W)
        if temb is not None:
            if not hasattr(self, "temb_proj"):
                raise ValueError("ResnetBlock built with temb_channels=0 got a time embedding")
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h·w positions: 1x1 convs q, k, v, proj_out; scale C^-0.5; residual."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # the 1x1 convs applied as matmuls on (B, hw, C) tokens: same parameters, no strided conv inputs
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, hw, C)
        q, k, v = (F.linear(tokens, f.weight.flatten(1), f.bias)[:, None] for f in (self.q, self.k, self.v))
        out = attention(q, k, v, scale=c**-0.5)[:, 0]  # (B, hw, C)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, hw, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """:class:`AttnBlock` for "vanilla", ``nn.Identity`` (no parameters) for "none" (LDM's ``make_attn``)."""
    _check_attn_type(attn_type)
    return AttnBlock(in_channels) if attn_type == "vanilla" else nn.Identity()


def _check_ddconfig(ch: int, ch_mult: Sequence[int], num_res_blocks: int, resolution: int, dropout: float) -> None:
    if ch < 1 or not ch_mult or any(m < 1 for m in ch_mult):
        raise ValueError(f"ch must be >= 1 and ch_mult a non-empty list of positive ints, got ch={ch}, {ch_mult}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


# ------------------------------------------------------------------------------------------ encoder / decoder


class Encoder(nn.Module):
    """E: conv_in → per level ``num_res_blocks`` × ResnetBlock (+ AttnBlock where the feature map size is in
    ``attn_resolutions``) → Downsample (all levels but the last) → mid (Res, Attn, Res) → norm_out, swish → conv_out
    (``2·z_channels`` with ``double_z``). Output (B, z, H/f, W/f) with f = 2^(len(ch_mult)−1)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        attn_type: str = "vanilla",
        **ignore: Any,
    ) -> None:
        super().__init__()
        _check_ddconfig(ch, ch_mult, num_res_blocks, resolution, dropout)
        _check_attn_type(attn_type)
        self.ch, self.temb_ch = ch, 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels, self.z_channels = resolution, in_channels, z_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *tuple(ch_mult))
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(
                    ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)  # present even with attn_resolutions = []
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Encoder expects (B, {self.in_channels}, H, W) images, got shape {tuple(x.shape)}")
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)  # (B, C, H/2, W/2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, z or 2z, H/f, W/f)


class Decoder(nn.Module):
    """G: conv_in (z → ch·ch_mult[-1]) → mid (Res, Attn, Res) → levels from low to high resolution, each
    ``num_res_blocks + 1`` ResnetBlocks (+ AttnBlock) and an Upsample (all but the full-resolution level) → norm_out,
    swish → conv_out. ``up[i_level]`` is stored by resolution level (``up[0]`` = full resolution) although it runs
    last. ``give_pre_end`` returns the features before norm_out; ``tanh_out`` squashes the output (LDM options)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attn_type: str = "vanilla",
        **ignore: Any,
    ) -> None:
        super().__init__()
        _check_ddconfig(ch, ch_mult, num_res_blocks, resolution, dropout)
        _check_attn_type(attn_type)
        self.ch, self.temb_ch = ch, 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels, self.out_ch = resolution, in_channels, out_ch
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)

        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(
                    ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0, dropout=dropout)
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            ups.insert(0, up)  # index by resolution level
        self.up = nn.ModuleList(ups)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 4 or z.shape[1] != self.conv_in.in_channels:
            raise ValueError(f"Decoder expects (B, {self.conv_in.in_channels}, h, w) latents, got {tuple(z.shape)}")
        h = self.conv_in(z)  # (B, ch·ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)  # (B, C, 2h, 2w)
        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity(self.norm_out(h)))  # (B, out_ch, H, W)
        return torch.tanh(h) if self.tanh_out else h


# --------------------------------------------------------------------------------------------------- the model


def _vq_ddconfig(ddconfig: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(ddconfig, Mapping):
        raise ValueError(f"ddconfig must be a mapping, got {type(ddconfig).__name__}")
    dd = dict(ddconfig)
    missing = [
        k
        for k in ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels")
        if k not in dd
    ]
    if missing:
        raise ValueError(f"ddconfig lacks {missing}")
    if dd.setdefault("double_z", False):
        raise ValueError("a VQ model needs ddconfig double_z=False (double_z=True is for the KL autoencoder)")
    dd["ch_mult"] = tuple(dd.get("ch_mult", (1, 2, 4, 8)))
    dd["attn_resolutions"] = tuple(dd["attn_resolutions"])
    return dd


class VQModel(nn.Module):
    """VQGAN autoencoder: ``x → encoder → quant_conv → quantize → post_quant_conv → decoder → x̂``.

    Args:
        ddconfig: Encoder / Decoder arguments (official ``ddconfig``; ``double_z`` must be False, the default here).
        n_embed: codebook size; embed_dim: code dimension.
        remap, unknown_index, sane_index_shape, beta, legacy, restart_unused_after: passed to
            :class:`VectorQuantizer` (``restart_unused_after`` > 0 restarts dead codes; off in the official model).

    ``encode`` returns ``(quant, emb_loss, (perplexity, None, indices))`` like the official model (indices flat unless
    ``sane_index_shape``); ``encode_to_indices`` always gives (B, h, w).
    """

    def __init__(
        self,
        *,
        ddconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        remap: RemapSpec = None,
        sane_index_shape: bool = False,
        beta: float = 0.25,
        legacy: bool = True,
        unknown_index: str | int = "random",
        restart_unused_after: int = 0,
    ) -> None:
        super().__init__()
        dd = _vq_ddconfig(ddconfig)
        quantize = VectorQuantizer(
            n_embed,
            embed_dim,
            beta=beta,
            remap=remap,
            unknown_index=unknown_index,
            sane_index_shape=sane_index_shape,
            legacy=legacy,
            restart_unused_after=restart_unused_after,
        )
        self._build(dd, embed_dim, quantize)

    def _build(self, dd: dict[str, Any], embed_dim: int, quantize: nn.Module) -> None:
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        self.ddconfig, self.embed_dim = dd, embed_dim
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = quantize
        self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)

    # -------------------------------------------------------------------------------------------- properties

    @property
    def downsample_factor(self) -> int:
        """f = 2^(number of levels − 1): an H×W image gives an (H/f)×(W/f) grid of codes."""
        return 2 ** (self.encoder.num_resolutions - 1)

    @property
    def n_embed(self) -> int:
        """Number of codebook entries."""
        return self.quantize.codebook_size

    @property
    def vocab_size(self) -> int:
        """Size of the index space of ``encode_to_indices`` / ``decode_code`` (n_embed, or the remapped size)."""
        return self.quantize.re_embed

    def latent_shape(self, h: int, w: int) -> tuple[int, int, int]:
        """(embed_dim, h/f, w/f) for an h×w image; the token grid is ``latent_shape(h, w)[1:]``."""
        f = self.downsample_factor
        if h < 1 or w < 1 or h % f or w % f:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of the downsampling factor {f}")
        return self.embed_dim, h // f, w // f

    def get_last_layer(self) -> Tensor:
        """The decoder's last conv weight (the adaptive GAN weight of the loss is computed on it)."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------------------------------ encode / decode

    def _check_images(self, x: Tensor) -> None:
        c, f = self.encoder.in_channels, self.downsample_factor
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected images of shape (B, {c}, H, W), got {shape}")
        if x.shape[1] != c:
            raise ValueError(f"expected {c} image channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the downsampling factor {f}")

    def encode_to_prequant(self, x: Tensor) -> Tensor:
        """``quant_conv(encoder(x))``: continuous latents before quantisation (B, embed_dim, h, w)."""
        self._check_images(x)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """(quant (B, embed_dim, h, w), codebook loss, (perplexity, None, indices))."""
        return self.quantize(self.encode_to_prequant(x))

    @torch.no_grad()
    def encode_to_indices(self, x: Tensor) -> Tensor:
        """Code indices (B, h, w), long (in the remapped space if ``remap``)."""
        quant, _, info = self.encode(x)
        return info[2].reshape(quant.shape[0], quant.shape[2], quant.shape[3]).long()

    def decode(self, quant: Tensor) -> Tensor:
        """Images (B, out_ch, H, W) from quantised latents (B, embed_dim, h, w)."""
        if quant.dim() != 4 or quant.shape[1] != self.embed_dim:
            raise ValueError(f"decode expects latents (B, {self.embed_dim}, h, w), got shape {tuple(quant.shape)}")
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: Tensor) -> Tensor:
        """Images from code indices (B, h, w)."""
        if not isinstance(indices, Tensor) or indices.dim() != 3:
            shape = tuple(indices.shape) if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"decode_code expects indices of shape (B, h, w), got {shape}")
        _check_indices(indices, self.vocab_size, "decode_code: indices")
        b, h, w = indices.shape
        quant = self.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, self.embed_dim))  # (B, D, h, w)
        return self.decode(quant)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction, codebook loss)."""
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff


class GumbelVQ(VQModel):
    """VQGAN with a :class:`GumbelQuantize` (released ``vqgan_gumbel_f8``).

    As officially, ``quant_conv`` (z → embed_dim) stays in front of the quantiser, whose ``proj`` is built for
    ``z_channels`` inputs; both agree only when ``embed_dim == z_channels`` (true for the release), so other values
    are refused. ``temperature`` is settable per step; ``temperature_scheduling(step)`` applies
    ``temperature_schedule`` (a :class:`LambdaWarmUpCosineScheduler` or its keyword arguments).
    """

    def __init__(
        self,
        *,
        ddconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        kl_weight: float = 1e-8,
        temperature_schedule: LambdaWarmUpCosineScheduler | Mapping[str, Any] | None = None,
        temp_init: float = 1.0,
        straight_through: bool = True,
        remap: RemapSpec = None,
        unknown_index: str | int = "random",
    ) -> None:
        nn.Module.__init__(self)
        dd = _vq_ddconfig(ddconfig)
        if embed_dim != dd["z_channels"]:
            raise ValueError(
                f"GumbelVQ needs embed_dim == z_channels (the official proj takes z_channels inputs after quant_conv), "
                f"got embed_dim={embed_dim}, z_channels={dd['z_channels']}"
            )
        quantize = GumbelQuantize(
            dd["z_channels"],
            embed_dim,
            n_embed,
            straight_through=straight_through,
            kl_weight=kl_weight,
            temp_init=temp_init,
            remap=remap,
            unknown_index=unknown_index,
        )
        self._build(dd, embed_dim, quantize)
        if isinstance(temperature_schedule, Mapping):
            temperature_schedule = LambdaWarmUpCosineScheduler(**temperature_schedule)
        self.temperature_schedule = temperature_schedule

    @property
    def temperature(self) -> float:
        return self.quantize.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"Gumbel temperature must be > 0, got {value}")
        self.quantize.temperature = float(value)

    def temperature_scheduling(self, step: int) -> float:
        """Set the temperature for training step ``step`` from ``temperature_schedule``; returns it."""
        if self.temperature_schedule is None:
            raise ValueError("GumbelVQ has no temperature_schedule; set .temperature directly")
        self.temperature = self.temperature_schedule(step)
        return self.temperature


# ------------------------------------------------------------------------------------------------------ presets


def _dd(**kw: Any) -> dict[str, Any]:
    base = dict(double_z=False, in_channels=3, out_ch=3, dropout=0.0)
    return {**base, **kw}


_F16 = _dd(z_channels=256, resolution=256, ch=128, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16])

VQGAN_PRESETS: dict[str, dict[str, Any]] = {
    # configs/imagenet_vqgan.yaml (also faceshq / custom): the paper's f16 VQGAN with 1024 codes
    "imagenet_f16_1024": dict(ddconfig=dict(_F16), n_embed=1024, embed_dim=256),
    # released "ImageNet f16 16384" model: same layout, 16384 codes
    "imagenet_f16_16384": dict(ddconfig=dict(_F16), n_embed=16384, embed_dim=256),
    # released vqgan_gumbel_f8 (project.yaml): GumbelVQ, 8192 codes, temperature 0.9 -> 1e-6 over 1M steps
    "gumbel_f8_8192": dict(
        ddconfig=_dd(
            z_channels=256, resolution=256, ch=128, ch_mult=[1, 1, 2, 4], num_res_blocks=2, attn_resolutions=[32]
        ),
        n_embed=8192,
        embed_dim=256,
        kl_weight=1e-8,
        temperature_schedule=dict(warm_up_steps=0, max_decay_steps=1_000_001, lr_start=0.9, lr_max=0.9, lr_min=1e-6),
    ),
    # Fashion-MNIST toy: 32x32 grey images -> 8x8 codes
    "fmnist_f4": dict(
        ddconfig=_dd(
            in_channels=1,
            out_ch=1,
            resolution=32,
            ch=32,
            ch_mult=[1, 2, 2],
            num_res_blocks=1,
            attn_resolutions=[8],
            z_channels=64,
        ),
        n_embed=512,
        embed_dim=64,
    ),
    # unit tests: 16x16 grey images -> 8x8 codes
    "tiny": dict(
        ddconfig=_dd(
            in_channels=1,
            out_ch=1,
            resolution=16,
            ch=32,
            ch_mult=[1, 2],
            num_res_blocks=1,
            attn_resolutions=[8],
            z_channels=16,
        ),
        n_embed=64,
        embed_dim=16,
    ),
}

GUMBEL_PRESETS = frozenset({"gumbel_f8_8192"})


def build_vqmodel(preset: str | None = None, *, gumbel: bool | None = None, **overrides: Any) -> VQModel:
    """A :class:`VQModel` (or :class:`GumbelVQ`) from a preset of :data:`VQGAN_PRESETS` plus keyword overrides.

    ``ddconfig`` overrides are merged into the preset's ddconfig (``build_vqmodel("tiny", ddconfig={"ch": 64})``).
    ``gumbel`` picks the class; by default GumbelVQ for the presets in :data:`GUMBEL_PRESETS`.
    """
    if preset is None:
        kwargs: dict[str, Any] = {}
    elif preset in VQGAN_PRESETS:
        kwargs = copy.deepcopy(VQGAN_PRESETS[preset])
    else:
        raise ValueError(f"unknown VQGAN preset {preset!r}; choose from {sorted(VQGAN_PRESETS)}")
    overrides = copy.deepcopy(overrides)
    if "ddconfig" in overrides:
        kwargs["ddconfig"] = {**kwargs.get("ddconfig", {}), **dict(overrides.pop("ddconfig"))}
    kwargs.update(overrides)
    if "ddconfig" not in kwargs:
        raise ValueError("build_vqmodel needs a preset or a ddconfig")
    use_gumbel = (preset in GUMBEL_PRESETS) if gumbel is None else gumbel
    return GumbelVQ(**kwargs) if use_gumbel else VQModel(**kwargs)
