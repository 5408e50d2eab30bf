"""Conditioning of Latent Diffusion (Sec. 3.3; official ``ldm/modules/encoders/modules.py`` and ``DiffusionWrapper``
in ``ldm/models/diffusion/ddpm.py``), as injected objects.

:class:`ldm.lit.LatentDiffusion` holds one conditioner, chosen by ``_target_`` in config, under the official name
``cond_stage_model``, and never asks which kind it is. Each conditioner (a :class:`gencore.conditioning.Conditioner`)
turns a batch into the UNet's conditions, applies its own classifier-free-guidance dropout, knows its unconditional
condition, its :class:`DiffusionWrapper` routing (``conditioning_key``) and what ``generate`` / ``inpaint`` /
``superres`` / ``log_images`` need from it:

- :class:`ClassConditioner` — class label -> one cross-attention token from a learned embedding (official
  ``ClassEmbedder``, key ``cond_stage_model.embedding.weight``; index ``num_classes`` is the null class of guidance,
  as ``cin256-v2``: 1001 embeddings, 1000 null), or the labels routed as ``y`` into the UNet's own ``label_emb``
  (``conditioning_key="adm"``);
- :class:`TextConditioner` — captions through a frozen :func:`gencore.text.text_encoder` (MiniLM offline by default,
  CLIP ViT-L/14 from a local path for SD, or a precomputed-features file) -> ``c_crossattn``; unconditional = the
  features of the empty caption "";
- concatenation (``c_concat``; no unconditional part, so both halves of guidance share it):
  :class:`LowResolutionConditioner` (super-resolution, ``bsr_sr``), :class:`InpaintingConditioner` (encode(masked
  image) + mask at latent size, ``inpainting_big``), :class:`SemanticConditioner` (segmentation maps through the
  official ``SpatialRescaler``: resizes, then the 1x1 ``channel_mapper``);
- :class:`HybridConditioner` — a cross-attention conditioner and a concat conditioner together (``hybrid``);
- :class:`Unconditional` — no conditions (``conditioner=None`` or gencore's ``NoConditioner`` mean the same).

:func:`conditioner_from_legacy` builds the conditioner that the older ``LatentDiffusion`` arguments
(``cond_stage="class"``, ``concat="inpaint"``, ...) described, so configs written before keep building the same model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.conditioning import (
    ClassLabels,
    Conditioner,
    NoConditioner,
    inpainting_condition,
    random_masks,
    requested_captions,
    take,
)
from gencore.modules import check_index_range

__all__ = [
    "CONDITIONING_KEYS",
    "ROUTED",
    "ClassConditioner",
    "DiffusionWrapper",
    "HybridConditioner",
    "InpaintingConditioner",
    "LatentConditioner",
    "LowResolutionConditioner",
    "SemanticConditioner",
    "TextConditioner",
    "Unconditional",
    "conditioner_from_legacy",
    "inpainting_condition",
    "low_resolution_condition",
    "one_hot_map",
    "random_masks",
]

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm")
# the conditions each routing feeds into the UNet
ROUTED: dict[str | None, tuple[str, ...]] = {
    None: (),
    "concat": ("c_concat",),
    "crossattn": ("c_crossattn",),
    "hybrid": ("c_concat", "c_crossattn"),
    "adm": ("y",),
}


# ------------------------------------------------------------------------------------------------ the router


class DiffusionWrapper(nn.Module):
    """The official router; the UNet lives under ``diffusion_model`` (``model.diffusion_model.*`` keys): ``concat``
    (channel concatenation: super-resolution, inpainting, semantic maps), ``crossattn`` (context), ``hybrid`` (both),
    ``adm`` (a class vector ``y``)."""

    def __init__(self, diffusion_model: nn.Module, conditioning_key: str | None = None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key must be one of {CONDITIONING_KEYS}, got {conditioning_key!r}")
        self.diffusion_model, self.conditioning_key = diffusion_model, conditioning_key

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        c_concat: Tensor | None = None,
        c_crossattn: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        key = self.conditioning_key
        given = {"c_concat": c_concat, "c_crossattn": c_crossattn, "y": y}
        missing = [n for n in ROUTED[key] if given[n] is None]
        if missing:
            raise ValueError(f"conditioning_key={key!r} needs {', '.join(missing)}")
        if c_concat is not None and key in ("concat", "hybrid"):
            x = torch.cat([x, c_concat], dim=1)
        context = c_crossattn if key in ("crossattn", "hybrid") else None
        return self.diffusion_model(x, t, context=context, y=y if key == "adm" else None)


# ---------------------------------------------------------------------------------------------- concat inputs


def one_hot_map(seg: Tensor, n_classes: int) -> Tensor:
    """(B, H, W) integer label map -> (B, n_classes, H, W) float one-hot (a (B, C, H, W) map passes through). The
    label range check is :func:`gencore.modules.check_index_range` (no host sync on an accelerator)."""
    if seg.dim() == 4:
        return seg.float()
    if seg.dim() != 3:
        raise ValueError(f"segmentation must be (B, H, W) labels or (B, C, H, W) maps, got {tuple(seg.shape)}")
    seg = seg.long()
    check_index_range(seg, n_classes, "segmentation labels")
    classes = torch.arange(n_classes, device=seg.device).view(1, n_classes, 1, 1)
    return (seg[:, None] == classes).float()  # (B, n_classes, H, W)


def low_resolution_condition(image: Tensor, factor: int, size: tuple[int, int]) -> Tensor:
    """Super-resolution concat input: the image downsampled by ``factor`` (bicubic, antialiased), resized to the
    latent grid ``size`` (``bsr_sr``: the low-resolution image concatenated to the latents)."""
    if factor < 1 or image.shape[-1] % factor or image.shape[-2] % factor:
        raise ValueError(f"low_resolution_condition: image size {tuple(image.shape[-2:])} not divisible by {factor}")
    lr = F.interpolate(image, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(lr.clamp(-1, 1), size=size, mode="bicubic", align_corners=False)


# ----------------------------------------------------------------------------------------------- the base


def _asked(request: Mapping[str, Any]) -> bool:
    return any(v is not None for v in request.values())


class LatentConditioner(Conditioner):
    """Base of LDM's conditioners: gencore's interface plus what :class:`ldm.lit.LatentDiffusion` asks of them.

    - ``conditioning_key``: the :class:`DiffusionWrapper` routing of the conditions (``produces`` names them);
    - ``requests``: the keyword arguments of :meth:`generation_batch` (``labels``, ``captions``, ...);
    - :meth:`bind` receives, from the owning model, ``model`` (the UNet), ``encode`` (its first stage's encoding,
      normalised), ``latent_shape``, ``image_size`` and ``image_key``;
    - :meth:`request_condition`, :meth:`inpainting`, :meth:`superres_condition`, :meth:`log_samples` and
      :meth:`evaluation_request` say what ``generate`` / ``inpaint`` / ``superres`` / ``log_images`` and ``ldm-eval``
      need; ``sr_factor`` is the upsampling factor of a super-resolution model (None otherwise).

    ``device`` follows ``.to()`` (a non-persistent empty buffer), so parameter-free conditioners place their outputs.
    """

    conditioning_key: str | None = None
    requests: tuple[str, ...] = ()
    sr_factor: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self.image_key = "image"

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def bind(self, *, image_key: str = "image", **context: Any) -> None:
        self.image_key = image_key

    def request_condition(self, n: int, **request: Any) -> Any:
        """The conditions of a generation request (``labels=...``, ``captions=...``); when nothing is asked, the
        unconditional one (None if there is none)."""
        if _asked(request):
            batch, _ = self.generation_batch(n, **request)
            return self.encode({k: _to(v, self.device) for k, v in batch.items()}, n)
        return self.unconditional(n) if self.guidable else None

    def inpainting(self, images: Tensor, masks: Tensor, **request: Any) -> tuple[Any, bool]:
        """(conditions that fill ``masks`` (1 = hole) of ``images``, whether the known latents are re-noised into every
        step: masked sampling, official DDIM ``mask`` / ``x0``). Default: the request's conditions (e.g. labels), or
        the unconditional one, with masked sampling."""
        return self.request_condition(images.shape[0], **request), True

    def superres_condition(self, images: Tensor, **request: Any) -> Any:
        raise ValueError(
            f"superres() needs a model conditioned on low-resolution images (LowResolutionConditioner); this one has "
            f"{type(self).__name__}"
        )

    def log_samples(self, module: Any, batch: Mapping[str, Any], n: int, **opts: Any) -> dict[str, Tensor]:
        """Images for ``log_images``: samples conditioned on the batch (default)."""
        z = module.sample_latents(n, module.conditions(batch, n), **opts)
        return {"samples": module.decode(z).clamp(-1, 1)}


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value


class Unconditional(LatentConditioner, NoConditioner):
    """Unconditional models: no conditions, nothing to guide, nothing to ask for."""


# ---------------------------------------------------------------------------------------------------- classes


class ClassConditioner(ClassLabels, LatentConditioner):
    """Class labels ``batch[label_key]`` (B,).

    ``conditioning_key="crossattn"`` (default; official ``ClassEmbedder``): one context token (B, 1, embed_dim) from
    ``embedding`` (``nn.Embedding(num_classes + null_class, embed_dim)``; ``embed_dim=None`` = the UNet's
    ``context_dim``, known at :meth:`bind`). ``"adm"``: the labels themselves as ``y`` for the UNet's ``label_emb``
    (it needs ``num_classes + null_class`` entries). ``null_class`` reserves index ``num_classes`` as the
    unconditional class of classifier-free guidance; without it the model cannot be guided (the original cIN LDM).
    """

    requests = ("labels",)

    def __init__(
        self,
        num_classes: int,
        *,
        embed_dim: int | None = None,
        null_class: bool = True,
        conditioning_key: str = "crossattn",
        label_key: str = "label",
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"ClassConditioner: num_classes must be an integer >= 1, got {num_classes!r}")
        if conditioning_key not in ("crossattn", "adm"):
            raise ValueError(
                f"ClassConditioner: conditioning_key must be 'crossattn' or 'adm', got {conditioning_key!r}"
            )
        if embed_dim is not None and (conditioning_key == "adm" or embed_dim < 1):
            raise ValueError(f"ClassConditioner: embed_dim={embed_dim} needs conditioning_key='crossattn' and >= 1")
        self.num_classes, self.null_class, self.label_key = num_classes, bool(null_class), label_key
        self.conditioning_key = conditioning_key
        self.produces = ("c_crossattn",) if conditioning_key == "crossattn" else ("y",)
        self.embed_dim = embed_dim
        if embed_dim is not None:
            self.embedding = nn.Embedding(num_classes + int(self.null_class), embed_dim)

    @property
    def guidable(self) -> bool:
        return self.null_class

    @property
    def null_index(self) -> int:
        if not self.null_class:
            raise ValueError("this ClassConditioner has no null class (build it with null_class=True for guidance)")
        return self.num_classes

    def bind(self, *, model: nn.Module | None = None, **context: Any) -> None:
        super().bind(**context)
        entries = self.num_classes + int(self.null_class)
        if self.conditioning_key == "adm":
            have = getattr(model, "num_classes", None)
            if have is None or have < entries:
                raise ValueError(
                    f"ClassConditioner(conditioning_key='adm') with num_classes={self.num_classes} and "
                    f"null_class={self.null_class} needs a UNet with num_classes >= {entries} (its label_emb), "
                    f"got {have}"
                )
            return
        width = getattr(model, "context_dim", None)
        if self.embed_dim is None:
            if width is None:
                raise ValueError("class conditioning through cross-attention needs a UNet with context_dim")
            self.embed_dim = int(width)
            self.embedding = nn.Embedding(entries, self.embed_dim).to(self.device)
        elif width is not None and width != self.embed_dim:
            raise ValueError(f"ClassConditioner embed_dim {self.embed_dim} != the UNet's context_dim {width}")

    def embed(self, labels: Tensor) -> Tensor:
        """(B,) labels -> (B, 1, embed_dim) context (official ``ClassEmbedder.forward``)."""
        if not hasattr(self, "embedding"):
            raise ValueError("ClassConditioner: no embed_dim yet (give embed_dim=, or bind it to a UNet first)")
        return self.embedding(labels)[:, None]

    def _labels(self, batch: Mapping[str, Any], n: int | None) -> Tensor:
        labels = torch.as_tensor(take(batch, self.label_key, n, "class conditioning"))
        labels = labels.to(self.device, torch.long, non_blocking=True)
        if labels.dim() != 1:
            raise ValueError(f"class labels must be (B,), got shape {tuple(labels.shape)}")
        check_index_range(labels, self.num_classes + int(self.null_class), "class labels")
        return labels

    def _route(self, labels: Tensor) -> dict[str, Tensor]:
        return {"c_crossattn": self.embed(labels)} if self.conditioning_key == "crossattn" else {"y": labels}

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        return self._route(self._labels(batch, n))

    def unconditional(self, n: int) -> dict[str, Tensor]:
        return self._route(torch.full((n,), self.null_index, device=self.device, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, null_class={self.null_class}, conditioning_key={self.conditioning_key}"


# ------------------------------------------------------------------------------------------------------- text


class TextConditioner(LatentConditioner):
    """Captions ``batch[caption_key]`` through a frozen text encoder (:func:`gencore.text.text_encoder`: ``path=None``
    is all-MiniLM-L6-v2, offline; a model folder, e.g. CLIP ViT-L/14 for SD with ``max_length=77,
    projection=False``; a ``.safetensors`` file of :func:`gencore.text.save_text_features`) -> ``c_crossattn``
    (B, L, D); the unconditional condition is the features of "". The encoder is kept under ``encoder`` (frozen:
    outside the optimizer and the exported weights)."""

    conditioning_key = "crossattn"
    produces = ("c_crossattn",)
    requests = ("captions", "labels")

    def __init__(self, path: Any = None, *, caption_key: str = "caption", **encoder_kwargs: Any) -> None:
        super().__init__()
        from gencore.text import text_encoder

        self.encoder = text_encoder(path, **encoder_kwargs)
        self.caption_key = caption_key
        self._null: Tensor | None = None

    def bind(self, *, model: nn.Module | None = None, **context: Any) -> None:
        super().bind(**context)
        width = getattr(model, "context_dim", None)
        if width is not None and self.encoder.hidden_size != width:
            raise ValueError(
                f"text encoder width {self.encoder.hidden_size} does not match the UNet's context_dim {width}"
            )

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        captions = take(batch, self.caption_key, n, "text conditioning")
        return {"c_crossattn": self.encoder.encode(list(captions))}

    def unconditional(self, n: int) -> dict[str, Tensor]:
        if self._null is None or self._null.device != self.encoder.device:
            self._null = self.encoder.encode([""])  # (1, L, D), computed once per device
        return {"c_crossattn": self._null.expand(n, -1, -1)}

    def generation_batch(
        self, n: int, captions: Any = None, labels: Any = None, **request: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``captions``, or the Fashion-MNIST caption of each of ``labels`` (default: random classes)."""
        super().generation_batch(n, **request)
        texts, picks = requested_captions(n, captions, labels)
        out: dict[str, Any] = {"captions": texts}
        if picks is not None:
            out["labels"] = picks
        return {self.caption_key: texts}, out


# ----------------------------------------------------------------------------------------------------- concat


class LowResolutionConditioner(LatentConditioner):
    """Super-resolution by ``sr_factor`` (``bsr_sr``): the image downsampled by ``sr_factor`` and resized to the
    latent grid, concatenated to the latents (:func:`low_resolution_condition`)."""

    conditioning_key = "concat"
    produces = ("c_concat",)

    def __init__(self, sr_factor: int = 4) -> None:
        super().__init__()
        if isinstance(sr_factor, bool) or not isinstance(sr_factor, int) or sr_factor < 1:
            raise ValueError(f"LowResolutionConditioner: sr_factor must be an integer >= 1, got {sr_factor!r}")
        self.sr_factor = sr_factor
        self.latent_size: tuple[int, int] | None = None
        self.image_size: int | None = None

    def bind(self, *, latent_shape: tuple[int, int, int], image_size: int, **context: Any) -> None:
        super().bind(**context)
        if image_size % self.sr_factor:
            raise ValueError(f"image_size {image_size} is not divisible by sr_factor {self.sr_factor}")
        self.latent_size, self.image_size = tuple(latent_shape[1:]), int(image_size)

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        if self.latent_size is None:
            raise ValueError("LowResolutionConditioner is not bound to a model (its latent size is unknown)")
        x = take(batch, self.image_key, n, "super-resolution conditioning")
        return {"c_concat": low_resolution_condition(x, self.sr_factor, self.latent_size)}

    def superres_condition(self, images: Tensor, **request: Any) -> dict[str, Tensor]:
        """``images`` of the output size (their downsampled version is the condition), or low-resolution images
        ``image_size / sr_factor`` wide (bicubic-upsampled first)."""
        super().generation_batch(images.shape[0], **request)  # takes no request
        if images.shape[-1] * self.sr_factor == self.image_size:
            images = F.interpolate(images, scale_factor=self.sr_factor, mode="bicubic")
        return self.encode({self.image_key: images})

    def generation_batch(self, n: int, **request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        raise ValueError("a super-resolution model samples with superres(images), not generate()")

    def log_samples(self, module: Any, batch: Mapping[str, Any], n: int, **opts: Any) -> dict[str, Tensor]:
        x = batch[self.image_key][:n]
        f = self.sr_factor
        low = F.interpolate(F.avg_pool2d(x, f), scale_factor=f, mode="nearest")
        return {"low_resolution": low, "super_resolved": module.superres(x, **opts)}

    def extra_repr(self) -> str:
        return f"sr_factor={self.sr_factor}"


class InpaintingConditioner(LatentConditioner):
    """Inpainting by concatenation (``inpainting_big``): [encode(masked image), mask at the latent size] with the
    owning model's first-stage encoding (received through :meth:`bind`). ``batch[mask_key]`` (B, 1, H, W), 1 = hole;
    without it (training) random boxes (:func:`random_masks`) are drawn on the images' device."""

    conditioning_key = "concat"
    produces = ("c_concat",)

    def __init__(self, mask_key: str = "mask") -> None:
        super().__init__()
        self.mask_key = mask_key
        self._encode: Any = None

    def bind(self, *, encode: Any, **context: Any) -> None:
        super().bind(**context)
        self._encode = encode

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        if self._encode is None:
            raise ValueError("InpaintingConditioner is not bound to a model (it needs the first stage's encode)")
        x = take(batch, self.image_key, n, "inpainting conditioning")
        return {"c_concat": inpainting_condition(x, batch.get(self.mask_key), self._encode)}

    def inpainting(self, images: Tensor, masks: Tensor, **request: Any) -> tuple[dict[str, Tensor], bool]:
        super().generation_batch(images.shape[0], **request)  # takes no request
        return self.encode({self.image_key: images, self.mask_key: masks}), False

    def generation_batch(self, n: int, **request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        raise ValueError("an inpainting model samples with inpaint(images, masks), not generate()")

    def log_samples(self, module: Any, batch: Mapping[str, Any], n: int, **opts: Any) -> dict[str, Tensor]:
        x = batch[self.image_key][:n]
        masks = random_masks(x.shape[0], x.shape[-1], device=x.device)
        return {"masked": x * (1 - masks), "inpainted": module.inpaint(x, masks, **opts)}


class SemanticConditioner(LatentConditioner):
    """Semantic synthesis by concatenation (``semantic_synthesis256``): ``batch[segmentation_key]`` ((B, H, W) labels,
    one-hot encoded, or (B, C, H, W) maps) through the official ``SpatialRescaler`` — ``n_stages`` resizes by
    ``multiplier``, then a 1x1 ``channel_mapper`` (e.g. 182 COCO-Stuff classes -> 3 channels) — resized to the latent
    grid. Trainable, as officially; keys ``cond_stage_model.channel_mapper.*``."""

    conditioning_key = "concat"
    produces = ("c_concat",)
    requests = ("segmentation",)

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
        *,
        segmentation_key: str = "segmentation",
    ) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}")
        if method not in ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area"):
            raise ValueError(f"SpatialRescaler: unknown method {method!r}")
        self.n_stages, self.method, self.multiplier, self.in_channels = n_stages, method, multiplier, in_channels
        self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias) if out_channels else None
        self.out_channels = out_channels or in_channels
        self.segmentation_key = segmentation_key
        self.latent_size: tuple[int, int] | None = None

    def bind(self, *, latent_shape: tuple[int, int, int], **context: Any) -> None:
        super().bind(**context)
        self.latent_size = tuple(latent_shape[1:])

    def rescale(self, maps: Tensor) -> Tensor:
        """The official ``SpatialRescaler.forward``: (B, in_channels, H, W) -> (B, out_channels, h, w)."""
        if maps.dim() != 4 or maps.shape[1] != self.in_channels:
            raise ValueError(f"SpatialRescaler: expected (B, {self.in_channels}, H, W), got {tuple(maps.shape)}")
        for _ in range(self.n_stages):
            maps = F.interpolate(maps, scale_factor=self.multiplier, mode=self.method)
        return maps if self.channel_mapper is None else self.channel_mapper(maps)

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        seg = torch.as_tensor(take(batch, self.segmentation_key, n, "semantic synthesis")).to(
            self.device, non_blocking=True
        )
        c = self.rescale(one_hot_map(seg, self.in_channels))
        if self.latent_size is not None and tuple(c.shape[-2:]) != self.latent_size:
            c = F.interpolate(c, size=self.latent_size, mode="nearest")
        return {"c_concat": c}

    def generation_batch(
        self, n: int, segmentation: Any = None, **request: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().generation_batch(n, **request)
        if segmentation is None:
            raise ValueError("a semantic-synthesis model needs segmentation maps: generate(n, segmentation=...)")
        return {self.segmentation_key: segmentation}, {}


# ----------------------------------------------------------------------------------------------------- hybrid


class HybridConditioner(LatentConditioner):
    """A cross-attention conditioner and a concat conditioner (``conditioning_key="hybrid"``; keys
    ``cond_stage_model.crossattn.*`` / ``cond_stage_model.concat.*``). Guidance and dropout act on the cross-attention
    part; the concat input is shared by both halves."""

    conditioning_key = "hybrid"
    produces = ("c_concat", "c_crossattn")

    def __init__(self, crossattn: LatentConditioner, concat: LatentConditioner) -> None:
        super().__init__()
        for name, part, key in (("crossattn", crossattn, "crossattn"), ("concat", concat, "concat")):
            if not isinstance(part, LatentConditioner) or part.conditioning_key != key:
                raise ValueError(
                    f"HybridConditioner: {name} must be an ldm conditioner with conditioning_key={key!r}, got "
                    f"{type(part).__name__} ({getattr(part, 'conditioning_key', None)!r})"
                )
        self.crossattn, self.concat = crossattn, concat
        self.requests = (*crossattn.requests, *concat.requests)

    @property
    def sr_factor(self) -> int | None:  # type: ignore[override]
        return self.concat.sr_factor

    @property
    def guidable(self) -> bool:
        return self.crossattn.guidable

    def bind(self, **context: Any) -> None:
        super().bind(**{k: v for k, v in context.items() if k == "image_key"})
        self.crossattn.bind(**context)
        self.concat.bind(**context)

    def _split(self, request: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        unknown = sorted(k for k, v in request.items() if v is not None and k not in self.requests)
        if unknown:
            raise ValueError(f"HybridConditioner does not take {', '.join(unknown)} when generating")
        cross = {k: v for k, v in request.items() if k in self.crossattn.requests}
        return cross, {k: v for k, v in request.items() if k in self.concat.requests and k not in cross}

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        return {**self.crossattn.encode(batch, n), **self.concat.encode(batch, n)}

    def unconditional(self, n: int) -> Any:
        return self.crossattn.unconditional(n)

    def generation_batch(self, n: int, **request: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        cross, concat = self._split(request)
        batch_c, out_c = self.crossattn.generation_batch(n, **cross)
        batch_x, out_x = self.concat.generation_batch(n, **concat)
        return {**batch_c, **batch_x}, {**out_c, **out_x}

    def inpainting(self, images: Tensor, masks: Tensor, **request: Any) -> tuple[dict[str, Tensor], bool]:
        cross, concat = self._split(request)
        c, masked = self.concat.inpainting(images, masks, **concat)
        return {**(self.crossattn.request_condition(images.shape[0], **cross) or {}), **(c or {})}, masked

    def superres_condition(self, images: Tensor, **request: Any) -> dict[str, Tensor]:
        cross, concat = self._split(request)
        c = self.concat.superres_condition(images, **concat)
        return {**(self.crossattn.request_condition(images.shape[0], **cross) or {}), **c}

    def log_samples(self, module: Any, batch: Mapping[str, Any], n: int, **opts: Any) -> dict[str, Tensor]:
        return self.concat.log_samples(module, batch, n, **opts)

    def evaluation_request(self) -> dict[str, Any]:
        return self.crossattn.evaluation_request()


# ------------------------------------------------------------------------------------ the older constructor


def conditioner_from_legacy(
    *,
    cond_stage: str | LatentConditioner | None = None,
    conditioning_key: str | None = None,
    num_classes: int = 10,
    null_class: bool = True,
    text_encoder: Mapping[str, Any] | None = None,
    concat: str | None = None,
    sr_factor: int = 4,
    semantic: Mapping[str, Any] | None = None,
    segmentation_key: str = "segmentation",
    label_key: str = "label",
    caption_key: str = "caption",
) -> tuple[LatentConditioner, dict[str, str]]:
    """The conditioner that the older ``LatentDiffusion`` arguments describe, and the state-dict renames from the
    layout those models were saved in (for :func:`gencore.io.accept_legacy_keys`).

    ``cond_stage``: None, ``"class"`` (``num_classes``, ``null_class``, ``label_key``; ``conditioning_key="adm"``
    routes the labels as ``y``), ``"text"`` (``text_encoder`` = the encoder's keyword arguments, ``caption_key``) or a
    conditioner; ``concat``: None, ``"lowres"`` (``sr_factor``), ``"inpaint"`` or ``"semantic"`` (``semantic`` =
    SpatialRescaler arguments, ``segmentation_key``). Both together make a :class:`HybridConditioner`. The defaults
    are the older constructor's.
    """
    if concat not in (None, "lowres", "inpaint", "semantic"):
        raise ValueError(f"concat must be None, 'lowres', 'inpaint' or 'semantic', got {concat!r}")
    if concat == "semantic" and not semantic:
        raise ValueError("concat='semantic' needs semantic={in_channels: <classes>, ...} (SpatialRescaler kwargs)")
    renames: dict[str, str] = {}
    cross: LatentConditioner | None
    if cond_stage == "class":
        key = "adm" if conditioning_key == "adm" else "crossattn"
        cross = ClassConditioner(num_classes, null_class=null_class, conditioning_key=key, label_key=label_key)
    elif cond_stage == "text":
        cross = TextConditioner(caption_key=caption_key, **dict(text_encoder or {}))
    elif cond_stage is None or isinstance(cond_stage, LatentConditioner):
        cross = cond_stage
    else:
        raise ValueError(
            f"cond_stage must be None, 'class', 'text' or an ldm conditioner (pass other modules as conditioner=), "
            f"got {cond_stage!r}"
        )
    if concat == "lowres":
        part: LatentConditioner | None = LowResolutionConditioner(sr_factor)
    elif concat == "inpaint":
        part = InpaintingConditioner()
    elif concat == "semantic":
        part = SemanticConditioner(**dict(semantic or {}), segmentation_key=segmentation_key)
    else:
        part = None
    if cross is None:
        return (part if part is not None else Unconditional()), renames
    inner = "cond_stage_model." if part is None else "cond_stage_model.crossattn."
    if isinstance(cross, TextConditioner):  # the encoder was the cond_stage_model itself (frozen; in .ckpt files)
        renames["cond_stage_model.transformer."] = inner + "encoder.transformer."
    if part is None:
        return cross, renames
    if isinstance(cross, ClassConditioner):
        renames["cond_stage_model.embedding."] = inner + "embedding."
    if isinstance(part, SemanticConditioner):  # with a cross-attention stage the rescaler was semantic_model
        renames["semantic_model."] = "cond_stage_model.concat."
    return HybridConditioner(cross, part), renames
