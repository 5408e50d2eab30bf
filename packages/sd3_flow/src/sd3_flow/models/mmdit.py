"""The MMDiT of Stable Diffusion 3 (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", ICML 2024, arXiv 2403.03206), with the MMDiT-X dual attention of SD3.5.

v_θ(z_t, t, c_vec, c_ctxt) of Sec. 2 / Eq. (1): a velocity network over image latents, conditioned on the timestep,
the pooled text vector and the text token sequence. The parts, in the order of Fig. 2a:

- patching (Sec. 4, Fig. 2a "Patching"): :class:`PatchEmbed`, a Conv2d with kernel = stride = patch, plus a fixed 2-D
  sin-cos table of ``pos_embed_max_size``² positions (a persistent buffer) from which the token grid takes a **centre
  crop** (Sec. 5.3.3, "Positional embeddings", for several aspect ratios); :func:`get_2d_sincos_pos_embed` builds it
  with grid coordinate ``arange(M) / (M / base_size)``, ``base_size = sample_size // patch``;
- conditioning (Fig. 2a "y"): :class:`TimestepTextEmbedding`, the sinusoidal timestep (256 channels,
  :func:`timestep_embedding`, cos first) and the pooled text vector, each through a two-layer SiLU MLP, **added**: the
  only modulation signal; ``context_embedder`` = Linear(joint_attention_dim, D) for the text tokens;
- the MM-DiT block (Sec. 4, Fig. 2b): :class:`JointTransformerBlock`, separate weights per modality (adaLN-Zero
  modulation :class:`AdaLayerNormZero`, q/k/v/out projections, MLP), ONE attention over the concatenated sequence
  [image, text] (:class:`JointAttention`); optional per-head RMSNorm of q and k (Sec. 5.3.2, "QK-normalization",
  :class:`RMSNorm`). The last block's text stream is "pre-only": it only provides keys and values (its norm is an
  :class:`AdaLayerNormContinuous`, no attention output, no MLP). MMDiT-X (SD3.5): in the layers listed in
  ``dual_attention_layers`` an extra image-only self-attention ``attn2`` (:class:`Attention`) runs on the same
  normalised image tokens with its own shift / scale / gate (9 image modulations instead of 6);
- output (Fig. 2a "Modulation, Linear, Unpatching"): ``norm_out`` (adaLN-continuous: LN · (1 + scale) + shift),
  ``proj_out`` Linear(D, p·p·out) and unpatchify;
- the model :class:`MMDiT`, ``forward(latents, context, pooled, timestep)`` with ``timestep = sigma * 1000``;
  :meth:`MMDiT.init_weights` is the adaLN-Zero initialisation of DiT for training from scratch, run by the constructor
  (a fresh model outputs exactly zero; loaded weights replace it);
- presets (:data:`MMDIT_PRESETS`, :func:`mmdit_from_preset`): SD3-medium, SD3.5-medium / large, the paper's
  ``depth = d`` family (:func:`depth_config`: hidden 64·d, d heads, the ``MMDiTX`` rule), the Fashion-MNIST toy, the
  benchmark row and the unit-test size.

Parameter names follow diffusers' ``SD3Transformer2DModel`` (``pos_embed``, ``time_text_embed``,
``context_embedder``, ``transformer_blocks.i.{norm1, norm1_context, attn, attn2, ff, ff_context}``, ``norm_out``,
``proj_out``), so :mod:`sd3_flow.convert` maps to diffusers by identity and to the original Stability layout
(``joint_blocks.i.{x_block, context_block}``, fused ``qkv``, (shift, scale) order) by a table. Chunk orders:
adaLN-Zero = (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, shift_msa2, scale_msa2, gate_msa2]);
adaLN-continuous (``norm_out``, the last block's ``norm1_context``) = (scale, shift).

Implementation notes (outputs and state-dict keys unchanged; fp32 parity with diffusers ~1e-7): each stream's q/k/v
projections run as one matmul over the concatenated weights; the q/k RMSNorms of both streams run as one pass with a
hand-written backward (:class:`_QKNormFunction`, statistics in fp32 as diffusers); modulation and gated residuals are
single ``addcmul`` kernels; every attention (the joint one and MMDiT-X's image-only one) is one
:func:`gencore.attention.attention` call on strided (B, H, L, d) views, without copies or fp32 upcasts; the last
block computes no text queries, since their outputs are discarded (its ``add_q_proj`` / ``norm_added_q`` exist for
checkpoint compatibility and get no gradient, as in diffusers, where the gradient is exactly zero).
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

__all__ = [
    "MMDIT_PRESETS",
    "AdaLayerNormContinuous",
    "AdaLayerNormZero",
    "Attention",
    "FeedForward",
    "JointAttention",
    "JointTransformerBlock",
    "MLPEmbedder",
    "MMDiT",
    "PatchEmbed",
    "RMSNorm",
    "TimestepTextEmbedding",
    "depth_config",
    "get_2d_sincos_pos_embed",
    "mmdit_from_preset",
    "timestep_embedding",
]

LN_EPS = 1e-6  # every LayerNorm (no affine) and the qk RMSNorm


# ------------------------------------------------------------------------------------------------------ helpers


def timestep_embedding(timesteps: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t·f_i) | sin(t·f_i)], f_i = exp(-ln(max_period)·i/half).

    Cos first (diffusers ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)``; the reference
    ``TimestepEmbedder``); odd ``dim`` gets a zero column.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )  # (half,)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2·half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _sincos_1d(embed_dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, embed_dim) = [sin(pos·ω) | cos(pos·ω)], ω_i = 10000^(-i/(embed_dim/2)), in float64."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (embed_dim/2,)
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)  # (M, embed_dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: int, *, base_size: int, device: torch.device | str | None = None
) -> Tensor:
    """The fixed table of a ``grid_size`` × ``grid_size`` token grid, (grid_size², embed_dim) float32, row-major.

    Grid coordinate = arange(M) / (M / base_size) (so the ``base_size`` grid of training spans [0, base_size)).
    Channels: the first half encodes the column (width) coordinate, the second the row (height) one, each
    [sin | cos] (the MAE / DiT / diffusers layout, whose variable names say "h" for the first half).
    """
    if embed_dim % 4:
        raise ValueError(f"get_2d_sincos_pos_embed: embed_dim must be a multiple of 4, got {embed_dim}")
    if grid_size < 1 or base_size < 1:
        raise ValueError(f"get_2d_sincos_pos_embed: grid_size {grid_size} and base_size {base_size} must be >= 1")
    coord = torch.arange(grid_size, dtype=torch.float32, device=device) / (grid_size / base_size) / 1.0  # (M,)
    col = coord[None, :].expand(grid_size, grid_size)  # (M, M): column coordinate of token (i, j)
    row = coord[:, None].expand(grid_size, grid_size)  # (M, M): row coordinate
    emb = torch.cat([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], dim=1)  # (M², D)
    return emb.float()


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """LN(x) (no affine, eps 1e-6) · (1 + scale) + shift; x (B, L, D), shift / scale (B, D)."""
    x = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
    return torch.addcmul(shift[:, None], x, (1 + scale)[:, None])


class _QKNormFunction(torch.autograd.Function):
    """Per-head RMSNorm of stacked queries / keys, y = x · rsqrt(mean(x², -1) + eps) · w, for both streams at once.

    x: (B, T, J, H, d) (J = 1 or 2 for q and / or k), tokens [image (n), text (T − n)]; w_img / w_txt: (J, 1, d), the
    weights of each stream (w_txt None when all tokens are image tokens). The function of diffusers' / the
    reference's ``RMSNorm`` per stream; written with its backward (dx = rstd · (g·w − x̂ · mean(g·w·x̂)),
    dw = Σ g·x̂ per stream) since autograd's decomposition of ``F.rms_norm`` takes about twice as many passes.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w_img: Tensor, w_txt: Tensor | None, n: int, eps: float) -> Tensor:
        # statistics in float32 (as diffusers' RMSNorm) whatever the input precision; output in the input's dtype
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (B, T, J, H, 1)
        rstd = rstd.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        x_hat = x * rstd  # (B, T, J, H, d), float32 or wider
        weight = (
            w_img
            if w_txt is None
            else torch.cat([w_img.expand(n, -1, -1, -1), w_txt.expand(x.shape[1] - n, -1, -1, -1)])
        )
        ctx.n, ctx.dtypes = n, (x.dtype, w_img.dtype)
        ctx.save_for_backward(x_hat, rstd, weight)
        return (x_hat * weight).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x_hat, rstd, weight = ctx.saved_tensors
        (n, (x_dtype, w_dtype)), d = (ctx.n, ctx.dtypes), x_hat.shape[-1]
        grad = grad.to(x_hat.dtype)
        dx = dw_img = dw_txt = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            per_token = (grad * x_hat).sum(0).sum(2)  # (T, J, d)
            dw_img = per_token[:n].sum(0).unsqueeze(1).to(w_dtype)  # (J, 1, d)
            dw_txt = per_token[n:].sum(0).unsqueeze(1).to(w_dtype) if ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[0]:
            grad_w = grad * weight
            dot = torch.linalg.vecdot(grad_w, x_hat).unsqueeze(-1)  # (B, T, J, H, 1)
            dx = torch.addcmul(grad_w, x_hat, dot, value=-1.0 / d).mul_(rstd).to(x_dtype)
        return dx, dw_img, dw_txt, None, None


def _qk_norm(
    x: Tensor, norms_img: Sequence[RMSNorm], norms_txt: Sequence[RMSNorm] = (), n: int | None = None
) -> Tensor:
    """Apply per-stream qk RMSNorms to x (B, T, J, H, d): ``norms_img`` (J modules) to the first n tokens, ``norms_txt``
    to the rest (all tokens are image tokens when ``norms_txt`` is empty)."""
    w_img = torch.stack([m.weight for m in norms_img])[:, None]  # (J, 1, d)
    w_txt = torch.stack([m.weight for m in norms_txt])[:, None] if norms_txt else None
    return _QKNormFunction.apply(x, w_img, w_txt, x.shape[1] if n is None else n, norms_img[0].eps)


def _gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate · y with gate (B, D) broadcast over the sequence: the adaLN-Zero residual."""
    return torch.addcmul(x, gate[:, None], y)


# ------------------------------------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    """Per-head RMSNorm of q / k (Sec. 5.3.2): x / sqrt(mean(x²) + eps) · weight over the last (head) dim."""

    def __init__(self, dim: int, *, eps: float = LN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class PatchEmbed(nn.Module):
    """Latents (B, C, H, W) -> tokens (B, (H/p)·(W/p), D) plus the centre crop of the fixed position table."""

    def __init__(
        self, *, in_channels: int, embed_dim: int, patch_size: int, pos_embed_max_size: int, base_size: int
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        table = get_2d_sincos_pos_embed(embed_dim, pos_embed_max_size, base_size=base_size)
        self.register_buffer("pos_embed", table[None], persistent=True)  # (1, M², D)

    def cropped_pos_embed(self, h: int, w: int) -> Tensor:
        """(1, h·w, D): the centre h × w window (top = (M − h)//2, left = (M − w)//2) of the M × M table."""
        m = self.pos_embed_max_size
        if h > m or w > m:
            raise ValueError(
                f"token grid {h}x{w} is larger than the position table ({m}x{m}, pos_embed_max_size={m}): "
                f"use latents of at most {m * self.patch_size}x{m * self.patch_size}"
            )
        top, left = (m - h) // 2, (m - w) // 2
        table = self.pos_embed.view(1, m, m, -1)[:, top : top + h, left : left + w]  # (1, h, w, D)
        return table.reshape(1, h * w, -1)

    def forward(self, latents: Tensor) -> Tensor:
        p = self.patch_size
        h, w = latents.shape[-2] // p, latents.shape[-1] // p
        x = self.proj(latents).flatten(2).transpose(1, 2)  # (B, h·w, D)
        return (x + self.cropped_pos_embed(h, w).to(x.dtype)).contiguous()


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (``linear_1``, ``linear_2``), for the timestep and the pooled text vector."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimestepTextEmbedding(nn.Module):
    """c = MLP(sincos_256(t)) + MLP(pooled): the vector that modulates every block (Fig. 2a, "y")."""

    def __init__(self, *, embed_dim: int, pooled_projection_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.timestep_embedder = MLPEmbedder(frequency_dim, embed_dim)
        self.text_embedder = MLPEmbedder(pooled_projection_dim, embed_dim)

    def forward(self, timestep: Tensor, pooled: Tensor) -> Tensor:
        t_freq = timestep_embedding(timestep, self.frequency_dim).to(pooled.dtype)  # (B, 256)
        return self.timestep_embedder(t_freq) + self.text_embedder(pooled)  # (B, D)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero modulation: SiLU(c) -> Linear(D, n·D) -> n chunks of (B, D) (shift, scale, gate, ...)."""

    def __init__(self, dim: int, num_chunks: int = 6) -> None:
        super().__init__()
        self.num_chunks = num_chunks
        self.linear = nn.Linear(dim, num_chunks * dim)

    def forward(self, temb: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.num_chunks, dim=1)


class AdaLayerNormContinuous(nn.Module):
    """LN(x) · (1 + scale) + shift with (scale, shift) = Linear(SiLU(c)) chunked in that order (diffusers')."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=1)
        return _modulate(x, shift, scale)


class Attention(nn.Module):
    """Multi-head self-attention of one stream: ``to_q/k/v``, optional ``norm_q/k`` (RMSNorm per head), ``to_out.0``.

    Used alone as MMDiT-X's image-only ``attn2``; :class:`JointAttention` adds the text stream's projections.
    """

    def __init__(self, *, dim: int, num_heads: int, head_dim: int, qk_norm: str | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(head_dim) if qk_norm == "rms_norm" else None
        self.norm_k = RMSNorm(head_dim) if qk_norm == "rms_norm" else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # index 0 as diffusers (its index 1 is a dropout)

    def _project(self, x: Tensor, projs: Sequence[nn.Linear]) -> Tensor:
        """(B, L, D) -> (B, L, len(projs), H, d) from one matmul over the concatenated weights."""
        weight = torch.cat([p.weight for p in projs])  # (n·H·d, D)
        bias = torch.cat([p.bias for p in projs])
        return F.linear(x, weight, bias).unflatten(-1, (len(projs), self.num_heads, self.head_dim))

    def forward(self, x: Tensor) -> Tensor:
        qkv = self._project(x, (self.to_q, self.to_k, self.to_v))  # (B, L, 3, H, d)
        if self.norm_q is None:
            q, k, v = qkv.transpose(1, 3).unbind(2)  # (B, H, L, d) views
        else:
            qk, v = qkv.split([2, 1], dim=2)
            q, k = _qk_norm(qk, (self.norm_q, self.norm_k)).transpose(1, 3).unbind(2)  # (B, H, L, d)
            v = v.squeeze(2).transpose(1, 2)
        out = attention(q, k, v).transpose(1, 2).flatten(2)  # (B, L, H·d)
        return self.to_out[0](out)


class JointAttention(Attention):
    """The MM-DiT attention (Fig. 2b): per-modality q/k/v (``to_*`` image, ``add_*_proj`` text) and qk-norms, one
    softmax over the sequence [image, text], outputs split back through ``to_out.0`` and ``to_add_out``.

    ``context_pre_only`` (the last block): the text stream gives keys and values only, so ``to_add_out`` is absent and
    the text queries, whose outputs would be discarded, are not computed (``add_q_proj`` / ``norm_added_q`` of that
    block exist for checkpoint compatibility but do not affect the output, in diffusers and the reference alike).
    """

    def __init__(
        self, *, dim: int, num_heads: int, head_dim: int, qk_norm: str | None = None, context_pre_only: bool = False
    ) -> None:
        super().__init__(dim=dim, num_heads=num_heads, head_dim=head_dim, qk_norm=qk_norm)
        inner = num_heads * head_dim
        self.context_pre_only = context_pre_only
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        self.norm_added_q = RMSNorm(head_dim) if qk_norm == "rms_norm" else None
        self.norm_added_k = RMSNorm(head_dim) if qk_norm == "rms_norm" else None
        self.to_add_out = None if context_pre_only else nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor) -> tuple[Tensor, Tensor | None]:  # type: ignore[override]
        """x (B, N, D), context (B, L, D) -> (image output (B, N, D), text output (B, L, D) or None if pre-only)."""
        n, m = x.shape[1], context.shape[1]
        img = self._project(x, (self.to_q, self.to_k, self.to_v))  # (B, N, 3, H, d)
        if self.context_pre_only:  # the text stream gives keys and values only
            txt = self._project(context, (self.add_k_proj, self.add_v_proj))  # (B, L, 2, H, d)
            q, kv_img = img.split([1, 2], dim=2)
            k, v = torch.cat([kv_img, txt], dim=1).split(1, dim=2)  # (B, N + L, 1, H, d): [image, text]
            if self.norm_q is not None:
                q = _qk_norm(q, (self.norm_q,))
                k = _qk_norm(k, (self.norm_k,), (self.norm_added_k,), n)
            q, k, v = (t.squeeze(2).transpose(1, 2) for t in (q, k, v))  # (B, H, N | N + L, d)
        else:
            txt = self._project(context, (self.add_q_proj, self.add_k_proj, self.add_v_proj))  # (B, L, 3, H, d)
            qkv = torch.cat([img, txt], dim=1)  # (B, N + L, 3, H, d): [image, text]
            if self.norm_q is None:
                q, k, v = qkv.transpose(1, 3).unbind(2)  # (B, H, N + L, d) views
            else:  # q and k of both streams in one pass
                qk, v = qkv.split([2, 1], dim=2)
                qk = _qk_norm(qk, (self.norm_q, self.norm_k), (self.norm_added_q, self.norm_added_k), n)
                q, k = qk.transpose(1, 3).unbind(2)  # (B, H, N + L, d)
                v = v.squeeze(2).transpose(1, 2)
        out = attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N[+L], H·d)
        if self.context_pre_only:
            return self.to_out[0](out), None
        x_out, c_out = out.split([n, m], dim=1)
        return self.to_out[0](x_out), self.to_add_out(c_out)


class FeedForward(nn.Module):
    """Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D), keyed ``net.0.proj`` / ``net.2`` as diffusers."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        hidden = mult * dim
        proj_in = nn.Module()
        proj_in.proj = nn.Linear(dim, hidden)
        self.net = nn.ModuleList([proj_in, nn.Identity(), nn.Linear(hidden, dim)])  # index 1: diffusers' dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))


class JointTransformerBlock(nn.Module):
    """One MM-DiT block (Fig. 2b): two streams, adaLN-Zero modulated, mixed by one joint attention.

    x ← x + g_msa ⊙ Attn_x(mod(x)) [+ g_msa2 ⊙ Attn2(mod2(x)) in MMDiT-X], x ← x + g_mlp ⊙ MLP(mod(x)); the same for
    the text tokens c with their own weights, except in the ``context_pre_only`` block where c only feeds attention.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        head_dim: int,
        context_pre_only: bool = False,
        qk_norm: str | None = None,
        use_dual_attention: bool = False,
    ) -> None:
        super().__init__()
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = AdaLayerNormZero(dim, 9 if use_dual_attention else 6)
        self.norm1_context: nn.Module = AdaLayerNormContinuous(dim) if context_pre_only else AdaLayerNormZero(dim, 6)
        self.attn = JointAttention(
            dim=dim, num_heads=num_heads, head_dim=head_dim, qk_norm=qk_norm, context_pre_only=context_pre_only
        )
        self.attn2 = (
            Attention(dim=dim, num_heads=num_heads, head_dim=head_dim, qk_norm=qk_norm) if use_dual_attention else None
        )
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, temb: Tensor) -> tuple[Tensor, Tensor | None]:
        """x (B, N, D) image tokens, context (B, L, D) text tokens, temb (B, D) -> (x, context or None if pre-only)."""
        mods = self.norm1(temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_norm = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
        x_mod = torch.addcmul(shift_msa[:, None], x_norm, (1 + scale_msa)[:, None])
        if self.context_pre_only:
            c_mod = self.norm1_context(context, temb)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            c_mod = _modulate(context, c_shift_msa, c_scale_msa)

        x_attn, c_attn = self.attn(x_mod, c_mod)
        x_out = _gated_add(x, gate_msa, x_attn)
        if self.attn2 is not None:  # MMDiT-X: image-only attention on the same normalised x, its own modulation
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x_mod2 = torch.addcmul(shift_msa2[:, None], x_norm, (1 + scale_msa2)[:, None])
            x_out = _gated_add(x_out, gate_msa2, self.attn2(x_mod2))
        x_out = _gated_add(x_out, gate_mlp, self.ff(_modulate(x_out, shift_mlp, scale_mlp)))

        if self.context_pre_only:
            return x_out, None
        context = _gated_add(context, c_gate_msa, c_attn)
        context = _gated_add(context, c_gate_mlp, self.ff_context(_modulate(context, c_shift_mlp, c_scale_mlp)))
        return x_out, context


# -------------------------------------------------------------------------------------------------------- model


class MMDiT(nn.Module):
    """SD3's multimodal diffusion transformer (Fig. 2): velocity v(z_t, t) from latents, text tokens and pooled text.

    Keyword arguments as diffusers' ``SD3Transformer2DModel``:
        sample_size: training latent size (sets the position grid scale, base_size = sample_size // patch_size).
        patch_size, in_channels, out_channels (default: in_channels).
        num_layers, attention_head_dim, num_attention_heads: D = heads · head_dim.
        joint_attention_dim: width of the text tokens; caption_projection_dim: their width after ``context_embedder``
            (must equal D; default D).
        pooled_projection_dim: width of the pooled text vector.
        pos_embed_max_size: side of the fixed position table (the largest token grid).
        dual_attention_layers: block indices with MMDiT-X's extra image-only attention (SD3.5).
        qk_norm: None or "rms_norm".
        gradient_checkpointing: recompute each block in the backward pass (``torch.utils.checkpoint``).
    """

    def __init__(
        self,
        *,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int | None = None,
        pooled_projection_dim: int = 2048,
        out_channels: int | None = None,
        pos_embed_max_size: int = 96,
        dual_attention_layers: Sequence[int] = (),
        qk_norm: str | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        for name, val in (
            ("sample_size", sample_size),
            ("patch_size", patch_size),
            ("in_channels", in_channels),
            ("num_layers", num_layers),
            ("attention_head_dim", attention_head_dim),
            ("num_attention_heads", num_attention_heads),
            ("joint_attention_dim", joint_attention_dim),
            ("pooled_projection_dim", pooled_projection_dim),
            ("pos_embed_max_size", pos_embed_max_size),
        ):
            if int(val) != val or val < 1:
                raise ValueError(f"MMDiT: {name} must be a positive integer, got {val!r}")
        inner = num_attention_heads * attention_head_dim
        if caption_projection_dim is None:
            caption_projection_dim = inner
        if caption_projection_dim != inner:
            raise ValueError(
                f"MMDiT: caption_projection_dim ({caption_projection_dim}) must equal num_attention_heads * "
                f"attention_head_dim ({num_attention_heads} * {attention_head_dim} = {inner}): the text tokens share "
                "the joint attention's width"
            )
        if inner % 4:
            raise ValueError(f"MMDiT: hidden size {inner} must be a multiple of 4 (2-D sin-cos position table)")
        if sample_size < patch_size:
            raise ValueError(f"MMDiT: sample_size {sample_size} is smaller than patch_size {patch_size}")
        if qk_norm not in (None, "rms_norm"):
            raise ValueError(f"MMDiT: qk_norm must be None or 'rms_norm', got {qk_norm!r}")
        dual = tuple(sorted({int(i) for i in dual_attention_layers}))
        bad = [i for i in dual if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"MMDiT: dual_attention_layers {bad} outside the {num_layers} layers")
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels < 1:
            raise ValueError(f"MMDiT: out_channels must be >= 1, got {out_channels}")

        self.config: dict[str, Any] = dict(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size,
            dual_attention_layers=dual,
            qk_norm=qk_norm,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.patch_size, self.in_channels, self.out_channels = patch_size, in_channels, out_channels
        self.inner_dim = inner
        self.joint_attention_dim, self.pooled_projection_dim = joint_attention_dim, pooled_projection_dim
        self.gradient_checkpointing = gradient_checkpointing

        self.pos_embed = PatchEmbed(
            in_channels=in_channels,
            embed_dim=inner,
            patch_size=patch_size,
            pos_embed_max_size=pos_embed_max_size,
            base_size=sample_size // patch_size,
        )
        self.time_text_embed = TimestepTextEmbedding(embed_dim=inner, pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                JointTransformerBlock(
                    dim=inner,
                    num_heads=num_attention_heads,
                    head_dim=attention_head_dim,
                    context_pre_only=i == num_layers - 1,
                    qk_norm=qk_norm,
                    use_dual_attention=i in dual,
                )
                for i in range(num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(inner)
        self.proj_out = nn.Linear(inner, patch_size * patch_size * out_channels)
        self.init_weights()  # every from-scratch path starts from adaLN-Zero (loaders overwrite it)

    @torch.no_grad()
    def init_weights(self) -> MMDiT:
        """adaLN-Zero initialisation (DiT, Peebles & Xie 2023) for training from scratch; the constructor calls it.

        Xavier-uniform Linear weights and zero biases; the patch conv as a Linear (xavier on its flattened weight);
        N(0, 0.02²) for the timestep and pooled-text MLPs; qk-norm weights 1; **zero** every modulation Linear (so all
        gates, shifts and scales start at 0: each block is the identity) and ``proj_out`` (the output starts at 0).
        The position table is fixed and left alone.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        for mlp in (self.time_text_embed.timestep_embedder, self.time_text_embed.text_embedder):
            nn.init.normal_(mlp.linear_1.weight, std=0.02)
            nn.init.normal_(mlp.linear_2.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, (AdaLayerNormZero, AdaLayerNormContinuous)):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        return self

    def _check_inputs(self, latents: Tensor, context: Tensor, pooled: Tensor, timestep: Tensor) -> Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.in_channels:
            raise ValueError(f"MMDiT: latents must be (B, {self.in_channels}, H, W), got shape {tuple(latents.shape)}")
        b, _, h, w = latents.shape
        p, m = self.patch_size, self.pos_embed.pos_embed_max_size
        if h % p or w % p:
            raise ValueError(f"MMDiT: latent size {h}x{w} is not divisible by the patch size {p}")
        if h // p > m or w // p > m:
            raise ValueError(
                f"MMDiT: latent size {h}x{w} gives a {h // p}x{w // p} token grid, larger than the position table "
                f"(pos_embed_max_size={m}, at most {m * p}x{m * p} latents)"
            )
        if context.dim() != 3 or context.shape[-1] != self.joint_attention_dim or context.shape[0] != b:
            raise ValueError(
                f"MMDiT: context must be (B={b}, L, joint_attention_dim={self.joint_attention_dim}), "
                f"got shape {tuple(context.shape)}"
            )
        if pooled.dim() != 2 or pooled.shape[-1] != self.pooled_projection_dim or pooled.shape[0] != b:
            raise ValueError(
                f"MMDiT: pooled must be (B={b}, pooled_projection_dim={self.pooled_projection_dim}), "
                f"got shape {tuple(pooled.shape)}"
            )
        timestep = torch.as_tensor(timestep, device=latents.device)
        if timestep.dim() == 0:
            timestep = timestep.expand(b)
        if timestep.shape != (b,):
            raise ValueError(f"MMDiT: timestep must be a scalar or have shape ({b},), got {tuple(timestep.shape)}")
        return timestep

    def forward(
        self,
        latents: Tensor,
        context: Tensor,
        pooled: Tensor,
        timestep: Tensor,
        *,
        skip_layers: Sequence[int] = (),
    ) -> Tensor:
        """latents (B, C, H, W), context (B, L, joint_dim), pooled (B, pooled_dim), timestep (B,) = sigma·1000
        -> velocity (B, out_channels, H, W). ``skip_layers``: blocks to bypass (SD3.5 skip-layer guidance)."""
        b, _, h, w = latents.shape
        p = self.patch_size
        x, c, temb = self._embed(latents, context, pooled, timestep)
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip_layers:
                x, c = self._block(block, x, c, temb)
        x = self.proj_out(self.norm_out(x, temb))  # (B, N, p·p·out)
        x = x.view(b, h // p, w // p, p, p, self.out_channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, h, w)  # unpatchify

    def _embed(self, latents: Tensor, context: Tensor, pooled: Tensor, timestep: Tensor) -> tuple[Tensor, ...]:
        timestep = self._check_inputs(latents, context, pooled, timestep)
        x = self.pos_embed(latents)  # (B, N, D), N = (H/p)·(W/p)
        temb = self.time_text_embed(timestep, pooled)  # (B, D)
        return x, self.context_embedder(context), temb  # context tokens (B, L, D)

    def _block(self, block: nn.Module, x: Tensor, c: Tensor, temb: Tensor) -> tuple[Tensor, Tensor]:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, temb, use_reentrant=False)
        return block(x, c, temb)

    def block_features(
        self, latents: Tensor, context: Tensor, pooled: Tensor, timestep: Tensor, layers: Sequence[int]
    ) -> list[Tensor]:
        """The image tokens after each block in ``layers`` as 2-D maps ``(B, D, H/p, W/p)``, for a discriminator on
        the model's own features (LADD, Sauer et al. 2024, Sec. 3); the pass stops after the last of them. Gradients
        flow to the inputs (the parameters may be frozen)."""
        layers = sorted({int(i) for i in layers})
        if not layers or layers[0] < 0 or layers[-1] >= len(self.transformer_blocks):
            raise ValueError(
                f"MMDiT.block_features: layers must be indices in 0..{len(self.transformer_blocks) - 1}, got {layers}"
            )
        b, _, h, w = latents.shape
        p = self.patch_size
        x, c, temb = self._embed(latents, context, pooled, timestep)
        out = []
        for i, block in enumerate(self.transformer_blocks[: layers[-1] + 1]):
            x, c = self._block(block, x, c, temb)
            if i in layers:
                out.append(x.transpose(1, 2).reshape(b, x.shape[-1], h // p, w // p))
        return out


# ------------------------------------------------------------------------------------------------------ presets

_SD3 = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
)


def depth_config(depth: int, **overrides: Any) -> dict[str, Any]:
    """The paper's model family (Sec. 5.3.3): depth d, hidden 64·d, d heads of 64 (the reference ``MMDiTX`` rule),
    SD3's 16-channel patch-2 latents, CLIP+T5 context (4096) and pooled CLIP (2048), a 192² position table.
    d = 24 is SD3-medium (2B); d = 38 the 8B model."""
    if int(depth) != depth or depth < 1:
        raise ValueError(f"depth_config: depth must be a positive integer, got {depth!r}")
    cfg = dict(
        _SD3,
        num_layers=depth,
        num_attention_heads=depth,
        caption_projection_dim=64 * depth,
        pos_embed_max_size=192,
        dual_attention_layers=(),
        qk_norm=None,
    )
    return {**cfg, **overrides}


MMDIT_PRESETS: dict[str, dict[str, Any]] = {
    # stabilityai/stable-diffusion-3-medium-diffusers/transformer: 2,028,328,000 parameters
    "sd3_medium": depth_config(24),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, dual attention in layers 0..12, qk RMSNorm, 384² table (2.243B)
    "sd35_medium": depth_config(24, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    # stabilityai/stable-diffusion-3.5-large: d = 38, qk RMSNorm (8.057B)
    "sd35_large": depth_config(38, qk_norm="rms_norm"),
    # Fashion-MNIST toy: 16x8x8 latents of the toy VAE, patch 1 -> 64 tokens; MiniLM tokens / pooled (384)
    "fmnist_tiny": dict(
        sample_size=8,
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=384,
        caption_projection_dim=128,
        pooled_projection_dim=384,
        pos_embed_max_size=8,
        dual_attention_layers=(),
        qk_norm="rms_norm",
    ),
    # shared/design/BENCHMARKS.md "MMDiT fwd+bwd": latents (4, 16, 32, 32) -> 16x16 tokens, text (4, 77, 512)
    "bench": dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=64,
        num_attention_heads=4,
        joint_attention_dim=512,
        caption_projection_dim=256,
        pooled_projection_dim=128,
        pos_embed_max_size=32,
        dual_attention_layers=(),
        qk_norm="rms_norm",
    ),
    # unit tests (the reference's tiny diffusers config, 82,368 parameters)
    "tiny": dict(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=48,
        pos_embed_max_size=16,
        dual_attention_layers=(),
        qk_norm="rms_norm",
    ),
}


def mmdit_from_preset(name: str, **overrides: Any) -> MMDiT:
    """``MMDiT(**MMDIT_PRESETS[name], **overrides)``; ``"depth<d>"`` (e.g. ``"depth18"``) gives :func:`depth_config`."""
    if name.startswith("depth") and name[5:].isdigit():
        return MMDiT(**depth_config(int(name[5:]), **overrides))
    if name not in MMDIT_PRESETS:
        raise ValueError(f"unknown MMDiT preset {name!r}; choose from {sorted(MMDIT_PRESETS)} or 'depth<d>'")
    return MMDiT(**{**copy.deepcopy(MMDIT_PRESETS[name]), **overrides})
