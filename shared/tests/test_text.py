import pytest
import torch

from gencore.io import MissingWeightsError
from gencore.text import FrozenTextEncoder, minilm_path


@pytest.fixture(scope="module")
def minilm():
    return FrozenTextEncoder(max_length=16, normalize_pooled=True)


def test_minilm_is_the_real_offline_encoder(minilm):
    assert (minilm_path() / "model.safetensors").is_file()
    assert minilm.hidden_size == 384 and sum(p.numel() for p in minilm.parameters()) == 22_713_216
    out = minilm(["A cat sits on the mat.", "A kitten lies on a rug.", "The stock market fell sharply today."])
    assert out["tokens"].shape == (3, 16, 384) and out["mask"].shape == (3, 16) and out["pooled"].shape == (3, 384)
    sim = out["pooled"] @ out["pooled"].T
    # real semantics (environment.md: cat-on-mat vs kitten-on-rug 0.71, cat vs stocks 0.08 for these models)
    assert sim[0, 1] > 0.5 > 0.2 > sim[0, 2]


def test_padding_masks_and_the_empty_prompt(minilm):
    out = minilm(["", "a photo of a sneaker"])
    assert out["mask"][0].sum() == 2 and out["mask"][1].sum() > 2  # [CLS] [SEP] for the empty prompt
    assert torch.equal(minilm.encode([""]), out["tokens"][:1])  # deterministic: same prompt, same context
    long = minilm(["word " * 100])
    assert long["tokens"].shape[1] == 16 and long["mask"].all()  # truncated to max_length
    assert all(not p.requires_grad for p in minilm.parameters()) and not minilm.training


def test_bad_arguments(tmp_path, minilm):
    with pytest.raises(MissingWeightsError, match="config.json does not exist"):
        FrozenTextEncoder(tmp_path)
    with pytest.raises(ValueError, match="pooling must be one of"):
        FrozenTextEncoder(pooling="max")
    with pytest.raises(ValueError, match="list of strings"):
        minilm("a single string")


def test_hidden_layer_selects_an_earlier_layer():
    enc = FrozenTextEncoder(max_length=8, hidden_layer=-2)
    last = FrozenTextEncoder(max_length=8)
    a, b = enc(["a photo of a coat"]), last(["a photo of a coat"])
    assert a["tokens"].shape == b["tokens"].shape and not torch.allclose(a["tokens"], b["tokens"])
    torch.testing.assert_close(a["pooled"], b["pooled"])  # pooling uses the final states either way


def test_feature_cache_returns_the_same_features_without_recomputing(monkeypatch):
    enc = FrozenTextEncoder(max_length=8, cache_size=3)
    fresh = FrozenTextEncoder(max_length=8, cache_size=0)
    prompts = ["a photo of a bag", "a photo of a coat", "a photo of a bag"]
    a = enc(prompts)
    torch.testing.assert_close(a["tokens"], fresh(prompts)["tokens"])
    calls = []
    original = enc._encode
    monkeypatch.setattr(enc, "_encode", lambda texts: calls.append(list(texts)) or original(texts))
    b = enc(["a photo of a coat", "a photo of a bag"])
    assert calls == [] and torch.equal(b["tokens"][0], a["tokens"][1])
    enc(["x", "y"])  # evicts the oldest entries beyond cache_size
    assert calls == [["x", "y"]] and len(enc._cache) == 3


def test_precomputed_features_round_trip(tmp_path, minilm):
    from gencore.text import PrecomputedTextEncoder, save_text_features, text_encoder

    prompts = ["", "a photo of a sneaker", "a photo of a bag"]
    path = save_text_features(minilm, [*prompts, "a photo of a bag"], tmp_path / "f.safetensors")  # duplicates dropped
    pre = text_encoder(path, max_length=16, normalize_pooled=True)
    assert isinstance(pre, PrecomputedTextEncoder) and pre.prompts == prompts
    assert pre.hidden_size == minilm.hidden_size and pre.pooled_size == minilm.pooled_size
    asked = ["a photo of a bag", "", "a photo of a bag"]
    ref, got = minilm(asked), pre(asked)
    for k in ("tokens", "mask", "pooled"):
        assert torch.equal(got[k], ref[k]), k
    assert not list(pre.state_dict()) and not list(pre.parameters())  # stays out of checkpoints
    with pytest.raises(ValueError, match="'a photo of a dress' was not precomputed"):
        pre(["a photo of a dress"])
    with pytest.raises(ValueError, match="max_length=77 asked, file has 16"):
        PrecomputedTextEncoder(path, max_length=77)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        PrecomputedTextEncoder(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a save_text_features file"):
        text_encoder(tmp_path / "other.safetensors")
