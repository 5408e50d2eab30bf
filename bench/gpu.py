"""The GPU path in one run of a few minutes (issue 20): bf16 training steps of the two big denoisers against diffusers
on the same card, sampling throughput of the shipped toy models, attention backends side by side, peak memory.

Rows (GPU run; ``--cpu``: the same rows at tiny sizes on the CPU, fp32, to check the script, its shapes and its FLOP
counts where no GPU is lent):

- the card's measured **bf16 matmul rate** (8192^3, the denominator of every "% of the bf16 matmul rate");
- **MMDiT training step at SD3-medium width**: hidden 1536, 24 heads of 64, ``--mmdit-blocks`` joint blocks (4),
  16-channel 64 x 64 latents, patch 2 -> 1024 image tokens + 154 text tokens (CLIP 77 + T5 77), pooled 2048, batch 4,
  bf16 autocast, forward + backward + fused AdamW: ``sd3_flow.models.mmdit.MMDiT`` vs diffusers'
  ``SD3Transformer2DModel`` with the same weights (``sd3_flow.convert.to_diffusers``); TFLOP/s from the FLOPs torch's
  FlopCounterMode counts for the step, and as a share of the bf16 matmul rate; the analytic FLOP count beside it;
- **LDM UNet training step**: the SD v1 UNet (``ldm`` preset ``sd_v1``: 320 channels, 860 M parameters), 64 x 64 x 4
  latents, 77 x 768 context, batch 4, the same bf16 step: ``ldm.models.unet.UNetModel`` vs diffusers'
  ``UNet2DConditionModel`` (``ldm.convert.unet_to_diffusers``);
- **sampling throughput** of the shipped toy checkpoints that generate (images/s at each model's default steps);
- **attention backends**: ``gencore.attention`` sdpa / math / xformers (when installed) on the MMDiT's joint
  attention shape, bf16 forward + backward;
- peak memory (``torch.cuda.max_memory_allocated``) of every step row.

Results are appended to bench/RESULTS.md under the card's name (``--no-append`` to only print). Run::

    python bench/gpu.py                 # on a GPU machine: a few minutes
    python bench/gpu.py --cpu           # tiny sizes on the CPU: checks, prints, appends nothing
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _harness import RESULTS, count_flops, machine, matmul_rate, sync, timeit

from gencore.attention import attention, available_backends
from gencore.testing import randomize_parameters


@dataclass
class Sizes:
    """Everything a run measures, at the GPU sizes or the ``--cpu`` ones."""

    device: str
    dtype: torch.dtype
    mmdit_depth: int  # hidden 64·d, d heads (SD3-medium: 24)
    mmdit_blocks: int
    latent: int  # latent side (64: 1024 image tokens at patch 2)
    text_tokens: int
    batch: int
    unet_preset: str
    unet_latent: int
    samples: int
    attn_shape: tuple[int, int, int, int]
    runs: int


GPU = Sizes("cuda", torch.bfloat16, 24, 4, 64, 154, 4, "sd_v1", 64, 64, (4, 24, 1178, 64), 10)
CPU = Sizes("cpu", torch.float32, 2, 2, 8, 10, 1, "tiny", 8, 2, (1, 2, 74, 16), 2)


def peak_memory(fn: Callable[[], object], device: str) -> float | None:
    """GiB allocated at the peak of one ``fn()`` (None on the CPU)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def train_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor], dtype: torch.dtype, opt) -> Callable:
    """One training step: forward under autocast (``dtype`` on CUDA; fp32 on the CPU), backward, optimizer step."""
    device = next(model.parameters()).device.type

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward().float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused or None)


@dataclass
class Measured:
    name: str
    ours_s: float
    ref_s: float | None
    flops: int | None
    peak_gib: float | None
    ref_peak_gib: float | None = None
    extra: str = ""


def versus(name: str, step_ours: Callable[[], None], step_ref: Callable[[], None], flops: int, s: Sizes) -> Measured:
    """A step row: the median times of ours and the reference, and each one's peak memory."""
    t_ours = timeit(step_ours, warmup=2, runs=s.runs)["median"]
    t_ref = timeit(step_ref, warmup=2, runs=s.runs)["median"]
    return Measured(name, t_ours, t_ref, flops, peak_memory(step_ours, s.device), peak_memory(step_ref, s.device))


# ------------------------------------------------------------------------------------------------------- MMDiT


def mmdit_flops(cfg: dict, batch: int, n_img: int, n_txt: int) -> int:
    """Analytic FLOPs of one MMDiT training step (forward x 3): the joint blocks' linear layers and attention; the
    embedders and the final layer are small and left out (so the counted figure is a few % higher)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    n = n_img + n_txt
    per_block_linear = (
        2
        * batch
        * (
            n_img * (3 * d * d + d * d + 2 * 4 * d * d)  # image stream: qkv, out, MLP (4x)
            + n_txt * (3 * d * d + d * d + 2 * 4 * d * d)  # text stream: the same
        )
    )
    per_block_attn = 2 * 2 * batch * n * n * d  # q k^T and attention @ v
    forward = cfg["num_layers"] * (per_block_linear + per_block_attn)
    return 3 * forward


def mmdit_row(s: Sizes) -> tuple[Measured, str]:
    from diffusers import SD3Transformer2DModel

    from sd3_flow.convert import diffusers_config, to_diffusers
    from sd3_flow.models.mmdit import MMDiT, depth_config

    cfg = depth_config(s.mmdit_depth, num_layers=s.mmdit_blocks, sample_size=s.latent, pos_embed_max_size=s.latent)
    torch.manual_seed(0)
    ours = randomize_parameters(MMDiT(**cfg), seed=0).train()
    ref = SD3Transformer2DModel(**diffusers_config(**cfg)).train()
    ref.load_state_dict(to_diffusers(ours.state_dict(), cfg), strict=True)
    ours, ref = ours.to(s.device), ref.to(s.device)
    x = torch.randn(s.batch, cfg["in_channels"], s.latent, s.latent, device=s.device)
    ctx = torch.randn(s.batch, s.text_tokens, cfg["joint_attention_dim"], device=s.device)
    pooled = torch.randn(s.batch, cfg["pooled_projection_dim"], device=s.device)
    t = torch.rand(s.batch, device=s.device) * 1000
    with torch.no_grad():
        a = ours(x, ctx, pooled, t)
        b = ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    if a.shape != x.shape or b.shape != x.shape:
        raise AssertionError(f"MMDiT output {tuple(a.shape)} / diffusers {tuple(b.shape)} != input {tuple(x.shape)}")
    diff = (a - b).abs().max().item()
    step_ours = train_step(ours, lambda: ours(x, ctx, pooled, t), s.dtype, optimizer(ours))
    step_ref = train_step(
        ref,
        lambda: ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample,
        s.dtype,
        optimizer(ref),
    )
    n_img = (s.latent // cfg["patch_size"]) ** 2
    counted = count_flops(step_ours)
    analytic = mmdit_flops(cfg, s.batch, n_img, s.text_tokens)
    if s.device == "cpu" and not 0.9 < counted / analytic < 1.35:
        raise AssertionError(f"MMDiT FLOPs: counted {counted:.3e} vs analytic {analytic:.3e}")
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    m = versus(
        f"MMDiT train step, hidden {64 * s.mmdit_depth} x {s.mmdit_blocks} blocks ({params:.0f} M), batch {s.batch}, "
        f"{n_img} image + {s.text_tokens} text tokens: ours vs diffusers SD3Transformer2DModel",
        step_ours,
        step_ref,
        counted,
        s,
    )
    note = f"MMDiT: outputs agree to {diff:.1e} (fp32); FLOPs counted {counted / 1e12:.2f} T"
    note += f", analytic {analytic / 1e12:.2f} T"
    return m, note


# -------------------------------------------------------------------------------------------------------- UNet


def unet_row(s: Sizes) -> tuple[Measured, str]:
    from diffusers import UNet2DConditionModel

    from ldm.convert import diffusers_unet_config, unet_to_diffusers
    from ldm.models.unet import UNET_PRESETS, UNetModel

    cfg = dict(UNET_PRESETS[s.unet_preset])
    torch.manual_seed(0)
    ours = randomize_parameters(UNetModel(**cfg), seed=0).train()
    ref = UNet2DConditionModel(**diffusers_unet_config(**cfg)).train()
    ref.load_state_dict(unet_to_diffusers(ours.state_dict(), cfg), strict=True)
    ours, ref = ours.to(s.device), ref.to(s.device)
    x = torch.randn(s.batch, cfg["in_channels"], s.unet_latent, s.unet_latent, device=s.device)
    t = torch.randint(0, 1000, (s.batch,), device=s.device)
    ctx_dim = cfg.get("context_dim") or 32
    ctx = torch.randn(s.batch, 77 if s.device == "cuda" else 5, ctx_dim, device=s.device)
    with torch.no_grad():
        a = ours(x, t, ctx)
        b = ref(x, t, encoder_hidden_states=ctx).sample
    if a.shape != (s.batch, cfg["out_channels"], s.unet_latent, s.unet_latent) or a.shape != b.shape:
        raise AssertionError(f"UNet output {tuple(a.shape)} / diffusers {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    step_ours = train_step(ours, lambda: ours(x, t, ctx), s.dtype, optimizer(ours))
    step_ref = train_step(ref, lambda: ref(x, t, encoder_hidden_states=ctx).sample, s.dtype, optimizer(ref))
    counted = count_flops(step_ours)
    counted_ref = count_flops(step_ref)
    if s.device == "cpu" and not 0.95 < counted / counted_ref < 1.05:
        raise AssertionError(f"UNet FLOPs: ours {counted:.3e} vs diffusers {counted_ref:.3e} (the same network)")
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    m = versus(
        f"LDM UNet train step, preset {s.unet_preset} ({params:.0f} M), batch {s.batch}, {s.unet_latent}^2 latents: "
        "ours vs diffusers UNet2DConditionModel",
        step_ours,
        step_ref,
        counted,
        s,
    )
    return (
        m,
        f"UNet: outputs agree to {diff:.1e} (fp32); FLOPs {counted / 1e12:.2f} T (diffusers "
        f"{counted_ref / 1e12:.2f} T)",
    )


# ---------------------------------------------------------------------------------------------------- sampling

SHIPPED = (
    "pkg://ldm/checkpoints/ldm_fmnist_class",
    "pkg://sd3_flow/checkpoints/fmnist_rf_lognorm",
    "pkg://ladd_turbo/checkpoints/fmnist_turbo",
    "pkg://taming/checkpoints/transformer_fmnist_class",
    "pkg://imagebart/checkpoints/imagebart_fmnist_class",
)


def sampling_rows(s: Sizes) -> list[Measured]:
    from gencore import run

    rows = []
    for path in SHIPPED:
        module = run.load_module(path).to(s.device).eval()
        n = s.samples

        def sample(module=module, n=n, path=path) -> None:
            with torch.autocast(s.device, dtype=s.dtype, enabled=s.dtype != torch.float32):
                out = run.generate(module, n, batch_size=n)
            if out["images"].shape[0] != n:
                raise AssertionError(f"{path}: {out['images'].shape[0]} images for {n}")

        sample()  # warm-up (weights, caches, kernels)
        sync()
        t0 = time.perf_counter()
        sample()
        sync()
        dt = time.perf_counter() - t0
        rows.append(
            Measured(
                f"sampling {path.split('/')[-1]}: {n} images", dt, None, None, None, extra=f"{n / dt:.1f} images/s"
            )
        )
    return rows


# --------------------------------------------------------------------------------------------------- attention


def attention_rows(s: Sizes) -> list[Measured]:
    b, h, n, d = s.attn_shape
    q, k, v = (torch.randn(b, h, n, d, device=s.device, dtype=s.dtype, requires_grad=True) for _ in range(3))
    backends = [name for name in ("sdpa", "math", "xformers") if name in available_backends()]
    if s.device != "cuda":
        backends = [name for name in backends if name != "xformers"]
    rows, reference = [], None
    for name in backends:

        def step(name=name) -> None:
            out = attention(q, k, v, backend=name)
            out.float().square().mean().backward()
            q.grad = k.grad = v.grad = None

        try:
            with torch.no_grad():
                out = attention(q, k, v, backend=name)
        except (ImportError, RuntimeError) as err:  # xformers missing or without kernels for this card
            rows.append(
                Measured(
                    f"attention {name}: unavailable ({str(err).splitlines()[0][:80]})", float("nan"), None, None, None
                )
            )
            continue
        if reference is None:
            reference = out.float()
        elif (out.float() - reference).abs().max().item() > (2e-2 if s.dtype != torch.float32 else 1e-4):
            raise AssertionError(f"attention backend {name} differs from sdpa")
        flops = count_flops(step)
        t = timeit(step, warmup=2, runs=s.runs)["median"]
        rows.append(
            Measured(f"attention {name}, {tuple(s.attn_shape)} fwd+bwd", t, None, flops, peak_memory(step, s.device))
        )
    return rows


# -------------------------------------------------------------------------------------------------------- main


def table_row(m: Measured, rate: float) -> str:
    pct = f"{100 * m.flops / m.ours_s / rate:.0f}%" if m.flops and m.ours_s == m.ours_s else "-"
    tflops = f"{m.flops / m.ours_s / 1e12:.1f}" if m.flops and m.ours_s == m.ours_s else "-"
    ref = f"{m.ref_s * 1e3:.1f}" if m.ref_s else "-"
    ratio = f"{m.ours_s / m.ref_s:.2f}x" if m.ref_s else "-"
    mem = f"{m.peak_gib:.1f}" if m.peak_gib is not None else "-"
    ref_mem = f"{m.ref_peak_gib:.1f}" if m.ref_peak_gib is not None else "-"
    name = f"{m.name} ({m.extra})" if m.extra else m.name
    return f"| {name} | {m.ours_s * 1e3:.1f} | {ref} | {ratio} | {tflops} | {pct} | {mem} / {ref_mem} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (checks the script; appends nothing)")
    p.add_argument("--mmdit-blocks", type=int, default=None, help="joint blocks of the MMDiT row (GPU default 4)")
    p.add_argument("--no-append", action="store_true", help="print only")
    p.add_argument("--skip", nargs="*", default=(), choices=("mmdit", "unet", "sampling", "attention"))
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device here; run it on a GPU machine, or pass --cpu to check it")
    s = CPU if args.cpu else GPU
    if args.mmdit_blocks:
        s.mmdit_blocks = args.mmdit_blocks
    if s.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rate = matmul_rate(8192 if s.device == "cuda" else 512, s.device, s.dtype, runs=10)
    measured, notes = [], []
    if "mmdit" not in args.skip:
        m, n = mmdit_row(s)
        measured.append(m)
        notes.append(n)
    if "unet" not in args.skip:
        m, n = unet_row(s)
        measured.append(m)
        notes.append(n)
    if "sampling" not in args.skip:
        measured += sampling_rows(s)
    if "attention" not in args.skip:
        measured += attention_rows(s)
    dtype = str(s.dtype).replace("torch.", "")
    header = (
        "| measurement | ours ms | reference ms | ours/ref | TFLOP/s "
        f"| % of the {dtype} matmul rate | peak GiB ours / ref |\n"
        "|---|---|---|---|---|---|---|"
    )
    rows = [table_row(m, rate) for m in measured]
    note = "; ".join(notes) + f". {dtype} matmul rate measured in this run: {rate / 1e12:.1f} TFLOP/s on {machine()}."
    if args.cpu or args.no_append:
        print(header + "\n" + "\n".join(rows) + "\n\n" + note)
        return
    title = f"GPU path: bf16 training steps, sampling, attention — {datetime.date.today().isoformat()}, torch "
    text = f"\n### {title}{torch.__version__}, {machine()}\n\n{header}\n" + "\n".join(rows) + f"\n\n{note}\n"
    print(text)
    with open(RESULTS, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
