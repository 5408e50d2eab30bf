"""The one sample task: the same samples from two processes (torchrun, gloo) as from one, each exactly once; the
package hooks (load / request / write); and console entry points return the task's value."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gencore import io, run
from gencore.testing import TinyAutoencoderModule

SCRIPT = """
import sys
from gencore import run
run.sample({"checkpoint": sys.argv[1], "out_dir": sys.argv[2], "num_samples": 11, "batch_size": 3, "seed": 5,
            "device": "cpu", "sample": {"labels": list(range(10))}})
"""


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "export"
    cfg = {"module": {"_target_": "gencore.testing.TinyAutoencoderModule", "channels": 1}}
    return io.export(TinyAutoencoderModule(channels=1), cfg, folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_the_samples_of_one(export_dir, tmp_path):
    one = run.sample(
        {
            "checkpoint": str(export_dir),
            "out_dir": str(tmp_path / "one"),
            "num_samples": 11,
            "batch_size": 3,
            "seed": 5,
            "device": "cpu",
            "sample": {"labels": list(range(10))},
        }
    )
    script = tmp_path / "sample.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={_free_port()}"]
    proc = subprocess.run(
        [*cmd, str(script), str(export_dir), str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = np.load(one / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["images"].shape == (11, 1, 32, 32)
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert a["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # cycled, in order: no gaps, no duplicates
    flat = a["images"].reshape(11, -1)
    assert len({row.tobytes() for row in flat}) == 11  # every sample drawn once, from its own seed


def test_package_hooks(export_dir, tmp_path):
    seen = {}

    def load(cfg, device):
        seen["device"] = device
        return run.load_for_sampling(cfg, device)

    def request(cfg, module):
        return 4, {"labels": [cfg.first_label]}

    def write(out, out_dir, cfg):
        (out_dir / "extra.txt").write_text(str(len(out["images"])))

    out = run.sample(
        OmegaConf.create({"checkpoint": str(export_dir), "out_dir": str(tmp_path), "first_label": 7, "device": "cpu"}),
        load=load,
        request=request,
        write=write,
    )
    assert seen["device"].type == "cpu" and (out / "extra.txt").read_text() == "4"
    assert np.load(out / "samples.npz")["labels"].tolist() == [7, 7, 7, 7]


def test_entry_point_returns_the_task_value(tmp_path, monkeypatch):
    from gencore.cli import compose, hydra_app

    (tmp_path / "task.yaml").write_text("optimized_metric: score\nvalue: 2.5\nhydra:\n  output_subdir: null\n")
    seen = []
    main = hydra_app(tmp_path, "task", lambda cfg: seen.append(cfg.value) or {"score": cfg.value * 2, "n": 1})
    assert main.job(compose(tmp_path, "task", ["value=4.0"])) == 8.0  # the number a sweeper optimises
    monkeypatch.setattr(sys, "argv", ["task", "value=1.5", f"hydra.run.dir={tmp_path}"])
    main()  # the console script runs the same job
    assert seen == [4.0, 1.5]
