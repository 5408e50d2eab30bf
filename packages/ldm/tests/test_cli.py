"""End to end on real Fashion-MNIST: ldm-train (KL autoencoder, then class-conditional latent diffusion over it),
ldm-sample (console script), ldm-eval, ldm-inpaint and ldm-superres, with short budgets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

from gencore import run
from gencore.cli import compose
from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.testing import logged_values, mean_image_psnr
from ldm import tasks
from ldm.cli import CONFIGS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing"),
]
QUICK = [
    "datamodule.batch_size=16",
    "datamodule.num_workers=0",
    "datamodule.limit_val=32",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=2",
]


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    """80 reconstruction-only batches, evaluated; then resumed for 10 batches with the discriminator on (the
    reconstruction quality is measured before the first GAN batches, which the adaptive weight makes large)."""
    out = tmp_path_factory.mktemp("ae")
    overrides = [
        "experiment=autoencoder_fmnist",
        f"run_dir={out}",
        "module.scale_lr=false",
        "module.learning_rate=1e-3",
        "module.loss.disc_start=80",
        "callbacks.images.every_n_steps=80",
        *QUICK,
    ]
    run.train(compose(CONFIGS, "train", [*overrides, "trainer.max_steps=160"]))
    metrics = tasks.evaluate(
        {"checkpoint": str(out), "num_samples": 100, "batch_size": 50, "out_dir": str(out / "eval"), "seed": 0}
    )
    run.train(compose(CONFIGS, "train", [*overrides, "trainer.max_steps=180", "resume=auto"]))
    return out, metrics


@pytest.fixture(scope="module")
def autoencoder(autoencoder_run):
    return autoencoder_run[0]


def test_autoencoder_trains(autoencoder_run):
    out, metrics = autoencoder_run
    rec = logged_values(out, "train/rec_loss")
    assert np.mean(rec[-5:]) < 0.8 * np.mean(rec[:5])
    assert logged_values(out, "train/disc_loss")  # the resumed run switched the discriminator on
    assert metrics["psnr"] > mean_image_psnr(32, n_test=100) + 1.5 and metrics["fid_fmnist"] > 0


@pytest.fixture(scope="module")
def ldm_run(autoencoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm")
    res = run.train(
        compose(
            CONFIGS,
            "train",
            [
                "experiment=ldm_fmnist_class",
                f"first_stage={autoencoder}",
                f"run_dir={out}",
                "trainer.max_steps=40",
                "+module.unet.model_channels=32",
                "+module.unet.num_head_channels=16",
                "module.sample.num_steps=4",
                "callbacks.images.every_n_steps=40",
                *QUICK,
            ],
        )
    )
    return out, res


def test_latent_diffusion_trains_and_the_console_script_samples(ldm_run, tmp_path):
    out, res = ldm_run
    losses = logged_values(out, "train/loss")
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert res.module.latent_norm.ready and float(res.module.scale_factor) != 1.0  # scale_by_std ran on batch 1
    assert (out / "images" / "samples" / "step_0000040.png").is_file()
    exe = Path(sys.executable).parent / "ldm-sample"
    proc = subprocess.run(
        [
            str(exe),
            f"checkpoint={out}",
            f"out_dir={tmp_path / 's'}",
            "num_samples=6",
            "batch_size=3",
            "sample.num_steps=4",
            "sample.guidance_scale=2.0",
            "sample.labels=[7,8,9]",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["images"].shape == (6, 1, 32, 32) and data["labels"].tolist() == [7, 8, 9, 7, 8, 9]
    metrics = tasks.evaluate(
        {
            "checkpoint": str(out),
            "num_samples": 20,
            "batch_size": 10,
            "seed": 0,
            "out_dir": str(tmp_path / "e"),
            "sample": {"num_steps": 4},
        }
    )
    assert {"fid", "class_accuracy", "seconds_per_image"} <= set(metrics)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["n"] == 20
    masked = tasks.inpaint(
        {
            "checkpoint": str(out),
            "num_samples": 4,
            "batch_size": 4,
            "seed": 0,
            "out_dir": str(tmp_path / "i"),
            "sample": {"num_steps": 4},
        }
    )
    assert json.loads((masked / "metrics.json").read_text())["outside_changed"] == 0.0
    assert (masked / "grid.png").is_file()


def test_every_experiment_config_composes(autoencoder):
    for exp in sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")):
        cfg = compose(
            CONFIGS,
            "train",
            [
                f"experiment={exp}",
                f"first_stage={autoencoder}",
                "run_dir=/tmp/unused",
                "datamodule.root=/tmp",
                "+clip_path=/tmp",
                "+sd_checkpoint=/tmp/x.ckpt",
            ],
        )
        assert cfg.module._target_.startswith("ldm.lit.")
        if "fmnist" in exp:  # the toy ones are built (the paper ones need real weights and data)
            module = instantiate(cfg.module, _convert_="all")
            assert module is not None


def test_superres_model_end_to_end(autoencoder, tmp_path):
    res = run.train(
        compose(
            CONFIGS,
            "train",
            [
                "experiment=ldm_fmnist_superres",
                f"first_stage={autoencoder}",
                f"run_dir={tmp_path / 'sr'}",
                "trainer.max_steps=10",
                "+module.unet.model_channels=32",
                "+module.unet.num_head_channels=16",
                "module.sample.num_steps=4",
                "callbacks.images.every_n_steps=10",
                *QUICK,
            ],
        )
    )
    assert res.module.model.conditioning_key == "concat"
    out = tasks.superres(
        {
            "checkpoint": str(tmp_path / "sr"),
            "num_samples": 4,
            "batch_size": 4,
            "seed": 0,
            "out_dir": str(tmp_path / "o"),
            "sample": {"num_steps": 4},
        }
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 4 and np.isfinite(m["psnr"]) and m["psnr_bicubic"] > 10
