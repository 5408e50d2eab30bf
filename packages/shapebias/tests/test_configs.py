"""Every config of the package composes: train with each experiment (its datamodule and module instantiate and pass
gencore's config checks, with debug=fast sizes), and the task configs (sample, eval, dims, dynamics, readout, data)
with their documented keys and pair groups."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from gencore.cli import compose
from gencore.validate import check_fits, validate_config
from shapebias.cli import CONFIGS
from shapebias.data import CueConflictDataModule
from shapebias.lit import ShapeClassifier
from shapebias.models.cnn import SmallResNet

EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
TASKS = ["sample", "eval", "dims", "dynamics", "readout", "data"]
RUN = "/tmp/some_run"


def test_the_configs_are_the_documented_ones():
    assert EXPERIMENTS == ["stylized", "texture_biased", "tiny"]
    header = (CONFIGS / "train.yaml").read_text()
    assert all(name in header for name in EXPERIMENTS)
    ymls = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}
    assert ymls == {
        "train.yaml",
        *(f"{t}.yaml" for t in TASKS),
        *(f"experiment/{e}.yaml" for e in EXPERIMENTS),
        "datamodule/cue_conflict.yaml",
        "pairs/cue_conflict.yaml",
        "pairs/folder.yaml",
    }
    for name in ["train", *TASKS]:
        assert (CONFIGS / f"{name}.yaml").read_text().startswith(f"# shapebias-{name}"), name


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tmp_path):
    cfg = compose(CONFIGS, "train", [f"experiment={experiment}", f"run_dir={tmp_path}", "debug=fast"])
    validate_config(cfg)  # what shapebias-train checks first
    assert cfg.task_name == f"shapebias_{experiment}" and cfg.trainer.max_steps == 4
    datamodule = instantiate(cfg.datamodule)
    module = instantiate(cfg.module, _convert_="all")
    check_fits(module, datamodule)
    assert isinstance(datamodule, CueConflictDataModule) and isinstance(module, ShapeClassifier)
    assert isinstance(module.net, SmallResNet) and module.net.fc.out_features == module.num_classes == 10
    assert datamodule.num_classes == module.num_classes
    assert module.max_steps == cfg.trainer.max_steps and module.snapshot_every_n_epochs == 1
    # what sampling / evaluation draw held-out stimuli with: the training data's own settings
    assert module.data == {"image_size": datamodule.image_size, "textures": None, "background": "gray", "seed": 0}
    assert not any(Path(tmp_path).iterdir())  # nothing built or written yet
    want = {
        "stylized": ((16, 32, 64, 128), 64, "all", 1000),
        "texture_biased": ((16, 32, 64, 128), 64, "class_texture", 8000),
        "tiny": ((8, 8, 16, 16), 32, "all", 20),
    }[experiment]
    assert (module.net.widths, datamodule.image_size, cfg.datamodule.pairing, cfg.datamodule.num_contents) == want
    assert cfg.datamodule.limit == 64  # debug=fast caps both splits


def test_texture_biased_is_the_stylized_recipe_with_class_textures(tmp_path):
    base = compose(CONFIGS, "train", ["experiment=stylized", f"run_dir={tmp_path}"])
    biased = compose(CONFIGS, "train", ["experiment=texture_biased", f"run_dir={tmp_path}"])
    assert biased.datamodule.pairing == "class_texture" and base.datamodule.pairing == "all"
    assert biased.datamodule.texture_consistency == 0.9
    assert OmegaConf.to_container(biased.module, resolve=True) == OmegaConf.to_container(base.module, resolve=True)
    assert biased.trainer.max_steps == base.trainer.max_steps == 1500
    # the same number of images per epoch: 1000 contents x 8 textures against 8000 contents x 1
    dm = instantiate(biased.datamodule)
    assert dm.num_textures == 8 and biased.datamodule.num_contents == base.datamodule.num_contents * dm.num_textures


def test_default_train_config_is_the_stylized_toy(tmp_path):
    cfg = compose(CONFIGS, "train", [f"run_dir={tmp_path}"])
    assert cfg.task_name == "shapebias_stylized" and cfg.module.net.preset == "toy" and cfg.resume is None
    assert cfg.module.max_steps == cfg.trainer.max_steps  # the schedule ends where training does


@pytest.mark.parametrize("name", TASKS)
def test_task_configs_compose(name, tmp_path):
    overrides = {"data": [], "dims": ["encoder=resnet18"], "readout": ["encoder=small_resnet"]}.get(
        name, [f"checkpoint={RUN}"]
    )
    cfg = compose(CONFIGS, name, overrides)
    assert "seed" in cfg and "out_dir" in cfg
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=False)["hydra"]
    assert own == {"run": {"dir": "${out_dir}"}, "output_subdir": None, "job": {"chdir": False}}  # writes in out_dir
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves (out_dir defaults included)
    if name in ("dims", "dynamics", "readout"):
        assert cfg.pairs.folder is None and cfg.pairs.num_contents == 200  # the default pair group
        assert cfg.stages is None
    if name == "dynamics":
        assert cfg.out_dir == f"{RUN}/dynamics"
    if name == "eval":
        assert cfg.out_dir.endswith("eval") and cfg.num_samples > 0 and cfg.num_images > 0
    if name == "readout":
        assert list(cfg.tasks) == ["binary", "semantic"] and cfg.head.layers == 3
    if name == "data":
        assert cfg.method == "silhouette" and cfg.adain.vgg is None and cfg.adain.decoder is None


def test_checkpoint_is_required_where_there_is_no_other_source():
    for name in ("sample", "eval", "dynamics"):
        cfg = compose(CONFIGS, name, [])
        assert OmegaConf.is_missing(cfg, "checkpoint"), name
    for name in ("dims", "readout"):  # checkpoint or encoder: both optional in the config, one required by the task
        cfg = compose(CONFIGS, name, [])
        assert cfg.checkpoint is None and cfg.encoder is None


def test_folder_pairs_group(tmp_path):
    cfg = compose(CONFIGS, "dims", ["encoder=resnet18", "pairs=folder", f"pairs.folder={tmp_path}"])
    assert cfg.pairs == {"folder": str(tmp_path), "image_size": None}
    cfg = compose(CONFIGS, "dims", ["encoder=resnet18", "pairs=folder"])
    assert OmegaConf.is_missing(cfg.pairs, "folder")  # pairs=folder needs pairs.folder=<path>
