"""The package end to end with the tiny recipe on real Fashion-MNIST: imagebart-train (remap=auto, then resumed),
-sample (grid, samples, the coarse-to-fine chain), -inpaint and -eval (sample metrics and the editing comparison
against taming's autoregressive transformer). The tasks run in process on the composed configs, as the console scripts
run them; a user error runs the console script itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from gencore.cli import compose
from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.testing import logged_values
from imagebart.cli import CONFIGS
from imagebart.editing import named_mask, token_keep_mask

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing"),
]
BIN = Path(sys.executable).parent
TINY = ["experiment=tiny", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from imagebart import tasks

    run_dir = tmp_path_factory.mktemp("imagebart") / "run"
    res = tasks.train(compose(CONFIGS, "train", [*TINY, f"run_dir={run_dir}", "trainer.max_steps=2"]))
    assert res.trainer.global_step == 2 and (run_dir / "export" / "model.safetensors").is_file()
    again = tasks.train(compose(CONFIGS, "train", [*TINY, f"run_dir={run_dir}", "trainer.max_steps=4", "resume=auto"]))
    assert again.trainer.global_step == 4  # resumed at step 2, not restarted
    assert len(logged_values(run_dir, "train/loss")) == 4  # two runs' logs, two steps each
    # remap=auto was resolved into the explicit list of used codes: the run's config and the model agree on K
    remap = OmegaConf.load(run_dir / "config.yaml").module.first_stage.remap
    assert isinstance(list(remap), list) and list(remap) == sorted(set(remap))
    assert again.module.num_codes == len(remap) < 512
    return run_dir


def test_sample(trained, tmp_path):
    from imagebart import tasks

    overrides = [f"checkpoint={trained}", f"out_dir={tmp_path}", "num_samples=4", "batch_size=4", "sample.labels=[1,2]"]
    out = tasks.sample(compose(CONFIGS, "sample", overrides))
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (4, 1, 32, 32) and data["images"].dtype == np.uint8
    assert data["labels"].tolist() == [1, 2, 1, 2]
    assert (out / "grid.png").is_file()
    chain = Image.open(out / "chain.png")  # 8 rows (chain_rows) of T + 1 = 3 maps: x_2, x_1, x_0
    assert chain.height > 2 * chain.width
    with pytest.raises(ValueError, match=r"label 10 outside \[0, 10\)"):
        tasks.sample(compose(CONFIGS, "sample", [*overrides[:-1], "sample.labels=[10]"]))


def test_inpaint(trained, tmp_path):
    from gencore.data import FashionMNIST
    from imagebart import tasks

    out = tasks.inpaint(
        compose(
            CONFIGS,
            "inpaint",
            [f"checkpoint={trained}", f"out_dir={tmp_path}", "indices=[0,1]", "num_samples=2", "mask=center"],
        )
    )
    data = np.load(out / "edits.npz")
    assert data["images"].shape == (2, 1, 32, 32) and data["edits"].shape == (4, 1, 32, 32)
    expected = token_keep_mask(named_mask("center", 32), (8, 8)).view(8, 8).numpy()
    assert data["keep_tokens"].shape == (2, 8, 8) and (data["keep_tokens"] == expected).all()
    _, labels = FashionMNIST(split="test", image_size=32, channels=1, limit=2).tensors()
    assert data["labels"].tolist() == labels.tolist()
    assert (out / "grid.png").is_file()


def test_eval_with_the_editing_comparison(trained, tmp_path):
    from imagebart import tasks

    metrics = tasks.evaluate(
        compose(
            CONFIGS,
            "eval",
            [
                f"checkpoint={trained}",
                f"out_dir={tmp_path}",
                "num_samples=8",
                "batch_size=4",
                "inpaint.masks=[upper]",
                "inpaint.num_images=4",
                "inpaint.baseline=pkg://taming/checkpoints/transformer_fmnist_class",
            ],
        )
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    expected = {"n", "fid", "kid", "precision", "recall", "class_accuracy", "seconds_per_image"}
    expected |= {"inpaint/reconstruction/fid", "inpaint/reconstruction/class_accuracy"}
    for model in ("imagebart", "taming_ar"):
        expected |= {f"inpaint/upper/{model}/{k}" for k in ("n", "fid", "class_accuracy", "hole_psnr")}
    assert expected <= set(metrics), expected - set(metrics)
    assert metrics["n"] == 8 and metrics["inpaint/upper/imagebart/n"] == 4
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["inpaint/upper/taming_ar/class_accuracy"] <= 1


def test_a_bad_mask_is_one_clear_error(trained, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GENLAB_TRACEBACK", None)
    proc = subprocess.run(
        [str(BIN / "imagebart-inpaint"), f"checkpoint={trained}", f"out_dir={tmp_path}", "mask=nonsense.png"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "mask image not found: 'nonsense.png'" in proc.stderr, proc.stderr
    assert not (tmp_path / "edits.npz").exists()
