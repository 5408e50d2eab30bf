"""ladd_turbo's gallery entries (``make gallery``): the shipped 4-step student at 4 and at 1 step."""

from gencore.gallery import Entry, class_grid

CHECKPOINT = "pkg://ladd_turbo/checkpoints/fmnist_turbo"
# ladd-eval of the shipped student (1,000 samples) and bench/bench_ladd_sampling.py
HEADLINES = {
    4: "FID-FMNIST 5.15, class accuracy 0.90 at 4 steps vs the 28-step guided teacher's 4.33 / 0.94 (1,000 samples); "
    "10.5-13x faster in the benchmark",
    1: "FID-FMNIST 5.91, class accuracy 0.94 at 1 step (1,000 samples); 4 steps: 5.15 / 0.90",
}


def _entry(steps: int) -> Entry:
    return class_grid(
        "ladd_turbo",
        f"LADD student: {steps} unguided step{'s' if steps > 1 else ''}",
        "ladd-sample",
        CHECKPOINT,
        f"sample.num_steps={steps}",
        headline=HEADLINES[steps],
        note="The same captions as the sd3_flow teacher above (one column per class); make demo puts the two side by "
        "side from the same noise.",
    )


def entries() -> list[Entry]:
    return [_entry(4), _entry(1)]
