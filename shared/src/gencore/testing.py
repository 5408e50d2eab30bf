"""A pytest kit for model contracts, used by every package's tests.

- :func:`randomize_parameters` — make default-zero-initialised layers non-trivial before a parity test;
- :func:`assert_grads_reach_all_parameters` — every trainable parameter gets a finite, non-zero gradient;
- :func:`assert_state_dict_roundtrip` — safetensors save / load reproduces outputs exactly;
- :func:`assert_deterministic` — the same seed gives the same output;
- :func:`logged_values` — one metric's values from a run folder's CSV logs (all versions, i.e. across resumes);
- :func:`mean_image_psnr` — the trivial reconstruction baseline on Fashion-MNIST (the training set's mean image);
- :class:`TinyAutoencoderModule` — a small real LightningModule (conv autoencoder with a frozen codec) for run-plumbing
  tests: it trains, logs images, and generates;
- :func:`no_host_sync` / :func:`assert_no_host_sync` — a training step that waits on the device fails: on a GPU by
  ``torch.cuda.set_sync_debug_mode("error")``, on the CPU by refusing, in genlab code, the calls that would wait
  (``.item()``, ``.tolist()``, ``bool`` / ``int`` / ``float`` of a tensor, ``nonzero``, ``bincount``, boolean masks).
"""

from __future__ import annotations

import contextlib
import csv
import os
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.latents import IdentityCodec
from gencore.modules import trainable_parameters

__all__ = [
    "FailAtStep",
    "HostSyncError",
    "KillAtStep",
    "PoisonAtStep",
    "TinyAutoencoderModule",
    "assert_deterministic",
    "assert_grads_reach_all_parameters",
    "assert_no_host_sync",
    "assert_state_dict_roundtrip",
    "fake_classes",
    "logged_values",
    "mean_image_psnr",
    "no_host_sync",
    "randomize_parameters",
    "sync_test_devices",
]


@torch.no_grad()
def randomize_parameters(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Every parameter ~ N(0, std²), plus 1 on 1-D weights (norm scales) so activations stay in range."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * std)
        if p.dim() == 1 and name.endswith("weight"):
            p.add_(1.0)
    return module


def assert_grads_reach_all_parameters(module: nn.Module, loss: Tensor, *, allow: tuple[str, ...] = ()) -> None:
    """Backpropagate ``loss`` and check each trainable parameter (not under ``allow`` prefixes) got a usable grad."""
    for p in module.parameters():
        p.grad = None
    loss.backward()
    dead = [
        n
        for n, p in module.named_parameters()
        if p.requires_grad
        and not n.startswith(allow)
        and (p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0)
    ]
    assert not dead, f"parameters without a gradient: {dead[:10]}{' ...' if len(dead) > 10 else ''}"


def assert_state_dict_roundtrip(
    module: nn.Module, make: Callable[[], nn.Module], inputs: tuple, tmp_path: Path, **kwargs: Any
) -> None:
    """Save ``module`` to safetensors, load into ``make()``, and require bit-identical outputs on ``inputs``."""
    from gencore.io import load_checkpoint, load_state_dict, save_safetensors

    path = save_safetensors(module.state_dict(), Path(tmp_path) / "roundtrip.safetensors")
    other = make()
    load_state_dict(other, load_checkpoint(path))
    module.eval()
    other.eval()
    with torch.no_grad():
        a, b = module(*inputs, **kwargs), other(*inputs, **kwargs)
    a, b = (a, b) if isinstance(a, Tensor) else (a[0], b[0])
    assert torch.equal(a, b), f"outputs differ after a safetensors round trip (max {float((a - b).abs().max())})"


def assert_deterministic(fn: Callable[[], Tensor], seed: int = 0) -> None:
    torch.manual_seed(seed)
    a = fn()
    torch.manual_seed(seed)
    b = fn()
    assert torch.equal(a, b), "same seed, different output"


def logged_values(run_dir: str | Path, key: str) -> list[float]:
    """The values of ``key`` in ``run_dir/csv/version_*/metrics.csv``, oldest version first (a resumed run logs to
    a new version)."""
    versions = sorted(Path(run_dir, "csv").glob("version_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    if not versions:
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} has no csv/version_*/metrics.csv")
    values: list[float] = []
    for version in versions:
        with open(version / "metrics.csv") as f:
            values += [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    return values


def mean_image_psnr(image_size: int = 28, *, n_train: int = 5000, n_test: int = 200) -> float:
    """Mean PSNR (images in [-1, 1], data range 2) of "reconstructing" each of the first ``n_test`` Fashion-MNIST
    test images by the mean of the first ``n_train`` training images: what a model that ignores its input scores
    (about 12 dB at 16×16). Reconstruction tests assert a margin over it rather than a magic number."""
    from gencore.data.fashion_mnist import FashionMNIST

    train = FashionMNIST(split="train", image_size=image_size, limit=n_train)
    test = FashionMNIST(split="test", image_size=image_size, limit=n_test)
    mean = torch.stack([train[i]["image"] for i in range(len(train))]).mean(0)
    target = torch.stack([test[i]["image"] for i in range(len(test))])
    mse = (mean.expand_as(target) - target).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(4.0 / mse)).mean())


class TinyAutoencoderModule(L.LightningModule):
    """A conv autoencoder with a 2-D-per-pixel bottleneck, trained with MSE; ``generate`` decodes Gaussian latents.

    Small on purpose (for plumbing tests), but real: its loss decreases on Fashion-MNIST. It holds a frozen
    :class:`IdentityCodec`-like submodule (``codec``) with a parameter, to test that frozen weights stay out of the
    optimizer and the export.
    """

    def __init__(self, channels: int = 1, width: int = 16, latent_channels: int = 4, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, width, 3, 2, 1), nn.SiLU(), nn.Conv2d(width, latent_channels, 3, 2, 1)
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_channels, width, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(width, channels, 4, 2, 1)
        )
        self.codec = IdentityCodec(channels)
        self.codec.register_parameter("gain", nn.Parameter(torch.ones(()), requires_grad=False))
        self.latent_channels, self.lr = latent_channels, lr

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(self.codec.encode(x) * self.codec.gain))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = F.mse_loss(self(batch["image"]), batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", F.mse_loss(self(batch["image"]), batch["image"]), batch_size=len(batch["image"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(trainable_parameters(self), lr=self.lr)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 8) -> dict[str, Tensor]:
        x = batch["image"][:n]
        return {"inputs": x, "reconstructions": self(x).clamp(-1, 1)}

    @torch.no_grad()
    def generate(self, n: int, size: int = 32, labels: list[int] | None = None) -> dict[str, Any]:
        z = torch.randn(n, self.latent_channels, size // 4, size // 4, device=self.device)
        out: dict[str, Any] = {"images": self.decoder(z).clamp(-1, 1)}
        if labels is not None:
            out["labels"] = torch.as_tensor(labels[:n])
        return out


class FailAtStep(L.Callback):
    """Raise after ``step`` training batches: simulates a crash (power loss, OOM) for resume tests."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


class KillAtStep(L.Callback):
    """End the process at once (``os._exit``: no exception, no cleanup, no crash checkpoint: what SIGKILL or a lost
    machine does) when ``trainer.global_step`` reaches ``step``, for resume tests."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os._exit(137)


class PoisonAtStep(L.Callback):
    """From training step ``step`` on, make things non-finite, for the non-finite guard's tests: ``what="weights"``
    fills the first trainable parameter with NaN after the step; ``what="grads"`` puts a NaN in its gradient before
    the optimizer step (``every``: on each step from then on, else once)."""

    def __init__(self, step: int, what: str = "weights", every: bool = False) -> None:
        if what not in ("weights", "grads"):
            raise ValueError(f"PoisonAtStep: what must be 'weights' or 'grads', got {what!r}")
        self.step, self.what, self.every, self.done = step, what, every, False

    def _due(self, trainer: L.Trainer) -> bool:
        return trainer.global_step >= self.step and (self.every or not self.done)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self.what == "grads" and self._due(trainer):
            p = next(p for p in pl_module.parameters() if p.requires_grad and p.grad is not None)
            p.grad.view(-1)[0] = float("nan")
            self.done = True

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.what == "weights" and self._due(trainer):
            next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))
            self.done = True


def tiny_clip(folder: str | Path, *, hidden_size: int = 32, projection_dim: int = 16, seed: int = 0) -> Path:
    """Save a random tiny CLIP (text + vision, transformers format) with a byte-level tokenizer (no merges) and an
    image processor to ``folder``: a stand-in for openai/clip-vit-large-patch14 in tests of local-path loaders."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=len(vocab) - 2,
            eos_token_id=len(vocab) - 1,
            pad_token_id=len(vocab) - 1,
            projection_dim=projection_dim,
        ),
        vision_config=dict(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(folder)
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------- host syncs


class HostSyncError(RuntimeError):
    """Code in a training step read a tensor's values on the host (on a GPU: waited for the device)."""


# Where waiting is not ours to fix (the optimizer reads its CPU step counter; Lightning's loop). Everything else --
# genlab, and third-party model code it calls -- is checked.
_LIBRARY_PARTS = ("/torch/", "/lightning/", "/lightning_fabric/", "/lightning_utilities/", "/torchmetrics/")
_SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "nonzero", "bincount", "unique", "masked_select", "__bool__")
_SYNC_METHODS += ("__int__", "__float__", "__index__", "__format__")


def _guarded(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Tensor, *args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1)
        if not any(part in caller.f_code.co_filename for part in _LIBRARY_PARTS):
            where = f"{caller.f_code.co_filename}:{caller.f_lineno} ({caller.f_code.co_name})"
            raise HostSyncError(f"Tensor.{name} in a training step would wait for the device, at {where}")
        return original(self, *args, **kwargs)

    return method


def _guarded_getitem(original: Callable[..., Any]) -> Callable[..., Any]:
    def getitem(self: Tensor, index: Any) -> Any:
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, Tensor) and p.dtype == torch.bool for p in parts):
            caller = sys._getframe(1)
            if not any(part in caller.f_code.co_filename for part in _LIBRARY_PARTS):
                where = f"{caller.f_code.co_filename}:{caller.f_lineno} ({caller.f_code.co_name})"
                raise HostSyncError(f"boolean-mask indexing in a training step would wait for the device, at {where}")
        return original(self, index)

    return getitem


@contextlib.contextmanager
def no_host_sync(device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside the block, a host sync is an error: on CUDA through ``torch.cuda.set_sync_debug_mode("error")``; on the
    CPU (where nothing waits) by refusing the Python-level calls that would wait on an accelerator when they come
    from code outside torch / Lightning, with device-aware checks (:func:`gencore.modules.check_index_range`) taking
    their accelerator path."""
    import gencore.modules as modules

    if torch.device(device).type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        return
    saved = {name: getattr(Tensor, name) for name in (*_SYNC_METHODS, "__getitem__")}
    saved_functions = {name: getattr(torch, name) for name in ("nonzero", "bincount", "unique", "masked_select")}
    try:
        for name in _SYNC_METHODS:
            setattr(Tensor, name, _guarded(name, saved[name]))
        Tensor.__getitem__ = _guarded_getitem(saved["__getitem__"])  # type: ignore[method-assign]
        for name, fn in saved_functions.items():
            setattr(torch, name, _guarded(name, fn))
        modules._SIMULATE_ACCELERATOR = True
        yield
    finally:
        for name, fn in saved.items():
            setattr(Tensor, name, fn)
        for name, fn in saved_functions.items():
            setattr(torch, name, fn)
        modules._SIMULATE_ACCELERATOR = False


class _GuardSteps(L.Callback):
    """Turns :func:`no_host_sync` on from ``on_train_batch_start`` to ``on_train_batch_end`` after ``warmup`` batches
    (forward, backward and optimizer steps of every guarded batch)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.guarded, self._ctx = warmup, 0, None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if idx >= self.warmup:
            self._ctx = no_host_sync(pl_module.device)
            self._ctx.__enter__()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)
            self.guarded += 1

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_batch_end(trainer, pl_module)


def sync_test_devices() -> list[Any]:
    """pytest parameters for a recipe's no-host-sync test: ``"cpu"`` (the guard), and ``"cuda"`` marked ``gpu``
    (CUDA's sync-debug mode; it runs where a GPU exists):
    ``@pytest.mark.parametrize("device", sync_test_devices())``."""
    import pytest

    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def assert_no_host_sync(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    steps: int = 3,
    warmup: int = 1,
    device: str = "cpu",
    precision: str = "32-true",
) -> None:
    """Train ``module`` for ``warmup + steps`` batches on ``device`` (``cpu`` / ``cuda``) and fail
    (:class:`HostSyncError`, or CUDA's sync-debug error) if any of the last ``steps`` batches syncs with the host.
    ``warmup`` batches fill one-time state first (latent statistics, caches). Lightning's by-design warnings
    (``gencore.run.EXPECTED_LIGHTNING_WARNINGS``) are kept out, as in a run."""
    import warnings

    from gencore.run import EXPECTED_LIGHTNING_WARNINGS

    accelerator = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}.get(device)
    if accelerator is None:
        raise ValueError(f"assert_no_host_sync: device must be 'cpu' or 'cuda', got {device!r}")
    guard = _GuardSteps(warmup)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=(warmup + steps) * (1 if module.automatic_optimization else 2),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard],
    )
    with warnings.catch_warnings():
        for message in EXPECTED_LIGHTNING_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, datamodule=datamodule)
    if guard.guarded < steps:
        raise AssertionError(f"only {guard.guarded} of {steps} training batches ran under the host-sync guard")


@contextlib.contextmanager
def fake_classes(spec):
    """Classes named like foreign ones (e.g. Lightning 1.x), importable by pickle from stand-in modules: for writing
    checkpoints shaped like the released Lightning 1.x pickles in tests (``{qualname: base class}`` -> the classes).

    Every module on the way (``pytorch_lightning``, ``pytorch_lightning.callbacks``, ...) is a stand-in while the
    context is open, so an installed package of that name is neither imported nor touched."""
    roots = {q.split(".", 1)[0] for q in spec}
    saved = {k: v for k, v in sys.modules.items() if k.split(".", 1)[0] in roots}
    for k in saved:
        del sys.modules[k]
    made = {}
    try:
        for qualname, base in spec.items():
            parts = qualname.split(".")
            for i in range(1, len(parts)):
                sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
            mod_name = ".".join(parts[:-1])
            cls = type(parts[-1], (base,), {"__module__": mod_name})
            setattr(sys.modules[mod_name], parts[-1], cls)
            made[qualname] = cls
        yield made
    finally:
        for k in [k for k in sys.modules if k.split(".", 1)[0] in roots]:
            del sys.modules[k]
        sys.modules.update(saved)
