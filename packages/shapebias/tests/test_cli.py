"""The package end to end through its console scripts: ``shapebias-train experiment=tiny`` (per-epoch snapshots,
then resumed), and from that run ``shapebias-sample``, ``-eval``, ``-dims`` (also for encoders by name, random or
with a local weights file), ``-dynamics`` and ``-readout``; ``shapebias-data`` writes an official-naming folder that
``shapebias-dims pairs=folder`` reads back; user errors are one line from the console scripts.

The commands after training are independent of each other and run a few at a time (each spends most of its time
importing torch and Lightning)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.testing import logged_values
from shapebias.data import OPENCV_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file() or not OPENCV_DATA.is_dir(),
        reason="Fashion-MNIST and the opencv-doc sample images (make data) are needed by the default textures",
    ),
]
BIN = Path(sys.executable).parent
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
TINY = ["datamodule.num_contents=10", *QUIET]  # 10 contents x 8 textures = 10 batches of 8 an epoch
WIDTHS = {"1": 8, "2": 8, "3": 8, "4": 16, "5": 16}  # the tiny SmallResNet (8, 8, 16, 16) at its stages
FACTORS = ("shape", "texture", "residual")
PARALLEL = 3


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("GENLAB_TRACEBACK", None)
    return env


def cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=_env())


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def run_all(commands: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """{name: [script, *args]} -> {name: its finished process}, a few at a time."""
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {name: pool.submit(cli, script, *args, cwd=cwd) for name, (script, *args) in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def epochs_of(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (run_dir / "epochs").glob("epoch_*.safetensors"))


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny run for the whole file: 25 steps (two complete epochs, a third cut short), then resumed to 35."""
    cwd = tmp_path_factory.mktemp("sb")
    run_dir = cwd / "run"
    first = ok(cli("shapebias-train", "experiment=tiny", f"run_dir={run_dir}", "trainer.max_steps=25", *TINY, cwd=cwd))
    info = {"cwd": cwd, "run": run_dir, "first": first, "epochs_first": epochs_of(run_dir)}
    info["losses_first"] = len(logged_values(run_dir, "train/loss"))
    info["snapshots_first"] = {p.name: p.read_bytes() for p in (run_dir / "epochs").iterdir()}
    info["resumed"] = ok(
        cli("shapebias-train", "experiment=tiny", f"run_dir={run_dir}", "resume=auto", "trainer.max_steps=35", *TINY,
            cwd=cwd)
    )  # fmt: skip
    return info


@pytest.fixture(scope="module")
def results(trained) -> dict[str, subprocess.CompletedProcess]:
    """Every command on the trained run (and the user errors): {case: finished process}."""
    import torch
    import torchvision

    cwd, run = trained["cwd"], trained["run"]
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), cwd / "resnet18.pth")  # a user's own weights file
    out = cwd / "out"
    commands = {
        "sample": ["shapebias-sample", f"checkpoint={run}", "num_samples=5", f"out_dir={out}/sample"],
        "eval": ["shapebias-eval", f"checkpoint={run}", "num_samples=64", "num_images=40", f"out_dir={out}/eval"],
        "dims": ["shapebias-dims", f"checkpoint={run}", "num_pairs=64", f"out_dir={out}/dims"],
        "dims_small_resnet": ["shapebias-dims", "encoder=small_resnet", "num_pairs=48", "pairs.num_contents=20",
                              f"out_dir={out}/dims_small_resnet"],
        "dims_resnet18": ["shapebias-dims", "encoder=resnet18", f"weights={cwd / 'resnet18.pth'}", "image_size=64",
                          "stages=[1,5]", "num_pairs=16", "pairs.num_contents=10", f"out_dir={out}/dims_resnet18"],
        "dynamics": ["shapebias-dynamics", f"checkpoint={run}", "num_pairs=32", "stages=[1,5]",
                     f"out_dir={out}/dynamics"],
        "readout": ["shapebias-readout", f"checkpoint={run}", "steps=3", "train_contents=4", "val_contents=2",
                    "batch_size=8", f"out_dir={out}/readout"],
        "data": ["shapebias-data", "num_contents=4", "image_size=32", "preview=3", f"out_dir={out}/data"],
    }  # fmt: skip
    errors = {case: _error_args(case, trained, out) for case in CONSOLE_ERRORS}
    done = run_all({**commands, **errors}, cwd)
    if done["data"].returncode == 0:  # the written folder, read back through pairs=folder
        folder = ["shapebias-dims", f"checkpoint={run}", "pairs=folder", f"pairs.folder={out}/data",
                  f"out_dir={out}/dims_folder"]  # fmt: skip
        readout = ["shapebias-readout", f"checkpoint={run}", "pairs=folder", f"pairs.folder={out}/data", "steps=2",
                   "stages=[1]", "tasks=[semantic]", "batch_size=8", f"out_dir={out}/readout_folder"]  # fmt: skip
        done.update(run_all({"dims_folder": folder, "readout_folder": readout}, cwd))
    done["out"] = out  # type: ignore[assignment]
    return done


# ---------------------------------------------------------------------------------------------------- training


def test_train_writes_a_snapshot_per_completed_epoch_and_resumes(trained):
    run = trained["run"]
    assert trained["epochs_first"] == [0, 1, 2]  # init + 2 complete epochs of 10 batches; the 3rd was cut short
    assert (run / "epochs" / "step_000003.safetensors").is_file()  # the tiny experiment's snapshot_steps
    assert trained["losses_first"] == 25  # log_every_n_steps 1
    assert "trained 25 steps" in trained["first"]
    assert (run / "export" / "model.safetensors").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "trained 35 steps" in trained["resumed"] and "resuming from" in trained["resumed"]
    assert len(logged_values(run, "train/loss")) == 35  # continued from step 25, not restarted
    # the resumed run finished the cut-short epoch (steps 26-30): that is epoch 3, not Lightning's 4th epoch count
    assert epochs_of(run) == [0, 1, 2, 3]
    for name, data in trained["snapshots_first"].items():
        assert (run / "epochs" / name).read_bytes() == data, name  # the series is continued, not rewritten
    from safetensors import safe_open

    for epoch, step in ((1, 10), (2, 20), (3, 30)):
        with safe_open(str(run / "epochs" / f"epoch_{epoch:03d}.safetensors"), "pt") as f:
            assert f.metadata() == {"epoch": str(epoch), "global_step": str(step)}


def test_sample(results):
    out = results["out"] / "sample"
    ok(results["sample"])
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (5, 3, 32, 32) and data["images"].dtype == np.uint8
    assert data["labels"].shape == (5,) and set(data["labels"].tolist()) <= set(range(10))
    from shapebias.data import FASHION_MNIST_CLASSES

    pattern = re.compile(r"^shape: (.+) \| texture: (\w+) \| predicted: (.+)$")
    for caption, label in zip(data["captions"].tolist(), data["labels"].tolist(), strict=True):
        m = pattern.match(caption)
        assert m is not None, caption
        assert m.group(1) in FASHION_MNIST_CLASSES and m.group(3) == FASHION_MNIST_CLASSES[label]
    assert is_png(out / "grid.png")


def test_eval(results):
    out = results["out"] / "eval"
    printed = ok(results["eval"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["shape_bias"] <= 1
    for stage in WIDTHS:
        values = [metrics[f"dims/{stage}/{f}"] for f in FACTORS]
        assert all(0 <= v <= 100 for v in values) and sum(values) == pytest.approx(100, abs=0.2)
        assert all(f"'dims/{stage}/{f}'" in printed for f in FACTORS)
    assert "'accuracy'" in printed and "'shape_bias'" in printed
    assert is_png(out / "dims.png") and (out / "dims.json").is_file()


def _dims(folder: Path, widths: dict[str, int]) -> dict:
    about = json.loads((folder / "dims.json").read_text())
    result = about["stages"]
    assert list(result) == list(widths) and about["pairs"] == sum(next(iter(result.values()))["pairs"].values())
    for stage, width in widths.items():
        r = result[stage]
        assert r["dim"] == width and sum(r["dims"].values()) == width  # shape + texture + residual = the width
        assert list(r["dims"]) == list(FACTORS) and sum(r["percent"].values()) == pytest.approx(100, abs=0.2)
    rows = (folder / "dims.csv").read_text().splitlines()
    assert len(rows) == 2 * len(widths)  # the official two rows per stage: neurons, then %
    for k, stage in enumerate(widths):
        neurons, percent = rows[2 * k].split(","), rows[2 * k + 1].split(",")
        assert neurons[0] == percent[0] == stage
        assert [int(v) for v in neurons[1:]] == [result[stage]["dims"][f] for f in FACTORS]
        assert [float(v) for v in percent[1:]] == [result[stage]["percent"][f] for f in FACTORS]
    assert is_png(folder / "dims.png")
    return about


def test_dims_of_the_trained_run(results):
    ok(results["dims"])
    about = _dims(results["out"] / "dims", WIDTHS)
    assert about["pairs"] == 64 and not about["random_init"] and about["source"] == "cue_conflict"


def test_dims_of_a_random_small_resnet_by_name(results):
    ok(results["dims_small_resnet"])
    about = _dims(results["out"] / "dims_small_resnet", {"1": 16, "2": 16, "3": 32, "4": 64, "5": 128})  # toy preset
    assert about["random_init"] and about["network"] == "small_resnet"


def test_dims_of_resnet18_with_a_local_weights_file(results):
    printed = ok(results["dims_resnet18"])
    about = _dims(results["out"] / "dims_resnet18", {"1": 64, "5": 512})
    assert about["pairs"] == 16 and not about["random_init"] and about["weights"].endswith("resnet18.pth")
    assert about["image_size"] == 64 and about["preprocess"] == "imagenet"
    assert "resnet18" in printed


def test_dynamics_estimates_every_snapshot(results):
    out = results["out"] / "dynamics"
    ok(results["dynamics"])
    result = json.loads((out / "dynamics.json").read_text())
    # init, step 3 (the tiny experiment's snapshot_steps: 0.3 of an epoch), each completed epoch, and where each
    # of the two fits ended mid-epoch (steps 25 and 35: the trained weights)
    assert result["epochs"] == [0, 0.3, 1, 2, 2.5, 3, 3.5] and result["stages"] == ["1", "5"]
    assert sorted(result["per_epoch"], key=float) == ["0", "0.3", "1", "2", "2.5", "3", "3.5"]
    for stage in ("1", "5"):
        reached = result["shape_gain_reached"][stage]
        assert len(reached["fraction"]) == 7 and reached["fraction"][-1] in (None, 1.0)
    for per_stage in result["per_epoch"].values():
        assert list(per_stage) == ["1", "5"]
        assert [per_stage[s]["dim"] for s in ("1", "5")] == [WIDTHS["1"], WIDTHS["5"]]
    assert is_png(out / "dynamics.png")


def test_readout_on_a_stylised_folder_holds_out_contents(results):
    ok(results["readout_folder"])
    result = json.loads((results["out"] / "readout_folder" / "readout.json").read_text())
    details = result["details"]["semantic"]["1"]
    assert result["stages"] == ["1"] and 0.0 <= result["miou"]["semantic"]["1"] <= 1.0
    assert details["pixels"] == 32 * 32 * 8  # the held-out content (1 of the folder's 4) under its 8 textures


def test_readout(results):
    out = results["out"] / "readout"
    ok(results["readout"])
    result = json.loads((out / "readout.json").read_text())
    assert result["stages"] == list(WIDTHS) and set(result["miou"]) == {"binary", "semantic"}
    for task, per_stage in result["miou"].items():
        assert list(per_stage) == list(WIDTHS), task
        assert all(0 <= v <= 1 for v in per_stage.values()), per_stage
    assert is_png(out / "readout.png")


def test_data_writes_the_official_naming_and_dims_reads_it_back(results):
    folder = results["out"] / "data"
    ok(results["data"])
    images = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".png" and p.stem != "preview")
    assert len(images) == 4 * 8  # every content under every texture
    assert all(re.fullmatch(r"[0-7]_(10|[1-9])_\d{6}\.png", n) for n in images), images
    assert len(list((folder / "masks").glob("*.png"))) == 4
    index = json.loads((folder / "index.json").read_text())
    assert index["num_items"] == 32 and index["num_contents"] == 4 and len(index["texture_names"]) == 8
    assert is_png(folder / "preview.png")
    from shapebias.data import StylizedFolder

    back = StylizedFolder(folder, image_size=32)
    assert len(back) == 32 and back.num_textures == 8 and back.num_classes == 10
    # the folder as pairs: one pass, every written image as example 1
    ok(results["dims_folder"])
    about = _dims(results["out"] / "dims_folder", WIDTHS)
    assert about["pairs"] == 32 and about["source"] == str(folder)


# ---------------------------------------------------------------------------------------------------- user errors

ERRORS = {
    "unknown_stage": (
        ["shapebias-dims", "checkpoint={run}", "stages=[7]"],
        "stage '7' is not a stage of SmallResNet; its stages: 1, 2, 3, 4, 5",
    ),
    "both_sources": (["shapebias-dims", "checkpoint={run}", "encoder=resnet18"], "give exactly one of checkpoint="),
    "no_source": (["shapebias-dims"], "got checkpoint=None, encoder=None"),
    "unknown_encoder": (["shapebias-dims", "encoder=resnet81"], "unknown encoder 'resnet81'; did you mean resnet18"),
    "missing_weights": (
        ["shapebias-dims", "encoder=resnet18", "weights={cwd}/nope.pth"],
        "nope.pth does not exist",
    ),
    "no_snapshots": (["shapebias-dynamics", "checkpoint={run}/export"], "no per-epoch snapshots"),
    "unknown_task": (
        ["shapebias-readout", "checkpoint={run}", "tasks=[depth]"],
        "unknown readout task 'depth'; known: binary, semantic",
    ),
    "zero_pairs": (["shapebias-dims", "checkpoint={run}", "num_pairs=0"], "num_pairs: expected an integer >= 1, got 0"),
    "adain_without_weights": (
        ["shapebias-data", "method=adain", "num_contents=2"],
        "method=adain needs adain.vgg=<vgg_normalised.pth> adain.decoder=<decoder.pth>",
    ),
    "unknown_method": (["shapebias-data", "method=foo", "num_contents=2"], "unknown method 'foo'"),
    "folder_not_given": (["shapebias-dims", "checkpoint={run}", "pairs=folder"], "pairs.folder: required with pairs="),
    "foreign_checkpoint": (["shapebias-dims", "checkpoint=pkg://net2net/checkpoints/cinn_union"], "Net2NetFlow"),
    "missing_folder": (
        ["shapebias-dims", "checkpoint={run}", "pairs=folder", "pairs.folder={cwd}/nofolder"],
        "nofolder is not a folder",
    ),
}
#: run as console scripts (one per script); the others go through the same entry point's job in this process (each
#: console script spends ~7 s importing torch and Lightning before it can fail)
CONSOLE_ERRORS = ("unknown_stage", "no_snapshots", "unknown_task", "adain_without_weights")


def _error_args(case: str, trained: dict, out: Path) -> list[str]:
    script, *args = ERRORS[case][0]
    args = [a.replace("{run}", str(trained["run"])).replace("{cwd}", str(trained["cwd"])) for a in args]
    return [script, *args, f"out_dir={out}/{case}"]


def _check_one_line(code: int, stderr: str, case: str) -> None:
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if ": error:" in line]
    assert len(lines) == 1, stderr[-3000:]
    message = stderr[stderr.index(lines[0]) :]  # the error line, and gencore's hint under it
    assert len(message.splitlines()) <= 4 and ERRORS[case][1] in message, stderr[-3000:]


@pytest.mark.parametrize("case", CONSOLE_ERRORS)
def test_user_errors_are_one_line_from_the_console_scripts(results, case):
    proc = results[case]
    _check_one_line(proc.returncode, proc.stderr, case)
    assert not (results["out"] / case).exists()  # nothing written, not even Hydra's log


@pytest.mark.parametrize("case", [c for c in ERRORS if c not in CONSOLE_ERRORS])
def test_user_errors_are_one_line(trained, case, tmp_path, capsys, monkeypatch):
    from gencore.cli import TRACEBACK_ENV, compose
    from shapebias import cli as sbcli

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    script, *args = _error_args(case, trained, tmp_path)
    name = script.removeprefix("shapebias-")
    cfg = compose(sbcli.CONFIGS, name, args)
    with pytest.raises(SystemExit) as exit_info:
        getattr(sbcli, name).job(cfg)
    _check_one_line(exit_info.value.code, capsys.readouterr().err, case)
    assert not (tmp_path / case).exists()
