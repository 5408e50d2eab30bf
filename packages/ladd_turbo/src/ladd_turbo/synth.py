"""Synthetic training data for LADD (Sec. 4.1: "synthetic data beats real data"): the teacher's own guided samples.

:func:`synthesize` runs the teacher (an sd3_flow :class:`~sd3_flow.lit.RectifiedFlowModule`) with classifier-free
guidance over a prompt list and stores, per sample, the **model-space latent** (what the teacher's sampler returns,
before the latent normaliser is undone), its prompt and the prompt's text features ``context`` / ``pooled``. Nothing
is decoded. The store is a gencore latent cache (``latents-XXXXX.safetensors`` shards + ``index.json``, read by
:class:`gencore.latents.LatentCacheDataset`, which returns the extra tensors too):

- **resumable**: shards are written atomically, one at a time; a rerun skips the shards already there (same
  fingerprint: teacher weights, prompts, sampler settings) and writes only the missing ones;
- **sharded**: in a distributed launch (torchrun / accelerate) process r writes shards r, r + W, ...; the main process
  writes the index once all shards exist;
- **seeded per shard**: shard k's noise comes from ``seed + k``, so the data do not depend on how many processes made
  them or on where a killed run stopped.

An image-conditioned teacher (inpainting, editing: :class:`sd3_flow.conditioning.ConcatConditioner`) is run over a
``dataset`` of real items instead of a prompt list (e.g. ``MaskedImages(FashionMNIST)`` with fixed masks, or
``InstructionEdits(FashionMNIST)``): its conditioner encodes each batch of items, and the image condition
``c_concat`` is stored with the text features (and the items' ``label`` when they have one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from gencore.latents import INDEX_NAME
from gencore.progress import Progress
from sd3_flow.tasks import read_prompts  # one prompt-file reader (sd3-sample's)

log = logging.getLogger(__name__)

__all__ = ["read_prompts", "synthesize"]

SHARD = "latents-{:05d}.safetensors"


def _fingerprint(teacher: nn.Module, prompts: Sequence[str] | None, settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"prompts": list(prompts or []), **settings}, sort_keys=True).encode())
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]


@torch.no_grad()
def synthesize(
    teacher: nn.Module,
    prompts: Sequence[str] | None,
    out_dir: str | os.PathLike,
    *,
    dataset: Dataset | None = None,
    num_samples: int | None = None,
    num_per_prompt: int = 1,
    guidance_scale: float = 4.0,
    num_steps: int = 28,
    shift: float = 1.0,
    sampler: str = "euler",
    batch_size: int = 16,
    shard_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write ``len(prompts) * num_per_prompt`` teacher samples (prompt i's copies together) to ``out_dir``; or, with
    a ``dataset`` (image-conditioned teachers), one sample for each of its first ``num_samples`` items (default:
    all) under the conditions the teacher's conditioner makes of them."""
    from safetensors.torch import save_file

    from gencore.io import atomic_path
    from gencore.run import process_state

    concat = _takes_images(teacher)
    if dataset is not None:
        if not concat:
            raise ValueError(
                "source= (a dataset of images) is for inpainting / editing teachers; this teacher is text-to-image: "
                "give prompts= / prompts_file= (or neither, for the ten Fashion-MNIST class captions)"
            )
        count = len(dataset) if num_samples is None else int(num_samples)  # type: ignore[arg-type]
        if not 1 <= count <= len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"synthesize: num_samples must be in 1..{len(dataset)}, got {num_samples}")  # type: ignore[arg-type]
        prompts = None
    elif concat:
        raise ValueError(
            f"synthesize: the teacher's {type(teacher.cond_stage_model).__name__} needs images: pass a dataset of "
            "items (datamodule.source=...) instead of prompts"
        )
    elif num_samples is not None:
        raise ValueError(
            "num_samples counts the items of a source= dataset; a text-to-image teacher takes num_per_prompt"
        )
    else:
        prompts = [str(p) for p in (prompts or [])]
        if not prompts:
            raise ValueError("synthesize: the prompt list is empty")
        count = len(prompts) * num_per_prompt
    if num_per_prompt < 1 or batch_size < 1 or shard_size < 1:
        raise ValueError(
            f"synthesize: num_per_prompt, batch_size and shard_size must be >= 1, got {num_per_prompt}, "
            f"{batch_size}, {shard_size}"
        )
    if not hasattr(teacher, "sample_latents") or not hasattr(teacher, "cond_stage_model"):
        raise ValueError(
            f"synthesize: the teacher must be an sd3_flow RectifiedFlowModule, got {type(teacher).__name__}"
        )
    settings = {
        "num_per_prompt": num_per_prompt,
        "guidance_scale": float(guidance_scale),
        "num_steps": int(num_steps),
        "shift": float(shift),
        "sampler": sampler,
        "shard_size": shard_size,
        "seed": seed,
    }
    if dataset is not None:
        settings["dataset"] = {"type": type(dataset).__name__, "len": len(dataset), "num_samples": count}  # type: ignore[arg-type]
    fp = _fingerprint(teacher, prompts, settings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX_NAME
    if index_path.is_file() and json.loads(index_path.read_text()).get("fingerprint") == fp:
        log.info("synthetic data in %s are up to date", out)
        return out
    captions = [p for p in prompts for _ in range(num_per_prompt)] if prompts is not None else None
    num_shards = -(-count // shard_size)
    state = process_state(next(teacher.parameters()).device)
    marker = out / "fingerprint.json"
    if state.is_main_process:
        if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") != fp:
            for old in out.glob("latents-*.safetensors"):
                old.unlink()  # made by another teacher / prompt list / setting: not resumable into this one
        marker.write_text(json.dumps({"fingerprint": fp, **settings}))
    state.wait_for_everyone()
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not (out / SHARD.format(k)).is_file()]
    if len(todo) < len(mine):
        log.info("synthetic data: %d of %d shards already written, resuming", len(mine) - len(todo), len(mine))
    progress = Progress("synthesizing", len(todo), unit="shard", enabled=state.is_main_process)
    device = next(teacher.parameters()).device
    for done, k in enumerate(todo):
        generator = torch.Generator(device=device).manual_seed(seed + k)
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(k * shard_size, min((k + 1) * shard_size, count), batch_size):
            stop = min(start + batch_size, (k + 1) * shard_size, count)
            if dataset is None:
                cond, extra = teacher.cond_stage_model.encode_text(captions[start:stop]), {}
            else:
                cond, extra = _encode_items(teacher, dataset, range(start, stop), device)
            z = teacher.sample_latents(
                cond,
                sampler=sampler,
                num_steps=num_steps,
                shift=shift,
                guidance_scale=guidance_scale,
                generator=generator,
            )
            for name, t in {"latents": z, **cond, **extra}.items():
                parts.setdefault(name, []).append(t.float().cpu() if t.is_floating_point() else t.cpu())
        tensors = {name: torch.cat(v).contiguous() for name, v in parts.items()}
        with atomic_path(out / SHARD.format(k)) as tmp:
            save_file(tensors, str(tmp))
        progress.update(done + 1)
    state.wait_for_everyone()
    if state.is_main_process:
        if captions is None:
            captions = [str(dataset[i]["caption"]) for i in range(count)]  # type: ignore[index]
        index = {
            "fingerprint": fp,
            "num_samples": count,
            "shards": [SHARD.format(k) for k in range(num_shards)],
            "captions": captions,
            "settings": settings,
        }
        with atomic_path(index_path) as tmp:
            tmp.write_text(json.dumps(index, indent=1))
        log.info("synthetic data: %d samples (%d captions) in %s", count, len(set(captions)), out)
    return out


def _takes_images(teacher: nn.Module) -> bool:
    from sd3_flow.conditioning import ConcatConditioner

    return isinstance(getattr(teacher, "cond_stage_model", None), ConcatConditioner)


def _encode_items(
    teacher: nn.Module, dataset: Dataset, indices: range, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The teacher's conditions for dataset items ``indices`` (their images, masks, sources, captions), and their
    labels as ``{"label": ...}`` when they have them."""
    from torch.utils.data import default_collate

    batch = default_collate([dataset[i] for i in indices])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}
    cond = teacher.cond_stage_model.encode(batch, len(indices))
    extra = {"label": torch.as_tensor(batch["label"]).long()} if "label" in batch else {}
    return cond, extra
