"""The encoder-decoder reverse stages: the official x-transformers state-dict layout (also at the paper's cIN size,
built on the meta device), the residual / scaled output, causality, cached decoding, gradients and a safetensors
round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gencore.testing import assert_grads_reach_all_parameters, assert_state_dict_roundtrip
from imagebart.diffusion import MultinomialSchedule, prior_log_probs
from imagebart.models.xtransformer import ResidualScaledXTransformer, XTransformer, xtransformer_from_preset

T, K, K_IN, L = 4, 11, 13, 6  # stages, codes, shared input vocabulary, tokens per map
SCHEDULE = MultinomialSchedule(T)


def make(seed: int = 0, *, alphas: bool = True, **kw) -> ResidualScaledXTransformer:
    torch.manual_seed(seed)
    cfg = dict(
        dim=32,
        enc_num_tokens=K_IN,
        enc_max_seq_len=2 + L,
        dec_num_tokens=K,
        dec_max_seq_len=L,
        enc_depth=1,
        enc_heads=2,
        dec_depth=1,
        dec_heads=2,
        attn_dim_head=24,
        scale_pos=0,
        n_scales=T,
        xt_start=2,
        xt_size=L,
    )
    net = ResidualScaledXTransformer(**{**cfg, **kw})
    if alphas:
        net.set_alphas(SCHEDULE.alphas)
    return net.eval()


def inputs(stages=(1, 2, 3), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src = [t, class, x_t], tgt = [sos, x_{t-1}[:-1]], x_t) for one item per stage."""
    g = torch.Generator().manual_seed(seed)
    b = len(stages)
    xt = torch.randint(0, K, (b, L), generator=g)
    src = torch.cat((torch.tensor(stages)[:, None], torch.randint(0, 10, (b, 1), generator=g), xt), 1)
    tgt = torch.cat((torch.zeros(b, 1, dtype=torch.long), torch.randint(0, K, (b, L - 1), generator=g)), 1)
    return src, tgt, xt


ATTN = ["0.weight", "0.bias", "1.to_q.weight", "1.to_k.weight", "1.to_v.weight", "1.to_out.weight", "1.to_out.bias"]
FF = ["0.weight", "0.bias", "1.net.0.0.weight", "1.net.0.0.bias", "1.net.2.weight", "1.net.2.bias"]


def official_keys(enc_depth: int, dec_depth: int) -> list[str]:
    """The state_dict keys of the official XTransformer (imagebart/modules/xtransformers/x_transformer.py)."""
    keys = []
    for side, kinds in (("encoder", "af" * enc_depth), ("decoder", "acf" * dec_depth)):
        keys += [f"{side}.token_emb.weight", f"{side}.pos_emb.emb.weight"]
        for i, kind in enumerate(kinds):
            keys += [f"{side}.attn_layers.layers.{i}.{name}" for name in (FF if kind == "f" else ATTN)]
        keys += [f"{side}.norm.weight", f"{side}.norm.bias", f"{side}.to_logits.weight", f"{side}.to_logits.bias"]
    return keys


# ------------------------------------------------------------------------------------------------------ layout
def test_state_dict_layout_of_a_small_config():
    sd = make().state_dict()
    assert sorted(sd) == sorted([*official_keys(1, 1), "log_scalors"])
    dec = "decoder.attn_layers.layers."
    # 0: self-attention, 1: cross-attention (inner width heads x dim_head = 48, not dim = 32), 2: feed-forward
    for i in (0, 1):
        assert sd[f"{dec}{i}.1.to_q.weight"].shape == (48, 32)
        assert sd[f"{dec}{i}.1.to_k.weight"].shape == sd[f"{dec}{i}.1.to_v.weight"].shape == (48, 32)
        assert f"{dec}{i}.1.to_q.bias" not in sd and f"{dec}{i}.1.to_k.bias" not in sd
        assert sd[f"{dec}{i}.1.to_out.weight"].shape == (32, 48) and sd[f"{dec}{i}.1.to_out.bias"].shape == (32,)
    assert sd[f"{dec}2.1.net.0.0.weight"].shape == (128, 32) and sd[f"{dec}2.1.net.2.weight"].shape == (32, 128)
    assert sd["encoder.attn_layers.layers.0.1.to_q.weight"].shape == (48, 32)
    assert sd["encoder.attn_layers.layers.1.1.net.0.0.weight"].shape == (128, 32)
    assert sd["encoder.to_logits.weight"].shape == (K_IN, 32)  # stored though unused
    assert sd["encoder.pos_emb.emb.weight"].shape == (2 + L, 32)
    assert sd["decoder.pos_emb.emb.weight"].shape == (L, 32)
    assert sd["decoder.to_logits.weight"].shape == (K, 32) and sd["log_scalors"].shape == (T,)
    assert "scale_alphas" not in sd  # the per-step alphas come from the model's schedule, not the checkpoint
    net = make()
    assert net.decoder.attn_layers.layer_types == ("a", "c", "f")
    assert net.decoder.attn_layers.layers[0][1].causal and not net.decoder.attn_layers.layers[1][1].causal
    assert not net.encoder.attn_layers.layers[0][1].causal


@pytest.mark.parametrize(("enc_depth", "dec_depth"), [(1, 2), (2, 1), (2, 3)])
def test_key_set_scales_with_depth(enc_depth, dec_depth):
    sd = make(enc_depth=enc_depth, dec_depth=dec_depth).state_dict()
    assert sorted(sd) == sorted([*official_keys(enc_depth, dec_depth), "log_scalors"])
    # 6 wrapper keys per side, 13 per encoder layer pair (a, f), 20 per decoder triple (a, c, f), log_scalors
    assert len(sd) == 12 + 13 * enc_depth + 20 * dec_depth + 1


def test_the_official_cin_stage_network_layout():
    # the paper's cIN 4-scale stage (dim 1152, 32 + 6 layers, 16 heads x 64): built on the meta device, no memory
    with torch.device("meta"):
        net = xtransformer_from_preset(
            "cin_geometric",
            enc_num_tokens=1000,
            enc_max_seq_len=258,
            dec_num_tokens=973,
            dec_max_seq_len=256,
            scale_pos=0,
            n_scales=4,
            xt_start=2,
            xt_size=256,
        )
    sd = net.state_dict()
    assert sorted(sd) == sorted([*official_keys(32, 6), "log_scalors"]) and len(sd) == 549
    assert sd["encoder.attn_layers.layers.62.1.to_q.weight"].shape == (1024, 1152)  # 16 x 64, not 1152
    assert sd["decoder.attn_layers.layers.16.1.to_out.weight"].shape == (1152, 1024)  # cross-attention of layer 5
    assert sd["decoder.attn_layers.layers.17.1.net.0.0.weight"].shape == (4608, 1152)
    assert sd["encoder.token_emb.weight"].shape == (1000, 1152) and sd["encoder.pos_emb.emb.weight"].shape[0] == 258
    assert sd["decoder.to_logits.weight"].shape == (973, 1152) and sd["log_scalors"].shape == (4,)
    with pytest.raises(ValueError, match="unknown XTransformer preset 'cin'"):
        xtransformer_from_preset("cin")


# --------------------------------------------------------------------------------------------- residual output
def test_zero_network_logits_give_the_forward_process_prior():
    net = make()
    with torch.no_grad():
        net.decoder.to_logits.weight.zero_()
        net.decoder.to_logits.bias.zero_()
    src, tgt, xt = inputs((1, 2, 3))
    out = net(src, tgt)[0]
    alphas = SCHEDULE.alphas[src[:, 0]]  # alpha_t of each item's stage
    expected = torch.log(alphas[:, None, None] * F.one_hot(xt, K) + (1 - alphas[:, None, None]) / K)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, prior_log_probs(xt, alphas, K))
    # already normalised: log_softmax leaves it unchanged, i.e. the distribution is normalise(a onehot + (1 - a)/K)
    torch.testing.assert_close(out.log_softmax(-1), out, atol=1e-6, rtol=0)
    assert not torch.allclose(out[0], out[2])  # the stages differ (alpha 3/4 vs 1/2)


def test_log_scalors_scale_the_network_logits_of_each_stage():
    net = make()
    src, tgt, xt = inputs((1, 2, 3))
    residual = prior_log_probs(xt, SCHEDULE.alphas[src[:, 0]], K)
    with torch.no_grad():
        base = net(src, tgt)[0] - residual
        assert base.abs().max() > 1e-3
        net.log_scalors.copy_(torch.tensor([0.5, -1.0, 0.3, 2.0]))
        scaled = net(src, tgt)[0] - residual
    factor = torch.exp(torch.tensor([0.5, -1.0, 0.3]))  # log_scalors[t - 1] for t = 1, 2, 3
    torch.testing.assert_close(scaled, base * factor[:, None, None], atol=1e-5, rtol=1e-5)


def test_alphas_must_be_set_and_stage_ids_checked():
    src, tgt, _ = inputs()
    with pytest.raises(ValueError, match="set_alphas"):
        make(alphas=False)(src, tgt)
    with pytest.raises(ValueError, match=r"n_scales \+ 1 = 5 values, got 4"):
        make(alphas=False).set_alphas(torch.ones(4))
    net = make()
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match="stage token"):
            net(torch.cat((torch.full((1, 1), bad), src[:1, 1:]), 1), tgt[:1])
    with pytest.raises(ValueError, match="x_t should sit at"):
        net(src[:, :-1], tgt)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        net(src, torch.cat((tgt, tgt[:, :1]), 1))
    with pytest.raises(ValueError, match=f"num_tokens={K}"):
        net(src, tgt + K)


def test_unsupported_official_options_are_refused():
    with pytest.raises(ValueError, match="wrap_decoder"):
        make(wrap_decoder=True)
    with pytest.raises(ValueError, match="tie_token_emb"):
        make(tie_token_emb=True)
    with pytest.raises(ValueError, match="xt_size"):
        make(xt_size=L + 1)


# ------------------------------------------------------------------------------------------------ attention masks
@pytest.mark.parametrize("j", [1, 3, L - 1])
def test_decoder_is_causal(j):
    net = make()
    src, tgt, _ = inputs()
    other = tgt.clone()
    other[:, j] = (other[:, j] + 1) % K
    with torch.no_grad():
        a, b = net(src, tgt)[0], net(src, other)[0]
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=1e-6, rtol=0)  # earlier positions never see input j
    assert (a[:, j] - b[:, j]).abs().max() > 1e-4  # position j reads it


def test_encoder_is_bidirectional():
    net = make()
    src, tgt, _ = inputs()
    other = src.clone()
    other[:, -1] = (other[:, -1] + 1) % K  # x_t at the last position
    with torch.no_grad():
        a, b = net(src, tgt)[0], net(other, tgt)[0]
        enc_a, enc_b = net.encode(src), net.encode(other)
    # the encoder's first position (the stage token) sees the last x_t token: no causal mask there
    assert (enc_a[:, 0] - enc_b[:, 0]).abs().max() > 1e-4
    # and so does the first decoder position (whose residual reads x_t[0] only), through the cross-attention
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------- decoding
def test_cached_session_matches_the_uncached_loop_and_teacher_forcing():
    net = make()
    src, _, _ = inputs((1, 3, 2))
    tokens = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(5))
    sos = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        full = net(src, torch.cat((sos, tokens[:, :-1]), 1))[0]  # (B, L, K)
        for use_cache in (True, False):
            step = net.session(src, sos, use_cache=use_cache)
            got = [step(None)] + [step(tokens[:, i - 1 : i]) for i in range(1, L)]
            torch.testing.assert_close(torch.stack(got, 1), full, atol=1e-5, rtol=1e-5)


def test_plain_xtransformer_has_no_residual():
    torch.manual_seed(0)
    net = XTransformer(
        dim=32, enc_num_tokens=K_IN, enc_max_seq_len=2 + L, dec_num_tokens=K, dec_max_seq_len=L, enc_depth=1,
        dec_depth=1, enc_heads=2, dec_heads=2, attn_dim_head=16,
    ).eval()  # fmt: skip
    src, tgt, _ = inputs()
    with torch.no_grad():
        out = net(src, tgt)[0]
        torch.testing.assert_close(out, net.decoder(tgt, context=net.encode(src)))
    assert net.num_tokens == K and "log_scalors" not in net.state_dict()


# ------------------------------------------------------------------------------------------------ contracts
def test_gradients_reach_every_parameter_but_the_unused_encoder_logits():
    net = make().train()
    src, tgt, _ = inputs((1, 2, 3))
    target = torch.randint(0, K, (3, L), generator=torch.Generator().manual_seed(1))
    loss = F.cross_entropy(net(src, tgt)[0].transpose(1, 2), target)
    assert_grads_reach_all_parameters(net, loss, allow=("encoder.to_logits",))
    assert net.encoder.to_logits.weight.grad is None and net.encoder.to_logits.bias.grad is None


def test_safetensors_round_trip(tmp_path):
    src, tgt, _ = inputs((1, 2, 3))
    assert_state_dict_roundtrip(make(seed=0), lambda: make(seed=1), (src, tgt), tmp_path)
