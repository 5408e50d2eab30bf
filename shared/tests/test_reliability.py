"""Nothing is lost: a failed resume writes no crash checkpoint, resume=auto takes the highest step, stray temporaries
go, non-finite weights stop the run before a checkpoint or an export holds them, two runs cannot share a folder, and
bad config values are refused before anything is built, naming the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gencore import io, run
from gencore.cli import compose
from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.guards import NonFiniteError, RunLock, RunLockedError, check_finite
from gencore.validate import ConfigError, validate_config

TEST_CONFIGS = Path(__file__).parent / "configs"
needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing (make data)"
)


def tiny_cfg(tmp_path, *overrides):
    return compose(TEST_CONFIGS, "tiny_train", [f"run_dir={tmp_path}", "~callbacks.images", *overrides])


def ckpt_steps(folder: Path) -> dict[str, int]:
    return {p.name: run.checkpoint_step(p) for p in sorted(folder.glob("*.ckpt"))}


# ---------------------------------------------------------------------------------------------- resuming


@needs_fmnist
def test_a_failed_resume_keeps_the_run(tmp_path):
    run.train(tiny_cfg(tmp_path, "trainer.max_steps=12"))
    before = ckpt_steps(tmp_path / "checkpoints")
    assert before == {"last.ckpt": 12, "step0000005.ckpt": 5, "step0000010.ckpt": 10}
    with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
        run.train(tiny_cfg(tmp_path, "resume=auto", "datamodule.root=/nowhere", "trainer.max_steps=20"))
    assert ckpt_steps(tmp_path / "checkpoints") == before  # no step-0 crash checkpoint shadows the run
    res = run.train(tiny_cfg(tmp_path, "resume=auto", "trainer.max_steps=15"))
    assert res.trainer.global_step == 15 and ckpt_steps(tmp_path / "checkpoints")["last.ckpt"] == 15


def test_resume_auto_takes_the_highest_complete_step(tmp_path):
    folder = tmp_path / "checkpoints"
    cio = run.SafeCheckpointIO()
    for name, step in (("last.ckpt", 20), ("step0000030.ckpt", 30), ("on_exception.ckpt", 30)):
        cio.save_checkpoint({"state_dict": {}, "global_step": step}, folder / name)
    assert run.find_resume_checkpoint("auto", tmp_path) == folder / "step0000030.ckpt"  # a tie: the regular one
    (folder / "step0000040.ckpt").write_bytes(b"truncated by a kill")  # unreadable, no sidecar: not a resume point
    assert run.find_resume_checkpoint("auto", tmp_path) == folder / "step0000030.ckpt"
    torch.save({"state_dict": {}, "global_step": 50}, folder / "old_style.ckpt")  # no sidecar: read for its step
    assert run.find_resume_checkpoint("auto", tmp_path) == folder / "old_style.ckpt"
    assert run.find_resume_checkpoint(tmp_path, tmp_path / "other") == folder / "old_style.ckpt"  # a run folder
    (folder / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert run.remove_stray_temporaries(folder) == 1 and not list(folder.glob(".*.tmp"))


@needs_fmnist
def test_a_crash_after_the_start_writes_a_resumable_checkpoint(tmp_path):
    crash = ["+callbacks.boom._target_=gencore.testing.FailAtStep", "+callbacks.boom.step=7", "trainer.max_steps=30"]
    with pytest.raises(RuntimeError, match="simulated crash at step 7"):
        run.train(tiny_cfg(tmp_path, *crash))
    assert ckpt_steps(tmp_path / "checkpoints")["on_exception.ckpt"] == 7
    assert run.find_resume_checkpoint("auto", tmp_path).name == "on_exception.ckpt"  # step 7 > step 5
    assert run.train(tiny_cfg(tmp_path, "resume=auto", "trainer.max_steps=9")).trainer.global_step == 9


# ------------------------------------------------------------------------------------------ non-finite weights


@needs_fmnist
def test_non_finite_weights_stop_the_run_and_keep_the_last_finite_checkpoint(tmp_path):
    poison = ["+callbacks.poison._target_=gencore.testing.PoisonAtStep", "+callbacks.poison.step=7"]
    guard = [
        "+callbacks.finite_guard._target_=gencore.guards.FiniteGuard",
        "+callbacks.finite_guard.check_every_n_steps=3",
    ]
    with pytest.raises(NonFiniteError, match="at step 7"):
        run.train(tiny_cfg(tmp_path, *poison, *guard, "trainer.max_steps=30"))
    steps = ckpt_steps(tmp_path / "checkpoints")
    assert steps == {"last.ckpt": 5, "step0000005.ckpt": 5}  # no crash checkpoint, nothing of the NaN weights
    assert not check_finite(io.extract_state_dict(io.load_checkpoint(tmp_path / "checkpoints" / "step0000005.ckpt")))
    assert not (tmp_path / "export").exists()


@needs_fmnist
def test_the_default_guard_stops_a_diverging_run(tmp_path):
    # a learning rate of 1e6 (the reproduction): NaN from the first steps; caught at the first check
    with pytest.raises(NonFiniteError, match="stopped being finite"):
        run.train(tiny_cfg(tmp_path, "module.lr=1e6", "trainer.max_steps=60", "checkpoint.every_n_train_steps=100"))
    assert not (tmp_path / "export").exists() and not list((tmp_path / "checkpoints").glob("*.ckpt"))


@needs_fmnist
def test_skip_bad_steps_drops_only_the_bad_updates(tmp_path):
    poison = ["+callbacks.poison._target_=gencore.testing.PoisonAtStep", "+callbacks.poison.step=4"]
    poison += ["+callbacks.poison.what=grads"]
    guard = [
        "+callbacks.finite_guard._target_=gencore.guards.FiniteGuard",
        "+callbacks.finite_guard.skip_bad_steps=true",
    ]
    res = run.train(tiny_cfg(tmp_path, *poison, *guard, "trainer.max_steps=10"))
    g = next(c for c in res.trainer.callbacks if type(c).__name__ == "FiniteGuard")
    assert g.skipped == 1 and not check_finite(res.module)
    assert (tmp_path / "export" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ run lock


def test_run_lock_refuses_a_second_owner_and_takes_over_a_dead_ones(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "x"}))
    with RunLock(tmp_path) as lock:  # the owner is gone: a killed run's lock is taken over
        assert lock.held and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


@needs_fmnist
def test_two_runs_in_one_folder(tmp_path):
    with RunLock(tmp_path):  # as if another run were training there
        with pytest.raises(RunLockedError, match="is in use"):
            run.train(tiny_cfg(tmp_path))
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ config values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("module.lr=fast", r"module\.lr: expected a number, got 'fast'"),
        ("trainer.max_steps=ten", r"trainer\.max_steps: expected an integer, got 'ten'"),
        ("trainer.max_steps=0", r"trainer\.max_steps: 0 trains nothing"),
        ("+module.widht=8", r"module\.widht: .* has no argument 'widht' \(did you mean width\?\)"),
        ("datamodule.batch_size=many", r"datamodule\.batch_size: expected an integer"),
        ("checkpoint.every_n_train_steps=0", r"checkpoint\.every_n_train_steps: expected an integer >= 1"),
        ("+trainer.max_stpes=3", r"trainer\.max_stpes: .* \(did you mean max_steps\?\)"),
    ],
)
def test_bad_values_are_named_before_anything_is_built(tmp_path, override, message):
    cfg = tiny_cfg(tmp_path, override)
    with pytest.raises(ConfigError, match=message):
        run.train(cfg)
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / ".lock").exists()


def test_every_problem_at_once():
    cfg = compose(TEST_CONFIGS, "tiny_train", ["run_dir=/tmp/unused", "module.lr=fast", "trainer.max_steps=0"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert "module.lr" in str(err.value) and "trainer.max_steps" in str(err.value)
    validate_config(compose(TEST_CONFIGS, "tiny_train", ["run_dir=/tmp/unused"]))  # the shipped config is fine


def test_a_shared_run_folder_cannot_run_code_through_its_config(tmp_path):
    victim = tmp_path / "written_by_the_config.txt"
    (tmp_path / "checkpoints").mkdir()
    torch.save({"state_dict": {}, "global_step": 1}, tmp_path / "checkpoints" / "last.ckpt")
    (tmp_path / "config.yaml").write_text(f"module:\n  _target_: builtins.open\n  file: {victim}\n  mode: w\n")
    with pytest.raises(io.UnsafeConfigError, match="builtins.open"):
        run.load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert not victim.exists()


def test_console_scripts_report_user_errors_in_one_line(tmp_path):
    exe = Path(sys.executable).parent / "gencore-train-fmnist-features"
    proc = subprocess.run(
        [str(exe), f"run_dir={tmp_path}", "trainer.max_steps=ten"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1
    assert (
        "error: invalid config:" in proc.stderr and "  trainer.max_steps: expected an integer, got 'ten'" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
    env = {**os.environ, "GENLAB_TRACEBACK": "1"}
    proc = subprocess.run(
        [str(exe), f"run_dir={tmp_path}", "trainer.max_steps=ten"], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 1 and "ConfigError" in proc.stderr
