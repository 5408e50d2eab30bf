"""Two processes on the CPU (gloo) through `trainer=ddp`: the VQGAN recipe (two optimizers, manual optimization)
trains, one folder holds one set of checkpoints and one metrics file, and `resume=auto` continues from the last
step. The command line is a user's: `taming-train ... trainer=ddp trainer.accelerator=cpu trainer.devices=2`."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gencore import run
from gencore.data.fashion_mnist import DEFAULT_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing"),
]
ARGS = [
    "experiment=vqgan_fmnist",
    "module.model.preset=tiny",
    "module.loss.disc_ndf=8",
    "module.loss.disc_start=2",
    "datamodule.image_size=16",
    "datamodule.batch_size=4",
    "datamodule.num_workers=0",
    "datamodule.limit_val=8",
    "+datamodule.limit_train=64",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_train_steps=4",
    "callbacks.images.every_n_steps=4",
]


def taming_train(*overrides: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "taming-train"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(exe), *ARGS, *overrides], capture_output=True, text=True, timeout=600, env=env)


def test_two_process_ddp_trains_checkpoints_once_and_resumes(tmp_path):
    proc = taming_train(f"run_dir={tmp_path}", "trainer.max_steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step0000008.ckpt"]  # rank 0 writes; no "-v1" twins from the other process
    assert run.checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 8
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["version_0"]  # one logger, one version

    proc = taming_train(f"run_dir={tmp_path}", "trainer.max_steps=12", "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run.checkpoint_step(tmp_path / "checkpoints" / "last.ckpt") == 12
    assert proc.stderr.count("resuming from") + proc.stdout.count("resuming from") <= 1  # said once, by rank 0
    rows = []
    for version in sorted((tmp_path / "csv").iterdir()):
        with open(version / "metrics.csv") as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/aeloss")]
    steps = [int(r["step"]) for r in rows]
    # logged every 2 batches (two optimizer steps each): batches 1, 3 before the resume, 5 after; each once (the
    # other process does not log)
    assert steps == [1, 3, 5]
    assert not (tmp_path / ".lock").exists()
