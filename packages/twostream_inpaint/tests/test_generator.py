"""The two-stream generator, its FFC blocks and the patch discriminator: official structure and key names (built on
the meta device), the windowed read / write mixtures and Fourier features against naive references, the deformable
write, the keyframe K/V concatenation, the keyframe cache, init, gradients, and input checks. CPU, tiny, seeded."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import twostream_inpaint.models.generator as gen
from twostream_inpaint.models import GIResNetGenerator, KeyframeState, NLayerDiscriminator
from twostream_inpaint.models.ffc import FFC, RESIDUAL_CONV_NORM_ACT, FFCResnetBlock, FourierUnit
from twostream_inpaint.models.generator import (
    DeformableWriteLayer,
    GIBlock,
    fourier_position_encoding,
    local_mixture_2d,
    local_mixture_2d_transposed,
)

FFC_KW = {"ratio_gin": 0.75, "ratio_gout": 0.75, "enable_lfu": False}

# configs/ours.yaml (generator section); ours_big: n_blocks 12; ours_no_ffc: n_blocks 6 and no block_type (= "conv")
OURS = dict(
    input_nc=4,
    output_nc=3,
    ngf=64,
    n_downsampling=3,
    n_blocks=4,
    block_type="ffc",
    is_deformable=True,
    n_cross=2,
    is_crossattending=True,
    num_latents_sqrt=16,
    num_groups=4,
    read_write_heads=8,
    pre_lama=0,
    post_lama=0,
    add_out_act="sigmoid",
    resnet_conv_kwargs=FFC_KW,
)
OURS_BIG = {**OURS, "n_blocks": 12}
OURS_NO_FFC = {k: v for k, v in {**OURS, "n_blocks": 6}.items() if k != "block_type"}

TINY = dict(
    input_nc=4,
    output_nc=3,
    ngf=8,
    n_downsampling=2,
    n_blocks=3,
    block_type="ffc",
    num_latents_sqrt=4,
    read_write_heads=2,
    num_heads=2,
    fourier_bands=4,
    is_deformable=True,
    is_crossattending=True,
    n_cross=2,
    add_out_act="sigmoid",
    resnet_conv_kwargs=FFC_KW,
)
N_LAT = 16  # TINY num_latents_sqrt ** 2


def tiny(seed: int = 0, **overrides) -> GIResNetGenerator:
    torch.manual_seed(seed)
    return GIResNetGenerator(**{**TINY, **overrides})


def inputs(b: int = 2, t: int = 2, size: int = 32, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        input=torch.randn(b, 4, size, size, generator=g),
        srcs=torch.randn(b, t, 4, size, size, generator=g),
        flows=torch.randn(b, t, 2, size, size, generator=g) * 2,
        flow_errs=torch.rand(b, t, 1, size, size, generator=g),
    )


# ---------------------------------------------------------------------------------------------------------------------
# official structure (state-dict keys derived here from the official module tree, independently of the code)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(p: str) -> set[str]:
    return {f"{p}.{s}" for s in BN}


def _wb(p: str) -> set[str]:
    return {f"{p}.weight", f"{p}.bias"}


def _ffc_bn_act(p: str) -> set[str]:
    keys = {f"{p}.ffc.{c}.weight" for c in ("convl2l", "convl2g", "convg2l")}
    keys |= {
        f"{p}.ffc.convg2g.conv1.0.weight",
        f"{p}.ffc.convg2g.fu.conv_layer.weight",
        f"{p}.ffc.convg2g.conv2.weight",
    }
    return keys | _bn(f"{p}.ffc.convg2g.conv1.1") | _bn(f"{p}.ffc.convg2g.fu.bn") | _bn(f"{p}.bn_l") | _bn(f"{p}.bn_g")


def _gi_block(p: str, block_type: str) -> set[str]:
    keys: set[str] = set()
    for name in ("ln1", "ln2", "mlp.dense1", "mlp.dense2", "to_logits", "to_values", "projection"):
        keys |= _wb(f"{p}.read.{name}")
    keys |= _bn(f"{p}.write.ln1") | _bn(f"{p}.write.ln2")  # BatchNorm under LayerNorm names (sic)
    for name in ("mlp.dense1", "mlp.dense2", "to_logits", "to_values", "projection"):
        keys |= _wb(f"{p}.write.{name}")
    for attn in ("attn1", "attn2"):
        for name in ("attn.layernorm1", "attn.query", "attn.key", "attn.value", "projection", "ln_premlp"):
            keys |= _wb(f"{p}.{attn}.{name}")
        keys |= _wb(f"{p}.{attn}.mlp.dense1") | _wb(f"{p}.{attn}.mlp.dense2")
    for blk in ("block1", "block2"):
        if block_type == "ffc":
            keys |= _ffc_bn_act(f"{p}.{blk}.conv1") | _ffc_bn_act(f"{p}.{blk}.conv2")
        else:
            keys |= {f"{p}.{blk}.conv.weight"} | _bn(f"{p}.{blk}.norm")
    return keys


def expected_keys(n_blocks: int, block_type: str, n_cross: int = 2, n_down: int = 3) -> set[str]:
    # 0 pad, 1 stem, 2.. downsampling, latent init, blocks, drop latent, (convT, BN, ReLU) x n_down, pad, conv, act
    keys = {"model.1.conv.weight"} | _bn("model.1.norm")
    for i in range(n_down):
        keys |= {f"model.{2 + i}.conv.weight"} | _bn(f"model.{2 + i}.norm")
    init = 2 + n_down
    keys |= {f"model.{init}.latents"} | _wb(f"model.{init}.project")
    for i in range(n_blocks):
        keys |= _gi_block(f"model.{init + 1 + i}", block_type)
    up = init + 1 + n_blocks + 1  # after DropLatentLayer
    for i in range(n_down):
        keys |= _wb(f"model.{up + 3 * i}") | _bn(f"model.{up + 3 * i + 1}")
    keys |= _wb(f"model.{up + 3 * n_down + 1}")
    for i in range(min(n_blocks, n_cross)):
        keys |= _wb(f"deformable_writes.{i}.q") | _wb(f"deformable_writes.{i}.v")
    return keys


@pytest.mark.parametrize(
    ("cfg", "n_blocks", "block_type"), [(OURS, 4, "ffc"), (OURS_BIG, 12, "ffc"), (OURS_NO_FFC, 6, "conv")]
)
def test_official_configs_have_official_keys(cfg, n_blocks, block_type):
    with torch.device("meta"):
        g = GIResNetGenerator(**cfg)
    sd = g.state_dict()
    assert set(sd) == expected_keys(n_blocks, block_type)
    blocks = [m for m in g.model if isinstance(m, GIBlock)]
    assert len(blocks) == n_blocks and len(g.deformable_writes) == 2
    inner = RESIDUAL_CONV_NORM_ACT if block_type == "conv" else FFCResnetBlock
    assert all(isinstance(b.block1, inner) and isinstance(b.block2, inner) for b in blocks)
    if block_type == "conv":
        assert blocks[0].block1.conv.groups == 4
    else:
        assert blocks[0].block1.conv1.ffc.global_in_num == 384  # 0.75 * 512
    last = 2 + 3 + 1 + n_blocks + 1 + 9 + 1
    assert sd[f"model.{last}.weight"].shape == (3, 64, 7, 7)
    assert isinstance(g.model[last + 1], nn.Sigmoid) and len(g.model) == last + 2


def test_paper_config_shapes_and_parameter_count():
    with torch.device("meta"):
        g = GIResNetGenerator(**OURS)
    sd = g.state_dict()
    assert sd["model.5.project.weight"].shape == (512, 512 + 258, 1, 1)
    assert sd["model.5.latents"].shape == (256, 512)
    assert sd["model.6.read.to_logits.weight"].shape == (8, 512, 1, 1)
    assert sd["model.6.write.to_logits.weight"].shape == (8, 512, 1, 1)
    assert sd["model.6.block1.conv1.ffc.convg2g.fu.conv_layer.weight"].shape == (384, 384, 1, 1)
    assert sd["model.6.block1.conv1.ffc.convl2l.weight"].shape == (128, 128, 3, 3)
    assert sd["deformable_writes.1.q.weight"].shape == (512, 1025, 1, 1)
    assert sd["deformable_writes.1.v.weight"].shape == (512, 513, 1, 1)
    assert sd["model.11.weight"].shape == (512, 256, 3, 3)  # first ConvTranspose2d (in, out, k, k)
    n = sum(p.numel() for p in g.parameters())
    assert abs(n / 1e6 - 47.57) < 0.01, n


def test_string_norm_and_activation_match_classes():
    with torch.device("meta"):
        a = GIResNetGenerator(**{**TINY, "norm_layer": "bn", "activation_layer": "relu", "up_norm_layer": "bn"})
        b = GIResNetGenerator(**TINY)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert isinstance(a.model[1].act, nn.ReLU)


def test_d_latents_must_match_the_bottleneck():
    with torch.device("meta"):
        assert GIResNetGenerator(**{**TINY, "d_latents": 32}).d_latents == 32  # ngf 8 * 2**2
        with pytest.raises(ValueError, match="d_latents"):
            GIResNetGenerator(**{**TINY, "d_latents": 64})


# ---------------------------------------------------------------------------------------------------------------------
# forward


def test_output_shape_range_and_attention_maps():
    g = tiny()
    x = inputs()
    out, attns = g(**x, return_attn=True)
    assert out.shape == (2, 3, 32, 32)
    assert torch.all(out > 0) and torch.all(out < 1)
    assert len(attns) == 3
    for read, write in attns:
        assert read.shape == write.shape == (2, 2, 8, 8)
        # read: softmax over each 2x2 window per head; write: sigmoid gates
        sums = read.reshape(2, 2, 4, 2, 4, 2).sum(dim=(3, 5))
        torch.testing.assert_close(sums, torch.ones_like(sums))
        assert torch.all(write > 0) and torch.all(write < 1)
    assert torch.equal(g(**x), out)


def _record_kv_lengths(monkeypatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    original = gen.attention

    def recording(q, k, v, **kw):
        calls.append((q.shape[0], k.shape[2]))
        return original(q, k, v, **kw)

    monkeypatch.setattr(gen, "attention", recording)
    return calls


@pytest.mark.parametrize("crossattending", [True, False])
def test_keyframe_kv_concatenated_only_in_the_first_n_cross_blocks(monkeypatch, crossattending):
    b, t = 2, 3
    g = tiny(is_crossattending=crossattending)
    calls = _record_kv_lengths(monkeypatch)
    g(**inputs(b, t))
    # keyframe pass: batch B*T through blocks 0 and 1 only (attn1, attn2 each), own keys only
    assert calls[:4] == [(b * t, N_LAT)] * 4
    # target: attn1 of blocks < n_cross sees N (1 + T) keys when cross-attending, attn2 and later blocks N
    k1 = N_LAT * (1 + t) if crossattending else N_LAT
    assert calls[4:] == [(b, k1), (b, N_LAT), (b, k1), (b, N_LAT), (b, N_LAT), (b, N_LAT)]


def test_deformable_writes_only_after_the_first_n_cross_blocks(monkeypatch):
    g = tiny()
    seen = []
    for i, layer in enumerate(g.deformable_writes):
        layer.register_forward_hook(lambda m, a, o, i=i: seen.append((i, tuple(a[1].shape))))
    g(**inputs(2, 3))
    assert seen == [(0, (2, 3, 32, 8, 8)), (1, (2, 3, 32, 8, 8))]


def test_global_only_needs_no_flows_and_local_only_uses_no_kv():
    x = inputs()
    g = tiny(is_deformable=False)
    assert not hasattr(g, "deformable_writes")
    assert g(x["input"], x["srcs"]).shape == (2, 3, 32, 32)
    g = tiny(is_crossattending=False)
    assert g(**x).shape == (2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------------
# layers against references


def test_deformable_write_single_keyframe_adds_v():
    torch.manual_seed(0)
    layer = DeformableWriteLayer(6)
    x, src = torch.randn(2, 6, 8, 8), torch.randn(2, 1, 6, 8, 8)
    flows, errs = torch.randn(2, 1, 2, 16, 16), torch.rand(2, 1, 1, 16, 16)
    from twostream_inpaint.warp import flow_sample

    warped = flow_sample(src[:, 0], flows[:, 0])
    err = nn.functional.interpolate(errs[:, 0], size=(8, 8), mode="bilinear", align_corners=True)
    expected = x + layer.v(torch.cat((warped, err), dim=1))  # softmax over one keyframe = 1
    torch.testing.assert_close(layer(x, src, flows, errs), expected)


def test_deformable_write_weights_sum_to_one_over_keyframes():
    torch.manual_seed(0)
    layer = DeformableWriteLayer(6)
    with torch.no_grad():
        layer.v.weight.zero_()
        layer.v.bias.fill_(1.0)  # v = 1 everywhere: the update is the sum of the softmax weights
    x, src = torch.randn(2, 6, 8, 8), torch.randn(2, 3, 6, 8, 8)
    out = layer(x, src, torch.randn(2, 3, 2, 8, 8), torch.rand(2, 3, 1, 8, 8))
    torch.testing.assert_close(out, x + 1.0)


def test_deformable_write_zero_flow_is_an_identity_warp():
    torch.manual_seed(0)
    c = 6
    layer = DeformableWriteLayer(c)
    with torch.no_grad():  # v passes the warped features through (ignores the error channel)
        layer.v.weight.zero_()
        layer.v.weight[:, :c, 0, 0] = torch.eye(c)
        layer.v.bias.zero_()
    x = torch.randn(2, c, 8, 8)
    feats = torch.randn(2, 1, c, 8, 8)
    out = layer(x, feats, torch.zeros(2, 1, 2, 32, 32), torch.rand(2, 1, 1, 32, 32))
    torch.testing.assert_close(out, x + feats[:, 0], atol=1e-5, rtol=1e-5)
    # two identical keyframes with zero flow: same result whatever the softmax weights
    out2 = layer(x, feats.expand(2, 2, c, 8, 8), torch.zeros(2, 2, 2, 8, 8), torch.rand(2, 2, 1, 8, 8))
    torch.testing.assert_close(out2, x + feats[:, 0], atol=1e-5, rtol=1e-5)


def _naive_read(logits, values, win):
    b, heads, h, w = logits.shape
    c = values.shape[1] // heads
    ph, pw = h // win, w // win
    out = torch.zeros(b, win * win, heads * c)
    for bi in range(b):
        for j in range(heads):
            for wy in range(win):
                for wx in range(win):
                    lg = logits[bi, j, wy * ph : (wy + 1) * ph, wx * pw : (wx + 1) * pw].reshape(-1)
                    vals = values[bi, j * c : (j + 1) * c, wy * ph : (wy + 1) * ph, wx * pw : (wx + 1) * pw]
                    out[bi, wy * win + wx, j * c : (j + 1) * c] = (vals.reshape(c, -1) * lg.softmax(0)).sum(-1)
    return out


def _naive_write(logits, values, win):
    b, heads, h, w = logits.shape
    c = values.shape[2] // heads
    ph, pw = h // win, w // win
    out = torch.zeros(b, heads * c, h, w)
    for bi in range(b):
        for j in range(heads):
            for y in range(h):
                for x in range(w):
                    n = (y // ph) * win + x // pw
                    out[bi, j * c : (j + 1) * c, y, x] = (
                        torch.sigmoid(logits[bi, j, y, x]) * values[bi, n, j * c : (j + 1) * c]
                    )
    return out


def test_local_read_mixture_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logits, values = torch.randn(2, 3, 6, 9, generator=g), torch.randn(2, 6, 6, 9, generator=g)
    out, attn = local_mixture_2d(logits, values, 3, 3, return_attn=True)
    torch.testing.assert_close(out, _naive_read(logits, values, 3))
    assert attn.shape == (2, 3, 6, 9)
    # a map that is not a multiple of the windows is resized first (resize_mods)
    odd = torch.randn(1, 2, 5, 7, generator=g), torch.randn(1, 4, 5, 7, generator=g)
    resized = [gen.resize_mods(z, (2, 2)) for z in odd]
    assert resized[0].shape[-2:] == (4, 8)  # nearest multiples (Python rounding: round(2.5) = 2, round(3.5) = 4)
    torch.testing.assert_close(local_mixture_2d(*odd, 2, 2), _naive_read(*resized, 2))


def test_local_write_mixture_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    logits, values = torch.randn(2, 3, 6, 9, generator=g), torch.randn(2, 9, 6, generator=g)
    out, gates = local_mixture_2d_transposed(logits, values, 3, 3, return_attn=True)
    torch.testing.assert_close(out, _naive_write(logits, values, 3))
    torch.testing.assert_close(gates, torch.sigmoid(logits))
    # odd sizes: mixture at the resized size, result resized back to the input size
    lg = torch.randn(1, 2, 5, 7, generator=g)
    vals = torch.randn(1, 4, 4, generator=g)
    ref = _naive_write(gen.resize_mods(lg, (2, 2)), vals, 2)
    ref = nn.functional.interpolate(ref, size=(5, 7), mode="bilinear", align_corners=True)
    torch.testing.assert_close(local_mixture_2d_transposed(lg, vals, 2, 2), ref)


def test_fourier_features_closed_form():
    h, w, k, res = 3, 5, 4, (16, 8)
    enc = fourier_position_encoding((h, w), k, res)
    assert enc.shape == (2 + 4 * k, h, w)
    for y in range(h):
        for x in range(w):
            p = (-1 + 2 * y / (h - 1), -1 + 2 * x / (w - 1))
            freqs = [[1 + (r / 2 - 1) * i / (k - 1) for i in range(k)] for r in res]
            ang = [math.pi * f * p[d] for d in range(2) for f in freqs[d]]
            ref = [p[0], p[1], *[math.sin(a) for a in ang], *[math.cos(a) for a in ang]]
            torch.testing.assert_close(enc[:, y, x], torch.tensor(ref), atol=1e-5, rtol=1e-5)
    layer = tiny().model[4]
    feats = layer.pos_embeddings(torch.zeros(2, 32, 6, 10))
    assert feats.shape == (2, 18, 6, 10)  # the actual map size, 2 + 4 * 4 channels
    torch.testing.assert_close(feats[1], fourier_position_encoding((6, 10), 4, (32, 32)))


def test_init_statistics():
    g = tiny(ngf=16)
    lin_conv = [m for m in g.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    weights = torch.cat([m.weight.detach().reshape(-1) for m in lin_conv])
    assert weights.numel() > 50_000
    assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
    assert all(torch.all(m.bias == 0) for m in lin_conv if m.bias is not None)
    assert abs(g.model[4].latents.std().item() - 0.02) < 0.003
    lns = [m for m in g.modules() if isinstance(m, nn.LayerNorm)]
    assert lns and all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in lns)
    convt = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert convt and all(torch.any(m.bias != 0) for m in convt)  # torch's default init, as official


# biases whose gradient is zero by construction: a per-head constant under a softmax over pixels (read logits) or
# over keys (attention key bias), a constant over keyframes under their softmax (deformable q), a bias before
# training-mode BatchNorm (ConvTranspose2d)
INVARIANT = ("read.to_logits.bias", "attn.key.bias", "q.bias")


def test_gradients_reach_every_parameter():
    g = tiny().train()
    out = g(**inputs())
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    convt_bias = {f"model.{i}.bias" for i, m in enumerate(g.model) if isinstance(m, nn.ConvTranspose2d)}
    checked = 0
    for name, p in g.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name.endswith(INVARIANT) or name in convt_bias:
            continue
        assert p.grad.abs().max() > 1e-5, name
        checked += 1
    assert checked > 200


def test_keyframe_cache_equals_the_uncached_forward_in_eval():
    g = tiny().eval()
    x = inputs(2, 3)
    with torch.no_grad():
        ref, ref_attn = g(**x, return_attn=True)
        state = g.keyframe_state(x["srcs"])
        out, attn = g(x["input"], keyframes=state, flows=x["flows"], flow_errs=x["flow_errs"], return_attn=True)
    assert isinstance(state, KeyframeState) and state.num_keyframes == 3
    assert len(state.kv) == len(state.src_lifs) == 2 and state.kv[0][0].shape == (2, 2, 3 * N_LAT, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn[-1][1], ref_attn[-1][1], atol=1e-5, rtol=1e-5)
    # a batch-1 state serves a batch of target frames
    with torch.no_grad():
        one = g.keyframe_state(x["srcs"][:1])
        srcs = x["srcs"][:1].expand(2, -1, -1, -1, -1)
        ref2 = g(x["input"], srcs, flows=x["flows"], flow_errs=x["flow_errs"])
        out2 = g(x["input"], keyframes=one, flows=x["flows"], flow_errs=x["flow_errs"])
    torch.testing.assert_close(out2, ref2, atol=1e-5, rtol=1e-5)


def test_keyframe_cache_is_refused_in_training():
    g = tiny()
    x = inputs()
    with pytest.raises(ValueError, match="eval mode"):
        g.keyframe_state(x["srcs"])
    state = g.eval().keyframe_state(x["srcs"])
    g.train()
    with pytest.raises(ValueError, match="batch statistics"):
        g(x["input"], keyframes=state, flows=x["flows"], flow_errs=x["flow_errs"])


def test_forward_does_not_sync_with_the_host():
    from gencore.testing import no_host_sync

    g = tiny()
    x = inputs()
    with no_host_sync():
        g(**x, return_attn=True)


def _bad(name: str) -> tuple[tuple, dict]:
    x = inputs()
    i, s, f, e = x["input"], x["srcs"], x["flows"], x["flow_errs"]
    return {
        "input_3d": ((i[0], s), dict(flows=f, flow_errs=e)),
        "srcs_4d": ((i, s[:, 0]), dict(flows=f, flow_errs=e)),
        "batch": ((i, s[:1]), dict(flows=f, flow_errs=e)),
        "channels": ((i, s[:, :, :3]), dict(flows=f, flow_errs=e)),
        "size": ((i, torch.randn(2, 2, 4, 36, 36)), dict(flows=f, flow_errs=e)),
        "no_keyframes": ((i, s[:, :0]), dict(flows=f[:, :0], flow_errs=e[:, :0])),
        "divisible": ((torch.randn(2, 4, 30, 30), torch.randn(2, 2, 4, 30, 30)), dict(flows=f, flow_errs=e)),
        "no_flows": ((i, s), dict(flow_errs=e)),
        "no_errs": ((i, s), dict(flows=f)),
        "flow_channels": ((i, s), dict(flows=f[:, :, :1], flow_errs=e)),
        "flow_t": ((i, s), dict(flows=f[:, :1], flow_errs=e)),
        "err_shape": ((i, s), dict(flows=f, flow_errs=e[:, :, 0])),
    }[name]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("input_3d", "input must be a 4-D"),
        ("srcs_4d", "srcs must be a 5-D"),
        ("batch", "batch size mismatch"),
        ("channels", "srcs has 3 channels"),
        ("size", "do not match the input"),
        ("no_keyframes", "at least one keyframe"),
        ("divisible", "not divisible by 2\\*\\*n_downsampling"),
        ("no_flows", "flows .* required"),
        ("no_errs", "flow_errs .* required"),
        ("flow_channels", "flows must be"),
        ("flow_t", "flows must be"),
        ("err_shape", "flow_errs must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(case, message):
    g = tiny()
    args, kwargs = _bad(case)
    with pytest.raises(ValueError, match=message):
        g(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# FFC pieces


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_ffc_edge_ratios(ratio):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    block = FFCResnetBlock(
        8, "reflect", nn.BatchNorm2d, inline=True, ratio_gin=ratio, ratio_gout=ratio, enable_lfu=False
    )
    assert block(x).shape == x.shape
    ffc = FFC(8, 6, 3, ratio, ratio, padding=1, enable_lfu=False)
    n_g = int(8 * ratio)
    parts = (x[:, : 8 - n_g] if n_g < 8 else 0, x[:, 8 - n_g :] if n_g else 0)
    out_l, out_g = ffc(parts)
    assert (out_l.shape[1] if torch.is_tensor(out_l) else 0) + (out_g.shape[1] if torch.is_tensor(out_g) else 0) == 6
    # LaMa's local Fourier unit (unused by the official configs) also runs
    lfu = FFCResnetBlock(32, "reflect", "bn", inline=True, ratio_gin=0.75, ratio_gout=0.75, enable_lfu=True)
    assert lfu(torch.randn(2, 32, 8, 8)).shape == (2, 32, 8, 8)
    with pytest.raises(ValueError, match="enable_lfu needs"):
        FFC(8, 8, 3, 0.5, 0.5, enable_lfu=True)


def test_fourier_unit_ffts_in_float32_under_autocast():
    torch.manual_seed(0)
    fu = FourierUnit(4, 4)
    x = torch.randn(2, 4, 6, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fu(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out.float()).all()
    ref = fu(x)
    assert (out.float() - ref).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------------------------------
# discriminator


def test_discriminator_official_structure_and_shapes():
    with torch.device("meta"):
        d = NLayerDiscriminator(3, ndf=64, n_layers=4)
    keys = set(d.state_dict())
    assert {"model0.0.weight", "model0.0.bias", "model4.0.weight", "model5.0.weight"} <= keys
    assert {"model1.1.running_mean", "model3.1.weight", "model4.1.weight"} <= keys
    assert d.state_dict()["model4.0.weight"].shape == (512, 512, 4, 4)
    assert d.state_dict()["model5.0.weight"].shape == (1, 512, 4, 4)
    assert not any(k.startswith("model6") for k in keys)
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, ndf=4, n_layers=4)
    logits, feats = d(torch.randn(2, 3, 256, 256))
    assert logits.shape == (2, 1, 19, 19)
    assert [f.shape for f in feats] == [
        (2, 4, 129, 129),
        (2, 8, 65, 65),
        (2, 16, 33, 33),
        (2, 32, 17, 17),
        (2, 64, 18, 18),
    ]
