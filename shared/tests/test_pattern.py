"""The shared pattern's core pieces: conditioners, the latent normaliser (also across two gloo processes), legacy
state-dict keys, the two-optimizer GAN step, the host-sync guard, and the sweep value of an entry point."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from gencore import io, run
from gencore.conditioning import Conditioner, NoConditioner, requested_captions, requested_labels, take
from gencore.latents import LatentNormalizer
from gencore.modules import check_index_range
from gencore.testing import HostSyncError, no_host_sync
from gencore.training import (
    GANModule,
    LambdaWarmUpCosineScheduler,
    adaptive_weight,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
)

# ----------------------------------------------------------------------------------------------- conditioners


class OffsetConditioner(Conditioner):
    """A toy: labels -> {"y": label + 1}; unconditional 0."""

    def encode(self, batch, n=None):
        return {"y": take(batch, "label", n, "OffsetConditioner") + 1}

    def unconditional(self, n):
        return {"y": torch.zeros(n, dtype=torch.long)}


def test_conditioner_encodes_drops_and_refuses_unknown_requests():
    c = OffsetConditioner()
    batch = {"label": torch.arange(1, 9)}
    assert torch.equal(c(batch)["y"], torch.arange(2, 10))
    assert torch.equal(c(batch, 3)["y"], torch.tensor([2, 3, 4]))
    assert torch.equal(c(batch, drop=1.0)["y"], torch.zeros(8, dtype=torch.long))
    mixed = c(batch, drop=0.5, generator=torch.Generator().manual_seed(0))["y"]
    assert ((mixed == 0) | (mixed == batch["label"] + 1)).all() and 0 < (mixed == 0).sum() < 8
    assert c.guidable and not NoConditioner().guidable
    with pytest.raises(ValueError, match=r"needs batch\['label'\]"):
        c({"image": torch.zeros(2)})
    with pytest.raises(ValueError, match="does not take labels"):
        c.generation_batch(2, labels=[1, 2])
    assert NoConditioner()({"image": torch.zeros(2)}) is None
    with pytest.raises(ValueError, match="no unconditional"):

        class Plain(Conditioner):
            def encode(self, batch, n=None):
                return batch["label"]

        Plain()({"label": torch.ones(2)}, drop=0.5)


def test_request_helpers():
    assert requested_labels(3, [1, 2, 3], 10).tolist() == [1, 2, 3]
    drawn = requested_labels(500, None, 10, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (500,) and set(drawn.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="need 4 labels"):
        requested_labels(4, [1, 2], 10)
    with pytest.raises(ValueError, match="outside"):
        requested_labels(2, [1, 10], 10)
    caps, labels = requested_captions(2, labels=[7, 8])
    assert caps == ["a photo of a sneaker", "a photo of a bag"] and labels.tolist() == [7, 8]
    assert requested_captions(1, ["a cat"]) == (["a cat"], None)
    with pytest.raises(ValueError, match="single string"):
        requested_captions(1, "a cat")


# -------------------------------------------------------------------------------------------- latent normaliser


def test_normaliser_fixed_estimated_and_round_trip():
    fixed = LatentNormalizer(scale=2.0, shift=0.5)
    z = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(fixed.normalize(z), (z - 0.5) * 2)
    torch.testing.assert_close(fixed.denormalize(fixed.normalize(z)), z)
    est = LatentNormalizer(scale=None, shift=None)
    with pytest.raises(RuntimeError, match="not set"):
        est.eval().normalize(z)
    z = torch.randn(64, 4, 8, 8) * 3 + 1.5
    with no_host_sync():  # estimating needs no host sync either
        y = est.train().normalize(z)
    assert abs(y.mean().item()) < 1e-5 and abs(y.std().item() - 1) < 1e-3  # zero mean, unit variance (LDM: 1/std)
    assert est.scale.item() == pytest.approx(1 / z.std().item(), rel=1e-3)
    # saved with the weights; a model built to estimate takes the numbers from the state dict
    again = LatentNormalizer(scale=None, shift=None)
    again.load_state_dict(est.state_dict())
    torch.testing.assert_close(again.eval().normalize(z), y)
    only_scale = LatentNormalizer(scale=None, shift=0.0).train()
    only_scale.normalize(z)
    assert only_scale.shift.item() == 0.0 and only_scale.scale.item() == pytest.approx(1 / z.std().item(), rel=1e-3)
    for bad in ({"scale": 0.0}, {"scale": float("inf")}, {"shift": float("nan")}):
        with pytest.raises(ValueError, match="latent"):
            LatentNormalizer(**bad)


_DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from gencore.latents import LatentNormalizer
dist.init_process_group("gloo")
rank = dist.get_rank()
z = torch.load(sys.argv[1])[rank]
norm = LatentNormalizer(scale=None, shift=None).train()
norm.normalize(z)
torch.save(torch.stack([norm.shift, norm.scale]), sys.argv[2] + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, script: str, *args: str) -> None:
    path = tmp_path / "script.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={_free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(path), *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_normaliser_averages_over_two_processes(tmp_path):
    halves = torch.stack([torch.randn(16, 4, 8, 8), torch.randn(16, 4, 8, 8) * 2 + 3])  # very different per rank
    torch.save(halves, tmp_path / "z.pt")
    _torchrun(tmp_path, _DDP_SCRIPT, str(tmp_path / "z.pt"), str(tmp_path))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)  # both replicas agree
    whole = halves.flatten()
    torch.testing.assert_close(r0, torch.stack([whole.mean(), 1 / whole.std()]), rtol=1e-4, atol=1e-5)


def test_legacy_keys_load_through_torch_and_gencore():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 2)
            self.latent_norm = LatentNormalizer(scale=None, shift=0.0)
            renames = {"scale_factor": "latent_norm.scale", "old_net.": "net."}
            io.accept_legacy_keys(self, renames, defaults={"latent_norm.shift": 0.0})

    # the old layout: other names, and no shift (it was a constant)
    old = {"old_net.weight": torch.eye(2), "old_net.bias": torch.ones(2), "scale_factor": torch.tensor(0.25)}
    for load in (lambda m, s: m.load_state_dict(s), lambda m, s: io.load_state_dict(m, s)):
        m = Model()
        load(m, dict(old))
        assert torch.equal(m.net.weight, torch.eye(2)) and m.latent_norm.scale.item() == 0.25
        assert m.latent_norm.ready and m.latent_norm.shift.item() == 0.0
    current = {k: v for k, v in Model().state_dict().items() if k != "latent_norm.shift"}
    with pytest.raises(io.CheckpointKeyError, match=r"missing key\(s\): latent_norm.shift"):
        io.load_state_dict(Model(), current)  # defaults fill old layouts only; a current one lacking a key is an error
    assert io.rename_legacy_keys({"a": "b"}, {"a": 1, "b": 2}) == {"a": 1, "b": 2}  # the new name wins


# ------------------------------------------------------------------------------------------------- GAN pieces


def test_gan_loss_pieces_closed_forms():
    assert adopt_weight(1.0, 4, threshold=5) == 0.0 and adopt_weight(1.0, 5, threshold=5) == 1.0
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    sp = torch.nn.functional.softplus
    assert vanilla_d_loss(real, fake).item() == pytest.approx(0.5 * (sp(-real).mean() + sp(fake).mean()).item())
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    rec, g = 3.0 * (w * x).sum(), -0.5 * (w * x).sum()  # gradients 3x and -0.5x: lambda = 6
    assert adaptive_weight(rec, g, w).item() == pytest.approx(6.0, rel=1e-3)
    assert adaptive_weight(rec, 1e-9 * (w * x).sum(), w, max_weight=100.0).item() == 100.0


class ToyGAN(GANModule):
    """A 1-D GAN: G(z) = a z + b learns N(3, 0.5^2) against a logistic discriminator; D starts after 2 batches."""

    generator_loss_name = "train/g_loss"

    def __init__(self, disc_start=2):
        super().__init__(learning_rate=0.05, betas=(0.5, 0.9))
        self.g = nn.Linear(1, 1)
        self.d = nn.Sequential(nn.Linear(1, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.disc_start, self.d_steps_seen = disc_start, []

    def generator_step(self, batch, step):
        fake = self.g(torch.randn(batch["x"].shape[0], 1))
        loss = torch.nn.functional.softplus(-self.d(fake)).mean() if step >= self.disc_start else fake.mean() * 0
        return loss, {"train/fake_mean": fake.detach().mean()}, fake

    def discriminator_step(self, batch, fake, step):
        self.d_steps_seen.append(step)
        if step < self.disc_start:
            return None, {}
        return vanilla_d_loss(self.d(batch["x"]), self.d(fake.detach())), {}

    def generator_parameters(self):
        return self.g.parameters()

    def discriminator_parameters(self):
        return self.d.parameters()


def test_gan_module_runs_both_players_in_order():
    data = torch.utils.data.DataLoader(
        [{"x": torch.tensor([3.0 + 0.5 * v])} for v in torch.randn(2048).tolist()], batch_size=64
    )
    model = ToyGAN()
    d_before = [p.detach().clone() for p in model.d.parameters()]
    trainer = L.Trainer(max_steps=2 * 64, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    assert trainer.global_step == 128 and model.d_steps_seen == list(range(64))  # two optimizer steps per batch
    assert any(not torch.equal(a, b) for a, b in zip(d_before, model.d.parameters()))
    with torch.no_grad():
        fake = model.g(torch.randn(4000, 1))
    assert abs(fake.mean().item() - 3.0) < 1.0  # G moved from ~0 towards the data mean
    with pytest.raises(ValueError, match="learning_rate"):
        ToyGAN.__bases__[0].__init__(model, learning_rate=0.0)


class RatioGAN(ToyGAN):
    """ToyGAN with the generator stepping on every third batch only and a discriminator rate of its own."""

    def __init__(self):
        GANModule.__init__(self, learning_rate=0.05, discriminator_learning_rate=0.2, generator_every=3)
        self.g = nn.Linear(1, 1)
        self.d = nn.Sequential(nn.Linear(1, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.disc_start, self.d_steps_seen, self.g_steps_seen = 0, [], []

    def generator_step(self, batch, step):
        self.g_steps_seen.append(step)
        return super().generator_step(batch, step)

    def fake_state(self, batch, step):
        assert not torch.is_grad_enabled()
        return self.g(torch.randn(batch["x"].shape[0], 1))


def test_gan_module_update_ratio_and_discriminator_rate():
    data = torch.utils.data.DataLoader([{"x": torch.tensor([3.0])}] * 64, batch_size=8)
    model = RatioGAN()
    g_before = [p.detach().clone() for p in model.g.parameters()]
    trainer = L.Trainer(max_steps=2 * 7, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, data)
    assert trainer.global_step == 14 and model.d_steps_seen == list(range(7))
    assert model.g_steps_seen == [0, 3, 6]
    assert any(not torch.equal(a, b) for a, b in zip(g_before, model.g.parameters()))
    opt_g, opt_d = model.optimizers()
    assert opt_g.param_groups[0]["lr"] == 0.05 and opt_d.param_groups[0]["lr"] == 0.2
    with pytest.raises(ValueError, match="generator_every"):
        GANModule(learning_rate=0.1, generator_every=0)


class ScheduledGAN(ToyGAN):
    """ToyGAN with the warm-up + cosine multiplier on both players (the guided-inpainting recipe)."""

    def __init__(self):
        GANModule.__init__(
            self,
            learning_rate=0.05,
            discriminator_learning_rate=0.005,
            lr_lambda=LambdaWarmUpCosineScheduler(
                warm_up_steps=4, lr_start=0.1, lr_max=1.0, lr_min=0.01, max_decay_steps=10
            ),
        )
        self.g = nn.Linear(1, 1)
        self.d = nn.Sequential(nn.Linear(1, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.disc_start, self.d_steps_seen = 0, []


def test_gan_module_schedules_both_rates_per_batch_and_resumes_the_schedule(tmp_path):
    sched = LambdaWarmUpCosineScheduler(warm_up_steps=4, lr_start=0.1, lr_max=1.0, lr_min=0.01, max_decay_steps=10)
    assert sched(0) == pytest.approx(0.1) and sched(4) == pytest.approx(1.0) and sched(10) == pytest.approx(0.01)
    assert sched(2) == pytest.approx(0.55) and sched(7) == pytest.approx(0.01 + 0.5 * 0.99)
    data = torch.utils.data.DataLoader([{"x": torch.tensor([3.0])}] * 64, batch_size=8)
    model = ScheduledGAN()
    trainer = L.Trainer(max_steps=2 * 3, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    opt_g, opt_d = model.optimizers()
    assert opt_g.param_groups[0]["lr"] == pytest.approx(0.05 * sched(3))  # three batches: the multiplier of step 3
    assert opt_d.param_groups[0]["lr"] == pytest.approx(0.005 * sched(3))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = ScheduledGAN()
    trainer = L.Trainer(max_steps=2 * 6, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(resumed, data, ckpt_path=ckpt)
    opt_g, opt_d = resumed.optimizers()
    assert opt_g.param_groups[0]["lr"] == pytest.approx(0.05 * sched(6))  # the schedule continued, not restarted
    assert opt_d.param_groups[0]["lr"] == pytest.approx(0.005 * sched(6))
    with pytest.raises(ValueError, match="lr_lambda must be a callable"):
        GANModule(learning_rate=0.1, lr_lambda=0.5)
    with pytest.raises(NotImplementedError, match="fake_state"):
        ToyGAN.fake_state(model, {}, 1)


# ------------------------------------------------------------------------------------------------ host syncs


def test_no_host_sync_refuses_waiting_calls_from_our_code():
    t = torch.tensor([1.0, 2.0])
    cases = {
        "item": lambda: t.sum().item(),
        "tolist": lambda: t.tolist(),
        "__bool__": lambda: bool(t.sum() > 0),
        "__float__": lambda: float(t.sum()),
        "nonzero": lambda: t.nonzero(),
        "bincount": lambda: torch.bincount(t.long()),
        "boolean-mask": lambda: t[t > 1],
    }
    with no_host_sync():
        for name, fn in cases.items():
            with pytest.raises(HostSyncError, match="would wait"):
                fn()
                pytest.fail(f"{name} was not refused")
        torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1).step()  # torch's own code is not ours to fix
        check_index_range(torch.tensor([0, 2]), 3, "ids")  # the accelerator path: an asynchronous assertion
    assert t.sum().item() == 3.0  # restored on exit
    with pytest.raises(ValueError, match="index 3 is outside"):
        check_index_range(torch.tensor([0, 3]), 3, "ids")


# ---------------------------------------------------------------------------------------- entry-point values


def test_sweep_value_reads_the_optimized_metric():
    assert run.sweep_value({}, {"fid": 3.0}) == {"fid": 3.0}
    assert run.sweep_value({"optimized_metric": "fid"}, {"fid": 3.0}) == 3.0
    assert run.sweep_value({"optimized_metric": "steps_25.fid"}, {"steps_25": {"fid": 2.5}}) == 2.5
    with pytest.raises(ValueError, match="not among the task's metrics"):
        run.sweep_value({"optimized_metric": "kid"}, {"fid": 3.0})
