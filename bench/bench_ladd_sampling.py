"""Wall time per image, LADD student vs its teacher (issue goal: >= 12x): the student's 4 unguided Euler steps against
the teacher's 28 Euler steps with classifier-free guidance (doubled batch), same MMDiT, plus the student's 4-step loop
against diffusers' FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(4) loop (the SD3.5-large-turbo recipe)
around the same network.

Networks: the toy teacher's ``fmnist_tiny`` MMDiT (16 x 8 x 8 latents, batch 16, MiniLM-width text) and the ``bench``
preset (16 x 32 x 32, batch 1, text 77 x 512). Random weights (the timing does not depend on them), no_grad, fp32.

    .venv/bin/python bench/bench_ladd_sampling.py            # appended to bench/RESULTS.md
    .venv/bin/python bench/bench_ladd_sampling.py --dry-run  # one run each, nothing appended
"""

from __future__ import annotations

import argparse

import torch
from _harness import append_results, matmul_rate, row, timeit
from diffusers import FlowMatchEulerDiscreteScheduler

from gencore.diffusion import classifier_free_guidance
from ladd_turbo.losses import student_sigmas
from ladd_turbo.sampling import student_sample
from sd3_flow.models.mmdit import mmdit_from_preset
from sd3_flow.sampling import euler_sample, flow_timesteps

TEACHER_STEPS, GUIDANCE, STUDENT_STEPS, SHIFT = 28, 4.0, 4, 3.0


def case(preset: str, batch: int, size: int, text_len: int):
    torch.manual_seed(0)
    net = mmdit_from_preset(preset).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.02)
    x_T = torch.randn(batch, net.in_channels, size, size)
    cond = {
        "context": torch.randn(batch, text_len, net.joint_attention_dim),
        "pooled": torch.randn(batch, net.pooled_projection_dim),
    }
    uncond = {k: torch.zeros_like(v[:1]) for k, v in cond.items()}

    def velocity(x, t, context, pooled):
        return net(x, context, pooled, t)

    sigmas = student_sigmas(STUDENT_STEPS, SHIFT)

    def student():
        return student_sample(velocity, x_T, sigmas, STUDENT_STEPS, cond=cond)

    def teacher():
        guided = classifier_free_guidance(velocity, GUIDANCE, uncond)
        return euler_sample(guided, x_T, flow_timesteps(TEACHER_STEPS, 1.0), cond=cond)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)

    def diffusers_student():
        scheduler.set_timesteps(STUDENT_STEPS)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(velocity(x, t.expand(batch), **cond), t, x).prev_sample
        return x

    return student, teacher, diffusers_student


def main(dry_run: bool = False) -> None:
    warmup, runs = (0, 1) if dry_run else (1, 5)
    rate = matmul_rate()
    rows, notes = [], []
    for preset, batch, size, text_len in (("fmnist_tiny", 16, 8, 16), ("bench", 1, 32, 77)):
        student, teacher, reference = case(preset, batch, size, text_len)
        with torch.no_grad():
            diff = (student() - reference()).abs().max().item()
            t_s = timeit(student, warmup=warmup, runs=runs)
            t_t = timeit(teacher, warmup=warmup, runs=runs)
            t_r = timeit(reference, warmup=warmup, runs=runs)
        per = {k: {m: v / batch for m, v in t.items()} for k, t in (("s", t_s), ("t", t_t), ("r", t_r))}
        speedup = t_t["median"] / t_s["median"]
        if dry_run:
            print(f"{preset}: student {per['s']['median'] * 1e3:.1f} ms/img, teacher {per['t']['median'] * 1e3:.1f}")
            continue
        rows.append(
            row(f"{preset}: student 4 steps vs teacher 28 steps + CFG (per image)", per["s"], per["t"], None, rate)
        )
        rows.append(
            row(f"{preset}: student 4 steps vs diffusers turbo loop (per image)", per["s"], per["r"], None, rate)
        )
        notes.append(
            f"{preset}: student {speedup:.1f}x faster than the guided teacher; 4-step latents vs diffusers {diff:.1e}"
        )
    if not dry_run:
        append_results(
            "ladd_turbo sampling: 4-step student vs 28-step guided teacher", rows, note="; ".join(notes) + "."
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="one run each, nothing appended")
    main(parser.parse_args().dry_run)
