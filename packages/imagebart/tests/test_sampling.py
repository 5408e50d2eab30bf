"""The sampler on closed-form sessions: token-by-token decoding, the editing guide, top-k, and the coarse-to-fine
chain's stage order and re-noising weights."""

from __future__ import annotations

import pytest
import torch

from imagebart.sampling import coarse_to_fine, keep_guide, per_stage, sample_sequence

V, B, LEN = 7, 3, 9


def scripted_session(vocab: int = V, batch: int = B):
    """A session whose step i puts all mass on token (3 i) mod V; records what it was fed."""
    fed: list[torch.Tensor | None] = []

    def step(tok: torch.Tensor | None) -> torch.Tensor:
        i = len(fed)
        fed.append(None if tok is None else tok.clone())
        logits = torch.full((batch, vocab), float("-inf"))
        logits[:, (3 * i) % vocab] = 0.0
        return logits

    return step, fed


def fixed_session(logits: torch.Tensor):
    """A session returning the same logits (B, V) at every step."""
    return lambda tok: logits.clone()


def test_sample_sequence_follows_a_scripted_session():
    step, fed = scripted_session()
    out = sample_sequence(step, LEN, temperature=0.7, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([(3 * i) % V for i in range(LEN)]).expand(B, LEN)
    assert out.dtype == torch.long and torch.equal(out, expected)
    # the session is fed the token drawn at the previous position (nothing before the first)
    assert len(fed) == LEN and fed[0] is None
    for i in range(1, LEN):
        assert torch.equal(fed[i], out[:, i - 1 : i])


def test_guide_forces_kept_positions_and_leaves_the_rest_to_the_model():
    logits = torch.zeros(B, V)
    logits[:, 0] = 50.0  # the model wants token 0 everywhere
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(1, V, (B, LEN), generator=g)  # never token 0
    keep = torch.rand(B, LEN, generator=g) < 0.5
    keep[0, 0], keep[0, 1] = True, False
    out = sample_sequence(fixed_session(logits), LEN, guide=keep_guide(clean, keep, V), generator=g)
    assert torch.equal(out[keep], clean[keep])
    assert bool((out[~keep] == 0).all())
    # forcing holds against any finite logits, also with top-k filtering the forced token away
    adversarial = torch.full((B, V), -30.0)
    adversarial[:, 0] = 30.0
    out = sample_sequence(fixed_session(adversarial), LEN, guide=keep_guide(clean, keep, V), top_k=1, generator=g)
    assert torch.equal(out[keep], clean[keep])


def test_keep_guide_values():
    clean = torch.tensor([[2, 0, 4]])
    keep = torch.tensor([[True, False, True]])
    guide = keep_guide(clean, keep, 5)
    assert guide.shape == (1, 3, 5)
    inf = float("-inf")
    assert guide[0, 0].tolist() == [inf, inf, 0.0, inf, inf]
    assert guide[0, 1].tolist() == [0.0] * 5  # resampled: the model decides
    assert guide[0, 2].tolist() == [inf, inf, inf, inf, 0.0]
    with pytest.raises(ValueError, match="must match"):
        keep_guide(clean, keep[:, :2], 5)


def test_top_k_and_vocab_limit():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g)
    out = sample_sequence(fixed_session(logits), 4, top_k=100, generator=g)  # larger than V: no filtering, no error
    assert out.shape == (B, 4) and bool((out < V).all())
    greedy = sample_sequence(fixed_session(logits), 4, top_k=1, generator=g)
    assert torch.equal(greedy, logits.argmax(-1, keepdim=True).expand(B, 4))
    wide = torch.zeros(B, V + 3)
    wide[:, V + 1] = 50.0  # the best id lies beyond the limit (a class / stage id)
    limited = sample_sequence(fixed_session(wide), 20, vocab_limit=V, generator=g)
    assert bool((limited < V).all())


def test_sample_sequence_is_reproducible_with_a_generator():
    logits = torch.zeros(B, V)

    def draw(seed: int) -> torch.Tensor:
        return sample_sequence(fixed_session(logits), 30, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))


def test_sample_sequence_validates():
    step, _ = scripted_session()
    with pytest.raises(ValueError, match="length must be >= 1"):
        sample_sequence(step, 0)
    with pytest.raises(ValueError, match=r"guide must have shape \(B=3, L=9, V=7\)"):
        sample_sequence(scripted_session()[0], LEN, guide=torch.zeros(B, LEN, V + 1))


# ---------------------------------------------------------------------------------------------- coarse to fine
def recorder():
    calls: list[tuple] = []

    def stage(t: int, x: torch.Tensor) -> torch.Tensor:
        calls.append(("stage", t))
        return x + 1

    def renoise(t: int, x: torch.Tensor, weight: float) -> torch.Tensor:
        calls.append(("renoise", t, weight))
        return x * 10

    return stage, renoise, calls


def test_coarse_to_fine_runs_the_stages_from_T_down_to_1():
    stage, renoise, calls = recorder()
    x_T = torch.zeros(2, 4, dtype=torch.long)
    x0, chain = coarse_to_fine(stage, x_T, 3, renoise=renoise, return_chain=True)
    assert calls == [("stage", 3), ("stage", 2), ("stage", 1)]
    assert len(chain) == 4 and chain[0] is x_T
    assert [int(c[0, 0]) for c in chain] == [0, 1, 2, 3] and torch.equal(x0, chain[-1])
    stage, _, _ = recorder()
    assert torch.equal(coarse_to_fine(stage, x_T, 3), x0)  # one chain per stage needs no renoise


def test_several_chains_renoise_with_weights_one_minus_i_over_n():
    stage, renoise, calls = recorder()
    x_T = torch.zeros(1, 2, dtype=torch.long)
    x0, chain = coarse_to_fine(stage, x_T, 3, chains=[1, 3, 2], renoise=renoise, return_chain=True)  # t = 1, 2, 3
    assert calls == [
        ("stage", 3),
        ("renoise", 3, 0.5),
        ("stage", 3),
        ("stage", 2),
        ("renoise", 2, pytest.approx(2 / 3)),
        ("stage", 2),
        ("renoise", 2, pytest.approx(1 / 3)),
        ("stage", 2),
        ("stage", 1),
    ]
    assert len(chain) == 4  # one entry per stage, after its last chain
    assert [int(c[0, 0]) for c in chain] == [0, 11, 1211, 1212] and torch.equal(x0, chain[-1])


def test_coarse_to_fine_validates_chains():
    stage, renoise, _ = recorder()
    x_T = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="need renoise"):
        coarse_to_fine(stage, x_T, 2, chains=2)
    with pytest.raises(ValueError, match="integers >= 1"):
        coarse_to_fine(stage, x_T, 2, chains=0, renoise=renoise)
    with pytest.raises(ValueError, match="chains must be one value or T=2 values"):
        coarse_to_fine(stage, x_T, 2, chains=[1, 1, 1], renoise=renoise)


def test_per_stage():
    assert per_stage(None, 3, "top_k") == [None, None, None]
    assert per_stage(5, 3, "top_k") == [5, 5, 5]
    assert per_stage(0.5, 2, "temperature") == [0.5, 0.5]
    assert per_stage((1, 2, 3), 3, "top_k") == [1, 2, 3]
    with pytest.raises(ValueError, match=r"temperature must be one value or T=3 values .* got \[1.0, 0.5\]"):
        per_stage([1.0, 0.5], 3, "temperature")
