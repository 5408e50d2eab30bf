"""net2net.lit.Net2NetFlow: the cINN over a frozen KL autoencoder's latents. Construction checks, the official
optimiser over the flow alone, the latents it trains on (posterior samples of cached moments or of images), the NLL
falling on the real union's latents, per-dataset validation bits/dim, generation, projection and image logs. CPU,
tiny (2 x 8 x 8 = 128-d latents at 16 x 16), seeded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldm.first_stage import KLCodec
from ldm.models.autoencoder import build_autoencoder
from net2net.conditioning import Labelator
from net2net.data import MEMBERS, load_member
from net2net.lit import Net2NetFlow
from net2net.models.flow import bits_per_dim, build_flow

SIZE = 16
TINY_AE = {"ddconfig": {"resolution": SIZE, "ch": 32, "ch_mult": [1, 1], "z_channels": 2}, "embed_dim": 2}


@pytest.fixture(scope="module")
def codec() -> KLCodec:
    """A tiny KL autoencoder (f = 2, 2 latent channels: 1 x 16 x 16 -> 2 x 8 x 8), random weights, frozen; a
    non-trivial latent scale and shift."""
    torch.manual_seed(0)
    return KLCodec(build_autoencoder("fmnist_kl_f4", **TINY_AE), scale=0.8, shift=0.05)


def make(codec, seed: int = 0, **kwargs) -> Net2NetFlow:
    torch.manual_seed(seed)
    kwargs = {"image_size": SIZE, "scale_lr": False, **kwargs}
    return Net2NetFlow(build_flow("tiny", in_channels=128), codec, **kwargs)


def quiet(module: Net2NetFlow) -> dict[str, torch.Tensor]:
    """Replace ``log`` / ``log_dict`` (no Trainer here) by a recorder; the dict of logged values."""
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    module.log_dict = lambda values, **kw: logged.update(values)
    return logged


def _union(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of each member's split at 16 x 16 and their dataset ids."""
    xs, ys = [], []
    for i, name in enumerate(MEMBERS):
        x, _ = load_member(name, split, image_size=SIZE)
        xs.append(x[:n])
        ys.append(torch.full((len(x[:n]),), i))
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def real(codec) -> dict[str, torch.Tensor]:
    """Real union images (48 train / 16 val per dataset) and their posterior-mean latents under the codec."""
    x, y = _union("train", 48)
    xv, yv = _union("val", 16)
    return {"x": x, "y": y, "z": codec.encode(x).flatten(1), "xv": xv, "yv": yv, "zv": codec.encode(xv).flatten(1)}


def initialised(codec, real, **kwargs) -> Net2NetFlow:
    """A module whose ActNorms were initialised by one training forward on real latents, in eval mode."""
    module = make(codec, **kwargs)
    module.train()
    with torch.no_grad():
        module(real["z"], module.one_hot(real["y"]))
    return module.eval()


# ---------------------------------------------------------------------------------------------------- construction


def test_construction_checks_widths_and_sizes(codec):
    with pytest.raises(
        ValueError, match=r"latents of width 128 .*2x8x8.*in_channels=16.*module\.flow\.in_channels=128"
    ):
        Net2NetFlow(build_flow("tiny"), codec, image_size=SIZE)
    with pytest.raises(ValueError, match="image_size 15 is not divisible by the first stage's downsampling factor 2"):
        Net2NetFlow(build_flow("tiny", in_channels=128), codec, image_size=15)
    with pytest.raises(ValueError, match=r"Labelator gives conditionings of width 4.*conditioning_dim=3"):
        Net2NetFlow(build_flow("tiny", in_channels=128), codec, Labelator(4), image_size=SIZE)
    with pytest.raises(ValueError, match="width 4"):  # four datasets for a flow of three labels
        Net2NetFlow(build_flow("tiny", in_channels=128), codec, dataset_names=("a", "b", "c", "d"), image_size=SIZE)
    with pytest.raises(ValueError, match="learning_rate"):
        make(codec, learning_rate=0.0)
    with pytest.raises(ValueError, match="temperature"):
        make(codec, temperature=-1.0)
    module = make(codec)
    assert module.latent_shape == (2, 8, 8) and module.latent_width == 128
    assert module.dataset_names == MEMBERS and module.cond_stage_model.names == MEMBERS


def test_optimizer_is_the_official_adam_over_the_flow_alone(codec):
    module = make(codec, learning_rate=2e-4)
    opt = module.configure_optimizers()
    assert type(opt) is torch.optim.Adam and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["amsgrad"] is True and group["betas"] == (0.5, 0.9) and group["lr"] == 2e-4
    assert {id(p) for p in group["params"]} == {id(p) for p in module.flow.parameters()}
    assert len(group["params"]) == len(list(module.flow.parameters()))
    # the official rule: base lr x batch x devices x accumulation
    scaled = make(codec, scale_lr=True)
    scaled._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=8), world_size=2, accumulate_grad_batches=3)
    assert scaled.configure_optimizers().param_groups[0]["lr"] == pytest.approx(4.5e-6 * 8 * 2 * 3)
    # the first stage is frozen and stays in eval mode when the module trains
    first = module.first_stage_model
    assert all(not p.requires_grad for p in first.parameters())
    module.train()
    assert module.training and module.flow.training
    assert not first.training and not any(m.training for m in first.modules())
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == sum(
        p.numel() for p in module.flow.parameters()
    )


# ---------------------------------------------------------------------------------------------------- latents


def test_latents_from_cached_moments_are_posterior_samples(codec):
    module = make(codec)
    g = torch.Generator().manual_seed(3)
    mean, std = torch.randn(4, 2, 8, 8, generator=g), torch.rand(4, 2, 8, 8, generator=g) + 0.1
    batch = {"latent": mean, "std": std, "dataset": torch.tensor([0, 1, 2, 0])}
    torch.manual_seed(7)
    z = module.latents(batch)
    torch.manual_seed(7)
    eps = torch.randn_like(mean)
    assert z.shape == (4, 128)
    torch.testing.assert_close(z, (mean + std * eps).flatten(1))
    assert not torch.allclose(z, mean.flatten(1))
    # std 0: the mean; no std: the latents as given; sample_posterior=False: the mean
    assert torch.equal(module.latents({"latent": mean, "std": torch.zeros_like(std)}), mean.flatten(1))
    assert torch.equal(module.latents({"latent": mean}), mean.flatten(1))
    assert torch.equal(make(codec, sample_posterior=False).latents(batch), mean.flatten(1))
    assert torch.equal(module.latents({"latent": mean.flatten(1)}), mean.flatten(1))  # already flat


def test_latents_from_images_encode_them(codec, real):
    x = real["x"][::24][:4]
    module = make(codec)
    post = codec.model.encode(x)
    # sampling: (mean + std·ε − shift) · scale
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
    expected = ((post.mean + post.std * eps - 0.05) * 0.8).flatten(1)
    got = module.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(2)
    a = module.latents({"image": x})
    torch.manual_seed(2)
    torch.testing.assert_close(a, module.encode(x, sample=True))
    # the mean (projection, and training with sample_posterior=False)
    mode = ((post.mean - 0.05) * 0.8).flatten(1)
    torch.testing.assert_close(module.encode(x), mode, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(make(codec, sample_posterior=False).latents({"image": x}), mode, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="neither 'latent'.*nor 'image'"):
        module.latents({"dataset": torch.zeros(2)})


def test_wrong_latent_shapes_raise(codec):
    module = make(codec)
    for bad in (torch.zeros(2, 4, 8, 8), torch.zeros(2, 2, 4, 4), torch.zeros(2, 64)):
        with pytest.raises(ValueError, match=r"latents of shape .*makes \(2, 8, 8\) \(width 128\)"):
            module.latents({"latent": bad})
    with pytest.raises(ValueError, match="latents of shape"):
        module(torch.zeros(2, 2, 8, 9), module.one_hot([0, 1]))


# ---------------------------------------------------------------------------------------------------- training


def test_nll_falls_on_the_real_union_latents(codec, real):
    """~60 Adam steps (lr 1e-3) of the module's own training step on posterior means of real Fashion-MNIST, digits
    and LFW images: the held-out NLL drops by a clear margin."""
    module = make(codec, learning_rate=1e-3, sample_posterior=False)
    logged = quiet(module)
    z, y, zv, yv = real["z"], real["y"], real["zv"], real["yv"]

    def held_out() -> float:
        module.eval()
        with torch.no_grad():
            v, logdet = module(zv, module.one_hot(yv))
        module.train()
        return float(bits_per_dim(v, logdet).mean())

    module.train()
    with torch.no_grad():
        module.training_step({"latent": z, "dataset": y}, 0)  # initialises the ActNorms from the data
    before = held_out()
    opt = module.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(60):
        idx = torch.randperm(len(z), generator=g)[:32]
        loss = module.training_step({"latent": z[idx], "dataset": y[idx]}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    after = held_out()
    assert {"train/loss", "train/bits_per_dim", "train/nll_loss", "train/nlogdet_loss"} <= set(logged)
    assert torch.isfinite(torch.tensor(losses)).all()
    # the bound: 0.1 bit per dimension = 128 · 0.1 · ln 2 ≈ 8.9 nats per item (observed: ~0.17 bit / dim)
    assert after < before - 0.1, (before, after)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 10


def test_validation_bits_per_dim_per_dataset(codec, real):
    module = initialised(codec, real, sample_posterior=False)
    logged = quiet(module)
    z, y = real["zv"].reshape(-1, 2, 8, 8), real["yv"]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:40]  # uneven counts, mixed batches
    z, y = z[perm], y[perm]
    with torch.no_grad():
        for i, start in enumerate(range(0, 40, 16)):
            module.validation_step({"latent": z[start : start + 16], "dataset": y[start : start + 16]}, i)
        assert "val/loss" in logged and "val/bits_per_dim" in logged
        module.on_validation_epoch_end()
        for d, name in enumerate(MEMBERS):
            zd = z[y == d].flatten(1)
            v, logdet = module.flow(zd, module.one_hot([d] * len(zd)))
            expected = bits_per_dim(v, logdet).double().mean().float()
            torch.testing.assert_close(logged[f"val/bits_per_dim/{name}"], expected, atol=1e-5, rtol=1e-6)
    # the accumulators are reset for the next epoch
    assert module._val_bpd_sum.abs().sum() == 0 and module._val_count.sum() == 0
    assert "_val_bpd_sum" not in module.state_dict()
    # an epoch that saw one dataset (a limited, unshuffled val set) reports that one, not 0 bits/dim for the others
    logged.clear()
    with torch.no_grad():
        module.validation_step({"latent": z[y == 2], "dataset": y[y == 2]}, 0)
        module.on_validation_epoch_end()
    assert [k for k in logged if k.startswith("val/bits_per_dim/")] == ["val/bits_per_dim/lfw"]


# ---------------------------------------------------------------------------------------------------- inference


def test_generate_returns_images_and_labels(codec, real):
    module = initialised(codec, real)
    out = module.generate(4, labels=["lfw", 0, "digits", 2], generator=torch.Generator().manual_seed(0))
    assert out["images"].shape == (4, 1, SIZE, SIZE)
    assert out["images"].min() >= -1 and out["images"].max() <= 1
    assert out["labels"].tolist() == [2, 0, 1, 2]
    again = module.generate(4, labels=["lfw", 0, "digits", 2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["images"], out["images"])
    # default: random datasets, returned
    rand = module.generate(3)
    assert rand["images"].shape == (3, 1, SIZE, SIZE) and set(rand["labels"].tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="unknown dataset 'cats'; known: fashion_mnist, digits, lfw"):
        module.generate(1, labels=["cats"])
    with pytest.raises(ValueError, match="unknown dataset 3; known: fashion_mnist, digits, lfw"):
        module.generate(1, labels=[3])
    with pytest.raises(ValueError, match="this model knows 0=fashion_mnist, 1=digits, 2=lfw"):
        module.dataset_index("cats")
    with pytest.raises(ValueError, match="unknown dataset label '-1'"):
        module.labels_tensor(["-1"])
    assert module.labels_tensor("lfw", 3).tolist() == [2, 2, 2]
    assert module.labels_tensor(torch.tensor([[1], [0]])).tolist() == [1, 0]


def test_project_shapes_and_the_identity_projection(codec, real):
    module = initialised(codec, real)
    x = real["xv"][::16][:3]  # one image of each dataset
    out = module.project(x, [0, 1, 2])
    assert out.shape == (3, 3, 1, SIZE, SIZE) and out.min() >= -1 and out.max() <= 1
    two = module.project(x[:2], "lfw", ["digits", "fashion_mnist"])
    assert two.shape == (2, 2, 1, SIZE, SIZE)
    # onto each image's own dataset: its reconstruction
    rec = module.decode(module.encode(x))
    torch.testing.assert_close(out[torch.arange(3), torch.arange(3)], rec, atol=1e-4, rtol=0)
    torch.testing.assert_close(two[:, 1], module.project(x[:2], "lfw", [0])[:, 0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="3 images but 2 source labels"):
        module.project(x, [0, 1])
    with pytest.raises(ValueError, match="unknown dataset 'cats'"):
        module.project(x, "lfw", ["cats"])


def test_log_images(codec, real):
    module = initialised(codec, real)
    x, y = real["xv"][::8][:6], real["yv"][::8][:6]
    logs = module.log_images({"image": x, "dataset": y}, n=4)
    assert set(logs) == {"inputs", "reconstructions", "shift", "samples"}
    assert all(v.shape == (4, 1, SIZE, SIZE) for v in logs.values())
    assert torch.equal(logs["inputs"], x[:4])
    # the flow's reconstruction is the autoencoder's; shift uses the next item's label, so it differs
    torch.testing.assert_close(logs["reconstructions"], module.decode(module.encode(x[:4])), atol=1e-4, rtol=0)
    assert not torch.allclose(logs["shift"], logs["reconstructions"], atol=1e-3)
    latents = module.log_images({"latent": module.encode(x).reshape(-1, 2, 8, 8), "dataset": y}, n=3)
    assert set(latents) == set(logs) and latents["inputs"].shape == (3, 1, SIZE, SIZE)
    torch.testing.assert_close(latents["inputs"], module.decode(module.encode(x[:3])))
    with pytest.raises(ValueError, match="dataset"):
        module.log_images({"image": x})


def test_latent_noise_is_added_in_training_only(codec, real):
    """``latent_noise`` σ: the flow sees z + σ·ε in a training step and z itself in validation."""
    module = initialised(codec, real, latent_noise=0.5, sample_posterior=False)
    quiet(module)
    seen: list[torch.Tensor] = []
    flow_forward = module.flow.forward
    module.flow.forward = lambda z, c, **kw: (seen.append(z.detach().clone()), flow_forward(z, c, **kw))[1]
    z = real["zv"][:8].reshape(8, 2, 8, 8)
    batch = {"latent": z, "std": torch.zeros_like(z), "dataset": real["yv"][:8]}
    torch.manual_seed(0)
    module.training_step(batch, 0)
    module.validation_step(batch, 0)
    train_z, val_z = seen
    torch.testing.assert_close(val_z, z.flatten(1))
    noise = train_z - z.flatten(1)
    assert 0.4 < noise.std() < 0.6 and noise.abs().max() > 0
    with pytest.raises(ValueError, match="latent_noise must be >= 0"):
        make(codec, latent_noise=-0.1)
