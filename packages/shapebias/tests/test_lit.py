"""shapebias.lit: ShapeClassifier (argument checks, the warm-up + cosine schedule, no weight decay on BN / biases, a
short real training on cue-conflict silhouettes that lowers the loss, held-out stimuli with the network's answers,
the stage extractor) and EpochSnapshots (the initialisation and one file per completed epoch, never overwritten;
list_snapshots in epoch order). CPU, the tiny SmallResNet at 32 px, seeded."""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from gencore.data.fashion_mnist import DEFAULT_ROOT
from shapebias.data import CueConflict
from shapebias.lit import EpochSnapshots, ShapeClassifier, list_snapshots, snapshot_path
from shapebias.models.cnn import small_resnet

HAVE_FMNIST = (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST (make data) is not installed")

SK = ["brick", "gravel", "cells", "stars"]  # scikit-image textures: need no opencv-doc
SIZE = 32
BATCHES_PER_EPOCH = 10  # 20 contents x 4 textures = 80 items, batches of 8


def make(seed: int = 0, **kwargs) -> ShapeClassifier:
    torch.manual_seed(seed)
    kwargs = {"data": {"image_size": SIZE, "textures": SK, "eval_contents": 4}, **kwargs}
    return ShapeClassifier(small_resnet("tiny", num_classes=10), 10, **kwargs)


def fit(module: ShapeClassifier, root, max_steps: int, seed: int = 0) -> list[float]:
    """Train with the module's own optimizer and schedule on 80 real cue-conflict items (10 batches an epoch); the
    loss of every step."""
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            if trainer.global_step == 2 * BATCHES_PER_EPOCH:  # the weights that end epoch 2
                pl_module.after_epoch_2 = copy.deepcopy(pl_module.net.state_dict())

    ds = CueConflict(split="train", num_contents=20, textures=SK, image_size=SIZE, seed=0)
    assert len(ds) == 8 * BATCHES_PER_EPOCH
    loader = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[Record()],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no `val_dataloader`")  # (training only)
        trainer.fit(module, train_dataloaders=loader)
    return losses


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ---------------------------------------------------------------------------------------------------- construction


def test_construction_checks_its_arguments():
    net = small_resnet("tiny", num_classes=10)
    with pytest.raises(ValueError, match=r"the network has 10 outputs but num_classes=5"):
        ShapeClassifier(net, 5)
    with pytest.raises(ValueError, match=r"num_classes must be >= 2, got 1"):
        ShapeClassifier(small_resnet("tiny", num_classes=1), 1)
    cases = {
        "lr": {"lr": 0.0},
        "max_steps": {"max_steps": 0},
        "warmup_steps": {"warmup_steps": -1},
        "label_smoothing": {"label_smoothing": 1.0},
        "snapshot_every_n_epochs": {"snapshot_every_n_epochs": 0},
    }
    for field, kwargs in cases.items():
        with pytest.raises(ValueError, match=rf"^{field} must be .*got {next(iter(kwargs.values()))}"):
            ShapeClassifier(net, 10, **kwargs)
    with pytest.raises(ValueError, match="every_n_epochs must be >= 1, got 0"):
        EpochSnapshots(0)
    module = ShapeClassifier(net, 10, label_smoothing=0.1, snapshot_every_n_epochs=None)
    assert module.stages == {"1": "maxpool", "2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"}
    assert module.configure_callbacks() == []
    (cb,) = make(snapshot_every_n_epochs=3).configure_callbacks()
    assert isinstance(cb, EpochSnapshots) and cb.every_n_epochs == 3


def test_schedule_is_linear_warmup_then_cosine_to_zero():
    lr, warm, total = 0.1, 10, 50
    module = make(lr=lr, warmup_steps=warm, max_steps=total)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step" and conf["lr_scheduler"]["frequency"] == 1
    assert type(opt) is torch.optim.SGD
    for group in opt.param_groups:
        assert group["momentum"] == 0.9 and group["nesterov"] is True

    def closed_form(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        t = min((step - warm) / (total - warm), 1.0)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    got = []
    for _ in range(total + 5):
        got.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == got[-1]
        opt.step()
        sched.step()
    want = [closed_form(s) for s in range(total + 5)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(lr / warm) and got[warm - 1] == pytest.approx(lr) and got[warm] == pytest.approx(lr)
    assert got[(warm + total) // 2] == pytest.approx(lr / 2)  # half-way through the cosine
    assert got[total] == pytest.approx(0.0, abs=1e-15) and max(got[total:]) == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in zip(got[warm:], got[warm + 1 :], strict=False))  # decays monotonically
    # no warm-up: the cosine from the first step
    cold = make(lr=lr, warmup_steps=0, max_steps=total).configure_optimizers()["lr_scheduler"]["scheduler"]
    assert cold.get_last_lr()[0] == pytest.approx(lr)


def test_no_weight_decay_on_batchnorm_and_biases():
    module = make(weight_decay=5e-4)
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.net.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    kept = sorted(names[id(p)] for p in no_decay["params"])
    assert len(decayed) + len(kept) == len(names) and not set(decayed) & set(kept)
    bn = {
        f"{m}.{k}"
        for m, mod in module.net.named_modules()
        if isinstance(mod, nn.BatchNorm2d)
        for k in ("weight", "bias")
    }
    assert set(kept) == bn | {"fc.bias"}
    assert set(decayed) == {n for n in names.values() if n not in bn and n != "fc.bias"}
    assert "conv1.weight" in decayed and "fc.weight" in decayed and "layer2.0.downsample.0.weight" in decayed
    for n, p in module.net.named_parameters():
        assert (n in kept) == (p.ndim <= 1)


# ---------------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Two fits in one run folder: 25 steps (2 complete epochs of 10 batches, a third cut short; snapshots after steps
    3 and 5 too), then a fresh network (another seed) for 60 steps without augmentation."""
    root = tmp_path_factory.mktemp("lit")
    module = make(seed=0, lr=0.05, warmup_steps=2, max_steps=25, snapshot_steps=[3, 5])
    initial = copy.deepcopy(module.net.state_dict())
    first = fit(module, root, 25)
    files_after_first = {e: p.read_bytes() for e, p in list_snapshots(root)}
    first_copy = tmp_path_factory.mktemp("first")
    shutil.copytree(root / "epochs", first_copy / "epochs")  # (the fresh second fit replaces them)
    second_module = make(seed=1, lr=0.05, warmup_steps=2, max_steps=60, augment=False)
    second = fit(second_module, root, 60, seed=1)
    return {
        "root": root,
        "module": module,
        "initial": initial,
        "first": first,
        "files_after_first": files_after_first,
        "first_copy": first_copy,
        "second_module": second_module,
        "second": second,
    }


@needs_fmnist
def test_training_lowers_the_loss_on_real_cue_conflict_images(trained):
    first, second = trained["first"], trained["second"]
    assert len(first) == 25 and len(second) == 60 and all(math.isfinite(v) for v in first + second)
    assert first[0] == pytest.approx(math.log(10), abs=0.35)  # chance on 10 classes at initialisation
    start, end = sum(second[:10]) / 10, sum(second[-10:]) / 10
    assert end < start - 0.6, (start, end)  # a clear decrease: the last 10 steps against the first 10
    assert end < math.log(10) - 0.3


@needs_fmnist
def test_epoch_snapshots_are_the_initialisation_and_each_completed_epoch(trained):
    root, module = trained["first_copy"], trained["module"]
    files = trained["files_after_first"]
    # steps 3 and 5 of 10 per epoch, epochs 1 and 2; the third epoch, cut short by max_steps=25, is not an epoch
    # file but its end is the step-25 snapshot (the trained weights)
    assert sorted(files) == [0, 0.3, 0.5, 1, 2, 2.5]
    with safe_open(str(snapshot_path(root, step=3)), "pt") as f:
        assert f.metadata() == {"epoch": "0.3", "global_step": "3"}
    init = load_file(str(snapshot_path(root, 0)))
    assert same_state(init, trained["initial"])  # epoch 0: the weights before any step
    assert same_state(load_file(str(snapshot_path(root, 2))), module.after_epoch_2)
    assert not same_state(load_file(str(snapshot_path(root, 1))), trained["initial"])
    assert set(init) == set(module.net.state_dict())  # the network's keys (what dynamics loads back)
    for epoch, step in ((0, 0), (1, 10), (2, 20)):
        with safe_open(str(snapshot_path(root, epoch)), "pt") as f:
            assert f.metadata() == {"epoch": str(epoch), "global_step": str(step)}


@needs_fmnist
def test_a_fresh_fit_in_the_folder_replaces_the_earlier_runs_snapshots(trained):
    # (a resumed run continues the series instead: test_cli)
    root = trained["root"]
    after = dict(list_snapshots(root))
    assert sorted(after) == [0, 1, 2, 3, 4, 5, 6]  # 60 steps: six complete epochs of the second fit, no step files
    for epoch in (0, 1, 2):
        assert after[epoch].read_bytes() != trained["files_after_first"][epoch]  # none of the first run's weights
    with safe_open(str(after[6]), "pt") as f:
        assert f.metadata() == {"epoch": "6", "global_step": "60"}
    assert not list(root.joinpath("epochs").glob(".*.tmp"))  # atomic writes leave nothing behind


def test_list_snapshots_is_in_epoch_order(tmp_path):
    assert list_snapshots(tmp_path) == [] and list_snapshots(tmp_path / "nope") == []
    folder = tmp_path / "epochs"
    folder.mkdir()
    for name in ("epoch_010", "epoch_002", "epoch_1000", "epoch_999", "epoch_000", "epoch_best", "epoch_"):
        (folder / f"{name}.safetensors").write_bytes(b"")
    (folder / "epoch_003.ckpt").write_bytes(b"")  # not a snapshot
    found = list_snapshots(tmp_path)
    assert [e for e, _ in found] == [0, 2, 10, 999, 1000]
    assert all(p == snapshot_path(tmp_path, e) or p.name == "epoch_1000.safetensors" for e, p in found)
    assert snapshot_path(tmp_path, 7) == tmp_path / "epochs" / "epoch_007.safetensors"
    assert snapshot_path(tmp_path, step=40) == tmp_path / "epochs" / "step_000040.safetensors"
    with pytest.raises(ValueError, match="an epoch or a step"):
        snapshot_path(tmp_path, 1, step=2)


# ---------------------------------------------------------------------------------------------------- analysis


@needs_fmnist
def test_generate_gives_held_out_stimuli_with_the_networks_answers():
    module = make().eval()
    n = 5
    torch.manual_seed(3)
    out = module.generate(n)
    images, labels, captions = out["images"], out["labels"], out["captions"]
    assert images.shape == (n, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.05
    assert labels.shape == (n,) and torch.equal(labels, module.net(images).argmax(1))
    ds = module.stimuli("test")
    assert (ds.split, ds.pairing, ds.num_contents, ds.image_size, ds.texture_names) == ("test", "all", 4, SIZE, SK)
    torch.manual_seed(3)
    idx = torch.randint(0, len(ds), (n,)).tolist()  # the items generate drew with the same seed
    for i, caption, pred in zip(idx, captions, labels.tolist(), strict=True):
        item = ds[i]
        assert torch.equal(item["image"], images[idx.index(i)])
        shape, texture = ds.class_names[item["label"]], ds.texture_names[item["texture"]]
        assert caption == f"shape: {shape} | texture: {texture} | predicted: {ds.class_names[pred]}"
    assert module.stimuli("test") is ds and module.stimuli("train").split == "train"  # cached per split


def test_extractor_stages_have_the_networks_widths():
    module = make()
    fx = module.extractor()
    net = module.net
    assert fx.stage_names == ("1", "2", "3", "4", "5")
    w = net.widths  # tiny: (8, 8, 16, 16)
    assert fx.widths(SIZE) == {"1": w[0], "2": w[0], "3": w[1], "4": w[2], "5": w[3]}
    feats = fx(torch.zeros(2, 3, SIZE, SIZE).uniform_(-1, 1), pool=False)
    assert {s: tuple(f.shape[1:]) for s, f in feats.items()} == {
        "1": (8, 16, 16),
        "2": (8, 16, 16),
        "3": (8, 8, 8),
        "4": (16, 4, 4),
        "5": (16, 2, 2),
    }
    assert not any(p.requires_grad for p in net.parameters()) and not net.training  # frozen for the analyses
    assert fx.model is net  # the module's own network, not a copy
