"""MMDiT forward + backward (BENCHMARKS.md row "MMDiT fwd+bwd"): sd3_flow MMDiT vs diffusers SD3Transformer2DModel.

Configuration (``sd3_flow.models.mmdit.MMDIT_PRESETS["bench"]``): patch 2, in/out 16, 4 layers, 4 heads x 64 (D = 256),
joint_attention_dim 512, caption_projection_dim 256 (= heads x head_dim, as diffusers requires), pooled 128,
pos_embed_max_size 32, qk_norm rms_norm. Inputs: latent (4, 16, 32, 32) -> 256 image tokens, text (4, 77, 512),
pooled (4, 128), timesteps (4,) = sigma * 1000 (float). Measured: forward, ``.mean().backward()``, grads set to None
between runs. Both models hold the same weights (randomised, mapped with ``sd3_flow.convert.to_diffusers``). FLOPs are
counted on the diffusers model (FlopCounterMode counts the matmuls, not torch's CPU flash attention). Goal:
ours/diffusers <= 0.9.

Where ours saves work (same parameters, same outputs): one matmul per stream for q/k/v (concatenated weights) instead
of three; the q/k RMSNorm of both streams in one pass with a hand-written backward; no copies for the head split
(q/k/v and the attention output are strided views); adaLN modulation and gated residuals as single ``addcmul``
kernels; ``split`` instead of slicing for the [image, text] outputs (no zero-filled gradient buffers); and in the last
block, whose text outputs are discarded, no text queries (diffusers computes ``add_q_proj`` and 77 extra query rows
there).

    .venv/bin/python bench/bench_sd3_mmdit.py            # timings appended to bench/RESULTS.md
    .venv/bin/python bench/bench_sd3_mmdit.py --dry-run  # tiny input, one run of each, nothing appended
"""

from __future__ import annotations

import argparse

import diffusers
import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit
from diffusers import SD3Transformer2DModel

from gencore.testing import randomize_parameters
from sd3_flow.convert import diffusers_config, to_diffusers
from sd3_flow.models.mmdit import MMDIT_PRESETS, MMDiT

CONFIG = dict(MMDIT_PRESETS["bench"])


def build(batch: int = 4, size: int = 32, text_len: int = 77, seed: int = 0):
    """(ours, diffusers, (latents, context, pooled, timesteps)) with the same weights."""
    torch.manual_seed(seed)
    ours = randomize_parameters(MMDiT(**CONFIG), seed=seed).train()
    ref = SD3Transformer2DModel(**diffusers_config(**CONFIG)).train()
    ref.load_state_dict(to_diffusers(ours.state_dict(), CONFIG), strict=True)
    latents = torch.randn(batch, CONFIG["in_channels"], size, size)
    context = torch.randn(batch, text_len, CONFIG["joint_attention_dim"])
    pooled = torch.randn(batch, CONFIG["pooled_projection_dim"])
    timesteps = torch.rand(batch) * 1000
    return ours, ref, (latents, context, pooled, timesteps)


def step_ours(model: MMDiT, latents, context, pooled, timesteps) -> None:
    model.zero_grad(set_to_none=True)
    model(latents, context, pooled, timesteps).mean().backward()


def step_ref(model: SD3Transformer2DModel, latents, context, pooled, timesteps) -> None:
    model.zero_grad(set_to_none=True)
    out = model(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=timesteps)
    out.sample.mean().backward()


def parity(ours: MMDiT, ref: SD3Transformer2DModel, inputs: tuple) -> tuple[float, float]:
    """Max |Δ| of the outputs and of the patch-embedding weight gradients after one fwd+bwd of each."""
    latents, context, pooled, timesteps = inputs
    with torch.no_grad():
        a = ours(latents, context, pooled, timesteps)
        b = ref(hidden_states=latents, encoder_hidden_states=context, pooled_projections=pooled, timestep=timesteps)
        out = (a - b.sample).abs().max().item()
    step_ours(ours, *inputs)
    step_ref(ref, *inputs)
    grad = (ours.pos_embed.proj.weight.grad - ref.pos_embed.proj.weight.grad).abs().max().item()
    return out, grad


def main(dry_run: bool = False) -> None:
    batch, size, text_len = (1, 8, 7) if dry_run else (4, 32, 77)
    warmup, runs = (0, 1) if dry_run else (2, 7)
    ours, ref, inputs = build(batch=batch, size=size, text_len=text_len)
    d_out, d_grad = parity(ours, ref, inputs)
    rate = matmul_rate()
    flops = count_flops(lambda: step_ref(ref, *inputs))
    t_ours = timeit(lambda: step_ours(ours, *inputs), warmup=warmup, runs=runs)
    t_ref = timeit(lambda: step_ref(ref, *inputs), warmup=warmup, runs=runs)
    t_ours2 = timeit(lambda: step_ours(ours, *inputs), warmup=min(warmup, 1), runs=runs)  # drift on a busy machine
    shape = f"({batch}, 16, {size}, {size}), text ({batch}, {text_len}, 512)"
    rows = [
        row(f"MMDiT fwd+bwd {shape}", t_ours, t_ref, flops, rate),
        row("  same, measured again after the reference", t_ours2, t_ref, flops, rate),
    ]
    note = (
        f"Same weights through sd3_flow.convert.to_diffusers (diffusers {diffusers.__version__}): outputs agree to "
        f"{d_out:.1e}, patch-embedding grads to {d_grad:.1e}. FLOPs counted on diffusers (matmuls only). "
        f"fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s. "
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}."
    )
    if dry_run:
        print("\n".join(rows) + "\n\n" + note)
        return
    append_results("sd3_flow MMDiT fwd+bwd vs diffusers SD3Transformer2DModel", rows, note=note)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny input, one run each, nothing appended")
    main(dry_run=parser.parse_args().dry_run)
