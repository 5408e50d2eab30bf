"""Sampling ImageBART: token-by-token decoding of one reverse stage and the coarse-to-fine chain over the stages.

Sec. 3.3 / 4.3 of the paper, ``ImageBARTSampler.sample`` and ``scripts/inpaint_imagebart.py`` of the official code.
Pure functions over callables, so that any network (ImageBART's stages, taming's GPT for the autoregressive baseline)
and closed-form test models plug in:

- a *session* ``next_logits(tok)`` gives the logits (B, V) of the next position after feeding the token drawn at the
  previous one (``None`` on the first call): :meth:`imagebart.models.xtransformer.XTransformer.session` (encoder once,
  KV-cached decoder) and :func:`gpt_session` (a prefix, then a KV-cached GPT), each with the official recompute loop
  as ``use_cache=False``;
- :func:`sample_sequence` draws ``length`` tokens from a session with temperature and top-k (taming's
  :func:`~taming.sampling.draw_token`) and an additive ``guide`` (B, L, V): ``log onehot(c)`` at the positions to keep
  (0 for the kept code, -inf for every other) and 0 elsewhere, which forces the kept tokens and leaves the rest to the
  model (the official masked editing);
- :func:`coarse_to_fine` runs the stages t = T ... 1 (``sample_stage(t, x_t) -> x_{t-1}``), optionally several chains
  per stage with re-noising in between (the official ``chain_schedule``: redraw probability ``(1 - i/n)·β_t`` before
  chain i).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from taming.sampling import draw_token

__all__ = ["coarse_to_fine", "gpt_session", "keep_guide", "per_stage", "sample_sequence"]

Session = Callable[[Tensor | None], Tensor]


def gpt_session(gpt: nn.Module, prefix: Tensor, *, use_cache: bool = True) -> Session:
    """Decoding session of a GPT (taming's ``GPT``) after the conditioning ``prefix`` (B, P) long."""
    if not isinstance(prefix, Tensor) or prefix.dtype != torch.long or prefix.dim() != 2 or prefix.shape[1] < 1:
        raise ValueError(f"gpt_session: prefix must be a long tensor (B, P) with P >= 1, got {prefix!r:.80}")
    if use_cache:
        caches = gpt.make_caches(prefix.shape[0], device=prefix.device)

        def next_logits(tok: Tensor | None) -> Tensor:
            return gpt.forward_cached(prefix if tok is None else tok, caches)[:, -1]

        return next_logits

    seq = [prefix]

    def next_logits_uncached(tok: Tensor | None) -> Tensor:
        if tok is not None:
            seq.append(tok)
        return gpt(torch.cat(seq, dim=1))[0][:, -1]

    return next_logits_uncached


@torch.no_grad()
def sample_sequence(
    next_logits: Session,
    length: int,
    *,
    guide: Tensor | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``length`` tokens (B, length) long drawn one by one from the session ``next_logits``.

    ``vocab_limit`` keeps the logits of the first ids only (image codes when conditioning ids share the vocabulary);
    ``guide`` (B, length, V') with V' the (limited) vocabulary is added to each position's logits before temperature
    and top-k; ``top_k`` larger than the vocabulary means no filtering.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    out: Tensor | None = None
    tok: Tensor | None = None
    for i in range(length):
        logits = next_logits(tok)  # (B, V)
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        if guide is not None:
            if guide.shape[0] != logits.shape[0] or guide.shape[1] != length or guide.shape[2] != logits.shape[1]:
                raise ValueError(
                    f"guide must have shape (B={logits.shape[0]}, L={length}, V={logits.shape[1]}), "
                    f"got {tuple(guide.shape)}"
                )
            logits = logits + guide[:, i].to(logits.dtype)
        k = None if top_k is None or top_k >= logits.shape[-1] else int(top_k)
        tok = draw_token(logits, temperature=temperature, top_k=k, top_p=None, greedy=False, generator=generator)
        if out is None:
            out = tok.new_empty(tok.shape[0], length)
        out[:, i : i + 1] = tok
    assert out is not None
    return out


def keep_guide(clean: Tensor, keep: Tensor, num_codes: int) -> Tensor:
    """The official editing guide (B, L, K): ``log onehot(clean)`` where ``keep`` (B, L) is true, 0 elsewhere."""
    if clean.shape != keep.shape:
        raise ValueError(f"clean tokens {tuple(clean.shape)} and keep mask {tuple(keep.shape)} must match (B, L)")
    onehot = torch.nn.functional.one_hot(clean, num_codes).bool()  # (B, L, K)
    forced = torch.zeros(onehot.shape, device=clean.device).masked_fill(~onehot, float("-inf"))
    return torch.where(keep.bool()[..., None], forced, torch.zeros_like(forced))


def per_stage(value: float | int | Sequence | None, num_steps: int, name: str) -> list:
    """A per-stage setting as the list [for t = 1, ..., for t = T] (one value is used for every stage)."""
    if value is None or isinstance(value, (int, float)):
        return [value] * num_steps
    values = list(value)
    if len(values) != num_steps:
        raise ValueError(f"{name} must be one value or T={num_steps} values (for t = 1 ... T), got {values}")
    return values


@torch.no_grad()
def coarse_to_fine(
    sample_stage: Callable[[int, Tensor], Tensor],
    x_T: Tensor,
    num_steps: int,
    *,
    chains: Sequence[int] | int = 1,
    renoise: Callable[[int, Tensor, float], Tensor] | None = None,
    return_chain: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """x_0 from x_T through the reverse stages t = T, ..., 1 (``sample_stage(t, x_t) -> x_{t-1}``).

    ``chains`` (one count or T counts for t = 1 ... T): chain i > 0 of stage t first re-noises the current tokens
    with ``renoise(t, x, 1 - i/n)`` (the official chain schedule: redraw probability ``(1 - i/n)·β_t``).
    ``return_chain`` also returns [x_T, x_{T-1}, ..., x_0].
    """
    counts = per_stage(chains, num_steps, "chains")
    if any(int(c) != c or c < 1 for c in counts):
        raise ValueError(f"chains must be integers >= 1, got {counts}")
    if any(c > 1 for c in counts) and renoise is None:
        raise ValueError("several chains per stage need renoise")
    x, trail = x_T, [x_T]
    for t in range(num_steps, 0, -1):
        n = int(counts[t - 1])
        for i in range(n):
            if i > 0:
                x = renoise(t, x, 1.0 - i / n)
            x = sample_stage(t, x)
        trail.append(x)
    return (x, trail) if return_chain else x
