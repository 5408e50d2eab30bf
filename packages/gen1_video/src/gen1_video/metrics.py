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

__all__ = ["frame_consistency", "frame_embeddings", "prompt_consistency", "structure_fidelity"]

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


def frame_consistency(videos: Tensor, encoder: Any, *, batch_size: int = 64) -> tuple[float, Tensor]:
    """(mean over clips, per-clip scores (B,)) of the mean cosine similarity of consecutive frames' embeddings."""
    if videos.dim() == 5 and videos.shape[2] < 2:
        raise ValueError(f"frame consistency needs clips of at least 2 frames, got {videos.shape[2]}")
    e = frame_embeddings(videos, encoder, batch_size=batch_size)  # (B, T, D)
    scores = F.cosine_similarity(e[:, 1:], e[:, :-1], dim=-1).mean(dim=1)  # (B,)
    return float(scores.mean()), scores


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
        ref = reference.float()
    else:
        texts = list(reference)
        if not hasattr(encoder, "embed_texts"):
            raise ValueError(f"prompts need an encoder with embed_texts (e.g. CLIP); {type(encoder).__name__} has none")
        if len(texts) != b:
            raise ValueError(f"{b} clips need {b} prompts, got {len(texts)}")
        with torch.no_grad():
            ref = encoder.embed_texts(texts).float()
    if ref.dim() == 1:
        ref = ref.expand(b, -1)
    e = frame_embeddings(videos, encoder, batch_size=batch_size)  # (B, T, D)
    if ref.shape != (b, e.shape[-1]):
        raise ValueError(
            f"reference embeddings must be ({b}, {e.shape[-1]}) or ({e.shape[-1]},), got {tuple(ref.shape)}"
        )
    scores = F.cosine_similarity(e, ref.to(e.device)[:, None], dim=-1).mean(dim=1)  # (B,)
    return float(scores.mean()), scores


@torch.no_grad()
def structure_fidelity(
    videos: Tensor, reference: Tensor, estimator: Any, *, size: int | None = None, batch_size: int = 64
) -> tuple[float, Tensor]:
    """(mean over clips, per-clip scores (B,)) of the per-frame Pearson correlation between ``estimator``'s maps of
    ``videos`` and of ``reference`` (both (B, 3, T, H, W) in [-1, 1]; the estimator: frames (N, 3, H, W) -> maps
    (N, 1, H, W)), after area-resizing the maps to ``size`` x ``size`` (None: as estimated). A constant map
    correlates 0 with anything."""
    _check_videos(videos)
    if reference.shape != videos.shape:
        raise ValueError(
            f"reference clips must match the videos' shape {tuple(videos.shape)}, got {tuple(reference.shape)}"
        )
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    b, _, t = videos.shape[:3]

    def maps(x: Tensor) -> Tensor:
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, *x.shape[-2:])
        m = torch.cat([estimator(chunk).float() for chunk in frames.split(batch_size)])
        if size is not None:
            m = F.adaptive_avg_pool2d(m, size)
        m = m.flatten(1)
        m = m - m.mean(dim=1, keepdim=True)
        return m / m.norm(dim=1, keepdim=True).clamp_min(1e-8)

    r = (maps(videos) * maps(reference.to(videos.device))).sum(dim=1).reshape(b, t)  # (B, T) correlations
    scores = r.mean(dim=1)
    return float(scores.mean()), scores
