"""sd3_flow.losses: timestep densities vs closed forms, the shift, the rf / eps-linear losses vs hand computations and
diffusers' training utilities (pinned in behaviour: ``compute_density_for_timestep_sampling`` /
``compute_loss_weighting_for_sd3`` of diffusers 0.42.1), the per-timestep loss buckets."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from gencore.diffusion import LossBuckets
from gencore.testing import HostSyncError, no_host_sync
from sd3_flow.losses import (
    MODE_S_MAX,
    EpsilonLinearLoss,
    RectifiedFlowLoss,
    TimestepDensity,
    implicit_weight,
    ldm_linear_schedule,
    loss_weight,
    make_objective,
    resolution_shift,
    shift_time,
    unshift_time,
)

N = 20_000
KS_CRIT = 1.95 / math.sqrt(N)  # Kolmogorov-Smirnov critical value at alpha = 0.001

DENSITIES = [
    TimestepDensity.lognorm(0.0, 1.0),
    TimestepDensity.lognorm(0.5, 0.6),
    TimestepDensity.lognorm(-0.5, 1.5),
    TimestepDensity.mode(1.29),
    TimestepDensity.mode(-0.5),
    TimestepDensity.cosmap(),
    TimestepDensity.uniform(),
]


def _ks(samples: torch.Tensor, density: TimestepDensity, shift: float = 1.0) -> float:
    x = samples.double().sort().values
    cdf = density.cdf(x, shift=shift)
    n = x.numel()
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    lo = torch.arange(0, n, dtype=torch.float64) / n
    return max((hi - cdf).abs().max().item(), (cdf - lo).abs().max().item())


def _integrate(f, a: float, b: float, n: int = 4001) -> torch.Tensor:
    x = torch.linspace(a, b, n, dtype=torch.float64)
    return torch.trapezoid(f(x), x)


# ---------------------------------------------------------------------------------------------------------------------
# densities
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", DENSITIES, ids=str)
def test_density_samples_match_cdf_ks(density: TimestepDensity) -> None:
    t = density.sample(N, generator=torch.Generator().manual_seed(0))
    assert t.shape == (N,) and t.dtype == torch.float32
    assert 0.0 <= t.min().item() and t.max().item() <= 1.0
    assert _ks(t, density) < KS_CRIT


@pytest.mark.parametrize("density", DENSITIES, ids=str)
def test_density_pdf_matches_histogram_and_cdf(density: TimestepDensity) -> None:
    """The pdf integrates to the closed-form cdf, and binned probabilities match the empirical histogram."""
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    probs = torch.stack([_integrate(density.pdf, a, b) for a, b in pairwise(edges)])
    cdf_diff = density.cdf(edges[1:]) - density.cdf(edges[:-1])
    torch.testing.assert_close(probs, cdf_diff, atol=2e-4, rtol=0)
    assert abs(probs.sum().item() - 1) < 1e-3
    t = density.sample(N, generator=torch.Generator().manual_seed(1)).double()
    hist = torch.histc(t, bins=10, min=0, max=1) / N
    assert (hist - probs).abs().max().item() < 4 * math.sqrt(0.25 / N)


def test_mode_zero_is_uniform_and_lognorm_median() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(TimestepDensity.mode(0.0).pdf(t), torch.ones_like(t))
    torch.testing.assert_close(TimestepDensity.mode(0.0).cdf(t), t)
    s = TimestepDensity.mode(0.0).sample(N, generator=torch.Generator().manual_seed(2))
    assert _ks(s, TimestepDensity.uniform()) < KS_CRIT
    ln = TimestepDensity.lognorm(0.0, 1.0)
    assert ln.cdf(torch.tensor(0.5)).item() == pytest.approx(0.5, abs=1e-12)
    assert ln.sample(N, generator=torch.Generator().manual_seed(3)).median().item() == pytest.approx(0.5, abs=0.01)
    # mode(s) with s > 0 concentrates in the middle: pdf(0.5) = 1 / (1 - s (pi/2 - 1))
    assert TimestepDensity.mode(1.29).pdf(torch.tensor(0.5)).item() == pytest.approx(1 / (1 - 1.29 * (math.pi / 2 - 1)))


def test_cosmap_closed_form() -> None:
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    cm = TimestepDensity.cosmap()
    torch.testing.assert_close(cm.pdf(t), 2 / (math.pi * (1 - 2 * t + 2 * t**2)))
    # sampler t = 1 - 1 / (tan(pi u / 2) + 1) inverts the cdf (2 / pi) atan(t / (1 - t))
    u = cm.cdf(t)
    torch.testing.assert_close(1 - 1 / (torch.tan(math.pi * u / 2) + 1), t)
    # the cosmap density equals diffusers' "cosmap" loss weight at sigma = t
    torch.testing.assert_close(cm.pdf(t), loss_weight(t, "cosmap"))


def test_shifted_density_sampler_matches_shifted_pdf() -> None:
    d = TimestepDensity.lognorm(0.0, 1.0)
    t = d.sample(N, generator=torch.Generator().manual_seed(4), shift=3.0)
    assert _ks(t, d, shift=3.0) < KS_CRIT
    assert abs(_integrate(lambda x: d.pdf(x, shift=3.0), 0.0, 1.0).item() - 1) < 1e-3
    # the median moves to shift_time(0.5, 3) = 0.75
    assert t.median().item() == pytest.approx(0.75, abs=0.01)


def test_lognorm_matches_diffusers_density_sampling() -> None:
    training_utils = pytest.importorskip("diffusers.training_utils")
    for m, s in ((0.0, 1.0), (0.5, 0.6)):
        ours = TimestepDensity.lognorm(m, s).sample(N, generator=torch.Generator().manual_seed(5))
        ref = training_utils.compute_density_for_timestep_sampling(
            "logit_normal", N, logit_mean=m, logit_std=s, generator=torch.Generator().manual_seed(5)
        )
        # same seed, same construction: identical draws (sigmoid of the same normals)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    ours = TimestepDensity.mode(1.29).sample(N, generator=torch.Generator().manual_seed(6))
    ref = training_utils.compute_density_for_timestep_sampling(
        "mode", N, mode_scale=1.29, generator=torch.Generator().manual_seed(6)
    )
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # independent seeds: still the same distribution (two-sample KS)
    ref2 = training_utils.compute_density_for_timestep_sampling(
        "logit_normal", N, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(7)
    )
    assert _ks(ref2, TimestepDensity.lognorm(0.0, 1.0)) < KS_CRIT


def test_density_parse_and_str() -> None:
    assert TimestepDensity.parse("rf/lognorm(0.00,1.00)") == TimestepDensity.lognorm(0.0, 1.0)
    assert TimestepDensity.parse("lognorm(0.5, 0.6)") == TimestepDensity.lognorm(0.5, 0.6)
    assert TimestepDensity.parse("rf/mode(1.29)") == TimestepDensity.mode(1.29)
    assert TimestepDensity.parse("cosmap") == TimestepDensity.cosmap()
    assert TimestepDensity.parse("uniform") == TimestepDensity.uniform()
    assert TimestepDensity.parse("logit_normal") == TimestepDensity.lognorm()
    for d in DENSITIES:
        assert TimestepDensity.parse(str(d)) == TimestepDensity.parse(f"rf/{d}")


# ---------------------------------------------------------------------------------------------------------------------
# shift
# ---------------------------------------------------------------------------------------------------------------------


def test_shift_map_and_inverse() -> None:
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)
    assert shift_time(0.0, 3.0) == 0.0 and shift_time(1.0, 3.0) == 1.0
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for a in (0.25, 1.0, 3.0, 4.0):
        torch.testing.assert_close(unshift_time(shift_time(t, a), a), t)
        torch.testing.assert_close(unshift_time(t, a), shift_time(t, 1 / a))
    torch.testing.assert_close(shift_time(t, 1.0), t)
    assert resolution_shift(1024**2, 256**2) == pytest.approx(4.0)
    assert resolution_shift(512 * 512, 256 * 256) == pytest.approx(2.0)
    assert resolution_shift(100, 100) == 1.0


def test_implicit_weight_relates_v_and_eps_losses() -> None:
    """||v_pred - v||^2 = -1/2 w_t lambda'_t ||eps_pred - eps||^2, w_t = t / (1 - t), lambda'_t = -2 / (t (1 - t))."""
    g = torch.Generator().manual_seed(8)
    x0, eps, v_pred = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.linspace(0.1, 0.9, 6, dtype=torch.float64).view(-1, 1)
    z = (1 - t) * x0 + t * eps
    # eps implied by v_pred at z: x0_hat = z - t v, eps_hat = z + (1 - t) v
    eps_pred = z + (1 - t) * v_pred
    lhs = (v_pred - (eps - x0)).pow(2).sum(1)
    lam_prime = -2 / (t * (1 - t))
    rhs = (-0.5 * implicit_weight(t) * lam_prime).flatten() * (eps_pred - eps).pow(2).sum(1)
    torch.testing.assert_close(lhs, rhs)


# ---------------------------------------------------------------------------------------------------------------------
# rectified flow loss
# ---------------------------------------------------------------------------------------------------------------------


def _linear_model(scale_log: list | None = None):
    w = torch.linspace(-1, 1, 3 * 4 * 4).view(1, 3, 4, 4)

    def model(x, timestep, ctx=None):
        if scale_log is not None:
            scale_log.append(timestep.clone())
        out = 0.7 * x + w * (timestep / 1000).view(-1, 1, 1, 1)
        return out if ctx is None else out + ctx.view(-1, 1, 1, 1)

    return model


def test_rf_loss_equals_hand_computation() -> None:
    g = torch.Generator().manual_seed(9)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0.1, 0.4, 0.6, 0.95])
    seen: list = []
    model = _linear_model(seen)
    for weighting in ("none", "sigma_sqrt", "cosmap"):
        buckets = LossBuckets(10)
        loss_fn = RectifiedFlowLoss("rf/lognorm(0.00,1.00)", weighting=weighting)
        loss, log = loss_fn(model, x0, noise=noise, t=t, buckets=buckets)
        tb = t.view(-1, 1, 1, 1)
        z = (1 - tb) * x0 + tb * noise
        pred = model(z, t * 1000)
        per = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
        w = {"none": torch.ones(4), "sigma_sqrt": t**-2, "cosmap": 2 / (math.pi * (1 - 2 * t + 2 * t**2))}[weighting]
        torch.testing.assert_close(loss, (w * per).mean())
        torch.testing.assert_close(log["loss_unweighted"], per.mean())
        assert set(log) == {"loss", "loss_unweighted", "t_mean"}
        means = buckets.compute()  # the unweighted per-sample losses, binned by t
        assert set(means) == {"loss_t/0.10-0.20", "loss_t/0.40-0.50", "loss_t/0.60-0.70", "loss_t/0.90-1.00"}
        assert means["loss_t/0.10-0.20"] == pytest.approx(per[0].item(), rel=1e-6)
        assert means["loss_t/0.90-1.00"] == pytest.approx(per[3].item(), rel=1e-6)
    torch.testing.assert_close(seen[0], t * 1000)  # SD3 convention: timestep = t * 1000
    seen.clear()
    RectifiedFlowLoss(timestep_scale=1.0)(model, x0, noise=noise, t=t)
    torch.testing.assert_close(seen[0], t)


def test_rf_loss_samples_shifted_density_and_uses_generator() -> None:
    x0 = torch.zeros(512, 2)
    seen: list = []

    def model(x, timestep):
        seen.append(timestep)
        return torch.zeros_like(x)

    loss_fn = RectifiedFlowLoss("lognorm(0,1)", shift=3.0)
    l1, log = loss_fn(model, x0, generator=torch.Generator().manual_seed(10))
    l2, _ = loss_fn(model, x0, generator=torch.Generator().manual_seed(10))
    assert l1 == l2 and not any(k.startswith("loss_t/") for k in log)
    t_expected = TimestepDensity.lognorm().sample(512, generator=torch.Generator().manual_seed(10), shift=3.0)
    torch.testing.assert_close(seen[0] / 1000, t_expected)
    # with x0 = 0 and a zero model the loss is E||eps||^2 = 1
    assert l1.item() == pytest.approx(1.0, abs=0.1)


def test_rf_weightings_equal_diffusers() -> None:
    training_utils = pytest.importorskip("diffusers.training_utils")
    sigmas = torch.tensor([0.05, 0.2, 0.5, 0.8, 0.999])
    for scheme in ("sigma_sqrt", "cosmap", "none"):
        ref = training_utils.compute_loss_weighting_for_sd3(scheme, sigmas=sigmas)
        torch.testing.assert_close(loss_weight(sigmas, scheme), ref)


def test_loss_buckets_accumulate_on_the_device_without_host_sync() -> None:
    """The objectives feed gencore.diffusion.LossBuckets (an index_add_ per step, no host read); the bin means come
    out only when asked (one read)."""
    buckets = LossBuckets(4)
    per, t = torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([0.05, 0.06, 0.5, 1.0])
    x0 = torch.zeros(4, 2)
    with no_host_sync():
        for _ in range(2):
            RectifiedFlowLoss()(lambda x, ts: x, x0, t=t, buckets=buckets)
            EpsilonLinearLoss()(lambda x, ts: x, x0, t=torch.tensor([0, 10, 500, 999]), buckets=buckets)
        with pytest.raises(HostSyncError):
            buckets.compute()
    means = buckets.compute()
    assert set(means) == {"loss_t/0.00-0.25", "loss_t/0.50-0.75", "loss_t/0.75-1.00"}
    buckets.reset()
    buckets.update(per, t)
    assert buckets.compute() == {"loss_t/0.00-0.25": 1.5, "loss_t/0.50-0.75": 3.0, "loss_t/0.75-1.00": 5.0}


# ---------------------------------------------------------------------------------------------------------------------
# eps / linear baseline
# ---------------------------------------------------------------------------------------------------------------------


def test_eps_linear_schedule_values() -> None:
    betas, ac = ldm_linear_schedule()
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(8.5e-4, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert ac[-1].item() == pytest.approx(0.004660, abs=5e-7)
    loss_fn = EpsilonLinearLoss()
    torch.testing.assert_close(loss_fn.alphas_cumprod, ac)
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(ac.float(), ref.alphas_cumprod)


def test_eps_linear_loss_equals_hand_computation() -> None:
    g = torch.Generator().manual_seed(13)
    x0, noise = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    seen: list = []
    model = _linear_model(seen)
    loss_fn = EpsilonLinearLoss()
    loss, log = loss_fn(model, x0, noise=noise, t=t)
    a = loss_fn.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    per = ((model(xt, t.float()) - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, per.mean())
    torch.testing.assert_close(seen[0], t.float())  # the integer timestep, as a float in [0, 1000)
    assert set(log) == {"loss", "loss_unweighted", "t_mean"}
    buckets = LossBuckets(10)
    loss_fn(model, x0, noise=noise, t=t, buckets=buckets)  # binned by t / T
    assert set(buckets.compute()) == {"loss_t/0.00-0.10", "loss_t/0.50-0.60", "loss_t/0.90-1.00"}
    # sampled t is uniform over {0..T-1}
    seen.clear()
    loss_fn(model, torch.zeros(4000, 3, 4, 4), generator=torch.Generator().manual_seed(14))
    ts = seen[0]
    assert ts.min() >= 0 and ts.max() <= 999 and torch.equal(ts, ts.round())
    assert ts.mean().item() == pytest.approx(499.5, abs=15)


def test_make_objective() -> None:
    rf = make_objective("rf/lognorm(0.00,1.00)", shift=3.0)
    assert isinstance(rf, RectifiedFlowLoss) and rf.density == TimestepDensity.lognorm() and rf.shift == 3.0
    assert make_objective("rf").density == TimestepDensity.uniform()
    assert make_objective("rf/mode(1.29)").density == TimestepDensity.mode(1.29)
    eps = make_objective("eps/linear", num_train_timesteps=500)
    assert isinstance(eps, EpsilonLinearLoss) and eps.num_train_timesteps == 500 and eps.alphas_cumprod.shape == (500,)
    assert rf.samplers == ("euler", "heun") and eps.samplers == ("ddim",)  # what a recipe may sample them with


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_inputs() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift"):
            shift_time(0.5, bad)
        with pytest.raises(ValueError, match="shift"):
            RectifiedFlowLoss(shift=bad)
    with pytest.raises(ValueError, match="shift"):
        unshift_time(0.5, 0.0)
    with pytest.raises(ValueError, match="m_pixels"):
        resolution_shift(0, 10)
    with pytest.raises(ValueError, match="n_pixels"):
        resolution_shift(10, -1)
    for s in (-1.01, MODE_S_MAX + 1e-3, 2.0):
        with pytest.raises(ValueError, match="mode density needs s"):
            TimestepDensity.mode(s)
    TimestepDensity.mode(-1.0), TimestepDensity.mode(MODE_S_MAX)  # the closed range is valid
    with pytest.raises(ValueError, match="lognorm needs a scale"):
        TimestepDensity.lognorm(0.0, 0.0)
    for spec in ("beta(1,1)", "rf/gauss", "lognorm(a,b)", "mode(1,2)", "cosmap(1)", ""):
        with pytest.raises(ValueError, match="density"):
            TimestepDensity.parse(spec)
    with pytest.raises(ValueError, match="unknown timestep density kind='foo'"):
        TimestepDensity("foo")
    with pytest.raises(ValueError, match="unknown loss weighting='snr'"):
        RectifiedFlowLoss(weighting="snr")
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weight(torch.ones(2), "min_snr")
    with pytest.raises(TypeError, match="p_uncond"):  # dropout is the conditioner's now
        RectifiedFlowLoss(p_uncond=0.1)
    with pytest.raises(TypeError, match="num_timesteps"):
        EpsilonLinearLoss(num_timesteps=1000)
    with pytest.raises(ValueError, match="timestep_scale"):
        RectifiedFlowLoss(timestep_scale=0.0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ldm_linear_schedule(0)
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("v/linear")
    with pytest.raises(ValueError, match="model output shape"):
        RectifiedFlowLoss()(lambda x, t: x[:, :1], torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"EpsilonLinearLoss: t: index 1000 is outside \[0, 1000\)"):
        EpsilonLinearLoss()(lambda x, t: x, torch.zeros(2, 3), t=torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="integer tensor"):
        EpsilonLinearLoss()(lambda x, t: x, torch.zeros(2, 3), t=torch.tensor([0.5, 1.0]))


def test_eps_t_check_does_not_sync() -> None:
    """Under the host-sync guard the range check of t is an asynchronous device assertion, not a host read."""
    loss_fn = EpsilonLinearLoss()
    with no_host_sync():
        loss, _ = loss_fn(lambda x, t: x, torch.zeros(2, 3), t=torch.tensor([0, 999]))
    assert torch.isfinite(loss)
