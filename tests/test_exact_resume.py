"""A run killed without warning (os._exit, as SIGKILL) and resumed with `resume=auto` ends with the weights (and EMA
weights) of the same run left alone, within 1e-6: a diffusion recipe (ldm, class-conditional with conditioning
dropout, EMA) and a GAN recipe with manual optimization (taming's VQGAN, discriminator on before the kill). The
epoch's remaining batches are not fed again and the random streams continue where the checkpoint was."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gencore import io
from gencore.data.fashion_mnist import DEFAULT_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing"),
]
QUICK = [
    "datamodule.batch_size=8",
    "datamodule.num_workers=0",
    "datamodule.limit_val=8",
    "+datamodule.limit_train=96",  # 12 batches an epoch: the kill and the resume fall in the middle of one
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=2",
    "trainer.limit_val_batches=0",
    "~callbacks.images",
]
RECIPES = {
    # name: (console script, overrides, total steps, checkpoint every, kill at)
    "ldm_class_diffusion": (
        "ldm-train",
        [
            "experiment=pixel_fmnist_class",
            "+module.unet.model_channels=32",
            "+module.unet.channel_mult=[1,2]",
            "+module.unet.attention_resolutions=[2]",
        ],
        30,
        10,
        17,
    ),
    "taming_vqgan_gan": (
        "taming-train",
        ["experiment=vqgan_fmnist", "module.model.preset=tiny", "datamodule.image_size=16", "module.loss.disc_start=3"],
        40,
        14,
        22,
    ),
}


def train(script: str, overrides: list[str]) -> None:
    exe = Path(sys.executable).parent / script
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(exe), *overrides], capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode not in (0, 137):
        raise AssertionError(proc.stderr[-3000:])


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_killed_and_resumed_equals_uninterrupted(tmp_path, recipe):
    script, base, steps, every, kill = RECIPES[recipe]
    common = [*base, *QUICK, f"checkpoint.every_n_train_steps={every}", f"trainer.max_steps={steps}"]
    train(script, [*common, f"run_dir={tmp_path / 'whole'}"])
    train(
        script,
        [
            *common,
            f"run_dir={tmp_path / 'killed'}",
            "+callbacks.kill._target_=gencore.testing.KillAtStep",
            f"+callbacks.kill.step={kill}",
        ],
    )
    killed = tmp_path / "killed" / "checkpoints"
    assert not (killed / "last.ckpt").exists() or io.load_checkpoint(killed / "last.ckpt")["global_step"] < kill
    assert not (killed / "on_exception.ckpt").exists()  # a kill writes nothing
    train(script, [*common, f"run_dir={tmp_path / 'killed'}", "resume=auto"])
    a = io.load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    b = io.load_checkpoint(killed / "last.ckpt")
    assert a["global_step"] == b["global_step"] == steps
    diff = max((a["state_dict"][k].float() - b["state_dict"][k].float()).abs().max().item() for k in a["state_dict"])
    assert diff <= 1e-6, f"{recipe}: weights differ by {diff:.3g} after the kill and resume"
    for key, state in a["callbacks"].items():  # the EMA weights too, where the recipe keeps them
        if key.startswith("EMA"):
            other = b["callbacks"][key]["shadow"]
            assert max((v - other[k]).abs().max().item() for k, v in state["shadow"].items()) <= 1e-6
