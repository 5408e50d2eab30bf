"""Conditioning stages of the Net2NetTransformer (``taming/models/cond_transformer.py``, ``taming/modules/util.py``),
as :class:`gencore.conditioning.Conditioner` objects chosen by ``_target_`` in config.

A conditioner turns whatever conditions an image into the sequence of tokens ``c`` (B, Lc) long that precedes the
image tokens (Sec. 3.2, Eq. 8: ``p(s | c) = prod_i p(s_i | s_<i, c)``):

- :class:`SOSConditioner` — unconditional: one start-of-sequence token (official ``SOSProvider``);
- :class:`ClassConditioner` — class-conditional: the class id + ``offset`` as one token (official ``Labelator``; the
  offset lets class tokens have ids of their own after the image codes);
- :class:`SpatialConditioner` — a second, frozen VQGAN (depth, segmentation, edges, a low-resolution image) whose
  code indices of the condition image are the tokens; its weights keep the official ``cond_stage_model.*`` layout.

Each knows the token ids it needs (``vocab_end``, for the transformer's vocabulary check), how a batch becomes tokens
(:meth:`~TokenConditioner.encode`), what a generation request stands for
(:meth:`~TokenConditioner.generation_batch`: labels, condition images, and what to return with the samples) and what
sliding-window sampling needs (:meth:`~TokenConditioner.window_conditioning`). :func:`legacy_conditioner` translates
the constructor arguments of the Net2NetTransformer before conditioners (``cond_stage="sos" | "class" | a VQGAN``,
``n_classes``, ``class_offset``, ``sos_token``, ``condition``, ``cond_key``).

Condition images derived from the data itself, for Fashion-MNIST experiments: :func:`edge_map` (edges -> image) and
:func:`low_resolution` (super-resolution).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.conditioning import ClassLabels, Conditioner, take
from gencore.modules import FrozenModule, check_index_range, freeze
from taming.first_stage import _vq_from

__all__ = [
    "CONDITION_TRANSFORMS",
    "LEGACY_ARGUMENTS",
    "ClassConditioner",
    "SOSConditioner",
    "SpatialConditioner",
    "TokenConditioner",
    "condition_transform",
    "edge_map",
    "legacy_conditioner",
    "low_resolution",
]


# ------------------------------------------------------------------------------------------- condition images


def _gray01(x: Tensor) -> Tensor:
    return ((x.mean(dim=1, keepdim=True) if x.shape[1] > 1 else x) + 1) / 2  # (B, 1, H, W) in [0, 1]


def edge_map(x: Tensor, threshold: float = 0.15) -> Tensor:
    """Binary Sobel edge map of images in [-1, 1] -> (B, 1, H, W) in {-1, 1} (edges = 1)."""
    if x.dim() != 4:
        raise ValueError(f"edge_map: expected (B, C, H, W), got {tuple(x.shape)}")
    g = _gray01(x)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=g.dtype) / 4
    kx = sobel.to(x.device, non_blocking=True)  # a host->device copy that does not wait (training steps use this)
    gx = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kx[None, None])
    gy = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), kx.T[None, None])
    mag = (gx.square() + gy.square()).sqrt()
    return torch.where(mag > threshold, 1.0, -1.0).to(x.dtype)


def low_resolution(x: Tensor, factor: int = 4) -> Tensor:
    """Average-pool by ``factor`` and upsample back (nearest): the input of a super-resolution model."""
    if x.dim() != 4:
        raise ValueError(f"low_resolution: expected (B, C, H, W), got {tuple(x.shape)}")
    if factor < 1 or x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"low_resolution: image size {tuple(x.shape[-2:])} is not divisible by factor {factor}")
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


CONDITION_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {"edges": edge_map, "lowres": low_resolution}


def _identity(x: Tensor) -> Tensor:
    return x


def condition_transform(name: str | None) -> Callable[[Tensor], Tensor]:
    """The image -> condition-image map named ``name`` (``None``: identity)."""
    if name is None:
        return _identity
    if name not in CONDITION_TRANSFORMS:
        raise ValueError(f"unknown condition {name!r}; valid: {', '.join(CONDITION_TRANSFORMS)}")
    return CONDITION_TRANSFORMS[name]


# ------------------------------------------------------------------------------------------------ conditioners


def _batch_size(batch: Mapping[str, Any], n: int | None, what: str) -> int:
    if n is not None:
        return n
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError(f"{what}: cannot tell the batch size (no tensor in the batch; pass n)")


class TokenConditioner(Conditioner):
    """Base of taming's conditioners: :meth:`encode` gives the conditioning tokens (B, Lc) long.

    Subclasses set :attr:`vocab_end` (one past the largest token id they produce) and implement :meth:`encode`;
    they may take generation requests (:meth:`generation_batch`), say what evaluation asks for by default
    (:meth:`evaluation_request`), add images to the logged grids (:meth:`log_conditioning`) and say how the
    sliding-window sampler is conditioned (:meth:`window_conditioning`). No taming conditioner has an
    unconditional token to guide with (the transformer is sampled without classifier-free guidance).
    """

    produces = ("tokens",)
    #: one past the largest token id :meth:`encode` produces (the transformer's vocabulary must cover it)
    vocab_end: int

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        """The conditioning tokens (B, Lc) long of (the first ``n`` items of) ``batch``."""
        raise NotImplementedError

    def generation_batch(
        self, n: int, *, image_size: int | None = None, **request: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the batch that conditions ``n`` samples of ``image_size`` pixels, what to return with them); requests
        this conditioner does not take (``labels``, ``cond_images``, ...) must be ``None``."""
        return super().generation_batch(n, **request)

    def log_conditioning(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        """Images of the conditions, for the logged grids (name -> (B, C, H, W))."""
        return {}

    def window_conditioning(self, tokens: Tensor, grid: tuple[int, int]) -> dict[str, Any]:
        """Keyword arguments of :func:`taming.sampling.sliding_window_sample` for ``tokens`` (from :meth:`encode`)
        and a code grid ``grid``: here a fixed prefix, repeated in every window."""
        return {"cond": tokens}


class SOSConditioner(TokenConditioner):
    """Unconditional models: the condition is a single start token ``sos_token`` (official ``SOSProvider``)."""

    def __init__(self, sos_token: int = 0) -> None:
        super().__init__()
        if int(sos_token) != sos_token or sos_token < 0:
            raise ValueError(f"SOSConditioner: sos_token must be an integer >= 0, got {sos_token}")
        self.sos_token = int(sos_token)
        self.vocab_end = self.sos_token + 1
        self.register_buffer("token", torch.full((1, 1), self.sos_token, dtype=torch.long), persistent=False)

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        return self.token.repeat(_batch_size(batch, n, "SOSConditioner"), 1)  # (B, 1)

    def window_conditioning(self, tokens: Tensor, grid: tuple[int, int]) -> dict[str, Any]:
        return {"sos": self.sos_token}

    def extra_repr(self) -> str:
        return f"sos_token={self.sos_token}"


class ClassConditioner(ClassLabels, TokenConditioner):
    """Class-conditional models: ``batch[label_key] + offset`` as one token (official ``Labelator`` has offset 0,
    so class tokens share ids with the first image codes).

    Args:
        num_classes: number of classes (labels in [0, num_classes)).
        offset: id of class 0's token (e.g. the number of image codes, so class tokens get ids of their own).
        label_key: batch key of the integer labels.
    """

    def __init__(self, num_classes: int, offset: int = 0, *, label_key: str = "label") -> None:
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 1 or int(offset) != offset or offset < 0:
            raise ValueError(
                f"ClassConditioner: need integers num_classes >= 1 and offset >= 0, got {num_classes}, {offset}"
            )
        self.num_classes, self.offset, self.label_key = int(num_classes), int(offset), label_key
        self.vocab_end = self.offset + self.num_classes
        self.register_buffer("_offset", torch.tensor(self.offset, dtype=torch.long), persistent=False)

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        labels = take(batch, self.label_key, n, "a class-conditional model")
        labels = torch.as_tensor(labels, device=self._offset.device).long()
        if labels.dim() != 1:
            raise ValueError(f"ClassConditioner: labels must be (B,), got shape {tuple(labels.shape)}")
        check_index_range(labels, self.num_classes, "ClassConditioner: labels")  # no host sync on an accelerator
        return (labels + self._offset)[:, None]  # (B, 1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, offset={self.offset}"


class SpatialConditioner(TokenConditioner, FrozenModule):
    """Spatial conditioning: the code indices (B, h·w) of a condition image under a second, frozen VQGAN.

    The condition image is ``condition(batch[cond_key])``: ``cond_key`` names a batch entry (``depth``,
    ``segmentation``, ...; official ``cond_stage_key``), and ``condition`` optionally derives it from that image
    (``edges``, ``lowres``: then ``cond_key`` is usually the data image itself). A batch may instead hold ready
    condition images under ``conditions`` (what :meth:`generation_batch` builds and generated samples return).

    The VQGAN's submodules (``encoder``, ``decoder``, ``quantize``, ``quant_conv``, ``post_quant_conv``) are
    registered on the conditioner itself, so a Net2NetTransformer's state dict holds them under the official
    ``cond_stage_model.encoder.*`` ... names; the whole conditioner is frozen (left out of exports and rebuilt from
    the config, like the first stage).

    Args:
        model: the conditioning VQGAN (a ``VQModel`` / ``GumbelVQ``, or a ``VQGANModule`` holding one).
        cond_key: batch key of the condition (source) image.
        condition: ``None`` (the image is the condition), or the name of a transform of :data:`CONDITION_TRANSFORMS`.
    """

    GIVEN = "conditions"  # batch key of ready condition images

    def __init__(self, model: nn.Module, *, cond_key: str = "image", condition: str | None = None) -> None:
        super().__init__()
        vq = freeze(_vq_from(model))
        for name, child in vq.named_children():
            self.add_module(name, child)
        self._vq = [vq]  # its methods run on the submodules registered above; not registered twice
        self.cond_key, self.condition = cond_key, condition
        self.transform = condition_transform(condition)
        self.vocab_end = vq.vocab_size
        self._image_channels = vq.encoder.in_channels  # source images of default conditions (see bind)
        self.freeze()

    @property
    def vqgan(self) -> nn.Module:
        """The conditioning VQGAN."""
        return self._vq[0]

    def bind(self, *, first_stage: nn.Module | None = None, **context: Any) -> None:
        """Default conditions are derived from data images with the first stage's channels."""
        if first_stage is not None:
            self._image_channels = first_stage.encoder.in_channels

    def condition_images(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        """The condition images (B, C, H, W) of a batch, on the conditioner's device."""
        if batch.get(self.GIVEN) is not None:
            images = batch[self.GIVEN] if n is None else batch[self.GIVEN][:n]
        else:
            images = self.transform(take(batch, self.cond_key, n, "a spatially conditioned model"))
        return images.to(self.quant_conv.weight.device, non_blocking=True)

    @torch.no_grad()
    def tokens(self, images: Tensor) -> Tensor:
        """Condition images -> code indices (B, h·w) long."""
        return self.vqgan.encode_to_indices(images).flatten(1)

    def encode(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        return self.tokens(self.condition_images(batch, n))

    def generation_batch(
        self,
        n: int,
        *,
        image_size: int | None = None,
        cond_images: Tensor | None = None,
        cond_split: str | None = None,
        **request: Any,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """``cond_images`` (the conditions themselves, (n, C, H, W); the first n of more), or by default the
        conditions derived from ``n`` random Fashion-MNIST images of ``cond_split`` (default ``test``) at
        ``image_size`` (their labels are returned too). The conditions are returned with the samples
        (``conditions``)."""
        super().generation_batch(n, **request)
        out: dict[str, Any] = {}
        if cond_images is None:
            from gencore.data import FashionMNIST

            if image_size is None:
                raise ValueError("SpatialConditioner.generation_batch: default conditions need image_size")
            ds = FashionMNIST(split=cond_split or "test", image_size=image_size, channels=self._image_channels)
            pick = torch.randint(0, len(ds), (n,))
            cond_images = self.transform(ds.to_model_range(ds.images[pick]))
            out["labels"] = ds.labels[pick]
        elif cond_split is not None:
            raise ValueError("SpatialConditioner.generation_batch: give cond_images or cond_split, not both")
        elif not isinstance(cond_images, Tensor) or cond_images.dim() != 4 or cond_images.shape[0] < n:
            shape = tuple(cond_images.shape) if isinstance(cond_images, Tensor) else type(cond_images).__name__
            raise ValueError(f"{n} samples need cond_images of shape ({n}, C, H, W), got {shape}")
        else:
            cond_images = cond_images[:n]
        out["conditions"] = cond_images.cpu()
        return {self.GIVEN: cond_images}, out

    def log_conditioning(self, batch: Mapping[str, Any], n: int | None = None) -> dict[str, Tensor]:
        return {"conditioning": self.condition_images(batch, n)}

    def window_conditioning(self, tokens: Tensor, grid: tuple[int, int]) -> dict[str, Any]:
        """The condition grid is cropped with the same window as the image codes (it has the same size)."""
        return {"cond": tokens, "cond_shape": grid}

    def extra_repr(self) -> str:
        return f"cond_key={self.cond_key!r}, condition={self.condition!r}, vocab_end={self.vocab_end}"


# --------------------------------------------------------------------------------------- the old constructor

#: Net2NetTransformer arguments from before conditioners (exports written then carry them in their config.yaml)
LEGACY_ARGUMENTS = ("cond_stage", "n_classes", "class_offset", "sos_token", "condition", "cond_key")


def legacy_conditioner(
    cond_stage: str | nn.Module = "sos",
    n_classes: int = 10,
    class_offset: int = 0,
    sos_token: int = 0,
    condition: str | None = None,
    cond_key: str = "image",
    *,
    image_key: str = "image",
) -> TokenConditioner:
    """The conditioner that the old Net2NetTransformer arguments (with their old defaults) built:
    ``cond_stage="sos"`` -> ``SOSConditioner(sos_token)``, ``"class"`` -> ``ClassConditioner(n_classes,
    class_offset)``, a VQGAN -> ``SpatialConditioner`` on ``batch[cond_key]``, or on ``condition(batch[image_key])``
    when ``condition`` is given."""
    if isinstance(cond_stage, str):
        if cond_stage == "sos":
            return SOSConditioner(sos_token)
        if cond_stage == "class":
            return ClassConditioner(n_classes, class_offset)
    elif isinstance(cond_stage, nn.Module) and not isinstance(cond_stage, Conditioner):
        key = image_key if condition is not None else cond_key
        return SpatialConditioner(cond_stage, cond_key=key, condition=condition)
    raise ValueError(f"cond_stage must be 'sos', 'class' or a VQGAN module, got {cond_stage!r}")
