"""The last stage's GPT (taming's minGPT with ImageBART's ``input_vocab_size``): a wider input vocabulary than its
output, a bidirectional ``[t, class]`` prefix (``n_unmasked = 2``) and cached decoding after that prefix."""

from __future__ import annotations

import pytest
import torch

from gencore.testing import randomize_parameters
from imagebart.sampling import gpt_session
from taming.models.mingpt import GPT

V, V_IN, BLOCK = 11, 15, 10


def make(n_unmasked: int = 2, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(
        vocab_size=V, input_vocab_size=V_IN, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, n_unmasked=n_unmasked
    )
    return randomize_parameters(gpt, seed=seed).eval()  # pos_emb starts at zero: make every position distinct


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, BLOCK), generator=torch.Generator().manual_seed(seed))


def test_input_and_output_vocabularies():
    gpt = make()
    assert gpt.tok_emb.weight.shape == (V_IN, 16) and gpt.head.weight.shape == (V, 16)
    x = tokens()
    x[:, 0] = V_IN - 1  # ids in [V, V_IN) (class / stage ids above the codes) are valid inputs
    logits = gpt(x)[0]
    assert logits.shape == (2, BLOCK, V)
    with pytest.raises(ValueError, match=f"input_vocab_size={V_IN}"):
        gpt(x + V_IN)
    # without input_vocab_size the two vocabularies are one
    plain = GPT(vocab_size=V, block_size=BLOCK, n_layer=1, n_head=2, n_embd=16)
    assert plain.tok_emb.weight.shape[0] == V
    with pytest.raises(ValueError, match=f"vocab_size={V}"):
        plain(torch.full((1, 3), V))


def _changed(gpt: GPT, x: torch.Tensor, pos: int) -> torch.Tensor:
    """Per position: whether the output moves when input ``pos`` changes."""
    other = x.clone()
    other[:, pos] = (other[:, pos] + 1) % V
    with torch.no_grad():
        a, b = gpt(x)[0], gpt(other)[0]
    return (a - b).abs().amax(dim=(0, 2)) > 1e-5


def test_two_token_prefix_is_bidirectional_and_the_rest_causal():
    gpt, x = make(n_unmasked=2), tokens()
    assert gpt.n_unmasked == 2
    assert _changed(gpt, x, 1).tolist() == [True] * BLOCK  # position 0 sees token 1 (the class)
    assert _changed(gpt, x, 2).tolist() == [False, False] + [True] * (BLOCK - 2)
    assert _changed(gpt, x, 5).tolist() == [False] * 5 + [True] * (BLOCK - 5)
    # the plain causal GPT: position 0 does not see token 1
    assert _changed(make(n_unmasked=0), x, 1).tolist() == [False] + [True] * (BLOCK - 1)


@pytest.mark.parametrize("prefix_len", [2, 3])
def test_cached_session_after_the_prefix_matches_the_full_forward(prefix_len):
    gpt = make(n_unmasked=2)
    x = tokens(1)
    prefix, rest = x[:, :prefix_len], x[:, prefix_len:]
    with torch.no_grad():
        full = gpt(x)[0][:, prefix_len - 1 :]  # logits for rest[0], ..., rest[-1] and the next token
        for use_cache in (True, False):
            step = gpt_session(gpt, prefix, use_cache=use_cache)
            got = [step(None)] + [step(rest[:, i : i + 1]) for i in range(rest.shape[1] - 1)]
            torch.testing.assert_close(torch.stack(got, 1), full[:, :-1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix must be a long tensor"):
        gpt_session(gpt, prefix.float())
