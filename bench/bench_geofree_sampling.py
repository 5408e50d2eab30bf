"""geofree sampling: tokens per second of the target view, KV-cached decoding vs the official loop.

The official ``GeoTransformer.sample`` reruns the GPT on [prefix, tokens so far] for each of the h·w target tokens
(the conditioning prefix is never cropped); ours embeds (and, for the hybrid, warps) the prefix once and decodes with a
KV cache (:func:`taming.sampling.sample_tokens`). Both draw the same tokens for one generator (checked below). Random
weights; two configurations:

- ``toy``: the shipped model's shape: 32 x 48 views, 8 x 12 = 96 target tokens, impl_nodepth (30 camera + 96 source
  tokens), GPT 4 x 128, batch 16; and the hybrid of the same size (WarpGPT: merged depth / source embeddings warped);
- ``paper_grid``: the paper's 13 x 23 = 299 tokens after a 329-long prefix (impl_nodepth), GPT 4 x 256, batch 4.

VQGAN encoding / decoding is not timed (done once outside). Run:
``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_geofree_sampling.py``.
"""

from __future__ import annotations

import functools

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit

from geofree.lit import GeoTransformer
from geofree.models.geogpt import ConvWarper, WarpGPT
from taming.models.mingpt import GPT
from taming.models.vqgan import VQGAN_PRESETS, build_vqmodel
from taming.sampling import sample_tokens

CONFIGS = {
    "toy impl_nodepth": dict(size=(32, 48), batch=16, gpt=dict(n_layer=4, n_head=4, n_embd=128), hybrid=False),
    "toy hybrid": dict(size=(32, 48), batch=16, gpt=dict(n_layer=4, n_head=4, n_embd=128), hybrid=True),
    "paper_grid impl_nodepth": dict(size=(208, 368), batch=4, gpt=dict(n_layer=4, n_head=8, n_embd=256), hybrid=False),
}


def build(cfg: dict) -> GeoTransformer:
    dd = dict(VQGAN_PRESETS["fmnist_f4"]["ddconfig"], in_channels=3, out_ch=3)
    if cfg["size"][0] > 64:  # the paper's f16 grid: 208 x 368 -> 13 x 23 (a narrow f16 VQGAN: only its grid matters)
        dd = dict(dd, ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[])
    torch.manual_seed(0)
    first = build_vqmodel(None, ddconfig=dd, n_embed=512, embed_dim=64)
    if cfg["hybrid"]:
        depth = build_vqmodel(None, ddconfig=dict(dd, in_channels=1, out_ch=1), n_embed=512, embed_dim=64)
        gpt = functools.partial(WarpGPT, warper=functools.partial(ConvWarper), **cfg["gpt"])
        return GeoTransformer(first, gpt, depth, merge_channels=128, image_size=cfg["size"]).eval()
    return GeoTransformer(first, functools.partial(GPT, **cfg["gpt"]), use_depth=False, image_size=cfg["size"]).eval()


def main() -> None:
    from torch.utils.data import default_collate

    from geofree.data.synthetic import SyntheticScenes

    rate = matmul_rate()
    rows, notes = [], []
    for name, cfg in CONFIGS.items():
        model = build(cfg)
        b = cfg["batch"]
        ds = SyntheticScenes(num_scenes=b, size=cfg["size"], num_points=64)
        batch = default_collate([ds[i] for i in range(b)])
        with torch.no_grad():
            c = model.conditioning(batch, check=True)
        gpt = model._gpt(c["warp"])
        out: dict[bool, torch.Tensor] = {}

        def run(use_cache: bool, gpt=gpt, c=c, out=out, model=model):
            gen = torch.Generator().manual_seed(0)
            out[use_cache] = sample_tokens(
                gpt,
                c["indices"],
                model.seq_len,
                embeddings=c["embeddings"],
                top_k=100,
                use_cache=use_cache,
                generator=gen,
                vocab_limit=model.num_codes,
            )

        flops = count_flops(lambda: run(True))
        flops_ref = count_flops(lambda: run(False))
        same = torch.equal(out[True], out[False])
        ours = timeit(lambda: run(True), warmup=1, runs=3)
        ref = timeit(lambda: run(False), warmup=0, runs=1 if cfg["size"][0] > 64 else 3)
        tokens = b * model.seq_len
        rows.append(
            row(
                f"{name}: {model.seq_len} target tokens after a {model.n_unmasked}-long prefix (batch {b}); KV cache "
                "vs official loop",
                ours,
                ref,
                flops,
                rate,
            )
        )
        notes.append(
            f"{name}: {tokens / ours['median']:.0f} tokens/s with the cache vs {tokens / ref['median']:.0f} without "
            f"({ref['median'] / ours['median']:.1f}x); GFLOP per batch {flops / 1e9:.2f} vs {flops_ref / 1e9:.2f}; "
            f"same tokens: {same}; {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f}M parameters"
        )
    note = "; ".join(notes) + f". fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    append_results("geofree sampling: KV-cached view synthesis vs the official recompute loop", rows, note=note)


if __name__ == "__main__":
    main()
