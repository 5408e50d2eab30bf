"""gencore attention backends on one GPT-sized workload: sdpa (default) vs math (the reference formula).

.venv/bin/python bench/bench_attention.py
"""

from __future__ import annotations

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit

from gencore.attention import attention, causal_mask


def main() -> None:
    torch.manual_seed(0)
    b, h, length, d = 4, 8, 512, 32  # the taming GPT row of BENCHMARKS.md at a 512-token window
    q, k, v = (torch.randn(b, h, length, d) for _ in range(3))
    rate = matmul_rate()
    rows = []
    for name, kw in (
        ("causal self-attention", {"causal": True}),
        ("prefix mask (n_unmasked=256)", {"mask": causal_mask(length, n_unmasked=256)}),
    ):
        ours = timeit(lambda kw=kw: attention(q, k, v, backend="sdpa", **kw))
        ref = timeit(lambda kw=kw: attention(q, k, v, backend="math", **kw))
        flops = count_flops(lambda kw=kw: attention(q, k, v, backend="math", **kw))
        rows.append(row(f"{name}, (4, 8, 512, 32) fwd", ours, ref, flops, rate))
    append_results(
        "attention: sdpa vs math", rows, note=f"fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    )


if __name__ == "__main__":
    main()
