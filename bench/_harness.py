"""Shared timing harness for the benchmark scripts (not a test: nothing here asserts a time).

Per shared/design/BENCHMARKS.md: reference and ours built with the same configuration and weights, timed in one
process (warm-up, then the median of several runs), FLOPs counted with torch's FlopCounterMode and reported as a
share of this machine's fp32 matmul rate (a 2048x2048 matmul) measured in the same run; rows appended to
bench/RESULTS.md with the date, torch version and machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).parent / "RESULTS.md"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], warmup: int = 2, runs: int = 7) -> dict[str, float]:
    """Median / min / max seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(n: int = 2048, device: str = "cpu", dtype: torch.dtype = torch.float32, runs: int = 5) -> float:
    """This machine's matmul rate in FLOP/s for ``dtype`` (fp32 by default) on ``device``, measured now."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timeit(lambda: a @ b, warmup=2, runs=runs)["median"]
    return 2 * n**3 / t


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


def row(name: str, ours: dict[str, float], ref: dict[str, float] | None, flops: int | None, rate: float) -> str:
    """A Markdown table row: times, ratio ours/reference, FLOP rate as % of the matmul rate."""
    o = ours["median"]
    r = ref["median"] if ref else float("nan")
    pct = f"{100 * flops / o / rate:.0f}%" if flops else "-"
    spread = f"{ours['min'] * 1e3:.1f}-{ours['max'] * 1e3:.1f}"
    return f"| {name} | {o * 1e3:.1f} ({spread}) | {r * 1e3:.1f} | {o / r:.2f}x | {(flops or 0) / 1e9:.2f} | {pct} |"


def append_results(title: str, rows: list[str], note: str = "") -> None:
    header = (
        f"\n### {title} — {datetime.date.today().isoformat()}, torch {torch.__version__}, {machine()}, "
        f"{torch.get_num_threads()} threads\n\n"
        "| measurement | ours ms (min-max) | reference ms | ours/ref | GFLOP | % of fp32 matmul rate |\n"
        "|---|---|---|---|---|---|\n"
    )
    text = header + "\n".join(rows) + "\n" + (f"\n{note}\n" if note else "")
    print(text)
    with open(RESULTS, "a") as f:
        f.write(text)
