"""VQGAN encode + decode (BENCHMARKS.md row "VQGAN enc+dec"): taming VQModel vs diffusers VQModel, same weights.

3 levels (64, 128, 128), 2 res blocks per level, latent / embed 64, 1024 codes, 32 groups, mid-block attention;
images (4, 3, 64, 64), no_grad forward (encode, quantise, decode). Goal: ours/diffusers <= 1.0.

    .venv/bin/python bench/bench_taming_vqgan.py
"""

from __future__ import annotations

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit
from diffusers import VQModel as DiffusersVQModel

from gencore.testing import randomize_parameters
from taming.convert import diffusers_vq_config, to_diffusers_vq
from taming.models.vqgan import VQModel

DDCONFIG = dict(
    double_z=False,
    z_channels=64,
    resolution=64,
    in_channels=3,
    out_ch=3,
    ch=64,
    ch_mult=[1, 2, 2],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
)


def main() -> None:
    torch.manual_seed(0)
    ours = VQModel(ddconfig=DDCONFIG, n_embed=1024, embed_dim=64).eval()
    randomize_parameters(ours, seed=0)
    ref = DiffusersVQModel(**diffusers_vq_config(DDCONFIG, 1024, 64)).eval()
    ref.load_state_dict(to_diffusers_vq(ours.state_dict()))
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        diff = (ours(x)[0] - ref(x).sample).abs().max().item()
        rate = matmul_rate()
        flops = count_flops(lambda: ours(x))
        t_ours = timeit(lambda: ours(x), warmup=3, runs=9)
        t_ref = timeit(lambda: ref(x), warmup=3, runs=9)
        t_ours2 = timeit(lambda: ours(x), warmup=1, runs=9)  # again, to expose drift on a busy machine
    rows = [
        row("VQGAN enc+dec (4, 3, 64, 64), no_grad", t_ours, t_ref, flops, rate),
        row("  same, measured again after the reference", t_ours2, t_ref, flops, rate),
    ]
    note = (
        f"Outputs agree to {diff:.1e} (same weights through taming.convert.to_diffusers_vq). "
        f"fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    )
    append_results("taming VQGAN encode+decode vs diffusers VQModel", rows, note=note)


if __name__ == "__main__":
    main()
