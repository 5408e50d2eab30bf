"""Every training config of the package composes and instantiates: the experiments' modules (the paper-size flow on
the meta device) and datamodules (built, not set up), and the sample / translate / bias-report / eval configs
compose with their documented keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from gencore.cli import compose
from net2net.cli import CONFIGS
from net2net.data import LatentUnionDataModule, UnionDataModule

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
AE = "pkg://net2net/checkpoints/ae_union"


def test_the_experiments_are_the_documented_ones():
    assert EXPERIMENTS == ["autoencoder_union", "cinn_union", "creativity", "tiny", "tiny_autoencoder"]
    header = (CONFIGS / "train.yaml").read_text()
    assert all(name in header for name in EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tmp_path):
    cfg = compose(CONFIGS, "train", [f"experiment={experiment}", f"first_stage={AE}", f"run_dir={tmp_path}"])
    datamodule = instantiate(cfg.datamodule)
    assert isinstance(datamodule, (UnionDataModule, LatentUnionDataModule))
    if "autoencoder" in experiment:
        module = instantiate(cfg.module)
        assert type(module).__name__ == "AutoencoderKLModule" and isinstance(datamodule, UnionDataModule)
        return
    assert isinstance(datamodule, LatentUnionDataModule) and not (tmp_path / "latents").exists()  # nothing encoded
    if experiment == "creativity":  # 179.5 M parameters: the layout only
        with torch.device("meta"):
            flow = instantiate(cfg.module.flow)
        assert (flow.in_channels, len(flow.sub_layers), flow.sub_layers[0].coupling.s[0].main[0].out_features) == (
            128,
            20,
            1024,
        )
        assert cfg.module.latent_noise == 0.0 and cfg.stages is None and cfg.datamodule.batch_size == 15
        return
    module = instantiate(cfg.module) if experiment == "cinn_union" else None
    if module is not None:
        assert module.latent_noise == 0.3 and module.dataset_names == ("fashion_mnist", "digits", "lfw")


@pytest.mark.parametrize("name", ["sample", "translate", "bias_report", "eval"])
def test_task_configs_compose(name):
    cfg = compose(CONFIGS, name, ["checkpoint=pkg://net2net/checkpoints/cinn_union"])
    assert cfg.checkpoint == "pkg://net2net/checkpoints/cinn_union" and "seed" in cfg
    assert Path(str(CONFIGS / f"{name}.yaml")).read_text().startswith("# net2net-")
