"""Sampling time per image (BENCHMARKS.md-style row "flow sampling"): sd3_flow Euler + classifier-free guidance vs
diffusers' FlowMatchEulerDiscreteScheduler loop, each with its own transformer holding the same weights.

The SD3 recipe at toy width: the ``bench`` MMDiT preset (4 layers, D = 256, qk RMSNorm), latent (1, 16, 32, 32),
text (1, 77, 512) + pooled (1, 128), 28 Euler steps, shift 3.0, guidance 7.0 (conditional and unconditional halves in
one doubled batch, as diffusers' StableDiffusion3Pipeline does), no_grad, fp32. Reference loop: the pipeline's
denoising loop written out (scheduler.set_timesteps, doubled batch, guidance, scheduler.step) around
``SD3Transformer2DModel``. Seconds per image; final latents compared.

    .venv/bin/python bench/bench_sd3_sampling.py            # appended to bench/RESULTS.md
    .venv/bin/python bench/bench_sd3_sampling.py --dry-run  # 2 steps, one run each, nothing appended
"""

from __future__ import annotations

import argparse

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit
from bench_sd3_mmdit import CONFIG, build
from diffusers import FlowMatchEulerDiscreteScheduler

from gencore.diffusion import classifier_free_guidance
from sd3_flow.sampling import euler_sample, flow_timesteps

SHIFT, GUIDANCE = 3.0, 7.0


def main(dry_run: bool = False) -> None:
    steps = 2 if dry_run else 28
    ours, ref, (latents, context, pooled, _) = build(batch=1, size=32, text_len=77)
    ours.eval()
    ref.eval()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(latents.shape, generator=g)
    uncond = {"context": torch.zeros_like(context), "pooled": torch.zeros_like(pooled)}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)

    def sample_ours() -> torch.Tensor:
        def model(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
            return ours(x, context, pooled, t)

        velocity = classifier_free_guidance(model, GUIDANCE, uncond)
        sigmas = flow_timesteps(steps, SHIFT)
        return euler_sample(velocity, x_T, sigmas, cond={"context": context, "pooled": pooled})

    def sample_ref() -> torch.Tensor:
        scheduler.set_timesteps(steps)
        x = x_T
        ctx2, pooled2 = torch.cat([uncond["context"], context]), torch.cat([uncond["pooled"], pooled])
        for t in scheduler.timesteps:
            out = ref(
                hidden_states=torch.cat([x, x]),
                encoder_hidden_states=ctx2,
                pooled_projections=pooled2,
                timestep=t.expand(2),
            ).sample
            v_u, v_c = out.chunk(2)
            x = scheduler.step(v_u + GUIDANCE * (v_c - v_u), t, x).prev_sample
        return x

    warmup, runs = (0, 1) if dry_run else (1, 5)
    with torch.no_grad():
        diff = (sample_ours() - sample_ref()).abs().max().item()
        rate = matmul_rate()
        x2 = torch.cat([x_T, x_T])
        flops = steps * count_flops(
            lambda: ref(
                hidden_states=x2,
                encoder_hidden_states=torch.cat([context, context]),
                pooled_projections=torch.cat([pooled, pooled]),
                timestep=torch.full((2,), 500.0),
            )
        )
        t_ours = timeit(sample_ours, warmup=warmup, runs=runs)
        t_ref = timeit(sample_ref, warmup=warmup, runs=runs)
        t_ours2 = timeit(sample_ours, warmup=0, runs=runs)  # again, to expose drift on a busy machine
    if dry_run:
        print(f"dry run: ours {t_ours['median']:.3f} s, diffusers {t_ref['median']:.3f} s, max |diff| {diff:.1e}")
        return
    label = f"Euler {steps} steps, shift {SHIFT}, CFG {GUIDANCE}, latent (1, 16, 32, 32), no_grad"
    rows = [
        row(label, t_ours, t_ref, flops, rate),
        row("  same, measured again after the reference", t_ours2, t_ref, flops, rate),
    ]
    note = (
        f"Seconds per image: ours {t_ours['median']:.2f}, diffusers {t_ref['median']:.2f}. Final latents agree to "
        f"{diff:.1e} (same weights, same x_T). MMDiT preset 'bench' ({CONFIG['num_layers']} layers). FLOPs counted on "
        f"diffusers (matmuls only). fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    )
    append_results("sd3_flow sampling per image vs diffusers FlowMatchEulerDiscreteScheduler loop", rows, note=note)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="2 steps, one run each, nothing appended")
    main(parser.parse_args().dry_run)
