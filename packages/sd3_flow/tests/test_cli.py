"""End to end on real Fashion-MNIST: sd3-train (rectified flow, pixel space for speed), sd3-sample from a prompt
file (console script) and for labels cycled to num_samples, sd3-eval at two step counts; every experiment config
composes."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gencore import run
from gencore.cli import compose
from gencore.data.fashion_mnist import DEFAULT_ROOT
from sd3_flow import tasks
from sd3_flow.cli import CONFIGS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing"),
]
PIXEL = [
    "module.first_stage=null",
    "+module.image_channels=1",
    "+module.transformer.in_channels=1",
    "+module.transformer.out_channels=1",
    "+module.transformer.patch_size=4",
    "+module.transformer.sample_size=32",
    "module.sample.num_steps=4",
    "datamodule.batch_size=16",
    "datamodule.num_workers=0",
    "datamodule.limit_val=32",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=2",
]


def test_train_sample_from_prompt_file_and_eval(tmp_path):
    run_dir = tmp_path / "rf"
    res = run.train(
        compose(
            CONFIGS,
            "train",
            [
                "experiment=fmnist_rf_lognorm",
                f"run_dir={run_dir}",
                "trainer.max_steps=40",
                "callbacks.images.every_n_steps=40",
                *PIXEL,
            ],
        )
    )
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert any(k.startswith("train/loss_t/") for k in res.trainer.logged_metrics)  # per-timestep-bucket logging
    assert (run_dir / "images" / "samples" / "step_0000040.png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na photo of a sneaker\n\na photo of a bag\n")
    exe = Path(sys.executable).parent / "sd3-sample"
    proc = subprocess.run(
        [
            str(exe),
            f"checkpoint={run_dir}",
            f"prompts_file={prompts}",
            "num_per_prompt=2",
            f"out_dir={tmp_path / 's'}",
            "sample.num_steps=4",
            "sample.guidance_scale=2.0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "s" / "prompts.txt").read_text().splitlines() == ["a photo of a sneaker"] * 2 + [
        "a photo of a bag"
    ] * 2
    assert len(list((tmp_path / "s").glob("0000*.png"))) == 4
    cfg = compose(CONFIGS, "sample", [f"checkpoint={run_dir}", f"out_dir={tmp_path / 'l'}", "labels=[3,7]"])
    cfg.num_samples, cfg.sample.num_steps, cfg.batch_size = 5, 2, 2
    out_dir = tasks.sample(cfg)  # labels cycled to num_samples, in batches of 2
    assert out_dir == tmp_path / "l" and len(list(out_dir.glob("0000*.png"))) == 5
    data = np.load(out_dir / "samples.npz")
    assert data["labels"].tolist() == [3, 7, 3, 7, 3] and data["images"].shape == (5, 1, 32, 32)
    assert (out_dir / "prompts.txt").read_text().splitlines()[:2] == ["a photo of a dress", "a photo of a sneaker"]
    metrics = tasks.evaluate(
        {
            "checkpoint": str(run_dir),
            "num_samples": 20,
            "batch_size": 10,
            "num_steps": [2, 4],
            "seed": 0,
            "out_dir": str(tmp_path / "e"),
            "sample": {},
        }
    )
    assert set(metrics) == {"steps_2", "steps_4"} and "class_accuracy" in metrics["steps_4"]
    assert json.loads((tmp_path / "e" / "metrics.json").read_text()) == metrics and metrics["steps_2"]["n"] == 20


def test_every_experiment_composes():
    for exp in sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")):
        cfg = compose(
            CONFIGS,
            "train",
            [f"experiment={exp}", "first_stage=/tmp/vae", "run_dir=/tmp/unused", "datamodule.root=/tmp"],
        )
        assert cfg.module._target_ == "sd3_flow.lit.RectifiedFlowModule"
        assert cfg.module.objective in ("rf/lognorm(0.00,1.00)", "rf/mode(1.29)", "rf/cosmap", "rf", "eps/linear")
        assert cfg.module.cond_stage_model._target_ == "sd3_flow.conditioning." + {
            "fmnist_inpaint": "InpaintingConditioner",
            "fmnist_edit": "EditingConditioner",
        }.get(exp, "SD3TextConditioner")
        assert "text" not in cfg.module and "steps" not in cfg.module.sample and cfg.module.sample.num_steps > 0
        if exp.startswith("fmnist"):
            assert cfg.module.first_stage._target_ == "ldm.first_stage.kl_codec"


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        tasks.read_prompts(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        tasks.read_prompts(tmp_path / "empty.txt")


@pytest.mark.parametrize("exp,extra", [("fmnist_inpaint", 2), ("fmnist_edit", 1)])
def test_image_conditioned_models_train_and_sample(tmp_path, exp, extra):
    """The LADD paper's applications as sd3_flow models (pixel space here): the image condition on extra input
    channels, trained from the experiment config, sampled with Fashion-MNIST test images as the conditions."""
    run_dir = tmp_path / exp
    pixel = [o for o in PIXEL if "transformer.in_channels" not in o and "transformer.out_channels" not in o]
    overrides = [f"module.transformer.in_channels={1 + extra}", "module.transformer.out_channels=1", *pixel]
    run.train(
        compose(
            CONFIGS,
            "train",
            [
                f"experiment={exp}",
                f"run_dir={run_dir}",
                "trainer.max_steps=6",
                "callbacks.images.every_n_steps=6",
                *overrides,
            ],
        )
    )
    assert (run_dir / "images" / "samples" / "step_0000006.png").is_file()
    cfg = compose(CONFIGS, "sample", [f"checkpoint={run_dir}", f"out_dir={tmp_path / 's'}", "labels=[3,7]"])
    cfg.num_samples, cfg.sample.num_steps, cfg.batch_size = 3, 2, 2
    data = np.load(tasks.sample(cfg) / "samples.npz")
    assert data["labels"].tolist() == [3, 7, 3] and data["sources"].shape == data["images"].shape == (3, 1, 32, 32)
    if exp == "fmnist_edit":
        assert data["targets"].shape == (3, 1, 32, 32)
