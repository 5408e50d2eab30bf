"""Gen-1's automatic metrics (Esser et al. 2023, arXiv 2302.03011, Sec. 4 "Quantitative evaluation"), computed with
a pluggable image encoder (CLIP in the paper: :class:`gen1_video.content.CLIPContentEncoder`; any callable
``images (N, 3, H, W) in [-1, 1] -> (N, D)`` or object with ``embed_images`` works).

- **Frame consistency**: the mean cosine similarity between the image embeddings of consecutive frames of an output
  clip (identical frames give 1.0): temporal smoothness as the encoder sees it.
- **Prompt consistency** (or content consistency): the mean cosine similarity between each output frame's image
  embedding and the edit's reference embedding: a prompt's text embedding (needs an encoder with ``embed_texts``) or
  a content image's embedding.

- **Structure fidelity** (ours; the paper shows it only qualitatively, with t_s): the mean Pearson correlation between
  the structure maps (the model's own estimator: depth, or edges offline) of each output frame and of the frame it
  was made from, compared on a coarse grid (the latent grid: the finest layout a latent model can follow). 1 = the
  layout is followed exactly; two unrelated clips score near their own baseline (reported beside it by gen1-eval).

The cosines are plain cosines in [-1, 1] (not CLIP score's 100·max(cos, 0)); per-clip scores and their mean are
returned.
Videos are (B, 3, T, H, W) in [-1, 1], as the models produce them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "consecutive_similarity",
    "frame_consistency",
    "frame_embeddings",
    "map_correlation",
    "prompt_consistency",
    "reference_similarity",
    "structure_fidelity",
    "structure_maps",
]

ImageEmbedder = Callable[[Tensor], Tensor]


def _embedder(encoder: Any) -> ImageEmbedder:
    fn = getattr(encoder, "embed_images", encoder)
    if not callable(fn):
        raise ValueError(f"encoder must be callable or have embed_images, got {type(encoder).__name__}")
    return fn


def _check_videos(videos: Tensor) -> None:
    if videos.dim() != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be (B, 3, T, H, W) RGB in [-1, 1], got shape {tuple(videos.shape)}")


@torch.no_grad()
def frame_embeddings(videos: Tensor, encoder: Any, *, batch_size: int = 64) -> Tensor:
    """Image embeddings of every frame: (B, 3, T, H, W) -> (B, T, D), encoded ``batch_size`` frames at a time."""
    _check_videos(videos)
    embed = _embedder(encoder)
    b, _, t = videos.shape[:3]
    frames = videos.permute(0, 2, 1, 3, 4).reshape(b * t, 3, *videos.shape[-2:])  # (B·T, 3, H, W)
    out = torch.cat([embed(chunk).float() for chunk in frames.split(batch_size)])
    if out.dim() != 2 or out.shape[0] != b * t:
        raise ValueError(f"the encoder must return (N, D) embeddings for N images, got shape {tuple(out.shape)}")
    return out.reshape(b, t, -1)


def consecutive_similarity(embeddings: Tensor) -> tuple[float, Tensor]:
    """Frame consistency from frame embeddings (B, T, D) (:func:`frame_embeddings`): (mean over clips, per-clip mean
    cosine similarity of consecutive frames (B,))."""
    if embeddings.dim() != 3 or embeddings.shape[1] < 2:
        raise ValueError(f"need frame embeddings (B, T >= 2, D), got shape {tuple(embeddings.shape)}")
    scores = F.cosine_similarity(embeddings[:, 1:], embeddings[:, :-1], dim=-1).mean(dim=1)  # (B,)
    return float(scores.mean()), scores


def reference_similarity(embeddings: Tensor, reference: Tensor) -> tuple[float, Tensor]:
    """Prompt / content consistency from frame embeddings (B, T, D) and one reference embedding per clip (B, D) or
    one for all (D,): (mean over clips, per-clip mean cosine similarity of the frames with the reference (B,))."""
    b, d = embeddings.shape[0], embeddings.shape[-1]
    ref = reference.float()
    if ref.dim() == 1:
        ref = ref.expand(b, -1)
    if ref.shape != (b, d):
        raise ValueError(f"reference embeddings must be ({b}, {d}) or ({d},), got {tuple(reference.shape)}")
    scores = F.cosine_similarity(embeddings, ref.to(embeddings.device)[:, None], dim=-1).mean(dim=1)  # (B,)
    return float(scores.mean()), scores


def frame_consistency(videos: Tensor, encoder: Any, *, batch_size: int = 64) -> tuple[float, Tensor]:
    """(mean over clips, per-clip scores (B,)) of the mean cosine similarity of consecutive frames' embeddings."""
    if videos.dim() == 5 and videos.shape[2] < 2:
        raise ValueError(f"frame consistency needs clips of at least 2 frames, got {videos.shape[2]}")
    return consecutive_similarity(frame_embeddings(videos, encoder, batch_size=batch_size))


def prompt_consistency(
    videos: Tensor, reference: Tensor | Sequence[str], encoder: Any, *, batch_size: int = 64
) -> tuple[float, Tensor]:
    """(mean over clips, per-clip scores (B,)) of the mean cosine similarity between each frame's embedding and the
    clip's reference: prompts (one per clip; the encoder's ``embed_texts`` embeds them) or reference embeddings
    (B, D) / (D,) (e.g. a content image's ``embed_images``)."""
    _check_videos(videos)
    b = videos.shape[0]
    if isinstance(reference, str):
        raise ValueError("reference must be one prompt per clip (a list of strings) or embeddings, got one string")
    if isinstance(reference, Tensor):
        ref = reference
    else:
        texts = list(reference)
        if not hasattr(encoder, "embed_texts"):
            raise ValueError(f"prompts need an encoder with embed_texts (e.g. CLIP); {type(encoder).__name__} has none")
        if len(texts) != b:
            raise ValueError(f"{b} clips need {b} prompts, got {len(texts)}")
        with torch.no_grad():
            ref = encoder.embed_texts(texts)
    return reference_similarity(frame_embeddings(videos, encoder, batch_size=batch_size), ref)


@torch.no_grad()
def structure_maps(videos: Tensor, estimator: Any, *, size: int | None = None, batch_size: int = 64) -> Tensor:
    """``estimator``'s maps of every frame of ``videos`` (B, 3, T, H, W) in [-1, 1] (the estimator: frames
    (N, 3, H, W) -> maps (N, 1, H, W)), area-resized to ``size`` x ``size`` (None: as estimated), flattened, centred
    and scaled to unit norm: (B, T, N), ready for :func:`map_correlation`. A constant map becomes zeros."""
    _check_videos(videos)
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    b, _, t = videos.shape[:3]
    frames = videos.permute(0, 2, 1, 3, 4).reshape(b * t, 3, *videos.shape[-2:])
    m = torch.cat([estimator(chunk).float() for chunk in frames.split(batch_size)])
    if size is not None:
        m = F.adaptive_avg_pool2d(m, size)
    m = m.flatten(1)
    m = m - m.mean(dim=1, keepdim=True)
    return (m / m.norm(dim=1, keepdim=True).clamp_min(1e-8)).reshape(b, t, -1)


def map_correlation(maps: Tensor, reference: Tensor) -> tuple[float, Tensor]:
    """Structure fidelity from two :func:`structure_maps` results of the same shape (B, T, N): (mean over clips,
    per-clip mean of the per-frame Pearson correlations (B,))."""
    if maps.shape != reference.shape:
        raise ValueError(f"reference maps must match the maps' shape {tuple(maps.shape)}, got {tuple(reference.shape)}")
    scores = (maps * reference.to(maps.device)).sum(dim=-1).mean(dim=1)  # (B,)
    return float(scores.mean()), scores


def structure_fidelity(
    videos: Tensor, reference: Tensor, estimator: Any, *, size: int | None = None, batch_size: int = 64
) -> tuple[float, Tensor]:
    """(mean over clips, per-clip scores (B,)) of the per-frame Pearson correlation between ``estimator``'s maps of
    ``videos`` and of ``reference`` (both (B, 3, T, H, W) in [-1, 1]; the estimator: frames (N, 3, H, W) -> maps
    (N, 1, H, W)), after area-resizing the maps to ``size`` x ``size`` (None: as estimated). A constant map
    correlates 0 with anything."""
    if reference.shape != videos.shape:
        raise ValueError(
            f"reference clips must match the videos' shape {tuple(videos.shape)}, got {tuple(reference.shape)}"
        )
    kw = dict(size=size, batch_size=batch_size)
    return map_correlation(structure_maps(videos, estimator, **kw), structure_maps(reference, estimator, **kw))
