"""The GPU path (issue 20). On the CPU machine: ``bench/gpu.py --cpu`` runs (its shapes and FLOP counts are checked
by the script itself). On a GPU machine (``-m gpu``): a bf16 training run of every package's default recipe, the
xformers attention backend against SDPA, ``callbacks=compile``, no host sync in an MMDiT / UNet training step under
CUDA's sync-debug mode, and gradient checkpointing giving the same gradients in bf16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gencore.data.fashion_mnist import DEFAULT_ROOT
from gencore.io import GENLAB_NAMESPACES

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing (make data)"
)
PACKAGES = [name for name in GENLAB_NAMESPACES if name != "gencore"]  # the ten packages


@pytest.mark.slow
def test_gpu_bench_script_runs_on_the_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--cpu", "--skip", "unet", "sampling"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| MMDiT train step, hidden 128 x 2 blocks" in proc.stdout
    assert "| attention sdpa" in proc.stdout and "| attention math" in proc.stdout
    assert "FLOPs counted" in proc.stdout


@needs_fmnist
@pytest.mark.parametrize(
    ("package", "first_stage"),
    [("ldm", "pkg://ldm/checkpoints/autoencoder_fmnist"), ("sd3_flow", "pkg://ldm/checkpoints/autoencoder_fmnist_c16")],
)
def test_bf16_mixed_training_through_a_frozen_vae_on_the_cpu(package, first_stage, tmp_path):
    """The latent recipes' default runs with ``trainer.precision=bf16-mixed`` (CPU autocast): the denoiser in bf16,
    the frozen VAE in its own fp32 (gencore.modules.own_precision), a finite loss, an export."""
    from gencore import run
    from gencore.cli import compose

    configs = __import__(f"{package}.cli", fromlist=["CONFIGS"]).CONFIGS
    overrides = ["debug=fast", "trainer.precision=bf16-mixed", f"first_stage={first_stage}", f"run_dir={tmp_path}"]
    result = run.train(compose(configs, "train", [*overrides, "trainer.max_steps=2", "datamodule.num_workers=0"]))
    assert result.trainer.precision == "bf16-mixed" and result.trainer.global_step == 2
    losses = [v for k, v in result.metrics.items() if "loss" in k]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses), result.metrics
    assert (tmp_path / "export" / "model.safetensors").is_file()


@pytest.mark.gpu
@needs_cuda
@needs_fmnist
@pytest.mark.parametrize("package", PACKAGES)
def test_bf16_training_run_of_the_default_recipe(package, tmp_path):
    """``<name>-train debug=fast trainer=gpu``: bf16-mixed on one GPU, a few steps, finite, exported."""
    from gencore import run
    from gencore.cli import compose

    configs = __import__(f"{package}.cli", fromlist=["CONFIGS"]).CONFIGS
    cfg = compose(configs, "train", ["debug=fast", "trainer=gpu", f"run_dir={tmp_path}"])
    assert cfg.trainer.precision == "bf16-mixed"
    train = __import__(f"{package}.tasks", fromlist=["train"]).train if package == "imagebart" else run.train
    result = train(cfg)
    assert (tmp_path / "export" / "model.safetensors").is_file()
    losses = [v for k, v in result.metrics.items() if "loss" in k]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses), result.metrics


@pytest.mark.gpu
@needs_cuda
def test_xformers_backend_matches_sdpa():
    pytest.importorskip("xformers")
    from gencore.attention import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for kwargs in ({}, {"causal": True}):
        a = attention(q, k, v, backend="sdpa", **kwargs)
        (ga,) = torch.autograd.grad(a.float().sum(), q)
        b = attention(q, k, v, backend="xformers", **kwargs)
        (gb,) = torch.autograd.grad(b.float().sum(), q)
        assert (a.float() - b.float()).abs().max() < 2e-2
        assert (ga.float() - gb.float()).abs().max() < 5e-2


@pytest.mark.gpu
@needs_cuda
@needs_fmnist
def test_compile_callback_trains_on_the_gpu(tmp_path):
    from gencore import run
    from gencore.cli import compose
    from shapebias.cli import CONFIGS

    cfg = compose(CONFIGS, "train", ["experiment=tiny", "trainer=gpu", "callbacks=compile", f"run_dir={tmp_path}"])
    result = run.train(cfg)
    assert result.trainer.global_step == cfg.trainer.max_steps
    assert (tmp_path / "export" / "model.safetensors").is_file()


def _mmdit_and_unet():
    from gencore.testing import randomize_parameters
    from ldm.models.unet import UNET_PRESETS, UNetModel
    from sd3_flow.models.mmdit import MMDIT_PRESETS, MMDiT

    torch.manual_seed(0)
    mmdit = randomize_parameters(MMDiT(**MMDIT_PRESETS["bench"]), seed=0).cuda()
    unet = randomize_parameters(UNetModel(**UNET_PRESETS["bench"]), seed=0).cuda()
    x = torch.randn(2, 16, 32, 32, device="cuda")
    ctx, pooled, t = torch.randn(2, 77, 512, device="cuda"), torch.randn(2, 128, device="cuda"), torch.rand(2).cuda()
    z, tu, cu = torch.randn(2, 4, 32, 32, device="cuda"), torch.randint(0, 1000, (2,)).cuda(), torch.randn(2, 16, 384)
    return (mmdit, lambda: mmdit(x, ctx, pooled, t * 1000)), (unet, lambda: unet(z, tu, cu.cuda()))


@pytest.mark.gpu
@needs_cuda
def test_no_host_sync_in_the_bf16_training_step():
    for model, forward in _mmdit_and_unet():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step(model=model, forward=forward, opt=opt) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward().float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: lazy state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@needs_cuda
def test_gradient_checkpointing_gives_the_same_gradients_in_bf16():
    for model, forward in _mmdit_and_unet():
        grads = []
        for checkpointing in (False, True):
            if hasattr(model, "gradient_checkpointing"):
                model.gradient_checkpointing = checkpointing
            else:  # ldm: use_checkpoint on every block
                for m in model.modules():
                    if hasattr(m, "use_checkpoint"):
                        m.use_checkpoint = checkpointing
                    if hasattr(m, "checkpoint"):
                        m.checkpoint = checkpointing
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward().float().square().mean()
            loss.backward()
            grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
        assert torch.allclose(grads[0], grads[1], rtol=1e-2, atol=1e-3)
