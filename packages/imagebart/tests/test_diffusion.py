"""The multinomial forward process: schedules, corruption statistics, the exact posterior against brute-force Bayes over
explicit transition matrices, and the stage loss (CE / KL mixing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imagebart.diffusion import MultinomialSchedule, posterior, prior_log_probs, stage_loss


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ schedules
def test_geometric_schedule_of_four_steps():
    s = MultinomialSchedule(4)
    torch.testing.assert_close(s.betas, torch.tensor([0.0, 1 / 4, 1 / 3, 1 / 2, 1.0]))
    torch.testing.assert_close(s.alphas, torch.tensor([1.0, 3 / 4, 2 / 3, 1 / 2, 0.0]))
    torch.testing.assert_close(s.alphacum, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert s.final_noise
    # geometric for any T: alphacum falls linearly to 0
    torch.testing.assert_close(MultinomialSchedule(5, "geometric").alphacum, torch.linspace(1, 0, 6))


@pytest.mark.parametrize("acum", [[0.9, 0.6, 0.2], [0.75, 0.5, 0.0], [0.5, 0.0, 0.0]])
def test_alphacum_string_and_list_round_trip(acum):
    from_string = MultinomialSchedule(3, "alphacum:" + ",".join(str(a) for a in acum))
    from_list = MultinomialSchedule(3, alphacum=acum)
    for s in (from_string, from_list):
        torch.testing.assert_close(s.alphacum, torch.tensor([1.0, *acum]))
        assert s.betas[0] == 0 and bool(((s.betas >= 0) & (s.betas <= 1)).all())
        assert s.final_noise == (acum[-1] == 0.0)
    torch.testing.assert_close(from_string.betas, from_list.betas)


def test_constant_and_explicit_beta_schedules():
    s = MultinomialSchedule(3, 0.5)
    torch.testing.assert_close(s.alphacum, torch.tensor([1.0, 0.5, 0.25, 0.125]))
    assert not s.final_noise
    s = MultinomialSchedule(3, [0.25, 0.5, 1.0])
    torch.testing.assert_close(s.betas, torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(s.alphacum, torch.tensor([1.0, 0.75, 0.375, 0.0]))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((4, "cosine"), {}, "unknown redraw_prob 'cosine'"),
        ((4, "ffhq_bernoulli_PSIM"), {}, "pass their alphacum values"),
        ((3, "alphacum:0.5,0"), {}, "lists 2 alphacum values, need T=3"),
        ((3,), {"alphacum": [0.5, 0.2, 0.1, 0.0]}, "lists 4 alphacum values, need T=3"),
        ((3, "alphacum:0.5,0.7,0"), {}, "must decrease from 1"),
        ((2, "alphacum:1.5,0"), {}, "must decrease from 1"),
        ((2, "alphacum:a,b"), {}, "must be numbers"),
        ((3, 0.0), {}, r"constant redraw_prob must be in \(0, 1\]"),
        ((3, 1.5), {}, r"constant redraw_prob must be in \(0, 1\]"),
        ((3, [0.5, 1.0]), {}, "betas must be T=3 values"),
        ((3, [0.5, 1.0, 2.0]), {}, "betas must be T=3 values"),
        ((0,), {}, "num_steps must be an integer >= 1"),
        ((2, 0.5), {"alphacum": [0.5, 0.0]}, "not both"),
    ],
)
def test_bad_schedules_are_refused(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultinomialSchedule(*args, **kwargs)


def test_steps_out_of_range_are_refused():
    s = MultinomialSchedule(4)
    x0 = torch.zeros(1, 8, dtype=torch.long)
    for t in (0, 5, 1.5):
        with pytest.raises(ValueError, match=r"step t must be an integer in \[1, T=4\]"):
            s.q_pair(x0, t, 8)
    with pytest.raises(ValueError, match="step t"):
        s.q_sample(x0, 5, 8)


# ------------------------------------------------------------------------------------------------ forward process
def test_q_sample_at_T_is_uniform_whatever_x0():
    s, k, n = MultinomialSchedule(4), 8, 40_000
    zeros = torch.zeros(1, n, dtype=torch.long)
    other = torch.randint(0, k, (1, n), generator=_gen(1))
    a, b = s.q_sample(zeros, 4, k, _gen(0)), s.q_sample(other, 4, k, _gen(0))
    assert torch.equal(a, b)  # x_T does not depend on x_0 at all (every token redrawn)
    counts = torch.bincount(a.flatten(), minlength=k).double()
    chi2 = float(((counts - n / k) ** 2 / (n / k)).sum())
    assert chi2 < 30.0, counts  # df = 7: P(chi2 > 30) ~ 1e-4 for a uniform draw
    # while x_{T-1} still remembers x_0 (a quarter of the tokens kept, plus chance)
    kept = (s.q_sample(zeros, 3, k, _gen(2)) == 0).double().mean()
    assert abs(float(kept) - (0.25 + 0.75 / k)) < 0.01


def test_q_sample_at_zero_is_the_data():
    s = MultinomialSchedule(4)
    x0 = torch.randint(0, 8, (2, 16), generator=_gen(0))
    assert torch.equal(s.q_sample(x0, 0, 8, _gen(1)), x0)


def test_changed_fraction_of_one_redraw_step_is_beta_times_one_minus_one_over_k():
    s, k, n = MultinomialSchedule(4), 5, 100_000
    x0 = torch.randint(0, k, (1, n), generator=_gen(0))
    chain = s.q_chain(x0, k, _gen(1))
    assert len(chain) == 5 and chain[0] is x0
    for t in range(1, 5):
        beta = float(s.betas[t])
        changed = float((chain[t] != chain[t - 1]).double().mean())
        # a redraw may pick the same token: the changed share is beta (1 - 1/K), not beta
        assert abs(changed - beta * (1 - 1 / k)) < 0.01, (t, changed, beta)
        # and x_t keeps x_0 with probability alphacum_t + (1 - alphacum_t) / K
        acum = float(s.alphacum[t])
        assert abs(float((chain[t] == x0).double().mean()) - (acum + (1 - acum) / k)) < 0.01


def test_q_pair_marginals():
    s, k, n = MultinomialSchedule(4), 6, 100_000
    x0 = torch.randint(0, k, (1, n), generator=_gen(0))
    for t in range(1, 5):
        prev, xt = s.q_pair(x0, t, k, _gen(t))
        a_prev, a_t, alpha = float(s.alphacum[t - 1]), float(s.alphacum[t]), float(s.alphas[t])
        if t == 1:
            assert torch.equal(prev, x0)
        assert abs(float((prev == x0).double().mean()) - (a_prev + (1 - a_prev) / k)) < 0.01
        assert abs(float((xt == x0).double().mean()) - (a_t + (1 - a_t) / k)) < 0.01
        assert abs(float((xt == prev).double().mean()) - (alpha + (1 - alpha) / k)) < 0.01


# ------------------------------------------------------------------------------------------------------ posterior
def _transition(beta: float, k: int) -> torch.Tensor:
    """Q[i, j] = q(x_t = j | x_{t-1} = i) = (1 - beta) delta_ij + beta / K."""
    return (1 - beta) * torch.eye(k, dtype=torch.float64) + beta / k


def _brute_force_posterior(s: MultinomialSchedule, t: int, k: int) -> torch.Tensor:
    """(K, K, K): [x0, xt, x_{t-1}] = q(x_{t-1} | x_0) q(x_t | x_{t-1}) normalised, from the betas alone."""
    qbar = torch.eye(k, dtype=torch.float64)
    for s_ in range(1, t):
        qbar = qbar @ _transition(float(s.betas[s_]), k)
    qt = _transition(float(s.betas[t]), k)
    joint = qbar[:, None, :] * qt.T[None, :, :]  # [a, b, j] = qbar[a, j] * qt[j, b]
    return joint / joint.sum(-1, keepdim=True)


SCHEDULES = {
    "geometric": lambda: MultinomialSchedule(4),
    "alphacum": lambda: MultinomialSchedule(4, alphacum=[0.9, 0.6, 0.2, 0.0]),
    "constant": lambda: MultinomialSchedule(4, 0.3),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_posterior_is_bayes_over_the_transition_matrices(name):
    s, k = SCHEDULES[name](), 4
    x0 = torch.arange(k).repeat_interleave(k)[None]  # every (x0, xt) pair
    xt = torch.arange(k).repeat(k)[None]
    for t in range(1, s.num_steps + 1):
        q = posterior(x0, xt, t, s, k)
        assert q.shape == (1, k * k, k)
        torch.testing.assert_close(q.sum(-1), torch.ones(1, k * k))
        expected = _brute_force_posterior(s, t, k).reshape(1, k * k, k)
        torch.testing.assert_close(q.double(), expected, atol=1e-6, rtol=1e-5)
        # the official assertion: the normaliser is q(x_t | x_0) = (alphacum_t onehot(x0) + (1 - alphacum_t)/K)[x_t]
        a_prev, alpha, a_t = float(s.alphacum[t - 1]), float(s.alphas[t]), float(s.alphacum[t])
        unnorm = (a_prev * F.one_hot(x0, k) + (1 - a_prev) / k) * (alpha * F.one_hot(xt, k) + (1 - alpha) / k)
        z = a_t * (x0 == xt).float() + (1 - a_t) / k
        torch.testing.assert_close(unnorm.sum(-1), z)


def test_posterior_at_t_one_is_the_clean_token():
    s, k = MultinomialSchedule(4), 6
    x0 = torch.randint(0, k, (2, 10), generator=_gen(0))
    xt = torch.randint(0, k, (2, 10), generator=_gen(1))
    torch.testing.assert_close(posterior(x0, xt, 1, s, k), F.one_hot(x0, k).float())


def test_posterior_validates_its_inputs():
    s, k = MultinomialSchedule(4), 6
    x = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="x0 must be a long tensor"):
        posterior(x.float(), x, 1, s, k)
    with pytest.raises(ValueError, match="xt must be a long tensor"):
        posterior(x, x[0], 1, s, k)
    with pytest.raises(ValueError, match="must have the same shape"):
        posterior(x, x[:, :3], 1, s, k)
    with pytest.raises(ValueError, match="num_codes=6"):
        posterior(x, x + 6, 1, s, k)
    with pytest.raises(ValueError, match="step t"):
        posterior(x, x, 5, s, k)


def test_prior_log_probs():
    k = 5
    xt = torch.randint(0, k, (2, 7), generator=_gen(0))
    for alpha in (0.0, 0.25, 1.0):
        lp = prior_log_probs(xt, alpha, k)
        torch.testing.assert_close(lp.exp(), alpha * F.one_hot(xt, k) + (1 - alpha) / k)
    per_item = prior_log_probs(xt, torch.tensor([0.2, 0.8]), k)
    torch.testing.assert_close(per_item[1], prior_log_probs(xt[1:], 0.8, k)[0])
    torch.testing.assert_close(per_item.logsumexp(-1), torch.zeros(2, 7), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------- stage loss
@pytest.fixture
def loss_inputs():
    s, k = MultinomialSchedule(4), 7
    x0 = torch.randint(0, k, (3, 10), generator=_gen(0))
    prev, xt = s.q_pair(x0, 2, k, _gen(1))
    q = posterior(x0, xt, 2, s, k)
    logits = torch.randn(3, 10, k, generator=_gen(2)) * 2
    return logits, prev, q


def _kl(q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return (q * (q.log() - logits.log_softmax(-1))).sum(-1).mean()


def test_stage_loss_alpha_zero_is_cross_entropy(loss_inputs):
    logits, target, q = loss_inputs
    loss, parts = stage_loss(logits, target, q, 0.0)
    ce = F.cross_entropy(logits.transpose(1, 2), target)
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(parts["loss_hard"], ce)
    torch.testing.assert_close(parts["loss_soft"], _kl(q, logits))


def test_stage_loss_alpha_one_is_the_kl_to_the_posterior(loss_inputs):
    logits, target, q = loss_inputs
    assert bool((q > 0).all())  # t = 2: the posterior has full support
    loss, _ = stage_loss(logits, target, q, 1.0)
    torch.testing.assert_close(loss, _kl(q, logits))
    assert float(loss) > 0.1


def test_stage_loss_mixture_is_convex(loss_inputs):
    logits, target, q = loss_inputs
    ce, kl = F.cross_entropy(logits.transpose(1, 2), target), _kl(q, logits)
    for alpha in (0.3, 0.5, 0.9):
        loss, _ = stage_loss(logits, target, q, alpha)
        torch.testing.assert_close(loss, alpha * kl + (1 - alpha) * ce)


def test_kl_vanishes_at_the_log_posterior(loss_inputs):
    logits, target, q = loss_inputs
    shift = torch.randn(3, 10, 1, generator=_gen(3))  # logits are defined up to a per-position constant
    loss, _ = stage_loss(q.log() + shift, target, q, 1.0)
    assert abs(float(loss)) < 1e-6
    worse, _ = stage_loss(q.log() + 0.1 * logits, target, q, 1.0)
    assert float(worse) > 1e-4


def test_kl_with_a_one_hot_posterior_is_finite():
    # t = 1: the posterior is onehot(x0); the KL is then the CE on x0 (0 log 0 = 0, no NaN)
    k = 5
    target = torch.randint(0, k, (2, 6), generator=_gen(0))
    q = F.one_hot(target, k).float()
    logits = torch.randn(2, 6, k, generator=_gen(1))
    loss, _ = stage_loss(logits, target, q, 1.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits.transpose(1, 2), target))
    # a stage with beta_t = 0 (x_{t-1} = x_t): the residual network's logits are -inf off x_t, where q vanishes too
    logits = torch.log(q).requires_grad_()
    exact, _ = stage_loss(logits, target, q, 1.0)
    assert torch.isfinite(exact) and abs(exact.item()) < 1e-6
    exact.backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_stage_loss_refuses_bad_shapes_and_alpha(loss_inputs):
    logits, target, q = loss_inputs
    with pytest.raises(ValueError, match="must agree"):
        stage_loss(logits, target[:, :-1], q, 0.5)
    with pytest.raises(ValueError, match="must agree"):
        stage_loss(logits, target, q[..., :-1], 0.5)
    with pytest.raises(ValueError, match="must agree"):
        stage_loss(logits[0], target, q, 0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        stage_loss(logits, target, q, 1.5)
