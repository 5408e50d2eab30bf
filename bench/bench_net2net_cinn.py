"""net2net cINN: training step on cached latents vs the official encode-every-step, and projecting onto every dataset
in one batched inverse pass vs the official per-label loop; same weights, same process.

The official ``Net2NetFlow.training_step`` sends every batch of images through the frozen autoencoder
(``encode_to_z``: a posterior sample) before the flow's step; ours encodes the union once
(:class:`net2net.data.LatentUnionDataModule` caches the posterior mean and std) and draws the posterior sample from
the cached moments, which is the same distribution. The official demo (``ml4cad.py`` ``modify_input``) projects an
image onto the other datasets with one inverse pass per label; :func:`net2net.ops.project_all` does all labels in one
batched pass (identical results, checked below). Rows:

Our step also uses torch's fused Adam kernel (the same amsgrad update), where the official code steps the plain one.

- ``toy step``: the toy cINN (256-d latents of ldm's fmnist_kl_f4 autoencoder at 32 x 32, 8 blocks of width 128),
  batch 128, forward + backward + Adam (amsgrad): cached moments and fused Adam vs encoding the images each step
  and the plain Adam;
- ``paper step``: the paper's cINN (configs/creativity: 128-d, 20 blocks of width 1024, embedder over 3 labels),
  batch 64, over a KL-f4 autoencoder with 2 x 8 x 8 latents at 32 x 32: cached vs encode each step;
- ``projection``: the paper's cINN, 64 images onto 3 datasets: one batched inverse vs the per-label loop.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/bench_net2net_cinn.py`` (a CPU run takes about a minute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _harness import append_results, count_flops, matmul_rate, row, timeit

from ldm.first_stage import KLCodec
from ldm.models.autoencoder import build_autoencoder
from net2net.data import PosteriorMoments
from net2net.models.flow import build_flow, nll_loss
from net2net.ops import project_all, project_loop


def _init(flow: torch.nn.Module, width: int, k: int) -> None:
    """ActNorm's data-dependent init (one training forward), then eval-free training mode."""
    with torch.no_grad():
        flow(torch.randn(256, width), F.one_hot(torch.arange(256) % k, k).float())


def step_rows(name: str, flow: torch.nn.Module, codec: KLCodec, batch: int, rate: float) -> tuple[str, str]:
    k = 3
    width = flow.in_channels
    _init(flow, width, k)
    kw = dict(lr=1e-5, betas=(0.5, 0.9), amsgrad=True)
    opt = torch.optim.Adam(flow.parameters(), fused=True, **kw)  # ours (Net2NetFlow.configure_optimizers)
    opt_ref = torch.optim.Adam(flow.parameters(), **kw)  # the official optimiser
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, 32, 32, generator=g) * 2 - 1
    cond = F.one_hot(torch.arange(batch) % k, k).float()
    moments = PosteriorMoments(codec)
    with torch.no_grad():
        cached = moments(images)  # what the cache holds for these images
    mean, std = cached["latents"].flatten(1), cached["std"].flatten(1)

    def flow_step(z: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        v, logdet = flow(z, cond)
        loss, _ = nll_loss(v, logdet)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def ours() -> None:
        flow_step(mean + std * torch.randn_like(std), opt)

    def official() -> None:
        with torch.no_grad():
            posterior = codec.model.encode(images)
            z = posterior.sample().flatten(1)
        flow_step(z, opt_ref)

    flops = count_flops(ours)
    flops_ref = count_flops(official)
    t_ours, t_ref = timeit(ours, warmup=2, runs=7), timeit(official, warmup=2, runs=7)
    params = sum(p.numel() for p in flow.parameters()) / 1e6
    r = row(
        f"{name} ({params:.1f} M, {width}-d latents), batch {batch}, fwd+bwd+Adam: cached moments vs encoding the "
        "images each step (official); fused vs plain Adam",
        t_ours,
        t_ref,
        flops,
        rate,
    )
    note = (
        f"{name}: {batch / t_ours['median']:.0f} vs {batch / t_ref['median']:.0f} latents/s "
        f"({t_ref['median'] / t_ours['median']:.2f}x); GFLOP per step {flops / 1e9:.2f} vs {flops_ref / 1e9:.2f}"
    )
    return r, note


def main() -> None:
    torch.manual_seed(0)
    rate = matmul_rate()
    rows, notes = [], []

    toy_codec = KLCodec(build_autoencoder("fmnist_kl_f4"))  # 1 x 32 x 32 -> 4 x 8 x 8
    r, n = step_rows("toy step", build_flow("toy"), toy_codec, 128, rate)
    rows.append(r)
    notes.append(n)

    paper_codec = KLCodec(build_autoencoder("fmnist_kl_f4", ddconfig={"z_channels": 2}, embed_dim=2))  # 2 x 8 x 8
    paper = build_flow("creativity")
    r, n = step_rows("paper step", paper, paper_codec, 64, rate)
    rows.append(r)
    notes.append(n)

    paper.eval()
    k, b = 3, 64
    z = torch.randn(b, paper.in_channels)
    c_src = F.one_hot(torch.arange(b) % k, k).float()
    targets = torch.eye(k)
    out: dict[str, torch.Tensor] = {}

    def batched() -> None:
        out["ours"] = project_all(paper, z, c_src, targets)

    def loop() -> None:
        out["ref"] = project_loop(paper, z, c_src, targets)

    flops = count_flops(batched)
    t_ours, t_ref = timeit(batched, warmup=1, runs=5), timeit(loop, warmup=1, runs=5)
    rows.append(
        row(
            f"projection, paper cINN: {b} latents onto {k} datasets: one batched inverse vs the per-label loop "
            "(official)",
            t_ours,
            t_ref,
            flops,
            rate,
        )
    )
    notes.append(
        f"projection: {b * k / t_ours['median']:.0f} vs {b * k / t_ref['median']:.0f} projections/s "
        f"({t_ref['median'] / t_ours['median']:.2f}x); max |difference| {(out['ours'] - out['ref']).abs().max():.1e}"
    )
    note = "; ".join(notes) + f". fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    append_results("net2net cINN: cached-latent training step and batched projection", rows, note=note)


if __name__ == "__main__":
    main()
