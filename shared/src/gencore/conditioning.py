"""Conditioners: what a generative model is conditioned on, as one injected object instead of a switchboard.

A training recipe (a LightningModule) holds one :class:`Conditioner`, chosen by ``_target_`` in config, under the
official name ``cond_stage_model``, and never asks which kind it is. A conditioner

- turns a batch into the model's conditions (``conditioner(batch, n)``: the first ``n`` items), applying its own
  classifier-free-guidance dropout when asked (``drop=p``);
- knows the unconditional condition (``unconditional(n)``; ``None`` when the model cannot be guided);
- builds the batch a generation request stands for (``generation_batch(n, labels=..., captions=...)``), and says
  what to return with the images (the labels / captions used), and what an evaluation asks for by default
  (``evaluation_request()``).

The package owns its conditioners (an LDM class token for cross-attention, SD3's three text encoders, taming's
token providers), because what a condition becomes is the model's business; this module owns the interface, the
default dropout over :func:`gencore.diffusion.drop_condition`, and the request helpers every package shares
(:func:`requested_labels`, :func:`requested_captions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.diffusion import drop_condition

__all__ = [
    "ClassLabels",
    "Conditioner",
    "NoConditioner",
    "cond_batch_size",
    "inpainting_condition",
    "random_masks",
    "requested_captions",
    "requested_labels",
    "take",
]


class Conditioner(nn.Module):
    """Base class. Subclasses implement :meth:`encode` and, when the model can be guided, :meth:`unconditional`;
    :meth:`bind` receives what the owning model knows (its network, first stage, latent shape) before first use."""

    #: names of the conditions the model receives (the keys of :meth:`encode`'s mapping), for messages and docs
    produces: tuple[str, ...] = ()

    def bind(self, **context: Any) -> None:
        """Called once by the owning module with what it knows (``model``, ``codec``, ``latent_shape``, ...)."""

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> Any:
        """The model's conditions for (the first ``n`` items of) ``batch``."""
        raise NotImplementedError

    def unconditional(self, n: int) -> Any:
        """The null condition of classifier-free guidance for ``n`` samples, or ``None`` (cannot be guided)."""
        return None

    @property
    def guidable(self) -> bool:
        return type(self).unconditional is not Conditioner.unconditional

    def forward(
        self,
        batch: Mapping[str, Any],
        n: int | None = None,
        *,
        drop: float | Mapping[Any, float] = 0.0,
        generator: torch.Generator | None = None,
    ) -> Any:
        """:meth:`encode`, then (``drop`` > 0) each sample's condition replaced by :meth:`unconditional` with
        probability ``drop`` (a float, or per condition key / group)."""
        cond = self.encode(batch, n)
        if not drop or (isinstance(drop, Mapping) and not any(drop.values())):
            return cond
        if not self.guidable:
            raise ValueError(f"{type(self).__name__} has no unconditional condition to drop to (dropout {drop!r})")
        b = cond_batch_size(cond)
        out, _ = drop_condition(cond, self.unconditional(b), drop, generator=generator)
        return out

    def evaluation_request(self) -> dict[str, Any]:
        """The ``generate`` arguments a package's ``<name>-eval`` uses unless its config gives others (a class
        conditioner: every class in turn, so that class accuracy is measured on a balanced set)."""
        return {}

    def generation_batch(self, n: int, **request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the batch that conditions ``n`` samples, what to return with the images) for a request such as
        ``labels=[...]`` or ``captions=[...]``; request values that are ``None`` mean "the default"."""
        unknown = sorted(k for k, v in request.items() if v is not None)
        if unknown:
            raise ValueError(f"{type(self).__name__} does not take {', '.join(unknown)} when generating")
        return {}, {}


def cond_batch_size(cond: Any) -> int:
    """Batch size of a condition (a tensor, a list of them, or a mapping of them)."""
    first = next(iter(cond.values())) if isinstance(cond, Mapping) else cond
    while isinstance(first, (list, tuple)):
        first = first[0]
    if not isinstance(first, Tensor):
        raise ValueError(f"cannot tell the batch size of a {type(first).__name__} condition")
    return first.shape[0]


class ClassLabels:
    """Mixin of class-label conditioners (whatever they turn a label into): generation requests ``labels=[...]``
    (default: uniform random classes), returned with the samples, and evaluation over every class in turn. Needs
    ``num_classes`` and ``label_key`` attributes; put it before the conditioner base class."""

    num_classes: int
    label_key: str

    def generation_batch(self, n: int, labels: Any = None, **request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        super().generation_batch(n, **request)  # type: ignore[misc]  # the base refuses requests it does not take
        picks = requested_labels(n, labels, self.num_classes)
        return {self.label_key: picks}, {"labels": picks}

    def evaluation_request(self) -> dict[str, Any]:
        return {"labels": list(range(self.num_classes))}


class NoConditioner(Conditioner):
    """Unconditional models: no conditions (``None``), nothing to guide, nothing to ask for."""

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> None:
        return None

    def forward(
        self, batch: Mapping[str, Any], n: int | None = None, *, drop: Any = 0.0, generator: Any = None
    ) -> None:
        return None


def requested_labels(
    n: int, labels: Sequence[int] | Tensor | None, num_classes: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` class labels (long, CPU): the given ones (exactly ``n``, each in [0, num_classes)), or uniform random."""
    if labels is None:
        return torch.randint(0, num_classes, (n,), generator=generator)
    out = torch.as_tensor(labels).long().flatten()[:n].cpu()
    if len(out) != n:
        raise ValueError(f"{n} samples need {n} labels, got {len(torch.as_tensor(labels).flatten())}")
    bad = [int(v) for v in out if not 0 <= int(v) < num_classes]
    if bad:
        raise ValueError(f"label {bad[0]} outside [0, {num_classes})")
    return out


def requested_captions(
    n: int,
    captions: Sequence[str] | None = None,
    labels: Sequence[int] | Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> tuple[list[str], Tensor | None]:
    """(``n`` captions, their Fashion-MNIST labels or None): the given captions, or the Fashion-MNIST caption of each
    of ``labels`` (default: uniform random classes), "a photo of a sneaker"."""
    if captions is not None:
        if isinstance(captions, str):
            raise ValueError("captions must be a list of strings, got a single string")
        out = [str(c) for c in list(captions)[:n]]
        if len(out) != n:
            raise ValueError(f"{n} samples need {n} captions, got {len(list(captions))}")
        return out, None
    from gencore.data.fashion_mnist import CLASS_NAMES, caption_for

    picks = requested_labels(n, labels, len(CLASS_NAMES), generator=generator)
    return [caption_for(int(c)) for c in picks], picks


def take(batch: Mapping[str, Any], key: str, n: int | None, what: str) -> Any:
    """``batch[key][:n]`` (all of it for ``n=None``), or a ValueError naming the key that ``what`` needs."""
    if key not in batch or batch[key] is None:
        raise ValueError(f"{what} needs batch[{key!r}] (batch keys: {sorted(batch)})")
    value = batch[key]
    return value if n is None else value[:n]


# ------------------------------------------------------------------------------------ masks for inpainting


def random_masks(
    n: int,
    size: int,
    *,
    generator: torch.Generator | None = None,
    min_frac: float = 0.25,
    max_frac: float = 0.6,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n, 1, size, size) box masks, 1 = hole to fill (the LDM inpainting training masks are boxes / strokes): box
    sides uniform in [min_frac, max_frac] x size (at least 1 pixel), positions uniform.

    Drawn on the generator's device (the default generator: on ``device``) without host syncs, then moved to
    ``device`` with ``non_blocking=True``."""
    if not 0.0 < min_frac <= max_frac <= 1.0:
        raise ValueError(f"random_masks: need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    where = generator.device if generator is not None else device
    u = torch.rand(n, 4, generator=generator, device=where)  # (n, [h, w, top, left])
    hw = ((u[:, :2] * (max_frac - min_frac) + min_frac) * size).floor().clamp(1, size)  # (n, 2)
    corner = (u[:, 2:] * (size - hw + 1)).floor()  # uniform in [0, size - side]
    grid = torch.arange(size, device=where, dtype=u.dtype)
    inside = (grid >= corner[..., None]) & (grid < (corner + hw)[..., None])  # (n, 2, size): rows, columns
    masks = (inside[:, 0, :, None] & inside[:, 1, None, :]).to(u.dtype)[:, None]  # (n, 1, size, size)
    return masks.to(device if device is not None else where, non_blocking=True)


def inpainting_condition(
    image: Tensor, mask: Tensor | None, encode: Any, *, min_frac: float = 0.25, max_frac: float = 0.6
) -> Tensor:
    """LDM inpainting concat input: [encode(masked image), mask resized to the latent grid] (``inpainting_big``:
    3 + 1 channels next to the 3 latent channels). ``mask`` = 1 marks the hole; its first ``len(image)`` rows are
    used (moved to the image's device and dtype); ``None`` (training) draws box masks on the image's device
    (:func:`random_masks` with ``min_frac`` / ``max_frac``)."""
    if mask is None:
        mask = random_masks(image.shape[0], image.shape[-1], min_frac=min_frac, max_frac=max_frac, device=image.device)
    else:
        mask = mask[: image.shape[0]].to(image.device, image.dtype, non_blocking=True)
    if mask.shape[-2:] != image.shape[-2:] or mask.shape[1] != 1:
        raise ValueError(f"inpainting mask must be (B, 1, H, W) like the image, got {tuple(mask.shape)}")
    z = encode(image * (1 - mask))  # the hole is set to 0 (gray) before encoding
    m = F.interpolate(mask, size=z.shape[-2:], mode="nearest")
    return torch.cat([z, m], dim=1)
