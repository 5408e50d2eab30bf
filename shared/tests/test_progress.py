"""Progress lines for long work: their pacing and ETA (a fake clock), training (ProgressLog in a real run) and
sampling (generate_sharded) report stage, count/total, elapsed and ETA."""

import logging
import re
from pathlib import Path

import pytest
import torch

from gencore import progress, run
from gencore.cli import compose
from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.progress import Progress, ProgressLog, format_seconds
from gencore.testing import TinyAutoencoderModule

TEST_CONFIGS = Path(__file__).parent / "configs"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


def test_format_seconds():
    assert format_seconds(4.2) == "4 s"
    assert format_seconds(185) == "3 min 05 s"
    assert format_seconds(2 * 3600 + 7 * 60 + 10) == "2 h 07 min"
    assert format_seconds(-3) == "0 s"


def test_progress_paces_its_lines_and_estimates_the_rest(clock, caplog):
    caplog.set_level(logging.INFO, logger="gencore.progress")
    p = Progress("VQGAN", 100, every_s=10)
    clock.now += 2
    assert p.update(1)  # the first update always shows
    clock.now += 2
    assert not p.update(2)  # 2 s after the last line
    clock.now += 16  # 20 s in, 30 steps done: 70 more at 1.5 steps / s
    assert p.update(30)
    assert p.lines[-1] == "VQGAN: step 30/100 (30%), 20 s elapsed, ETA 47 s"
    clock.now += 1
    assert p.update(100)  # the last unit always shows, without an ETA
    assert p.lines[-1] == "VQGAN: step 100/100 (100%), 21 s elapsed"
    assert [r.getMessage() for r in caplog.records] == p.lines


def test_a_resumed_count_estimates_from_where_it_started(clock):
    p = Progress("ldm", 1000, initial=900, every_s=0)
    clock.now += 10
    p.update(950)
    assert p.lines[-1].endswith("ETA 10 s")
    assert not Progress("x", 5, enabled=False).update(5)  # other ranks are silent
    with pytest.raises(ValueError, match="total must be >= 0"):
        Progress("x", -1)


@pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="needs Fashion-MNIST")
def test_a_run_without_a_progress_bar_logs_its_steps(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gencore.progress")
    res = run.train(
        compose(
            TEST_CONFIGS,
            "tiny_train",
            [f"run_dir={tmp_path}", "trainer.max_steps=6", "trainer.enable_progress_bar=false"],
        )
    )
    assert any(isinstance(c, ProgressLog) for c in res.trainer.callbacks)
    lines = [r.getMessage() for r in caplog.records if r.name == "gencore.progress"]
    assert lines[0].startswith("TinyAutoencoderModule: step 1/6 (17%)")
    assert re.fullmatch(r"TinyAutoencoderModule: step 6/6 \(100%\), \d+ s elapsed, train/loss [0-9.e-]+", lines[-1])


def test_sampling_logs_batches(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gencore.progress")
    torch.manual_seed(0)
    out = run.generate_sharded(TinyAutoencoderModule(channels=1), 7, batch_size=3, labels=list(range(10)))
    assert out is not None and len(out["images"]) == 7
    lines = [r.getMessage() for r in caplog.records if r.name == "gencore.progress"]
    assert lines[0].startswith("sampling 7: batch 1/3 (33%)") and lines[-1].startswith("sampling 7: batch 3/3 (100%)")
