"""sd3_flow.sampling: the sigma grid vs diffusers 0.42.1, Euler / Heun / DDIM on Gaussian data with the exact
(analytic) velocity / eps fields over grids passed in, Euler vs FlowMatchEulerDiscreteScheduler, DDIM vs diffusers'
DDIMScheduler, gencore's classifier-free guidance as a sampler wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from gencore.diffusion import classifier_free_guidance, ddim_timesteps
from sd3_flow.losses import ldm_linear_schedule
from sd3_flow.sampling import ddim_eps_sample, euler_sample, flow_timesteps, heun_sample

MU = torch.tensor([1.5, -0.5, 0.0])  # data ~ N(MU, STD^2) per coordinate
STD = torch.tensor([0.5, 2.0, 1.0])


def gaussian_velocity(mu: torch.Tensor = MU, std: torch.Tensor = STD, timestep_scale: float = 1000.0):
    """Exact rectified-flow velocity E[eps - x0 | z_t] for x0 ~ N(mu, std^2), z_t = (1 - t) x0 + t eps.

    z_t ~ N((1 - t) mu, var_t), var_t = (1 - t)^2 std^2 + t^2; v = -mu + (t - (1 - t) std^2) / var_t (z - (1 - t) mu).
    Its ODE maps z_1 = eps to z_0 = mu + std eps exactly.
    """

    def velocity(x, timestep):
        t = (timestep.double() / timestep_scale).view(-1, *((1,) * (x.dim() - 1)))
        var = (1 - t) ** 2 * std.double() ** 2 + t**2
        v = -mu.double() + (t - (1 - t) * std.double() ** 2) / var * (x.double() - (1 - t) * mu.double())
        return v.to(x.dtype)

    return velocity


def affine_map(sampler, fn, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Samplers over an affine field are affine in x_T: run x_T = [0, 1] to get (offset B, gain A) per coordinate.

    For x_T ~ N(0, 1) the output is then exactly N(B, A^2).
    """
    x_T = torch.stack([torch.zeros(3), torch.ones(3)]).double()
    out = sampler(fn, x_T, **kw)
    return out[0], out[1] - out[0]


# ---------------------------------------------------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------------------------------------------------


def test_flow_timesteps_values() -> None:
    s = flow_timesteps(4, 3.0)
    assert s.shape == (5,) and s[0] == 1.0 and s[-1] == 0.0
    torch.testing.assert_close(
        s, torch.tensor([1.0, 0.85769, 0.60215, 0.0089286, 0.0], dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        flow_timesteps(4, 1.0), torch.tensor([1.0, 0.667, 0.334, 0.001, 0.0], dtype=torch.float64)
    )
    assert torch.all(s[1:] < s[:-1])
    assert flow_timesteps(1, 3.0).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("num_steps", [1, 4, 10, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_timesteps_equal_diffusers(num_steps: int, shift: float) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(num_steps)
    torch.testing.assert_close(flow_timesteps(num_steps, shift).float(), sched.sigmas, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Euler / Heun on Gaussian data
# ---------------------------------------------------------------------------------------------------------------------


def test_euler_reproduces_gaussian_mean_std() -> None:
    v = gaussian_velocity()
    errs = {}
    for n in (50, 100, 200):
        b, a = affine_map(euler_sample, v, sigmas=flow_timesteps(n, 3.0))
        torch.testing.assert_close(b, MU.double(), atol=1e-10, rtol=0)  # the mean path has constant velocity -mu
        errs[n] = (a - STD.double()).abs().max().item()
    # first-order convergence: the error halves with the step count; ~2.7 / n here
    assert errs[200] < 0.02 and errs[100] / errs[200] == pytest.approx(2.0, rel=0.1)
    # the same on sampled noise (B = 2048): moments within discretisation + Monte Carlo tolerance
    g = torch.Generator().manual_seed(0)
    x = euler_sample(v, torch.randn(2048, 3, generator=g), flow_timesteps(200, 3.0))
    assert (x.mean(0) - MU).abs().max().item() < 4 * STD.max().item() / math.sqrt(2048)
    assert (x.std(0) / STD - 1).abs().max().item() < 0.02 + 4 / math.sqrt(2 * 2048)


def test_euler_matches_diffusers_scheduler() -> None:
    diffusers = pytest.importorskip("diffusers")
    v = gaussian_velocity()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(8, 3, generator=g)
    for n in (4, 10, 28):
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(n)
        x = x_T.clone()
        for ts in sched.timesteps:
            x = sched.step(v(x, ts.expand(x.shape[0])), ts, x).prev_sample
        steps: list = []
        ours = euler_sample(v, x_T, flow_timesteps(n, 3.0), callback=steps.append)
        torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)
        assert len(steps) == n and steps[-1]["t_next"] == 0.0


def test_heun_beats_euler_at_equal_evaluations() -> None:
    v = gaussian_velocity()
    calls = {"n": 0}

    def counted(x, t):
        calls["n"] += 1
        return v(x, t)

    for n in (5, 10, 25):
        calls["n"] = 0
        _, a_heun = affine_map(heun_sample, counted, sigmas=flow_timesteps(n, 3.0))
        assert calls["n"] == 2 * n - 1  # the last step (to t = 0) is Euler
        _, a_euler = affine_map(euler_sample, v, sigmas=flow_timesteps(2 * n - 1, 3.0))
        err_heun = (a_heun - STD.double()).abs().max().item()
        err_euler = (a_euler - STD.double()).abs().max().item()
        assert err_heun < 0.6 * err_euler
    # second order: 25 Heun steps are already accurate
    assert err_heun < 0.01


def test_samplers_are_device_and_dtype_agnostic_and_pass_cond() -> None:
    seen: list = []

    def velocity(x, timestep, ctx):
        seen.append((timestep.dtype, timestep.device, timestep.shape))
        return torch.zeros_like(x) + ctx

    x_T = torch.zeros(2, 3, dtype=torch.float64)
    ctx = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    for sampler in (euler_sample, heun_sample):
        out = sampler(velocity, x_T, flow_timesteps(3), cond=ctx)  # x_0 = x_1 - integral of v = -ctx
        torch.testing.assert_close(out, -ctx.expand(2, 3))
    assert seen[0] == (torch.float64, x_T.device, (2,))
    out = euler_sample(lambda x, t, y=None: x * 0 + y, x_T, flow_timesteps(2), cond={"y": ctx})
    torch.testing.assert_close(out, -ctx.expand(2, 3))


def test_any_grid_can_be_passed_in() -> None:
    """The step grid is an argument (k-diffusion style): a list or tensor, stopping anywhere, any timestep scale."""
    x_T = torch.zeros(2, 3, dtype=torch.float64)
    seen: list = []

    def field(x, t):
        seen.append(t[0].item())
        return torch.ones_like(x)

    out = euler_sample(field, x_T, [1.0, 0.5], timestep_scale=1.0)  # stop half-way
    torch.testing.assert_close(out, torch.full_like(x_T, -0.5))
    assert seen == [1.0]
    seen.clear()
    out = heun_sample(field, x_T, torch.tensor([0.8, 0.4, 0.1]), timestep_scale=10.0)
    torch.testing.assert_close(out, torch.full_like(x_T, -0.7))  # constant field: Heun is exact
    assert seen == pytest.approx([8.0, 4.0, 4.0, 1.0])  # predictor at t, corrector at t'
    # the same grid twice gives the same path (pure functions)
    v = gaussian_velocity()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, generator=g)
    grid = flow_timesteps(6, 2.0)
    assert torch.equal(euler_sample(v, x, grid), euler_sample(v, x, grid.tolist()))


# ---------------------------------------------------------------------------------------------------------------------
# DDIM for the eps/linear baseline
# ---------------------------------------------------------------------------------------------------------------------


def gaussian_eps(ac: torch.Tensor, mu: torch.Tensor = MU, std: torch.Tensor = STD, timestep_scale: float = 1000.0):
    """Exact E[eps | x_t] for x0 ~ N(mu, std^2), x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    T = len(ac)

    def eps_fn(x, timestep):
        t = (timestep.double() * T / timestep_scale).round().long()
        a = ac[t].view(-1, *((1,) * (x.dim() - 1)))
        r = (x.double() - a.sqrt() * mu.double()) / (a * std.double() ** 2 + 1 - a)
        return ((1 - a).sqrt() * r).to(x.dtype)

    return eps_fn


def test_ddim_timesteps_ldm_spacing() -> None:
    """The grid the recipe passes (gencore.diffusion.ddim_timesteps, LDM's make_ddim_timesteps)."""
    assert ddim_timesteps(5) == [1, 201, 401, 601, 801]
    assert len(ddim_timesteps(10)) == 10 and ddim_timesteps(10)[-1] == 901
    assert len(ddim_timesteps(25)) == 25 and ddim_timesteps(25)[-1] == 961
    assert len(ddim_timesteps(7)) == 8  # ceil(1000 / 142), as officially


def test_ddim_baseline_on_gaussian_data() -> None:
    """Started at the exact marginal of its first timestep, deterministic DDIM with the exact eps lands on the
    t = 0 marginal N(sqrt(a0) mu, a0 std^2 + 1 - a0) (the LDM chain ends at alphas_cumprod[0], not 1)."""
    _, ac = ldm_linear_schedule()
    eps = gaussian_eps(ac)
    a0 = ac[0].item()
    target_mean, target_std = math.sqrt(a0) * MU.double(), (a0 * STD.double() ** 2 + 1 - a0).sqrt()
    errs = {}
    for n in (5, 10, 25, 50, 100):
        a_T = ac[ddim_timesteps(n)[-1]].item()
        m_T, s_T = math.sqrt(a_T) * MU.double(), (a_T * STD.double() ** 2 + 1 - a_T).sqrt()
        x_T = torch.stack([m_T, m_T + s_T])  # z = 0 and z = 1 of the marginal
        out = ddim_eps_sample(eps, x_T, ac, ddim_timesteps(n))
        b, a = out[0], (out[1] - out[0])
        errs[n] = max((b - target_mean).abs().max().item(), (a - target_std).abs().max().item())
    # DDIM is first order even here (for std = 1 it contracts x by cos(theta - theta') per step): ~2 / n
    assert errs[100] < 0.025 and errs[25] < 0.1
    assert errs[100] < errs[50] < errs[25] < errs[10] < errs[5]
    assert errs[50] / errs[100] == pytest.approx(2.0, rel=0.1)
    # the model receives the integer timestep (scale 1000 / T = 1)
    seen: list = []
    steps: list = []
    zero = lambda x, t: seen.append(t) or torch.zeros_like(x)
    ddim_eps_sample(zero, torch.zeros(2, 3), ac, ddim_timesteps(5), callback=steps.append)
    assert [int(t[0]) for t in seen] == [801, 601, 401, 201, 1]
    assert [s["t_next"] for s in steps] == [601, 401, 201, 1, 0] and set(steps[0]) >= {"x", "x0", "out"}
    # any ascending grid, e.g. a hand-picked one; the timestep scale maps t to what the network expects
    seen.clear()
    ddim_eps_sample(zero, torch.zeros(2, 3), ac, [0, 500, 999], timestep_scale=1.0)
    assert [round(float(t[0]) * 1000) for t in seen] == [999, 500, 0]


def test_ddim_matches_diffusers_ddim() -> None:
    diffusers = pytest.importorskip("diffusers")
    _, ac = ldm_linear_schedule()
    eps = gaussian_eps(ac)
    sched = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    sched.set_timesteps(10)
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x_T.clone()
    for ts in sched.timesteps:
        x = sched.step(eps(x, ts.expand(4).double()), ts, x, eta=0.0).prev_sample
    torch.testing.assert_close(ddim_eps_sample(eps, x_T, ac, ddim_timesteps(10)), x, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# classifier-free guidance (gencore's wrapper around the sampled function)
# ---------------------------------------------------------------------------------------------------------------------


def _cond_model(calls: list):
    def fn(x, t, ctx, pooled=None):
        calls.append(x.shape[0])
        out = x * 0.5 + ctx.mean(dim=1, keepdim=True) + t.view(-1, 1) / 1000
        return out if pooled is None else out + pooled

    return fn


def test_guided_sampling_equals_the_guidance_formula_at_every_step() -> None:
    g = torch.Generator().manual_seed(3)
    x, ctx, pooled = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g), torch.randn(4, 1, generator=g)
    calls: list = []
    fn = _cond_model(calls)
    guided = classifier_free_guidance(fn, 3.0, {"ctx": torch.zeros(1, 5)})  # pooled is shared by both halves
    steps: list = []
    out = euler_sample(guided, x, flow_timesteps(3), cond={"ctx": ctx, "pooled": pooled}, callback=steps.append)
    assert calls == [8, 8, 8]  # one doubled batch per step
    z = x
    for step in steps:  # the same Euler path with out_u + 3 (out_c - out_u) written out
        t = torch.full((4,), step["t"] * 1000)
        c, u = fn(z, t, ctx, pooled), fn(z, t, torch.zeros(4, 5), pooled)
        z = z + (step["t_next"] - step["t"]) * (u + 3.0 * (c - u))
        torch.testing.assert_close(step["x"], z)
    torch.testing.assert_close(out, z)


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_inputs() -> None:
    v = gaussian_velocity()
    for n in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            flow_timesteps(n)
    with pytest.raises(ValueError, match="shift"):
        flow_timesteps(4, 0.0)
    with pytest.raises(ValueError, match="shift"):
        flow_timesteps(4, -2.0)
    for sampler in (euler_sample, heun_sample):
        for bad in ([0.0, 1.0], [1.0], [1.0, 1.0, 0.0], torch.tensor([0.5, 0.7])):
            with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
                sampler(v, torch.zeros(1, 3), bad)
        with pytest.raises(ValueError, match="sigmas must be a descending grid"):
            sampler(v, torch.zeros(1, 3), 4)  # a step count where the grid belongs
    _, ac = ldm_linear_schedule()
    with pytest.raises(ValueError, match="num_steps=3"):
        ddim_timesteps(3)  # the +1 offset reaches t = 1000
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match="timesteps must be ascending"):
        ddim_eps_sample(lambda x, t: x, torch.zeros(1, 3), ac, [801, 1])
    with pytest.raises(ValueError, match="timesteps must be ascending"):
        ddim_eps_sample(lambda x, t: x, torch.zeros(1, 3), ac, [1, 1000])
