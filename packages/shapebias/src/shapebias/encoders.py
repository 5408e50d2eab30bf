"""Encoders by name, with per-stage features, for the shape / texture dimensionality estimate and the readouts.

Paper: Islam et al., "Shape or Texture: Understanding Discriminative Features in CNNs", ICLR 2021, arXiv 2101.11604.
The official ``dim_estimation/models/*.py`` copy torchvision's networks and edit ``forward`` to return the
global-average-pooled feature of one stage (ResNets: stage '1'..'4' after maxpool / layer1 / layer2 / layer3, default
'5' after layer4); ViT / DeiT come from a vendored timm with the model's own ``global_pool``. This file implements:

- :class:`Preprocess`: images in genlab's (B, 3, H, W) RGB [-1, 1] to the network's input: ``imagenet`` (RGB, the
  ImageNet mean / std), ``official`` (the official ``StylizedVoc.get_image``: BGR channel order, /255, mean
  [0.456, 0.406, 0.485] and std [0.224, 0.225, 0.229] on the B, G, R channels; the exact BGR permutation of the
  ImageNet statistics would be [0.406, 0.456, 0.485] / [0.225, 0.224, 0.229]: the official code swaps B and G.
  Kept as released, so that numbers are comparable), ``none``; optional bilinear resize (official: 513x513, cv2
  ``INTER_LINEAR``, i.e. half-pixel centres and no antialiasing, as ``F.interpolate(..., align_corners=False)``).
- :data:`STAGE_MAPS` / :func:`stage_map`: stage name -> module path per family (ResNets exactly as the official code;
  the other families had only their last stage officially, the earlier stages here are ours, see ``STAGE_MAPS``).
- :class:`FeatureExtractor`: one forward pass with forward hooks on the requested stages that *stops* after the
  deepest requested one. The official code builds the network once per stage and runs everything up to it; the
  features are the same, the layers after the deepest stage are not computed.
- :func:`build_encoder`: torchvision (``weights=None``, never a download), timm (``pretrained=False``) and the
  in-project :class:`~shapebias.models.cnn.SmallResNet` by name, local weights read safely and loaded strictly.

Departures from the official code (documented where they apply):

- VGG: the official stage-5 feature is ``flatten(AdaptiveAvgPool2d(7)(features(x)))`` (25088 dims at any input
  size); here every stage, "5" included, is global-average-pooled (512 dims), like all other families.
- DenseNet stages "2".."4" are the dense blocks' outputs (the end of each resolution level, before the transition's
  BN-ReLU-conv-pool), not the transitions' outputs. Stage "5" is ``relu(features.norm5)`` as torchvision's forward.
- For timm CNNs, the stages are timm's ``feature_info`` modules (for a timm ResNet stage "1" is ``act1``, before the
  max-pool, unlike the official / torchvision map where it is ``maxpool``).
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.io import MissingWeightsError, load_state_dict, read_state_dict
from shapebias.models.cnn import PRESETS as SMALL_RESNET_PRESETS
from shapebias.models.cnn import SmallResNet, small_resnet

log = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFICIAL_BGR_MEAN",
    "OFFICIAL_BGR_STD",
    "PREPROCESS_MODES",
    "STAGE_MAPS",
    "WEIGHT_SUFFIXES",
    "FeatureExtractor",
    "Preprocess",
    "StageSpec",
    "TokenLayout",
    "build_encoder",
    "encoder_names",
    "extractor_for",
    "load_weights",
    "stage_map",
]

# ------------------------------------------------------------------------------------------------ preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
# Official dim_estimation/datasets/svoc.py, applied to cv2's B, G, R channels (B and G swapped vs. ImageNet: quirk)
OFFICIAL_BGR_MEAN = (0.456, 0.406, 0.485)
OFFICIAL_BGR_STD = (0.224, 0.225, 0.229)
PREPROCESS_MODES = ("imagenet", "official", "none")


def _size_pair(size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = size
    except (TypeError, ValueError):
        h = w = None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
        raise ValueError(f"Preprocess: size must be None, a positive int or (height, width), got {size!r}")
    return int(h), int(w)  # type: ignore[arg-type]


class Preprocess(nn.Module):
    """Images (B, 3, H, W) RGB in [-1, 1] -> the network's input.

    Modes: ``imagenet``: x01 = (x + 1) / 2, then (x01 - mean) / std with the ImageNet RGB statistics.
    ``official``: the official preprocessing: channels flipped to BGR (cv2), x01 as above (the official /255),
    then mean :data:`OFFICIAL_BGR_MEAN` and std :data:`OFFICIAL_BGR_STD` on the B, G, R channels (the quirk in the
    module docstring is kept). ``none``: identity.

    ``size`` (int or (H, W)): bilinear resize (``align_corners=False``, no antialias, as cv2 ``INTER_LINEAR``; the
    official code resizes to 513x513 ignoring the aspect ratio). Resizing and the per-channel affine map commute, so
    resizing after normalising equals the official resize-then-normalise up to float rounding.
    """

    def __init__(self, mode: str = "imagenet", size: int | tuple[int, int] | None = None) -> None:
        super().__init__()
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"Preprocess: unknown mode {mode!r}; modes: {', '.join(PREPROCESS_MODES)}")
        self.mode = mode
        self.size = _size_pair(size)
        mean, std = (OFFICIAL_BGR_MEAN, OFFICIAL_BGR_STD) if mode == "official" else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"Preprocess: expected images (B, 3, H, W) RGB in [-1, 1], got {shape}")
        x = images
        if self.mode != "none":
            x = (x + 1) / 2  # (B, 3, H, W) in [0, 1]
            if self.mode == "official":
                x = x.flip(1)  # RGB -> BGR, as cv2.imread
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=False)
        if self.mode != "none":
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, size={self.size}"


# --------------------------------------------------------------------------------------------------- stage maps

STAGE_MAPS: dict[str, dict[str, str]] = {
    # Official (dim_estimation/models/resnet.py): after maxpool, layer1, layer2, layer3, layer4. Also SmallResNet,
    # wide_resnet50_2 / 101_2 and resnext*.
    "resnet": {"1": "maxpool", "2": "layer1", "3": "layer2", "4": "layer3", "5": "layer4"},
    # VGG: stage k = the k-th MaxPool2d in `features` (derived from the module by stage_map; listed for reference).
    "vgg11": {"1": "features.2", "2": "features.5", "3": "features.10", "4": "features.15", "5": "features.20"},
    "vgg11_bn": {"1": "features.3", "2": "features.7", "3": "features.14", "4": "features.21", "5": "features.28"},
    "vgg13": {"1": "features.4", "2": "features.9", "3": "features.14", "4": "features.19", "5": "features.24"},
    "vgg13_bn": {"1": "features.6", "2": "features.13", "3": "features.20", "4": "features.27", "5": "features.34"},
    "vgg16": {"1": "features.4", "2": "features.9", "3": "features.16", "4": "features.23", "5": "features.30"},
    "vgg16_bn": {"1": "features.6", "2": "features.13", "3": "features.23", "4": "features.33", "5": "features.43"},
    "vgg19": {"1": "features.4", "2": "features.9", "3": "features.18", "4": "features.27", "5": "features.36"},
    "vgg19_bn": {"1": "features.6", "2": "features.13", "3": "features.26", "4": "features.39", "5": "features.52"},
    # DenseNet121-201: pool0, the ends of dense blocks 1-3 (pre-transition), relu(norm5) as torchvision's forward.
    # ":relu" = ReLU applied to the hooked module's output (the model applies it functionally, there is no module).
    "densenet": {
        "1": "features.pool0",
        "2": "features.denseblock1",
        "3": "features.denseblock2",
        "4": "features.denseblock3",
        "5": "features.norm5:relu",
    },
    # MobileNetV2: the last module of each resolution level 1/2 .. 1/32 of `features` (derived from the strides by
    # stage_map; listed for reference). Stage 5 = the final 1x1 conv (1280 ch) the official forward pools.
    "mobilenet_v2": {"1": "features.1", "2": "features.3", "3": "features.6", "4": "features.13", "5": "features.18"},
    # GoogLeNet: last modules at 1/2 .. 1/32 (stage 5 = inception5b, what the official forward pools).
    "googlenet": {"1": "conv1", "2": "conv3", "3": "inception3b", "4": "inception4e", "5": "inception5b"},
    # Inception-v3: last modules at ~1/2 .. 1/32 (stage 5 = Mixed_7c, what the official forward pools).
    "inception_v3": {"1": "Conv2d_2b_3x3", "2": "Conv2d_4a_3x3", "3": "Mixed_5d", "4": "Mixed_6e", "5": "Mixed_7c"},
}

_STAGE_OPS = ("", "relu")


@dataclass(frozen=True)
class TokenLayout:
    """How a vision transformer's (B, L, D) stage outputs become features.

    ``num_prefix_tokens`` tokens (class / distillation / register) precede the patch tokens; pooled features are
    the class token (``class_token``) or the mean of the patch tokens; stages in ``head_pooled`` are pooled by the
    model's own ``forward_head(x, pre_logits=True)`` (timm's ``global_pool``); spatial maps are the patch tokens on
    the (H / patch, W / patch) grid.
    """

    num_prefix_tokens: int = 1
    class_token: bool = True
    patch_size: tuple[int, int] = (16, 16)
    head_pooled: tuple[str, ...] = ()


class StageSpec(NamedTuple):
    """What :func:`stage_map` found for a model."""

    family: str
    stages: dict[str, str]
    token_layout: TokenLayout | None
    channels_last: bool  # 4-D stage outputs are (B, H, W, C) (some timm models)


def _stride(module: nn.Module) -> int:
    """The spatial stride of a sequential block: the product of its convolutions' and pools' strides."""
    total = 1
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            total *= int(s)
    return total


def _stride_levels(features: nn.Sequential, prefix: str, n_levels: int = 5) -> dict[str, str]:
    """Stage k = the last child of ``features`` whose cumulative stride is 2**k (k = 1..n_levels)."""
    last: dict[int, str] = {}
    total = 1
    for child_name, child in features.named_children():
        total *= _stride(child)
        last[round(math.log2(total))] = f"{prefix}.{child_name}"
    levels = sorted(k for k in last if k >= 1)
    if levels != list(range(1, n_levels + 1)):
        raise ValueError(f"{prefix}: expected resolution levels 1/2 .. 1/{2**n_levels}, found strides {levels}")
    return {str(k): last[k] for k in levels}


def _vgg_stages(model: nn.Module) -> dict[str, str]:
    pools = [name for name, m in model.features.named_children() if isinstance(m, nn.MaxPool2d)]
    return {str(k): f"features.{name}" for k, name in enumerate(pools, start=1)}


def _is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def stage_map(model: nn.Module) -> StageSpec:
    """The stage map of ``model``, found from its class (torchvision families, SmallResNet) or its structure (timm).

    Raises ValueError for a model of no known family (pass ``stages`` to :class:`FeatureExtractor` yourself).
    """
    from torchvision import models as tvm

    if isinstance(model, (tvm.ResNet, SmallResNet)):
        return StageSpec("resnet", dict(STAGE_MAPS["resnet"]), None, False)
    if isinstance(model, tvm.VGG):
        return StageSpec("vgg", _vgg_stages(model), None, False)
    if isinstance(model, tvm.DenseNet):
        return StageSpec("densenet", dict(STAGE_MAPS["densenet"]), None, False)
    if isinstance(model, (tvm.MobileNetV2, tvm.MobileNetV3, tvm.EfficientNet)):
        family = "mobilenet_v2" if isinstance(model, tvm.MobileNetV2) else type(model).__name__.lower()
        return StageSpec(family, _stride_levels(model.features, "features"), None, False)
    if isinstance(model, tvm.GoogLeNet):
        return StageSpec("googlenet", dict(STAGE_MAPS["googlenet"]), None, False)
    if isinstance(model, tvm.Inception3):
        return StageSpec("inception_v3", dict(STAGE_MAPS["inception_v3"]), None, False)
    if isinstance(model, tvm.VisionTransformer):
        stages = {f"block{i}": f"encoder.layers.{n}" for i, (n, _) in enumerate(model.encoder.layers.named_children())}
        stages["final"] = "encoder"  # encoder output after its LayerNorm; the class token is torchvision's pre-logits
        patch = int(model.patch_size)
        return StageSpec("vit", stages, TokenLayout(1, True, (patch, patch)), False)
    is_timm_vit = all(hasattr(model, a) for a in ("blocks", "patch_embed", "norm", "forward_head"))
    if is_timm_vit:
        stages = {f"block{i}": f"blocks.{n}" for i, (n, _) in enumerate(model.blocks.named_children())}
        stages["final"] = "norm"  # end of forward_features; pooled by forward_head(pre_logits=True)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
        patch = tuple(int(p) for p in model.patch_embed.patch_size)
        layout = TokenLayout(prefix, has_cls, patch, ("final",))  # type: ignore[arg-type]
        return StageSpec("timm_vit", stages, layout, False)
    info = getattr(model, "feature_info", None)
    if _is_timm(model) and info:
        entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        stages = {}
        for k, entry in enumerate(entries, start=1):
            path = entry["module"]
            try:
                model.get_submodule(path)
            except AttributeError:
                path = path.replace("_", ".")
            stages[str(k)] = path
        nhwc = str(getattr(model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
        return StageSpec("timm_cnn", stages, None, nhwc)
    raise ValueError(
        f"no stage map for a {type(model).__name__}: known families are torchvision ResNet / VGG / DenseNet / "
        "MobileNetV2 / MobileNetV3 / EfficientNet / GoogLeNet / Inception3 / VisionTransformer, SmallResNet, timm "
        "ViTs and timm CNNs with feature_info; pass stages={name: module path} to FeatureExtractor"
    )


# ------------------------------------------------------------------------------------------ feature extraction


class _StopForward(Exception):
    """Raised by the hook of the deepest requested stage to skip the rest of the network."""


class FeatureExtractor(nn.Module):
    """Per-stage features of ``model`` from one forward pass that stops after the deepest requested stage.

    Args:
        model: the network; run as ``model(preprocess(images))``.
        stages: ordered stage name -> dotted module path in ``model``; a path may end in ``":relu"`` (ReLU applied to
            that module's output: torchvision's DenseNet applies its final ReLU functionally).
        name: the encoder's name (quoted in errors).
        preprocess: applied to the (B, 3, H, W) [-1, 1] RGB images first; None = the images go in unchanged.
        token_layout: for transformers: how (B, L, D) token outputs map to features (:class:`TokenLayout`).
        channels_last: 4-D stage outputs are (B, H, W, C) (permuted to (B, C, H, W)).
        frozen: ``requires_grad_(False)`` on the model and keep it in eval mode whatever ``train()`` says. With
            ``frozen=False`` the model follows ``train()`` / ``eval()`` and keeps its ``requires_grad``; hooks never
            detach, so features carry gradients whenever the model or the images do.

    ``forward(images, stages=None, *, pool=True)`` -> {stage: feature} in ``stage_names`` order. ``pool=True``:
    (B, C): CNN maps averaged over H, W; transformer tokens: the class token (patch-token mean without one), and for
    stages in ``token_layout.head_pooled`` the model's ``forward_head(x, pre_logits=True)``. ``pool=False``: maps
    (B, C, h, w); transformer patch tokens on the patch grid, prefix tokens dropped.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: Mapping[str, str],
        *,
        name: str = "model",
        preprocess: Preprocess | None = None,
        token_layout: TokenLayout | None = None,
        channels_last: bool = False,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"FeatureExtractor: model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(stages, Mapping) or not stages:
            raise ValueError(
                f"FeatureExtractor: stages must be a non-empty mapping name -> module path, got {stages!r}"
            )
        if preprocess is not None and not isinstance(preprocess, nn.Module):
            raise ValueError(f"FeatureExtractor: preprocess must be a Preprocess or None, got {preprocess!r}")
        self.model = model
        self.preprocess = preprocess
        self.name = name
        self.token_layout = token_layout
        self.channels_last = bool(channels_last)
        self.frozen = bool(frozen)
        self.stages: dict[str, str] = {}
        self._ops: dict[str, str] = {}
        for stage, spec in stages.items():
            if not isinstance(spec, str):
                raise ValueError(f"{name}: stage {stage!r} must map to a module path string, got {spec!r}")
            path, _, op = spec.partition(":")
            if op not in _STAGE_OPS:
                raise ValueError(f"{name}: stage {stage!r} = {spec!r}: unknown op {op!r}; ops: relu")
            try:
                model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"{name}: stage {stage!r}: the model has no submodule {path!r}") from None
            self.stages[str(stage)] = spec
            self._ops[str(stage)] = op
        if self.frozen:
            self.model.requires_grad_(False)
            self.model.eval()

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.stages)

    def train(self, mode: bool = True) -> FeatureExtractor:
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def select(self, stages: str | Iterable[str] | None) -> list[str]:
        """The requested stages (all when None) in the network's order; a ValueError names an unknown one."""
        if stages is None:
            return list(self.stages)
        wanted = [stages] if isinstance(stages, (str, int)) else list(stages)
        if not wanted:
            raise ValueError(f"{self.name}: stages is empty; its stages: {', '.join(self.stages)}")
        for s in wanted:
            if str(s) not in self.stages:
                raise ValueError(f"stage '{s}' is not a stage of {self.name}; its stages: {', '.join(self.stages)}")
        wanted_set = {str(s) for s in wanted}
        return [s for s in self.stages if s in wanted_set]

    def _feature(self, stage: str, out: Tensor, image_hw: tuple[int, int], pool: bool, last: bool) -> Tensor:
        """One stage's output -> its pooled (B, C) feature or its (B, C, h, w) map; a copy unless it is the last
        stage computed, so that later in-place layers cannot alter it."""
        feat = self._feature_view(stage, out, image_hw, pool)
        if not last and feat.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            feat = feat.clone()
        return feat

    def _feature_view(self, stage: str, out: Tensor, image_hw: tuple[int, int], pool: bool) -> Tensor:
        if self._ops[stage] == "relu":
            out = F.relu(out)  # a new tensor: a later in-place op cannot change it
        layout = self.token_layout
        if out.ndim == 4:
            if self.channels_last:
                out = out.permute(0, 3, 1, 2)  # (B, C, H, W)
            if pool:
                return out.mean(dim=(2, 3))  # (B, C)
            return out  # (B, C, H, W)
        if out.ndim == 3 and layout is not None:  # tokens (B, L, D)
            if pool:
                if stage in layout.head_pooled:
                    return self.model.forward_head(out, pre_logits=True)  # the model's own global pool
                if layout.class_token:
                    return out[:, 0]  # (B, D)
                return out[:, layout.num_prefix_tokens :].mean(dim=1)  # (B, D)
            patches = out[:, layout.num_prefix_tokens :]  # (B, N, D)
            gh, gw = image_hw[0] // layout.patch_size[0], image_hw[1] // layout.patch_size[1]
            if gh * gw != patches.shape[1]:
                side = math.isqrt(patches.shape[1])
                if side * side != patches.shape[1]:
                    raise ValueError(
                        f"{self.name}: stage {stage!r} has {patches.shape[1]} patch tokens, which do not form the "
                        f"{gh}x{gw} patch grid of a {image_hw[0]}x{image_hw[1]} input"
                    )
                gh = gw = side
            return patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], gh, gw)  # (B, D, gh, gw)
        if out.ndim == 2:
            if not pool:
                raise ValueError(f"{self.name}: stage {stage!r} outputs vectors {tuple(out.shape)}; use pool=True")
            return out
        raise ValueError(f"{self.name}: stage {stage!r} output of shape {tuple(out.shape)} is not a feature map")

    def forward(
        self, images: Tensor, stages: str | Iterable[str] | None = None, *, pool: bool = True
    ) -> dict[str, Tensor]:
        names = self.select(stages)
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{self.name}: expected images (B, 3, H, W) RGB in [-1, 1], got {shape}")
        x = self.preprocess(images) if self.preprocess is not None else images
        image_hw = (int(x.shape[-2]), int(x.shape[-1]))
        feats: dict[str, Tensor] = {}

        def make_hook(stage: str):
            def hook(module: nn.Module, inputs: Any, output: Any) -> None:
                if stage in feats:  # a module called twice keeps its first output
                    return
                out = output[0] if isinstance(output, (tuple, list)) else output
                last = len(feats) + 1 == len(names)
                feats[stage] = self._feature(stage, out, image_hw, pool, last)
                if last:
                    raise _StopForward

            return hook

        handles = [
            self.model.get_submodule(self.stages[s].partition(":")[0]).register_forward_hook(make_hook(s))
            for s in names
        ]
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [s for s in names if s not in feats]
        if missing:
            raise RuntimeError(f"{self.name}: the forward pass never ran the module(s) of stage(s) {missing}")
        return {s: feats[s] for s in names}

    def widths(self, image_size: int = 64) -> dict[str, int]:
        """Pooled feature width per stage, by a dry run on a zero batch (in eval mode, no grad; the model's mode is
        restored, BN statistics untouched)."""
        ref = next(iter(self.model.parameters()), None)
        ref = ref if ref is not None else next(iter(self.model.buffers()), torch.zeros(()))
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
            raise ValueError(f"{self.name}: widths(image_size=...) must be a positive int, got {image_size!r}")
        size = (image_size, image_size)
        zeros = torch.zeros(1, 3, *size, device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                feats = self.forward(zeros, pool=True)
        finally:
            self.model.train(was_training)
        return {s: int(f.shape[-1]) for s, f in feats.items()}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stages={self.stages}, frozen={self.frozen}"


def extractor_for(
    model: nn.Module,
    *,
    name: str | None = None,
    stages: str | Iterable[str] | None = None,
    preprocess: Preprocess | None = None,
    frozen: bool = True,
) -> FeatureExtractor:
    """A :class:`FeatureExtractor` over ``model`` with the stage map of its family (:func:`stage_map`), restricted
    to ``stages`` (validated) when given."""
    spec = stage_map(model)
    name = name or type(model).__name__.lower()
    chosen = dict(spec.stages)
    if stages is not None:
        wanted = [stages] if isinstance(stages, (str, int)) else list(stages)
        unknown = [s for s in wanted if str(s) not in chosen]
        if unknown or not wanted:
            bad = unknown[0] if unknown else "(none)"
            raise ValueError(f"stage '{bad}' is not a stage of {name}; its stages: {', '.join(chosen)}")
        chosen = {s: p for s, p in chosen.items() if s in {str(w) for w in wanted}}
    return FeatureExtractor(
        model,
        chosen,
        name=name,
        preprocess=preprocess,
        token_layout=spec.token_layout,
        channels_last=spec.channels_last,
        frozen=frozen,
    )


# ------------------------------------------------------------------------------------------------------ weights

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel / DDP, Lightning, torch.compile
_HEAD_NAMES = frozenset({"fc", "fc2", "classifier", "head", "heads"})


def _strip_wrappers(state: dict[str, Tensor], own: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop wrapper prefixes while that makes more of the module's keys match (keys outside the prefix go)."""
    while True:
        hits = sum(k in own for k in state)
        best = None
        for p in _WRAPPER_PREFIXES:
            under = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
            n = sum(k in own for k in under)
            if under and n > hits:
                best, hits = under, n
        if best is None:
            return state
        dropped = len(state) - len(best)
        if dropped:
            log.info("weights: %d key(s) outside the model's prefix ignored", dropped)
        state = best


def load_weights(
    model: nn.Module,
    weights: str | os.PathLike | Mapping[str, Any],
    *,
    num_classes: int | None = None,
    name: str | None = None,
) -> tuple[list[str], list[str]]:
    """Load a local checkpoint into ``model`` strictly; returns (missing, unexpected) keys (empty unless a head
    was dropped).

    ``weights``: a ``.pth/.pt/.bin/.ckpt/.safetensors`` file, read safely (:func:`gencore.io.read_state_dict`: no
    code from the pickle runs, an unsafe one raises :class:`gencore.io.UnsafeCheckpointError`), or a loaded state
    dict. The tensors may sit under ``state_dict`` / ``model`` / ``module`` / ``ema``, their keys under ``module.``
    (DataParallel), ``model.`` (Lightning) or ``_orig_mod.`` (torch.compile): stripped. With ``num_classes`` given,
    a classifier head (a parameter under ``fc`` / ``fc2`` / ``classifier`` / ``head`` / ``heads``) whose output
    size differs from the model's is dropped and stays freshly initialised (logged); anything else that does not
    match raises :class:`gencore.io.CheckpointKeyError` listing missing, unexpected and mismatched keys.
    A missing file raises :class:`gencore.io.MissingWeightsError` naming it.
    """
    who = name or type(model).__name__
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.is_file():
            raise MissingWeightsError(f"{who}: weights file {path} does not exist")
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ValueError(f"{who}: weights file {path} has suffix {path.suffix!r}; allowed: {WEIGHT_SUFFIXES}")
    elif not isinstance(weights, Mapping):
        raise ValueError(f"{who}: weights must be a file path or a state dict, got {type(weights).__name__}")
    state, source = read_state_dict(weights)
    own = model.state_dict()
    state = _strip_wrappers(state, own)
    dropped: list[str] = []
    if num_classes is not None:
        for key, value in list(state.items()):
            if key not in own or value.shape == own[key].shape:
                continue
            is_head = bool(_HEAD_NAMES.intersection(key.split(".")[:-1]))
            if is_head and own[key].shape[0] == num_classes and value.shape[1:] == own[key].shape[1:]:
                dropped.append(key)
                del state[key]
        if dropped:
            log.warning("%s: classifier head %s of %s dropped (num_classes=%d)", who, dropped, source, num_classes)
    return load_state_dict(model, state, strict=True, allow_missing=dropped, source=source)


# ------------------------------------------------------------------------------------------------ by-name build

_TORCHVISION_FAMILIES = (
    "resnet",
    "wide_resnet",
    "resnext",
    "vgg",
    "densenet",
    "mobilenet_v2",
    "mobilenet_v3_",
    "efficientnet_",
    "googlenet",
    "inception_v3",
    "vit_",
)
_ALIASES = {"inceptionv3": "inception_v3", "mobilenetv2": "mobilenet_v2"}  # the official code's names


def _torchvision_names() -> list[str]:
    from torchvision import models as tvm

    return [n for n in tvm.list_models(module=tvm) if n.startswith(_TORCHVISION_FAMILIES)]


def encoder_names(*, include_timm: bool = False) -> list[str]:
    """Supported encoder names: torchvision families with a stage map, ``small_resnet`` and its presets, and (with
    ``include_timm``) every ``timm:<name>`` that ``timm.list_models()`` knows (bare timm names work too when
    torchvision has no model of that name)."""
    names = [*_torchvision_names(), "small_resnet", *(f"small_resnet:{p}" for p in SMALL_RESNET_PRESETS)]
    if include_timm:
        import timm

        names += [f"timm:{n}" for n in timm.list_models()]
    return names


def _unknown(name: str) -> ValueError:
    import timm

    pool = list(dict.fromkeys([*encoder_names(), *timm.list_models()]))
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"unknown encoder {name!r}{hint} (torchvision: resnet*, wide_resnet*, resnext*, vgg*, densenet*, mobilenet_v2, "
        "mobilenet_v3_*, efficientnet_*, googlenet, inception_v3, vit_*; small_resnet[:preset]; any timm model as "
        "timm:<name>; see encoder_names())"
    )


def _build_model(name: str, num_classes: int | None, has_weights: bool, kwargs: dict[str, Any]) -> nn.Module:
    if num_classes is not None:
        kwargs = {**kwargs, "num_classes": num_classes}
    if name == "small_resnet" or name.startswith("small_resnet:"):
        preset = name.partition(":")[2] or "toy"
        return small_resnet(preset, **kwargs)
    if name.startswith("timm:") or name not in _torchvision_names():
        import timm

        timm_name = name.removeprefix("timm:")
        if not timm.is_model(timm_name):
            raise _unknown(name)
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    from torchvision import models as tvm

    if name in ("googlenet", "inception_v3"):
        kwargs.setdefault("init_weights", not has_weights)  # explicit: silences torchvision's FutureWarning
        if has_weights:  # as torchvision does for its ImageNet weights (inputs re-normalised inside the model)
            kwargs.setdefault("transform_input", True)
    return tvm.get_model(name, weights=None, **kwargs)


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model only accepts (timm / torchvision ViTs: their patch grid and position table), else
    None (CNNs take any size)."""
    size = getattr(model, "image_size", None)  # torchvision VisionTransformer
    if isinstance(size, int) and hasattr(model, "conv_proj"):
        return (size, size)
    embed = getattr(model, "patch_embed", None)  # timm
    img = getattr(embed, "img_size", None)
    if img is not None and not getattr(embed, "dynamic_img_size", False) and getattr(embed, "strict_img_size", True):
        return (int(img[0]), int(img[1]))
    return None


def build_encoder(
    name: str,
    *,
    weights: str | os.PathLike | Mapping[str, Any] | None = None,
    stages: str | Sequence[str] | None = None,
    preprocess: str | Preprocess | None = "imagenet",
    image_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    frozen: bool = True,
    **model_kwargs: Any,
) -> FeatureExtractor:
    """An encoder by name as a :class:`FeatureExtractor` (frozen, eval mode by default).

    Names: torchvision models with a stage map (``torchvision.models.get_model(name, weights=None)``: nothing is
    downloaded), ``small_resnet`` / ``small_resnet:<preset>``, ``timm:<name>`` (``timm.create_model(name,
    pretrained=False)``); a bare name torchvision does not have goes to timm. ``weights``: a local file or state dict,
    see :func:`load_weights` (torchvision's googlenet / inception_v3 are then built with ``transform_input=True`` as
    torchvision builds them for its ImageNet weights, unless you pass it). ``preprocess``: a mode of
    :class:`Preprocess` (resizing to ``image_size``), a :class:`Preprocess`, or None. ``stages`` restricts the
    stage list (validated). ``num_classes`` and ``model_kwargs`` go to the constructor.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"build_encoder: name must be a non-empty string, got {name!r}")
    name = _ALIASES.get(name, name)
    model = _build_model(name, num_classes, weights is not None, dict(model_kwargs))
    if weights is not None:
        load_weights(model, weights, num_classes=num_classes, name=name)
    else:
        log.warning("%s: no weights given: random initialisation (weights=<a local file> for a trained network)", name)
    fixed = fixed_input_size(model)
    if image_size is None and fixed is not None and not isinstance(preprocess, Preprocess):
        image_size = fixed  # a ViT's position table fixes its input size: resize to it
        log.info("%s takes %dx%d inputs: resizing to that (image_size=...)", name, *fixed)
    if isinstance(preprocess, Preprocess):
        if image_size is not None:
            raise ValueError("build_encoder: image_size goes with a preprocess mode; give Preprocess(size=...) instead")
        pre: Preprocess | None = preprocess
    elif preprocess is None:
        pre = None if image_size is None else Preprocess("none", size=image_size)
    else:
        pre = Preprocess(preprocess, size=image_size)
    return extractor_for(model, name=name, stages=stages, preprocess=pre, frozen=frozen)
