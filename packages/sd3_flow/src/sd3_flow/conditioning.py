"""Text conditioning of SD3 (Sec. 5.2; ``Stability-AI/sd3.5: sd3_infer.py:get_cond``, diffusers' SD3 pipeline), as
a :class:`gencore.conditioning.Conditioner` injected into :class:`sd3_flow.lit.RectifiedFlowModule`.

Three frozen encoders, combined:

- CLIP-L (768) and CLIP-G (1280) token states (their penultimate layer) are concatenated on channels (2048) and
  zero-padded to ``joint_attention_dim`` (4096); T5-XXL states (4096) follow **on the sequence** axis;
- the pooled vector is ``cat(CLIP-L pooled, CLIP-G pooled)`` (2048);
- in training each encoder is dropped independently (its features zeroed per sample, SD3: about 46.3 % each), so the
  model works without T5 and learns the unconditional input of classifier-free guidance: all encoders dropped, i.e.
  zeros of the conditional shapes (:meth:`SD3TextConditioner.unconditional`). The masks come from
  :func:`gencore.diffusion.dropout_masks`, drawn on the features' device.

Any subset works (an encoder that is absent contributes nothing); the offline toy default is one MiniLM encoder, whose
384-d token states are the sequence and whose mean-pooled states the pooled vector. Encoders load from local folders
through :class:`gencore.text.FrozenTextEncoder`; objects with the same ``forward(texts) -> {"tokens", "pooled"}``
interface can be passed directly (tests, custom encoders). A ``.safetensors`` path in place of a folder serves
features precomputed by :func:`gencore.text.save_text_features` (a fixed caption set, training without T5's weights in
memory, or on a machine without the encoder files).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.conditioning import Conditioner, requested_captions, take
from gencore.diffusion import check_probability, dropout_masks
from gencore.modules import FrozenModule

__all__ = ["ConcatConditioner", "EditingConditioner", "InpaintingConditioner", "SD3TextConditioner"]

CLIP_NAMES = ("clip_l", "clip_g")


class SD3TextConditioner(FrozenModule, Conditioner):
    """Frozen text encoders: a batch's captions -> ``{"context": (B, L, joint_dim), "pooled": (B, pooled_dim)}``.

    Args:
        clip_l / clip_g / t5: local model folders, precomputed feature files (``.safetensors``) or encoder objects;
            ``None`` leaves that encoder out.
        minilm: ``True``: the offline all-MiniLM-L6-v2 encoder (the default when no other encoder is given); a path
            (another sentence-encoder folder or a precomputed feature file) or an encoder object in its place.
        joint_attention_dim: width of the context (CLIP features are zero-padded to it; T5's must equal it).
        clip_max_length / t5_max_length / minilm_max_length: tokens per prompt (77 / 256 as the diffusers pipeline;
            the reference uses 77 for T5).
        clip_layer: hidden layer of the CLIP token states (-2: the penultimate, as SD3).
        caption_key: the batch entry holding the captions (a list of strings).

    ``conditioner(batch, n, drop=p)`` encodes and drops each encoder independently with probability ``p`` (a float
    for all, or ``{encoder name: p}``); ``unconditional(n)`` is the all-dropped condition; ``generation_batch(n,
    captions=..., labels=...)`` the batch of a generation request (Fashion-MNIST captions of ``labels`` by default).
    """

    produces = ("context", "pooled")

    def __init__(
        self,
        *,
        clip_l: Any = None,
        clip_g: Any = None,
        t5: Any = None,
        minilm: bool | str | os.PathLike | nn.Module | None = None,
        joint_attention_dim: int | None = None,
        clip_max_length: int = 77,
        t5_max_length: int = 256,
        minilm_max_length: int = 16,
        clip_layer: int = -2,
        caption_key: str = "caption",
    ) -> None:
        super().__init__()
        from gencore.text import text_encoder

        def build(spec: Any, **kw: Any) -> nn.Module:
            return spec if isinstance(spec, nn.Module) else text_encoder(spec, **kw)

        encoders: dict[str, nn.Module] = {}
        if clip_l is not None:
            encoders["clip_l"] = build(
                clip_l, max_length=clip_max_length, pooling="model", projection=True, hidden_layer=clip_layer
            )
        if clip_g is not None:
            encoders["clip_g"] = build(
                clip_g, max_length=clip_max_length, pooling="model", projection=True, hidden_layer=clip_layer
            )
        if t5 is not None:
            encoders["t5"] = build(t5, max_length=t5_max_length)
        if minilm or (minilm is None and not encoders):
            spec = None if minilm is None or isinstance(minilm, bool) else minilm
            encoders["minilm"] = build(spec, max_length=minilm_max_length, pooling="mean")
        if not encoders:
            raise ValueError("SD3TextConditioner: no text encoder given (clip_l, clip_g, t5 or minilm)")
        self.encoders = nn.ModuleDict(encoders)
        widths = {n: int(e.hidden_size) for n, e in encoders.items()}
        clip_width = sum(widths[n] for n in CLIP_NAMES if n in widths)
        natural = max([clip_width, widths.get("t5", 0), widths.get("minilm", 0)])
        self.joint_attention_dim = int(joint_attention_dim or natural)
        for name, w in widths.items():
            limit = clip_width if name in CLIP_NAMES else w
            if limit > self.joint_attention_dim:
                raise ValueError(
                    f"{name} features ({limit}) are wider than joint_attention_dim {self.joint_attention_dim}"
                )
        if "t5" in widths and widths["t5"] != self.joint_attention_dim:
            raise ValueError(f"T5 width {widths['t5']} must equal joint_attention_dim {self.joint_attention_dim}")
        self.pooled_dim = sum(int(encoders[n].pooled_size) for n in ("clip_l", "clip_g", "minilm") if n in encoders)
        self.widths = widths
        self.caption_key = caption_key
        self.freeze()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.encoders)

    @torch.no_grad()
    def encode_parts(self, prompts: Sequence[str]) -> dict[str, dict[str, Tensor]]:
        """Each encoder's ``{"tokens", "pooled"}`` for ``prompts``."""
        if isinstance(prompts, str):
            raise ValueError("SD3TextConditioner: expected a list of prompts, got a single string")
        return {name: enc(list(prompts)) for name, enc in self.encoders.items()}

    def combine(
        self, parts: Mapping[str, Mapping[str, Tensor]], dropped: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """The SD3 layout from per-encoder features; ``dropped[name]`` (B,) bool zeroes that encoder's features (tokens
        and pooled) for the samples where it is True."""

        def kept(name: str, t: Tensor) -> Tensor:
            if dropped is None or name not in dropped:
                return t
            keep = (~dropped[name]).to(t.device, t.dtype).view(-1, *([1] * (t.dim() - 1)))
            return t * keep

        d = self.joint_attention_dim
        seq: list[Tensor] = []
        pooled: list[Tensor] = []
        clip = [kept(n, parts[n]["tokens"]) for n in CLIP_NAMES if n in parts]
        if clip:
            length = max(t.shape[1] for t in clip)
            clip = [F.pad(t, (0, 0, 0, length - t.shape[1])) for t in clip]
            cat = torch.cat(clip, dim=-1)  # (B, 77, 768 + 1280)
            seq.append(F.pad(cat, (0, d - cat.shape[-1])))  # zero-padded to (B, 77, 4096)
            pooled += [kept(n, parts[n]["pooled"]) for n in CLIP_NAMES if n in parts]
        for name in ("t5", "minilm"):
            if name in parts:
                t = kept(name, parts[name]["tokens"])
                seq.append(F.pad(t, (0, d - t.shape[-1])))
                if name == "minilm":
                    pooled.append(kept(name, parts[name]["pooled"]))
        return {"context": torch.cat(seq, dim=1), "pooled": torch.cat(pooled, dim=-1)}

    # ------------------------------------------------------------------------------------ the Conditioner interface

    def bind(self, *, model: nn.Module | None = None, **context: Any) -> None:
        """Check that the network takes these features: its ``joint_attention_dim`` / ``pooled_projection_dim``."""
        joint = getattr(model, "joint_attention_dim", None)
        if joint is not None and joint != self.joint_attention_dim:
            raise ValueError(
                f"text features are {self.joint_attention_dim} wide, the transformer's joint_attention_dim is {joint}"
            )
        pooled = getattr(model, "pooled_projection_dim", None)
        if pooled is not None and pooled != self.pooled_dim:
            raise ValueError(f"pooled text is {self.pooled_dim} wide, the transformer expects {pooled}")

    def encode_text(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"context", "pooled"}`` of a list of prompts (no dropout)."""
        return self.combine(self.encode_parts(prompts))

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        """``{"context", "pooled"}`` of the captions ``batch[caption_key]`` (the first ``n``)."""
        return self.encode_text(list(take(batch, self.caption_key, n, "a text-conditional model")))

    def dropout_probabilities(self, drop: float | Mapping[str, float]) -> dict[str, float]:
        """``{encoder name: p}`` from one probability for every encoder or a per-encoder mapping (absent names: 0);
        a ValueError for a value outside [0, 1] or a name that is not one of the encoders."""
        if isinstance(drop, Mapping):
            unknown = sorted(set(drop) - set(self.names))
            if unknown:
                raise ValueError(f"text dropout for {unknown}: not among the encoders {list(self.names)}")
            return {name: check_probability(drop.get(name, 0.0), f"p_drop_text[{name!r}]") for name in self.names}
        p = check_probability(drop, "p_drop_text")
        return dict.fromkeys(self.names, p)

    def forward(
        self,
        batch: Mapping[str, Any],
        n: int | None = None,
        *,
        drop: float | Mapping[str, float] = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """:meth:`encode`, each encoder dropped on its own with probability ``drop`` (float or ``{name: p}``): its
        features zeroed for that sample (SD3). Masks from :func:`gencore.diffusion.dropout_masks` on the features'
        device: no host->device copy, no host sync."""
        parts = self.encode_parts(list(take(batch, self.caption_key, n, "a text-conditional model")))
        probs = self.dropout_probabilities(drop)
        if not any(probs.values()):
            return self.combine(parts)
        first = next(iter(parts.values()))["tokens"]  # (B, L, D)
        dropped = dropout_masks(first.shape[0], probs, generator=generator, device=first.device)
        return self.combine(parts, dropped)

    def unconditional(self, n: int) -> dict[str, Tensor]:
        """All encoders dropped: zeros of the conditional shapes (what training with dropout learned as "no text"),
        ``{"context": (n, L, joint_dim), "pooled": (n, pooled_dim)}`` (expanded views)."""
        parts = self.encode_parts([""])
        device = next(iter(parts.values()))["tokens"].device
        every = {name: torch.ones(1, dtype=torch.bool, device=device) for name in self.names}
        out = self.combine(parts, every)
        return {k: v.expand(n, *v.shape[1:]) for k, v in out.items()}

    def generation_batch(
        self,
        n: int,
        *,
        captions: Sequence[str] | None = None,
        labels: Sequence[int] | Tensor | None = None,
        **request: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(``{caption_key: n captions}``, ``{"captions", "labels"?}``): the given ``captions``, or the Fashion-MNIST
        captions of ``labels`` (default: random classes), as :func:`gencore.conditioning.requested_captions`."""
        super().generation_batch(n, **request)  # refuses anything else
        texts, picked = requested_captions(n, captions, labels)
        outputs: dict[str, Any] = {"captions": texts}
        if picked is not None:
            outputs["labels"] = picked
        return {self.caption_key: texts}, outputs


# ------------------------------------------------------------------------- image conditions by concatenation


class ConcatConditioner(Conditioner):
    """Text (an :class:`SD3TextConditioner`) plus an image condition concatenated to the latent input, ``c_concat``
    (the SD3 inpainting and instruction-editing models of the LADD paper, Sec. 5: extra input channels of the MMDiT's
    patch embedding; the output keeps the latent's channels). ``{"context", "pooled", "c_concat"}``. ``text``: the
    text conditioner, or (other keyword arguments) the arguments of the one to build (``minilm=True``, ``t5=...``).

    Only the text is dropped for classifier-free guidance (``unconditional`` has no ``c_concat``: both halves of a
    guided batch share the image). The image part is encoded with the owning module's ``encode`` (first stage and
    latent normaliser), received through :meth:`bind`, which also checks the network's ``in_channels`` =
    latent channels + :meth:`concat_channels` and ``out_channels`` = latent channels.

    Generation requests: ``captions`` / ``labels`` as the text conditioner, and the images (``images``; subclasses add
    theirs). Without images, Fashion-MNIST test images are drawn (the toy models' data; classes from ``labels``) with
    the global RNG, which :func:`gencore.run.generate` seeds per batch.
    """

    produces = ("context", "pooled", "c_concat")
    requests: tuple[str, ...] = ("captions", "labels", "images")

    def __init__(self, text: SD3TextConditioner | None = None, *, image_key: str = "image", **text_kwargs: Any) -> None:
        super().__init__()
        if text is None:
            text = SD3TextConditioner(**text_kwargs)
        elif text_kwargs:
            raise ValueError(f"pass the text conditioner or its arguments ({sorted(text_kwargs)}), not both")
        if not isinstance(text, SD3TextConditioner):
            raise ValueError(f"text must be an SD3TextConditioner, got {type(text).__name__}")
        self.text = text
        self.image_key = image_key
        self._encode: Any = None
        self._image_shape: tuple[int, int, int] | None = None
        self._reference: Any = None  # Fashion-MNIST test images, read on first use

    def concat_channels(self, latent_channels: int) -> int:
        """Channels of ``c_concat`` for a first stage with ``latent_channels``."""
        raise NotImplementedError

    def concat(self, batch: Mapping[str, Any], n: int | None) -> Tensor:
        raise NotImplementedError

    def bind(self, *, model: nn.Module | None = None, codec: Any = None, encode: Any = None, **context: Any) -> None:
        self.text.bind(model=model)
        self._encode = encode
        latent_shape = context.get("latent_shape")
        if codec is not None and latent_shape is not None:
            c, h, w = latent_shape
            f = int(codec.downsample_factor)
            self._image_shape = (int(getattr(codec, "in_channels", 1)), h * f, w * f)
            want = c + self.concat_channels(c)
            got_in, got_out = getattr(model, "in_channels", want), getattr(model, "out_channels", c)
            if got_in != want or got_out != c:
                raise ValueError(
                    f"{type(self).__name__}: the transformer must take {c} latent + {want - c} condition = {want} "
                    f"input channels and return {c} (in_channels={want}, out_channels={c}), got in_channels={got_in}, "
                    f"out_channels={got_out}"
                )

    def _encoded(self, images: Tensor) -> Tensor:
        if self._encode is None:
            raise ValueError(f"{type(self).__name__} is not bound to a model (it needs the first stage's encode)")
        return self._encode(images)

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        return {**self.text.encode(batch, n), "c_concat": self.concat(batch, n)}

    def forward(
        self,
        batch: Mapping[str, Any],
        n: int | None = None,
        *,
        drop: float | Mapping[str, float] = 0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The text with its dropout (:meth:`SD3TextConditioner.forward`), the image condition never dropped."""
        return {**self.text(batch, n, drop=drop, generator=generator), "c_concat": self.concat(batch, n)}

    def unconditional(self, n: int) -> dict[str, Tensor]:
        return self.text.unconditional(n)

    def reference_images(self, n: int, labels: Sequence[int] | Tensor | None) -> tuple[Tensor, list[int]]:
        """``n`` Fashion-MNIST test images (of the classes ``labels``, cycled; default: any) and their labels, drawn
        with the global RNG."""
        from gencore.data import FashionMNIST

        if self._image_shape is None:
            raise ValueError(f"{type(self).__name__}: pass images= (the conditioner does not know the image size)")
        channels, size, _ = self._image_shape
        if self._reference is None:
            self._reference = FashionMNIST(split="test", image_size=size, channels=1 if channels == 1 else 3)
        ds = self._reference
        if labels is None:
            picks = torch.randint(len(ds), (n,)).tolist()
        else:
            wanted = [int(c) for c in (labels.tolist() if isinstance(labels, Tensor) else labels)]
            if not wanted:
                raise ValueError("labels is empty")
            pools = {c: (ds.labels == c).nonzero().flatten() for c in set(wanted)}
            empty = sorted(c for c, pool in pools.items() if len(pool) == 0)
            if empty:
                raise ValueError(f"no Fashion-MNIST test image of class {empty[0]}")
            picks = []
            for i in range(n):
                pool = pools[wanted[i % len(wanted)]]
                picks.append(int(pool[torch.randint(len(pool), (1,))]))
        images = ds.to_model_range(ds.images[picks])
        return images, [int(ds.labels[i]) for i in picks]

    def _images(self, n: int, images: Tensor | None, labels: Any) -> tuple[Tensor, list[int] | None]:
        if images is None:
            return self.reference_images(n, labels)
        images = torch.as_tensor(images)
        if images.dim() != 4 or len(images) < n:
            raise ValueError(f"images must be (N >= {n}, C, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        if self._image_shape is not None and tuple(images.shape[1:]) != self._image_shape:
            raise ValueError(f"images must be (N, {', '.join(map(str, self._image_shape))}), got {tuple(images.shape)}")
        picked = None if labels is None else [int(c) for c in labels][:n]
        return images[:n], picked


class InpaintingConditioner(ConcatConditioner):
    """Inpainting (LADD Sec. 5.2): ``c_concat`` = [latent of the masked image, the mask at the latent size]
    (:func:`gencore.conditioning.inpainting_condition`; the hole, ``mask`` = 1, is set to 0 before encoding).
    ``batch[mask_key]`` (B, 1, H, W); without it (training) box masks are drawn on the images' device
    (:func:`gencore.conditioning.random_masks` with ``min_frac`` / ``max_frac``). Requests: ``images``, ``masks``
    (default: drawn), captions / labels (default: the images' class captions)."""

    requests = ("captions", "labels", "images", "masks")

    def __init__(
        self,
        text: SD3TextConditioner | None = None,
        *,
        image_key: str = "image",
        mask_key: str = "mask",
        min_frac: float = 0.25,
        max_frac: float = 0.6,
        **text_kwargs: Any,
    ) -> None:
        from gencore.conditioning import random_masks

        super().__init__(text, image_key=image_key, **text_kwargs)
        random_masks(1, 8, min_frac=min_frac, max_frac=max_frac)  # bad fractions fail at construction
        self.mask_key, self.min_frac, self.max_frac = mask_key, min_frac, max_frac

    def concat_channels(self, latent_channels: int) -> int:
        return latent_channels + 1

    def masks(self, n: int, size: int, device: Any = None) -> Tensor:
        from gencore.conditioning import random_masks

        return random_masks(n, size, min_frac=self.min_frac, max_frac=self.max_frac, device=device)

    def concat(self, batch: Mapping[str, Any], n: int | None) -> Tensor:
        from gencore.conditioning import inpainting_condition

        x = take(batch, self.image_key, n, "inpainting conditioning")
        fracs = {"min_frac": self.min_frac, "max_frac": self.max_frac}
        return inpainting_condition(x, batch.get(self.mask_key), self._encoded, **fracs)

    def generation_batch(
        self,
        n: int,
        *,
        captions: Sequence[str] | None = None,
        labels: Sequence[int] | Tensor | None = None,
        images: Tensor | None = None,
        masks: Tensor | None = None,
        **request: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        Conditioner.generation_batch(self, n, **request)  # refuses anything else
        images, picked = self._images(n, images, labels)
        masks = self.masks(n, images.shape[-1]) if masks is None else torch.as_tensor(masks)[:n].to(images.dtype)
        if masks.shape != (n, 1, *images.shape[-2:]):
            raise ValueError(f"masks must be (N, 1, H, W) like the images, got shape {tuple(masks.shape)}")
        texts, _ = requested_captions(n, captions, picked)
        out: dict[str, Any] = {"captions": texts, "sources": images * (1 - masks)}
        if picked is not None:
            out["labels"] = picked
        return {self.text.caption_key: texts, self.image_key: images, self.mask_key: masks}, out


class EditingConditioner(ConcatConditioner):
    """Instruction editing (LADD Sec. 5.2, InstructPix2Pix-style): ``c_concat`` = the latent of ``batch[source_key]``
    (the image to edit); the caption is the instruction. Requests: ``images`` (the sources; default: Fashion-MNIST
    test images), ``captions`` (the instructions; default: :data:`gencore.data.EDITS` in turn); with the default
    instructions the exact edits are returned as ``targets``."""

    def __init__(
        self,
        text: SD3TextConditioner | None = None,
        *,
        image_key: str = "image",
        source_key: str = "source",
        **text_kwargs: Any,
    ) -> None:
        super().__init__(text, image_key=image_key, **text_kwargs)
        self.source_key = source_key

    def concat_channels(self, latent_channels: int) -> int:
        return latent_channels

    def concat(self, batch: Mapping[str, Any], n: int | None) -> Tensor:
        return self._encoded(take(batch, self.source_key, n, "editing conditioning"))

    def generation_batch(
        self,
        n: int,
        *,
        captions: Sequence[str] | None = None,
        labels: Sequence[int] | Tensor | None = None,
        images: Tensor | None = None,
        **request: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        from gencore.data import EDITS, apply_edit

        Conditioner.generation_batch(self, n, **request)
        sources, picked = self._images(n, images, labels)
        if captions is None:
            offset = int(torch.randint(len(EDITS), (1,)))
            captions = [list(EDITS)[(offset + i) % len(EDITS)] for i in range(n)]
        texts = [str(c) for c in list(captions)[:n]]
        if len(texts) < n:
            raise ValueError(f"{n} instructions expected, got {len(texts)}")
        out: dict[str, Any] = {"captions": texts, "sources": sources}
        if all(t in EDITS for t in texts):
            out["targets"] = torch.stack([apply_edit(t, s) for t, s in zip(texts, sources, strict=True)])
        if picked is not None:
            out["labels"] = picked
        return {self.text.caption_key: texts, self.source_key: sources}, out
