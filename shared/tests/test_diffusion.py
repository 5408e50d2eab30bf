"""gencore.diffusion: the model-calling convention, classifier-free guidance, conditioning dropout, DDIM grids and
steps, and per-timestep loss buckets -- closed forms and the official values."""

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from gencore.diffusion import (
    LossBuckets,
    call_denoiser,
    check_probability,
    classifier_free_guidance,
    ddim_plan,
    ddim_step,
    ddim_timesteps,
    drop_condition,
    dropout_masks,
    x0_eps_from_output,
)
from gencore.testing import no_host_sync


class Counting:
    """A linear denoiser out = 2x + cond (+ extra) that counts its calls and their batch sizes."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, c=None, extra=None, **kw):
        self.batches.append(x.shape[0])
        c = kw.get("c", c)
        out = 2 * x + c.reshape(c.shape[0], *([1] * (x.dim() - 1)))
        return out + (0 if extra is None else extra.reshape(extra.shape[0], *([1] * (x.dim() - 1))))


def test_call_denoiser_conventions():
    x, t = torch.ones(2, 3), torch.zeros(2)
    assert torch.equal(call_denoiser(lambda x, t: x + 1, x, t), x + 1)
    assert torch.equal(
        call_denoiser(lambda x, t, c: x * c, x, t, torch.tensor([[2.0], [3.0]])), x * torch.tensor([[2.0], [3.0]])
    )
    assert torch.equal(call_denoiser(lambda x, t, a, b: x + a + b, x, t, {"a": 1.0, "b": 2.0}), x + 3)


def test_guidance_closed_form_one_doubled_call():
    fn = Counting()
    x, t = torch.randn(3, 4), torch.zeros(3)
    c, u = torch.tensor([1.0, 2.0, 3.0]), torch.tensor(-1.0)  # u broadcasts from (...)
    out = classifier_free_guidance(fn, 3.0, u)(x, t, c)
    # out_u + s (out_c - out_u) with out = 2x + cond: 2x + u + 3 (c - u)
    torch.testing.assert_close(out, 2 * x + (u + 3 * (c - u))[:, None])
    assert fn.batches == [6]  # one call on [uncond, cond]


def test_guidance_scale_one_and_zero_call_once():
    fn = Counting()
    x, t, c = torch.randn(2, 3), torch.zeros(2), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(classifier_free_guidance(fn, 1.0)(x, t, c), 2 * x + c[:, None])  # no uncond needed
    torch.testing.assert_close(classifier_free_guidance(fn, 0.0, torch.tensor(5.0))(x, t, c), 2 * x + 5.0)
    assert fn.batches == [2, 2]


def test_guidance_mapping_conditions_share_keys_absent_from_uncond():
    fn = Counting()
    x, t = torch.randn(2, 3), torch.zeros(2)
    cond = {"c": torch.tensor([1.0, 2.0]), "extra": torch.tensor([10.0, 20.0])}
    out = classifier_free_guidance(fn, 2.0, {"c": torch.zeros(1)})(x, t, **cond)
    # extra (e.g. c_concat) is in both halves; c is guided: 2x + extra + 0 + 2 (c - 0)
    torch.testing.assert_close(out, 2 * x + (cond["extra"] + 2 * cond["c"])[:, None])
    assert fn.batches == [4]


def test_guidance_errors():
    fn = Counting()
    x, t, c = torch.randn(2, 3), torch.zeros(2), torch.ones(2)
    with pytest.raises(ValueError, match="needs an unconditional"):
        classifier_free_guidance(fn, 2.0)
    for bad in (float("nan"), float("inf"), "3", True):
        with pytest.raises(ValueError, match="finite number"):
            classifier_free_guidance(fn, bad, torch.zeros(1))
    with pytest.raises(ValueError, match="not among the condition's keys"):
        classifier_free_guidance(fn, 2.0, {"y": torch.zeros(1)})(x, t, c=c)
    with pytest.raises(ValueError, match="mapping uncond"):
        classifier_free_guidance(fn, 2.0, torch.zeros(1))(x, t, c=c)
    with pytest.raises(ValueError, match="does not broadcast"):
        classifier_free_guidance(fn, 2.0, torch.zeros(3))(x, t, c)


def test_dropout_masks_and_probability_checks():
    g = torch.Generator().manual_seed(0)
    masks = dropout_masks(10_000, {"a": 0.25, "b": 0.0, "c": 1.0}, generator=g)
    assert set(masks) == {"a", "c"}  # nothing drawn for p = 0
    assert abs(masks["a"].float().mean().item() - 0.25) < 0.02 and masks["c"].all()
    assert dropout_masks(4, 0.0) == {}
    for bad in (-0.1, 1.5, "x", None):
        with pytest.raises(ValueError, match="probability"):
            check_probability(bad, "p_uncond")
    assert check_probability({"t5": 0.5}) == {"t5": 0.5}


def test_drop_condition_tensor_and_list():
    c, u = torch.arange(6.0).reshape(3, 2), torch.full((1, 2), -1.0)
    out, masks = drop_condition(c, u, 1.0)
    assert torch.equal(out, torch.full((3, 2), -1.0)) and masks["cond"].all()
    out, masks = drop_condition(c, u, 0.0)
    assert torch.equal(out, c) and masks == {}
    g = torch.Generator().manual_seed(1)
    out, masks = drop_condition([c, c + 10], [u, u], 0.5, generator=g)
    dropped = masks["cond"]
    for part, ref in zip(out, (c, c + 10)):
        assert torch.equal(part[dropped], torch.full_like(part[dropped], -1.0))
        assert torch.equal(part[~dropped], ref[~dropped])


def test_drop_condition_mapping_groups():
    b = 2000
    cond = {"a": torch.ones(b, 3), "b": torch.ones(b), "keep": torch.ones(b, 5)}
    uncond = {"a": torch.zeros(3), "b": torch.zeros(1)}
    out, masks = drop_condition(cond, uncond, 0.5, generator=torch.Generator().manual_seed(0))
    assert list(masks) == ["a+b"]  # one mask for every uncond key together
    assert torch.equal(out["a"][:, 0] == 0, out["b"] == 0) and torch.equal(out["keep"], cond["keep"])
    out, masks = drop_condition(cond, uncond, {"a": 0.5, "b": 0.5}, generator=torch.Generator().manual_seed(0))
    assert set(masks) == {"a", "b"} and not torch.equal(masks["a"], masks["b"])  # independent
    out, masks = drop_condition(cond, uncond, {("a", "b"): 0.3}, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["a"][:, 0] == 0, out["b"] == 0) and abs(masks["a+b"].float().mean() - 0.3) < 0.05
    with pytest.raises(ValueError, match="no unconditional value"):
        drop_condition(cond, uncond, {"keep": 0.5})
    with pytest.raises(ValueError, match="needs the unconditional"):
        drop_condition(cond, None, 0.5)


def test_ddim_timesteps_official_values_and_errors():
    assert ddim_timesteps(5, 1000) == [1, 201, 401, 601, 801]
    assert len(ddim_timesteps(7, 1000)) == 8 and ddim_timesteps(7, 1000)[1] == 143  # stride 142, ceil(1000/142)
    assert ddim_timesteps(50, 1000)[:3] == [1, 21, 41]
    assert ddim_timesteps(10, 1000, "quad") == [1, 10, 40, 89, 159, 247, 356, 484, 633, 801]
    with pytest.raises(ValueError, match="outside"):
        ddim_timesteps(3, 1000)  # stride 333 divides 999: t = 1000
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(0)
    with pytest.raises(ValueError, match="exceeds"):
        ddim_timesteps(11, 10)
    with pytest.raises(ValueError, match="method"):
        ddim_timesteps(5, method="cubic")


def test_ddim_plan_and_step_closed_forms():
    ac = torch.linspace(0.99, 0.01, 100, dtype=torch.float64)
    plan = ddim_plan(ac, [0, 50, 99], eta=0.0)
    assert [p[0] for p in plan] == [99, 50, 0]
    assert plan[-1][2] == pytest.approx(float(ac[0]))  # the last a_prev is abar_0, not 1
    assert all(sigma == 0 for *_, sigma in plan)
    _, a, ap, sigma = ddim_plan(ac, [10, 60], eta=1.0)[0]
    assert sigma == pytest.approx(math.sqrt((1 - ap) / (1 - a) * (1 - a / ap)))
    # with the true eps, DDIM recovers x0 and moves it to the previous noise level exactly
    x0, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    x_prev, x0_hat = ddim_step(x, eps, a, ap, 0.0)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(x_prev, math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps)
    for param, out in (("eps", eps), ("x0", x0), ("v", math.sqrt(a) * eps - math.sqrt(1 - a) * x0)):
        got_x0, got_eps = x0_eps_from_output(out, x, a, param)
        torch.testing.assert_close(got_x0, x0)
        torch.testing.assert_close(got_eps, eps)
    with pytest.raises(ValueError, match="ascending"):
        ddim_plan(ac, [50, 10])
    with pytest.raises(ValueError, match="eta"):
        ddim_plan(ac, [10], eta=-1)


def test_loss_buckets_means_names_and_no_sync():
    b = LossBuckets(4)
    with no_host_sync():  # the per-step update never waits for the device
        b.update(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0.1, 0.2, 0.9]))
        b.update(torch.tensor([5.0]), torch.tensor([1.0]))  # t = 1 falls in the last bin
    assert b.compute() == {"loss_t/0.00-0.25": 2.0, "loss_t/0.75-1.00": 7.5}
    ints = LossBuckets(10, prefix="loss_simple_t", num_train_timesteps=1000)
    assert ints.names()[0] == "loss_simple_t/000-099" and ints.names()[-1] == "loss_simple_t/900-999"
    ints.update(torch.tensor([2.0, 4.0]), torch.tensor([150, 199]) / 1000)
    assert ints.compute() == {"loss_simple_t/100-199": 3.0}
    ints.reset()
    assert ints.compute() == {}
    with pytest.raises(ValueError, match="n_buckets"):
        LossBuckets(-1)


class BucketedRegression(L.LightningModule):
    """Per-sample squared errors at random t, logged through LossBuckets as a diffusion recipe does."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 1)
        self.buckets = {"train": LossBuckets(4), "val": LossBuckets(4)}

    def _step(self, batch, split):
        x, t = batch
        per_sample = (self.net(x).squeeze(1) - t).square()
        self.buckets[split].update(per_sample, t)
        return per_sample.mean()

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.buckets["train"].log(self, "train")

    def on_validation_epoch_end(self):
        self.buckets["val"].log(self, "val", force=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_loss_buckets_reach_the_loggers_on_logging_steps(tmp_path):
    t = torch.rand(64)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(t[:, None], t), batch_size=8)
    trainer = L.Trainer(
        max_steps=8,
        log_every_n_steps=4,
        logger=CSVLogger(tmp_path, name="", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=2,
        val_check_interval=8,
    )
    trainer.fit(BucketedRegression(), data, data)
    rows = list(csv.DictReader(open(tmp_path / "version_0" / "metrics.csv")))
    logged = [r for r in rows if any(r.get(f"train/loss_t/{n}") for n in ("0.00-0.25", "0.25-0.50"))]
    assert [int(r["step"]) for r in logged] == [3, 7]  # Lightning's logging steps, nothing in between
    assert any(r.get("val/loss_t/0.75-1.00") for r in rows)  # the validation epoch's bins, once
