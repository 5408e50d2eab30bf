"""twostream_inpaint video propagation: frames per second at 256 x 256 with 2 keyframes (BENCHMARKS.md's fixed setting
for this package), ours vs the official algorithm, same weights, same process.

The official ``GIResNetGenerator.forward`` sends the keyframes through the encoder and the first n_cross GI blocks
together with every target frame (a clip of F frames re-encodes the same 2 keyframes F times). Ours caches that pass
once per clip (:meth:`GIResNetGenerator.keyframe_state`, exact in eval mode: checked below) and runs only the target
frames. Rows:

- ``generator``: the paper's generator (configs/ours.yaml, 47.57 M parameters), 8 frames per batch, flows given
  (random), random weights: cached keyframes vs the official per-frame pass;
- ``+ RAFT flows`` / ``+ DIS flows``: the whole propagation step of one frame batch with the flows estimated:
  torchvision RAFT-large (random weights, 20 iterations at 256 x 256; 4 frames) or OpenCV's DIS (8 frames), forward
  and backward flow for the forward-backward error, flow inpainting in the hole: ours (one batched flow call for both
  directions of all keyframes, cached keyframes) vs the official order (one flow-module call per keyframe,
  keyframes re-encoded with every frame batch).

Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/bench_twostream_propagation.py`` (a CPU run takes a few minutes).
"""

from __future__ import annotations

import torch
from _harness import append_results, count_flops, matmul_rate, row, timeit

from twostream_inpaint.flow import DISFlow, RAFTFlow, keyframe_flows
from twostream_inpaint.models import GIResNetGenerator

OURS = dict(
    input_nc=4,
    output_nc=3,
    ngf=64,
    n_downsampling=3,
    n_blocks=4,
    block_type="ffc",
    is_deformable=True,
    n_cross=2,
    is_crossattending=True,
    num_latents_sqrt=16,
    num_groups=4,
    read_write_heads=8,
    add_out_act="sigmoid",
    resnet_conv_kwargs={"ratio_gin": 0.75, "ratio_gout": 0.75, "enable_lfu": False},
)
SIZE, T = 256, 2


def inputs(frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(frames, 3, SIZE, SIZE, generator=g)
    m = torch.zeros(frames, 1, SIZE, SIZE)
    m[..., 80:176, 64:160] = 1
    keys = torch.rand(1, T, 3, SIZE, SIZE, generator=g)
    return {"x": x, "m": m, "keys": keys}


def main() -> None:
    torch.manual_seed(0)
    gen = GIResNetGenerator(**OURS).eval().requires_grad_(False)  # inference (FlopCounterMode hooks need no graph)
    params = sum(p.numel() for p in gen.parameters())
    rate = matmul_rate()
    rows, notes = [], []

    # --- generator only: 8 frames, flows given
    f = 8
    d = inputs(f)
    target = torch.cat([d["x"] * (1 - d["m"]), d["m"]], 1)
    refs = torch.cat([d["keys"], torch.zeros(1, T, 1, SIZE, SIZE)], 2)
    flows = torch.randn(f, T, 2, SIZE, SIZE) * 3
    errs = torch.rand(f, T, 1, SIZE, SIZE)
    out: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def ours_gen() -> None:
        state = gen.keyframe_state(refs)
        out["ours"] = gen(target, None, flows=flows, flow_errs=errs, keyframes=state)

    @torch.no_grad()
    def official_gen() -> None:
        out["ref"] = gen(target, refs.expand(f, -1, -1, -1, -1), flows=flows, flow_errs=errs)

    flops, flops_ref = count_flops(ours_gen), count_flops(official_gen)
    diff = (out["ours"] - out["ref"]).abs().max().item()
    t_ours = timeit(ours_gen, warmup=1, runs=3)
    t_ref = timeit(official_gen, warmup=1, runs=3)
    rows.append(
        row(
            f"generator ({params / 1e6:.2f} M), {f} frames {SIZE}x{SIZE}, {T} keyframes, flows given: cached keyframes "
            "vs the official per-frame pass",
            t_ours,
            t_ref,
            flops,
            rate,
        )
    )
    notes.append(
        f"generator: {f / t_ours['median']:.2f} frames/s vs {f / t_ref['median']:.2f} "
        f"({t_ref['median'] / t_ours['median']:.2f}x); GFLOP per batch {flops / 1e9:.0f} vs {flops_ref / 1e9:.0f}; "
        f"max |difference| {diff:.1e}"
    )

    # --- the whole step with flows estimated: RAFT-large (the paper's), DIS (weight-free, the CPU toy's)
    estimators = {
        "RAFT-large flows (20 iterations at 256 x 256, random weights)": (
            RAFTFlow(size="large", allow_random=True, resolution=(256, 256), iters=20),
            4,
        ),
        "DIS flows (OpenCV, medium preset)": (DISFlow(), 8),
    }
    for label, (estimator, f) in estimators.items():
        d = inputs(f, seed=1)
        target = torch.cat([d["x"] * (1 - d["m"]), d["m"]], 1)
        keys = d["keys"].expand(f, -1, -1, -1, -1)
        refs = torch.cat([d["keys"], torch.zeros(1, T, 1, SIZE, SIZE)], 2)

        @torch.no_grad()
        def ours_full(d=d, target=target, keys=keys, refs=refs, estimator=estimator) -> None:
            fl, er = keyframe_flows(estimator, d["x"], d["m"], keys, None)
            state = gen.keyframe_state(refs)
            out["ours"] = gen(target, None, flows=fl, flow_errs=er, keyframes=state)

        @torch.no_grad()
        def official_full(d=d, target=target, keys=keys, refs=refs, estimator=estimator, f=f) -> None:
            fls, ers = [], []
            a = torch.cat([d["x"] * (1 - d["m"]), d["m"]], 1)
            for t in range(T):  # the official loop: one flow-module call per keyframe
                fl, er = estimator(a, keys[:, t])
                fls.append(fl)
                ers.append(er)
            refs_f = refs.expand(f, -1, -1, -1, -1)
            out["ref"] = gen(target, refs_f, flows=torch.stack(fls, 1), flow_errs=torch.stack(ers, 1))

        t_ours = timeit(ours_full, warmup=0, runs=1)
        t_ref = timeit(official_full, warmup=0, runs=1)
        rows.append(
            row(
                f"+ {label}, both directions, flow inpainting, {f} frames: batched flows + cached keyframes vs the "
                "official per-keyframe flow calls and per-frame keyframe pass",
                t_ours,
                t_ref,
                None,
                rate,
            )
        )
        notes.append(
            f"with {label.split(' ')[0]}: {f / t_ours['median']:.2f} frames/s vs {f / t_ref['median']:.2f} "
            f"({t_ref['median'] / t_ours['median']:.2f}x); "
            f"max |difference| {(out['ours'] - out['ref']).abs().max():.1e}"
        )
    note = "; ".join(notes) + f". fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    append_results(f"twostream_inpaint video propagation: {SIZE}x{SIZE}, {T} keyframes", rows, note=note)


if __name__ == "__main__":
    main()
