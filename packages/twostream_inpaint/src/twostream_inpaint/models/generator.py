"""The two-stream guided-inpainting generator (``GIResNetGenerator`` of the official ``gi/modules/gi/lama_guided.py``),
with the official module names so released checkpoints load by name (``model.<i>.…``, ``deformable_writes.<i>.…``).

Structure (``self.model``, official order)::

    ReflectionPad(3), CONV_NORM_ACT 7x7 (input_nc -> ngf), n_downsampling x CONV_NORM_ACT 3x3 stride 2,
    pre_lama x FFCResnetBlock, LatentInitLayer, n_blocks x GIBlock, DropLatentLayer, post_lama x FFCResnetBlock,
    n_downsampling x (ConvTranspose2d, norm, activation), ReflectionPad(3), Conv2d 7x7 (ngf -> output_nc), [out act]

From :class:`LatentInitLayer` on, the state is a pair ``(xhr, xlr)``: ``xhr`` (B, C, h, w) is the local,
high-resolution stream (FFC or grouped-conv blocks) and ``xlr`` (B, N, C) the global stream of N = num_latents_sqrt²
Perceiver latents, one per window of an ``num_latents_sqrt`` x ``num_latents_sqrt`` grid over the feature map. Each
:class:`GIBlock` reads pixels into latents (windowed softmax, :class:`LocalReadLayer`), runs two latent self-attention
layers, two local blocks, and writes latents back to pixels (per-pixel sigmoid gates, :class:`LocalWriteLayer`).

Keyframes ("sources", ``srcs``) share the encoder with the target (batched together, so BatchNorm batch statistics are
joint in training, as in the official code) and then pass through the first ``n_cross`` blocks on their own. The target
then uses them in two ways, each with its own switch:

- ``is_crossattending`` (global stream): in blocks ``i < n_cross`` the target latents' first attention layer attends
  to its own keys / values concatenated with those of all keyframe latents of the same block;
- ``is_deformable`` (local stream): after blocks ``i < n_cross``, :class:`DeformableWriteLayer` warps each keyframe's
  block-``i`` local features into the target frame with the optical flow (``flow_sample``: bilinear ``grid_sample``,
  not a deformable convolution) and adds a softmax-over-keyframes mixture informed by the flow error.

Ablations of the "global-only vs local-only vs two-stream" comparison:

- two-stream (the paper's model, ``configs/ours.yaml``): ``is_crossattending=True, is_deformable=True``;
- global-only: ``is_deformable=False``: no flow-guided local stream; keyframes reach the target only through the
  latent attention (flows are then not needed);
- local-only: ``is_crossattending=False``: no keyframe keys / values in the latent attention; keyframes reach the
  target only through the flow-warped local features.

Video propagation: :meth:`GIResNetGenerator.keyframe_state` runs the keyframes once (eval mode) and returns a
:class:`KeyframeState`; ``forward(target, keyframes=state, flows=..., flow_errs=...)`` then skips the keyframe pass
for each new target frame (the result equals the uncached forward in eval mode, where BatchNorm is per-sample).

Differences from the official code (behaviour on the official configs is unchanged):

- ``d_latents`` is a constructor argument (official: hard-coded 512 = the bottleneck width of the paper configs); it
  must equal the bottleneck width, as the latents feed attention layers of that width;
- ``fourier_bands`` / ``fourier_max_resolution`` are arguments (official: 64 and (32, 32));
- with ``n_cross = 0`` there are no deformable write layers and no keyframe block pass (official: one unused write
  layer, and the keyframes still pass through block 0); with both ``is_crossattending`` and ``is_deformable`` off, the
  keyframes skip the block pass, whose results would be unused (official: they run, only updating BatchNorm running
  statistics);
- windows: a map whose size is not a multiple of the window count is resized as official (``resize_mods``), but never
  to less than one pixel per window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.attention import attention

from ..warp import flow_sample
from .ffc import (
    CONV_NORM_ACT,
    RESIDUAL_CONV_NORM_ACT,
    FFCResnetBlock,
    get_activation_layer,
    get_norm_layer,
    make_activation,
)

__all__ = [
    "AttentionLayer",
    "DeformableWriteLayer",
    "DropLatentLayer",
    "GIBlock",
    "GIResNetGenerator",
    "KeyframeState",
    "LatentInitLayer",
    "LocalReadLayer",
    "LocalWriteLayer",
    "PerceiverMLP",
    "PerceiverMLPConv",
    "PerceiverSelfAttention",
    "fourier_position_encoding",
    "local_mixture_2d",
    "local_mixture_2d_transposed",
    "resize_mods",
]


# ----------------------------------------------------------------------------------------------------------------------
# windowed read / write mixtures


def resize_mods(x: Tensor, mods: tuple[int, int]) -> Tensor:
    """``x`` (B, C, H, W) bilinearly resized (``align_corners=True``) to the nearest multiple of ``mods`` per axis
    (at least one multiple) when H or W is not already a multiple."""
    h, w = x.shape[-2:]
    if h % mods[0] == 0 and w % mods[1] == 0:
        return x
    h = mods[0] * max(1, round(h / mods[0]))
    w = mods[1] * max(1, round(w / mods[1]))
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


def local_mixture_2d(
    logits: Tensor, values: Tensor, winh: int, winw: int, return_attn: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Read pixels into one vector per window: ``logits`` (B, heads, H, W), ``values`` (B, heads·c, H, W) ->
    (B, winh·winw, heads·c), where head ``j`` of window ``n`` is the softmax-over-the-window's-pixels (of head ``j``'s
    logits) weighted sum of channel slice ``j`` of the values. Windows are row-major. With ``return_attn`` also the
    softmax weights (B, heads, H', W') (H', W' = the sizes after :func:`resize_mods`)."""
    logits = resize_mods(logits, (winh, winw))
    values = resize_mods(values, (winh, winw))
    b, heads, h, w = logits.shape
    if values.shape[0] != b or values.shape[-2:] != logits.shape[-2:] or values.shape[1] % heads:
        raise ValueError(
            f"local_mixture_2d: values {tuple(values.shape)} do not match logits {tuple(logits.shape)} "
            "(same batch and size, channels a multiple of the heads)"
        )
    c = values.shape[1] // heads
    ph, pw = h // winh, w // winw
    # (B, heads, winh, ph, winw, pw) -> (B, heads, winh, winw, ph·pw)
    lg = logits.reshape(b, heads, winh, ph, winw, pw).permute(0, 1, 2, 4, 3, 5).reshape(b, heads, winh * winw, ph * pw)
    attn = lg.softmax(dim=-1)
    vals = (
        values.reshape(b, heads, c, winh, ph, winw, pw)
        .permute(0, 1, 3, 5, 4, 6, 2)
        .reshape(b, heads, winh * winw, ph * pw, c)
    )
    out = torch.matmul(attn.unsqueeze(-2), vals).squeeze(-2)  # (B, heads, N, c)
    out = out.permute(0, 2, 1, 3).reshape(b, winh * winw, heads * c)
    if not return_attn:
        return out
    attn_map = attn.reshape(b, heads, winh, winw, ph, pw).permute(0, 1, 2, 4, 3, 5).reshape(b, heads, h, w)
    return out, attn_map


def local_mixture_2d_transposed(
    logits: Tensor, values: Tensor, winh: int, winw: int, return_attn: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Write one vector per window to its pixels: ``logits`` (B, heads, H, W), ``values`` (B, winh·winw, heads·c) ->
    (B, heads·c, H, W) with pixel p of window n, channel slice j = sigmoid(logits[j, p]) · values[n, slice j]. Maps
    whose size is not a multiple of the windows are resized for the mixture and the result resized back. With
    ``return_attn`` also the gates (B, heads, H', W') at the mixture's size."""
    oh, ow = logits.shape[-2:]
    logits = resize_mods(logits, (winh, winw))
    b, heads, h, w = logits.shape
    if values.shape[0] != b or values.shape[1] != winh * winw or values.shape[2] % heads:
        raise ValueError(
            f"local_mixture_2d_transposed: values {tuple(values.shape)} must be (B={b}, {winh * winw}, heads·c) "
            f"with heads = {heads}"
        )
    c = values.shape[2] // heads
    ph, pw = h // winh, w // winw
    gates = torch.sigmoid(logits)
    vals = values.reshape(b, winh, winw, heads, c).permute(0, 3, 4, 1, 2)  # (B, heads, c, winh, winw)
    out = gates.reshape(b, heads, 1, winh, ph, winw, pw) * vals.reshape(b, heads, c, winh, 1, winw, 1)
    out = out.reshape(b, heads * c, h, w)
    if (oh, ow) != (h, w):
        out = F.interpolate(out, size=(oh, ow), mode="bilinear", align_corners=True)
    if not return_attn:
        return out
    return out, gates


# ----------------------------------------------------------------------------------------------------------------------
# latents and position features


def fourier_position_encoding(
    size: Sequence[int],
    num_bands: int,
    max_resolution: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Perceiver Fourier features of a grid, (D + 2·D·num_bands, *size) with D = len(size): linear positions p_d in
    [-1, 1] over the grid, frequencies f_{d,k} = linspace(1, max_resolution[d] / 2, num_bands), channels ordered
    [p_1 .. p_D, sin(pi f_{1,1} p_1) .. sin(pi f_{1,K} p_1), .., sin(.. p_D), cos(pi f_{1,1} p_1) .., cos(.. p_D)].
    Computed in float32, returned in ``dtype``."""
    if len(size) != len(max_resolution):
        raise ValueError(f"fourier_position_encoding: size {tuple(size)} and max_resolution {tuple(max_resolution)}")
    axes = [torch.linspace(-1.0, 1.0, int(n), device=device, dtype=torch.float32) for n in size]
    pos = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)  # (D, *size)
    freqs = torch.stack(
        [torch.linspace(1.0, r / 2, num_bands, device=device, dtype=torch.float32) for r in max_resolution]
    )  # (D, K)
    scaled = pos.unsqueeze(1) * freqs.reshape(*freqs.shape, *([1] * len(size)))  # (D, K, *size)
    angles = math.pi * scaled.reshape(-1, *size)  # (pos · f) · pi, in the official order of float32 rounding
    return torch.cat((pos, angles.sin(), angles.cos()), dim=0).to(dtype)


class FourierPositionEncoding(nn.Module):
    """Parameter-free Perceiver Fourier position encoding of the actual feature-map size (see
    :func:`fourier_position_encoding`); ``forward(x)`` gives (B, 2 + 4·num_bands, H, W) for a (B, C, H, W) map."""

    def __init__(self, num_bands: int = 64, max_resolution: Sequence[int] = (32, 32)) -> None:
        super().__init__()
        self.num_bands = int(num_bands)
        self.max_resolution = tuple(int(r) for r in max_resolution)

    def output_size(self) -> int:
        d = len(self.max_resolution)
        return d + 2 * d * self.num_bands

    def forward(self, x: Tensor) -> Tensor:
        enc = fourier_position_encoding(
            x.shape[-2:], self.num_bands, self.max_resolution, device=x.device, dtype=x.dtype
        )
        return enc.unsqueeze(0).expand(x.shape[0], -1, -1, -1)


class LatentInitLayer(nn.Module):
    """Concatenate Fourier position features to the map and project back (``project``, 1x1 conv); start the global
    stream with the learned ``latents`` (N, d_latents). Returns ``(xhr, latents expanded over the batch)``."""

    def __init__(
        self,
        in_channels: int,
        num_latents_sqrt: int,
        d_latents: int,
        num_bands: int = 64,
        max_resolution: Sequence[int] = (32, 32),
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents_sqrt**2, d_latents))
        self.pos_embeddings = FourierPositionEncoding(num_bands, max_resolution)
        self.project = nn.Conv2d(in_channels + self.pos_embeddings.output_size(), in_channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.project(torch.cat((x, self.pos_embeddings(x)), dim=1))
        return x, self.latents.expand(x.shape[0], -1, -1)


class DropLatentLayer(nn.Module):
    """End of the two-stream bottleneck: keep the local stream ``xhr`` of the ``(xhr, xlr)`` pair."""

    def forward(self, x: tuple[Tensor, Tensor]) -> Tensor:
        if not isinstance(x, tuple):
            raise ValueError("DropLatentLayer expects the (xhr, xlr) pair of the bottleneck")
        return x[0]


# ----------------------------------------------------------------------------------------------------------------------
# attention


class PerceiverSelfAttention(nn.Module):
    """Multi-head (self- or cross-) attention with pre-LayerNorm (``layernorm1`` on the queries' input,
    ``layernorm2`` on a cross input: Identity for self-attention). Returns the heads concatenated (no output
    projection). ``kv=(k, v)`` (B, heads, L', d) are extra keys / values appended along the sequence;
    ``return_kv=True`` also returns this layer's own (k, v) (B, heads, L, d) before that concatenation."""

    def __init__(
        self,
        attention_probs_dropout_prob: float = 0.0,
        is_cross_attention: bool = False,
        qk_channels: int | None = None,
        v_channels: int | None = None,
        num_heads: int = 1,
        q_dim: int | None = None,
        kv_dim: int | None = None,
    ) -> None:
        super().__init__()
        if q_dim is None:
            raise ValueError("PerceiverSelfAttention needs q_dim")
        kv_dim = q_dim if kv_dim is None else kv_dim
        qk_channels = q_dim if qk_channels is None else qk_channels
        v_channels = qk_channels if v_channels is None else v_channels
        if qk_channels % num_heads:
            raise ValueError(f"qk_channels ({qk_channels}) must be divisible by num_heads ({num_heads})")
        if v_channels % num_heads:
            raise ValueError(f"v_channels ({v_channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.qk_channels = qk_channels
        self.v_channels = v_channels
        self.qk_channels_per_head = qk_channels // num_heads
        self.v_channels_per_head = v_channels // num_heads
        self.dropout_p = float(attention_probs_dropout_prob)
        self.layernorm1 = nn.LayerNorm(q_dim)
        self.layernorm2 = nn.LayerNorm(kv_dim) if is_cross_attention else nn.Identity()
        self.query = nn.Linear(q_dim, qk_channels)
        self.key = nn.Linear(kv_dim, qk_channels)
        self.value = nn.Linear(kv_dim, v_channels)

    def _heads(self, x: Tensor, per_head: int) -> Tensor:
        return x.reshape(*x.shape[:-1], self.num_heads, per_head).transpose(1, 2)  # (B, heads, L, d)

    def forward(
        self,
        hidden_states: Tensor,
        inputs: Tensor | None = None,
        kv: tuple[Tensor, Tensor] | None = None,
        return_kv: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        hidden_states = self.layernorm1(hidden_states)
        source = hidden_states if inputs is None else self.layernorm2(inputs)
        q = self._heads(self.query(hidden_states), self.qk_channels_per_head)
        k = self._heads(self.key(source), self.qk_channels_per_head)
        v = self._heads(self.value(source), self.v_channels_per_head)
        own_kv = (k, v)
        if kv is not None:
            k = torch.cat((k, kv[0].to(k.dtype)), dim=2)
            v = torch.cat((v, kv[1].to(v.dtype)), dim=2)
        out = attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0)  # (B, heads, L, d_v)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.v_channels)
        if return_kv:
            return out, own_kv
        return out


class PerceiverMLP(nn.Module):
    """dense1 -> GELU -> dense2 (Linear layers, width ``widening_factor · input_size``)."""

    def __init__(self, input_size: int, widening_factor: int = 1) -> None:
        super().__init__()
        self.dense1 = nn.Linear(input_size, widening_factor * input_size)
        self.intermediate_act_fn = nn.GELU()
        self.dense2 = nn.Linear(widening_factor * input_size, input_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense2(self.intermediate_act_fn(self.dense1(x)))


class PerceiverMLPConv(PerceiverMLP):
    """:class:`PerceiverMLP` with 1x1 convs, for (B, C, H, W) maps."""

    def __init__(self, input_size: int, widening_factor: int = 1) -> None:
        nn.Module.__init__(self)
        self.dense1 = nn.Conv2d(input_size, widening_factor * input_size, 1)
        self.intermediate_act_fn = nn.GELU()
        self.dense2 = nn.Conv2d(widening_factor * input_size, input_size, 1)


class AttentionLayer(nn.Module):
    """Latent self-attention block: x + projection(attn(x)), then x + mlp(ln_premlp(x))."""

    def __init__(self, q_dim: int, num_heads: int, widening_factor: int = 1) -> None:
        super().__init__()
        self.attn = PerceiverSelfAttention(
            attention_probs_dropout_prob=0.0, is_cross_attention=False, num_heads=num_heads, q_dim=q_dim, kv_dim=q_dim
        )
        self.projection = nn.Linear(q_dim, q_dim)
        self.ln_premlp = nn.LayerNorm(q_dim)
        self.mlp = PerceiverMLP(q_dim, widening_factor=widening_factor)

    def forward(
        self, x: Tensor, kv: tuple[Tensor, Tensor] | None = None, return_kv: bool = False
    ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        out = self.attn(x, kv=kv, return_kv=return_kv)
        own_kv = None
        if return_kv:
            out, own_kv = out
        x = x + self.projection(out)
        x = x + self.mlp(self.ln_premlp(x))
        if return_kv:
            return x, own_kv
        return x


def _check_num_latents(num_latents: int) -> int:
    n = math.isqrt(num_latents)
    if n * n != num_latents:
        raise ValueError(f"num_latents must be a square (one latent per window of a square grid), got {num_latents}")
    return n


class LocalReadLayer(nn.Module):
    """Pixels -> latents: per window and head, a softmax over the window's pixels (``to_logits``, 1x1 conv to
    ``read_heads``) mixes that head's channel slice of ``to_values`` (1x1 conv kv_dim -> q_dim); then
    xlr + projection(ln1(read)) and xlr + mlp(ln2(xlr))."""

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        num_heads: int,
        num_latents: int,
        top_k: int | None = None,
        read_heads: int = 8,
        widening_factor: int = 1,
    ) -> None:
        super().__init__()
        if top_k is not None:
            raise ValueError("LocalReadLayer: top_k is not supported (unused by the official model)")
        if q_dim % read_heads:
            raise ValueError(f"LocalReadLayer: q_dim ({q_dim}) must be divisible by read_heads ({read_heads})")
        self.num_latents_sqrt = _check_num_latents(num_latents)
        self.ln1 = nn.LayerNorm(q_dim)
        self.ln2 = nn.LayerNorm(q_dim)
        self.mlp = PerceiverMLP(q_dim, widening_factor=widening_factor)
        self.to_logits = nn.Conv2d(kv_dim, read_heads, 1)
        self.to_values = nn.Conv2d(kv_dim, q_dim, 1)
        self.projection = nn.Linear(q_dim, q_dim)

    def forward(self, xlr: Tensor, xhr: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        n = self.num_latents_sqrt
        read = local_mixture_2d(self.to_logits(xhr), self.to_values(xhr), n, n, return_attn=return_attn)
        attn = None
        if return_attn:
            read, attn = read
        xlr = xlr + self.projection(self.ln1(read))
        xlr = xlr + self.mlp(self.ln2(xlr))
        return (xlr, attn) if return_attn else xlr


class LocalWriteLayer(nn.Module):
    """Latents -> pixels: each pixel's head-``j`` channel slice gets sigmoid(``to_logits``(xhr))_j times the same
    slice of its window latent's ``to_values`` (Linear kv_dim -> q_dim); then xhr + projection(ln1(write)) and
    xhr + mlp(ln2(xhr)). ``q_dim`` is the map's width, ``kv_dim`` the latents'. ``ln1`` / ``ln2`` are BatchNorm2d
    (the official names)."""

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        num_heads: int,
        num_latents: int,
        top_k: int | None = None,
        write_heads: int = 8,
        widening_factor: int = 1,
    ) -> None:
        super().__init__()
        if top_k is not None:
            raise ValueError("LocalWriteLayer: top_k is not supported (unused by the official model)")
        if q_dim % write_heads:
            raise ValueError(f"LocalWriteLayer: q_dim ({q_dim}) must be divisible by write_heads ({write_heads})")
        self.num_latents_sqrt = _check_num_latents(num_latents)
        self.ln1 = nn.BatchNorm2d(q_dim)
        self.ln2 = nn.BatchNorm2d(q_dim)
        self.mlp = PerceiverMLPConv(q_dim, widening_factor=widening_factor)
        self.to_logits = nn.Conv2d(q_dim, write_heads, 1)
        self.to_values = nn.Linear(kv_dim, q_dim)
        self.projection = nn.Conv2d(q_dim, q_dim, 1)

    def forward(self, xhr: Tensor, xlr: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        n = self.num_latents_sqrt
        write = local_mixture_2d_transposed(self.to_logits(xhr), self.to_values(xlr), n, n, return_attn=return_attn)
        attn = None
        if return_attn:
            write, attn = write
        xhr = xhr + self.projection(self.ln1(write))
        xhr = xhr + self.mlp(self.ln2(xhr))
        return (xhr, attn) if return_attn else xhr


class DeformableWriteLayer(nn.Module):
    """Flow-guided aggregation of keyframe features: warp each keyframe's map into the target frame
    (:func:`~twostream_inpaint.warp.flow_sample`), then x + Σ_t softmax_t(q_t) ⊙ v_t with
    q_t = ``q``([warped_t, err_t, x]) and v_t = ``v``([warped_t, err_t]) (1x1 convs), err_t the flow error resized
    (bilinear) to the map. The softmax runs over the keyframes, per channel and pixel."""

    def __init__(self, in_chn: int) -> None:
        super().__init__()
        self.q = nn.Conv2d(2 * in_chn + 1, in_chn, 1)
        self.v = nn.Conv2d(in_chn + 1, in_chn, 1)

    def forward(self, x: Tensor, srcs: Tensor, flows: Tensor, flow_errs: Tensor) -> Tensor:
        """``x`` (B, C, h, w), ``srcs`` (B, T, C, h, w), ``flows`` (B, T, 2, H, W) target -> keyframe in pixels of
        their own map (resized and rescaled to h x w), ``flow_errs`` (B, T, 1, H, W)."""
        b, c, h, w = x.shape
        t = srcs.shape[1]
        if srcs.shape != (b, t, c, h, w):
            raise ValueError(f"DeformableWriteLayer: srcs {tuple(srcs.shape)} do not match x {tuple(x.shape)}")
        if flows.dim() != 5 or flows.shape[:3] != (b, t, 2):
            raise ValueError(f"DeformableWriteLayer: flows must be (B={b}, T={t}, 2, H, W), got {tuple(flows.shape)}")
        if flow_errs.dim() != 5 or flow_errs.shape[:3] != (b, t, 1):
            raise ValueError(
                f"DeformableWriteLayer: flow_errs must be (B={b}, T={t}, 1, H, W), got {tuple(flow_errs.shape)}"
            )
        warped = flow_sample(srcs.reshape(b * t, c, h, w), flows.reshape(b * t, 2, *flows.shape[-2:]))
        errs = flow_errs.reshape(b * t, 1, *flow_errs.shape[-2:])
        if errs.shape[-2:] != (h, w):
            errs = F.interpolate(errs, size=(h, w), mode="bilinear", align_corners=True)
        errs = errs.to(warped.dtype)
        xr = x.unsqueeze(1).expand(b, t, c, h, w).reshape(b * t, c, h, w)
        q = self.q(torch.cat((warped, errs, xr), dim=1)).reshape(b, t, c, h, w)
        v = self.v(torch.cat((warped, errs), dim=1)).reshape(b, t, c, h, w)
        return x + (q.softmax(dim=1) * v).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# the two-stream block and the generator


class GIBlock(nn.Module):
    """read -> attn1 (optionally with extra keyframe K/V, or returning its own) -> attn2 -> block1 -> block2 ->
    write, on the pair (xhr, xlr)."""

    def __init__(
        self,
        q_dim: int,
        kv_dim: int,
        num_heads: int,
        num_latents: int,
        read_write_heads: int,
        block_cls: Callable[..., nn.Module],
        block_kwargs: dict[str, Any],
    ) -> None:
        super().__init__()
        self.read = LocalReadLayer(q_dim, kv_dim, num_heads, num_latents=num_latents, read_heads=read_write_heads)
        self.write = LocalWriteLayer(kv_dim, q_dim, num_heads, num_latents=num_latents, write_heads=read_write_heads)
        self.attn1 = AttentionLayer(q_dim, num_heads)
        self.attn2 = AttentionLayer(q_dim, num_heads)
        self.block1 = block_cls(**block_kwargs)
        self.block2 = block_cls(**block_kwargs)

    def forward(
        self,
        x: tuple[Tensor, Tensor],
        return_attn: bool = False,
        kv: tuple[Tensor, Tensor] | None = None,
        return_kv: bool = False,
    ) -> Any:
        """``(xhr, xlr)`` -> ``(xhr, xlr)``; with ``return_attn``: ``((xhr, xlr), (read_attn, write_attn))``; with
        ``return_kv``: ``((xhr, xlr), (k, v))`` of attn1."""
        if return_attn and return_kv:
            raise ValueError("GIBlock: return_attn and return_kv are exclusive")
        if not (isinstance(x, tuple) and len(x) == 2):
            raise ValueError("GIBlock expects the (xhr, xlr) pair")
        xhr, xlr = x
        xlr = self.read(xlr, xhr, return_attn=return_attn)
        read_attn = None
        if return_attn:
            xlr, read_attn = xlr
        xlr = self.attn1(xlr, kv=kv, return_kv=return_kv)
        own_kv = None
        if return_kv:
            xlr, own_kv = xlr
        xlr = self.attn2(xlr)
        xhr = self.block2(self.block1(xhr))
        xhr = self.write(xhr, xlr, return_attn=return_attn)
        if return_attn:
            xhr, write_attn = xhr
            return (xhr, xlr), (read_attn, write_attn)
        if return_kv:
            return (xhr, xlr), own_kv
        return xhr, xlr


@dataclass
class KeyframeState:
    """The keyframes' contribution to a target forward, computed once (:meth:`GIResNetGenerator.keyframe_state`):
    ``kv[i]`` = (k, v) of block i's attn1, each (B, heads, T·N, d); ``src_lifs[i]`` = the keyframes' local maps after
    block i, (B, T, C, h, w); ``num_keyframes`` = T; ``image_size`` = (H, W) of the keyframe images. A state of batch
    size 1 serves targets of any batch size."""

    kv: list[tuple[Tensor, Tensor]]
    src_lifs: list[Tensor]
    num_keyframes: int
    image_size: tuple[int, int]
    batch_size: int

    def to(self, *args: Any, **kwargs: Any) -> KeyframeState:
        return KeyframeState(
            kv=[(k.to(*args, **kwargs), v.to(*args, **kwargs)) for k, v in self.kv],
            src_lifs=[s.to(*args, **kwargs) for s in self.src_lifs],
            num_keyframes=self.num_keyframes,
            image_size=self.image_size,
            batch_size=self.batch_size,
        )


def _out_activation(kind: Any) -> nn.Module | None:
    if kind is False or kind is None:
        return None
    if kind is True:
        kind = "tanh"
    if kind == "tanh":
        return nn.Tanh()
    if kind == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"add_out_act must be 'sigmoid', 'tanh', True (tanh) or False, got {kind!r}")


class GIResNetGenerator(nn.Module):
    """The official two-stream generator (see the module docstring). ``d_latents`` (default: the bottleneck width
    ``min(max_features, ngf · 2**n_downsampling)``), ``fourier_bands`` and ``fourier_max_resolution`` are the
    arguments the official code hard-codes (512, 64, (32, 32))."""

    def __init__(
        self,
        input_nc: int,
        output_nc: int,
        ngf: int = 64,
        n_downsampling: int = 3,
        n_blocks: int = 9,
        norm_layer: str | Callable[..., nn.Module] = nn.BatchNorm2d,
        padding_type: str = "reflect",
        activation_layer: str | Callable[..., nn.Module] = nn.ReLU,
        up_norm_layer: str | Callable[..., nn.Module] = nn.BatchNorm2d,
        up_activation: str | Callable[..., nn.Module] | nn.Module | None = None,
        resnet_conv_kwargs: dict[str, Any] | None = None,
        add_out_act: bool | str = True,
        max_features: int = 1024,
        num_latents_sqrt: int = 16,
        num_groups: int = 4,
        pre_lama: int = 0,
        post_lama: int = 0,
        read_write_heads: int = 8,
        block_type: str = "conv",
        num_heads: int = 8,
        is_deformable: bool = False,
        is_crossattending: bool = False,
        n_cross: int = 1000,
        d_latents: int | None = None,
        fourier_bands: int = 64,
        fourier_max_resolution: Sequence[int] = (32, 32),
    ) -> None:
        super().__init__()
        if n_blocks < 0 or n_downsampling < 0 or pre_lama < 0 or post_lama < 0:
            raise ValueError("n_blocks, n_downsampling, pre_lama and post_lama must be >= 0")
        if n_cross < 0:
            raise ValueError(f"n_cross must be >= 0, got {n_cross}")
        if num_latents_sqrt < 1:
            raise ValueError(f"num_latents_sqrt must be >= 1, got {num_latents_sqrt}")
        norm_layer = get_norm_layer(norm_layer)
        up_norm_layer = get_norm_layer(up_norm_layer)
        activation_layer = get_activation_layer(activation_layer)
        resnet_conv_kwargs = dict(resnet_conv_kwargs or {})
        self.input_nc = input_nc
        self.output_nc = output_nc
        self.n_downsampling = n_downsampling
        self.num_latents_sqrt = num_latents_sqrt
        self.n_blocks = n_blocks

        model: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            CONV_NORM_ACT(
                input_nc, ngf, kernel_size=7, padding=0, norm_layer=norm_layer, activation_layer=activation_layer
            ),
        ]
        for i in range(n_downsampling):
            mult = 2**i
            model.append(
                CONV_NORM_ACT(
                    min(max_features, ngf * mult),
                    min(max_features, ngf * mult * 2),
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    norm_layer=norm_layer,
                    activation_layer=activation_layer,
                )
            )
        width = min(max_features, ngf * 2**n_downsampling)
        self.bottleneck_width = width

        def lama_block() -> nn.Module:
            return FFCResnetBlock(
                width,
                padding_type=padding_type,
                activation_layer=activation_layer,
                norm_layer=norm_layer,
                inline=True,
                **resnet_conv_kwargs,
            )

        model += [lama_block() for _ in range(pre_lama)]

        d_latents = width if d_latents is None else int(d_latents)
        if d_latents != width:
            raise ValueError(
                f"d_latents ({d_latents}) must equal the bottleneck width min(max_features, ngf * 2**n_downsampling) "
                f"= {width}: the latents feed attention layers of that width (official: 512)"
            )
        self.d_latents = d_latents
        num_latents = num_latents_sqrt**2
        model.append(LatentInitLayer(width, num_latents_sqrt, d_latents, fourier_bands, fourier_max_resolution))

        if block_type == "conv":
            block_cls: Callable[..., nn.Module] = RESIDUAL_CONV_NORM_ACT
            block_kwargs: dict[str, Any] = dict(
                in_channels=width,
                out_channels=width,
                kernel_size=3,
                padding=1,
                padding_type=padding_type,
                activation_layer=activation_layer,
                norm_layer=norm_layer,
                groups=num_groups,
            )
        elif block_type == "ffc":
            block_cls = FFCResnetBlock
            block_kwargs = dict(
                dim=width,
                padding_type=padding_type,
                activation_layer=activation_layer,
                norm_layer=norm_layer,
                inline=True,
                **resnet_conv_kwargs,
            )
        else:
            raise ValueError(f"block_type must be 'conv' or 'ffc', got {block_type!r}")

        self.bottleneck_start = len(model)
        for _ in range(n_blocks):
            model.append(
                GIBlock(
                    q_dim=width,
                    kv_dim=width,
                    num_heads=num_heads,
                    num_latents=num_latents,
                    read_write_heads=read_write_heads,
                    block_cls=block_cls,
                    block_kwargs=block_kwargs,
                )
            )
        self.decode_start = len(model)
        model.append(DropLatentLayer())
        model += [lama_block() for _ in range(post_lama)]

        for i in range(n_downsampling):
            mult = 2 ** (n_downsampling - i)
            cin, cout = min(max_features, ngf * mult), min(max_features, int(ngf * mult / 2))
            model += [
                nn.ConvTranspose2d(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1),
                up_norm_layer(cout),
                self._up_activation(up_activation),
            ]
        model += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0)]
        out_act = _out_activation(add_out_act)
        if out_act is not None:
            model.append(out_act)
        self.model = nn.Sequential(*model)

        self.is_crossattending = bool(is_crossattending)
        self.is_deformable = bool(is_deformable)
        self.n_cross = int(n_cross)
        self.n_src_blocks = min(n_blocks, self.n_cross)  # blocks the keyframes pass through / that use them
        if self.is_deformable:
            self.deformable_writes = nn.ModuleList(DeformableWriteLayer(width) for _ in range(self.n_src_blocks))
        self.apply(self._init_weights)

    @staticmethod
    def _up_activation(up_activation: Any) -> nn.Module:
        if up_activation is None:
            return nn.ReLU(True)
        if isinstance(up_activation, nn.Module):
            return up_activation  # shared instance, as the official default nn.ReLU(True)
        return make_activation(up_activation)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The official init: Linear / Conv2d weights N(0, 0.02) and zero biases, latents N(0, 0.02), LayerNorm
        (1, 0); everything else (BatchNorm, ConvTranspose2d) keeps torch's defaults."""
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LatentInitLayer):
            nn.init.normal_(module.latents, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------------------------------

    @property
    def encode_modules(self) -> nn.Sequential:
        return self.model[: self.bottleneck_start]

    @property
    def bottleneck_modules(self) -> nn.Sequential:
        return self.model[self.bottleneck_start : self.decode_start]

    @property
    def decode_modules(self) -> nn.Sequential:
        return self.model[self.decode_start :]

    @property
    def uses_keyframe_blocks(self) -> bool:
        """Whether the keyframes pass through the first ``n_cross`` blocks (their results are used)."""
        return self.n_src_blocks > 0 and (self.is_crossattending or self.is_deformable)

    def _check_image(self, x: Tensor, name: str, dims: int) -> None:
        if not isinstance(x, Tensor) or x.dim() != dims:
            layout = "(B, C, H, W)" if dims == 4 else "(B, T, C, H, W)"
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"GIResNetGenerator: {name} must be a {dims}-D tensor {layout}, got {got}")
        c, h, w = x.shape[-3:]
        if c != self.input_nc:
            raise ValueError(f"GIResNetGenerator: {name} has {c} channels, the model takes input_nc = {self.input_nc}")
        f = 2**self.n_downsampling
        if h % f or w % f:
            raise ValueError(
                f"GIResNetGenerator: {name} size {h}x{w} is not divisible by 2**n_downsampling = {f} (H and W must be)"
            )

    def _check_flows(self, flows: Tensor | None, flow_errs: Tensor | None, b: int, t: int) -> None:
        if flows is None or flow_errs is None:
            raise ValueError(
                "GIResNetGenerator: flows (B, T, 2, H, W) and flow_errs (B, T, 1, H, W) are required when is_deformable"
            )
        for name, x, ch in (("flows", flows, 2), ("flow_errs", flow_errs, 1)):
            if not isinstance(x, Tensor) or x.dim() != 5 or tuple(x.shape[:3]) != (b, t, ch):
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"GIResNetGenerator: {name} must be (B={b}, T={t}, {ch}, H, W), got {got}")

    def _source_pass(self, xhr: Tensor, xlr: Tensor, b: int, t: int, image_size: tuple[int, int]) -> KeyframeState:
        """The keyframes (batch B·T) through the first ``n_cross`` blocks, keeping attn1's (k, v) and the maps."""
        kvs: list[tuple[Tensor, Tensor]] = []
        lifs: list[Tensor] = []
        if self.uses_keyframe_blocks:
            state = (xhr, xlr)
            for block in self.bottleneck_modules[: self.n_src_blocks]:
                state, (k, v) = block(state, return_kv=True)
                # (b t) heads n d -> b heads (t n) d
                kvs.append(
                    tuple(
                        z.reshape(b, t, *z.shape[1:]).transpose(1, 2).reshape(b, z.shape[1], -1, z.shape[3])
                        for z in (k, v)
                    )
                )
                lifs.append(state[0].reshape(b, t, *state[0].shape[1:]))
        return KeyframeState(kv=kvs, src_lifs=lifs, num_keyframes=t, image_size=image_size, batch_size=b)

    def keyframe_state(self, srcs: Tensor) -> KeyframeState:
        """Run the keyframes ``srcs`` (B, T, C, H, W) alone through the encoder and the first ``n_cross`` blocks
        (eval mode only: in training BatchNorm would normalise them with their own batch statistics, not jointly
        with the target). Reuse the result with ``forward(target, keyframes=state, ...)``; wrap in
        ``torch.no_grad()`` for inference."""
        if self.training:
            raise ValueError(
                "GIResNetGenerator.keyframe_state needs eval mode: in training BatchNorm uses batch statistics, "
                "which are joint over target and keyframes (call model.eval())"
            )
        self._check_image(srcs, "srcs", 5)
        b, t = srcs.shape[:2]
        if t == 0:
            raise ValueError("GIResNetGenerator needs at least one keyframe (srcs has T = 0)")
        xhr, xlr = self.encode_modules(srcs.reshape(b * t, *srcs.shape[2:]))
        return self._source_pass(xhr, xlr, b, t, (srcs.shape[-2], srcs.shape[-1]))

    def forward(
        self,
        input: Tensor,
        srcs: Tensor | None = None,
        return_attn: bool = False,
        flows: Tensor | None = None,
        flow_errs: Tensor | None = None,
        keyframes: KeyframeState | None = None,
    ) -> Tensor | tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """``input`` (B, C, H, W) target, ``srcs`` (B, T, C, H, W) keyframes (or ``keyframes=`` a cached
        :class:`KeyframeState`, eval mode only), ``flows`` (B, T, 2, H, W) target -> keyframe and ``flow_errs``
        (B, T, 1, H, W) (required when ``is_deformable``). Returns (B, output_nc, H, W), and with ``return_attn``
        also [(read_attn, write_attn)] per block, each (B, read_write_heads, h, w)."""
        self._check_image(input, "input", 4)
        b = input.shape[0]
        size = (input.shape[-2], input.shape[-1])
        if keyframes is not None:
            if self.training:
                raise ValueError(
                    "GIResNetGenerator: keyframes= (a cached KeyframeState) is only valid in eval mode: in training "
                    "BatchNorm uses batch statistics joint over target and keyframes; pass srcs instead"
                )
            if srcs is not None:
                raise ValueError("GIResNetGenerator: pass either srcs or keyframes=, not both")
            if not isinstance(keyframes, KeyframeState):
                raise ValueError(
                    f"GIResNetGenerator: keyframes must be a KeyframeState, got {type(keyframes).__name__}"
                )
            if keyframes.batch_size not in (1, b):
                raise ValueError(
                    f"GIResNetGenerator: keyframe state batch size {keyframes.batch_size} does not match the input "
                    f"batch size {b} (must be equal or 1)"
                )
            if keyframes.image_size != size:
                raise ValueError(
                    f"GIResNetGenerator: keyframe state image size {keyframes.image_size} does not match the input "
                    f"size {size}"
                )
            if self.uses_keyframe_blocks and (
                len(keyframes.kv) < self.n_src_blocks or len(keyframes.src_lifs) < self.n_src_blocks
            ):
                raise ValueError(
                    f"GIResNetGenerator: keyframe state holds {len(keyframes.kv)} blocks, the model needs "
                    f"{self.n_src_blocks} (was it made by this model?)"
                )
            t = keyframes.num_keyframes
        else:
            if srcs is None:
                raise ValueError("GIResNetGenerator: srcs (B, T, C, H, W) keyframes are required (or keyframes=)")
            self._check_image(srcs, "srcs", 5)
            if srcs.shape[0] != b:
                raise ValueError(f"GIResNetGenerator: batch size mismatch: input has {b}, srcs has {srcs.shape[0]}")
            if tuple(srcs.shape[-3:]) != tuple(input.shape[-3:]):
                raise ValueError(
                    f"GIResNetGenerator: srcs frames {tuple(srcs.shape[-3:])} do not match the input "
                    f"{tuple(input.shape[-3:])} (channel / size mismatch)"
                )
            t = srcs.shape[1]
        if t == 0:
            raise ValueError("GIResNetGenerator needs at least one keyframe (srcs has T = 0)")
        if self.is_deformable and self.n_src_blocks > 0:
            self._check_flows(flows, flow_errs, b, t)

        if keyframes is None:
            # target and keyframes through the encoder together (joint BatchNorm statistics in training)
            joint = torch.cat((input.unsqueeze(1), srcs), dim=1).reshape(b * (t + 1), *input.shape[1:])
            xhr, xlr = self.encode_modules(joint)
            xhr = xhr.reshape(b, t + 1, *xhr.shape[1:])
            xlr = xlr.reshape(b, t + 1, *xlr.shape[1:])
            state = self._source_pass(
                xhr[:, 1:].reshape(b * t, *xhr.shape[2:]), xlr[:, 1:].reshape(b * t, *xlr.shape[2:]), b, t, size
            )
            x: Any = (xhr[:, 0], xlr[:, 0])
        else:
            state = keyframes
            if state.batch_size != b:
                state = KeyframeState(
                    kv=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in state.kv],
                    src_lifs=[s.expand(b, -1, -1, -1, -1) for s in state.src_lifs],
                    num_keyframes=t,
                    image_size=size,
                    batch_size=b,
                )
            x = self.encode_modules(input)

        attns: list[tuple[Tensor, Tensor]] = []
        for i, block in enumerate(self.bottleneck_modules):
            uses_src = i < self.n_src_blocks
            kv = state.kv[i] if (self.is_crossattending and uses_src) else None
            x = block(x, return_attn=return_attn, kv=kv)
            if return_attn:
                x, attn = x
                attns.append(attn)
            if self.is_deformable and uses_src:
                x = (self.deformable_writes[i](x[0], state.src_lifs[i], flows, flow_errs), x[1])
        out = self.decode_modules(x)
        return (out, attns) if return_attn else out
