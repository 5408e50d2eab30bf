import pytest
import torch

from gencore.attention import (
    ENV_VAR,
    AttentionBackendUnavailable,
    KVCache,
    attention,
    attention_backend,
    available_backends,
    causal_mask,
    resolve_backend,
)


def qkv(b=2, h=3, lq=7, lk=None, d=16, dv=None, dtype=torch.float32):
    lk = lq if lk is None else lk
    return (
        torch.randn(b, h, lq, d, dtype=dtype),
        torch.randn(b, h, lk, d, dtype=dtype),
        torch.randn(b, h, lk, dv or d, dtype=dtype),
    )


def both(q, k, v, **kw):
    return attention(q, k, v, backend="sdpa", **kw), attention(q, k, v, backend="math", **kw)


def test_math_is_the_textbook_formula():
    q, k, v = qkv()
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v  # d = 16 -> scale 1/4
    torch.testing.assert_close(attention(q, k, v, backend="math"), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "case",
    ["self", "cross", "bool_mask", "additive_mask", "causal", "causal_prefix", "causal_with_mask", "scale", "dv"],
)
def test_sdpa_matches_math(case):
    kw = {}
    q, k, v = qkv()
    if case == "cross":
        q, k, v = qkv(lq=5, lk=11)
    elif case == "bool_mask":
        kw["mask"] = torch.rand(2, 1, 7, 7) > 0.3
        kw["mask"][..., 0] = True  # no fully masked rows
    elif case == "additive_mask":
        kw["mask"] = torch.randn(1, 3, 7, 7)
    elif case == "causal":
        kw["causal"] = True
    elif case == "causal_prefix":
        kw["mask"] = causal_mask(7, n_unmasked=3)
    elif case == "causal_with_mask":
        kw["causal"] = True
        kw["mask"] = torch.randn(7, 7)
    elif case == "scale":
        kw["scale"] = 0.05
    elif case == "dv":
        q, k, v = qkv(dv=24)
    a, b = both(q, k, v, **kw)
    assert a.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_causal_mask_prefix_semantics():
    m = causal_mask(6, n_unmasked=3)
    # the prefix is bidirectional among itself ...
    assert m[0, 2] and m[1, 2] and m[2, 0]
    # ... but does not see later tokens, and later tokens stay causal
    assert not m[0, 3] and not m[2, 4] and not m[3, 4]
    assert m[5].all() and m[3, :4].all()
    assert torch.equal(causal_mask(4), torch.tril(torch.ones(4, 4, dtype=torch.bool)))


def test_prefix_changes_outputs_only_inside_prefix():
    q, k, v = qkv(lq=8)
    plain = attention(q, k, v, causal=True, backend="math")
    prefix = attention(q, k, v, mask=causal_mask(8, n_unmasked=4), backend="math")
    assert not torch.allclose(plain[:, :, :3], prefix[:, :, :3])  # query 3 already sees 0..3 causally
    torch.testing.assert_close(plain[:, :, 3:], prefix[:, :, 3:])


def test_causal_is_bottom_right_for_cached_decoding():
    q, k, v = qkv(lq=9)
    full = attention(q, k, v, causal=True)
    # the last 2 queries against all 9 keys give the last 2 rows of full causal attention
    tail = attention(q[:, :, -2:], k, v, causal=True)
    torch.testing.assert_close(tail, full[:, :, -2:], atol=1e-6, rtol=1e-6)


def test_fully_masked_rows_are_zero_in_both_backends():
    q, k, v = qkv(lq=4)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2] = False
    a, b = both(q, k, v, mask=mask)
    assert torch.all(b[:, :, 2] == 0) and torch.all(a[:, :, 2] == 0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_attention():
    b, h, length, d = 2, 4, 10, 8
    q, k, v = qkv(b=b, h=h, lq=length, d=d)
    full = attention(q, k, v, mask=causal_mask(length, n_unmasked=3))
    cache = KVCache(b, h, length, d)
    # prefix of 3 at once (with its bidirectional mask), then one token at a time
    ka, va = cache.append(k[:, :, :3], v[:, :, :3])
    outs = [attention(q[:, :, :3], ka, va, mask=causal_mask(3, n_unmasked=3))]
    for t in range(3, length):
        ka, va = cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        outs.append(attention(q[:, :, t : t + 1], ka, va, causal=True))
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-6, rtol=1e-6)
    assert cache.length == length
    with pytest.raises(ValueError, match="exceed max_len"):
        cache.append(k[:, :, :1], v[:, :, :1])
    cache.reset()
    assert cache.length == 0
    with pytest.raises(ValueError, match="expected k and v of shape"):
        cache.append(torch.zeros(b, h + 1, 1, d), torch.zeros(b, h + 1, 1, d))
    assert len(KVCache.for_layers(3, b, h, length, d)) == 3


def test_backend_selection_precedence(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend() == "sdpa"
    monkeypatch.setenv(ENV_VAR, "math")
    assert resolve_backend() == "math"
    with attention_backend("sdpa"):
        assert resolve_backend() == "sdpa"  # context beats env
        assert resolve_backend("math") == "math"  # argument beats context
        with attention_backend("math"):
            assert resolve_backend() == "math"
        assert resolve_backend() == "sdpa"
    assert resolve_backend() == "math"


def test_unknown_backend_names_the_valid_ones(monkeypatch):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="flash9.*valid backends: math, sdpa, xformers"):
        attention(q, k, v, backend="flash9")
    with pytest.raises(ValueError, match="valid backends"):
        with attention_backend("nope"):
            pass
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="GENLAB_ATTN_BACKEND"):
        attention(q, k, v)
    assert set(available_backends()) == {"math", "sdpa", "xformers"}


def test_xformers_is_a_clear_error_on_cpu():
    q, k, v = qkv()
    with pytest.raises(AttentionBackendUnavailable, match="xformers"):
        attention(q, k, v, backend="xformers")


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)), "layout"),
        ((torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)), "head dims"),
        ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 6, 4)), "lengths differ"),
        ((torch.zeros(1, 2, 3, 4), torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4)), "batch and head"),
    ],
)
def test_bad_shapes_raise(args, match):
    with pytest.raises(ValueError, match=match):
        attention(*args)


def test_bad_mask_raises():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean or floating"):
        attention(q, k, v, mask=torch.ones(7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="Lq <= Lk"):
        attention(*qkv(lq=5, lk=3), causal=True)


def test_gradients_flow_through_both_backends():
    for backend in ("sdpa", "math"):
        q, k, v = (t.requires_grad_() for t in qkv())
        attention(q, k, v, causal=True, backend=backend).square().sum().backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_half_precision_inputs_keep_dtype():
    q, k, v = qkv(dtype=torch.bfloat16)
    a, b = both(q, k, v, causal=True)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_xformers_matches_math_on_gpu():
    pytest.importorskip("xformers")
    q, k, v = (t.cuda().half() for t in qkv(d=64))
    mask = causal_mask(7, n_unmasked=3, device="cuda")
    torch.testing.assert_close(
        attention(q, k, v, mask=mask, backend="xformers").float(),
        attention(q, k, v, mask=mask, backend="math").float(),
        atol=2e-3,
        rtol=2e-3,
    )


def test_narrow_heads_on_long_sequences_match_math_with_gradients():
    # sdpa zero-pads heads narrower than 16 on AVX-512 CPUs (a faster kernel path): still the same attention
    q, k, v = (torch.randn(2, 4, 256, 8, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="sdpa")
    qr, kr, vr = (t.detach().requires_grad_() for t in (q, k, v))
    ref = attention(qr, kr, vr, backend="math")
    assert out.shape == (2, 4, 256, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    causal = attention(q.detach(), k.detach(), v.detach(), causal=True, backend="sdpa")
    torch.testing.assert_close(
        causal, attention(qr.detach(), kr.detach(), vr.detach(), causal=True, backend="math"), atol=1e-5, rtol=1e-5
    )
