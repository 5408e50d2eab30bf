"""ldm.diffusion and ldm.losses.DiffusionLoss: schedules (official values, diffusers parity), forward process,
conversions, the loss and its per-timestep buckets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from gencore.diffusion import LossBuckets
from ldm.diffusion import DiffusionSchedule, make_beta_schedule
from ldm.losses import DiffusionLoss

SD = dict(linear_start=0.00085, linear_end=0.012)


@pytest.fixture(scope="module")
def sched() -> DiffusionSchedule:
    return DiffusionSchedule("linear", 1000, **SD)


# --- schedules ------------------------------------------------------------------------------------------------------
def test_linear_schedule_sd_values_float64():
    betas = make_beta_schedule("linear", 1000, **SD)
    assert betas.dtype == torch.float64
    ref = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(betas.numpy(), ref, rtol=1e-14, atol=0)
    assert betas[0].item() == pytest.approx(8.5e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.012, abs=1e-15)
    assert torch.cumprod(1 - betas, 0)[999].item() == pytest.approx(0.004660, abs=5e-7)


def test_linear_schedule_matches_diffusers_scaled_linear(sched):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # diffusers builds the betas in float32, we in float64 (as the official code): agreement to float32 precision
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sched.betas, ref.betas.float(), rtol=1e-5, atol=1e-8)


def test_cosine_schedule_matches_diffusers_squaredcos():
    betas = make_beta_schedule("cosine", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").betas.double()
    torch.testing.assert_close(betas, ref, rtol=1e-5, atol=1e-6)
    assert float(betas.max()) <= 0.999 and float(betas.min()) >= 0


def test_sqrt_linear_and_sqrt_schedules():
    lin = torch.linspace(1e-4, 2e-2, 10, dtype=torch.float64)
    torch.testing.assert_close(make_beta_schedule("sqrt_linear", 10), lin)  # linear in beta (official naming)
    torch.testing.assert_close(make_beta_schedule("sqrt", 10), lin.sqrt())


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="quadratic"):
        make_beta_schedule("quadratic")
    with pytest.raises(ValueError, match="n_timestep=0"):
        make_beta_schedule("linear", 0)


def test_schedule_buffers_official_names_and_values(sched):
    assert list(sched.state_dict()) == list(DiffusionSchedule.BUFFERS)
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for v in sched.state_dict().values())
    b = make_beta_schedule("linear", 1000, **SD)
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    assert sched.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])
    post_var = b * (1 - ac_prev) / (1 - ac)
    torch.testing.assert_close(sched.posterior_variance, post_var.float())
    assert sched.posterior_variance[0].item() == 0.0
    assert sched.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(1e-20))
    torch.testing.assert_close(sched.posterior_mean_coef1, (b * ac_prev.sqrt() / (1 - ac)).float())
    torch.testing.assert_close(sched.posterior_mean_coef2, ((1 - ac_prev) * (1 - b).sqrt() / (1 - ac)).float())
    torch.testing.assert_close(sched.sqrt_recipm1_alphas_cumprod, (1 / ac - 1).sqrt().float())


def test_given_betas_and_v_posterior():
    betas = np.linspace(1e-3, 2e-2, 50)
    s = DiffusionSchedule(given_betas=betas, v_posterior=1.0)
    assert s.num_timesteps == 50
    torch.testing.assert_close(s.posterior_variance, torch.as_tensor(betas, dtype=torch.float32))
    with pytest.raises(ValueError, match="given_betas"):
        DiffusionSchedule(given_betas=[0.5, 1.5])


def test_q_sample_statistics(sched):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000,), 2.0)
    t = torch.tensor(500)
    xt = sched.q_sample(x0, t, generator=g)
    a = sched.alphas_cumprod[500].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 2.0, abs=0.02)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.02)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    expect = (
        sched.sqrt_alphas_cumprod[t].view(3, 1, 1, 1) * x0
        + sched.sqrt_one_minus_alphas_cumprod[t].view(3, 1, 1, 1) * noise
    )
    torch.testing.assert_close(sched.q_sample(x0, t, noise), expect)
    with pytest.raises(ValueError, match="t.shape"):
        sched.q_sample(x0, torch.tensor([1, 2]), noise)


def test_eps_x0_v_conversions_are_inverses(sched):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([1, 250, 600, 999])
    xt = sched.q_sample(x0, t, noise)
    torch.testing.assert_close(sched.predict_x0_from_eps(xt, t, noise), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sched.predict_eps_from_x0(xt, t, x0), noise, atol=1e-4, rtol=1e-4)
    v = sched.get_v(x0, noise, t)
    torch.testing.assert_close(sched.predict_x0_from_v(xt, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sched.predict_eps_from_v(xt, t, v), noise, atol=1e-5, rtol=1e-5)
    for p, out in (("eps", noise), ("x0", x0), ("v", v)):
        got_x0, got_eps = sched.model_output_to_x0_eps(xt, t, out, p)
        torch.testing.assert_close(got_x0, x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_eps, noise, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="'mu'"):
        sched.model_output_to_x0_eps(xt, t, v, "mu")


def test_q_posterior_matches_ddpm_eq7(sched):
    g = torch.Generator().manual_seed(2)
    x0, xt = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    t = torch.tensor([10, 700])
    mean, var, logvar = sched.q_posterior(x0, xt, t)
    ac = sched.alphas_cumprod.double()[t].view(2, 1)
    acp = sched.alphas_cumprod_prev.double()[t].view(2, 1)
    beta = sched.betas.double()[t].view(2, 1)
    expect = (acp.sqrt() * beta / (1 - ac)) * x0 + ((1 - beta).sqrt() * (1 - acp) / (1 - ac)) * xt
    torch.testing.assert_close(mean, expect.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(var.view(2), (beta * (1 - acp) / (1 - ac)).view(2).float())
    torch.testing.assert_close(logvar, var.log())


# --- the loss -------------------------------------------------------------------------------------------------------
def _model(x, t, c=None):
    out = 0.5 * x + t.view(-1, 1, 1, 1).float() / 1000
    return out if c is None else out + c.view(-1, 1, 1, 1)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_loss_equals_hand_computation(sched, parameterization):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([5, 500, 990])
    loss, log = DiffusionLoss(sched, parameterization=parameterization, l_simple_weight=2.0)(
        _model, x0, noise=noise, t=t
    )
    a = sched.alphas_cumprod[t].view(3, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[parameterization]
    per_sample = ((_model(xt, t) - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, 2.0 * per_sample.mean())
    torch.testing.assert_close(log["loss_simple"], per_sample.mean())
    w = sched.lvlb_weights(parameterization)
    torch.testing.assert_close(log["loss_vlb"], (w[t] * per_sample).mean())  # logged, weight 0 in the loss
    assert not log["loss"].requires_grad


def test_loss_l1_and_elbo_term(sched):
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 1, 3, 3, generator=g), torch.randn(2, 1, 3, 3, generator=g)
    t = torch.tensor([0, 300])
    fn = DiffusionLoss(sched, original_elbo_weight=0.25)
    loss, log = fn(_model, x0, noise=noise, t=t)
    xt = sched.q_sample(x0, t, noise)
    per = ((_model(xt, t) - noise) ** 2).mean(dim=(1, 2, 3))
    w = sched.lvlb_weights("eps")
    assert w[0] == w[1] and torch.isfinite(w).all()
    beta, ac = sched.betas.double(), sched.alphas_cumprod.double()
    w300 = beta[300] ** 2 / (2 * sched.posterior_variance.double()[300] * (1 - beta[300]) * (1 - ac[300]))
    assert w[300].item() == pytest.approx(w300.item(), rel=1e-5)
    torch.testing.assert_close(log["loss_vlb"], (w[t] * per).mean())
    torch.testing.assert_close(loss, per.mean() + 0.25 * (w[t] * per).mean())
    l1, _ = DiffusionLoss(sched, loss_type="l1")(_model, x0, noise=noise, t=t)
    torch.testing.assert_close(l1, (_model(xt, t) - noise).abs().mean())


def test_loss_samples_t_uniformly_and_fills_the_timestep_buckets(sched):
    fn = DiffusionLoss(sched)
    t = fn.sample_t(20000, "cpu", torch.Generator().manual_seed(5))
    assert t.dtype == torch.long and t.min().item() == 0 and t.max().item() == 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=8)
    x0 = torch.randn(4, 1, 2, 2)
    ts = torch.tensor([0, 99, 150, 999])
    buckets = LossBuckets(10, prefix="loss_simple_t", num_train_timesteps=1000)
    _, log = fn(_model, x0, t=ts, noise=torch.zeros_like(x0), buckets=buckets)
    assert set(log) == {"loss", "loss_simple", "loss_vlb"}  # the bins are the buckets' business
    means = buckets.compute()
    assert sorted(means) == ["loss_simple_t/000-099", "loss_simple_t/100-199", "loss_simple_t/900-999"]
    xt = sched.q_sample(x0, ts, torch.zeros_like(x0))
    per = (_model(xt, ts) ** 2).mean(dim=(1, 2, 3))
    assert means["loss_simple_t/000-099"] == pytest.approx(per[:2].mean().item(), rel=1e-6)
    assert means["loss_simple_t/900-999"] == pytest.approx(per[3].item(), rel=1e-6)
    # every t lands in bin t * n // T (the bins the names state), for T and n that do not divide each other too
    for big_t, n in ((1000, 10), (999, 7), (50, 4)):
        small = DiffusionSchedule("linear", big_t)
        b = LossBuckets(n, num_train_timesteps=big_t)
        all_t = torch.arange(big_t)
        DiffusionLoss(small)(_model, torch.zeros(big_t, 1, 1, 1), t=all_t, buckets=b)
        assert torch.equal(b._counts, torch.bincount(all_t * n // big_t, minlength=n).float())
    loss, log = fn(_model, x0, generator=torch.Generator().manual_seed(0))  # random t and noise
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_loss_passes_condition_and_backprops(sched):
    w = torch.tensor(0.3, requires_grad=True)
    seen = {}

    def model(x, t, c):
        seen["c"] = c
        return w * x

    c = torch.arange(2.0)
    loss, _ = DiffusionLoss(sched)(model, torch.randn(2, 1, 2, 2), c)
    loss.backward()
    assert seen["c"] is c and w.grad is not None

    def dict_model(x, t, *, c_crossattn, y):
        seen.update(ctx=c_crossattn, y=y)
        return x

    DiffusionLoss(sched)(dict_model, torch.randn(2, 1, 2, 2), {"c_crossattn": torch.ones(2, 3, 4), "y": c})
    assert seen["ctx"].shape == (2, 3, 4) and seen["y"] is c


def test_loss_bad_inputs_raise(sched):
    x0 = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="'mu'"):
        DiffusionLoss(sched, parameterization="mu")
    with pytest.raises(ValueError, match="'l3'"):
        DiffusionLoss(sched, loss_type="l3")
    with pytest.raises(ValueError, match=r"t: index 1000 is outside \[0, 1000\)"):
        DiffusionLoss(sched)(_model, x0, t=torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match=r"t: index -1 is outside"):
        DiffusionLoss(sched)(_model, x0, t=torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        DiffusionLoss(sched)(_model, x0, t=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise shape"):
        DiffusionLoss(sched)(_model, x0, noise=torch.zeros(2, 1, 2, 3))
