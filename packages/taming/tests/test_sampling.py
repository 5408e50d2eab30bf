"""Sampling: top-k / top-p filtering, cached vs official loop, sliding-window offsets and sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gencore.testing import randomize_parameters
from taming.models.mingpt import GPT
from taming.sampling import sample_tokens, sliding_window_sample, top_k_top_p_filter, window_offset

TINY = dict(vocab_size=64, block_size=65, n_layer=2, n_head=4, n_embd=64)
NEG = float("-inf")


def make(seed: int = 0, **kw: object) -> GPT:
    torch.manual_seed(seed)
    model = GPT(**{**TINY, **kw})
    randomize_parameters(model, seed=seed, std=0.1)  # sharper distributions than the 0.02 init
    return model.eval()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept(logits: Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


# ------------------------------------------------------------------------------------------------------------ filters
def test_top_k_keeps_values_at_least_the_kth_with_ties() -> None:
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0])
    assert kept(top_k_top_p_filter(logits, top_k=1)) == {1, 2}  # both 3s tie with the 1st largest
    assert kept(top_k_top_p_filter(logits, top_k=2)) == {1, 2}
    assert kept(top_k_top_p_filter(logits, top_k=3)) == {1, 2, 3}
    tie = torch.tensor([5.0, 4.0, 4.0, 4.0, 1.0])
    assert kept(top_k_top_p_filter(tie, top_k=2)) == {0, 1, 2, 3}
    out = top_k_top_p_filter(logits, top_k=3)
    assert torch.equal(out[[1, 2, 3]], logits[[1, 2, 3]]) and (out[[0, 4]] == NEG).all()
    rows = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])  # per row, over the last dim
    assert torch.equal(torch.isfinite(top_k_top_p_filter(rows, top_k=1)), torch.eye(3, dtype=torch.bool)[[2, 0]])


def test_filter_does_not_modify_its_input() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    before = logits.clone()
    out = top_k_top_p_filter(logits)
    assert torch.equal(out, before) and out is not logits
    top_k_top_p_filter(logits, top_k=1, top_p=0.5)
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    ("top_p", "expect"),
    [(1e-6, {0}), (0.4, {0}), (0.6, {0, 3}), (0.8, {0, 3, 1}), (0.95, {0, 3, 1, 2}), (1.0, {0, 1, 2, 3})],
)
def test_top_p_smallest_set_reaching_p(top_p: float, expect: set[int]) -> None:
    probs = torch.tensor([0.5, 0.125, 0.125, 0.25])  # sorted: 0.5 (0), 0.25 (3), 0.125 (1 or 2)
    out = top_k_top_p_filter(probs.log(), top_p=top_p)
    if top_p == 0.8:  # the third token is one of the two tied 0.125s
        assert len(kept(out)) == 3 and {0, 3} < kept(out)
    else:
        assert kept(out) == expect


def test_top_k_then_top_p_on_the_renormalised_distribution() -> None:
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    assert kept(top_k_top_p_filter(logits, top_p=0.5)) == {0, 1}  # 0.4 < 0.5 needs the second token
    assert kept(top_k_top_p_filter(logits, top_k=2, top_p=0.5)) == {0}  # 4/7 >= 0.5 after top-k


def test_matches_transformers_warpers() -> None:
    """transformers' old top_k_top_p_filtering = TopKLogitsWarper then TopPLogitsWarper (removed in 4.39)."""
    logits_process = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(16, 100, generator=gen(1)) * 3
    for top_k, top_p in ((None, 0.9), (20, None), (50, 0.7), (5, 0.3), (100, 0.99)):
        ref = logits.clone()
        if top_k is not None:
            ref = logits_process.TopKLogitsWarper(top_k=top_k)(None, ref)
        if top_p is not None:
            ref = logits_process.TopPLogitsWarper(top_p=top_p)(None, ref)
        assert torch.equal(top_k_top_p_filter(logits, top_k=top_k, top_p=top_p), ref), (top_k, top_p)


def test_filter_errors_name_the_bad_values() -> None:
    logits = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="vocab size 10.*top_k=11"):
        top_k_top_p_filter(logits, top_k=11)
    with pytest.raises(ValueError, match="top_k=0"):
        top_k_top_p_filter(logits, top_k=0)
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"top_p must be in \\(0, 1\\], got {p}"):
            top_k_top_p_filter(logits, top_p=p)


# ------------------------------------------------------------------------------------------------------ sample_tokens
@torch.no_grad()
def official_loop(model: GPT, x: Tensor, steps: int, temperature: float, top_k: int | None, g: torch.Generator):
    """Net2NetTransformer.sample (cond_transformer.py): recompute, crop, top_k_logits, softmax, multinomial."""
    cond_len = x.shape[1]
    for _ in range(steps):
        x_cond = x if x.size(1) <= model.block_size else x[:, -model.block_size :]
        logits = model(x_cond)[0][:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, top_k)
            logits = logits.clone()
            logits[logits < v[..., [-1]]] = NEG
        ix = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=g)
        x = torch.cat((x, ix), dim=1)
    return x[:, cond_len:]


def test_uncached_loop_is_the_official_loop() -> None:
    model = make()
    prefix = torch.randint(0, 64, (3, 4), generator=gen(2))
    ours = sample_tokens(model, prefix, 20, temperature=0.8, top_k=10, use_cache=False, generator=gen(3))
    ref = official_loop(model, prefix, 20, 0.8, 10, gen(3))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.7, "top_k": 8},
        {"top_k": 20, "top_p": 0.9},
        {"top_p": 0.8},
        {"greedy": True},
    ],
)
def test_cached_sampling_equals_uncached(kw: dict) -> None:
    model = make()
    prefix = torch.randint(0, 64, (4, 3), generator=gen(4))
    a = sample_tokens(model, prefix, 40, use_cache=True, generator=gen(5), **kw)
    b = sample_tokens(model, prefix, 40, use_cache=False, generator=gen(5), **kw)
    assert a.shape == (4, 40) and a.dtype == torch.long and a.device == prefix.device
    assert torch.equal(a, b)
    assert 0 <= int(a.min()) and int(a.max()) < 64


def test_cached_sampling_with_embeddings_and_bidirectional_prefix() -> None:
    model = make(n_unmasked=6)
    prefix = torch.randint(0, 64, (2, 4), generator=gen(6))
    emb = torch.randn(2, 2, 64, generator=gen(7))
    a = sample_tokens(model, prefix, 30, embeddings=emb, top_k=16, generator=gen(8))
    b = sample_tokens(model, prefix, 30, embeddings=emb, top_k=16, use_cache=False, generator=gen(8))
    assert torch.equal(a, b)


def test_sampling_is_seeded_and_restores_training_mode() -> None:
    model = make().train()
    prefix = torch.zeros(2, 1, dtype=torch.long)
    a = sample_tokens(model, prefix, 10, generator=gen(9))
    assert model.training
    assert torch.equal(a, sample_tokens(model, prefix, 10, generator=gen(9)))
    assert not torch.equal(a, sample_tokens(model, prefix, 10, generator=gen(10)))


def test_context_cropping_and_cache_limit() -> None:
    model = make(block_size=16)
    prefix = torch.zeros(2, 1, dtype=torch.long)
    out = sample_tokens(model, prefix, 30, use_cache=False, generator=gen(11))  # 31 > 16: cropped
    assert out.shape == (2, 30)
    with pytest.raises(ValueError, match="= 30 positions exceed block_size=16; use use_cache=False"):
        sample_tokens(model, prefix, 30, generator=gen(11))
    sample_tokens(model, prefix, 16, generator=gen(11))  # 1 + 15 fed back = 16 fits


def test_sampler_errors() -> None:
    model = make()
    prefix = torch.zeros(1, 2, dtype=torch.long)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"temperature must be > 0, got {t}"):
            sample_tokens(model, prefix, 3, temperature=t)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample_tokens(model, prefix, 0)
    with pytest.raises(ValueError, match="prefix must be a long tensor"):
        sample_tokens(model, prefix.float(), 3)
    with pytest.raises(ValueError, match="at least one prefix token"):
        sample_tokens(model, prefix[:, :0], 3)
    with pytest.raises(ValueError, match="vocab size 64.*top_k=65"):
        sample_tokens(model, prefix, 3, top_k=65)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sliding_window_sample(model, (1, 4, 4), window=4, sos=0, temperature=0.0)


# ----------------------------------------------------------------------------------------------------- sliding window
def test_window_offsets_from_the_official_script() -> None:
    assert [window_offset(i, 32, 16) for i in (3, 20, 28)] == [3, 8, 12]
    assert [window_offset(i, 32, 16) for i in (0, 8, 9, 24, 25, 31)] == [0, 8, 8, 8, 9, 15]
    assert [window_offset(i, 16, 16) for i in range(16)] == list(range(16))  # grid = window: no sliding
    for size, window in ((32, 16), (23, 16), (7, 4), (9, 5)):
        for i in range(size):
            start = i - window_offset(i, size, window)
            assert 0 <= start <= size - window  # the crop lies inside the grid and contains i
    with pytest.raises(ValueError, match="window must be in \\[1, size=8\\], got window=16"):
        window_offset(0, 8, 16)
    with pytest.raises(ValueError, match="position i=8 is outside"):
        window_offset(8, 8, 4)


def test_sliding_window_with_grid_equal_to_window_is_plain_sampling() -> None:
    model = make()
    kw = dict(temperature=0.9, top_k=12, top_p=0.95)
    # unconditional: SOS token
    z = sliding_window_sample(model, (2, 5, 6), window=(5, 6), sos=3, generator=gen(12), **kw)
    ref = sample_tokens(model, torch.full((2, 1), 3), 30, use_cache=False, generator=gen(12), **kw)
    assert z.shape == (2, 5, 6) and torch.equal(z.reshape(2, -1), ref)
    ref_cached = sample_tokens(model, torch.full((2, 1), 3), 30, generator=gen(12), **kw)
    assert torch.equal(z.reshape(2, -1), ref_cached)
    # non-spatial class tokens
    cls = torch.tensor([[7, 1], [9, 2]])
    z = sliding_window_sample(model, (2, 4, 4), window=4, cond=cls, generator=gen(13), **kw)
    assert torch.equal(z.reshape(2, -1), sample_tokens(model, cls, 16, generator=gen(13), **kw))
    # spatial conditioning grid, given flat
    c = torch.randint(0, 64, (2, 16), generator=gen(14))
    z = sliding_window_sample(model, (2, 4, 4), window=4, cond=c, cond_shape=(4, 4), generator=gen(15), **kw)
    assert torch.equal(z.reshape(2, -1), sample_tokens(model, c, 16, generator=gen(15), **kw))


@torch.no_grad()
def official_sliding_window(model: GPT, c: Tensor, h: int, w: int, win: int, top_k: int, g: torch.Generator):
    """scripts/sample_conditional.py generalised from 16 to ``win``: full crop fed, logits[:, -win*win:] indexed."""
    b, half = c.shape[0], win // 2
    idx = torch.zeros(b, h, w, dtype=torch.long)

    def local(i: int, size: int) -> int:
        return i if i <= half else (win - (size - i) if size - i < half else half)

    for i in range(h):
        for j in range(w):
            li, lj = local(i, h), local(j, w)
            i0, j0 = i - li, j - lj
            patch = idx[:, i0 : i0 + win, j0 : j0 + win].reshape(b, -1)
            cpatch = c[:, i0 : i0 + win, j0 : j0 + win].reshape(b, -1)
            logits = model(torch.cat((cpatch, patch), dim=1)[:, :-1])[0]
            logits = logits[:, -win * win :].reshape(b, win, win, -1)[:, li, lj, :]
            v, _ = torch.topk(logits, top_k)
            logits = logits.clone()
            logits[logits < v[..., [-1]]] = NEG
            idx[:, i, j] = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=g)[:, 0]
    return idx


def test_sliding_window_matches_the_official_script_on_a_larger_grid() -> None:
    model = make()
    c = torch.randint(0, 64, (2, 7, 6), generator=gen(16))
    z = sliding_window_sample(model, (2, 7, 6), window=4, cond=c, cond_shape=(7, 6), top_k=10, generator=gen(17))
    ref = official_sliding_window(model, c, 7, 6, 4, 10, gen(17))
    assert torch.equal(z, ref)


def test_sliding_window_feeds_window_crops() -> None:
    """A spy model: every input is [c crop, z crop prefix] of the same window, never longer than the window."""
    model = make()
    seen: list[Tensor] = []
    forward = model.forward

    def spy(idx: Tensor, *a: object, **k: object):
        seen.append(idx.clone())
        return forward(idx, *a, **k)

    model.forward = spy  # type: ignore[method-assign]
    c = torch.arange(8 * 8).reshape(1, 8, 8) % 64  # position-coded conditioning
    z = sliding_window_sample(model, (1, 8, 8), window=4, cond=c, cond_shape=(8, 8), generator=gen(18))
    assert len(seen) == 64
    for n, seq in enumerate(seen):
        i, j = divmod(n, 8)
        i0, j0 = i - window_offset(i, 8, 4), j - window_offset(j, 8, 4)
        assert torch.equal(seq[0, :16], c[0, i0 : i0 + 4, j0 : j0 + 4].reshape(-1))
        li, lj = i - i0, j - j0
        assert seq.shape[1] == 16 + li * 4 + lj
        assert torch.equal(seq[0, 16:], z[0, i0 : i0 + 4, j0 : j0 + 4].reshape(-1)[: li * 4 + lj])
    assert math.prod(z.shape) == 64


def test_sliding_window_errors() -> None:
    model = make()
    c = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of cond"):
        sliding_window_sample(model, (1, 4, 4), window=4)
    with pytest.raises(ValueError, match="exactly one of cond"):
        sliding_window_sample(model, (1, 4, 4), window=4, cond=c, sos=0)
    with pytest.raises(ValueError, match="must fit the grid"):
        sliding_window_sample(model, (1, 4, 4), window=5, sos=0)
    with pytest.raises(ValueError, match="cond_shape \\(2, 8\\) must equal"):
        sliding_window_sample(model, (1, 4, 4), window=4, cond=c, cond_shape=(2, 8))
    with pytest.raises(ValueError, match="exceed block_size=65"):
        sliding_window_sample(model, (1, 6, 6), window=6, cond=torch.zeros(1, 36, dtype=torch.long), cond_shape=(6, 6))


def test_vocab_limit_keeps_draws_among_image_codes():
    torch.manual_seed(0)
    gpt = GPT(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16)
    with torch.no_grad():
        gpt.head.weight[12:] += 5.0  # make the extra (class) ids the most likely ones
    prefix = torch.full((8, 1), 15, dtype=torch.long)
    free = sample_tokens(gpt, prefix, 10)
    limited = sample_tokens(gpt, prefix, 10, vocab_limit=12)
    assert (free >= 12).any() and (limited < 12).all()
    with pytest.raises(ValueError, match="vocab_limit must be in"):
        sample_tokens(gpt, prefix, 2, vocab_limit=21)
