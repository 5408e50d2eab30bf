"""The dimensionality estimate: the paper's formula on planted factors, its softmax squashing, degenerate cases,
parity with an independent float64 implementation, and the errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shapebias.dims import collect_pair_features, dim_est, dims_from_scores, estimate_stages


def planted(n: int, d: int, shape_dims: int, texture_dims: int, residual_var: float, seed: int = 0):
    """Pairs whose first ``shape_dims`` dimensions are one shared unit-variance latent per dimension in shape pairs
    (factor 0), the next ``texture_dims`` in texture pairs (factor 1); every other dimension of either example is
    independent. Residual dimensions (past both blocks) have variance ``residual_var``."""
    rng = np.random.default_rng(seed)
    std = np.ones(d, np.float32)
    std[shape_dims + texture_dims :] = math.sqrt(residual_var)
    za = (rng.standard_normal((n, d)) * std).astype(np.float32)
    zb = (rng.standard_normal((n, d)) * std).astype(np.float32)
    factors = rng.integers(0, 2, n)
    s, t = slice(0, shape_dims), slice(shape_dims, shape_dims + texture_dims)
    zb[factors == 0, s] = za[factors == 0, s]
    zb[factors == 1, t] = za[factors == 1, t]
    return za, zb, factors


def reference_scores(za, zb, factors):
    """The formula written out independently, in float64, one dimension at a time."""
    za, zb = za.astype(np.float64), zb.astype(np.float64)
    z = np.concatenate([za, zb])
    total = sum(float(np.mean((z[:, j] - z[:, j].mean()) ** 2)) for j in range(z.shape[1]))
    out = []
    for f in (0, 1):
        a, b = za[factors == f], zb[factors == f]
        cov = 0.0
        for j in range(za.shape[1]):
            m = 0.5 * (a[:, j].mean() + b[:, j].mean())
            cov += float(np.mean((a[:, j] - m) * (b[:, j] - m)))
        out.append(cov / total)
    return np.array([*out, 1.0])


def test_planted_factors_give_the_expected_scores_and_the_squashed_counts():
    # 600 shape and 300 texture dimensions of unit variance among 2048, the rest at variance 0.2: total variance
    # 900 + 1148 * 0.2 = 1129.6, so P = (600, 300) / 1129.6 = (0.531, 0.266), a raw 2:1 ratio
    za, zb, factors = planted(6000, 2048, 600, 300, 0.2)
    est = dim_est(za, zb, factors)
    expected = np.array([600 / 1129.6, 300 / 1129.6, 1.0])
    np.testing.assert_allclose(est.scores, expected, atol=0.01)
    assert est.dim == 2048 and sum(est.dims) == 2048
    want, _ = dims_from_scores(expected, 2048)
    assert all(abs(x - y) <= 8 for x, y in zip(est.dims, want, strict=True)), (est.dims, want)
    # the softmax squashes 2:1 down to about 1.3:1, and the residual keeps the most dimensions
    assert 1.25 < est["shape"] / est["texture"] < 1.4
    assert est["residual"] > est["shape"] > est["texture"]
    assert est.pairs["shape"] + est.pairs["texture"] == 6000


def test_the_documented_example_counts():
    # P = (0.5325, 0.2505, 1) over D = 2048: [611, 461, 976] = [29.8%, 22.5%, 47.7%] (shared/reference/shapebias.md)
    dims, percent = dims_from_scores([0.5325, 0.2505, 1.0], 2048)
    assert dims == [611, 461, 976] and percent == [29.8, 22.5, 47.7]
    # P = (0.53, 0.27, 1): proportions about 0.30 / 0.23 / 0.47
    dims, _ = dims_from_scores([0.53, 0.27, 1.0], 2048)
    np.testing.assert_allclose(np.array(dims) / 2048, [0.30, 0.23, 0.47], atol=0.006)


def test_counts_truncate_per_factor_and_the_remainder_goes_to_the_residual():
    p = np.array([0.2, 0.1, 1.0])
    e = np.exp(p - p.max())
    soft = e / e.sum()
    dims, percent = dims_from_scores(p, 7)
    assert dims[:2] == [int(soft[0] * 7), int(soft[1] * 7)] and sum(dims) == 7
    assert all(round(x, 1) == x for x in percent)
    # a factor can never get more than e / (e + 2) of the dimensions while another is at 0
    dims, _ = dims_from_scores([1.0, 0.0, 1.0], 1000)
    assert dims[0] == int(1000 * math.e / (2 * math.e + 1))


def test_parity_with_an_independent_float64_implementation():
    za, zb, factors = planted(400, 64, 10, 20, 0.5, seed=3)
    est = dim_est(za, zb, factors)
    np.testing.assert_allclose(est.scores, reference_scores(za, zb, factors), rtol=1e-5, atol=1e-6)
    assert list(est.dims) == dims_from_scores(reference_scores(za, zb, factors), 64)[0]
    assert all(isinstance(s, float) for s in est.scores)


def test_identical_shape_pairs_score_their_variance_share_and_independent_pairs_score_zero():
    rng = np.random.default_rng(1)
    za = rng.standard_normal((3000, 16)).astype(np.float32) * np.linspace(0.5, 2, 16, dtype=np.float32)
    zb = rng.standard_normal((3000, 16)).astype(np.float32) * np.linspace(0.5, 2, 16, dtype=np.float32)
    factors = np.arange(3000) % 2
    zb[factors == 0] = za[factors == 0]
    est = dim_est(za, zb, factors)
    z = np.concatenate([za, zb])
    total = np.var(z, axis=0).sum()  # ddof 0 over the 2N stacked rows
    assert est.scores[0] == pytest.approx(np.var(za[factors == 0], axis=0).sum() / total, rel=1e-4)
    assert abs(est.scores[1]) < 0.02  # independent texture pairs: no shared variance


def test_other_factor_values_only_enter_the_total_variance():
    za, zb, factors = planted(500, 32, 8, 8, 1.0, seed=2)
    base = dim_est(za, zb, factors)
    rng = np.random.default_rng(5)
    extra_a = (rng.standard_normal((250, 32)) * 3).astype(np.float32)
    extra_b = (rng.standard_normal((250, 32)) * 3).astype(np.float32)
    more = dim_est(np.concatenate([za, extra_a]), np.concatenate([zb, extra_b]), np.r_[factors, np.full(250, 3)])
    z0 = np.concatenate([za, zb])
    z1 = np.concatenate([za, extra_a, zb, extra_b])
    ratio = np.var(z0, axis=0).sum() / np.var(z1, axis=0).sum()
    np.testing.assert_allclose(np.array(more.scores[:2]), np.array(base.scores[:2]) * ratio, rtol=1e-4)
    assert more.pairs == base.pairs


def test_inputs_as_tensors_and_lists_of_batches():
    za, zb, factors = planted(200, 16, 4, 4, 1.0, seed=4)
    est = dim_est(za, zb, factors)
    batches = dim_est([za[:100], za[100:]], [torch.from_numpy(zb[:100]), torch.from_numpy(zb[100:])], factors)
    tensors = dim_est(torch.from_numpy(za), torch.from_numpy(zb), torch.from_numpy(factors))
    assert est.dims == batches.dims == tensors.dims
    d = est.as_dict()
    assert d["dims"]["shape"] == est.dims[0] and d["percent"]["residual"] == est.percent[2]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda za, zb, f: (za, zb[:, :8], f), r"mismatched feature widths: example1 features are 16-d"),
        (lambda za, zb, f: (za, zb[:10], f), r"example1 rows"),
        (lambda za, zb, f: (za, zb, np.ones_like(f)), r"no pairs of factor 0 \('shape'\)"),
        (lambda za, zb, f: (za[:, 0], zb[:, 0], f), r"\(N, D\) matrices"),
        (lambda za, zb, f: (np.zeros_like(za), np.zeros_like(zb), f), r"zero total variance"),
        (lambda za, zb, f: (np.full_like(za, np.nan), zb, f), r"NaN"),
    ],
)
def test_bad_input_names_the_problem(change, message):
    za, zb, factors = planted(50, 16, 4, 4, 1.0)
    with pytest.raises(ValueError, match=message):
        dim_est(*change(za, zb, factors))


def test_collect_pair_features_runs_every_stage_in_one_pass():
    torch.manual_seed(0)
    w1, w2 = torch.randn(12, 4), torch.randn(12, 6)
    calls = []

    def features(x, stages):
        calls.append(tuple(stages))
        flat = x.flatten(1)
        return {"1": flat @ w1, "2": torch.tanh(flat @ w2)}

    batches = [
        {"factor": torch.tensor([0, 1, 0]), "example1": torch.randn(3, 3, 2, 2), "example2": torch.randn(3, 3, 2, 2)}
        for _ in range(4)
    ]
    feats = collect_pair_features(features, batches, ["1", "2"])
    assert len(calls) == 4 and feats.a["1"].shape == (12, 4) and feats.b["2"].shape == (12, 6)
    x1 = torch.cat([b["example1"] for b in batches]).flatten(1)
    np.testing.assert_allclose(feats.a["1"], (x1 @ w1).numpy(), rtol=1e-5, atol=1e-6)
    assert feats.factors.tolist() == [0, 1, 0] * 4
    per_stage = estimate_stages(feats)
    assert list(per_stage) == ["1", "2"] and per_stage["2"].dim == 6
    with pytest.raises(ValueError, match="pair loader is empty"):
        collect_pair_features(features, [], ["1"])
