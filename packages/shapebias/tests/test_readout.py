"""Per-pixel readout (shapebias.readout): the official PosENet, the frozen-stage readout, targets, poly LR, the
confusion-histogram mIoU and the Lightning recipe."""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shapebias.encoders import FeatureExtractor, build_encoder
from shapebias.readout import (
    PosENet,
    ReadoutModule,
    StageReadout,
    binary_target,
    confusion_histogram,
    iou_per_class,
    mean_iou,
    pixel_accuracy,
    poly_lambda,
    poly_lr,
    posenet_num_parameters,
    readout_loss,
    semantic_target,
)


def _tiny_extractor() -> FeatureExtractor:
    """The in-project small ResNet (tiny preset, random init): stages "1".."5", strides 2, 2, 4, 8, 16 (small stem)."""
    return build_encoder("small_resnet:tiny")


def _resnet50_extractor() -> FeatureExtractor:
    return build_encoder("resnet50")  # torchvision, weights=None: nothing downloaded


def _bn_stats(module: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone() for m in module.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)
    ]


# ------------------------------------------------------------------------------------------------------ PosENet


def test_posenet_official_parameter_count_and_names():
    head = PosENet(2048, 2)
    n = sum(p.numel() for p in head.parameters() if p.requires_grad)
    formula = (9 * 2048 * 256 + 256 + 2 * 256) + (9 * 256 * 128 + 128 + 2 * 128) + (9 * 128 * 2 + 2)
    assert n == formula == 5_016_962 == posenet_num_parameters(2048, 2)
    assert round(n / 1e6, 2) == 5.02
    names = [k for k, _ in head.named_parameters()]
    assert names == [f"{m}.{p}" for m in ("conv1", "bn1", "conv2", "bn2", "conv3") for p in ("weight", "bias")]
    assert head.conv1.kernel_size == (3, 3) and head.conv1.padding == (1, 1)
    # the semantic file's variant: conv1 / conv2 without bias, 21 classes
    sem = PosENet(2048, 21, bias=False)
    assert sum(p.numel() for p in sem.parameters()) == posenet_num_parameters(2048, 21, bias=False)
    assert sem.conv1.bias is None and sem.conv3.bias is not None

    single = PosENet(256, 2, layers=1)
    assert [k for k, _ in single.named_parameters()] == ["conv.weight", "conv.bias"]
    assert sum(p.numel() for p in single.parameters()) == 9 * 256 * 2 + 2 == posenet_num_parameters(256, 2, layers=1)
    assert PosENet(8, 3, hidden=(4, 2))(torch.randn(2, 8, 5, 7)).shape == (2, 3, 5, 7)


def test_posenet_bad_input():
    with pytest.raises(ValueError, match="layers"):
        PosENet(8, 2, layers=4)
    with pytest.raises(ValueError, match="num_classes"):
        PosENet(8, 1)
    with pytest.raises(ValueError, match=r"\(B, 8, h, w\)"):
        PosENet(8, 2)(torch.randn(1, 9, 4, 4))


# --------------------------------------------------------------------------------------------- StageReadout


def test_resnet50_stage5_readout_full_size_output():
    torch.manual_seed(0)
    readout = StageReadout(_resnet50_extractor(), "5", 2)
    assert readout.input_dim == 2048
    assert sum(p.numel() for p in readout.classifier.parameters()) == 5_016_962
    backbone, head = readout.trainable_parameters()
    assert backbone and not any(p.requires_grad for p in backbone)
    assert all(p.requires_grad for p in head) and sum(p.numel() for p in head) == 5_016_962
    readout.eval()
    with torch.no_grad():
        out = readout(torch.rand(1, 3, 513, 513) * 2 - 1)
    assert out.shape == (1, 2, 513, 513)


def test_unknown_stage_and_bad_options():
    ext = _tiny_extractor()
    with pytest.raises(ValueError, match="'9'"):
        StageReadout(ext, "9", 2)
    with pytest.raises(ValueError, match="fuse"):
        StageReadout(ext, "2", 2, fuse="sum")
    readout = StageReadout(ext, "2", 2, hidden=(8, 4))
    with pytest.raises(ValueError, match="images"):
        readout(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="num_classes=2"):
        ReadoutModule(StageReadout(ext, "2", 3, hidden=(8, 4)), task="binary")
    with pytest.raises(ValueError, match="task"):
        ReadoutModule(readout, task="depth")


def test_frozen_backbone_unchanged_after_step_head_changes():
    torch.manual_seed(0)
    readout = StageReadout(_tiny_extractor(), "3", 2, hidden=(8, 4))
    before_bb = [p.detach().clone() for p in readout.extractor.parameters()]
    before_head = [p.detach().clone() for p in readout.classifier.parameters()]
    backbone, head = readout.trainable_parameters()
    opt = torch.optim.SGD([{"params": backbone, "lr": 0.1}, {"params": head, "lr": 1.0}], momentum=0.9)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randint(0, 2, (2, 32, 32))
    readout_loss(readout(x), y).backward()
    assert all(p.grad is None for p in readout.extractor.parameters())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before_bb, readout.extractor.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_head, readout.classifier.parameters()))


def test_freeze_bn_keeps_running_stats_official_quirk_drifts():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    frozen = StageReadout(_tiny_extractor(), "3", 2, hidden=(8, 4), freeze_bn=True)
    frozen.train()
    assert not frozen.extractor.training and frozen.classifier.training
    stats = _bn_stats(frozen.extractor)
    frozen(x)
    frozen.extractor.train()  # a direct call is undone at the next forward
    frozen(x)
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(frozen.extractor)))

    quirk = StageReadout(_tiny_extractor(), "3", 2, hidden=(8, 4), freeze_bn=False)
    quirk.train()
    assert quirk.extractor.training
    stats = _bn_stats(quirk.extractor)
    quirk(x)
    assert any(not torch.equal(a, b) for a, b in zip(stats, _bn_stats(quirk.extractor)))
    assert not any(p.requires_grad for p in quirk.extractor.parameters())  # still frozen weights


def test_multistage_fuses_every_stage_up_to_k():
    torch.manual_seed(0)
    ext = _tiny_extractor()
    names = list(ext.stage_names)
    stage = names[2]
    readout = StageReadout(ext, stage, 2, fuse="multistage", layers=1)
    assert readout.stages == names[:3]
    widths = {s: readout.channels[s] for s in readout.stages}
    assert readout.input_dim == widths[names[0]] + 2 * 64
    assert {n for n, _ in readout.named_children()} >= {"stage1_feature", "stage2_feature", "classifier"}
    assert readout.stage1_feature.in_channels == widths[names[1]] and readout.stage2_feature.out_channels == 64
    assert [k for k, _ in readout.classifier.named_parameters()] == ["conv.weight", "conv.bias"]
    _, head = readout.trainable_parameters()
    assert len(head) == 2 + 2 + 2  # two projections and the one-layer head

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    readout.eval()
    feats = readout.features(x)
    with torch.no_grad():
        maps = ext(x, stages=readout.stages, pool=False)
    assert feats.shape == (2, readout.input_dim, *maps[stage].shape[-2:])
    torch.testing.assert_close(
        feats[:, : widths[names[0]]], F.interpolate(maps[names[0]], size=maps[stage].shape[-2:], mode="bilinear")
    )
    assert readout(x).shape == (2, 2, 32, 32)
    # every fused stage reaches the logits: each projection gets a gradient
    readout.train()
    readout(x).sum().backward()
    assert readout.stage1_feature.weight.grad.abs().sum() > 0 and readout.stage2_feature.weight.grad.abs().sum() > 0
    # multistage at the first stage is the single readout on that stage
    first = StageReadout(ext, names[0], 2, fuse="multistage", layers=1)
    assert first.stages == [names[0]] and first.input_dim == widths[names[0]]


# ---------------------------------------------------------------------------------------------- targets, loss


def test_binary_target_official_and_fixed():
    t = torch.tensor([[0, 1, 7, 255], [20, 0, 255, 3]])
    assert binary_target(t).tolist() == [[0, 1, 1, 1], [1, 0, 1, 1]]  # official: 255 -> foreground
    assert binary_target(t, ignore_to_foreground=False).tolist() == [[0, 1, 1, 255], [1, 0, 255, 1]]
    assert binary_target(t).dtype == torch.int64
    assert torch.equal(semantic_target(t.int()), t)
    with pytest.raises(ValueError, match="dtype"):
        binary_target(t.float())


def test_semantic_cross_entropy_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 6, 6)
    target = torch.randint(0, 21, (2, 6, 6))
    target[:, :2] = 255
    loss = readout_loss(logits, semantic_target(target))
    keep = target != 255
    ref = -F.log_softmax(logits, 1).permute(0, 2, 3, 1)[keep].gather(1, target[keep][:, None]).mean()
    torch.testing.assert_close(loss, ref)
    # the binary target (official conversion) has no ignore pixels left: all pixels count
    b = binary_target(target)
    blogits = logits[:, :2]
    torch.testing.assert_close(readout_loss(blogits, b), F.cross_entropy(blogits, b))


# ----------------------------------------------------------------------------------------------------- poly LR


def test_poly_lr_closed_form_and_floor():
    assert poly_lr(0, 0.002, 19830) == 0.002
    assert poly_lr(9915, 0.002, 19830) == pytest.approx(0.002 * 0.5**0.9, rel=1e-12)
    assert poly_lr(19829, 0.002, 19830) == pytest.approx(max(0.002 * (1 / 19830) ** 0.9, 1e-7))
    assert poly_lr(19830, 0.002, 19830) == 1e-7  # the floor
    assert poly_lr(25000, 0.002, 19830) == 1e-7  # stays there
    assert poly_lr(99, 1.0, 100, power=1.0, min_lr=0.05) == 0.05
    lam = poly_lambda(100, base_lr=0.002, min_lr=1e-7)
    assert lam(0) == 1.0 and lam(50) == pytest.approx(0.5**0.9) and lam(100) == pytest.approx(1e-7 / 0.002)
    with pytest.raises(ValueError, match="max_steps"):
        poly_lr(1, 0.1, 0)


def test_module_optimizer_groups_and_per_step_poly():
    readout = StageReadout(_tiny_extractor(), "2", 2, hidden=(8, 4))
    module = ReadoutModule(readout, lr=0.002, max_steps=10)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 2
    assert opt.param_groups[0]["params"] == []  # frozen backbone: nothing to train there
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in readout.trainable_parameters()[1]}
    for g in opt.param_groups:
        assert g["momentum"] == 0.9 and g["weight_decay"] == 5e-4
    for step in range(12):
        lr0, lr1 = opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]
        assert lr0 == pytest.approx(poly_lr(step, 0.002, 10, 0.9, 1e-7), rel=1e-9)
        assert lr1 == pytest.approx(10 * lr0, rel=1e-9)
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-6)  # 10 x the floor, as the official 10 * new_lr
    # not frozen (our option): the backbone trains at lr
    thawed = StageReadout(
        build_encoder("small_resnet:tiny", frozen=False), "2", 2, hidden=(8, 4), freeze_backbone=False
    )
    opt2 = ReadoutModule(thawed).configure_optimizers()["optimizer"]
    assert len(opt2.param_groups[0]["params"]) == len(list(thawed.extractor.parameters())) > 0


# ------------------------------------------------------------------------------------------------------ metric


def _direct_iou(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = 255) -> np.ndarray:
    keep = (target != ignore) & (target >= 0) & (target < k) & (pred >= 0) & (pred < k)
    p, t = pred[keep], target[keep]
    out = np.full(k, np.nan)
    for c in range(k):
        union = np.sum((p == c) | (t == c))
        if union:
            out[c] = np.sum((p == c) & (t == c)) / union
    return out


def test_confusion_histogram_matches_direct_iou():
    rng = np.random.default_rng(0)
    k = 6
    target = rng.integers(0, 4, size=(3, 17, 19))  # classes 4 and 5 never occur in the target
    pred = rng.integers(0, 4, size=target.shape)
    pred[0, 0, :5] = 4  # class 4 predicted only: IoU 0, counted
    target[rng.random(target.shape) < 0.1] = 255  # ignore pixels
    pred[1, 1, :3] = 9  # predictions outside [0, K) are left out
    hist = confusion_histogram(torch.as_tensor(pred), torch.as_tensor(target), k)
    assert hist.dtype == torch.int64 and hist.shape == (k, k)
    keep = (target != 255) & (pred < k)
    assert int(hist.sum()) == int(keep.sum())
    ref = np.zeros((k, k), dtype=np.int64)
    np.add.at(ref, (target[keep], pred[keep]), 1)
    assert np.array_equal(hist.numpy(), ref)  # rows = target, columns = prediction
    iou = iou_per_class(hist).numpy()
    direct = _direct_iou(pred, target, k)
    assert np.isnan(iou[5]) and np.isnan(direct[5]) and iou[4] == 0.0
    np.testing.assert_allclose(iou, direct, equal_nan=True)
    assert mean_iou(hist) == pytest.approx(np.nanmean(direct))
    assert pixel_accuracy(hist) == pytest.approx(np.mean(pred[keep] == target[keep]))
    # accumulation over batches equals one histogram over everything
    parts = sum(confusion_histogram(torch.as_tensor(pred[i]), torch.as_tensor(target[i]), k) for i in range(3))
    assert torch.equal(parts, hist)
    assert math.isnan(mean_iou(torch.zeros(3, 3, dtype=torch.int64)))
    with pytest.raises(ValueError, match="same shape"):
        confusion_histogram(torch.zeros(2, 3), torch.zeros(3, 2), 2)


# ---------------------------------------------------------------------------------------------- a short fit


class _Squares(Dataset):
    """Bright squares (object = 1) on dark noise, 32 x 32; ~10 % of the object's border is 255 (ignore)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 32, 32, generator=g) * 0.6 - 1.0
        self.masks = torch.zeros(n, 32, 32, dtype=torch.int64)
        for i in range(n):
            s = int(torch.randint(10, 18, (1,), generator=g))
            y, x = (int(v) for v in torch.randint(0, 32 - s, (2,), generator=g))
            self.images[i, :, y : y + s, x : x + s] += 1.2
            self.masks[i, y : y + s, x : x + s] = 1
            self.masks[i, y, x : x + s] = 255

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "mask": self.masks[i]}


def test_short_fit_lowers_loss_and_beats_chance():
    torch.manual_seed(0)
    readout = StageReadout(_tiny_extractor(), "2", 2, hidden=(16, 8))
    stats = _bn_stats(readout.extractor)
    module = ReadoutModule(readout, max_steps=32)  # the official lr 0.002 (head 0.02)
    train = DataLoader(_Squares(64, 0), batch_size=8, shuffle=True)
    val = DataLoader(_Squares(16, 1), batch_size=8)
    before = module.evaluate_miou(val)
    losses = []

    class _Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        max_steps=32,  # 4 epochs of 8 batches: validation ends every epoch
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        callbacks=[_Record()],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    assert len(losses) == 32
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    after = module.evaluate_miou(val)
    assert after["miou"] > 0.75 and after["miou"] > before["miou"]
    assert len(after["iou"]) == 2 and 0 < after["pixel_acc"] <= 1
    assert float(trainer.callback_metrics["val/miou"]) == pytest.approx(after["miou"], abs=1e-6)
    assert "val/pixel_acc" in trainer.callback_metrics
    # frozen BN (our default): the backbone's statistics are the pretrained ones after training
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(readout.extractor)))
    assert module.training and not readout.extractor.training


def test_no_host_sync_in_training_and_metric():
    from gencore.testing import assert_no_host_sync, no_host_sync

    class _DM(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(_Squares(16, 0), batch_size=4)

        def val_dataloader(self):
            return DataLoader(_Squares(4, 1), batch_size=4)

    torch.manual_seed(0)
    module = ReadoutModule(StageReadout(_tiny_extractor(), "2", 2, hidden=(8, 4)), max_steps=10)
    assert_no_host_sync(module, _DM(), steps=2, warmup=1)
    pred, target = torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 3, (2, 8, 8))
    with no_host_sync("cpu"):
        hist = confusion_histogram(pred, target, 3)
        iou = iou_per_class(hist)
    assert iou.shape == (3,)


def test_binary_ignore_kept_as_ignore_when_asked():
    torch.manual_seed(0)
    readout = StageReadout(_tiny_extractor(), "2", 2, hidden=(8, 4))
    batch = {"image": torch.rand(2, 3, 32, 32) * 2 - 1, "mask": torch.randint(0, 2, (2, 32, 32))}
    batch["mask"][:, :4] = 255
    official = ReadoutModule(readout)
    fixed = ReadoutModule(readout, ignore_to_foreground=False)
    assert official.target(batch)[:, :4].eq(1).all() and fixed.target(batch)[:, :4].eq(255).all()
    logits = readout.eval()(batch["image"])
    keep = batch["mask"] != 255
    ref = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], batch["mask"][keep])
    torch.testing.assert_close(readout_loss(logits, fixed.target(batch)), ref)
    with pytest.raises(ValueError, match="'semantic'"):
        ReadoutModule(readout, task="semantic").target(batch)
