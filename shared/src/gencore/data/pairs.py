"""Image-to-image training pairs made from a real image dataset, for models conditioned on a second image.

- :class:`InstructionEdits`: (source image, instruction, edited image) triples, InstructPix2Pix-style, where the edit
  is an exact pixel operation (flip, rotate, invert, darken, ...) so every pair has its ground truth. The edited
  image is the item's ``image`` (what the model generates), the original its ``source``, the instruction its
  ``caption``. Which edit an item gets is fixed by its index and ``seed``.
- :class:`MaskedImages`: each item with a box ``mask`` (1 = hole) fixed by its index and ``seed``
  (:func:`gencore.conditioning.random_masks`), for inpainting data that must be the same on every read (synthetic
  data, evaluation). Training usually draws fresh masks per batch instead.

Both wrap any dataset of ``{"image": (C, H, W) in [-1, 1], ...}`` items (Fashion-MNIST in the toy runs) and keep its
other entries (``label``, the original ``caption`` as ``source_caption`` for edits).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["EDITS", "InstructionEdits", "MaskedImages", "apply_edit"]

#: instruction -> exact pixel operation on (..., C, H, W) images in [-1, 1]
EDITS: dict[str, Callable[[Tensor], Tensor]] = {
    "flip it horizontally": lambda x: x.flip(-1),
    "turn it upside down": lambda x: x.flip(-2),
    "rotate it a quarter turn": lambda x: x.rot90(1, dims=(-2, -1)),
    "invert the colors": lambda x: -x,
    "make it darker": lambda x: (x + 1.0) * 0.5 - 1.0,
}


def apply_edit(instruction: str, image: Tensor) -> Tensor:
    """The edited ``image`` for one of :data:`EDITS`' instructions; a ValueError names the known ones otherwise."""
    if instruction not in EDITS:
        raise ValueError(f"unknown edit instruction {instruction!r}; known: {sorted(EDITS)}")
    if image.shape[-1] != image.shape[-2] and instruction == "rotate it a quarter turn":
        raise ValueError(f"a quarter turn needs square images, got {tuple(image.shape[-2:])}")
    return EDITS[instruction](image).contiguous()


def _index_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


class InstructionEdits(Dataset):
    """``dataset`` items as edit triples ``{"source", "image" (edited), "caption" (instruction), ...}``.

    Args:
        dataset: a dataset of ``{"image", ...}`` items.
        instructions: the edits used (keys of :data:`EDITS`; default all).
        seed: the edit of item ``i`` is drawn from a generator seeded by ``(seed, i)``.
    """

    def __init__(self, dataset: Dataset, instructions: Sequence[str] | None = None, seed: int = 0) -> None:
        chosen = list(EDITS) if instructions is None else [str(i) for i in instructions]
        if not chosen:
            raise ValueError("InstructionEdits: the instruction list is empty")
        unknown = [i for i in chosen if i not in EDITS]
        if unknown:
            raise ValueError(f"InstructionEdits: unknown instructions {unknown}; known: {sorted(EDITS)}")
        self.dataset, self.instructions, self.seed = dataset, chosen, seed
        for name in ("image_size", "channels"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def instruction(self, index: int) -> str:
        pick = torch.randint(len(self.instructions), (1,), generator=_index_generator(self.seed, index))
        return self.instructions[int(pick)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        source = item.pop("image")
        instruction = self.instruction(index)
        if "caption" in item:
            item["source_caption"] = item.pop("caption")
        return {**item, "source": source, "image": apply_edit(instruction, source), "caption": instruction}


class MaskedImages(Dataset):
    """``dataset`` items with a fixed box ``mask`` (1, H, W) each (1 = hole), seeded by ``(seed, index)``."""

    def __init__(self, dataset: Dataset, seed: int = 0, min_frac: float = 0.25, max_frac: float = 0.6) -> None:
        from gencore.conditioning import random_masks

        random_masks(1, 8, min_frac=min_frac, max_frac=max_frac)  # bad fractions fail here
        self.dataset, self.seed, self.min_frac, self.max_frac = dataset, seed, min_frac, max_frac
        for name in ("image_size", "channels"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        from gencore.conditioning import random_masks

        item = dict(self.dataset[index])
        image = item["image"]
        if image.shape[-1] != image.shape[-2]:
            raise ValueError(f"MaskedImages: square images expected, got {tuple(image.shape[-2:])}")
        g = _index_generator(self.seed, index)
        mask = random_masks(1, image.shape[-1], generator=g, min_frac=self.min_frac, max_frac=self.max_frac)[0]
        return {**item, "mask": mask}
