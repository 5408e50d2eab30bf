import csv
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from gencore import io, run
from gencore.callbacks import EMA
from gencore.cli import CORE_CONFIGS, compose
from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.viz import make_grid, save_grid

TEST_CONFIGS = Path(__file__).parent / "configs"
needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (make data)",
)


def tiny_cfg(tmp_path, *overrides):
    return compose(TEST_CONFIGS, "tiny_train", [f"run_dir={tmp_path}", *overrides])


def read_metrics(run_dir: Path, version: int = 0) -> list[dict]:
    with open(run_dir / "csv" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@needs_fmnist
def test_train_checkpoints_grids_export_and_resume(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = run.train(tiny_cfg(tmp_path))
    expected = [re.compile(p) for p in run.EXPECTED_LIGHTNING_WARNINGS]  # by-design Lightning noise stays out of logs
    assert not [str(w.message) for w in caught if any(p.match(str(w.message)) for p in expected)]
    assert res.trainer.global_step == 12
    ckpts = sorted(p.name for p in res.checkpoint_dir.iterdir())
    assert ckpts == sorted(n + s for n in ("last.ckpt", "step0000005.ckpt", "step0000010.ckpt") for s in ("", ".json"))
    assert not list(res.checkpoint_dir.glob("*.tmp"))
    # the loss of a real model on real data goes down
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    # image grids at step 6 and at the end
    grids = sorted(p.name for p in (tmp_path / "images" / "reconstructions").iterdir())
    assert grids == ["step_0000006.png", "step_0000012.png"]
    assert Image.open(tmp_path / "images" / "inputs" / grids[0]).size == (2 * 34 + 2, 2 * 34 + 2)
    # the export holds the EMA weights, not the raw ones
    ema = next(c for c in res.trainer.callbacks if isinstance(c, EMA))
    exported = io.load(res.export_dir)
    torch.testing.assert_close(exported.encoder[0].weight, ema.shadow["encoder.0.weight"])
    assert not torch.equal(exported.encoder[0].weight, res.module.encoder[0].weight)
    assert OmegaConf.load(tmp_path / "config.yaml").module.width == 8

    # resume the same run folder: training continues at step 12, the EMA state comes back
    res2 = run.train(tiny_cfg(tmp_path, "resume=auto", "trainer.max_steps=20"))
    assert res2.trainer.global_step == 20
    ema2 = next(c for c in res2.trainer.callbacks if isinstance(c, EMA))
    assert ema2.num_updates == 20 and ema2.batches_seen == 20
    steps = [int(r["step"]) for r in read_metrics(tmp_path, version=1) if r.get("train/loss")]
    assert min(steps) >= 12  # nothing re-trained from scratch

    # a new folder started from that run's weights
    res3 = run.train(tiny_cfg(tmp_path / "again", f"resume={tmp_path}", "trainer.max_steps=22"))
    assert res3.trainer.global_step == 22

    # sampling from the run folder, from the export, and from a bare .ckpt give the same EMA model
    out = run.sample(
        {
            "checkpoint": str(tmp_path),
            "out_dir": str(tmp_path / "s1"),
            "num_samples": 6,
            "batch_size": 4,
            "sample": {"size": 32, "labels": [0, 1, 2, 3, 4, 5]},
        }
    )
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (6, 1, 32, 32) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [0, 1, 2, 3, 4, 5]
    assert (out / "grid.png").is_file()
    again = run.sample(
        {
            "checkpoint": str(tmp_path / "export"),
            "out_dir": str(tmp_path / "s2"),
            "num_samples": 6,
            "batch_size": 4,
            "sample": {"size": 32, "labels": [0, 1, 2, 3, 4, 5]},
        }
    )
    assert np.array_equal(np.load(again / "samples.npz")["images"], data["images"])  # seeded
    from_ckpt = run.load_module(tmp_path / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(from_ckpt.encoder[0].weight, io.load(tmp_path / "export").encoder[0].weight)
    raw = run.load_module(tmp_path / "checkpoints" / "last.ckpt", use_ema=False)
    assert not torch.equal(raw.encoder[0].weight, from_ckpt.encoder[0].weight)


@needs_fmnist
def test_crash_writes_a_checkpoint_and_auto_resume_picks_it(tmp_path):
    crash = ["+callbacks.boom._target_=gencore.testing.FailAtStep", "+callbacks.boom.step=7", "trainer.max_steps=30"]
    with pytest.raises(RuntimeError, match="simulated crash at step 7"):
        run.train(tiny_cfg(tmp_path, *crash))
    saved = tmp_path / "checkpoints" / "on_exception.ckpt"
    assert saved.is_file() and io.load_checkpoint(saved)["global_step"] == 7
    assert run.find_resume_checkpoint("auto", tmp_path) == saved
    res = run.train(tiny_cfg(tmp_path, "resume=auto", "trainer.max_steps=9"))
    assert res.trainer.global_step == 9


@needs_fmnist
def test_resuming_with_another_model_is_refused_before_the_run_folder_changes(tmp_path):
    run.train(tiny_cfg(tmp_path, "trainer.max_steps=2"))
    config = (tmp_path / "config.yaml").read_text()
    with pytest.raises(run.ConfigError, match=r"was trained with another model \(\d+ tensors differ in shape"):
        run.train(tiny_cfg(tmp_path, "resume=auto", "trainer.max_steps=4", "module.width=16"))
    assert (tmp_path / "config.yaml").read_text() == config  # the run folder still describes its checkpoints


def test_resume_argument_errors(tmp_path):
    assert run.find_resume_checkpoint(None, tmp_path) is None
    assert run.find_resume_checkpoint("auto", tmp_path) is None  # nothing yet: fresh start
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        run.find_resume_checkpoint(tmp_path / "elsewhere", tmp_path)
    with pytest.raises(ValueError, match="missing module, datamodule"):
        run.train({"run_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown device"):
        run.pick_device("tpu9")
    assert run.pick_device("auto").type in ("cpu", "cuda", "mps")


def test_safe_checkpoint_io_is_atomic_and_safe(tmp_path):
    cio = run.SafeCheckpointIO()
    cio.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "a.ckpt")
    assert cio.load_checkpoint(tmp_path / "a.ckpt")["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.ckpt.json"]  # the file, then its step
    assert run.checkpoint_step(tmp_path / "a.ckpt") == 3
    cio.remove_checkpoint(tmp_path / "a.ckpt")
    assert not list(tmp_path.iterdir())


class _OneParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)


def test_ema_closed_form():
    m = _OneParam()
    ema = EMA(decay=0.5, warmup=False)
    ema.setup(None, m, "fit")
    assert set(ema.shadow) == {"w"}  # frozen parameters are not averaged
    values = [1.0, 2.0, 4.0]
    for v in values:
        m.w.data.fill_(v)
        ema.on_train_batch_end(None, m)
    # s3 = .5^3·0 + .5·(.5^2·1 + .5·2 + 4)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.5 * (0.25 + 1 + 4)))
    with ema.averaged(m):
        assert torch.allclose(m.w, torch.full((3,), 2.625))
    assert torch.all(m.w == 4.0)  # restored
    sd = ema.averaged_state_dict(m)
    assert torch.allclose(sd["w"], torch.full((3,), 2.625)) and torch.all(m.w == 4.0)


def test_ema_warmup_and_start_step():
    m = _OneParam()
    ema = EMA(decay=0.999, warmup=True, start_step=1)
    ema.setup(None, m, "fit")
    m.w.data.fill_(5.0)
    ema.on_train_batch_end(None, m)  # within start_step: copies
    assert torch.all(ema.shadow["w"] == 5.0) and ema.num_updates == 0
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    m.w.data.fill_(15.0)
    ema.on_train_batch_end(None, m)
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.1 * 5 + 0.9 * 15))
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(decay=1.0)


def test_grids_for_images_and_videos(tmp_path):
    imgs = torch.rand(5, 3, 8, 8) * 2 - 1
    assert make_grid(imgs).shape == (3, 2 + 2 * 10, 2 + 3 * 10)  # 3 per row (ceil sqrt 5)
    vids = torch.rand(2, 1, 4, 8, 8) * 2 - 1
    assert make_grid(vids).shape == (3, 2 + 2 * 10, 2 + 4 * 10)  # one row per video, one column per frame
    p = save_grid(imgs, tmp_path / "g.png", nrow=5)
    assert Image.open(p).size == (2 + 5 * 10, 12)
    with pytest.raises(ValueError, match="expected"):
        make_grid(torch.rand(3, 8, 8))


@pytest.mark.parametrize("name", ["cpu", "gpu", "ddp", "fsdp"])
def test_every_trainer_config_instantiates(name, tmp_path):
    cfg = compose(TEST_CONFIGS, "groups", [f"trainer={name}", f"run_dir={tmp_path}"])
    t = cfg.trainer
    if t.get("strategy") is not None:
        strategy = instantiate(t.strategy)
        assert type(strategy).__name__ == {"ddp": "DDPStrategy", "fsdp": "FSDPStrategy"}[name]
    if name == "cpu" or torch.cuda.is_available():
        trainer = run.build_trainer(cfg, tmp_path, [], [])
        assert trainer.max_steps == 1000
    else:
        assert t.accelerator == "gpu" and t.precision == "bf16-mixed"


@pytest.mark.parametrize("name", ["csv", "tensorboard"])
def test_logger_configs_instantiate(name, tmp_path):
    cfg = compose(TEST_CONFIGS, "groups", [f"logger={name}", f"run_dir={tmp_path}"])
    loggers = [instantiate(node) for node in cfg.logger.values()]
    assert [type(lg).__name__ for lg in loggers] == (["CSVLogger"] + (["TensorBoardLogger"] if name != "csv" else []))
    assert all(Path(lg.save_dir) == tmp_path for lg in loggers)


@pytest.mark.parametrize("name", ["default", "ema", "none"])
def test_callback_configs_instantiate(name, tmp_path):
    cfg = compose(TEST_CONFIGS, "groups", [f"callbacks={name}", f"run_dir={tmp_path}"])
    cbs = [instantiate(node) for node in cfg.callbacks.values()]
    assert len(cbs) == {"default": 1, "ema": 2, "none": 0}[name]


@needs_fmnist
@pytest.mark.parametrize("name", ["fashion_mnist", "skimage_photos", "video", "image_folder"])
def test_datamodule_configs_instantiate(name, tmp_path):
    extra = {
        "fashion_mnist": ["datamodule.limit_train=32"],
        "skimage_photos": ["datamodule.crops_per_image=2"],
        "video": ["datamodule.paths=[/usr/share/doc/opencv-doc/examples/data/tree.avi]"],
        "image_folder": ["datamodule.root=/usr/share/doc/opencv-doc/examples/data"],
    }[name]
    if name in ("video", "image_folder") and not Path("/usr/share/doc/opencv-doc/examples/data/tree.avi").is_file():
        pytest.skip("opencv-doc not installed")
    cfg = compose(
        TEST_CONFIGS, "groups", [f"datamodule={name}", f"run_dir={tmp_path}", "datamodule.num_workers=0", *extra]
    )
    dm = instantiate(cfg.datamodule)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert ("video" if name == "video" else "image") in batch


def test_core_primary_config_instantiates(tmp_path):
    cfg = compose(CORE_CONFIGS, "fmnist_features", [f"run_dir={tmp_path}"])
    module = instantiate(cfg.module)
    assert type(module).__name__ == "FMNISTClassifierModule" and module.max_steps == cfg.trainer.max_steps == 7000
    assert cfg.datamodule.image_size == 28 and cfg.datamodule.limit_val is None


def test_debug_configs_compose(tmp_path):
    fast = tiny_cfg(tmp_path, "debug=fast")
    assert fast.trainer.max_steps == 4 and fast.checkpoint.every_n_train_steps == 2 and fast.datamodule.batch_size == 4
    overfit = tiny_cfg(tmp_path, "debug=overfit")
    assert overfit.trainer.overfit_batches == 1 and overfit.trainer.limit_val_batches == 0


@needs_fmnist
def test_overfit_preset_drives_the_loss_down(tmp_path):
    res = run.train(
        tiny_cfg(tmp_path, "debug=overfit", "trainer.max_steps=60", "callbacks.images=null", "callbacks.ema=null")
    )
    losses = [float(r["train/loss"]) for r in read_metrics(tmp_path) if r.get("train/loss")]
    assert res.trainer.global_step == 60 and losses[-1] < 0.25 * losses[0]


@needs_fmnist
def test_console_script_end_to_end(tmp_path):
    exe = Path(sys.executable).parent / "gencore-train-fmnist-features"
    proc = subprocess.run(
        [str(exe), "debug=fast", f"run_dir={tmp_path}", "trainer.max_steps=3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "export" / "model.safetensors").is_file() and (tmp_path / "card.json").is_file()
    assert (tmp_path / ".hydra" / "config.yaml").is_file()  # hydra writes into the same run folder
    module = io.load(tmp_path / "export")
    assert type(module).__name__ == "FMNISTClassifierModule"


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_compile_callback_compiles_the_trainable_networks_in_place():
    """callbacks=compile: the trainable children are compiled in place (backend eager here: no code generation on
    the CI machine), the state dict keeps its keys, training runs as without it; a wrong name is a clear error."""
    import lightning as L

    from gencore.callbacks import Compile
    from gencore.testing import TinyAutoencoderModule

    node = OmegaConf.load(CORE_CONFIGS / "callbacks" / "compile.yaml").compile
    assert isinstance(instantiate(node), Compile)
    module = TinyAutoencoderModule()
    keys = list(module.state_dict())
    cb = Compile(backend="eager")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[cb], limit_val_batches=0,
    )  # fmt: skip
    data = torch.utils.data.DataLoader([{"image": torch.randn(1, 16, 16)} for _ in range(8)], batch_size=4)
    trainer.fit(module, train_dataloaders=data)
    assert cb.compiled and all(getattr(module, n)._compiled_call_impl is not None for n in cb.compiled)
    assert list(module.state_dict()) == keys  # in place: no _orig_mod. prefix
    assert trainer.global_step == 2
    with pytest.raises(ValueError, match="has no submodule 'nope'"):
        Compile(modules=["nope"]).setup(trainer, module, "fit")
