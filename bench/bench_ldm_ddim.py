"""DDIM loop (BENCHMARKS.md row "DDIM loop"): ldm.sampling.ddim_sample vs diffusers DDIMScheduler, same UNet.

Both loops step one shared denoiser, diffusers' UNet2DConditionModel in the "UNet fwd+bwd" configuration (in/out 4,
block_out (64, 128, 256), 2 layers per block, down CrossAttn, CrossAttn, plain; up mirrored; cross_attention_dim 384,
attention_head_dim 8, 32 groups; randomised weights), so only the sampler loop differs. 50 DDIM steps (eta 0, the
official LDM spacing 1, 21, ..., 981 = diffusers leading spacing with steps_offset 1, set_alpha_to_one False), batch 4,
latent (4, 4, 32, 32), context (4, 16, 384), no_grad; seconds per batch. A second row times the loops alone with a
near-free element-wise denoiser. Goal: ours/diffusers <= 1.0.

    .venv/bin/python bench/bench_ldm_ddim.py
"""

from __future__ import annotations

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit
from diffusers import DDIMScheduler, UNet2DConditionModel

from gencore.diffusion import ddim_timesteps
from gencore.testing import randomize_parameters
from ldm.diffusion import DiffusionSchedule
from ldm.sampling import ddim_sample

UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 256),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=384,
    attention_head_dim=8,
    norm_num_groups=32,
)
STEPS, BATCH = 50, 4


def main() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    randomize_parameters(unet, seed=0)
    schedule = DiffusionSchedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    scheduler = DDIMScheduler(
        trained_betas=schedule.betas.double().numpy(),
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        clip_sample=False,
    )
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(BATCH, 4, 32, 32, generator=g)
    ctx = torch.randn(BATCH, 16, 384, generator=g)

    def unet_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=ctx).sample

    def cheap_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.1 * x

    def ours(denoise) -> torch.Tensor:
        return ddim_sample(denoise, x_T, schedule, ddim_timesteps(STEPS))

    def ref(denoise) -> torch.Tensor:
        scheduler.set_timesteps(STEPS)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(denoise(x, t), t, x).prev_sample
        return x

    with torch.no_grad():
        scheduler.set_timesteps(STEPS)
        assert scheduler.timesteps.tolist() == ddim_timesteps(STEPS)[::-1]
        diff = (ours(unet_eps) - ref(unet_eps)).abs().max().item()
        rate = matmul_rate()
        flops = STEPS * count_flops(lambda: unet_eps(x_T, torch.full((BATCH,), 981)))
        t_ours = timeit(lambda: ours(unet_eps), warmup=1, runs=5)
        t_ref = timeit(lambda: ref(unet_eps), warmup=1, runs=5)
        t_ours2 = timeit(lambda: ours(unet_eps), warmup=0, runs=3)  # again, to expose drift on a busy machine
        o_ours = timeit(lambda: ours(cheap_eps), warmup=3, runs=21)
        o_ref = timeit(lambda: ref(cheap_eps), warmup=3, runs=21)
    rows = [
        row(f"DDIM {STEPS} steps, UNet, latent ({BATCH}, 4, 32, 32), no_grad", t_ours, t_ref, flops, rate),
        row("  same, measured again after the reference", t_ours2, t_ref, flops, rate),
        row(f"  loop only: {STEPS} steps with denoiser 0.1 x", o_ours, o_ref, None, rate),
    ]
    note = (
        f"Seconds per batch: ours {t_ours['median']:.2f}, diffusers {t_ref['median']:.2f}. Final samples agree to "
        f"{diff:.1e} (same UNet, same x_T). fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    )
    append_results("ldm DDIM loop vs diffusers DDIMScheduler (same UNet2DConditionModel)", rows, note=note)


if __name__ == "__main__":
    main()
