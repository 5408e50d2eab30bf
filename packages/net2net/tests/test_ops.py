"""net2net.ops on a tiny trained-shaped cINN: the projection z' = T⁻¹(T(z | y_src) | y_tgt) (round trips, the
batched form against the official per-target loop), the interpolation paths, sampling. CPU, seeded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from net2net import ops
from net2net.models.flow import ConditionalFlatCouplingFlow, build_flow

K = 3  # datasets


def _onehot(labels, k: int = K) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(labels), k).float()


@pytest.fixture(scope="module")
def flow() -> ConditionalFlatCouplingFlow:
    """The tiny flow (16-d) after one training forward (ActNorms and BatchNorm statistics from data), in eval mode."""
    torch.manual_seed(0)
    flow = build_flow("tiny")
    flow.train()
    with torch.no_grad():
        flow(torch.randn(48, 16) * 2 + 0.5, _onehot(torch.arange(48) % K))
    flow.eval()
    norms = [block.norm_layer for block in flow.sub_layers]
    assert all(int(n.initialized) == 1 for n in norms)
    assert all(n.loc.abs().max() > 0.05 and (n.scale - 1).abs().max() > 0.05 for n in norms)  # not the identity
    return flow


@pytest.fixture
def z() -> torch.Tensor:
    return torch.randn(6, 16, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


def test_projection_round_trips(flow, z):
    src = _onehot([0, 1, 2, 0, 1, 2])
    tgt = _onehot([1, 2, 0, 2, 0, 1])
    # onto the source itself: T⁻¹(T(z | y) | y) = z
    torch.testing.assert_close(ops.project(flow, z, src, src), z, atol=1e-5, rtol=0)
    # s -> t -> s comes back
    zt = ops.project(flow, z, src, tgt)
    assert zt.shape == z.shape and (zt - z).abs().max() > 1e-2  # the target changes the latent
    torch.testing.assert_close(ops.project(flow, zt, tgt, src), z, atol=1e-4, rtol=0)
    # one row of conditioning is used for every latent
    one = _onehot([2])
    torch.testing.assert_close(ops.project(flow, z, src, one), ops.project(flow, z, src, one.expand(6, -1)))


def test_project_all_equals_the_official_loop_and_project(flow, z):
    src = _onehot([0, 1, 2, 2, 1, 0])
    targets = _onehot([0, 1, 2])
    batched = ops.project_all(flow, z, src, targets)
    assert batched.shape == (6, 3, 16)
    loop = ops.project_loop(flow, z, src, targets)
    torch.testing.assert_close(batched, loop, atol=1e-6, rtol=0)
    for j in range(3):
        torch.testing.assert_close(batched[:, j], ops.project(flow, z, src, targets[j : j + 1]), atol=1e-6, rtol=0)
    # the column of each item's own dataset is the item itself
    own = batched[torch.arange(6), src.argmax(1)]
    torch.testing.assert_close(own, z, atol=1e-5, rtol=0)
    # a single source row for all items; a subset of targets in another order
    sub = ops.project_all(flow, z, _onehot([1]), _onehot([2, 0]))
    full = ops.project_all(flow, z, _onehot([1]), targets)
    torch.testing.assert_close(sub, full[:, [2, 0]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["latent", "label"])
def test_interpolate_ends_at_z_and_its_projection(flow, z, mode):
    src, tgt = _onehot([0, 1, 2, 0, 1, 2]), _onehot([2])
    alphas = [0.0, 0.25, 0.5, 1.0]
    path = ops.interpolate(flow, z, src, tgt, alphas, mode=mode)
    assert path.shape == (6, 4, 16) and torch.isfinite(path).all()
    torch.testing.assert_close(path[:, 0], z, atol=1e-5, rtol=0)
    torch.testing.assert_close(path[:, -1], ops.project(flow, z, src, tgt), atol=1e-5, rtol=0)
    assert (path[:, 1] - path[:, 2]).abs().max() > 1e-3  # it moves between the ends


def test_latent_interpolation_is_linear_in_alpha_and_label_interpolation_is_not(flow, z):
    src, tgt = _onehot([0, 1, 2, 0, 1, 2]), _onehot([1, 2, 0, 1, 2, 0])
    alphas = torch.tensor([0.0, 0.1, 0.5, 0.8, 1.0])
    latent = ops.interpolate(flow, z, src, tgt, alphas.tolist(), mode="latent")
    zp = ops.project(flow, z, src, tgt)
    expected = z[:, None] + alphas[None, :, None] * (zp - z)[:, None]
    torch.testing.assert_close(latent, expected, atol=1e-5, rtol=0)
    assert torch.equal(latent[:, 0], z) and torch.equal(latent[:, -1], zp)  # exact ends (lerp)
    label = ops.interpolate(flow, z, src, tgt, alphas.tolist(), mode="label")
    # the same ends, a different path: T⁻¹ of the blended label is not the blend of the latents
    torch.testing.assert_close(label[:, [0, -1]], latent[:, [0, -1]], atol=1e-5, rtol=0)
    assert (label[:, 2] - latent[:, 2]).abs().max() > 1e-3
    # label mode: exactly T⁻¹(T(z | y_src) | (1 − α) y_src + α y_tgt)
    v, _ = flow(z, src)
    mid = flow.reverse(v, 0.5 * src + 0.5 * tgt)
    torch.testing.assert_close(label[:, 2], mid, atol=1e-5, rtol=0)


def test_integer_one_hot_conditionings_work_as_in_the_flow(flow, z):
    """The official Labelator gives long one-hots; the flow takes them, so do the ops."""
    src_l, tgt_l = F.one_hot(torch.arange(6) % K, K), F.one_hot(torch.tensor([2]), K)
    src_f, tgt_f = src_l.float(), tgt_l.float()
    torch.testing.assert_close(ops.project(flow, z, src_l, tgt_l), ops.project(flow, z, src_f, tgt_f))
    for mode in ("latent", "label"):
        a = ops.interpolate(flow, z, src_l, tgt_l, [0.0, 0.5, 1.0], mode=mode)
        torch.testing.assert_close(a, ops.interpolate(flow, z, src_f, tgt_f, [0.0, 0.5, 1.0], mode=mode))
    s = ops.sample(flow, src_l, 16, generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, ops.sample(flow, src_f, 16, generator=torch.Generator().manual_seed(0)))


def test_errors(flow, z):
    src, tgt = _onehot([0] * 6), _onehot([1])
    with pytest.raises(ValueError, match="unknown mode 'pixel'; valid: latent, label"):
        ops.interpolate(flow, z, src, tgt, [0.5], mode="pixel")
    with pytest.raises(ValueError, match="no alphas"):
        ops.interpolate(flow, z, src, tgt, [])
    with pytest.raises(ValueError, match="2 conditionings for 6 latents"):
        ops.interpolate(flow, z, src[:2], tgt, [0.5])
    with pytest.raises(ValueError, match="3 conditionings for 6 latents"):
        ops.project(flow, z, src, _onehot([0, 1, 2]))
    with pytest.raises(ValueError, match="project_all: 4 conditionings for 6 latents"):
        ops.project_all(flow, z, src[:4], _onehot([0, 1]))
    with pytest.raises(ValueError, match=r"must be \(B, width\)"):
        ops.project(flow, z, src[:, :, None], tgt)


def test_sample_is_deterministic_with_a_generator_and_follows_the_conditioning(flow):
    c = _onehot([0, 1, 2, 0])

    def draw(seed, cond=c, **kw):
        return ops.sample(flow, cond, 16, generator=torch.Generator().manual_seed(seed), **kw)

    a = draw(0)
    assert a.shape == (4, 16) and torch.isfinite(a).all()
    assert torch.equal(a, draw(0))
    assert not torch.allclose(a, draw(1))
    # exactly T⁻¹(t · ε | c) with ε the generator's normal draw
    eps = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw(0, temperature=0.7), flow.reverse(0.7 * eps, c), atol=1e-6, rtol=0)
    torch.testing.assert_close(draw(0, temperature=0.0), flow.reverse(torch.zeros(4, 16), c))
    # the same noise under another dataset's label gives another latent; the same label the same one
    other = draw(0, cond=_onehot([1, 2, 0, 0]))
    assert ((other[:3] - a[:3]).abs().amax(1) > 1e-3).all()
    torch.testing.assert_close(other[3], a[3])
    # with the zero temperature, rows differ only through their conditioning
    mode = draw(0, cond=_onehot([0, 0, 1, 1]), temperature=0.0)
    torch.testing.assert_close(mode[0], mode[1])
    assert (mode[0] - mode[2]).abs().max() > 1e-3
