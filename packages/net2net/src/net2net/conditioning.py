"""Conditioning experts of the cINN: what the flow's embedder receives, as one vector per item.

Net2Net (Rombach, Esser, Ommer 2020) conditions its flow on the output of an "expert"; the data-bias note uses the
simplest one, the one-hot dataset label (official ``net2net.modules.labels.model.Labelator`` with
``as_one_hot=True``), and pesser's answer in net2net#3 is that unpaired transfer between datasets needs only that
expert. Here each expert is a :class:`gencore.conditioning.Conditioner` returning a (B, width) float tensor:

- :class:`Labelator` — one-hot of an integer label in the batch (``dataset`` by default; ``label`` for classes);
  a label of -1 (an item without one, e.g. a face in a union with clothes and digits) gives the zero vector;
- :class:`TextExpert` — the pooled sentence feature of the item's caption from a frozen text encoder (offline
  all-MiniLM-L6-v2 by default; the SBERT expert of Net2Net's text-to-image translation);
- :class:`ConcatExperts` — several experts side by side (e.g. dataset and class).

``width`` is what the flow's ``conditioning_dim`` must equal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gencore.conditioning import ClassLabels, Conditioner, take

__all__ = ["ConcatExperts", "Labelator", "TextExpert"]


class Labelator(ClassLabels, Conditioner):
    """One-hot label expert: ``batch[label_key]`` (B,) ints -> (B, num_classes) float; -1 -> zeros.

    Generation requests ``labels=[...]`` (ids or the names in ``names``) pick the label of each sample, as the
    official ``sample_all_labels`` / ``modify_input`` do with ``make_one_hot``.
    """

    produces = ("one_hot",)

    def __init__(self, num_classes: int, label_key: str = "dataset", names: Sequence[str] | None = None) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"Labelator: num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.label_key = int(num_classes), str(label_key)
        self.names = tuple(str(n) for n in names) if names is not None else None
        if self.names is not None and len(self.names) != self.num_classes:
            raise ValueError(f"Labelator: {len(self.names)} names for {self.num_classes} classes")

    @property
    def width(self) -> int:
        return self.num_classes

    def index(self, label: int | str) -> int:
        """The id of ``label`` (an id, or one of ``names``); an unknown one is a ValueError naming the known ones."""
        known = list(self.names) if self.names is not None else list(range(self.num_classes))
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if self.names is None or label not in self.names:
                raise ValueError(f"unknown {self.label_key} {label!r}; known: {', '.join(map(str, known))}")
            return self.names.index(label)
        i = int(label)
        if not 0 <= i < self.num_classes:
            raise ValueError(f"unknown {self.label_key} {label!r}; known: {', '.join(map(str, known))}")
        return i

    def make_one_hot(self, label: Tensor) -> Tensor:
        """(B,) ints in [-1, num_classes) -> (B, num_classes) float, the zero row for -1."""
        label = torch.as_tensor(label).long().reshape(-1)
        return F.one_hot(label.clamp(min=0), self.num_classes).float() * (label >= 0).float()[:, None]

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        return self.make_one_hot(take(batch, self.label_key, n, f"{self.label_key} labels"))

    def generation_batch(self, n: int, labels: Any = None, **request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if labels is not None:
            items = [labels] * n if isinstance(labels, (int, str)) else list(labels)  # one label: all n samples
            labels = [self.index(label) for label in items]
        return super().generation_batch(n, labels=labels, **request)


class TextExpert(Conditioner):
    """Sentence-feature expert: the frozen encoder's pooled vector of ``batch[caption_key]`` (B, width)."""

    produces = ("pooled",)

    def __init__(self, encoder: Any = None, caption_key: str = "caption") -> None:
        super().__init__()
        if encoder is None:
            from gencore.text import text_encoder

            encoder = text_encoder()
        self.encoder, self.caption_key = encoder, caption_key

    @property
    def width(self) -> int:
        return int(self.encoder.pooled_size)

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        captions = take(batch, self.caption_key, n, "captions")
        return self.encoder(list(captions))["pooled"].float()


class ConcatExperts(Conditioner):
    """Experts side by side: (B, Σ widths). Generation requests go to the first expert that takes them."""

    def __init__(self, experts: Sequence[Conditioner]) -> None:
        super().__init__()
        if not experts:
            raise ValueError("ConcatExperts: no experts given")
        self.experts = torch.nn.ModuleList(experts)

    @property
    def width(self) -> int:
        return sum(int(e.width) for e in self.experts)

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        return torch.cat([e.encode(batch, n) for e in self.experts], dim=1)

    def generation_batch(self, n: int, **request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        batch: dict[str, Any] = {}
        returned: dict[str, Any] = {}
        for e in self.experts:
            b, r = e.generation_batch(n, **{k: v for k, v in request.items() if k == "labels" and not returned})
            batch.update(b)
            returned.update(r)
        return batch, returned
