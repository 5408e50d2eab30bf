"""Autoregressive sampling of codebook indices (Taming Transformers, Esser, Rombach, Ommer, CVPR 2021, Sec. 3.2-3.3).

Pure functions over a GPT-like model (``model(idx, embeddings=...) -> (logits, loss)``, ``model.block_size``, and for
the cached path ``make_caches`` / ``forward_cached``, as :class:`taming.models.mingpt.GPT` provides):

- :func:`top_k_top_p_filter`: top-k as the official ``top_k_logits`` (keep every logit >= the k-th largest, ties
  included), then nucleus (top-p) filtering with the semantics of ``transformers.top_k_top_p_filtering``, which the
  official ``scripts/sample_fast.py`` imports and transformers >= 4.39 no longer ships;
- :func:`sample_tokens`: the sampling loop, KV-cached (``sample_with_past``) or the official recompute-the-prefix loop
  (``Net2NetTransformer.sample``, context cropped to ``block_size``); both draw the same tokens for one generator;
- :func:`sliding_window_sample`: the sliding attention window of Sec. 3.3 / ``scripts/sample_conditional.py`` for token
  grids larger than the training window; each position is predicted inside a window-sized crop that contains it.

Devices come from the input tensors (or the model's parameters when there is none).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["draw_token", "sample_tokens", "sliding_window_sample", "top_k_top_p_filter", "window_offset"]


def top_k_top_p_filter(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set the logits outside the top-k and then outside the nucleus of mass ``top_p`` to -inf (over the last dim).

    Top-k keeps every value >= the k-th largest (ties at the k-th value are all kept). Top-p keeps the smallest set
    of most likely tokens whose probability (after top-k) sums to >= ``top_p``, and always at least one token.
    """
    vocab = logits.shape[-1]
    out = logits
    if top_k is not None:
        if int(top_k) != top_k or top_k < 1 or top_k > vocab:
            raise ValueError(f"top_k must be an integer in [1, vocab size {vocab}], got top_k={top_k}")
        kth = torch.topk(logits, int(top_k), dim=-1).values[..., -1:]  # (..., 1): the k-th largest value
        out = out.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p is not None and top_p < 1.0:  # top_p = 1 keeps every token of nonzero probability: nothing to do
        # transformers' TopPLogitsWarper: ascending sort, drop the tail whose mass is <= 1 - top_p, keep the best.
        sorted_logits, order = torch.sort(out, dim=-1, descending=False)
        cum = sorted_logits.float().softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out if out is not logits else logits.clone()


def _check_sampling_args(temperature: float, steps: int | None = None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def draw_token(
    logits: Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    greedy: bool,
    generator: torch.Generator | None,
    vocab_limit: int | None = None,
) -> Tensor:
    """One token per row from the last-position logits (B, V) -> (B, 1) long, ids < ``vocab_limit`` if given:
    temperature, then top-k / top-p (:func:`top_k_top_p_filter`), then a multinomial draw (argmax if ``greedy``)."""
    if vocab_limit is not None:
        if not 1 <= vocab_limit <= logits.shape[-1]:
            raise ValueError(f"vocab_limit must be in [1, {logits.shape[-1]}], got {vocab_limit}")
        logits = logits[..., :vocab_limit]
    logits = top_k_top_p_filter(logits / temperature, top_k=top_k, top_p=top_p)
    if greedy:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class _eval_mode:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    prefix: Tensor,
    steps: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    embeddings: Tensor | None = None,
    use_cache: bool = True,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> Tensor:
    """Sample ``steps`` tokens after ``prefix`` (B, T) long (conditioning / SOS tokens); returns (B, steps) long.

    ``vocab_limit`` restricts the draws to ids below it (image codes, when class tokens share the vocabulary).

    ``embeddings`` (B, E, n_embd) are prepended before the prefix as in ``GPT.forward``. ``use_cache=True`` keeps a
    KV cache (needs E + T + steps - 1 <= block_size); ``use_cache=False`` is the official loop, which reruns the
    model on the whole sequence each step and crops the context to the last ``block_size`` positions. For one
    ``generator`` state both draw the same tokens. ``greedy`` takes the most likely token instead of sampling.
    """
    _check_sampling_args(temperature, steps)
    if not isinstance(prefix, Tensor) or prefix.dim() != 2 or prefix.dtype != torch.long:
        got = f"{prefix.dtype} tensor of shape {tuple(prefix.shape)}" if isinstance(prefix, Tensor) else type(prefix)
        raise ValueError(f"sample_tokens: prefix must be a long tensor of shape (B, T), got {got}")
    n_emb = 0 if embeddings is None else embeddings.shape[1]
    if prefix.shape[1] + n_emb == 0:
        raise ValueError("sample_tokens: needs at least one prefix token or embedding to predict from")
    block_size = int(model.block_size)
    draw = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator, vocab_limit=vocab_limit
    )
    out = prefix.new_empty(prefix.shape[0], steps)
    with _eval_mode(model):
        if use_cache:
            total = n_emb + prefix.shape[1] + steps - 1  # the last sampled token is never fed back
            if total > block_size:
                raise ValueError(
                    f"sample_tokens: {n_emb} embeddings + {prefix.shape[1]} prefix tokens + {steps - 1} fed-back "
                    f"tokens = {total} positions exceed block_size={block_size}; use use_cache=False to crop"
                )
            caches = model.make_caches(prefix.shape[0], total, device=prefix.device)
            logits = model.forward_cached(prefix, caches, embeddings=embeddings)[:, -1]  # (B, V)
            for n in range(steps):
                tok = draw_token(logits, **draw)  # (B, 1)
                out[:, n : n + 1] = tok
                if n + 1 < steps:
                    logits = model.forward_cached(tok, caches)[:, -1]
        else:
            keep = block_size - n_emb  # token positions that fit next to the embeddings
            if keep < 1:
                raise ValueError(f"sample_tokens: {n_emb} embeddings leave no room in block_size={block_size}")
            seq = prefix
            for n in range(steps):
                x_cond = seq if seq.shape[1] <= keep else seq[:, -keep:]  # crop context if needed
                logits = model(x_cond, embeddings=embeddings)[0][:, -1]  # (B, V)
                tok = draw_token(logits, **draw)
                out[:, n : n + 1] = tok
                seq = torch.cat((seq, tok), dim=1)
    return out


def window_offset(i: int, size: int, window: int) -> int:
    """Local index of grid position ``i`` (of ``size``) inside its ``window``-long crop (sample_conditional.py).

    Centred at ``window // 2`` away from the borders, against the border near the ends: for size 32, window 16,
    i = 3 -> 3, i = 20 -> 8, i = 28 -> 12. The crop then starts at ``i - window_offset(i, size, window)``.
    """
    if window < 1 or window > size:
        raise ValueError(f"window must be in [1, size={size}], got window={window}")
    if not 0 <= i < size:
        raise ValueError(f"position i={i} is outside [0, size={size})")
    half = window // 2
    if i <= half:
        return i
    if size - i < window - half:  # (official: < 8 for window 16; window - half keeps odd windows inside the grid)
        return window - (size - i)
    return half


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {v}")
    return v  # type: ignore[return-value]


@torch.no_grad()
def sliding_window_sample(
    model: nn.Module,
    z_shape: Sequence[int],
    *,
    window: int | Sequence[int],
    cond: Tensor | None = None,
    cond_shape: Sequence[int] | None = None,
    sos: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> Tensor:
    """Sample a (B, H, W) token grid larger than the training window, in raster order (official semantics).

    For each position (i, j) the model sees the ``window`` crop that contains it at
    ``(window_offset(i, H, wh), window_offset(j, W, ww))``: the sequence ``[c, z_patch]`` with ``z_patch`` the crop
    of the grid sampled so far (unsampled positions 0, as the official script) in raster order. The conditioning is

    - spatial: ``cond`` a token grid with ``cond_shape`` = (H, W) (given as (B, H, W) or flattened (B, H·W)),
      cropped with the same window (the c patch precedes the z patch);
    - or a fixed non-spatial prefix: ``cond`` (B, Lc) without ``cond_shape`` (class tokens), or ``sos`` (one
      start-of-sequence token, the unconditional models' SOSProvider).

    With H, W equal to the window this is :func:`sample_tokens` on ``[c, z]`` (same tokens for one generator).
    """
    _check_sampling_args(temperature)
    if len(z_shape) != 3:
        raise ValueError(f"z_shape must be (B, H, W), got {tuple(z_shape)}")
    b, h, w = (int(s) for s in z_shape)
    wh, ww = _pair(window, "window")
    if not (1 <= wh <= h and 1 <= ww <= w):
        raise ValueError(f"window {(wh, ww)} must fit the grid {(h, w)}")
    if (cond is None) == (sos is None):
        raise ValueError("sliding_window_sample: give exactly one of cond (tokens) and sos (a start token)")
    spatial = cond_shape is not None
    if cond is not None:
        if cond.dtype != torch.long or cond.shape[0] != b:
            raise ValueError(f"cond must be a long tensor with batch size {b}, got {cond.dtype} {tuple(cond.shape)}")
        device = cond.device
        if spatial:
            if tuple(int(s) for s in cond_shape) != (h, w):
                raise ValueError(f"cond_shape {tuple(cond_shape)} must equal the token grid (H, W) = {(h, w)}")
            if cond.numel() != b * h * w:
                raise ValueError(f"cond of shape {tuple(cond.shape)} does not hold a ({b}, {h}, {w}) grid")
            cond = cond.reshape(b, h, w)
        elif cond.dim() != 2:
            raise ValueError(f"a non-spatial cond must have shape (B, Lc), got {tuple(cond.shape)}")
    else:
        if spatial:
            raise ValueError("cond_shape needs a spatial cond grid, not sos")
        device = next(model.parameters()).device
        cond = torch.full((b, 1), int(sos), dtype=torch.long, device=device)
    n_c = wh * ww if spatial else cond.shape[1]
    block_size = int(model.block_size)
    if n_c + wh * ww - 1 > block_size:
        raise ValueError(
            f"conditioning ({n_c}) + window ({wh}x{ww}) - 1 = {n_c + wh * ww - 1} positions exceed "
            f"block_size={block_size}"
        )
    # Causality lets us feed the sequence only up to the predicted position (the official script feeds the whole
    # crop and indexes the logits); not when the bidirectional prefix reaches into the z patch.
    truncate = int(getattr(model, "n_unmasked", 0)) <= n_c
    draw = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator, vocab_limit=vocab_limit
    )
    z = torch.zeros(b, h, w, dtype=torch.long, device=device)
    with _eval_mode(model):
        for i in range(h):
            li = window_offset(i, h, wh)
            i0 = i - li
            for j in range(w):
                lj = window_offset(j, w, ww)
                j0 = j - lj
                c_part = cond[:, i0 : i0 + wh, j0 : j0 + ww].reshape(b, -1) if spatial else cond
                seq = torch.cat((c_part, z[:, i0 : i0 + wh, j0 : j0 + ww].reshape(b, -1)), dim=1)  # (B, n_c + wh*ww)
                pos = n_c + li * ww + lj - 1  # the logits at this position predict z[i, j]
                if truncate:
                    logits = model(seq[:, : pos + 1])[0][:, -1]
                else:
                    logits = model(seq[:, :-1])[0][:, pos]
                z[:, i, j] = draw_token(logits, **draw)[:, 0]
    return z
