"""ldm.sampling: DDIM / PLMS / DDPM against closed forms, diffusers schedulers and an analytic Gaussian denoiser, over
the official step grid (gencore.diffusion.ddim_timesteps) and gencore's classifier-free-guidance wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

from gencore.diffusion import classifier_free_guidance, ddim_timesteps
from ldm.diffusion import DiffusionSchedule
from ldm.sampling import ddim_sample, ddpm_sample, plms_sample

MU, STD = 1.5, 0.5  # data distribution N(MU, STD^2) per element


@pytest.fixture(scope="module")
def sched() -> DiffusionSchedule:
    return DiffusionSchedule("linear", 1000, linear_start=0.00085, linear_end=0.012)


def gaussian_denoiser(sched: DiffusionSchedule, parameterization: str = "eps", mu: float = MU, std: float = STD):
    """The exact (Bayes-optimal) eps / x0 / v predictor for data ~ N(mu, std^2); x_t ~ N(sqrt(a) mu, a std^2 + 1-a)."""
    ac = sched.alphas_cumprod.double()

    def denoise(x, t):
        a = ac[t].view(-1, *((1,) * (x.dim() - 1)))
        r = (x.double() - a.sqrt() * mu) / (a * std**2 + 1 - a)
        eps = (1 - a).sqrt() * r
        x0 = mu + a.sqrt() * std**2 * r
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[parameterization]
        return out.to(x.dtype)

    return denoise


def marginal(sched: DiffusionSchedule, t: int, n: int, seed: int = 0) -> torch.Tensor:
    """n samples of x_t for the Gaussian data, shaped (n // 16, 1, 4, 4)."""
    a = sched.alphas_cumprod[t].double().item()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n // 16, 1, 4, 4, generator=g)
    return math.sqrt(a) * MU + math.sqrt(a * STD**2 + 1 - a) * z


def ddim_chain_std(sched: DiffusionSchedule, num_steps: int, eta: float = 0.0) -> float:
    """Exact std of the DDIM chain's output for the Gaussian data and its exact denoiser, started at the marginal.

    With the optimal predictor every update is affine: x_prev - sqrt(a_prev) mu = k (x - sqrt(a) mu) + sigma z, with
    k = (sqrt(a_prev a) std^2 + sqrt((1 - a_prev - sigma^2)(1 - a))) / (a std^2 + 1 - a).
    """
    ac = sched.alphas_cumprod.double().tolist()
    ts = ddim_timesteps(num_steps, len(ac))[::-1]
    s2 = STD**2
    var = ac[ts[0]] * s2 + 1 - ac[ts[0]]
    for i, t in enumerate(ts):
        a, ap = ac[t], (ac[ts[i + 1]] if i + 1 < len(ts) else ac[0])
        sig2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
        k = (math.sqrt(ap * a) * s2 + math.sqrt((1 - ap - sig2) * (1 - a))) / (a * s2 + 1 - a)
        var = k * k * var + sig2
    return math.sqrt(var)


def ddpm_chain_std(sched: DiffusionSchedule) -> float:
    """Exact std of the ancestral chain's output (Gaussian data, exact x0-predictor, posterior variance)."""
    ac = sched.alphas_cumprod.double().tolist()
    c1, c2 = sched.posterior_mean_coef1.double().tolist(), sched.posterior_mean_coef2.double().tolist()
    pv = sched.posterior_variance.double().tolist()
    s2 = STD**2
    var = ac[-1] * s2 + 1 - ac[-1]
    for t in reversed(range(len(ac))):
        k = c1[t] * math.sqrt(ac[t]) * s2 / (ac[t] * s2 + 1 - ac[t]) + c2[t]
        var = k * k * var + (pv[t] if t > 0 else 0.0)
    return math.sqrt(var)


def assert_final_stats(sched: DiffusionSchedule, x: torch.Tensor, chain_std: float | None, limit_rel: float = 0.05):
    """Mean exact; std equal to the discrete chain's exact value (if given) and near the continuous limit."""
    a0 = sched.alphas_cumprod[0].item()  # samplers stop at noise level abar_0 (official)
    assert x.mean().item() == pytest.approx(math.sqrt(a0) * MU, abs=0.012)
    if chain_std is not None:
        assert x.std().item() == pytest.approx(chain_std, rel=0.015)
    assert x.std().item() == pytest.approx(math.sqrt(a0 * STD**2 + 1 - a0), rel=limit_rel)


def nonlinear_denoiser(sched: DiffusionSchedule):
    base = gaussian_denoiser(sched)
    return lambda x, t: base(x, t) + 0.1 * torch.tanh(x)


# --- timesteps ------------------------------------------------------------------------------------------------------
def test_ddim_timesteps_official_spacing():
    assert ddim_timesteps(5) == [1, 201, 401, 601, 801]
    assert ddim_timesteps(50) == list(range(1, 1000, 20))
    assert ddim_timesteps(250)[-1] == 997 and len(ddim_timesteps(250)) == 250
    assert ddim_timesteps(7) == [1, 143, 285, 427, 569, 711, 853, 995]  # official: T // S stride, 8 steps for S = 7
    quad = ((np.linspace(0, np.sqrt(800), 10)) ** 2).astype(int) + 1
    assert ddim_timesteps(10, method="quad") == quad.tolist()
    assert ddim_timesteps(10, 100) == list(range(1, 100, 10))


def test_ddim_timesteps_errors():
    with pytest.raises(ValueError, match=r"num_steps=1001 exceeds .* 1000"):
        ddim_timesteps(1001, 1000)
    with pytest.raises(ValueError, match="t=1000"):  # stride 1 + offset 1 leaves the schedule (official IndexError)
        ddim_timesteps(600)
    with pytest.raises(ValueError, match="t=1000"):  # stride 333 divides 999
        ddim_timesteps(3)
    with pytest.raises(ValueError, match="'cubic'"):
        ddim_timesteps(10, method="cubic")
    with pytest.raises(ValueError, match="num_steps=0"):
        ddim_timesteps(0)


# --- DDIM -----------------------------------------------------------------------------------------------------------
def test_samplers_step_through_any_given_grid(sched):
    """k-diffusion style: the grid is an argument; DDIM visits it from the top, PLMS too (its first step looks ahead
    to the next timestep), and a one-step grid goes from t straight to abar_0."""
    grid = [3, 250, 610, 977]
    seen, calls = [], []
    den = nonlinear_denoiser(sched)

    def recorded(x, t):
        calls.append(int(t[0]))
        return den(x, t)

    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(12))
    ddim_sample(recorded, x, sched, grid, callback=seen.append)
    assert [s["t"] for s in seen] == grid[::-1] and calls == grid[::-1]
    calls.clear()
    plms_sample(recorded, x, sched, torch.tensor(grid))  # any iterable of ints
    assert calls == [977, 610, 610, 250, 3]
    a, a0 = sched.alphas_cumprod.double()[500], sched.alphas_cumprod.double()[0]
    one = ddim_sample(lambda x, t: torch.zeros_like(x), x, sched, [500])
    torch.testing.assert_close(one.double(), (a0 / a).sqrt() * x.double())


def test_ddim_last_alpha_prev_is_alphas_cumprod_0(sched):
    x = torch.randn(2, 1, 3, 3)
    out = ddim_sample(lambda x, t: torch.zeros_like(x), x, sched, [1])  # one step at t = 1, eps = 0
    ac = sched.alphas_cumprod.double()
    torch.testing.assert_close(out, (ac[0] / ac[1]).sqrt().float() * x)  # a_prev = abar_0, not 1


def test_ddim_eta0_step_equals_closed_form(sched):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    den = nonlinear_denoiser(sched)
    steps = []
    ddim_sample(den, x, sched, ddim_timesteps(5), callback=steps.append)
    assert [s["t"] for s in steps] == [801, 601, 401, 201, 1] and steps[0]["i"] == 0
    a, ap = sched.alphas_cumprod[801].double(), sched.alphas_cumprod[601].double()
    eps = den(x, torch.full((2,), 801)).double()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(steps[0]["pred_x0"].double(), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps[0]["x"].double(), ap.sqrt() * x0 + (1 - ap).sqrt() * eps, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("eta", "parameterization"), [(0.0, "eps"), (1.0, "eps"), (0.5, "v"), (0.0, "x0")])
def test_ddim_matches_diffusers_ddim_scheduler(sched, eta, parameterization):
    base = gaussian_denoiser(sched, parameterization)

    def den(x, t):
        return base(x, t) + 0.1 * torch.tanh(x)

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = ddim_sample(
        den,
        x,
        sched,
        ddim_timesteps(20),
        eta=eta,
        parameterization=parameterization,
        generator=torch.Generator().manual_seed(1),
    )
    prediction_type = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}[parameterization]
    ref = DDIMScheduler(
        trained_betas=sched.betas.double().numpy(),
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        clip_sample=False,
        prediction_type=prediction_type,
    )
    ref.set_timesteps(20)
    assert ref.timesteps.tolist() == ddim_timesteps(20)[::-1]
    y, g = x, torch.Generator().manual_seed(1)
    for t in ref.timesteps:
        y = ref.step(den(y, t.expand(2)), t, y, eta=eta, generator=g).prev_sample
    torch.testing.assert_close(ours, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_ddim_gaussian_data_statistics(sched, parameterization):
    x_T = marginal(sched, 981, 32000)
    x = ddim_sample(
        gaussian_denoiser(sched, parameterization), x_T, sched, ddim_timesteps(50), parameterization=parameterization
    )
    assert_final_stats(sched, x, ddim_chain_std(sched, 50))  # 0.4775: 4.5% under the limit 0.5006 at 50 steps


def test_ddim_eta1_gaussian_statistics_and_intermediates(sched):
    x_T = marginal(sched, 981, 32000)
    x, inter = ddim_sample(
        gaussian_denoiser(sched),
        x_T,
        sched,
        ddim_timesteps(50),
        eta=1.0,
        generator=torch.Generator().manual_seed(3),
        return_intermediates=True,
    )
    assert_final_stats(sched, x, ddim_chain_std(sched, 50, eta=1.0), limit_rel=0.1)
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 51 and inter["x_inter"][0] is x_T
    assert inter["x_inter"][-1] is x


def test_ddim_quantize_x0_is_applied_to_pred_x0(sched):
    seen = []
    ddim_sample(
        gaussian_denoiser(sched),
        torch.randn(1, 1, 4, 4),
        sched,
        ddim_timesteps(4),
        quantize_x0=torch.round,
        callback=seen.append,
    )
    assert all(torch.equal(s["pred_x0"], s["pred_x0"].round()) for s in seen)


# --- masked (inpainting) sampling -----------------------------------------------------------------------------------
def test_masked_ddim_keeps_known_region(sched):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(8, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0  # left half known
    x_T = torch.randn(8, 4, 8, 8, generator=g)
    inputs = []

    def zero_eps(x, t):
        inputs.append((x.clone(), int(t[0])))
        return torch.zeros_like(x)

    out = ddim_sample(
        zero_eps, x_T, sched, ddim_timesteps(10), x0=x0, mask=mask, generator=torch.Generator().manual_seed(5)
    )
    known = mask.expand_as(x0).bool()
    # before every step the known region is q_sample(x0, t): (x - sqrt(a) x0) / sqrt(1 - a) ~ N(0, 1)
    for x_in, t in inputs:
        a = sched.alphas_cumprod[t].item()
        z = (x_in[known] - math.sqrt(a) * x0[known]) / math.sqrt(1 - a)
        assert abs(z.mean().item()) < 0.15 and z.std().item() == pytest.approx(1.0, abs=0.1)  # 1024 values
    # the final x carries x0 at the last noise level (sqrt(abar_0 (1 - abar_1) / abar_1) ~ 0.04 here)
    assert (out[known] - x0[known]).abs().mean().item() < 0.05
    # the unknown region evolves as without a mask (this denoiser is element-wise)
    free = ddim_sample(lambda x, t: torch.zeros_like(x), x_T, sched, ddim_timesteps(10))
    torch.testing.assert_close(out[~known], free[~known])


def test_masked_plms_and_ddpm_keep_known_region(sched):
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 1, 6, 6, generator=g)
    mask = (torch.rand(1, 1, 6, 6, generator=g) > 0.5).float()
    known = mask.expand_as(x0).bool()
    den = gaussian_denoiser(sched)
    out = plms_sample(
        den, torch.randn(2, 1, 6, 6, generator=g), sched, ddim_timesteps(20), x0=x0, mask=mask, generator=g
    )
    assert (out[known] - x0[known]).abs().mean().item() < 0.1
    out = ddpm_sample(den, torch.randn(2, 1, 6, 6, generator=g), sched, x0=x0, mask=mask, generator=g)
    assert (out[known] - x0[known]).abs().max().item() < 0.15  # q_sample(x0, 0): noise std sqrt(1 - abar_0) = 0.03


# --- PLMS -----------------------------------------------------------------------------------------------------------
def test_plms_first_step_two_evaluations_then_adams_bashforth(sched):
    g = torch.Generator().manual_seed(7)
    es = [torch.randn(1, 1, 2, 2, generator=g) for _ in range(6)]
    calls = []

    def den(x, t):  # returns e_k on the k-th call, independent of x
        calls.append((x.clone(), int(t[0])))
        return es[len(calls) - 1]

    x_T = torch.randn(1, 1, 2, 2, generator=g)
    out = plms_sample(den, x_T, sched, ddim_timesteps(5))  # timesteps 801, 601, 401, 201, 1
    ts = ddim_timesteps(5)[::-1]
    assert len(calls) == 6  # S + 1 evaluations
    assert [t for _, t in calls] == [ts[0], ts[1], *ts[1:]]
    ac = sched.alphas_cumprod.double()

    def step(x, e, i):
        a = ac[ts[i]]
        ap = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
        return ap.sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt() + (1 - ap).sqrt() * e

    e = [v.double() for v in es]
    x = x_T.double()
    torch.testing.assert_close(calls[1][0].double(), step(x, e[0], 0), atol=1e-6, rtol=1e-6)  # x~ from eps(x, t)
    x = step(x, (e[0] + e[1]) / 2, 0)  # pseudo improved Euler
    x = step(x, (3 * e[2] - e[0]) / 2, 1)  # AB2 over the eps(x, t) history: e0 (not e1) is the previous one
    x = step(x, (23 * e[3] - 16 * e[2] + 5 * e[0]) / 12, 2)
    x = step(x, (55 * e[4] - 59 * e[3] + 37 * e[2] - 9 * e[0]) / 24, 3)
    x = step(x, (55 * e[5] - 59 * e[4] + 37 * e[3] - 9 * e[2]) / 24, 4)  # the history slides
    torch.testing.assert_close(out.double(), x, atol=1e-5, rtol=1e-5)


def test_plms_matches_diffusers_pndm(sched):
    den = nonlinear_denoiser(sched)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    ours = plms_sample(den, x, sched, ddim_timesteps(20))
    ref = PNDMScheduler(
        trained_betas=sched.betas.double().numpy(),
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        skip_prk_steps=True,
    )
    ref.set_timesteps(20)
    y = x
    for t in ref.timesteps:  # 21 evaluations, the second timestep repeated
        y = ref.step(den(y, t.expand(2)), t, y).prev_sample
    torch.testing.assert_close(ours, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_plms_gaussian_data_statistics(sched, parameterization):
    x = plms_sample(
        gaussian_denoiser(sched, parameterization),
        marginal(sched, 981, 32000),
        sched,
        ddim_timesteps(50),
        parameterization=parameterization,
    )
    assert_final_stats(sched, x, None, limit_rel=0.02)  # 4th order: closer to the limit than DDIM at 50 steps


def test_plms_rejects_eta(sched):
    with pytest.raises(ValueError, match="eta=0.5"):
        plms_sample(gaussian_denoiser(sched), torch.zeros(1, 1, 2, 2), sched, ddim_timesteps(10), eta=0.5)


# --- DDPM ancestral -------------------------------------------------------------------------------------------------
def test_ddpm_gaussian_data_statistics(sched):
    x = ddpm_sample(
        gaussian_denoiser(sched, "x0"),
        marginal(sched, 999, 16000),
        sched,
        parameterization="x0",
        generator=torch.Generator().manual_seed(9),
    )
    assert_final_stats(sched, x, ddpm_chain_std(sched))


def test_ddpm_matches_diffusers_ddpm_scheduler(sched):
    den = nonlinear_denoiser(sched)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    ours = ddpm_sample(den, x, sched, generator=torch.Generator().manual_seed(11))
    ref = DDPMScheduler(trained_betas=sched.betas.double().numpy(), clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(1000)
    y, g = x, torch.Generator().manual_seed(11)
    for t in ref.timesteps:
        y = ref.step(den(y, t.expand(2)), t, y, generator=g).prev_sample
    torch.testing.assert_close(ours, y, atol=1e-4, rtol=1e-4)  # 1000 float32 steps, coefficients computed differently


def test_ddpm_clip_denoised(sched):
    small = DiffusionSchedule("linear", 20, linear_start=1e-3, linear_end=0.2)
    x_T = torch.randn(1, 1, 2, 2)

    def const(x, t):  # an x0-prediction far outside [-1, 1]
        return torch.full_like(x, 5.0)

    # the last step has posterior_mean_coef1 = 1, coef2 = 0, no noise: x_0 = x0^
    torch.testing.assert_close(ddpm_sample(const, x_T, small, parameterization="x0"), torch.full_like(x_T, 5.0))
    torch.testing.assert_close(
        ddpm_sample(const, x_T, small, parameterization="x0", clip_denoised=True), torch.ones_like(x_T)
    )


# --- classifier-free guidance ---------------------------------------------------------------------------------------
def _cond_denoiser(calls):
    def den(x, t, c=None, **kw):
        calls.append((x.shape[0], c, kw))
        ctx = c if c is not None else kw["c_crossattn"]
        out = 0.1 * x + ctx.mean(dim=tuple(range(1, ctx.dim()))).view(-1, 1, 1, 1)
        if "c_concat" in kw:
            out = out + kw["c_concat"]
        return out

    return den


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    calls = []
    den = _cond_denoiser(calls)
    x, t = torch.randn(3, 1, 2, 2), torch.tensor([5, 5, 5])
    c, u = torch.randn(3, 4, 8), torch.zeros(1, 4, 8)
    assert torch.equal(classifier_free_guidance(den, 1.0, u)(x, t, c), den(x, t, c))
    assert calls[0][0] == 3  # no doubled batch at scale 1
    calls.clear()
    torch.testing.assert_close(classifier_free_guidance(den, 0.0, u)(x, t, c), den(x, t, u.expand(3, 4, 8)))
    assert calls[0][0] == 3  # scale 0: one call with the unconditional condition only
    torch.testing.assert_close(calls[0][1], u.expand(3, 4, 8))
    e_u, e_c = den(x, t, u.expand(3, 4, 8)), den(x, t, c)
    calls.clear()
    torch.testing.assert_close(classifier_free_guidance(den, 7.5, u)(x, t, c), e_u + 7.5 * (e_c - e_u))
    assert calls[0][0] == 6  # one call on [uncond, cond]
    torch.testing.assert_close(calls[0][1][:3], u.expand(3, 4, 8))
    torch.testing.assert_close(calls[0][1][3:], c)


def test_cfg_dict_conditions_share_unlisted_keys():
    calls = []
    den = _cond_denoiser(calls)
    x, t = torch.randn(2, 1, 2, 2), torch.tensor([3, 3])
    cond = {"c_crossattn": torch.randn(2, 4, 8), "c_concat": torch.randn(2, 1, 2, 2)}
    guided = classifier_free_guidance(den, 3.0, {"c_crossattn": torch.zeros(4, 8)})
    out = guided(x, t, **cond)
    kw = calls[-1][2]
    assert kw["c_crossattn"].shape == (4, 4, 8) and torch.equal(kw["c_concat"], torch.cat([cond["c_concat"]] * 2))
    e_u = den(x, t, c_crossattn=torch.zeros(2, 4, 8), c_concat=cond["c_concat"])
    e_c = den(x, t, **cond)
    torch.testing.assert_close(out, e_u + 3.0 * (e_c - e_u))


def test_cfg_inside_ddim_with_class_labels(sched):
    base = gaussian_denoiser(sched)
    seen = []

    def den(x, t, y):
        seen.append(y.clone())
        return base(x, t) + 0.01 * (y == 1000).float().view(-1, 1, 1, 1)

    y = torch.tensor([3, 7])
    x = torch.randn(2, 1, 2, 2)
    out = ddim_sample(classifier_free_guidance(den, 3.0, torch.tensor(1000)), x, sched, ddim_timesteps(5), cond=y)
    assert seen[0].tolist() == [1000, 1000, 3, 7] and out.shape == x.shape


def test_cfg_errors():
    den = _cond_denoiser([])
    x, t = torch.randn(2, 1, 2, 2), torch.tensor([1, 1])
    with pytest.raises(ValueError, match=r"scale=7.5.*uncond=None"):
        classifier_free_guidance(den, 7.5)
    assert classifier_free_guidance(den, 1.0)(x, t, torch.ones(2, 3)).shape == x.shape  # scale 1 needs no uncond
    with pytest.raises(ValueError, match="'c_crossattn'"):
        classifier_free_guidance(den, 2.0, {"c_crossattn": torch.zeros(3)})(x, t, c=torch.ones(2, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        classifier_free_guidance(den, 2.0, torch.zeros(5))(x, t, torch.ones(2, 3))


# --- argument checks ------------------------------------------------------------------------------------------------
def test_sampler_bad_inputs_raise(sched):
    den, x = gaussian_denoiser(sched), torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="'mu'"):
        ddim_sample(den, x, sched, ddim_timesteps(5), parameterization="mu")
    with pytest.raises(ValueError, match="'mu'"):
        ddpm_sample(den, x, sched, parameterization="mu")
    with pytest.raises(ValueError, match="timesteps must be an ascending list"):
        ddim_sample(den, x, sched, 5)  # the older (num_steps) call: the grid is an argument now
    with pytest.raises(ValueError, match="timesteps must be an ascending list"):
        plms_sample(den, x, sched, 5)
    with pytest.raises(ValueError, match=r"ascending integers in \[0, 999\]"):
        ddim_sample(den, x, sched, [801, 401, 1])
    with pytest.raises(ValueError, match=r"ascending integers in \[0, 999\]"):
        plms_sample(den, x, sched, [1, 1000])
    with pytest.raises(ValueError, match="x0=False, mask=True"):
        ddim_sample(den, x, sched, ddim_timesteps(5), mask=torch.ones_like(x))
    with pytest.raises(ValueError, match="eta=-1"):
        ddim_sample(den, x, sched, ddim_timesteps(5), eta=-1)
    with pytest.raises(ValueError, match="eta=3"):
        ddim_sample(den, x, sched, ddim_timesteps(5), eta=3)
    with pytest.raises(ValueError, match="DiffusionSchedule"):
        ddpm_sample(den, x, sched.alphas_cumprod)
    # a bare alphas_cumprod tensor is enough for DDIM / PLMS
    torch.testing.assert_close(
        ddim_sample(den, x, sched.alphas_cumprod, ddim_timesteps(5)), ddim_sample(den, x, sched, ddim_timesteps(5))
    )
