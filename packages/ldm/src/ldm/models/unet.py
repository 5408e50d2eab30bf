"""The conditional denoising UNet of Latent Diffusion (Rombach, Blattmann, Lorenz, Esser, Ommer, CVPR 2022,
arXiv 2112.10752), with the official parameter names of ``ldm/modules/diffusionmodules/openaimodel.py`` and
``ldm/modules/attention.py`` (CompVis/latent-diffusion a506df57; identical in CompVis/stable-diffusion).

The network is ε_θ(z_t, t, τ_θ(y)) of Eq. (1)/(2) (unconditional) and Eq. (3) (conditional LDM objective
E‖ε − ε_θ(z_t, t, τ_θ(y))‖²): the ADM UNet of Dhariwal & Nichol (time-conditioned ResBlocks, self-attention at
chosen downsampling rates) whose attention layers are optionally replaced by the cross-attention transformer of
Sec. 3.3 / Fig. 3, Attention(Q, K, V) = softmax(QKᵀ/√d)·V with Q = W_Q·φ_i(z_t), K = W_K·τ_θ(y), V = W_V·τ_θ(y).

- helpers: :func:`timestep_embedding` (sinusoidal, **cos first, then sin**), :class:`GroupNorm32` (32 groups,
  eps 1e-5, computed in fp32), :func:`zero_module`, :func:`attention_heads` (the official per-level head arithmetic,
  ``legacy`` flag included);
- blocks: :class:`TimestepEmbedSequential`, :class:`ResBlock` (``in_layers``, ``emb_layers``, ``out_layers``,
  ``skip_connection``; FiLM with ``use_scale_shift_norm``; up / down variants), :class:`Downsample` (``op``),
  :class:`Upsample` (``conv``), :class:`AttentionBlock` (``norm``, ``qkv`` Conv1d, ``proj_out``; legacy or new QKV
  order), and the Sec. 3.3 transformer: :class:`CrossAttention` (``to_q/to_k/to_v`` without bias, ``to_out.0``),
  :class:`GEGLU`, :class:`FeedForward`, :class:`BasicTransformerBlock`, :class:`SpatialTransformer` (GroupNorm eps
  1e-6, ``proj_in`` / ``proj_out`` 1x1 convs, or linear layers with ``use_linear`` as in Stable Diffusion 2);
- the model: :class:`UNetModel` (``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``,
  ``output_blocks``, ``out``), ``forward(x, timesteps, context=None, y=None)``;
- presets: :data:`UNET_PRESETS` (published configs from the official yamls, Fashion-MNIST toy sizes, the benchmark
  and the unit-test size) and :func:`unet_from_preset`.

Every attention (AttentionBlock and both attentions of the transformer) is one :func:`gencore.attention.attention`
call. The official code scales q and k each by ch^-1/4 in QKVAttentionLegacy; that is one call with scale ch^-1/2.
Zero-initialised layers are the official ones: ``out.2``, every ResBlock's ``out_layers.3``, AttentionBlock and
SpatialTransformer ``proj_out``.

Differences from the official module (none changes outputs or state-dict keys): gradient checkpointing uses
``torch.utils.checkpoint`` and follows ``use_checkpoint`` for every block (the official code always checkpoints
AttentionBlock and BasicTransformerBlock); ``dims`` must be 2; ``n_embed`` (codebook-id prediction) and
``use_fp16`` are refused (use autocast / ``.half()``); inputs are validated with ``ValueError``; the extra keyword
``use_linear_in_transformer`` is Stable Diffusion 2's linear ``proj_in`` / ``proj_out``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gencore.attention import attention
from gencore.modules import upsample_nearest_2x

__all__ = [
    "GEGLU",
    "UNET_PRESETS",
    "AttentionBlock",
    "BasicTransformerBlock",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "GroupNorm32",
    "ResBlock",
    "SpatialTransformer",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
    "attention_heads",
    "timestep_embedding",
    "unet_from_preset",
    "zero_module",
]


# ------------------------------------------------------------------------------------------------------ helpers


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): [cos(t·f_i), sin(t·f_i)], f_i = exp(-ln(max_period)·i/half).

    Cos first, then sin (= diffusers ``flip_sin_to_cos=True, freq_shift=0``); odd ``dim`` gets a zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )  # (half,)
    args = timesteps[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2·half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """The UNet's ``normalization()``: GroupNorm(32, C), eps 1e-5 (torch default), computed in float32."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm32: channels {num_channels} must be a multiple of {num_groups} groups")
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (the official zero-init of residual output layers)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def attention_heads(
    ch: int, *, num_heads: int, num_head_channels: int, legacy: bool, use_spatial_transformer: bool
) -> tuple[int, int]:
    """(num_heads, dim_head) that the official ``UNetModel.__init__`` passes to an attention layer at width ``ch``.

    ``num_head_channels == -1``: ``dim_head = ch // num_heads``; else ``num_heads = ch // num_head_channels`` and
    ``dim_head = num_head_channels``, where ``num_head_channels`` must divide ``ch`` (the official code floors and
    silently attends over fewer channels; no released config does that). With ``legacy``, ``dim_head`` becomes
    ``ch // num_heads`` for a SpatialTransformer and the raw ``num_head_channels`` (possibly -1) for an
    AttentionBlock. A SpatialTransformer
    gets ``(num_heads, dim_head)``; an AttentionBlock gets ``num_heads`` (``num_heads_upsample`` in the decoder) and
    ``num_head_channels=dim_head``, and uses ``ch // dim_head`` heads unless ``dim_head == -1``.
    """
    if num_head_channels == -1:
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1 when num_head_channels is -1, got {num_heads}")
        heads, dim_head = num_heads, ch // num_heads
    else:
        if num_head_channels < 1 or num_head_channels > ch:
            raise ValueError(f"num_head_channels {num_head_channels} must be in [1, {ch}] (attention width {ch})")
        if ch % num_head_channels:  # the official code floors: 128 // 24 = 5 heads would attend over 120 channels
            raise ValueError(
                f"num_head_channels={num_head_channels} does not divide the attention width {ch}: "
                f"{ch // num_head_channels} heads would cover {ch // num_head_channels * num_head_channels} of its "
                f"{ch} channels (pick a divisor of every attention width, or set num_heads with num_head_channels=-1)"
            )
        heads, dim_head = ch // num_head_channels, num_head_channels
    if legacy:
        dim_head = ch // heads if use_spatial_transformer else num_head_channels
    if use_spatial_transformer and dim_head < 1:
        raise ValueError(f"num_heads {heads} leaves no channels per head at attention width {ch}")
    return heads, dim_head


def _attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, mask: Tensor | None = None) -> Tensor:
    """:func:`gencore.attention.attention` on (B, H, L, d) (narrow heads are fast there: see its sdpa backend)."""
    return attention(q, k, v, mask=mask, scale=scale)


def _maybe_checkpoint(enabled: bool, fn: Any, *args: Any) -> Any:
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


# ------------------------------------------------------------------------------------------------------- blocks


class TimestepBlock(nn.Module):
    """A module whose ``forward`` takes the timestep embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to TimestepBlocks and the context to SpatialTransformers."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest ×2 upsampling, then a 3x3 ``conv`` if ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool, *, out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        x = upsample_nearest_2x(x)  # (B, C, 2H, 2W), same values as F.interpolate(nearest), faster on CPU
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """3x3 stride-2 ``op`` conv (padding 1) if ``use_conv``, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, *, out_channels: int | None = None, padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError(f"Downsample without conv keeps channels, got {channels} -> {self.out_channels}")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # (B, C', H/2, W/2)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (ADM; FiLM ``GN(h)·(1+scale)+shift`` when
    ``use_scale_shift_norm``). ``up`` / ``down`` resample inside the block (``resblock_updown``)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        *,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)  # (B, C', H, W)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C' or 2C', 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention of ADM: GroupNorm, ``qkv`` 1x1 Conv1d (C -> 3C), attention, zero-init ``proj_out``.

    ``use_new_attention_order=False`` (QKVAttentionLegacy): the 3C channels are split into heads first, then into
    q, k, v; ``True`` (QKVAttention): split into q, k, v first, then heads.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(f"AttentionBlock: channels {channels} not divisible by head width {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(f"AttentionBlock: channels {channels} not divisible by {self.num_heads} heads")
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        heads, ch, t = self.num_heads, c // self.num_heads, x.shape[-1]
        if self.use_new_attention_order:
            qkv = qkv.view(b, 3, heads, ch, t).transpose(0, 1)  # (3, B, heads, ch, T)
        else:
            qkv = qkv.view(b, heads, 3, ch, t).transpose(0, 2).transpose(1, 2)  # (3, B, heads, ch, T)
        q, k, v = (z.transpose(-1, -2) for z in qkv.unbind(0))  # (B, heads, T, ch)
        a = _attend(q, k, v, scale=ch**-0.5)  # (B, heads, T, ch); = (q·ch^-¼)(k·ch^-¼)ᵀ
        h = self.proj_out(a.transpose(-1, -2).reshape(b, c, t))  # (B, C, T)
        return (x + h).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention of Eq. (3): q from ``x``, k / v from ``context`` (self-attention if it is None).

    ``to_q/to_k/to_v`` are bias-free Linear layers; scale ``dim_head^-1/2``; ``to_out = (Linear, Dropout)``.
    """

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head**-0.5
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, N, query_dim), context (B, M, context_dim), mask (B, M) bool (True = attend) -> (B, N, query_dim)."""
        b, n, _ = x.shape
        inner = self.heads * self.dim_head
        if context is None:  # self-attention: one matmul for q, k, v
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3·inner, query_dim)
            q, k, v = F.linear(x, w).split(inner, dim=-1)  # 3 × (B, N, inner)
        else:
            q = self.to_q(x)  # (B, N, inner)
            w = torch.cat([self.to_k.weight, self.to_v.weight])  # (2·inner, context_dim)
            k, v = F.linear(context, w).split(inner, dim=-1)  # 2 × (B, M, inner)
        q, k, v = (z.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for z in (q, k, v))  # (B, H, L, d)
        if mask is not None:
            mask = mask.reshape(b, 1, 1, -1).bool()
        out = _attend(q, k, v, mask=mask, scale=self.scale)  # (B, H, N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, inner))


class GEGLU(nn.Module):
    """GLU variant with a GELU gate: ``proj`` (d -> 2·d_out), split into (x, gate), x·gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = (GEGLU(d, mult·d), Dropout, Linear(mult·d, d_out))`` (the official ``glu=True`` feed-forward)."""

    def __init__(self, dim: int, *, dim_out: int | None = None, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim_out or dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN block: x += attn1(LN1 x) (self), x += attn2(LN2 x, context) (cross), x += ff(LN3 x)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        *,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, context)

    def _forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x  # (B, HW, d)
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Sec. 3.3 transformer on feature maps: GroupNorm (eps 1e-6), ``proj_in`` (C -> heads·d_head), ``depth`` ×
    BasicTransformerBlock over the H·W tokens, zero-init ``proj_out``, residual.

    ``use_linear=False``: 1x1 Conv2d projections (LDM, SD 1.x); ``True``: Linear projections on the tokens (SD 2.x).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        *,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.use_linear = use_linear
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim, use_checkpoint=use_checkpoint
                )
                for _ in range(depth)
            ]
        )
        if use_linear:
            self.proj_out: nn.Module = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, inner, H, W)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, C or inner)
        if self.use_linear:
            x = self.proj_in(x)  # (B, HW, inner)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        if self.use_linear:
            x = self.proj_out(x)  # (B, HW, C)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, inner or C, H, W)
        if not self.use_linear:
            x = self.proj_out(x)  # (B, C, H, W)
        return x + x_in


# -------------------------------------------------------------------------------------------------------- model


class UNetModel(nn.Module):
    """The LDM denoiser ε_θ(z_t, t, c): ADM UNet with optional cross-attention (official ``UNetModel``).

    Keyword arguments are the official ones. ``attention_resolutions`` are downsampling rates (1, 2, 4, …), not
    pixel sizes; ``num_heads`` / ``num_head_channels`` / ``legacy`` follow :func:`attention_heads` at every level;
    ``num_heads_upsample`` (-1 = ``num_heads``) only matters for legacy AttentionBlocks in the decoder.
    ``use_spatial_transformer`` selects cross-attention transformers (needs ``context_dim``) instead of
    AttentionBlocks; ``use_linear_in_transformer`` is the SD 2.x linear-projection variant. ``num_classes`` adds
    ``label_emb`` (class embedding added to the time embedding, ``y=`` in forward).
    """

    def __init__(
        self,
        *,
        image_size: int | None = None,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        use_linear_in_transformer: bool = False,
    ) -> None:
        super().__init__()
        if dims != 2:
            raise ValueError(f"only 2-D UNets are supported (dims=2), got dims={dims}")
        if n_embed is not None:
            raise ValueError(
                f"n_embed={n_embed}: predicting first-stage codebook ids (id_predictor) is not supported; "
                "leave n_embed=None (no released LDM uses it)"
            )
        if use_fp16:
            raise ValueError("use_fp16=True is not supported: use torch.autocast or .half() on the module instead")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of the conditioning tokens)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(f"context_dim={context_dim} needs use_spatial_transformer=True (cross-attention)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (both are -1)")
        if model_channels < 32 or model_channels % 32:
            raise ValueError(f"model_channels must be a positive multiple of 32 (GroupNorm32), got {model_channels}")
        if num_res_blocks < 1 or not channel_mult:
            raise ValueError(f"need num_res_blocks >= 1 and a channel_mult, got {num_res_blocks}, {channel_mult}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if isinstance(context_dim, Sequence):  # a list (one width per transformer layer) in SD 2.x-style configs
            widths = {int(c) for c in context_dim}
            if len(widths) != 1:
                raise ValueError(f"context_dim must be one width, got {list(context_dim)}")
            context_dim = widths.pop()

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(int(a) for a in attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(int(m) for m in channel_mult)
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_spatial_transformer = use_spatial_transformer
        self.context_dim = context_dim
        self.downsample_factor = 2 ** (len(self.channel_mult) - 1)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res(ch_in: int, ch_out: int, **kw: Any) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kw,
            )

        def attn(ch: int, decoder: bool) -> nn.Module:
            heads, dim_head = attention_heads(
                ch,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                legacy=legacy,
                use_spatial_transformer=use_spatial_transformer,
            )
            if use_spatial_transformer:
                return SpatialTransformer(
                    ch,
                    heads,
                    dim_head,
                    depth=transformer_depth,
                    context_dim=context_dim,
                    use_linear=use_linear_in_transformer,
                    use_checkpoint=use_checkpoint,
                )
            return AttentionBlock(
                ch,
                num_heads=num_heads_upsample if decoder else heads,
                num_head_channels=dim_head,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        # encoder: conv_in, then per level num_res_blocks × [ResBlock (+ attention)], Downsample between levels
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, decoder=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, decoder=False), res(ch, ch))

        # decoder: levels reversed, num_res_blocks + 1 ResBlocks on [h, skip] (+ attention), Upsample between levels
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attn(ch, decoder=True))
                if level and i == num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def _check_inputs(self, x: Tensor, timesteps: Tensor, context: Tensor | None, y: Tensor | None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        b, _, h, w = x.shape
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(
                f"input size {h}x{w} is not divisible by the UNet's downsampling factor {f} "
                f"(2**(len(channel_mult) - 1) with channel_mult={list(self.channel_mult)})"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0 or timesteps.shape == (1,):
            timesteps = timesteps.reshape(1).expand(b)
        if timesteps.shape != (b,):
            raise ValueError(f"timesteps must be a scalar or shape ({b},), got shape {tuple(timesteps.shape)}")
        if self.context_dim is not None:
            if context is None:
                raise ValueError(f"this UNet has cross-attention: pass context of shape (B, L, {self.context_dim})")
            if context.dim() != 3 or context.shape[-1] != self.context_dim:
                raise ValueError(
                    f"context last dim {context.shape[-1] if context.dim() else '-'} != context_dim "
                    f"{self.context_dim} (context shape {tuple(context.shape)}, expected (B, L, {self.context_dim}))"
                )
            if context.shape[0] != b:
                raise ValueError(f"context batch {context.shape[0]} != x batch {b}")
        elif context is not None:
            raise ValueError(
                "this UNet has no cross-attention (use_spatial_transformer=False, context_dim=None) but got context"
            )
        if self.num_classes is None and y is not None:
            raise ValueError("y (class labels) given, but the UNet was built without num_classes")
        if self.num_classes is not None:
            if y is None:
                raise ValueError(
                    f"this UNet is class-conditional (num_classes={self.num_classes}): pass y of shape ({b},)"
                )
            if y.shape != (b,):
                raise ValueError(f"y must have shape ({b},), got {tuple(y.shape)}")
        return timesteps

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        """x (B, in, H, W), timesteps (B,) or scalar, context (B, L, context_dim), y (B,) -> ε̂ (B, out, H, W)."""
        timesteps = self._check_inputs(x, timesteps, context, y)
        t_emb = timestep_embedding(timesteps, self.model_channels)  # (B, mc)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # (B, 4·mc)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)  # (B, mc·mult[-1], H/f, W/f)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h).type(x.dtype)  # (B, out, H, W)


# ------------------------------------------------------------------------------------------------------ presets

_SD = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    use_checkpoint=True,
    legacy=False,
)

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml (CLIP ViT-L/14 tokens, 64x64x4 latents)
    "sd_v1": dict(_SD, context_dim=768),
    # configs/latent-diffusion/txt2img-1p4B-eval.yaml (BERT-like 1280-wide tokens, 32x32x4 latents)
    "txt2img_1p4B": dict(_SD, context_dim=1280),
    # models/ldm/cin256/config.yaml = configs/latent-diffusion/cin-ldm-vq-f8.yaml (ClassEmbedder tokens, 512 wide)
    "cin_ldm_vq8": dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=256,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        channel_mult=[1, 2, 4],
        num_head_channels=32,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=512,
    ),
    # configs/latent-diffusion/cin256-v2.yaml (VQ-f4 latents 64x64x3, ClassEmbedder(1001) tokens for CFG)
    "cin256_v2": dict(
        image_size=64,
        in_channels=3,
        out_channels=3,
        model_channels=192,
        attention_resolutions=[8, 4, 2],
        num_res_blocks=2,
        channel_mult=[1, 2, 3, 5],
        num_heads=1,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=512,
    ),
    # configs/latent-diffusion/celebahq-ldm-vq-4.yaml = models/ldm/celeba256 (also ffhq256, lsun_beds256)
    "celebahq_vq4": dict(
        image_size=64,
        in_channels=3,
        out_channels=3,
        model_channels=224,
        attention_resolutions=[8, 4, 2],
        num_res_blocks=2,
        channel_mult=[1, 2, 3, 4],
        num_head_channels=32,
    ),
    # configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml (KL-f8 latents 32x32x4)
    "lsun_churches_kl8": dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=192,
        attention_resolutions=[1, 2, 4, 8],
        num_res_blocks=2,
        channel_mult=[1, 2, 2, 4, 4],
        num_heads=8,
        use_scale_shift_norm=True,
        resblock_updown=True,
    ),
    # models/ldm/inpainting_big/config.yaml (concat: 3 z + 3 masked z + 1 mask channels)
    "inpainting_big": dict(
        image_size=64,
        in_channels=7,
        out_channels=3,
        model_channels=256,
        attention_resolutions=[8, 4, 2],
        num_res_blocks=2,
        channel_mult=[1, 2, 3, 4],
        num_heads=8,
        resblock_updown=True,
    ),
    # models/ldm/bsr_sr/config.yaml (concat of the low-resolution image); ds 16 never occurs, only 8 attends
    "bsr_sr": dict(
        image_size=64,
        in_channels=6,
        out_channels=3,
        model_channels=160,
        attention_resolutions=[16, 8],
        num_res_blocks=2,
        channel_mult=[1, 2, 2, 4],
        num_head_channels=32,
    ),
    # Fashion-MNIST toy, latent space: 4-channel latents, MiniLM (all-MiniLM-L6-v2, 384-wide) text tokens
    "fmnist_tiny": dict(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=64,
        attention_resolutions=[2],
        num_res_blocks=1,
        channel_mult=[1, 2],
        num_head_channels=32,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=384,
        legacy=False,
    ),
    # Fashion-MNIST toy, pixel space (32x32x1) baseline of comparable size: attention at 8x8 as in fmnist_tiny
    "fmnist_pixel": dict(
        image_size=32,
        in_channels=1,
        out_channels=1,
        model_channels=32,
        attention_resolutions=[4],
        num_res_blocks=1,
        channel_mult=[1, 2, 4],
        num_head_channels=32,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=384,
        legacy=False,
    ),
    # BENCHMARKS.md "UNet fwd+bwd": block_out (64, 128, 256), 2 layers, CrossAttn at ds 1 and 2, 8 heads
    # (diffusers attention_head_dim=8), cross_attention_dim 384
    "bench": dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=64,
        attention_resolutions=[1, 2],
        num_res_blocks=2,
        channel_mult=[1, 2, 4],
        num_heads=8,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=384,
        legacy=False,
    ),
    # unit tests (ldm.md "Suggested tests": 286 state-dict keys)
    "tiny": dict(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[2, 1],
        num_res_blocks=1,
        channel_mult=[1, 2],
        num_heads=2,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=16,
        legacy=False,
    ),
}


def unet_from_preset(name: str, **overrides: Any) -> UNetModel:
    """``UNetModel(**UNET_PRESETS[name], **overrides)``."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose from {sorted(UNET_PRESETS)}")
    return UNetModel(**{**copy.deepcopy(UNET_PRESETS[name]), **overrides})
