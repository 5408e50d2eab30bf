"""The GPT of Taming Transformers (Esser, Rombach, Ommer, CVPR 2021, arXiv 2012.09841), Sec. 3.2.

Taming Transformers models an image as the sequence of its VQGAN codebook indices ``s = (s_1, ..., s_n)`` and learns
``p(s) = prod_i p(s_i | s_<i)`` (Eq. 7), or ``p(s | c)`` by prepending the conditioning tokens ``c`` (Eq. 8), with a
decoder-only transformer: the minGPT of the official code (``taming/modules/transformer/mingpt.py``). This module
keeps the official parameter names so official checkpoints load strictly (``transformer.`` prefix stripped):

- ``tok_emb`` (token embedding), ``pos_emb`` (learned positions, zero-initialised), ``drop``;
- ``blocks``: ``n_layer`` pre-LayerNorm blocks, ``x + attn(ln1 x)`` then ``x + mlp(ln2 x)``;
  :class:`CausalSelfAttention` has separate ``key`` / ``query`` / ``value`` / ``proj`` Linears and the persistent
  buffer ``mask`` (1, 1, block_size, block_size): lower-triangular ones whose first ``n_unmasked`` positions attend
  to each other bidirectionally (a conditioning prefix that sees itself whole);
  ``mlp`` = Linear(d, 4d), GELU, Linear(4d, d), Dropout;
- ``ln_f`` and ``head`` (Linear without bias) giving the next-token logits.

Init as minGPT: N(0, 0.02) for Linear and Embedding weights, zero biases, LayerNorm (1, 0). All attention goes through
:func:`gencore.attention.attention`. :meth:`GPT.forward_cached` is the KV-cached decoding of the official
``forward_with_past`` / ``sample_with_past`` (``scripts/sample_fast.py``), on :class:`gencore.attention.KVCache`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.attention import KVCache, attention
from gencore.modules import check_index_range

__all__ = ["GPT", "GPT_PRESETS", "Block", "CausalSelfAttention", "gpt_from_preset"]


# Transformer configurations. The first four are the official configs (configs/*_transformer.yaml; FacesHQ, D-RIN
# and S-FLCKR share one shape: 256 conditioning + 256 image tokens); ``bench`` is the AR-sampling row of
# shared/design/BENCHMARKS.md; ``fmnist`` the toy Fashion-MNIST model (vocab_size given by the caller: 512 codes plus
# room for conditioning tokens); ``tiny`` the official-shaped test config (39 state_dict keys).
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "faceshq": dict(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024),
    "drin": dict(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024),
    "sflckr": dict(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024),
    "coco_scene": dict(
        vocab_size=8192,
        block_size=348,
        n_layer=40,
        n_head=16,
        n_embd=1408,
        embd_pdrop=0.1,
        resid_pdrop=0.1,
        attn_pdrop=0.1,
    ),
    "bench": dict(vocab_size=1024, block_size=512, n_layer=4, n_head=8, n_embd=256),
    "fmnist": dict(block_size=130, n_layer=4, n_head=4, n_embd=128),
    "tiny": dict(vocab_size=64, block_size=65, n_layer=2, n_head=4, n_embd=64),
}


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention with separate key / query / value projections and an output projection."""

    def __init__(
        self,
        *,
        n_embd: int,
        n_head: int,
        block_size: int,
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        n_unmasked: int = 0,
    ) -> None:
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.key = nn.Linear(n_embd, n_embd)
        self.query = nn.Linear(n_embd, n_embd)
        self.value = nn.Linear(n_embd, n_embd)
        self.attn_drop = nn.Dropout(attn_pdrop)
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.proj = nn.Linear(n_embd, n_embd)
        # The official float mask, persistent (it is in every official checkpoint): tril ones, prefix unmasked.
        mask = torch.tril(torch.ones(block_size, block_size))
        mask[:n_unmasked, :n_unmasked] = 1
        self.register_buffer("mask", mask.view(1, 1, block_size, block_size))
        self.n_head = n_head
        self.n_unmasked = n_unmasked

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The loaded mask decides, as in the official code: its first row counts the bidirectional prefix.
        self.n_unmasked = int(self.mask[0, 0, 0].sum().item())

    def _heads(self, t: Tensor) -> Tensor:
        b, length, c = t.shape
        return t.view(b, length, self.n_head, c // self.n_head).transpose(1, 2)  # (B, nh, L, hs)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        b, length, c = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))  # (B, nh, L, hs)
        dropout_p = self.attn_drop.p if self.training else 0.0
        if cache is None:
            if self.n_unmasked > 1:  # the official mask with its bidirectional prefix
                y = attention(q, k, v, mask=self.mask[:, :, :length, :length] != 0, dropout_p=dropout_p)
            else:  # plain lower-triangular mask
                y = attention(q, k, v, causal=True, dropout_p=dropout_p)
        else:
            start = cache.length
            if 0 < start < self.n_unmasked:
                raise ValueError(
                    f"forward_cached: the first call must cover the n_unmasked={self.n_unmasked} bidirectional "
                    f"prefix, but the cache already holds {start} positions (sample without the cache instead)"
                )
            k, v = cache.append(k, v)  # (B, nh, start + L, hs)
            if length == 1:  # one new query at the end sees every cached key
                y = attention(q, k, v, dropout_p=dropout_p)
            else:  # rows start..start+L of the full-sequence mask
                mask = self.mask[:, :, start : start + length, : start + length] != 0
                y = attention(q, k, v, mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(b, length, c)  # (B, L, C): heads side by side
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1 x)``, then ``x + mlp(ln2 x)``."""

    def __init__(
        self,
        *,
        n_embd: int,
        n_head: int,
        block_size: int,
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        n_unmasked: int = 0,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(
            n_embd=n_embd,
            n_head=n_head,
            block_size=block_size,
            attn_pdrop=attn_pdrop,
            resid_pdrop=resid_pdrop,
            n_unmasked=n_unmasked,
        )
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(resid_pdrop),
        )

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """minGPT over codebook indices with a context of ``block_size`` positions (official name and signature)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        block_size: int,
        n_layer: int = 12,
        n_head: int = 8,
        n_embd: int = 256,
        embd_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        attn_pdrop: float = 0.0,
        n_unmasked: int = 0,
        input_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        input_vocab_size = vocab_size if input_vocab_size is None else input_vocab_size
        for name, val in (
            ("vocab_size", vocab_size),
            ("input_vocab_size", input_vocab_size),
            ("block_size", block_size),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
        ):
            if int(val) < 1:
                raise ValueError(f"GPT: {name} must be >= 1, got {val}")
        if not 0 <= n_unmasked <= block_size:
            raise ValueError(f"GPT: n_unmasked must be in [0, block_size={block_size}], got {n_unmasked}")
        for name, val in (("embd_pdrop", embd_pdrop), ("resid_pdrop", resid_pdrop), ("attn_pdrop", attn_pdrop)):
            if not 0.0 <= val < 1.0:
                raise ValueError(f"GPT: {name} must be in [0, 1), got {val}")
        self.vocab_size = vocab_size
        self.input_vocab_size = input_vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_embd = n_embd

        self.tok_emb = nn.Embedding(input_vocab_size, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.drop = nn.Dropout(embd_pdrop)
        self.blocks = nn.Sequential(
            *[
                Block(
                    n_embd=n_embd,
                    n_head=n_head,
                    block_size=block_size,
                    attn_pdrop=attn_pdrop,
                    resid_pdrop=resid_pdrop,
                    n_unmasked=n_unmasked,
                )
                for _ in range(n_layer)
            ]
        )
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def n_unmasked(self) -> int:
        """Length of the bidirectional prefix (read from the, possibly loaded, attention mask)."""
        return self.blocks[0].attn.n_unmasked

    def get_block_size(self) -> int:
        return self.block_size

    # ----------------------------------------------------------------------------------------------------------------
    def _token_embeddings(self, idx: Tensor, embeddings: Tensor | None, start: int) -> Tensor:
        """The checked inputs as (B, E + T, d): optional ``embeddings`` then the token embeddings, no positions."""
        if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            got = f"{idx.dtype} tensor of shape {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"GPT: idx must be a long tensor of shape (B, T), got {got}")
        # ValueError on the CPU; an asynchronous device assertion on an accelerator (no host sync per forward)
        what = "vocab_size" if self.input_vocab_size == self.vocab_size else "input_vocab_size"
        check_index_range(idx, self.input_vocab_size, f"GPT: token ids ({what}={self.input_vocab_size})")
        n_emb = 0
        if embeddings is not None:
            if embeddings.dim() != 3 or embeddings.shape[0] != idx.shape[0] or embeddings.shape[2] != self.n_embd:
                raise ValueError(
                    f"GPT: embeddings must have shape (B={idx.shape[0]}, E, n_embd={self.n_embd}), "
                    f"got {tuple(embeddings.shape)}"
                )
            n_emb = embeddings.shape[1]
        t = idx.shape[1]
        if start + n_emb + t > self.block_size:
            raise ValueError(
                f"GPT: sequence length {n_emb + t} ({n_emb} embeddings + {t} tokens) after {start} cached positions "
                f"exceeds block_size={self.block_size}"
            )
        x = self.tok_emb(idx)  # (B, T, d)
        if embeddings is not None:  # prepend explicit (continuous) embeddings
            x = torch.cat((embeddings.to(x.dtype), x), dim=1)  # (B, E + T, d)
        if x.shape[1] == 0:
            raise ValueError("GPT: nothing to forward (T = 0 and no embeddings)")
        return x

    def _embed(self, idx: Tensor, embeddings: Tensor | None, start: int) -> Tensor:
        """Token embeddings (after optional prepended ``embeddings``) plus positions ``start, start+1, ...``.

        The one step a subclass overrides to condition the input differently (its extra keyword arguments arrive
        through :meth:`forward` / :meth:`forward_cached`, e.g. geofree's WarpGPT takes the warp inputs)."""
        x = self._token_embeddings(idx, embeddings, start)
        return self.drop(x + self.pos_emb[:, start : start + x.shape[1]])

    def _head(self, x: Tensor) -> Tensor:
        return self.head(self.ln_f(x))  # (B, L, vocab_size)

    def forward(
        self, idx: Tensor, embeddings: Tensor | None = None, targets: Tensor | None = None, **embed_kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, E + T, vocab_size) for long ``idx`` (B, T) after optional ``embeddings`` (B, E, n_embd).

        Position ``t`` predicts token ``t + 1``. With ``targets`` (B, E + T) also the mean cross-entropy.
        ``embed_kwargs`` go to :meth:`_embed` (none for this class).
        """
        x = self.blocks(self._embed(idx, embeddings, 0, **embed_kwargs))  # (B, L, d)
        logits = self._head(x)
        loss = None
        if targets is not None:
            if targets.shape != logits.shape[:2]:
                raise ValueError(
                    f"GPT: targets must have shape {tuple(logits.shape[:2])} (one per position), "
                    f"got {tuple(targets.shape)}"
                )
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    # ----------------------------------------------------------------------------------------------------------------
    def make_caches(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> list[KVCache]:
        """One empty :class:`KVCache` per block (dtype / device default to the model's parameters)."""
        max_len = self.block_size if max_len is None else max_len
        if not 1 <= max_len <= self.block_size:
            raise ValueError(f"GPT.make_caches: max_len must be in [1, block_size={self.block_size}], got {max_len}")
        ref = self.tok_emb.weight
        return KVCache.for_layers(
            self.n_layer,
            batch_size,
            self.n_head,
            max_len,
            self.n_embd // self.n_head,
            dtype=ref.dtype if dtype is None else dtype,
            device=ref.device if device is None else device,
        )

    def forward_cached(
        self, idx: Tensor, caches: list[KVCache], embeddings: Tensor | None = None, **embed_kwargs: Any
    ) -> Tensor:
        """Logits (B, E + T, vocab_size) of the new positions, appending their keys / values to ``caches``.

        The new positions start at ``caches[0].length``. The first call may hold a whole prefix (conditioning
        tokens, optional ``embeddings`` first) and must cover the ``n_unmasked`` bidirectional prefix; later calls
        usually feed one token. Equals the matching rows of :meth:`forward` on the whole sequence.
        """
        if len(caches) != self.n_layer:
            raise ValueError(f"GPT.forward_cached: expected {self.n_layer} caches (one per block), got {len(caches)}")
        start = caches[0].length
        if any(c.length != start for c in caches):
            raise ValueError(f"GPT.forward_cached: caches hold different lengths {[c.length for c in caches]}")
        x = self._embed(idx, embeddings, start, **embed_kwargs)  # (B, L, d)
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        return self._head(x)

    # ----------------------------------------------------------------------------------------------------------------
    def optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """The official AdamW groups: decay on Linear weights only; biases, LayerNorm, Embedding, pos_emb undecayed."""
        decay, no_decay = set(), set()
        for mn, m in self.named_modules():
            for pn, _ in m.named_parameters(recurse=False):
                fpn = f"{mn}.{pn}" if mn else pn
                if pn.endswith("bias"):
                    no_decay.add(fpn)
                elif pn.endswith("weight") and isinstance(m, nn.Linear):
                    decay.add(fpn)
                else:  # LayerNorm / Embedding weights and pos_emb
                    no_decay.add(fpn)
        params = dict(self.named_parameters())
        return [
            {"params": [params[n] for n in sorted(decay)], "weight_decay": weight_decay},
            {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
        ]


def gpt_from_preset(name: str, **overrides: Any) -> GPT:
    """``GPT(**GPT_PRESETS[name], **overrides)``; ``fmnist`` needs ``vocab_size`` (codes + conditioning tokens)."""
    if name not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}; valid: {', '.join(GPT_PRESETS)}")
    kwargs = {**GPT_PRESETS[name], **overrides}
    if "vocab_size" not in kwargs:
        raise ValueError(f"GPT preset {name!r} needs vocab_size (e.g. 512 codes + the number of conditioning tokens)")
    return GPT(**kwargs)
