"""Tests of net2net's cINN (net2net.models.flow): invertibility, exact log-determinants, ActNorm's initialisation and
its host-sync-free cache, the loss, checkpoints (state dict names, safetensors), errors. CPU, tiny, seeded."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.autograd.functional import jacobian

from net2net.models.flow import (
    FLOW_PRESETS,
    ActNorm,
    BasicFullyConnectedNet,
    ConditionalDoubleVectorCouplingBlock,
    ConditionalFlatCouplingFlow,
    ConditionalFlatDoubleCouplingFlowBlock,
    InvLeakyRelu,
    Shuffle,
    bits_per_dim,
    build_flow,
    nll_loss,
)


def _labels(batch: int = 8, classes: int = 3) -> torch.Tensor:
    return F.one_hot(torch.arange(batch) % classes, classes)  # (B, 3), long, as the official Labelator gives


def _initialised_flow(seed: int = 0, **overrides) -> ConditionalFlatCouplingFlow:
    """A tiny flow after one training step's worth of ActNorm initialisation, in eval mode."""
    torch.manual_seed(seed)
    flow = build_flow("tiny", **overrides)
    width = flow.in_channels
    flow.train()
    with torch.no_grad():
        flow(torch.randn(32, width) * 2 + 0.5, _labels(32))
    return flow.eval()


# ---------------------------------------------------------------------------------------------------- structure
def test_tiny_state_dict_has_the_official_keys():
    flow = build_flow("tiny")
    keys = list(flow.state_dict())
    # embedder: 4 Linear (2 keys) + 3 BatchNorm1d (5 keys) = 23; per block: ActNorm 3 + 4 nets × 4 Linear × 2 + 2 = 37
    assert len(keys) == 171
    for key in (
        "embedder.main.0.weight",
        "embedder.main.1.running_mean",
        "embedder.main.1.num_batches_tracked",
        "embedder.main.9.bias",
        "sub_layers.0.norm_layer.loc",
        "sub_layers.0.norm_layer.scale",
        "sub_layers.0.norm_layer.initialized",
        "sub_layers.3.coupling.s.1.main.6.weight",
        "sub_layers.3.coupling.t.0.main.0.bias",
        "sub_layers.2.shuffle.forward_shuffle_idx",
        "sub_layers.2.shuffle.backward_shuffle_idx",
    ):
        assert key in keys
    assert not any(k.startswith("conditioning_layers") for k in keys)
    par = build_flow("tiny", conditioning_option="parallel").state_dict()
    assert len(par) == 171 + 4 * 2 and "conditioning_layers.3.weight" in par
    assert par["conditioning_layers.0.weight"].shape == (10, 10, 1, 1)


def test_basic_fully_connected_net_layer_order():
    net = BasicFullyConnectedNet(dim=5, depth=2, hidden_dim=7, use_tanh=True, use_an=True, out_dim=3)
    kinds = [type(m).__name__ for m in net.main]
    # ActNorm only after the first Linear (official), no norm inside the depth loop without use_bn
    assert kinds == ["Linear", "ActNorm", "LeakyReLU", "Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear", "Tanh"]
    assert net.main[2].negative_slope == 0.01
    bn = BasicFullyConnectedNet(dim=5, depth=1, hidden_dim=7, use_bn=True)
    assert [type(m).__name__ for m in bn.main] == [
        "Linear", "BatchNorm1d", "LeakyReLU", "Linear", "BatchNorm1d", "LeakyReLU", "Linear"
    ]  # fmt: skip
    assert bn(torch.randn(4, 5)).shape == (4, 5)


def test_presets():
    assert set(FLOW_PRESETS) == {"tiny", "creativity", "toy"}
    c = FLOW_PRESETS["creativity"]
    assert (c["in_channels"], c["n_flows"], c["hidden_dim"], c["activation"]) == (128, 20, 1024, "none")
    flow = build_flow("toy", n_flows=2)  # overrides win
    assert len(flow.sub_layers) == 2 and flow.in_channels == 256
    assert flow.embedder.main[0].out_features == 64


# ------------------------------------------------------------------------------------------------ invertibility
@pytest.mark.parametrize(
    "overrides",
    [{}, {"activation": "lrelu"}, {"conditioning_option": "parallel"}, {"conditioning_option": "sequential"}],
    ids=["none", "lrelu", "parallel", "sequential"],
)
@pytest.mark.parametrize("rank", [2, 4])
def test_reverse_inverts_forward(overrides, rank):
    flow = _initialised_flow(**overrides)
    z = torch.randn(8, 16) * 1.5
    if rank == 4:
        z = z[:, :, None, None]
    y = _labels(8)
    with torch.no_grad():
        v, logdet = flow(z, y)
        assert v.shape == z.shape and logdet.shape == (8,)
        back = flow(v, y, reverse=True)
        assert back.shape == z.shape
        assert torch.allclose(back, z, atol=1e-5, rtol=0)
        assert torch.allclose(flow.reverse(v, y), back)
        # the conditioning matters, and precomputed per-block conditionings give the same result
        v_other, _ = flow(z, _labels(9)[1:])
        assert not torch.allclose(v_other, v)
        emb = flow.embed(y)
        assert len(emb) == 4 and emb[0].shape == (8, 10)
        v_emb, ld_emb = flow(z, embedding=emb)
        assert torch.equal(v_emb, v) and torch.equal(ld_emb, logdet)
        assert torch.equal(flow.reverse(v, embedding=emb), back)
        # the (B, D, 1, 1) conditioning is the same as (B, D)
        assert torch.equal(flow(z, y[:, :, None, None])[0], v)


def test_coupling_block_inverts_and_keeps_rank():
    torch.manual_seed(0)
    block = ConditionalDoubleVectorCouplingBlock(6, 2, 16, depth=1)
    x, c = torch.randn(5, 6), torch.randn(5, 2)
    y, logdet = block(x, c)
    assert y.shape == (5, 6) and logdet.shape == (5,)
    assert torch.allclose(block(y, c, reverse=True), x, atol=1e-6)
    y4, logdet4 = block(x[:, :, None, None], c[:, :, None, None])
    assert y4.shape == (5, 6, 1, 1) and torch.equal(y4.flatten(1), y) and torch.equal(logdet4, logdet)
    # the first coupling keeps the first half, the second the transformed second half: out = [b', a']
    a, b = x.chunk(2, 1)
    h = torch.cat((a, c), 1)
    b_new = b * block.s[0](h).exp() + block.t[0](h)
    assert torch.allclose(y[:, :3], b_new, atol=1e-6)


# --------------------------------------------------------------------------------------------------- logdet
@pytest.mark.parametrize("activation", ["none", "lrelu"])
def test_logdet_matches_the_jacobian(activation):
    torch.manual_seed(1)
    flow = build_flow(
        "tiny", in_channels=4, activation=activation, conditioning_option="sequential", n_flows=3
    ).double()
    with torch.no_grad():  # non-trivial ActNorms (one negative scale: log|scale|)
        for block in flow.sub_layers:
            block.norm_layer.loc.normal_(0, 0.5)
            block.norm_layer.scale.uniform_(0.5, 1.5)
        flow.sub_layers[0].norm_layer.scale[0, 1] *= -1
    flow.eval()
    y = _labels(4)
    xs = torch.randn(4, 4, dtype=torch.float64)
    with torch.no_grad():
        _, logdet = flow(xs, y)
    for i in range(4):
        f = lambda x, i=i: flow(x[None], y[i : i + 1])[0][0]
        jac = jacobian(f, xs[i])
        _, logabs = torch.linalg.slogdet(jac)
        assert abs(logabs.item() - logdet[i].item()) < 1e-9
        # and the 4-D path gives the same
        assert torch.allclose(flow(xs[i : i + 1, :, None, None], y[i : i + 1])[1], logdet[i : i + 1])
    if activation == "lrelu":  # some entries were negative, so the activation contributed
        x = torch.randn(3, 4, dtype=torch.float64)
        h, ld = InvLeakyRelu(0.9)(x)
        assert torch.allclose(ld, (x < 0).sum(1).double() * math.log(0.9))
        assert torch.allclose(InvLeakyRelu(0.9).reverse(h), x)


# --------------------------------------------------------------------------------------------------- ActNorm
def test_actnorm_data_dependent_init_once():
    torch.manual_seed(0)
    norm = ActNorm(5, logdet=True)
    assert norm.initialized.item() == 0
    x = torch.randn(16, 5, 3, 2) * torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0]).view(1, 5, 1, 1) + 3
    norm.train()
    h, logdet = norm(x)
    flat = x.transpose(0, 1).reshape(5, -1)
    assert torch.allclose(norm.loc.view(5), -flat.mean(1))
    assert torch.allclose(norm.scale.view(5), 1 / (flat.std(1) + 1e-6))
    assert norm.initialized.item() == 1
    assert torch.allclose(h.transpose(0, 1).reshape(5, -1).mean(1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(logdet, 6 * norm.scale.abs().log().sum() * torch.ones(16))
    loc, scale = norm.loc.detach().clone(), norm.scale.detach().clone()
    norm(torch.randn(16, 5, 3, 2) * 10 - 4)  # other data: no re-initialisation
    assert torch.equal(norm.loc, loc) and torch.equal(norm.scale, scale)
    assert torch.allclose(norm.reverse(h), x, atol=1e-5)
    # 2-D in, 2-D out
    h2 = ActNorm(5)(torch.randn(4, 5))
    assert h2.shape == (4, 5)


def test_actnorm_respects_loaded_flag():
    torch.manual_seed(0)
    src = ActNorm(4)
    with torch.no_grad():
        src.loc.fill_(0.25)
        src.scale.fill_(2.0)
        src.initialized.fill_(1)
    fresh = ActNorm(4).train()
    fresh(torch.randn(8, 4))  # a fresh module initialises (and caches that it did) ...
    fresh.load_state_dict(src.state_dict())  # ... but a loaded checkpoint's flag is read again
    fresh(torch.randn(8, 4) * 7)
    assert torch.equal(fresh.loc, src.loc) and torch.equal(fresh.scale, src.scale)

    # a loaded initialized = 0 re-initialises at the next training forward
    sd = src.state_dict()
    sd["initialized"] = torch.tensor(0, dtype=torch.uint8)
    again = ActNorm(4).train()
    again(torch.randn(8, 4))
    again.load_state_dict(sd)
    x = torch.randn(32, 4) * 3 + 1
    again(x)
    assert torch.allclose(again.loc.view(4), -x.mean(0)) and again.initialized.item() == 1

    # reset() forgets the initialisation
    again.reset()
    assert again.initialized.item() == 0
    again(x * 2)
    assert torch.allclose(again.loc.view(4), -2 * x.mean(0), atol=1e-5)

    # eval mode never initialises
    ev = ActNorm(4).eval()
    ev(x)
    assert ev.initialized.item() == 0 and torch.equal(ev.loc, torch.zeros(1, 4, 1, 1))


def test_actnorm_reverse_init():
    norm = ActNorm(3).train()
    with pytest.raises(RuntimeError, match="allow_reverse_init"):
        norm.reverse(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="allow_reverse_init"):
        norm(torch.randn(4, 3), reverse=True)
    norm.eval()
    norm.reverse(torch.randn(4, 3))  # no initialisation outside training: fine
    rev = ActNorm(3, allow_reverse_init=True).train()
    h = torch.randn(64, 3) * 2 + 1
    x = rev.reverse(h)  # 2-D works (the official initialises before reshaping and fails)
    assert x.shape == (64, 3) and rev.initialized.item() == 1
    assert torch.allclose(rev.loc.view(3), -h.mean(0))


def test_no_host_sync_after_the_first_step(monkeypatch):
    flow = build_flow("tiny", conditioning_option="sequential", activation="lrelu").train()
    z, y = torch.randn(8, 16), _labels(8)
    flow(z, y)  # first step: initialises the ActNorms (one read of each flag)

    def _no_sync(*args, **kwargs):
        raise AssertionError("host sync in the training forward")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, _no_sync)
        v, logdet = flow(z * 2, y)
        loss, _ = nll_loss(v, logdet)
        loss.backward()
        flow.reverse(v.detach(), y)
    assert bool(torch.isfinite(loss))  # patched away again

    # after load_state_dict the flag is read once more, then never again
    flow.load_state_dict(flow.state_dict())
    flow(z, y)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", _no_sync)
        m.setattr(torch.Tensor, "__bool__", _no_sync)
        flow(z, y)


def test_actnorm_distributed_statistics_are_pooled(monkeypatch):
    """With a (simulated) second process holding `other`, the init statistics are those of both batches."""
    torch.manual_seed(0)
    mine, other = torch.randn(6, 3, 2, 2) + 1, torch.randn(10, 3, 2, 2) * 3 - 2
    flat_other = other.double().transpose(0, 1).reshape(3, -1)
    other_stats = torch.stack([flat_other.sum(1), flat_other.square().sum(1), torch.full((3,), 40.0).double()])
    calls = []

    def fake_all_reduce(t, *args, **kwargs):
        calls.append(t.shape)
        t.add_(other_stats)

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    norm = ActNorm(3).train()
    norm(mine)
    assert calls == [(3, 3)]
    both = torch.cat((mine, other)).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(norm.loc.view(3), -both.mean(1), atol=1e-6)
    assert torch.allclose(norm.scale.view(3), 1 / (both.std(1) + 1e-6), atol=1e-6)  # same (unbiased) formula
    norm(mine)
    assert len(calls) == 1


# -------------------------------------------------------------------------------------------------- Shuffle
def test_shuffle_inverse_and_persistent():
    sh = Shuffle(7, seed=3)
    assert torch.equal(sh.forward_shuffle_idx[sh.backward_shuffle_idx], torch.arange(7))
    assert torch.equal(Shuffle(7, seed=3).forward_shuffle_idx, sh.forward_shuffle_idx)
    x = torch.randn(2, 7, 1, 1)
    y, ld = sh(x)
    assert torch.equal(y, x[:, sh.forward_shuffle_idx]) and torch.equal(ld, torch.zeros(2))
    assert torch.equal(sh(y, reverse=True), x) and torch.equal(sh.reverse(y[:, :, 0, 0]), x[:, :, 0, 0])
    sd = sh.state_dict()
    assert set(sd) == {"forward_shuffle_idx", "backward_shuffle_idx"}
    other = Shuffle(7, seed=4)
    other.load_state_dict(sd)
    assert torch.equal(other.forward_shuffle_idx, sh.forward_shuffle_idx)
    assert torch.equal(other.backward_shuffle_idx, sh.backward_shuffle_idx)


# ----------------------------------------------------------------------------------------------------- losses
def test_nll_loss():
    v, logdet = torch.zeros(4, 16, 1, 1), torch.zeros(4)
    loss, parts = nll_loss(v, logdet)
    assert loss.item() == 0.0 and set(parts) == {"nll_loss", "nlogdet_loss", "reference_nll_loss"}
    assert all(isinstance(p, torch.Tensor) for p in parts.values())
    torch.manual_seed(0)
    v, logdet = torch.randn(5, 16), torch.randn(5)
    loss, parts = nll_loss(v, logdet)
    expected = (0.5 * v.pow(2).sum(1)).mean() - logdet.mean()
    assert torch.allclose(loss, expected)
    assert torch.allclose(parts["nll_loss"] + parts["nlogdet_loss"], loss)
    assert 0 < parts["reference_nll_loss"].item() < 32  # ≈ D/2 = 8
    with pytest.raises(ValueError, match="logdet"):
        nll_loss(v, logdet[:, None])


def test_bits_per_dim_identity_flow_closed_form():
    torch.manual_seed(0)
    flow = build_flow("tiny").eval()
    with torch.no_grad():  # identity couplings: s = tanh(0) = 0, t = 0; ActNorm uninitialised = identity in eval
        for block in flow.sub_layers:
            for net in (*block.coupling.s, *block.coupling.t):
                net.main[-2 if isinstance(net.main[-1], torch.nn.Tanh) else -1].weight.zero_()
                net.main[-2 if isinstance(net.main[-1], torch.nn.Tanh) else -1].bias.zero_()
    z = torch.randn(4096, 16)
    with torch.no_grad():
        v, logdet = flow(z, _labels(4096))
    assert torch.equal(logdet, torch.zeros(4096))
    assert torch.allclose(v.pow(2).sum(1), z.pow(2).sum(1))  # a permutation of z
    bpd = bits_per_dim(v, logdet)
    closed = -torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1) / (16 * math.log(2))
    assert bpd.shape == (4096,) and torch.allclose(bpd, closed, atol=1e-5)
    # the expectation for N(0, I): (1 + log 2π) / (2 ln 2) ≈ 2.047 bits per dimension
    assert abs(bpd.mean().item() - (1 + math.log(2 * math.pi)) / (2 * math.log(2))) < 0.02


# ------------------------------------------------------------------------------------------- training / checkpoints
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    flow = build_flow("tiny", conditioning_option="parallel", activation="lrelu").train()
    z, y = torch.randn(16, 16), _labels(16)
    flow(z, y)  # ActNorm initialisation step
    v, logdet = flow(z, y)
    loss, _ = nll_loss(v, logdet)
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_same_seed_same_flow():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        flow = build_flow("tiny", conditioning_option="sequential")
        z, y = torch.randn(6, 16), _labels(6)
        v, logdet = flow.train()(z, y)
        s = flow.eval().sample(y, generator=torch.Generator().manual_seed(5))
        outs.append((v, logdet, s))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert outs[0][2].shape == (6, 16)


def test_safetensors_round_trip(tmp_path):
    flow = _initialised_flow(conditioning_option="parallel")
    path = tmp_path / "flow.safetensors"
    save_file(flow.state_dict(), str(path))
    torch.manual_seed(99)  # another shuffle, other weights
    fresh = build_flow("tiny", conditioning_option="parallel")
    fresh.load_state_dict(load_file(str(path)), strict=True)
    fresh.eval()
    z, y = torch.randn(5, 16), _labels(5)
    with torch.no_grad():
        v, ld = flow(z, y)
        v2, ld2 = fresh(z, y)
        assert torch.equal(v, v2) and torch.equal(ld, ld2)
        assert torch.equal(flow.reverse(v, y), fresh.reverse(v, y))
    # the loaded ActNorms count as initialised: training does not re-initialise them
    loc = fresh.sub_layers[0].norm_layer.loc.detach().clone()
    fresh.train()(z * 5, y)
    assert torch.equal(fresh.sub_layers[0].norm_layer.loc, loc)


def test_sample_follows_the_conditioning():
    flow = _initialised_flow()
    y = _labels(6)
    with torch.no_grad():
        s = flow.sample(y, generator=torch.Generator().manual_seed(0))
        v = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(s, flow.reverse(v, y))
        assert torch.allclose(flow(s, y)[0], v, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ errors
def test_errors():
    with pytest.raises(ValueError, match="in_channels must be even"):
        ConditionalDoubleVectorCouplingBlock(5, 2, 8)
    with pytest.raises(ValueError, match="in_channels=7"):
        build_flow("tiny", in_channels=7)
    with pytest.raises(ValueError, match=r"unknown activation 'relu'.*\['lrelu', 'none'\]"):
        build_flow("tiny", activation="relu")
    with pytest.raises(ValueError, match="unknown activation"):
        ConditionalFlatDoubleCouplingFlowBlock(4, 2, 8, 1, activation="tanh")
    with pytest.raises(ValueError, match=r"unknown conditioning_option 'both'.*parallel.*sequential"):
        build_flow("tiny", conditioning_option="both")
    with pytest.raises(ValueError, match=r"unknown flow preset 'huge'.*creativity.*tiny.*toy"):
        build_flow("huge")
    with pytest.raises(ValueError, match="cannot both"):
        build_flow("tiny", conditioner_use_an=True)

    flow = build_flow("tiny").eval()
    y = _labels(4)
    with pytest.raises(ValueError, match="latents of width 12, the flow was built for in_channels=16"):
        flow(torch.randn(4, 12), y)
    with pytest.raises(ValueError, match="latents of width 12"):
        flow.reverse(torch.randn(4, 12), y)
    with pytest.raises(ValueError, match="spatial size 2x2.*flatten"):
        flow(torch.randn(4, 4, 2, 2), y)
    with pytest.raises(ValueError, match=r"expected \(B, C\)"):
        flow(torch.randn(4, 16, 1), y)
    with pytest.raises(ValueError, match="conditioning of width 2, expected conditioning_dim=3"):
        flow(torch.randn(4, 16), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="spatial conditionings"):
        flow(torch.randn(4, 16), torch.zeros(4, 3, 2, 2))
    with pytest.raises(ValueError, match="batch size 4 but the conditioning has batch size 3"):
        flow(torch.randn(4, 16), y[:3])
    with pytest.raises(ValueError, match="exactly one"):
        flow(torch.randn(4, 16))
    with pytest.raises(ValueError, match="one per block"):
        flow(torch.randn(4, 16), embedding=flow.embed(y)[:2])
