"""Every experiment composes; the toy's nodes build and fit together (its first stage is an autoencoder run, replaced
here by a random KL-f4 of the same shape); bad values are refused before anything is written."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from gen1_video.cli import CONFIGS
from gen1_video.lit import Gen1VideoDiffusion
from gencore import run
from gencore.cli import compose
from gencore.validate import ConfigError


@pytest.mark.parametrize("experiment", ["tiny", "opencv_toy", "gen1"])
def test_experiments_compose(experiment):
    cfg = compose(CONFIGS, "train", [f"experiment={experiment}"])
    assert cfg.module._target_ == "gen1_video.lit.Gen1VideoDiffusion"
    assert cfg.datamodule.size == cfg.module.image_size and cfg.datamodule.channels == cfg.module.image_channels
    assert cfg.datamodule.num_frames == cfg.module.num_frames


def test_toy_nodes_build_and_fit():
    from ldm.first_stage import KLCodec
    from ldm.models.autoencoder import build_autoencoder

    cfg = compose(CONFIGS, "train", ["experiment=opencv_toy"])
    parts = {k: instantiate(cfg.module[k]) for k in ("unet", "structure", "content")}
    first = KLCodec(build_autoencoder(preset="fmnist_kl_f4"))
    kw = {k: v for k, v in cfg.module.items() if k not in ("_target_", "unet", "structure", "content", "first_stage")}
    module = Gen1VideoDiffusion(first_stage=first, **parts, **kw)
    assert module.latent_size == 8 and module.unet.latent_channels == 4
    dm = instantiate(cfg.datamodule)
    module.check_datamodule(dm)  # sizes, channels, frames, image batches agree


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("module.image_ratio=1.5", r"image_ratio must be in \[0, 1\)"),
        ("module.image_ratio=0.5", r"needs image batches"),
        ("datamodule.size=16", r"datamodule\.size=16 but module\.image_size=8"),
        ("module.num_frames=9", r"num_frames=9 must be in \[1, unet\.max_frames=8\]"),
        ("+module.sample.strength=2", r"strength must be in \(0, 1\]"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(tmp_path, bad, message):
    cfg = compose(CONFIGS, "train", ["experiment=tiny", "trainer.max_steps=1", f"run_dir={tmp_path}", bad])
    with pytest.raises(ConfigError, match=message):
        run.train(cfg)
    assert not list(tmp_path.iterdir())
