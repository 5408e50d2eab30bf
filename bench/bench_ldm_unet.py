"""UNet forward + backward (BENCHMARKS.md row "UNet fwd+bwd"): ldm UNetModel vs diffusers UNet2DConditionModel.

Configuration (``ldm.models.unet.UNET_PRESETS["bench"]``): in/out 4, block_out (64, 128, 256), 2 res blocks per
level, CrossAttn down blocks at the first two levels and a plain third one (up mirrored), cross_attention_dim 384,
8 heads (diffusers ``attention_head_dim=8``), 32 groups, transformer depth 1. Inputs: latent (4, 4, 32, 32), context
(4, 16, 384), timesteps (4,). Measured: forward, ``.mean().backward()``, grads set to None between runs. Both models
hold the same weights (randomised, mapped with ``ldm.convert.unet_to_diffusers``). FLOPs are counted on the diffusers
model (71.2 GFLOP, the BENCHMARKS.md reference point; FlopCounterMode gives ours the same count). Goal:
ours/diffusers <= 0.9.

    .venv/bin/python bench/bench_ldm_unet.py            # timings appended to bench/RESULTS.md
    .venv/bin/python bench/bench_ldm_unet.py --dry-run  # tiny input, one run of each, nothing appended
"""

from __future__ import annotations

import argparse

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit
from diffusers import UNet2DConditionModel

from gencore.testing import randomize_parameters
from ldm.convert import diffusers_unet_config, unet_to_diffusers
from ldm.models.unet import UNET_PRESETS, UNetModel

CONFIG = dict(UNET_PRESETS["bench"])


def build(batch: int = 4, size: int = 32, context_len: int = 16, seed: int = 0):
    """(ours, diffusers, (x, t, context)) with the same weights."""
    torch.manual_seed(seed)
    ours = randomize_parameters(UNetModel(**CONFIG), seed=seed).train()
    ref = UNet2DConditionModel(**diffusers_unet_config(**CONFIG)).train()
    ref.load_state_dict(unet_to_diffusers(ours.state_dict(), CONFIG), strict=True)
    x = torch.randn(batch, CONFIG["in_channels"], size, size)
    t = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, context_len, CONFIG["context_dim"])
    return ours, ref, (x, t, context)


def step_ours(model: UNetModel, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x, t, context).mean().backward()


def step_ref(model: UNet2DConditionModel, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x, t, encoder_hidden_states=context).sample.mean().backward()


def parity(ours: UNetModel, ref: UNet2DConditionModel, inputs: tuple) -> tuple[float, float]:
    """Max |Δ| of the outputs and of the conv_in weight gradients after one fwd+bwd of each."""
    x, t, context = inputs
    with torch.no_grad():
        out = (ours(x, t, context) - ref(x, t, encoder_hidden_states=context).sample).abs().max().item()
    step_ours(ours, *inputs)
    step_ref(ref, *inputs)
    grad = (ours.input_blocks[0][0].weight.grad - ref.conv_in.weight.grad).abs().max().item()
    return out, grad


def main(dry_run: bool = False) -> None:
    batch, size = (1, 8) if dry_run else (4, 32)
    warmup, runs = (0, 1) if dry_run else (2, 7)
    ours, ref, inputs = build(batch=batch, size=size)
    d_out, d_grad = parity(ours, ref, inputs)
    rate = matmul_rate()
    flops = count_flops(lambda: step_ref(ref, *inputs))
    t_ours = timeit(lambda: step_ours(ours, *inputs), warmup=warmup, runs=runs)
    t_ref = timeit(lambda: step_ref(ref, *inputs), warmup=warmup, runs=runs)
    t_ours2 = timeit(lambda: step_ours(ours, *inputs), warmup=min(warmup, 1), runs=runs)  # drift on a busy machine
    shape = f"({batch}, 4, {size}, {size}), ctx ({batch}, 16, 384)"
    rows = [
        row(f"UNet fwd+bwd {shape}", t_ours, t_ref, flops, rate),
        row("  same, measured again after the reference", t_ours2, t_ref, flops, rate),
    ]
    note = (
        f"Same weights through ldm.convert.unet_to_diffusers: outputs agree to {d_out:.1e}, conv_in grads to "
        f"{d_grad:.1e}. FLOPs counted on diffusers. fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s. "
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}."
    )
    if dry_run:
        print("\n".join(rows) + "\n\n" + note)
        return
    append_results("ldm UNetModel fwd+bwd vs diffusers UNet2DConditionModel", rows, note=note)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny input, one run each, nothing appended")
    main(dry_run=parser.parse_args().dry_run)
