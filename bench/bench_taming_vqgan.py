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
        # end to end, a 1e-6 difference can flip an argmin between two near-tied random codes: compare the
        # continuous encoder output, the chosen codes, and decoding the same codes
        h, h_ref = ours.quant_conv(ours.encoder(x)), ref.quant_conv(ref.encoder(x))
        quant, _, (_, _, idx) = ours.quantize(h)
        same_codes = (idx.flatten() == ref.quantize(h_ref)[2][2].flatten()).float().mean().item()
        diff_enc = (h - h_ref).abs().max().item()
        diff_dec = (ours.decode(quant) - ref.decode(quant, force_not_quantize=True).sample).abs().max().item()
        rate = matmul_rate()
        flops = count_flops(lambda: ours(x))
        t_ours = timeit(lambda: ours(x), warmup=3, runs=9)
        t_ref = timeit(lambda: ref(x), warmup=3, runs=9)
        t_ours2 = timeit(lambda: ours(x), warmup=1, runs=9)  # again, to expose drift on a busy machine
        # the same model in channels-last memory format (a user's one-line choice; mkldnn convs skip reorders)
        ours_cl, x_cl = ours.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        t_cl = timeit(lambda: ours_cl(x_cl), warmup=3, runs=9)
    rows = [
        row("VQGAN enc+dec (4, 3, 64, 64), no_grad", t_ours, t_ref, flops, rate),
        row("  same, measured again after the reference", t_ours2, t_ref, flops, rate),
        row("  ours in channels_last (model.to(memory_format=torch.channels_last))", t_cl, t_ref, flops, rate),
    ]
    note = (
        f"Same weights through taming.convert.to_diffusers_vq: encoder outputs agree to {diff_enc:.1e}, "
        f"{same_codes:.1%} of the chosen codes are the same, decoding the same codes agrees to {diff_dec:.1e}. "
        f"fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    )
    append_results("taming VQGAN encode+decode vs diffusers VQModel", rows, note=note)


if __name__ == "__main__":
    main()
