"""AR sampling (BENCHMARKS.md): taming GPT with a KV cache vs the official loop that recomputes the prefix each step.

Same model (4 layers, 8 heads, 256 wide, vocab 1024), same seed, 256 new tokens after one SOS token, batch 4.

.venv/bin/python bench/bench_taming_sampling.py

On a machine whose cores are busy with other work, run it with OMP_NUM_THREADS=1: each cached step is ~40 small
ops, and with more threads than free cores every op waits for a descheduled thread (milliseconds per op).
"""

from __future__ import annotations

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit

from taming.models.mingpt import gpt_from_preset
from taming.sampling import sample_tokens

BATCH, STEPS = 4, 256


def main() -> None:
    torch.manual_seed(0)
    model = gpt_from_preset("bench").eval()  # vocab 1024, block 512, 4 layers, 8 heads, 256 wide
    prefix = torch.zeros(BATCH, 1, dtype=torch.long)  # SOS token

    out: dict[bool, torch.Tensor] = {}

    def run(use_cache: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        out[use_cache] = sample_tokens(model, prefix, STEPS, use_cache=use_cache, generator=gen)

    rate = matmul_rate()
    flops_ours = count_flops(lambda: run(True))
    flops_ref = count_flops(lambda: run(False))  # also the reference's warm-up (one run takes seconds)
    same = torch.equal(out[True], out[False])
    ours = timeit(lambda: run(True), warmup=2, runs=7)
    ref = timeit(lambda: run(False), warmup=0, runs=3)
    tok = BATCH * STEPS
    ours_tps, ref_tps = tok / ours["median"], tok / ref["median"]
    name = f"KV-cache sampling, {STEPS} new tokens, batch {BATCH} (ref: recompute loop)"
    rows = [row(name, ours, ref, flops_ours, rate)]
    ref_pct = 100 * flops_ref / ref["median"] / rate
    note = (
        f"tokens/s: KV cache {ours_tps:.0f}, official recompute loop {ref_tps:.0f}; speed-up "
        f"{ref['median'] / ours['median']:.1f}x (goal >= 10x). Reference {flops_ref / 1e9:.1f} GFLOP "
        f"({ref_pct:.0f}% of the matmul rate; min-max {ref['min'] * 1e3:.0f}-{ref['max'] * 1e3:.0f} ms). "
        f"Same tokens from both paths: {same}. fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    )
    append_results("taming AR sampling: KV cache vs recompute-the-prefix", rows, note=note)


if __name__ == "__main__":
    main()
