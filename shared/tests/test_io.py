import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn

from gencore import io
from gencore.testing import TinyAutoencoderModule, fake_classes


def save_lightning1(path, state_dict, legacy=False):
    """Write a checkpoint shaped like the released CompVis / Stability .ckpt files (Lightning 1.x pickles)."""
    spec = {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": object,
        "pytorch_lightning.utilities.parsing.AttributeDict": dict,
    }
    with fake_classes(spec) as cls:
        hparams = cls["pytorch_lightning.utilities.parsing.AttributeDict"]()
        hparams.update({"ddconfig": {"ch": 128, "ch_mult": [1, 1, 2]}, "lossconfig": {"target": "x"}})
        ckpt = {
            "epoch": 5,
            "global_step": np.int64(1000),
            "pytorch-lightning_version": "1.4.2",
            "state_dict": OrderedDict(state_dict),
            "callbacks": {
                cls["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]: {
                    "best_model_score": torch.tensor(0.5),
                    "monitor": "val/rec_loss",
                }
            },
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9)}]}],
            "hparams_name": "kwargs",
            "hyper_parameters": hparams,
            "omegaconf": OmegaConf.create({"model": {"base_learning_rate": 4.5e-6}}),
            "np_scalar": np.float64(0.25),
        }
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("legacy", [False, True])
def test_lightning1_checkpoint_loads_without_executing_anything(tmp_path, legacy):
    sd = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3), "quantize.embedding.weight": torch.randn(8, 4)}
    path = tmp_path / "last.ckpt"
    save_lightning1(path, sd, legacy=legacy)
    with pytest.raises(pickle.UnpicklingError):  # what users hit with torch >= 2.6
        torch.load(path, weights_only=True)
    ckpt = io.load_checkpoint(path)
    state = io.extract_state_dict(ckpt)
    assert set(state) == set(sd)
    for k in sd:
        assert torch.equal(state[k], sd[k])
    assert ckpt["epoch"] == 5 and int(ckpt["global_step"]) == 1000 and float(ckpt["np_scalar"]) == 0.25
    ((key, value),) = ckpt["callbacks"].items()
    assert issubclass(key, io.OpaqueObject) and key.qualname.endswith("ModelCheckpoint")
    assert float(value["best_model_score"]) == 0.5
    hp = ckpt["hyper_parameters"]
    assert isinstance(hp, io.OpaqueObject) and hp["ddconfig"]["ch"] == 128
    assert isinstance(ckpt["omegaconf"], io.OpaqueObject)  # OmegaConf objects are placeholders, not imported


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalEvil:
    def __reduce__(self):
        return eval, ("__import__('os').system('true')",)


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_pickles_that_run_code_are_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _Evil(marker) if payload == "system" else _EvalEvil()
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": evil}, path)
    with pytest.raises(io.UnsafeCheckpointError, match="refusing to unpickle global .*(system|eval)") as err:
        io.load_checkpoint(path)
    assert "Nothing was executed" in str(err.value)
    assert not marker.exists()


def test_model_classes_are_refused_too(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)  # a pickled module would run its class code: refuse, name it
    with pytest.raises(io.UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        io.load_checkpoint(path)


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        io.load_checkpoint(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(io.CheckpointError, match="bad.ckpt"):
        io.load_checkpoint(bad)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 5)
    with pytest.raises(io.CheckpointError, match="safetensors"):
        io.load_checkpoint(bad_st)


def test_load_state_dict_names_missing_unexpected_and_mismatched():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {
        "model.0.weight": torch.zeros(4, 3),
        "model.0.bias": torch.zeros(4),
        "model.1.weight": torch.zeros(2, 5),
        "model.extra": torch.zeros(1),
        "loss.discriminator.w": torch.zeros(1),
        "other.x": torch.zeros(1),
    }
    with pytest.raises(io.CheckpointKeyError) as err:
        io.load_state_dict(m, state, prefix="model.")
    e = err.value
    assert e.missing == ["1.bias"] and e.unexpected == ["extra"]
    assert e.mismatched == ["1.weight: checkpoint (2, 5) vs module (2, 4)"]
    assert "1 missing key(s): 1.bias" in str(e) and "1 unexpected key(s): extra" in str(e)
    # non-strict loads what fits and reports the rest
    missing, unexpected = io.load_state_dict(m, state, prefix="model.", strict=False)
    assert missing == ["1.bias"] and unexpected == ["extra"]
    assert torch.all(m[0].weight == 0)
    with pytest.raises(io.CheckpointKeyError, match="no keys start with prefix 'ema.'"):
        io.load_state_dict(m, state, prefix="ema.")


def test_load_state_dict_prefix_ignore_and_key_map():
    m = nn.Linear(2, 2)
    state = {
        "first_stage_model.w": torch.ones(2, 2),
        "first_stage_model.b": torch.ones(2),
        "first_stage_model.loss.logvar": torch.zeros(()),
    }
    io.load_state_dict(
        m, state, prefix="first_stage_model.", ignore_prefixes=("loss.",), key_map={"w": "weight", "b": "bias"}
    )
    assert torch.all(m.weight == 1) and torch.all(m.bias == 1)
    io.load_state_dict(
        m,
        {"W": torch.zeros(2, 2), "B": torch.zeros(2), "drop": torch.zeros(1)},
        key_map=lambda k: None if k == "drop" else {"W": "weight", "B": "bias"}[k],
    )
    assert torch.all(m.weight == 0)


def test_atomic_path_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "w.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half-writt")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]
    with io.atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    umask = os.umask(0o022)
    try:
        with io.atomic_path(tmp_path / "perm.bin") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "perm.bin").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_save_safetensors_handles_shared_storage(tmp_path):
    w = torch.randn(4, 4)
    path = io.save_safetensors({"a": w, "b": w, "c": w[:2]}, tmp_path / "tied.safetensors")
    out = load_file(str(path))
    assert torch.equal(out["a"], w) and torch.equal(out["b"], w) and torch.equal(out["c"], w[:2])


def test_export_and_load_round_trip_without_frozen_weights(tmp_path):
    cfg = {"module": {"_target_": "gencore.testing.TinyAutoencoderModule", "width": 8, "latent_channels": 2}}
    module = TinyAutoencoderModule(width=8, latent_channels=2)
    with torch.no_grad():
        module.codec.gain.fill_(1.0)
    x = torch.randn(2, 1, 32, 32)
    out_dir = io.export(module, cfg, tmp_path / "export")
    saved = load_file(str(out_dir / io.WEIGHTS_NAME))
    assert "codec.gain" not in saved and "encoder.0.weight" in saved  # frozen codec left out
    loaded = io.load(out_dir)
    assert not loaded.training
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))
    assert OmegaConf.load(out_dir / io.CONFIG_NAME).module.width == 8


def test_export_validates_and_load_names_missing_files(tmp_path):
    with pytest.raises(ValueError, match="_target_"):
        io.export(nn.Linear(2, 2), {"foo": 1}, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        io.load(tmp_path)
    d = io.export(nn.Linear(2, 2), {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}, tmp_path / "y")
    with pytest.raises(io.CheckpointKeyError, match="shape mismatch"):
        io.load(d, allow=("torch.nn.Linear",))  # config says 2->3, weights are 2->2


def test_read_state_dict_from_a_path_or_a_mapping(tmp_path):
    from gencore.io import read_state_dict, save_safetensors

    weights = {"a.weight": torch.ones(2, 3)}
    path = tmp_path / "w.safetensors"
    save_safetensors(weights, path)
    state, source = read_state_dict(path)
    assert source == str(path) and torch.equal(state["a.weight"], weights["a.weight"])
    state, source = read_state_dict({"state_dict": weights, "global_step": 3})
    assert source == "state dict" and list(state) == ["a.weight"]
    with pytest.raises(ValueError, match="path_or_state must be a path or a mapping"):
        read_state_dict(42)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "missing.ckpt")


# ------------------------------------------------------------------------------------ config targets (issue 10)

REPO = Path(__file__).resolve().parents[2]
LEGACY = REPO / "tests" / "fixtures" / "legacy_v0"
BUILT: list[str] = []


class Recorder:
    """A harmless target allowed with ``allow=(__name__,)``: it records that something was instantiated."""

    def __init__(self, **kwargs):
        BUILT.append(sorted(kwargs))


def write_export(folder, module_node, **top):
    """An export folder as someone could share it: any config.yaml beside a (tiny) weights file."""
    folder.mkdir(parents=True)
    io.save_safetensors({"w": torch.zeros(1)}, folder / io.WEIGHTS_NAME)
    (folder / io.CONFIG_NAME).write_text(OmegaConf.to_yaml(OmegaConf.create({**top, "module": module_node})))
    return folder


def test_builtins_open_in_an_export_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(io.ALLOWED_TARGETS_ENV, raising=False)
    created, emptied = tmp_path / "created.txt", tmp_path / "precious.txt"
    emptied.write_text("keep me")
    for victim in (created, emptied):
        d = write_export(tmp_path / victim.stem, {"_target_": "builtins.open", "_args_": [str(victim), "w"]})
        with pytest.raises(io.UnsafeConfigError, match=r"'builtins.open' \(module._target_\)") as err:
            io.load(d)
        assert err.value.target == "builtins.open" and err.value.key == "module._target_"
        assert str(d / io.CONFIG_NAME) in str(err.value) and "Nothing was instantiated" in str(err.value)
        assert isinstance(err.value, io.CheckpointError) and isinstance(err.value, ValueError)
    assert not created.exists() and emptied.read_text() == "keep me"


def _payloads(marker):
    touch = ["touch", str(marker)]
    tiny = {"_target_": "gencore.testing.TinyAutoencoderModule", "width": 8}
    return {
        "os.system": ({"_target_": "os.system", "command": " ".join(touch)}, "module._target_", "outside"),
        "subprocess.run": ({"_target_": "subprocess.run", "_args_": [touch]}, "module._target_", "outside"),
        # a genlab module name is not enough: the object must be defined in genlab
        "genlab-module-reexport": (
            {"_target_": "gencore.io.os.system", "_args_": [" ".join(touch)]},
            "module._target_",
            "resolves to posix.system, defined outside gencore",
        ),
        "genlab-class-inherited": (
            {"_target_": "gencore.testing.TinyAutoencoderModule.load_from_checkpoint", "_args_": [str(marker)]},
            "module._target_",
            "defined outside gencore",
        ),
        "nested": (
            {**tiny, "first_stage": {"_target_": "pathlib.Path.touch", "self": str(marker)}},
            "module.first_stage._target_",
            "outside",
        ),
        "args-trick": (
            {**tiny, "_args_": [{"_target_": "builtins.open", "_args_": [str(marker), "w"]}]},
            "module._args_[0]._target_",
            "outside",
        ),
        "partial": (
            {**tiny, "loss": {"_target_": "builtins.open", "_partial_": True, "file": str(marker), "mode": "w"}},
            "module.loss._target_",
            "outside",
        ),
        "deep-list": (
            {**tiny, "blocks": [{"x": [1, {"_target_": "shutil.copy", "_args_": ["/etc/hostname", str(marker)]}]}]},
            "module.blocks[0].x[1]._target_",
            "outside",
        ),
        "interpolated": (
            {**tiny, "codec": "${oc.decode:'{_target_: builtins.open, file: " + str(marker) + ", mode: w}'}"},
            "module.codec._target_",
            "outside",
        ),
        "escaped-interpolation": ({**tiny, "codec": "\\${oc.env:HOME}"}, "module.codec", "interpolation is left"),
        "genlab-file-writer": (
            {"_target_": "gencore.io.save_safetensors", "tensors": {}, "path": str(marker)},
            "module._target_",
            "genlab entry point / file writer",
        ),
        "genlab-entry-point": ({"_target_": "gencore.run.train", "cfg": {}}, "module._target_", "entry point"),
        "not-a-name": ({"_target_": "os.system; touch x"}, "module._target_", "not a valid dotted name"),
        "not-a-string": ({"_target_": ["builtins.open"]}, "module._target_", "must be a dotted name"),
        "dunder": ({"_target_": "gencore.testing.__builtins__.open"}, "module._target_", "dunder"),
        "not-callable": ({"_target_": "gencore.text"}, "module._target_", "not a class or function"),
    }


@pytest.mark.parametrize("case", list(_payloads(Path("x"))))
def test_unsafe_targets_anywhere_in_the_module_node_are_refused(tmp_path, monkeypatch, case):
    monkeypatch.delenv(io.ALLOWED_TARGETS_ENV, raising=False)
    marker = tmp_path / "pwned"
    node, key, reason = _payloads(marker)[case]
    d = write_export(tmp_path / "export", node)
    with pytest.raises(io.UnsafeConfigError, match=re.escape(reason)) as err:
        io.load(d)
    assert err.value.key == key
    assert f"({key})" in str(err.value) or f"refusing {key} = " in str(err.value)
    assert not marker.exists()


def test_the_whole_node_is_checked_before_anything_is_built(tmp_path):
    BUILT.clear()
    node = {
        "_target_": f"{__name__}.Recorder",
        "first": {"_target_": f"{__name__}.Recorder", "a": 1},
        "second": {"_target_": "builtins.open", "_args_": [str(tmp_path / "pwned"), "w"]},
    }
    d = write_export(tmp_path / "export", node)
    with pytest.raises(io.UnsafeConfigError, match="module.second._target_"):
        io.load(d, allow=(__name__,))
    assert BUILT == [] and not (tmp_path / "pwned").exists()
    with pytest.raises(io.UnsafeConfigError, match=re.escape(f"'{__name__}.Recorder'")):
        io.check_targets(OmegaConf.create(node))  # not trusted without allow=
    node["second"] = {"_target_": f"{__name__}.Recorder"}
    checked = io.check_targets(OmegaConf.create(node), allow=(f"{__name__}.",))
    assert checked == node and BUILT == []  # checking builds nothing


def test_normal_exports_and_targets_through_interpolations_load(tmp_path, monkeypatch):
    monkeypatch.setenv("TINY_TARGET", "gencore.testing.TinyAutoencoderModule")
    module = TinyAutoencoderModule(width=8, latent_channels=2)
    cfg = {"width": 8, "module": {"_target_": "${oc.env:TINY_TARGET}", "width": "${width}", "latent_channels": 2}}
    d = io.export(module, cfg, tmp_path / "export")
    loaded = io.load(d)
    assert isinstance(loaded, TinyAutoencoderModule) and not loaded.training
    monkeypatch.setenv("TINY_TARGET", "builtins.open")  # the check sees what the interpolation gives
    write_export(tmp_path / "evil", {"_target_": "${oc.env:TINY_TARGET}", "_args_": [str(tmp_path / "p"), "w"]})
    with pytest.raises(io.UnsafeConfigError, match="'builtins.open'"):
        io.load(tmp_path / "evil")
    assert not (tmp_path / "p").exists()


def test_the_allow_list_is_extended_by_argument_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(io.ALLOWED_TARGETS_ENV, raising=False)
    d = io.export(nn.Linear(2, 3), {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}, tmp_path / "e")
    with pytest.raises(io.UnsafeConfigError, match=r"'torch.nn.Linear'.*outside the allow-list.*GENLAB_ALLOWED"):
        io.load(d)
    for allow in [("torch.nn.Linear",), ("torch.nn.",), ("torch.nn",), "torch"]:
        assert isinstance(io.load(d, allow=allow), nn.Linear)
    with pytest.raises(io.UnsafeConfigError, match="outside the allow-list"):
        io.load(d, allow=("torch.nn.Lin",))  # entries are dotted names, not string prefixes
    monkeypatch.setenv(io.ALLOWED_TARGETS_ENV, "mypkg., torch.nn. ,")
    assert isinstance(io.load(d), nn.Linear)
    assert io.allowed_targets(("extra.",))[-3:] == ("extra", "mypkg", "torch.nn")
    assert io.allowed_targets()[: len(io.GENLAB_NAMESPACES)] == io.GENLAB_NAMESPACES
    # an allowed prefix is still bound to where the object is defined
    write_export(tmp_path / "f", {"_target_": "torch.nn.modules.module.torch.save", "_args_": [{}, "x"]})
    with pytest.raises(io.UnsafeConfigError, match="defined outside torch.nn"):
        io.load(tmp_path / "f")
    with pytest.raises(ValueError, match="entries must be strings"):
        io.allowed_targets((3,))


def _legacy_module_node(folder):
    text = (folder / io.CONFIG_NAME).read_text().replace("@FIRST_STAGE@", "first-stage-placeholder")
    return OmegaConf.create(text).module


@pytest.mark.parametrize("name", sorted(p.parent.name for p in LEGACY.glob("*/config.yaml")))
def test_legacy_exports_pass_the_check(name, monkeypatch):
    monkeypatch.delenv(io.ALLOWED_TARGETS_ENV, raising=False)
    checked = io.check_targets(_legacy_module_node(LEGACY / name), source=name)
    assert checked["_target_"].split(".")[0] in io.GENLAB_NAMESPACES


def test_every_target_of_our_configs_is_allowed_or_outside_module_nodes(monkeypatch):
    """The allow-list is exactly what our configs need: every ``_target_`` in the packages' and gencore's YAML passes,
    except the Lightning loggers / strategies and FSDP's ``builtins.set`` of the trainer / logger nodes."""
    monkeypatch.delenv(io.ALLOWED_TARGETS_ENV, raising=False)
    files = [*REPO.glob("packages/*/src/*/configs/**/*.yaml"), *REPO.glob("shared/src/gencore/configs/**/*.yaml")]
    targets = set()
    for f in files:
        for line in f.read_text().splitlines():
            targets.update(re.findall(r"_target_:\s*([^\s,}]+)", line.split("#", 1)[0]))
    assert len(files) > 10 and "ldm.lit.LatentDiffusion" in targets
    outside = set()
    for t in sorted(targets):
        try:
            io.check_targets({"_target_": t}, source="configs")
        except io.UnsafeConfigError:
            outside.add(t)
    assert all(t.startswith(("lightning.pytorch.loggers.", "lightning.pytorch.strategies.")) for t in outside), outside


def test_package_paths_resolve_to_files_inside_installed_packages(tmp_path):
    from gencore.io import resolve_path

    weights = resolve_path("pkg://gencore/metrics/weights/fmnist_net.safetensors")
    assert weights.is_file() and weights.name == "fmnist_net.safetensors"
    assert resolve_path(tmp_path) == tmp_path and resolve_path("runs/x") == Path("runs/x")
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg' is not installed"):
        resolve_path("pkg://no_such_pkg/checkpoints/x")
    with pytest.raises(FileNotFoundError, match="is the checkpoint shipped with gencore"):
        resolve_path("pkg://gencore/checkpoints/none")
    from omegaconf import OmegaConf

    import gencore.cli  # noqa: F401  (registers the eval_dir resolver of the eval configs)

    out = OmegaConf.create(
        {"checkpoint": "pkg://ladd_turbo/checkpoints/fmnist_turbo", "o": "${eval_dir:${checkpoint}}"}
    )
    assert out.o == "runs/eval/ladd_turbo-fmnist_turbo"  # not a folder named "pkg:", not inside the package
    out.checkpoint = "runs/x/"
    assert out.o == "runs/x/eval"


def test_ship_halves_the_weights_rewrites_paths_and_still_loads(tmp_path):
    from gencore.io import export, load, ship
    from gencore.testing import TinyAutoencoderModule

    torch.manual_seed(0)
    module = TinyAutoencoderModule(width=256)
    cfg = {"module": {"_target_": "gencore.testing.TinyAutoencoderModule", "width": 256}, "first_stage": "runs/ae"}
    src = export(module, cfg, tmp_path / "run" / "export")
    out = ship(tmp_path / "run", tmp_path / "shipped", paths={"runs/ae": "pkg://ldm/checkpoints/ae"}, made_by="made")
    assert (out / "MADE_BY.md").read_text() == "made\n"
    assert "pkg://ldm/checkpoints/ae" in (out / "config.yaml").read_text()
    size = lambda folder: (folder / "model.safetensors").stat().st_size
    assert size(out) < 0.6 * size(src)
    state = io.load_checkpoint(out / "model.safetensors")
    assert state["decoder.0.weight"].dtype == torch.float16 and state["decoder.2.bias"].dtype == torch.float32
    shipped = load(out)
    assert shipped.decoder[0].weight.dtype == torch.float32  # cast back on load
    torch.testing.assert_close(shipped.decoder[0].weight, module.decoder[0].weight, atol=1e-3, rtol=1e-3)
    with pytest.raises(FileNotFoundError, match="expected an export folder"):
        ship(tmp_path / "nothing", tmp_path / "x")
