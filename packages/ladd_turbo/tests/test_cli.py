"""ladd_turbo from its configs and console scripts on a tiny exported sd3_flow teacher: ladd-synth (then resumed),
ladd-train on the made data (then resumed), sampling at 1..4 steps, and the bad inputs the issue names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from gencore import io, run
from gencore.cli import compose
from gencore.latents import LatentCacheDataset
from gencore.testing import TinyAutoencoderModule, randomize_parameters
from ladd_turbo.cli import CONFIGS
from ladd_turbo.lit import load_teacher

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent

TEACHER = {
    "_target_": "sd3_flow.lit.RectifiedFlowModule",
    "transformer": {
        "_target_": "sd3_flow.models.mmdit.mmdit_from_preset",
        "name": "tiny",
        "sample_size": 8,
        "patch_size": 2,
        "in_channels": 1,
        "out_channels": 1,
        "pos_embed_max_size": 8,
        "joint_attention_dim": 384,
        "pooled_projection_dim": 384,
    },
    "first_stage": None,
    "cond_stage_model": {"_target_": "sd3_flow.conditioning.SD3TextConditioner", "minilm_max_length": 8},
    "image_channels": 1,
    "image_size": 8,
}
SMALL = [
    "datamodule.num_per_prompt=2",
    "datamodule.num_steps=2",
    "datamodule.batch_size=4",
    "datamodule.val_fraction=0.2",
    "module.discriminator.layers=[0,1]",
    "module.discriminator.head_channels=16",
    "trainer.max_steps=6",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.images.every_n_steps=6",
]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    module = instantiate(TEACHER)
    randomize_parameters(module.transformer, seed=3, std=0.05)
    return io.export(module, {"module": TEACHER}, tmp_path_factory.mktemp("teacher") / "export")


def cli(script, *args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(BIN / script), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_synth_then_train_then_sample(teacher, tmp_path):
    data = tmp_path / "synthetic"
    (tmp_path / "prompts.txt").write_text("a photo of a bag\na photo of a sneaker\n")
    args = [f"teacher={teacher}", f"prompts_file={tmp_path / 'prompts.txt'}", "num_per_prompt=3", "shard_size=4"]
    proc = cli("ladd-synth", *args, "sample.num_steps=2", f"out_dir={data}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((data / "index.json").read_text())
    assert index["num_samples"] == 6 and index["captions"][:4] == ["a photo of a bag"] * 3 + ["a photo of a sneaker"]
    assert "ladd-train teacher=" in proc.stdout + proc.stderr
    again = cli("ladd-synth", *args, "sample.num_steps=2", f"out_dir={data}", cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout + again.stderr

    run_dir = tmp_path / "run"
    res = run.train(compose(CONFIGS, "train", cfg_overrides(teacher, run_dir, data)))
    assert res.trainer.global_step == 6 and (run_dir / "export" / "model.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(run_dir / "export" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith("teacher.") for k in keys)  # the frozen teacher is rebuilt from its export
    resumed = [*cfg_overrides(teacher, run_dir, data), "resume=auto", "trainer.max_steps=10"]
    res2 = run.train(compose(CONFIGS, "train", resumed))
    assert res2.trainer.global_step == 10

    for steps in (1, 4):
        out = tmp_path / f"samples{steps}"
        proc = cli(
            "ladd-sample",
            f"checkpoint={run_dir}",
            "num_samples=3",
            f"sample.num_steps={steps}",
            f"out_dir={out}",
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert np.load(out / "samples.npz")["images"].shape == (3, 1, 8, 8)
    from ladd_turbo import tasks

    cfg = compose(CONFIGS, "eval", [f"checkpoint={run_dir}", f"out_dir={tmp_path / 'eval'}", "num_samples=20"])
    cfg.batch_size, cfg.num_steps, cfg.teacher_rows = 10, [1, 4], [{"num_steps": 2, "guidance_scale": 2.0}]
    metrics = tasks.evaluate(cfg)
    assert set(metrics) == {"student_1", "student_4", "teacher_2_cfg2"}
    assert metrics["student_4"]["n"] == 20 and 0.0 <= metrics["student_4"]["class_accuracy"] <= 1.0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics
    bad = cli("ladd-sample", f"checkpoint={run_dir}", "num_samples=2", "sample.num_steps=5", cwd=tmp_path)
    assert (
        bad.returncode == 1 and "num_steps must be an integer in 1..4" in bad.stderr and "Traceback" not in bad.stderr
    )


def cfg_overrides(teacher, run_dir, data):
    return [f"teacher={teacher}", f"run_dir={run_dir}", f"datamodule.path={data}", *SMALL]


def test_bad_inputs_are_named(teacher, tmp_path):
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    proc = cli("ladd-synth", f"teacher={teacher}", f"prompts_file={tmp_path / 'empty.txt'}", cwd=tmp_path)
    assert proc.returncode == 1 and "holds no prompts" in proc.stderr and "Traceback" not in proc.stderr
    overrides = [*cfg_overrides(teacher, tmp_path / "r1", tmp_path / "d"), "module.discriminator.layers=[0,5]"]
    with pytest.raises(ValueError, match=r"block indices in 0..1 of the teacher"):
        run.train(compose(CONFIGS, "train", overrides))
    student = [
        "+module.student._target_=sd3_flow.models.mmdit.mmdit_from_preset",
        "+module.student.name=tiny",
        "+module.student.in_channels=1",
        "+module.student.out_channels=1",
    ]
    with pytest.raises(ValueError, match="does not match the teacher's architecture"):
        run.train(compose(CONFIGS, "train", [*cfg_overrides(teacher, tmp_path / "r2", tmp_path / "d"), *student]))
    not_a_teacher = tmp_path / "ae"
    cfg = {"module": {"_target_": "gencore.testing.TinyAutoencoderModule", "channels": 1}}
    io.export(TinyAutoencoderModule(channels=1), cfg, not_a_teacher)
    with pytest.raises(ValueError, match="not an sd3_flow RectifiedFlowModule"):
        load_teacher(str(not_a_teacher))


@pytest.mark.parametrize("exp", ["fmnist_inpaint_turbo", "fmnist_edit_turbo"])
def test_applications_distil_from_the_cli(exp, tmp_path):
    """ladd-train experiment=fmnist_{inpaint,edit}_turbo on a tiny exported image-conditioned teacher: synthetic data
    made from real Fashion-MNIST items first, a few LADD steps, then ladd-sample with test images as conditions."""
    kind = "InpaintingConditioner" if "inpaint" in exp else "EditingConditioner"
    cfg = {
        **TEACHER,
        "transformer": {**TEACHER["transformer"], "in_channels": 3 if kind == "InpaintingConditioner" else 2},
        "cond_stage_model": {**TEACHER["cond_stage_model"], "_target_": f"sd3_flow.conditioning.{kind}"},
    }
    torch.manual_seed(0)
    module = instantiate(cfg)
    randomize_parameters(module.transformer, seed=3, std=0.05)
    teacher = io.export(module, {"module": cfg}, tmp_path / "teacher")
    run_dir = tmp_path / "run"
    small = [o for o in SMALL if "num_per_prompt" not in o]
    overrides = [f"experiment={exp}", f"teacher={teacher}", f"run_dir={run_dir}", *small]
    overrides += ["datamodule.num_samples=8", "datamodule.source.dataset.image_size=8"]
    res = run.train(compose(CONFIGS, "train", overrides))
    assert res.trainer.global_step == 6
    assert LatentCacheDataset(run_dir / "synthetic").extra["c_concat"].shape[0] == 8
    if kind == "InpaintingConditioner":  # ladd-synth makes the same data from the command line
        source = "{_target_: gencore.data.MaskedImages, dataset: {_target_: gencore.data.FashionMNIST, image_size: 8}}"
        args = [f"teacher={teacher}", f"source={source}", "num_samples=5", "sample.num_steps=2", "shard_size=4"]
        proc = cli("ladd-synth", *args, f"out_dir={tmp_path / 'synth'}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert LatentCacheDataset(tmp_path / "synth").extra["c_concat"].shape == (5, 2, 8, 8)
    out = tmp_path / "samples"
    proc = cli("ladd-sample", f"checkpoint={run_dir}", "num_samples=3", "labels=[1,2]", f"out_dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = np.load(out / "samples.npz")
    assert data["images"].shape == data["sources"].shape == (3, 1, 8, 8) and data["labels"].tolist() == [1, 2, 1]
