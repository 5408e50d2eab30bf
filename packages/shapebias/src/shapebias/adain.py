"""AdaIN style transfer (Huang & Belongie, "Arbitrary Style Transfer in Real-time with Adaptive Instance
Normalization", ICCV 2017) as used by Islam et al., "Shape or Texture: Understanding Discriminative Features in CNNs"
(ICLR 2021, arXiv 2101.11604) to make Stylized PASCAL VOC (``generate_stylized_voc/make_stl_voc.py``).

The modules keep the official pytorch-AdaIN layout of ``generate_stylized_voc/net.py`` index for index, so the
standard ``vgg_normalised.pth`` and ``decoder.pth`` load strictly:

- :func:`vgg_normalised`: the normalised VGG-19 converted from Torch7 (a 1x1 colour conv, then VGG-19's 16 3x3 convs
  with reflection padding, ReLU and ceil-mode max pooling; 53 modules). Only its first 31 modules (input -> relu4_1)
  encode.
- :func:`adain_decoder`: the mirror of the encoder from relu4_1 back to RGB (nearest upsampling, 9 convs).
- :func:`adaptive_instance_normalization` (Eq. 8): ``σ(s) (c - μ(c)) / σ(c) + μ(s)`` per sample and channel, with
  ``σ² = unbiased variance over H·W + eps`` as the official ``calc_mean_std``.
- :class:`AdaINStylizer`: ``decoder(α AdaIN(f(c), f(s)) + (1 - α) f(c))`` on RGB images in [0, 1].

Departures: the output is clamped to [0, 1] (the official script casts ``output * 255`` to uint8 unclamped, so
out-of-range values wrap around); weights are read with gencore's safe checkpoint reader, not ``torch.load``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gencore.io import MissingWeightsError, load_state_dict, read_state_dict

__all__ = [
    "ENCODER_DEPTH",
    "AdaINStylized",
    "AdaINStylizer",
    "adain_decoder",
    "adaptive_instance_normalization",
    "calc_mean_std",
    "stylize_dataset",
    "vgg_normalised",
]

ENCODER_DEPTH = 31  # modules 0..30 of the normalised VGG: input -> relu4_1
WEIGHTS_HINT = (
    "the standard pytorch-AdaIN weights (vgg_normalised.pth and decoder.pth from the releases of "
    "github.com/naoto0804/pytorch-AdaIN, the files generate_stylized_voc/models/ of the official code expects)"
)

# VGG-19 after the 1x1 colour conv: output channels of each 3x3 conv, "M" = max pool (ceil mode)
_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
# decoder: output channels of each 3x3 conv, "U" = nearest 2x upsampling; the last conv (to RGB) has no ReLU
_DECODER = (256, "U", 256, 256, 256, 128, "U", 128, 64, "U", 64, 3)


def _conv3x3(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d((1, 1, 1, 1)), nn.Conv2d(cin, cout, (3, 3))]


def vgg_normalised() -> nn.Sequential:
    """The full normalised VGG-19 of pytorch-AdaIN (53 modules; convs at 0, 2, 5, 9, 12, 16, 19, 22, 25, 29, 32, 35,
    38, 42, 45, 48, 51). Input: RGB in [0, 1]; its first conv (1x1, 3 -> 3) holds the Torch7 normalisation."""
    layers: list[nn.Module] = [nn.Conv2d(3, 3, (1, 1))]
    cin = 3
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d((2, 2), (2, 2), (0, 0), ceil_mode=True))
        else:
            layers += [*_conv3x3(cin, int(v)), nn.ReLU()]
            cin = int(v)
    return nn.Sequential(*layers)


def adain_decoder() -> nn.Sequential:
    """The pytorch-AdaIN decoder: relu4_1 features (512 ch) -> RGB at 8x their size (convs at 1, 5, 8, 11, 14, 18,
    21, 25, 28)."""
    layers: list[nn.Module] = []
    cin = 512
    for k, v in enumerate(_DECODER):
        if v == "U":
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            continue
        layers += _conv3x3(cin, int(v))
        if k < len(_DECODER) - 1:
            layers.append(nn.ReLU())
        cin = int(v)
    return nn.Sequential(*layers)


def calc_mean_std(feat: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and ``sqrt(unbiased variance over H·W + eps)`` of (N, C, H, W) features, each
    (N, C, 1, 1)."""
    if feat.dim() != 4:
        raise ValueError(f"calc_mean_std: expected (N, C, H, W) features, got shape {tuple(feat.shape)}")
    if feat.shape[2] * feat.shape[3] < 2:
        raise ValueError(f"calc_mean_std: the variance needs at least 2 positions, got shape {tuple(feat.shape)}")
    n, c = feat.shape[:2]
    flat = feat.reshape(n, c, -1)
    std = (flat.var(dim=2) + eps).sqrt().view(n, c, 1, 1)
    mean = flat.mean(dim=2).view(n, c, 1, 1)
    return mean, std


def adaptive_instance_normalization(content_feat: Tensor, style_feat: Tensor) -> Tensor:
    """AdaIN (Eq. 8): content features normalised per channel, then given the style's per-channel mean and std.
    ``style_feat`` may have another spatial size; its batch must equal the content's."""
    if content_feat.shape[:2] != style_feat.shape[:2]:
        raise ValueError(
            f"adaptive_instance_normalization: content {tuple(content_feat.shape)} and style "
            f"{tuple(style_feat.shape)} must agree in batch and channels"
        )
    style_mean, style_std = calc_mean_std(style_feat)
    content_mean, content_std = calc_mean_std(content_feat)
    return (content_feat - content_mean) / content_std * style_std + style_mean


class AdaINStylizer(nn.Module):
    """Frozen AdaIN stylisation: ``encoder`` = the first 31 modules of ``vgg`` (to relu4_1), ``decoder``.

    Always in eval mode, no parameter requires grad; :meth:`stylize` runs without autograd.
    """

    def __init__(self, vgg: nn.Sequential, decoder: nn.Sequential) -> None:
        super().__init__()
        if not isinstance(vgg, nn.Sequential) or len(vgg) < ENCODER_DEPTH:
            raise ValueError(
                f"AdaINStylizer: vgg must be an nn.Sequential of at least {ENCODER_DEPTH} modules (the normalised "
                f"VGG up to relu4_1), got {type(vgg).__name__} of {len(vgg) if isinstance(vgg, nn.Sequential) else 0}"
            )
        if not isinstance(decoder, nn.Sequential):
            raise ValueError(f"AdaINStylizer: decoder must be an nn.Sequential, got {type(decoder).__name__}")
        self.encoder = nn.Sequential(*list(vgg.children())[:ENCODER_DEPTH])
        self.decoder = decoder
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> AdaINStylizer:
        """Stays in eval mode (the stylizer is a frozen tool)."""
        return super().train(False)

    @classmethod
    def from_files(
        cls, vgg_path: str | os.PathLike, decoder_path: str | os.PathLike, *, map_location: str = "cpu"
    ) -> AdaINStylizer:
        """Build from the official ``vgg_normalised.pth`` and ``decoder.pth`` (plain state dicts), read safely and
        loaded strictly. A missing file raises :class:`gencore.io.MissingWeightsError` naming it; keys or shapes
        that do not match raise :class:`gencore.io.CheckpointKeyError`; a pickle that asks for code raises
        :class:`gencore.io.UnsafeCheckpointError` (nothing is executed)."""
        vgg, decoder = vgg_normalised(), adain_decoder()
        for module, path, what in ((vgg, vgg_path, "VGG encoder"), (decoder, decoder_path, "decoder")):
            path = Path(path)
            if not path.is_file():
                raise MissingWeightsError(
                    f"AdaINStylizer: the AdaIN {what} weights {path} do not exist; {WEIGHTS_HINT}"
                )
            state, source = read_state_dict(path, map_location=map_location)
            load_state_dict(module, state, source=source)
        return cls(vgg, decoder)

    def encode(self, images: Tensor) -> Tensor:
        """relu4_1 features (B, 512, h, w) of RGB images in [0, 1]."""
        return self.encoder(images)

    @torch.no_grad()
    def stylize(self, content: Tensor, style: Tensor, alpha: float = 1.0) -> Tensor:
        """``content`` (B, 3, H, W) and ``style`` (B or 1, 3, h, w), RGB in [0, 1] -> stylised (B, 3, H', W') in
        [0, 1] (H' = H when H is a multiple of 8). ``alpha`` in [0, 1] blends the AdaIN features with the content's
        (1 = full style, as SVOC)."""
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"AdaINStylizer.stylize: alpha must be in [0, 1], got {alpha}")
        for name, x in (("content", content), ("style", style)):
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"AdaINStylizer.stylize: {name} must be (B, 3, H, W), got {tuple(x.shape)}")
        if style.shape[0] not in (1, content.shape[0]):
            raise ValueError(
                f"AdaINStylizer.stylize: style batch must be 1 or the content's ({content.shape[0]}), got "
                f"{style.shape[0]}"
            )
        f_c = self.encoder(content)
        f_s = self.encoder(style)
        if f_s.shape[0] != f_c.shape[0]:
            f_s = f_s.expand(f_c.shape[0], -1, -1, -1)
        feat = adaptive_instance_normalization(f_c, f_s)
        feat = alpha * feat + (1.0 - alpha) * f_c
        return self.decoder(feat).clamp(0.0, 1.0)

    def forward(self, content: Tensor, style: Tensor, alpha: float = 1.0) -> Tensor:
        return self.stylize(content, style, alpha)


class AdaINStylized(torch.utils.data.Dataset):
    """A :class:`shapebias.data.CueConflict` dataset's items with the image replaced by AdaIN's stylisation of the
    item's plain content picture (``CueConflict.content_image``) with its texture photograph as the style (the
    paper's generator: content photo x texture style, alpha 1). Labels, textures, contents and masks stay those of
    the item. Styles are the whole texture images resized so the shorter side is ``style_size`` (as the official
    ``--style_size 512``), encoded once per texture."""

    def __init__(
        self,
        dataset: Any,
        stylizer: AdaINStylizer,
        *,
        alpha: float = 1.0,
        style_size: int = 512,
        device: torch.device | str = "cpu",
    ) -> None:
        if not hasattr(dataset, "content_image") or not hasattr(dataset, "texture_names"):
            raise ValueError(
                f"AdaINStylized: needs a CueConflict-like dataset (content_image, texture_names), got "
                f"{type(dataset).__name__}"
            )
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"AdaINStylized: alpha must be in [0, 1], got {alpha}")
        if style_size < 32:
            raise ValueError(f"AdaINStylized: style_size must be >= 32, got {style_size}")
        self.dataset, self.stylizer, self.alpha = dataset, stylizer.to(device), float(alpha)
        self.style_size, self.device = int(style_size), torch.device(device)
        self.class_names, self.texture_names = dataset.class_names, dataset.texture_names
        self.labels, self.textures, self.contents = dataset.labels, dataset.textures, dataset.contents
        self._styles: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def _style(self, texture: int) -> Tensor:
        if texture not in self._styles:
            from shapebias.data import load_texture

            img = torch.from_numpy(load_texture(self.dataset.texture_names[texture]).astype("float32") / 255.0)
            img = img.permute(2, 0, 1)[None]
            scale = self.style_size / min(img.shape[-2:])
            size = (max(8, round(img.shape[-2] * scale)), max(8, round(img.shape[-1] * scale)))
            img = nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=True)
            self._styles[texture] = img.to(self.device)
        return self._styles[texture]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        content = torch.from_numpy(self.dataset.content_image(item["content"])).permute(2, 0, 1)[None]
        size = content.shape[-2:]
        pad = [(-s) % 8 for s in size]  # the decoder returns multiples of 8
        x = nn.functional.pad(content, (0, pad[1], 0, pad[0]), mode="replicate").to(self.device)
        out = self.stylizer.stylize(x, self._style(int(item["texture"])), self.alpha)
        item["image"] = out[0, :, : size[0], : size[1]].cpu().mul(2.0).sub(1.0)
        return item


def stylize_dataset(
    dataset: Any,
    out_dir: str | os.PathLike,
    *,
    vgg: str | os.PathLike | None,
    decoder: str | os.PathLike | None,
    alpha: float = 1.0,
    style_size: int = 512,
    device: torch.device | str = "cpu",
    ext: str = "png",
) -> Path:
    """Write ``dataset`` stylised by AdaIN (:class:`AdaINStylized`; weights from the official ``.pth`` files) with
    the official naming (:func:`shapebias.data.write_dataset`)."""
    from shapebias.data import write_dataset

    if vgg is None or decoder is None:
        raise MissingWeightsError(
            f"method=adain needs adain.vgg=<vgg_normalised.pth> adain.decoder=<decoder.pth>: {WEIGHTS_HINT}"
        )
    stylizer = AdaINStylizer.from_files(vgg, decoder)
    return write_dataset(
        AdaINStylized(dataset, stylizer, alpha=alpha, style_size=style_size, device=device), out_dir, ext=ext
    )
