"""The encoder-decoder reverse stages of ImageBART (Esser, Rombach, Blattmann, Ommer, NeurIPS 2021, Sec. 3.2, Fig. 2).

A reverse stage p(x_{t-1} | x_t) for t < T is a BART-style transformer: a bidirectional encoder reads ``[t, (class),
x_t]`` and a causal decoder with cross-attention to it predicts x_{t-1} token by token from a start token. The official
code builds it from its copy of lucidrains' x-transformers (``imagebart/modules/xtransformers/x_transformer.py``); this
module keeps that state-dict layout so released checkpoints load strictly:

- ``{encoder,decoder}.token_emb`` (N(0, 0.02)), ``.pos_emb.emb`` (learned absolute positions, N(0, 0.02)),
  ``.attn_layers.layers.{i}.{0: LayerNorm, 1: block}`` (the third entry, the residual, has no parameters),
  ``.norm`` (final LayerNorm), ``.to_logits`` (also on the encoder, where it is stored but unused);
- attention blocks ``to_q`` / ``to_k`` / ``to_v`` (no bias, inner width heads x dim_head = heads x 64 by default,
  *not* ``dim``) and ``to_out`` (bias); feed-forward ``net.0.0`` (Linear d -> 4d, GELU) and ``net.2`` (Linear 4d -> d);
- pre-norm residual blocks; the decoder's layer ``3i`` is self-attention, ``3i + 1`` cross-attention, ``3i + 2``
  feed-forward; the encoder's ``2i`` attention, ``2i + 1`` feed-forward.

:class:`ResidualScaledXTransformer` is the official stage network for t < T: the decoder's logits are multiplied by
``exp(log_scalors[t - 1])`` and added to the forward process's log-prior ``log(α_t·onehot(x_t) + (1 - α_t)/K)``, so the
network learns a correction to "keep x_t" (``log_scalors`` starts at 0). :class:`XTransformer` without the residual is
the network of the official "custom" configs. Attention goes through :func:`gencore.attention.attention`; decoding is
KV-cached (:meth:`XTransformer.session`): the encoder and the cross-attention keys / values run once per stage, the
decoder's self-attention keeps a :class:`gencore.attention.KVCache` (the official sampler reruns the whole decoder
prefix for each of the 256 tokens; ``use_cache=False`` is that loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from gencore.attention import KVCache, attention
from gencore.modules import check_index_range

__all__ = [
    "XTRANSFORMER_PRESETS",
    "Attention",
    "AttentionLayers",
    "FeedForward",
    "ResidualScaledXTransformer",
    "TransformerWrapper",
    "XTransformer",
]

DEFAULT_DIM_HEAD = 64

# Stage networks for t < T. ``cin_geometric`` / ``ffhq_geometric``: the official 4-scale configs
# (configs/imagenet/4_scales/imagenet_geometric_scale{1,2,3}.yaml,
# configs/ffhq/4_scales/ffhq-geometric-scale{1,2,3}.yaml);
# vocabulary sizes and sequence lengths come from the model (ImageBART fills them in). ``fmnist``: the toy preset over
# 8x8 token grids; ``tiny``: tests.
XTRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "cin_geometric": dict(dim=1152, enc_depth=32, enc_heads=16, dec_depth=6, dec_heads=16),
    "ffhq_geometric": dict(dim=752, enc_depth=18, enc_heads=16, dec_depth=6, dec_heads=16),
    "fmnist": dict(dim=96, enc_depth=2, enc_heads=4, dec_depth=2, dec_heads=4, attn_dim_head=24),
    "tiny": dict(dim=32, enc_depth=1, enc_heads=2, dec_depth=1, dec_heads=2, attn_dim_head=16),
}


def _heads(t: Tensor, h: int) -> Tensor:
    return rearrange(t, "b n (h d) -> b h n d", h=h)


class Attention(nn.Module):
    """Multi-head attention (self or cross) with the x-transformers parameter names."""

    def __init__(
        self, dim: int, *, heads: int = 8, dim_head: int = DEFAULT_DIM_HEAD, causal: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads, self.causal = heads, causal
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Linear(inner, dim)

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, h, Lc, d) of a cross-attention context (computed once per sampled stage)."""
        return _heads(self.to_k(context), self.heads), _heads(self.to_v(context), self.heads)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        context_kv: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        q = _heads(self.to_q(x), self.heads)  # (B, h, L, d)
        cross = context is not None or context_kv is not None
        if cross:
            k, v = context_kv if context_kv is not None else self.context_kv(context)
        else:
            k, v = _heads(self.to_k(x), self.heads), _heads(self.to_v(x), self.heads)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, h, start + L, d)
        # causal masks align bottom-right: new queries see every cached key and the new ones before them
        causal = self.causal and not cross and q.shape[2] > 1
        p = self.dropout.p if self.training else 0.0
        out = attention(q, k, v, causal=causal, dropout_p=p)  # (B, h, L, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedForward(nn.Module):
    """``net = [[Linear(d, mult·d), GELU], Dropout, Linear(mult·d, d)]`` (keys ``net.0.0``, ``net.2``)."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU()), nn.Dropout(dropout), nn.Linear(inner, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Residual(nn.Module):
    """``out + residual`` (the parameter-free third entry of every official layer)."""

    def forward(self, out: Tensor, residual: Tensor) -> Tensor:
        return out + residual


class AttentionLayers(nn.Module):
    """Pre-norm blocks of types ``a`` (self-attention), ``c`` (cross-attention), ``f`` (feed-forward).

    Encoder: ``(a, f) x depth``; decoder (``cross_attend``, ``causal``): ``(a, c, f) x depth``."""

    def __init__(
        self,
        dim: int,
        depth: int,
        *,
        heads: int = 8,
        causal: bool = False,
        cross_attend: bool = False,
        attn_dim_head: int = DEFAULT_DIM_HEAD,
        attn_dropout: float = 0.0,
        ff_mult: int = 4,
        ff_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, val in (("dim", dim), ("depth", depth), ("heads", heads), ("attn_dim_head", attn_dim_head)):
            if int(val) < 1:
                raise ValueError(f"{name} must be >= 1, got {val}")
        self.dim, self.depth, self.causal = dim, depth, causal
        self.layer_types = ("a", "c", "f") * depth if cross_attend else ("a", "f") * depth
        layers = []
        for kind in self.layer_types:
            if kind == "f":
                block: nn.Module = FeedForward(dim, mult=ff_mult, dropout=ff_dropout)
            else:
                block = Attention(
                    dim, heads=heads, dim_head=attn_dim_head, causal=causal and kind == "a", dropout=attn_dropout
                )
            layers.append(nn.ModuleList([nn.LayerNorm(dim), block, Residual()]))
        self.layers = nn.ModuleList(layers)

    @property
    def self_attentions(self) -> list[Attention]:
        return [blk for kind, (_, blk, _) in zip(self.layer_types, self.layers) if kind == "a"]

    @property
    def cross_attentions(self) -> list[Attention]:
        return [blk for kind, (_, blk, _) in zip(self.layer_types, self.layers) if kind == "c"]

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        context_kvs: list[tuple[Tensor, Tensor]] | None = None,
        caches: list[KVCache] | None = None,
    ) -> Tensor:
        i_self = i_cross = 0
        for kind, (norm, block, residual) in zip(self.layer_types, self.layers):
            h = norm(x)
            if kind == "a":
                out = block(h, cache=None if caches is None else caches[i_self])
                i_self += 1
            elif kind == "c":
                kv = None if context_kvs is None else context_kvs[i_cross]
                if kv is None and context is None:
                    raise ValueError("a cross-attending decoder needs the encoder output (context)")
                out = block(h, context, context_kv=kv)
                i_cross += 1
            else:
                out = block(h)
            x = residual(out, x)
        return x


class AbsolutePositionalEmbedding(nn.Module):
    """Learned positions ``emb`` (max_seq_len, dim), N(0, 0.02)."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, length: int, start: int = 0, device: torch.device | None = None) -> Tensor:
        return self.emb(torch.arange(start, start + length, device=device))[None]  # (1, L, dim)


class TransformerWrapper(nn.Module):
    """Token + position embedding, attention layers, final LayerNorm, logits (official ``TransformerWrapper``)."""

    def __init__(
        self, *, num_tokens: int, max_seq_len: int, attn_layers: AttentionLayers, emb_dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_tokens < 1 or max_seq_len < 1:
            raise ValueError(f"num_tokens and max_seq_len must be >= 1, got {num_tokens}, {max_seq_len}")
        dim = attn_layers.dim
        self.num_tokens, self.max_seq_len = num_tokens, max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Identity()  # emb_dim == dim in every official config
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)

    def embed(self, x: Tensor, start: int = 0, what: str = "tokens") -> Tensor:
        if not isinstance(x, Tensor) or x.dtype != torch.long or x.dim() != 2:
            got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{what} must be a long tensor (B, L), got {got}")
        if start + x.shape[1] > self.max_seq_len:
            raise ValueError(f"{what}: {x.shape[1]} positions after {start} exceed max_seq_len={self.max_seq_len}")
        check_index_range(x, self.num_tokens, f"{what} (num_tokens={self.num_tokens})")
        h = self.token_emb(x) + self.pos_emb(x.shape[1], start, x.device)
        return self.project_emb(self.emb_dropout(h))

    def forward(
        self,
        x: Tensor,
        *,
        return_embeddings: bool = False,
        context: Tensor | None = None,
        context_kvs: list[tuple[Tensor, Tensor]] | None = None,
        caches: list[KVCache] | None = None,
        what: str = "tokens",
    ) -> Tensor:
        start = 0 if caches is None else caches[0].length
        h = self.attn_layers(self.embed(x, start, what), context, context_kvs=context_kvs, caches=caches)
        h = self.norm(h)
        return h if return_embeddings else self.to_logits(h)


class XTransformer(nn.Module):
    """Encoder-decoder over token sequences (official ``XTransformer`` with ``wrap_decoder: false``).

    ``forward(src, tgt)`` -> (logits (B, Lt, dec_num_tokens), None): the decoder reads ``tgt`` causally and attends to
    the encoded ``src``. Constructor arguments keep the official ``enc_`` / ``dec_`` names.
    """

    def __init__(
        self,
        *,
        dim: int,
        enc_num_tokens: int,
        enc_max_seq_len: int,
        dec_num_tokens: int,
        dec_max_seq_len: int,
        enc_depth: int = 6,
        enc_heads: int = 8,
        dec_depth: int = 6,
        dec_heads: int = 8,
        attn_dim_head: int = DEFAULT_DIM_HEAD,
        enc_attn_dim_head: int | None = None,
        dec_attn_dim_head: int | None = None,
        enc_attn_dropout: float = 0.0,
        dec_attn_dropout: float = 0.0,
        enc_ff_dropout: float = 0.0,
        dec_ff_dropout: float = 0.0,
        enc_ff_mult: int = 4,
        dec_ff_mult: int = 4,
        enc_emb_dropout: float = 0.0,
        dec_emb_dropout: float = 0.0,
        tie_token_emb: bool = False,
        wrap_decoder: bool = False,
        causal_decoder: bool = True,
    ) -> None:
        super().__init__()
        if wrap_decoder:
            raise ValueError(
                "wrap_decoder=True (the AutoregressiveWrapper, keys decoder.net.*) is not built here: build with "
                "wrap_decoder=False; imagebart.convert maps decoder.net.* checkpoints onto it"
            )
        if tie_token_emb:
            raise ValueError("tie_token_emb=True is not supported (no official ImageBART config uses it)")
        enc = dict(depth=enc_depth, heads=enc_heads, attn_dim_head=enc_attn_dim_head or attn_dim_head)
        enc.update(attn_dropout=enc_attn_dropout, ff_dropout=enc_ff_dropout, ff_mult=enc_ff_mult)
        dec = dict(depth=dec_depth, heads=dec_heads, attn_dim_head=dec_attn_dim_head or attn_dim_head)
        dec.update(attn_dropout=dec_attn_dropout, ff_dropout=dec_ff_dropout, ff_mult=dec_ff_mult)
        self.encoder = TransformerWrapper(
            num_tokens=enc_num_tokens,
            max_seq_len=enc_max_seq_len,
            attn_layers=AttentionLayers(dim, **enc),
            emb_dropout=enc_emb_dropout,
        )
        self.decoder = TransformerWrapper(
            num_tokens=dec_num_tokens,
            max_seq_len=dec_max_seq_len,
            attn_layers=AttentionLayers(dim, causal=causal_decoder, cross_attend=True, **dec),
            emb_dropout=dec_emb_dropout,
        )
        self.dim = dim

    @property
    def num_tokens(self) -> int:
        """The predicted vocabulary (the decoder's)."""
        return self.decoder.num_tokens

    def encode(self, src: Tensor) -> Tensor:
        """Encoder embeddings (B, Ls, dim) after the final LayerNorm (the encoder's ``to_logits`` is unused)."""
        return self.encoder(src, return_embeddings=True, what="encoder input")

    def adjust_logits(self, logits: Tensor, src: Tensor, start: int = 0) -> Tensor:
        """Hook of the residual / scaled variants: the logits of decoder positions ``start ...`` given ``src``."""
        return logits

    def forward(self, src: Tensor, tgt: Tensor, enc: Tensor | None = None) -> tuple[Tensor, None]:
        if enc is None:
            enc = self.encode(src)
        logits = self.decoder(tgt, context=enc, what="decoder input")
        return self.adjust_logits(logits, src), None

    # ------------------------------------------------------------------------------------------ cached decoding
    def session(self, src: Tensor, sos: Tensor, *, use_cache: bool = True) -> Callable[[Tensor | None], Tensor]:
        """A decoding session over the encoded ``src``: ``next_logits(None)`` gives the logits of the first target
        position after the start tokens ``sos`` (B, 1); ``next_logits(tok)`` feeds the token drawn there (B, 1) and
        gives the next position's logits (B, V). ``use_cache=False`` reruns the decoder on the whole prefix each
        step (the official loop); both give the same logits."""
        enc = self.encode(src)
        layers = self.decoder.attn_layers
        if use_cache:
            kvs = [blk.context_kv(enc) for blk in layers.cross_attentions]
            ref = self.decoder.token_emb.weight
            heads = [blk.heads for blk in layers.self_attentions]
            head_dim = layers.self_attentions[0].to_q.out_features // heads[0]
            caches = KVCache.for_layers(
                len(heads),
                src.shape[0],
                heads[0],
                self.decoder.max_seq_len,
                head_dim,
                dtype=ref.dtype,
                device=ref.device,
            )

            def next_logits(tok: Tensor | None) -> Tensor:
                x = sos if tok is None else tok
                start = caches[0].length
                logits = self.decoder(x, context_kvs=kvs, caches=caches, what="decoder input")[:, -1:]
                return self.adjust_logits(logits, src, start + x.shape[1] - 1)[:, 0]

            return next_logits

        seq = [sos]

        def next_logits_uncached(tok: Tensor | None) -> Tensor:
            if tok is not None:
                seq.append(tok)
            tgt = torch.cat(seq, dim=1)
            return self.forward(src, tgt, enc=enc)[0][:, -1]

        return next_logits_uncached


class ResidualScaledXTransformer(XTransformer):
    """The official stage network for t < T: ``logits·exp(log_scalors[t - 1]) + log(α_t·onehot(x_t) + (1 - α_t)/K)``.

    Args (besides :class:`XTransformer`'s): ``scale_pos`` (where t sits in ``src``: 0), ``n_scales`` (T),
    ``xt_start`` / ``xt_size`` (where x_t sits in ``src``: after ``[t]`` or ``[t, class]``, L tokens). The per-step
    α_t (T + 1 values, index 0 = 1) come from the model's schedule through :meth:`set_alphas` (not saved: the
    official network keeps them as a plain attribute too).
    """

    def __init__(self, *, scale_pos: int, n_scales: int, xt_start: int, xt_size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_scales < 1 or xt_size < 1 or scale_pos < 0 or xt_start < 0:
            raise ValueError(
                f"need n_scales >= 1, xt_size >= 1, scale_pos >= 0, xt_start >= 0; got {n_scales}, {xt_size}, "
                f"{scale_pos}, {xt_start}"
            )
        if xt_size > self.decoder.max_seq_len:
            raise ValueError(f"xt_size={xt_size} exceeds the decoder's max_seq_len={self.decoder.max_seq_len}")
        self.scale_pos, self.n_scales = scale_pos, n_scales
        self.xt_start, self.xt_end = xt_start, xt_start + xt_size
        self.log_scalors = nn.Parameter(torch.zeros(n_scales))
        self.register_buffer("scale_alphas", torch.ones(n_scales + 1), persistent=False)
        self.alphas_set = False

    def set_alphas(self, alphas: Tensor) -> None:
        """α_0 ... α_T of the forward process (official name)."""
        alphas = torch.as_tensor(alphas, dtype=torch.float32).flatten()
        if alphas.numel() != self.n_scales + 1:
            raise ValueError(f"set_alphas needs n_scales + 1 = {self.n_scales + 1} values, got {alphas.numel()}")
        self.scale_alphas.copy_(alphas.to(self.scale_alphas.device))
        self.alphas_set = True

    def adjust_logits(self, logits: Tensor, src: Tensor, start: int = 0) -> Tensor:
        if src.shape[1] < self.xt_end:
            raise ValueError(f"src has {src.shape[1]} tokens; x_t should sit at [{self.xt_start}, {self.xt_end})")
        scale = src[:, self.scale_pos] - 1  # t - 1 in [0, T)
        check_index_range(scale, self.n_scales, "the stage token t - 1 at scale_pos")
        if not self.alphas_set:
            raise ValueError("ResidualScaledXTransformer: call set_alphas(schedule alphas) before using it")
        k = self.decoder.num_tokens
        xt = src[:, self.xt_start + start : self.xt_start + start + logits.shape[1]]  # (B, L)
        alpha = self.scale_alphas[scale + 1][:, None, None]  # (B, 1, 1): q(x_t | x_{t-1}) of this stage
        residual = torch.log(alpha * F.one_hot(xt, k).to(logits.dtype) + (1.0 - alpha) / k)  # (B, L, K)
        return logits * torch.exp(self.log_scalors[scale])[:, None, None] + residual


def xtransformer_from_preset(name: str, *, residual: bool = True, **overrides: Any) -> XTransformer:
    """An XTRANSFORMER_PRESETS network (vocabulary / lengths / scale arguments in ``overrides``)."""
    if name not in XTRANSFORMER_PRESETS:
        raise ValueError(f"unknown XTransformer preset {name!r}; valid: {', '.join(XTRANSFORMER_PRESETS)}")
    cls = ResidualScaledXTransformer if residual else XTransformer
    return cls(**{**XTRANSFORMER_PRESETS[name], **overrides})
