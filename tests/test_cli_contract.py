"""The command-line contract every genlab package keeps (README "Running a package"), run over every installed
package that has a ``<name>-train`` console script, so a new package is held to it by being installed:

- ``<name>-train debug=fast`` runs with no other argument: a first stage the default recipe needs is trained first
  (and announced); the run folder is printed at the start and at the end, with the command to sample from it;
- ``<name>-sample checkpoint=<run> num_samples=N`` writes N samples; ``<name>-eval checkpoint=<run>`` prints the
  metrics it writes;
- ``--help`` lists the task's keys, the stages and the config groups; it, misspelled options, a missing checkpoint
  and a bad count answer without importing torch;
- user errors are one short message and exit 1, no traceback: a misspelled option (with a suggestion), ``+`` adding
  a misspelled key, a missing checkpoint, ``num_samples=-1``, ``trainer=gpu`` without a GPU, sampling a first stage.

The commands run as a user runs them: the console scripts, in a fresh working directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from gencore.cli import compose
from gencore.data.fashion_mnist import DEFAULT_ROOT

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VERBS = ("train", "sample", "eval")


def _genlab_scripts() -> dict[str, dict[str, str]]:
    """{package prefix: {verb: entry point value}} for console scripts of the packages under packages/."""
    found: dict[str, dict[str, str]] = {}
    for ep in entry_points(group="console_scripts"):
        prefix, _, verb = ep.name.rpartition("-")
        spec = find_spec(ep.value.split(":")[0].split(".")[0])
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if verb in VERBS and origin is not None and (REPO / "packages") in origin.parents:
            found.setdefault(prefix, {})[verb] = ep.value
    return found


SCRIPTS = _genlab_scripts()
PACKAGES = sorted(p for p, verbs in SCRIPTS.items() if "train" in verbs)
needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing (make data)"
)


def cli(script: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("GENLAB_TRACEBACK", None)
    return subprocess.run([str(BIN / script), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, no traceback, a short message naming the problem."""
    text = output(proc)
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    error = [line for line in proc.stderr.splitlines() if "error" in line]
    assert error, proc.stderr
    message = proc.stderr[proc.stderr.index(error[0]) :]
    assert len(message.splitlines()) <= 4, message
    for needle in needles:
        assert needle in message, message
    return message


PROBE = """
import sys
from importlib.metadata import entry_points
name, args = sys.argv[1], sys.argv[2:]
ep = next(e for e in entry_points(group="console_scripts") if e.name == name)
sys.argv = [name, *args]
try:
    ep.load()()
    code = 0
except SystemExit as stop:
    code = stop.code
print("torch imported" if "torch" in sys.modules else "torch not imported", file=sys.stderr)
sys.exit(code)
"""


def probe(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``script args`` in-process, reporting at exit whether torch was imported."""
    return subprocess.run(
        [sys.executable, "-c", PROBE, script, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_every_package_has_the_three_commands():
    assert {"taming", "ldm", "sd3", "ladd"} <= set(PACKAGES), PACKAGES
    for prefix in PACKAGES:
        assert set(VERBS) <= set(SCRIPTS[prefix]), (prefix, SCRIPTS[prefix])


@pytest.mark.parametrize("prefix", PACKAGES)
def test_help_and_misspelled_options_answer_without_torch(prefix, tmp_path):
    train = probe(f"{prefix}-train", "--help", cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "torch not imported" in train.stderr
    text = train.stdout
    assert text.startswith(f"usage: {prefix}-train")
    for section in ("keys (key=value", "config groups (group=option):", "experiment [default: ", "debug=fast"):
        assert section in text
    for shared in ("trainer", "callbacks", "logger"):  # (datamodule: a package may own it)
        assert re.search(rf"^  {shared} \(shared\)( \[default: \w+\])?: ", text, re.M), shared
    # the stages the default recipe trains first are listed under its name
    for key, spec in (compose_train(prefix).get("stages") or {}).items():
        if spec is not None:
            assert f"{key} <- {spec.command} experiment={spec.experiment}" in text
    for verb in ("sample", "eval"):
        proc = probe(f"{prefix}-{verb}", "--help", cwd=tmp_path)
        assert proc.returncode == 0 and "torch not imported" in proc.stderr, proc.stderr
        assert proc.stdout.startswith(f"usage: {prefix}-{verb}") and "checkpoint=" in proc.stdout

    typo = probe(f"{prefix}-train", "experimnt=foo", cwd=tmp_path)
    assert_user_error(typo, "did you mean experiment?")
    assert "torch not imported" in typo.stderr
    added = probe(f"{prefix}-train", "+experimnt=foo", cwd=tmp_path)
    assert_user_error(added, "adds a key nothing reads", "did you mean experiment?")
    typo = probe(f"{prefix}-sample", "checkpoint=x", "num_sample=3", cwd=tmp_path)
    assert_user_error(typo, "did you mean num_samples?")
    nested = probe(f"{prefix}-train", "trainer.max_step=3", cwd=tmp_path)  # Hydra alone would suggest +trainer...
    assert_user_error(nested, "did you mean trainer.max_steps?")
    assert "torch not imported" in nested.stderr
    bare = probe(f"{prefix}-sample", cwd=tmp_path)
    assert_user_error(bare, "checkpoint: required")
    assert "torch not imported" in bare.stderr
    for verb in ("sample", "eval"):  # a missing checkpoint or a bad count: answered before torch loads
        missing = probe(f"{prefix}-{verb}", f"checkpoint={tmp_path / 'nowhere'}", cwd=tmp_path)
        assert_user_error(missing, "does not exist")
        assert "torch not imported" in missing.stderr
    negative = probe(f"{prefix}-sample", f"checkpoint={tmp_path}", "num_samples=-1", cwd=tmp_path)
    assert_user_error(negative, "num_samples", ">= 1")
    assert "torch not imported" in negative.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("prefix", PACKAGES)
def test_train_sample_eval_and_user_errors(prefix, tmp_path):
    run_dir = tmp_path / "run"
    train = cli(f"{prefix}-train", "debug=fast", f"run_dir={run_dir}", cwd=tmp_path)
    text = output(train)
    assert train.returncode == 0, text[-4000:]
    assert "💡" not in text and "TPU available" not in text  # Lightning's adverts and empty counts stay out
    lines = text.splitlines()
    folder_lines = [i for i, line in enumerate(lines) if f"run folder: {run_dir}" in line]
    assert len(folder_lines) >= 2, text[-4000:]  # at the start and at the end
    assert f"sample from it: {prefix}-sample checkpoint={run_dir} num_samples=" in text
    default = compose_train(prefix)
    # a first stage the recipe needs and its defaults do not give (imagebart's default is a shipped VQGAN) was
    # trained first, and it said so with the command
    stages = [
        key for key, spec in (default.get("stages") or {}).items() if spec is not None and default.get(key) is None
    ]
    for key in stages:
        assert f"{key} not given: training it first: " in text
        assert (run_dir / key / "export").is_dir()
    assert (run_dir / "export").is_dir()

    sample = cli(f"{prefix}-sample", f"checkpoint={run_dir}", "num_samples=3", cwd=tmp_path)
    assert sample.returncode == 0, output(sample)[-4000:]
    written = list((tmp_path / "runs" / "samples").glob("*/samples.npz"))
    assert len(written) == 1, output(sample)[-2000:]  # under runs/ (gitignored, make clean)
    images = np.load(written[0])["images"]
    assert images.shape[0] == 3 and images.dtype == np.uint8 and images.std() > 0

    evaluate = cli(f"{prefix}-eval", f"checkpoint={run_dir}", "num_samples=20", "batch_size=10", cwd=tmp_path)
    assert evaluate.returncode == 0, output(evaluate)[-4000:]
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics and "metrics: " in output(evaluate)
    for name in _flat(metrics):  # every metric it wrote was printed
        assert name.rsplit("/", 1)[-1] in output(evaluate)

    again = cli(f"{prefix}-train", "debug=fast", f"run_dir={run_dir}", cwd=tmp_path)  # a finished run is kept
    assert_user_error(again, "already holds a trained run", "resume=auto")
    other = next(p for p in PACKAGES if p != prefix)  # another package's sampler names the one that fits
    foreign = cli(f"{other}-sample", f"checkpoint={run_dir}", "num_samples=2", cwd=tmp_path)
    assert_user_error(foreign, f"use {prefix}-sample")
    missing = cli(f"{prefix}-sample", f"checkpoint={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert_user_error(missing, "does not exist")
    negative = cli(f"{prefix}-sample", f"checkpoint={run_dir}", "num_samples=-1", cwd=tmp_path)
    assert_user_error(negative, "num_samples", ">= 1")
    if "first_stage" in stages:  # an autoencoder, not a generative model (a teacher stage, e.g. ladd's, samples)
        first = cli(f"{prefix}-sample", f"checkpoint={run_dir / 'first_stage'}", "num_samples=2", cwd=tmp_path)
        assert_user_error(first, "first stage")
    if not torch.cuda.is_available():
        gpu = cli(f"{prefix}-train", "debug=fast", "trainer=gpu", f"run_dir={tmp_path / 'gpu'}", cwd=tmp_path)
        assert_user_error(gpu, "CUDA")
        assert not (tmp_path / "gpu").exists()
    assert len(list((tmp_path / "runs" / "samples").iterdir())) == 1  # failed commands left no folders


def compose_train(prefix: str):
    return compose(Path(find_spec(SCRIPTS[prefix]["train"].split(":")[0]).origin).parent / "configs", "train")


def _flat(tree, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [name for k, v in tree.items() for name in _flat(v, f"{prefix}{k}/")]
    return [prefix.rstrip("/")]
