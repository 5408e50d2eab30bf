"""Content conditioning of Gen-1 (Esser et al. 2023, arXiv 2302.03011, Sec. 3.1 / 3.2): an image embedding,
cross-attended by the video UNet.

The paper represents content by a CLIP image embedding (ViT-L/14); during training it is the embedding of **one
randomly chosen frame** of the clip (:func:`random_frame_index`, :func:`select_frames`), which carries little of the
clip's per-frame structure and so partly disentangles content from the depth input. At inference the content comes
from a reference image, or from text: through a DALL-E 2-style prior in the paper; here through the text tower of
the same CLIP (:meth:`CLIPContentEncoder.encode_text`), a prior-free shortcut across CLIP's modality gap.

A content encoder maps images (N, 3, H, W) in [-1, 1] to a context sequence (N, L, D) for the UNet's
cross-attention (``forward``), and has ``context_dim`` (D), ``num_tokens`` (L), :meth:`~ContentEncoder.embed_images`
(N, D) for metrics and :meth:`~ContentEncoder.unconditional` (the null content of classifier-free guidance: zeros).

- :class:`CLIPContentEncoder`: CLIP (transformers ``CLIPModel``, both towers) from a local folder, frozen; its
  preprocessing (resize the short side, centre crop, CLIP mean / std) runs in torch on the images' device.
- :class:`ConvContentEncoder`: the small in-project image encoder, the offline default (no CLIP weights exist
  here): a convolutional net, global average pooling (no spatial layout survives it), then a projection to
  ``num_tokens`` tokens. It has no pretraining: it trains with the diffusion model (or is frozen with ``freeze()``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.io import model_folder
from gencore.modules import FrozenModule

__all__ = [
    "CLIPContentEncoder",
    "ContentEncoder",
    "ConvContentEncoder",
    "random_frame_index",
    "select_frames",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_images(images: Tensor, who: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: images must be (N, 3, H, W) RGB in [-1, 1], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: images must be floating point in [-1, 1], got dtype {images.dtype}")


# ------------------------------------------------------------------------------------------- frame selection


def random_frame_index(
    batch_size: int,
    num_frames: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(batch_size,) long frame indices, uniform over [0, num_frames): the frame whose embedding is a clip's
    content during training. Drawn on the generator's device (the default generator: on ``device``), no host sync."""
    if batch_size < 0 or num_frames < 1:
        raise ValueError(f"need batch_size >= 0 and num_frames >= 1, got {batch_size}, {num_frames}")
    where = generator.device if generator is not None else device
    return torch.randint(0, num_frames, (batch_size,), generator=generator, device=where)


def select_frames(video: Tensor, index: Tensor) -> Tensor:
    """Frame ``index[b]`` of each clip of ``video`` (B, C, T, H, W) -> (B, C, H, W) (a gather: no host sync)."""
    if video.dim() != 5:
        raise ValueError(f"video must be (B, C, T, H, W), got shape {tuple(video.shape)}")
    b, c, _, h, w = video.shape
    if index.shape != (b,) or index.is_floating_point():
        raise ValueError(f"index must be ({b},) integers (one frame per clip), got {tuple(index.shape)} {index.dtype}")
    idx = index.to(video.device).long().reshape(b, 1, 1, 1, 1).expand(b, c, 1, h, w)
    return video.gather(2, idx)[:, :, 0]


# -------------------------------------------------------------------------------------------------- encoders


class ContentEncoder(nn.Module):
    """Interface: ``forward(images)`` (N, 3, H, W) in [-1, 1] -> context (N, num_tokens, context_dim);
    :meth:`embed_images` -> (N, embed_dim) (one vector per image, for metrics); :meth:`unconditional`."""

    context_dim: int
    num_tokens: int

    def embed_images(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def unconditional(self, n: int, *, device: torch.device | str | None = None) -> Tensor:
        """The null content (n, num_tokens, context_dim) of classifier-free guidance: zeros."""
        p = next(self.parameters(), None)
        device = device if device is not None else (p.device if p is not None else None)
        dtype = p.dtype if p is not None else torch.float32
        return torch.zeros(n, self.num_tokens, self.context_dim, device=device, dtype=dtype)


class CLIPContentEncoder(FrozenModule, ContentEncoder):
    """CLIP image (and text) embeddings as content, from a local folder in transformers format (a snapshot of
    openai/clip-vit-large-patch14 for the paper's setting: 768-d embeddings).

    ``forward(images)`` -> (N, 1, D): the projected image embedding, L2-normalised if ``normalize``;
    :meth:`encode_text` -> (N, 1, D) from the text tower (projected EOS state) for text-driven edits. Preprocessing
    follows the folder's image-processor config (short side resized to ``shortest_edge``, bicubic, antialiased; centre
    crop; CLIP mean / std), else OpenAI CLIP's defaults at the vision model's input size."""

    def __init__(self, path: str | os.PathLike, *, normalize: bool = True, max_length: int = 77) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPTokenizer

        folder = model_folder(
            path,
            "CLIPContentEncoder needs a local CLIP model folder in transformers format (e.g. a snapshot of "
            "openai/clip-vit-large-patch14)",
        )
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        size = crop = int(self.model.config.vision_config.image_size)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        try:
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            size = int(proc.size.get("shortest_edge") or size) if hasattr(proc.size, "get") else size
            crop = int(proc.crop_size.get("height") or crop) if hasattr(proc.crop_size, "get") else crop
            mean, std = tuple(proc.image_mean), tuple(proc.image_std)
        except (OSError, ValueError):  # no processor config beside the weights: OpenAI CLIP's preprocessing
            pass
        self.resize_to, self.crop = size, crop
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.normalize = normalize
        self.max_length = max_length
        self.context_dim = int(self.model.config.projection_dim)
        self.num_tokens = 1
        self.freeze()

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> CLIP pixel values (N, 3, crop, crop)."""
        _check_images(images, type(self).__name__)
        x = (images.float() + 1) / 2
        h, w = x.shape[-2:]
        scale = self.resize_to / min(h, w)
        new = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (new[0] - self.crop) // 2, (new[1] - self.crop) // 2
        x = x[:, :, top : top + self.crop, left : left + self.crop]
        return (x - self.mean) / self.std

    def _out(self, e: Tensor) -> Tensor:
        return F.normalize(e, dim=-1) if self.normalize else e

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> CLIP image embeddings (N, D)."""
        dtype = self.model.visual_projection.weight.dtype
        pooled = self.model.vision_model(pixel_values=self.preprocess(images).to(dtype)).pooler_output
        return self._out(self.model.visual_projection(pooled)).float()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> CLIP text embeddings (N, D) in the image embeddings' space."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of strings")
        device = self.model.text_projection.weight.device
        tok = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).to(device)
        pooled = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        return self._out(self.model.text_projection(pooled)).float()

    def forward(self, images: Tensor) -> Tensor:
        return self.embed_images(images)[:, None]  # (N, 1, D)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Prompts -> content (N, 1, D) (the text embedding standing in for an image embedding; no prior)."""
        return self.embed_texts(texts)[:, None]


class ConvContentEncoder(ContentEncoder):
    """The in-project content encoder: images resized to ``image_size``, a conv stem, ``len(channels)`` stages of
    [GroupNorm, SiLU, 3x3 stride-2 conv], global average pooling (the layout is pooled away), a Linear to
    ``num_tokens`` × ``context_dim`` and a LayerNorm per token. Trainable (jointly with the diffusion model)."""

    def __init__(
        self,
        *,
        context_dim: int,
        num_tokens: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        image_size: int = 64,
    ) -> None:
        super().__init__()
        if context_dim < 1 or num_tokens < 1 or not channels or image_size < 2 ** len(channels):
            raise ValueError(
                f"ConvContentEncoder: need context_dim >= 1, num_tokens >= 1, some channels and image_size >= "
                f"2**len(channels); got {context_dim}, {num_tokens}, {list(channels)}, {image_size}"
            )
        if any(c % 8 for c in channels):
            raise ValueError(f"ConvContentEncoder: channels must be multiples of 8 (GroupNorm), got {list(channels)}")
        self.context_dim, self.num_tokens, self.image_size = int(context_dim), int(num_tokens), int(image_size)
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1)]
        for c_in, c_out in zip(channels, [*channels[1:], channels[-1]]):
            layers += [nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)]
        self.net = nn.Sequential(*layers)
        self.proj = nn.Linear(channels[-1], num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def embed_images(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> pooled features (N, channels[-1])."""
        _check_images(images, type(self).__name__)
        x = images.to(self.proj.weight.dtype)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return self.net(x).mean(dim=(-2, -1))

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.proj(self.embed_images(images))  # (N, L·D)
        return self.norm(tokens.unflatten(-1, (self.num_tokens, self.context_dim)))  # (N, L, D)
