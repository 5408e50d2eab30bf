"""ImageBART sampling: seconds per image across all T stages, KV-cached decoding vs the official loop.

The official sampler (``DenoisingXTransformer.sample``) reruns the whole decoder on the growing prefix for every one of
the L tokens of a stage (and the encoder's output is reused); the GPT stage has ``sample_with_past``. Ours caches the
decoder's self-attention keys / values and computes the cross-attention keys / values of the encoded x_t once per stage
(:meth:`imagebart.models.xtransformer.XTransformer.session`). Both paths draw the same tokens for one generator (checked
below). Two configurations, random weights, T = 4 geometric stages, class-conditional, top-k off:

- ``toy``: the shipped Fashion-MNIST model's shape (8x8 = 64 tokens, dim 80, 2 + 2 layers, GPT 3 x 80), batch 16;
- ``bench``: the paper's token grid (16x16 = 256 tokens per stage), dim 256, 8 heads x 32, encoder 4 / decoder 2
  layers, GPT 4 x 256 (the AR-sampling row of BENCHMARKS.md), batch 4.

VQGAN decoding is not timed. Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_imagebart_sampling.py``.
"""

from __future__ import annotations

import functools

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit

from imagebart.lit import ImageBART
from imagebart.models.xtransformer import ResidualScaledXTransformer
from taming.conditioning import ClassConditioner
from taming.models.mingpt import GPT
from taming.models.vqgan import build_vqmodel

CONFIGS = {
    "toy": dict(
        resolution=16,
        batch=16,
        stage=dict(dim=80, enc_depth=2, enc_heads=4, dec_depth=2, dec_heads=4, attn_dim_head=20),
        gpt=dict(n_layer=3, n_head=4, n_embd=80),
    ),
    "bench": dict(
        resolution=32,
        batch=4,
        stage=dict(dim=256, enc_depth=4, enc_heads=8, dec_depth=2, dec_heads=8, attn_dim_head=32),
        gpt=dict(n_layer=4, n_head=8, n_embd=256),
    ),
}


def build(name: str) -> ImageBART:
    cfg = CONFIGS[name]
    # the tiny VQGAN (f2) at this resolution: its 64 codes remapped to 44 "used" ones, as the toy's
    vq = build_vqmodel("tiny", ddconfig={"resolution": cfg["resolution"]}, remap=list(range(0, 64, 64 // 44 + 1))[:44])
    torch.manual_seed(0)
    return ImageBART(
        vq,
        functools.partial(ResidualScaledXTransformer, **cfg["stage"]),
        functools.partial(GPT, **cfg["gpt"]),
        ClassConditioner(10, offset=0),
        num_steps=4,
        alpha=[0.0, 1.0, 1.0, 1.0],
    ).eval()


def main() -> None:
    rate = matmul_rate()
    rows, notes = [], []
    for name, cfg in CONFIGS.items():
        model = build(name)
        b = cfg["batch"]
        cond = torch.arange(b)[:, None] % 10
        out: dict[bool, torch.Tensor] = {}

        def run(use_cache: bool, model: ImageBART = model, cond: torch.Tensor = cond, b: int = b, out: dict = out):
            gen = torch.Generator().manual_seed(0)
            out[use_cache] = model.sample_tokens(b, cond, use_cache=use_cache, generator=gen)

        flops_ours = count_flops(lambda: run(True))
        flops_ref = count_flops(lambda: run(False))
        same = torch.equal(out[True], out[False])
        ours = timeit(lambda: run(True), warmup=1, runs=5)
        ref = timeit(lambda: run(False), warmup=0, runs=3)
        per_image = {k: v / b for k, v in ours.items()}
        per_image_ref = {k: v / b for k, v in ref.items()}
        tokens = model.num_steps * model.seq_len
        rows.append(
            row(
                f"{name}: all {model.num_steps} stages x {model.seq_len} tokens, per image (batch {b}); "
                "KV cache vs official loop",
                per_image,
                per_image_ref,
                flops_ours // b,
                rate,
            )
        )
        notes.append(
            f"{name}: {per_image['median']:.3f} s per image with the cache vs {per_image_ref['median']:.3f} s without "
            f"({ref['median'] / ours['median']:.1f}x); tokens/s {b * tokens / ours['median']:.0f} vs "
            f"{b * tokens / ref['median']:.0f}; GFLOP per image {flops_ours / b / 1e9:.2f} vs "
            f"{flops_ref / b / 1e9:.2f}; same tokens from both paths: {same}; "
            f"{sum(p.numel() for p in model.transformers.parameters()) / 1e6:.2f}M parameters in the stages"
        )
    note = "; ".join(notes) + f". fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    append_results("imagebart sampling: KV-cached stages vs the official recompute loop", rows, note=note)


if __name__ == "__main__":
    main()
