"""The training data of a LADD run: synthetic teacher latents (:mod:`ladd_turbo.synth`), made on first use.

:class:`SyntheticDataModule` reads a synthetic latent cache at ``path``; when ``path`` holds none yet (or an
unfinished one), it first runs the teacher over the prompts to make it (resuming a killed synthesis), so that
``ladd-train teacher=<sd3 run>`` is the whole recipe. Prompts: ``prompts_file`` (one per line), ``prompts``, or by
default the ten Fashion-MNIST class captions ("a photo of a sneaker", the toy teacher's training captions). An
inpainting / editing teacher is run over the items of ``source`` (a dataset, e.g. masked or edit-paired Fashion-MNIST
images) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from gencore.data import DataModule
from gencore.latents import INDEX_NAME, LatentCacheDataset

log = logging.getLogger(__name__)

__all__ = ["SyntheticDataModule", "default_prompts", "prompt_list"]


def prompt_list(prompts_file: str | None = None, prompts: Sequence[str] | None = None) -> list[str]:
    """The prompts of a synthesis: ``prompts_file`` (one per line), else ``prompts``, else :func:`default_prompts`."""
    from ladd_turbo.synth import read_prompts

    if prompts_file:
        return read_prompts(prompts_file)
    if prompts is not None:
        if isinstance(prompts, str) or not list(prompts):
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        return [str(p) for p in prompts]
    return default_prompts()


def default_prompts(template: str = "a photo of a {name}") -> list[str]:
    """The Fashion-MNIST class captions, as the toy sd3_flow teacher was trained on."""
    from gencore.data.fashion_mnist import CLASS_NAMES, caption_for

    return [caption_for(c, template) for c in range(len(CLASS_NAMES))]


class SyntheticDataModule(DataModule):
    """Synthetic teacher latents at ``path`` (made from ``teacher`` first when absent), split into train / val.

    Args:
        path: the synthetic latent cache folder (``ladd-synth`` output, or where to make it).
        teacher: the sd3_flow teacher (run folder / export) used when the data must be made.
        prompts_file / prompts: the prompt list (default: :func:`default_prompts`).
        source / num_samples: for an image-conditioned teacher, the dataset (or a factory of it) whose first
            ``num_samples`` items (default: all) it is run over, instead of prompts.
        num_per_prompt, guidance_scale, num_steps, shift, synth_batch_size, shard_size, synth_seed: the synthesis
            (:func:`ladd_turbo.synth.synthesize`).
        Other keyword arguments: :class:`gencore.data.DataModule` (batch_size, num_workers, val_fraction, ...).
    """

    def __init__(
        self,
        path: str,
        teacher: str | None = None,
        *,
        prompts_file: str | None = None,
        prompts: Sequence[str] | None = None,
        source: Any = None,
        num_samples: int | None = None,
        num_per_prompt: int = 64,
        guidance_scale: float = 4.0,
        num_steps: int = 28,
        shift: float = 1.0,
        synth_batch_size: int = 32,
        shard_size: int = 256,
        synth_seed: int = 0,
        val_fraction: float = 0.05,
        **loader_kwargs: Any,
    ) -> None:
        super().__init__(val_fraction=val_fraction, **loader_kwargs)
        self.path, self.teacher = Path(str(path)), teacher
        self.prompts_file, self.prompts = prompts_file, list(prompts) if prompts is not None else None
        if source is not None and (prompts_file is not None or prompts is not None):
            raise ValueError("give the synthesis either prompts (text-to-image teachers) or a source dataset, not both")
        self.source = source
        self.synth_kwargs = {
            "num_per_prompt": num_per_prompt,
            "guidance_scale": guidance_scale,
            "num_steps": num_steps,
            "shift": shift,
            "batch_size": synth_batch_size,
            "shard_size": shard_size,
            "seed": synth_seed,
        }
        if source is not None:
            self.synth_kwargs["num_samples"] = num_samples
        if not (self.path / INDEX_NAME).is_file() and teacher is None:
            raise ValueError(f"no synthetic data in {self.path} and no teacher to make them with (teacher=<sd3 run>)")
        if prompts_file is not None:
            from ladd_turbo.synth import read_prompts

            read_prompts(prompts_file)  # an empty or missing file fails here, before anything is built

    def prepare(self) -> Path:
        """Make the synthetic data if ``path`` has none (resuming an unfinished synthesis)."""
        if (self.path / INDEX_NAME).is_file():
            return self.path
        from ladd_turbo.lit import load_teacher
        from ladd_turbo.synth import synthesize

        log.info("no synthetic data in %s yet: sampling them from the teacher %s", self.path, self.teacher)
        teacher = load_teacher(str(self.teacher))
        teacher.to("cuda" if torch.cuda.is_available() else "cpu")
        if self.source is not None:
            dataset = self.source if isinstance(self.source, Dataset) else self.source()
            synthesize(teacher, None, self.path, dataset=dataset, **self.synth_kwargs)
        else:
            synthesize(teacher, prompt_list(self.prompts_file, self.prompts), self.path, **self.synth_kwargs)
        del teacher
        return self.path

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._train = LatentCacheDataset(self.prepare())
        super().setup(stage)
