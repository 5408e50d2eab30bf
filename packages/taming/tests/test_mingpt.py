"""GPT of Taming Transformers: official names and init, parity with the official math, masks, cache, validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from gencore.testing import assert_grads_reach_all_parameters, assert_state_dict_roundtrip, randomize_parameters
from taming.models.mingpt import GPT, GPT_PRESETS, gpt_from_preset

TINY = dict(vocab_size=64, block_size=65, n_layer=2, n_head=4, n_embd=64)  # the official test config


def make(seed: int = 0, **kw: object) -> GPT:
    torch.manual_seed(seed)
    model = GPT(**{**TINY, **kw})
    randomize_parameters(model, seed=seed)
    return model.eval()


def official_keys(n_layer: int) -> list[str]:
    """The state_dict keys of the official minGPT (taming/modules/transformer/mingpt.py), in their order."""
    keys = ["pos_emb", "tok_emb.weight"]
    for i in range(n_layer):
        p = f"blocks.{i}."
        keys += [p + "ln1.weight", p + "ln1.bias", p + "ln2.weight", p + "ln2.bias", p + "attn.mask"]
        keys += [p + f"attn.{n}.{t}" for n in ("key", "query", "value", "proj") for t in ("weight", "bias")]
        keys += [p + f"mlp.{n}.{t}" for n in (0, 2) for t in ("weight", "bias")]
    return [*keys, "ln_f.weight", "ln_f.bias", "head.weight"]


def reference_forward(model: GPT, idx: Tensor, n_unmasked: int = 0, embeddings: Tensor | None = None) -> Tensor:
    """The official GPT.forward written out: explicit float mask, masked_fill(-inf), softmax, att @ v."""
    sd = model.state_dict()
    h = model.n_head
    x = sd["tok_emb.weight"][idx]
    if embeddings is not None:
        x = torch.cat((embeddings, x), dim=1)
    b, t, c = x.shape
    x = x + sd["pos_emb"][:, :t]
    mask = torch.tril(torch.ones(model.block_size, model.block_size))
    mask[:n_unmasked, :n_unmasked] = 1
    mask = mask.view(1, 1, model.block_size, model.block_size)

    def lin(y: Tensor, name: str) -> Tensor:
        return y @ sd[name + ".weight"].T + (sd[name + ".bias"] if name + ".bias" in sd else 0)

    def ln(y: Tensor, name: str) -> Tensor:
        return F.layer_norm(y, (c,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)

    for i in range(model.n_layer):
        p = f"blocks.{i}."
        a = ln(x, p + "ln1")
        k = lin(a, p + "attn.key").view(b, t, h, c // h).transpose(1, 2)
        q = lin(a, p + "attn.query").view(b, t, h, c // h).transpose(1, 2)
        v = lin(a, p + "attn.value").view(b, t, h, c // h).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(mask[:, :, :t, :t] == 0, float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + lin(y, p + "attn.proj")
        m = ln(x, p + "ln2")
        x = x + lin(F.gelu(lin(m, p + "mlp.0")), p + "mlp.2")
    return ln(x, "ln_f") @ sd["head.weight"].T


# ------------------------------------------------------------------------------------------------ names, init, presets
def test_official_state_dict_keys_and_mask_buffer() -> None:
    model = GPT(**TINY)
    sd = model.state_dict()
    assert len(sd) == 39
    assert list(sd) == official_keys(2)
    mask = sd["blocks.0.attn.mask"]
    assert mask.shape == (1, 1, 65, 65) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0], torch.tril(torch.ones(65, 65)))
    assert model.head.bias is None
    prefixed = GPT(**TINY, n_unmasked=5).state_dict()["blocks.1.attn.mask"][0, 0]
    assert prefixed[:5, :5].all() and torch.equal(prefixed[5:], torch.tril(torch.ones(65, 65))[5:])


def test_official_init() -> None:
    torch.manual_seed(0)
    model = GPT(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=128)
    assert torch.count_nonzero(model.pos_emb) == 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif name.startswith("ln") or ".ln" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name != "pos_emb":
            assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002, name


def test_presets() -> None:
    assert GPT_PRESETS["faceshq"] == GPT_PRESETS["drin"] == GPT_PRESETS["sflckr"]
    assert GPT_PRESETS["faceshq"] == dict(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024)
    coco = GPT_PRESETS["coco_scene"]
    assert (coco["vocab_size"], coco["block_size"], coco["n_layer"], coco["n_head"], coco["n_embd"]) == (
        8192,
        348,
        40,
        16,
        1408,
    )
    assert coco["embd_pdrop"] == coco["resid_pdrop"] == coco["attn_pdrop"] == 0.1
    bench = gpt_from_preset("bench")
    assert (bench.vocab_size, bench.n_layer, bench.n_head, bench.n_embd) == (1024, 4, 8, 256)
    fm = gpt_from_preset("fmnist", vocab_size=522)
    assert (fm.vocab_size, fm.block_size, fm.n_layer, fm.n_head, fm.n_embd) == (522, 130, 4, 4, 128)
    with pytest.raises(ValueError, match="needs vocab_size"):
        gpt_from_preset("fmnist")
    with pytest.raises(ValueError, match="unknown GPT preset 'nope'"):
        gpt_from_preset("nope")
    assert len(gpt_from_preset("tiny").state_dict()) == 39


# ------------------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("n_unmasked", [0, 7])
def test_logits_match_official_math(n_unmasked: int) -> None:
    model = make(n_unmasked=n_unmasked)
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, loss = model(idx, targets=idx)
        ref = reference_forward(model, idx, n_unmasked=n_unmasked)
    assert logits.shape == (2, 20, 64)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(ref.reshape(-1, 64), idx.reshape(-1)), atol=1e-5, rtol=1e-5)


def test_prepended_embeddings_match_official_math() -> None:
    model = make()
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (2, 10), generator=gen)
    emb = torch.randn(2, 3, 64, generator=gen)
    with torch.no_grad():
        logits, _ = model(idx, embeddings=emb)
    assert logits.shape == (2, 13, 64)
    torch.testing.assert_close(logits, reference_forward(model, idx, embeddings=emb), atol=1e-5, rtol=1e-5)


def test_n_unmasked_prefix_is_bidirectional_then_causal() -> None:
    model = make(n_unmasked=4)
    idx = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))

    def changed(pos: int) -> Tensor:  # which logit positions move when token ``pos`` changes
        other = idx.clone()
        other[0, pos] = (other[0, pos] + 1) % 64
        with torch.no_grad():
            a, b = model(idx)[0], model(other)[0]
        return (a - b).abs().amax(-1)[0] > 1e-6

    moved = changed(3)  # last prefix token: every position sees it (the prefix bidirectionally)
    assert moved.all()
    moved = changed(2)
    assert moved.all()
    moved = changed(6)  # after the prefix: strictly causal
    assert not moved[:6].any() and moved[6:].all()
    causal = make(n_unmasked=0)
    other = idx.clone()
    other[0, 3] = (other[0, 3] + 1) % 64
    with torch.no_grad():
        diff = (causal(idx)[0] - causal(other)[0]).abs().amax(-1)[0]
    assert (diff[:3] == 0).all() and (diff[3:] > 1e-6).all()


def test_loaded_mask_decides_the_prefix() -> None:
    """As in the official code, the mask buffer from a checkpoint (not the constructor argument) is used."""
    src = make(n_unmasked=6)
    dst = GPT(**TINY)  # n_unmasked=0
    dst.load_state_dict(src.state_dict(), strict=True)
    dst.eval()
    assert dst.n_unmasked == 6
    idx = torch.randint(0, 64, (2, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(dst(idx)[0], src(idx)[0], atol=0, rtol=0)


# -------------------------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize("n_unmasked", [0, 5])
def test_cached_logits_equal_full_forward(n_unmasked: int) -> None:
    model = make(n_unmasked=n_unmasked)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 64, (3, 30), generator=gen)
    emb = torch.randn(3, 2, 64, generator=gen)
    with torch.no_grad():
        full = model(idx, embeddings=emb)[0]  # (3, 32, 64)
        caches = model.make_caches(3)
        parts = [model.forward_cached(idx[:, :8], caches, embeddings=emb)]  # 2 + 8 prefix positions
        parts.append(model.forward_cached(idx[:, 8:12], caches))  # a chunk
        parts += [model.forward_cached(idx[:, t : t + 1], caches) for t in range(12, 30)]  # single tokens
    assert caches[0].length == 32
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_must_cover_the_bidirectional_prefix() -> None:
    model = make(n_unmasked=5)
    idx = torch.randint(0, 64, (1, 8))
    caches = model.make_caches(1)
    model.forward_cached(idx[:, :3], caches)
    with pytest.raises(ValueError, match="n_unmasked=5"):
        model.forward_cached(idx[:, 3:4], caches)


def test_make_caches_defaults_and_errors() -> None:
    model = make()
    caches = model.make_caches(2)
    assert len(caches) == 2 and caches[0].max_len == 65 and caches[0].k.shape == (2, 4, 65, 16)
    assert caches[0].k.dtype == torch.float32
    with pytest.raises(ValueError, match="max_len"):
        model.make_caches(2, 66)
    with pytest.raises(ValueError, match="expected 2 caches"):
        model.forward_cached(torch.zeros(2, 1, dtype=torch.long), caches[:1])
    small = model.make_caches(1, 4)
    model.forward_cached(torch.zeros(1, 4, dtype=torch.long), small)
    with pytest.raises(ValueError, match="max_len=4"):
        model.forward_cached(torch.zeros(1, 1, dtype=torch.long), small)


# --------------------------------------------------------------------------------------------------------- validation
def test_bad_inputs_raise_clear_errors() -> None:
    model = make()
    with pytest.raises(ValueError, match="long tensor of shape \\(B, T\\)"):
        model(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="long tensor of shape \\(B, T\\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 66 .* exceeds block_size=65"):
        model(torch.zeros(1, 66, dtype=torch.long))
    with pytest.raises(ValueError, match="sequence length 66 \\(3 embeddings \\+ 63 tokens\\)"):
        model(torch.zeros(1, 63, dtype=torch.long), embeddings=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="token ids \\(vocab_size=64\\): index 64 is outside \\[0, 64\\)"):
        model(torch.tensor([[1, 64, 2]]))
    with pytest.raises(ValueError, match="token ids .*index -1 is outside"):
        model(torch.tensor([[1, -1, 2]]))
    with pytest.raises(ValueError, match="embeddings must have shape"):
        model(torch.zeros(2, 3, dtype=torch.long), embeddings=torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="targets must have shape \\(2, 3\\)"):
        model(torch.zeros(2, 3, dtype=torch.long), targets=torch.zeros(2, 2, dtype=torch.long))
    caches = model.make_caches(1)
    model.forward_cached(torch.zeros(1, 60, dtype=torch.long), caches)
    with pytest.raises(ValueError, match="after 60 cached positions exceeds block_size=65"):
        model.forward_cached(torch.zeros(1, 6, dtype=torch.long), caches)
    with pytest.raises(ValueError, match="n_embd=64 must be divisible by n_head=5"):
        GPT(vocab_size=8, block_size=8, n_head=5, n_embd=64)
    with pytest.raises(ValueError, match="n_unmasked"):
        GPT(vocab_size=8, block_size=8, n_unmasked=9)


# ------------------------------------------------------------------------------------------------ training plumbing
def test_gradients_reach_all_parameters() -> None:
    model = make(embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1).train()
    gen = torch.Generator().manual_seed(6)
    idx = torch.randint(0, 64, (2, 16), generator=gen)
    emb = torch.randn(2, 2, 64, generator=gen)
    targets = torch.randint(0, 64, (2, 18), generator=gen)
    _, loss = model(idx, embeddings=emb, targets=targets)
    assert_grads_reach_all_parameters(model, loss)


def test_dropout_only_in_training() -> None:
    model = make(embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.1)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    model = make(n_unmasked=3)
    idx = torch.randint(0, 64, (2, 12))
    assert_state_dict_roundtrip(model, lambda: GPT(**TINY, n_unmasked=3), (idx,), tmp_path)


def test_optimizer_groups_cover_every_parameter_once() -> None:
    model = make()
    decay, no_decay = model.optimizer_groups(0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    linear_weights = {
        f"{mn}.weight" for mn, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }  # key/query/value/proj, mlp.0/2, head
    assert decayed == linear_weights
    assert {"pos_emb", "tok_emb.weight", "ln_f.weight", "blocks.0.ln1.weight", "head.weight"} & decayed == {
        "head.weight"
    }
    opt = torch.optim.AdamW(model.optimizer_groups(0.01), lr=1e-3, betas=(0.9, 0.95))
    _, loss = model.train()(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8)))
    loss.backward()
    opt.step()
