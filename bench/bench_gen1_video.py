"""Gen-1 video diffusion (gen1_video): seconds per edited frame, and the video UNet's time and memory at 16 frames.

**Video UNet** (16 frames, no_grad forward and forward + ``.mean().backward()``): ours, ``VideoUNetModel`` over the
spatial configuration ``ldm.models.unet.UNET_PRESETS["bench"]`` (BENCHMARKS.md "UNet fwd+bwd": in/out 4, block_out
(64, 128, 256), 2 res blocks per level, cross-attention at the first two levels, 8 heads, cross_attention_dim 384)
with ``structure_channels=1, max_frames=16, temporal_conv_layers=4, temporal_depth=1``; reference, diffusers
``UNet3DConditionModel`` (ModelScope's video UNet: a temporal conv after each resnet, a temporal transformer after
each spatial transformer) with block_out_channels (64, 128, 256), down (CrossAttnDownBlock3D, CrossAttnDownBlock3D,
DownBlock3D), up (UpBlock3D, CrossAttnUpBlock3D, CrossAttnUpBlock3D), layers_per_block 2, cross_attention_dim 384,
attention_head_dim 8 (8 heads: diffusers' naming), 32 groups, in_channels 5 (latent 4 + the structure channel,
concatenated, so both take the same input width), out 4. Inputs: latent (1, 4, 16, 32, 32), structure
(1, 1, 16, 32, 32), t_s 2 (ours only; diffusers has no t_s embedding), context (1, 16, 384), timesteps (1,).

This is a same-family, same-size speed comparison, not a parity check: no key map exists between the two models, so
each has its own random weights (``gencore.testing.randomize_parameters``). They also differ in layout: diffusers
adds a temporal transformer after ``conv_in`` (``transformer_in``), its temporal transformer blocks run two frame
self-attentions and a feed-forward (``double_self_attention``) without frame position embeddings, ours one
self-attention and a feed-forward with learned frame positions; the temporal convolutions (4 x [GroupNorm, SiLU,
Conv3d (3, 1, 1)], residual, last one zero-initialised) match. FLOPs are therefore counted separately for each model
(FlopCounterMode); the rows' GFLOP and % columns are ours, the note gives the reference's. Both run in eval mode:
diffusers' TemporalConvLayer has a fixed dropout of 0.1 (ours 0), which train mode would add to its cost only.

**Memory for 16 frames**: the activation memory of one fwd+bwd, i.e. the bytes of the tensors autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once, the models' parameters left
out), ours vs diffusers; on CUDA also ``torch.cuda.max_memory_allocated`` above the weights and inputs for the
no_grad forward and for the fwd+bwd. Given in the note, in MiB with the ratio.

**Seconds per edited frame**, end to end: the wall time of one ``Gen1VideoDiffusion.edit`` call (encode, Sobel
structure at t_s 2, 20 DDIM steps with content guidance ω 3 and temporal guidance ω_t 1.5, decode) on one real
8-frame clip (the shipped model's clip length) divided by its 8 frames; 32x32 grey frames (8x8x4 latents): the first
8 frames (every 2nd) of the opencv-doc ``vtest.avi``, content from its frame 400. The module is the shipped toy model
``pkg://gen1_video/checkpoints/gen1_toy`` (the ``opencv_toy`` experiment: ``fmnist_toy`` video UNet with channel_mult
[1, 1] and an 8-frame position table, over the shipped ``pkg://ldm/checkpoints/autoencoder_fmnist`` KL-f4, a
ConvContentEncoder). Reference: the paper's frame-by-frame baseline, the same call with ``frame_by_frame=True`` (the
image model on every frame: one doubled-batch pass per DDIM step; ``edit`` ignores ω_t there, as the image model has
no video mode to guide towards). Rows: ours at ω_t 1.5 (two passes per step: video with and without content as one
doubled batch, image mode without content) and at ω_t 1 (plain classifier-free guidance: one doubled batch). The note
gives the UNet calls per DDIM step of each and the GFLOP per frame.

Timing (``bench/_harness.py``): the FLOP-counted run is the warm-up, then the median (min-max) of 3 runs; the thread
count is torch's default unless OMP_NUM_THREADS sets it. Everything runs on CUDA when it is available, else on the CPU.

    .venv/bin/python bench/bench_gen1_video.py            # appended to bench/RESULTS.md
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_gen1_video.py  # 1 thread, offline
    .venv/bin/python bench/bench_gen1_video.py --dry-run  # 4 frames, 16x16 latents, 2 steps, nothing appended
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch
from _harness import append_results, count_flops, matmul_rate, row, sync, timeit
from diffusers import UNet3DConditionModel
from torch import Tensor, nn

from gen1_video.data import read_video
from gen1_video.lit import Gen1VideoDiffusion
from gen1_video.models.video_unet import VideoUNetModel
from gencore.run import load_module
from gencore.testing import randomize_parameters
from ldm.models.unet import UNET_PRESETS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHECKPOINT = "pkg://gen1_video/checkpoints/gen1_toy"
OURS_CONFIG = dict(UNET_PRESETS["bench"], structure_channels=1, max_frames=16, temporal_conv_layers=4, temporal_depth=1)
REF_CONFIG = dict(
    sample_size=32,
    in_channels=5,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(64, 128, 256),
    layers_per_block=2,
    cross_attention_dim=384,
    attention_head_dim=8,
    norm_num_groups=32,
)
VIDEO = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"
EDIT = dict(guidance_scale=3.0, structure_level=2)  # + num_steps, temporal_scale, frame_by_frame per row
MiB = 2**20


# --------------------------------------------------------------------------------------------------- video UNet


def build_unets(frames: int, size: int, seed: int = 0):
    """(ours, diffusers, forward of ours, forward of diffusers): each forward returns the (1, 4, T, H, W) output."""
    torch.manual_seed(seed)
    ours = randomize_parameters(VideoUNetModel(**OURS_CONFIG), seed=seed).eval().to(DEVICE)
    ref = randomize_parameters(UNet3DConditionModel(**REF_CONFIG), seed=seed + 1).eval().to(DEVICE)
    x = torch.randn(1, 4, frames, size, size, device=DEVICE)
    structure = torch.randn(1, 1, frames, size, size, device=DEVICE)
    level = torch.tensor([2], device=DEVICE)
    t = torch.randint(0, 1000, (1,), device=DEVICE)
    context = torch.randn(1, 16, 384, device=DEVICE)

    def fwd_ours() -> Tensor:
        return ours(x, t, context, structure=structure, structure_level=level, image_mode=False)

    def fwd_ref() -> Tensor:  # the structure as the 5th input channel, (B, C, F, H, W) as ours
        return ref(torch.cat([x, structure], dim=1), t, encoder_hidden_states=context).sample

    return ours, ref, fwd_ours, fwd_ref


def fwd_bwd(model: nn.Module, forward: Callable[[], Tensor]) -> None:
    model.zero_grad(set_to_none=True)
    forward().mean().backward()


def saved_activation_bytes(model: nn.Module, forward: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward in one fwd+bwd: each storage once (keyed by its data
    pointer: saved tensors stay alive until backward, so no pointer is reused meanwhile), parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(sizes.values())


def fwd_bwd_costs(model: nn.Module, forward: Callable[[], Tensor]) -> tuple[int, int]:
    """(FLOPs, saved activation bytes) of one fwd+bwd, from a single run."""
    out: dict[str, int] = {}
    flops = count_flops(lambda: out.update(saved=saved_activation_bytes(model, forward)))
    return flops, out["saved"]


def cuda_peak_bytes(model: nn.Module, fn: Callable[[], object]) -> int:
    """``torch.cuda.max_memory_allocated`` during ``fn()`` above what was allocated before (weights, inputs)."""
    model.zero_grad(set_to_none=True)
    gc.collect()
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    return peak


def unet_rows(frames: int, size: int, warmup: int, runs: int, rate: float) -> tuple[list[str], str]:
    """The FLOP-counted runs double as the first warm-up run of each measurement."""
    ours, ref, fwd_ours, fwd_ref = build_unets(frames, size)
    more = max(warmup - 1, 0)
    with torch.no_grad():
        flops_fwd = count_flops(fwd_ours), count_flops(fwd_ref)
        t_fwd = timeit(fwd_ours, warmup=more, runs=runs), timeit(fwd_ref, warmup=more, runs=runs)
    (flops_ours, saved_ours), (flops_ref, saved_ref) = fwd_bwd_costs(ours, fwd_ours), fwd_bwd_costs(ref, fwd_ref)
    t_ours = timeit(lambda: fwd_bwd(ours, fwd_ours), warmup=more, runs=runs)
    t_ref = timeit(lambda: fwd_bwd(ref, fwd_ref), warmup=more, runs=runs)
    t_ours2 = timeit(lambda: fwd_bwd(ours, fwd_ours), warmup=0, runs=runs)  # again: drift on a busy machine
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)

    shape = f"latent (1, 4, {frames}, {size}, {size}) + structure, ctx (1, 16, 384)"
    rows = [
        row(f"video UNet fwd no_grad, {frames} frames, {shape}", t_fwd[0], t_fwd[1], flops_fwd[0], rate),
        row(f"video UNet fwd+bwd, {frames} frames, same input", t_ours, t_ref, flops_ours, rate),
        row("  same, measured again after the reference", t_ours2, t_ref, flops_ours, rate),
    ]

    def pct(flops: int, t: dict[str, float]) -> str:
        return f"{100 * flops / t['median'] / rate:.0f}%"

    n_ours = sum(p.numel() for p in ours.parameters()) / 1e6
    n_ref = sum(p.numel() for p in ref.parameters()) / 1e6
    note = (
        f"Video UNet: ours {n_ours:.1f}M parameters, diffusers UNet3DConditionModel {n_ref:.1f}M (different random "
        f"weights, no key map). FLOPs, counted on each: forward ours {flops_fwd[0] / 1e9:.1f} vs diffusers "
        f"{flops_fwd[1] / 1e9:.1f} GFLOP, fwd+bwd ours {flops_ours / 1e9:.1f} vs diffusers {flops_ref / 1e9:.1f} "
        f"GFLOP; diffusers runs at {pct(flops_fwd[1], t_fwd[1])} (fwd) / {pct(flops_ref, t_ref)} (fwd+bwd) of the "
        f"matmul rate. Time per FLOP, ours/diffusers: fwd "
        f"{(t_fwd[0]['median'] / flops_fwd[0]) / (t_fwd[1]['median'] / flops_fwd[1]):.2f}x, fwd+bwd "
        f"{(t_ours['median'] / flops_ours) / (t_ref['median'] / flops_ref):.2f}x. "
        f"Memory for {frames} frames: activations saved for backward (each storage once, parameters excluded) "
        f"ours {saved_ours / MiB:.1f} MiB vs diffusers {saved_ref / MiB:.1f} MiB ({saved_ours / saved_ref:.2f}x)"
    )
    if DEVICE == "cuda":
        with torch.no_grad():
            peak_fwd = cuda_peak_bytes(ours, fwd_ours), cuda_peak_bytes(ref, fwd_ref)
        peak_step = (
            cuda_peak_bytes(ours, lambda: fwd_bwd(ours, fwd_ours)),
            cuda_peak_bytes(ref, lambda: fwd_bwd(ref, fwd_ref)),
        )
        note += (
            f"; CUDA peak above weights and inputs, no_grad fwd ours {peak_fwd[0] / MiB:.1f} vs diffusers "
            f"{peak_fwd[1] / MiB:.1f} MiB ({peak_fwd[0] / peak_fwd[1]:.2f}x), fwd+bwd ours {peak_step[0] / MiB:.1f} "
            f"vs diffusers {peak_step[1] / MiB:.1f} MiB ({peak_step[0] / peak_step[1]:.2f}x)"
        )
    return rows, note + "."


# --------------------------------------------------------------------------------------------------------- edit


def build_editor() -> Gen1VideoDiffusion:
    """The shipped toy model (``pkg://gen1_video/checkpoints/gen1_toy``: the opencv_toy experiment, 16-frame position
    table), eval mode."""
    module = load_module(CHECKPOINT)
    if not isinstance(module, Gen1VideoDiffusion):
        raise TypeError(f"{CHECKPOINT} holds a {type(module).__name__}, not a Gen1VideoDiffusion")
    return module.eval().to(DEVICE)


def per_frame(t: dict[str, float], frames: int) -> dict[str, float]:
    return {k: v / frames for k, v in t.items()}


def unet_calls(module: Gen1VideoDiffusion, fn: Callable[[], object]) -> list[tuple[int, bool]]:
    """(clips in the batch, image_mode) of every UNet call during ``fn()``."""
    calls: list[tuple[int, bool]] = []

    def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args[0].shape[0], bool(kwargs.get("image_mode", False))))

    handle = module.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return calls


def describe_calls(calls: list[tuple[int, bool]], steps: int) -> str:
    video = sum(1 for _, image in calls if not image)
    image = len(calls) - video
    batches = sorted({b for b, _ in calls})
    return f"{video / steps:g} video-mode + {image / steps:g} image-mode calls at batch {batches}"


def edit_rows(frames: int, steps: int, warmup: int, runs: int, rate: float) -> tuple[list[str], str]:
    """Ours vs frame-by-frame at ω_t 1.5 and 1; the FLOP-counted run doubles as the first warm-up run."""
    module = build_editor()
    frames = min(frames, module.unet.max_frames)  # the shipped toy edits clips of up to 8 frames
    video, _ = read_video(VIDEO, frames, stride=2, size=32, channels=1)  # (1, T, 32, 32)
    content_frame, _ = read_video(VIDEO, 1, start=400, size=32, channels=1)  # (1, 1, 32, 32)
    video = video[None].to(DEVICE)  # (1, 1, T, 32, 32)
    with torch.no_grad():
        content = module.encode_content(content_frame.permute(1, 0, 2, 3).to(DEVICE))  # (1, 1, 384)

    def edit(temporal_scale: float, frame_by_frame: bool) -> Callable[[], Tensor]:
        def run() -> Tensor:
            g = torch.Generator(device=DEVICE).manual_seed(0)
            opts = dict(EDIT, num_steps=steps, temporal_scale=temporal_scale, frame_by_frame=frame_by_frame)
            return module.edit(video, content, generator=g, **opts)

        return run

    def measure(fn: Callable[[], Tensor]) -> dict:
        """FLOPs, UNet calls and output of one run (the first warm-up run), then the timings per frame."""
        r: dict = {}

        def counted() -> None:
            r["calls"] = unet_calls(module, lambda: r.update(out=fn()))

        r["flops"] = count_flops(counted)
        r["t"] = per_frame(timeit(fn, warmup=max(warmup - 1, 0), runs=runs), frames)
        return r

    ours15, ours1, ref = measure(edit(1.5, False)), measure(edit(1.0, False)), measure(edit(1.0, True))

    def ratio(a: dict, b: dict) -> str:
        return f"{a['t']['median']:.3f} vs {b['t']['median']:.3f} s ({a['t']['median'] / b['t']['median']:.2f}x)"

    what = f"{frames} frames 32x32 grey (8x8x4 latents), {steps} DDIM steps, ω 3, t_s 2"
    rows = [
        row(
            f"edit, ms per edited frame, {what}, ω_t 1.5; vs frame-by-frame",
            ours15["t"],
            ref["t"],
            ours15["flops"] // frames,
            rate,
        ),
        row("  same at ω_t 1 (plain CFG) vs frame-by-frame", ours1["t"], ref["t"], ours1["flops"] // frames, rate),
    ]
    same = (measure(edit(1.5, True))["out"] - ref["out"]).abs().max().item()
    note = (
        f"Edit (vtest.avi, {what}): seconds per edited frame, ours vs frame-by-frame: "
        f"ω_t 1.5 {ratio(ours15, ref)}; ω_t 1 {ratio(ours1, ref)}. UNet calls per DDIM step: "
        f"ours ω_t 1.5 {describe_calls(ours15['calls'], steps)}, ω_t 1 {describe_calls(ours1['calls'], steps)}; "
        f"frame-by-frame {describe_calls(ref['calls'], steps)}. GFLOP per edited frame: ours ω_t 1.5 "
        f"{ours15['flops'] / frames / 1e9:.2f}, ω_t 1 {ours1['flops'] / frames / 1e9:.2f}, frame-by-frame "
        f"{ref['flops'] / frames / 1e9:.2f}. Frame-by-frame ignores ω_t: its ω_t 1.5 and 1 edits agree to {same:.1e}."
    )
    return rows, note


# --------------------------------------------------------------------------------------------------------- main


def main(dry_run: bool = False) -> None:
    frames, size, steps = (4, 16, 2) if dry_run else (16, 32, 20)
    warmup, runs = (0, 1) if dry_run else (1, 3)
    rate = matmul_rate(device=DEVICE)
    rows, note = unet_rows(frames, size, warmup, runs, rate)
    e_rows, e_note = edit_rows(frames, steps, warmup, runs, rate)
    note = (
        f"{note} {e_note} Device {DEVICE}; fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s. "
        f"CPU capability: {torch.backends.cpu.get_cpu_capability()}."
    )
    if dry_run:
        print("\n".join(rows + e_rows) + "\n\n" + note)
        return
    append_results(
        "gen1_video: VideoUNetModel vs diffusers UNet3DConditionModel (16 frames); edit vs frame-by-frame",
        rows + e_rows,
        note=note,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="4 frames, 16x16 latents, 2 DDIM steps, one run each, nothing appended"
    )
    main(dry_run=parser.parse_args().dry_run)
