"""The LADD discriminator (Sauer et al. 2024, Sec. 3, Fig. 2): the frozen teacher as the feature network.

A latent x0 (the student's, or a synthetic teacher sample) is re-noised to t_hat and run through the **frozen
teacher** with its text condition; the image tokens after chosen blocks are reshaped to their 2-D grid
(:meth:`sd3_flow.models.mmdit.MMDiT.block_features`) and each goes to its own lightweight head. A head is a small conv
net (StyleGAN-T / ADD style, here 2-D since the tokens have a grid) with **projection conditioning** on the noise
level t_hat (sinusoidal embedding) and the pooled text vector: logit(x) = w . phi(x) + <phi(x), P(c)> / sqrt(C),
averaged over positions, so any aspect ratio and resolution works. The logits of all heads form ``(B, n_heads)``.

The teacher's parameters never change (frozen by the recipe; they are not the discriminator's parameters), but the
pass is not under ``no_grad``: in the student step gradients flow through the teacher into the
student's sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sd3_flow.models.mmdit import timestep_embedding

__all__ = ["DiscriminatorHead", "TeacherFeatureDiscriminator", "evenly_spaced_layers"]


def evenly_spaced_layers(num_layers: int, count: int) -> list[int]:
    """``count`` block indices spread over ``num_layers`` blocks, ending at the last (e.g. 24, 4 -> [5, 11, 17, 23])."""
    if not 1 <= count <= num_layers:
        raise ValueError(f"evenly_spaced_layers: count must be in 1..{num_layers}, got {count}")
    return sorted({round((i + 1) * num_layers / count) - 1 for i in range(count)})


class DiscriminatorHead(nn.Module):
    """Token map (B, D, h, w) + condition (B, cond_dim) -> one logit per sample.

    conv 3x3 D -> C, GroupNorm, LeakyReLU(0.2), residual conv 3x3 C -> C (/ sqrt 2), then the projection
    discriminator: a 1x1 conv to one logit per position plus the inner product of the features with an embedding of
    the condition, averaged over positions."""

    def __init__(self, in_channels: int, channels: int, cond_dim: int, *, groups: int = 8) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"DiscriminatorHead: channels {channels} must be divisible by groups {groups}")
        self.main = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.LeakyReLU(0.2)
        )
        self.res = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.LeakyReLU(0.2)
        )
        self.out = nn.Conv2d(channels, 1, 1)
        self.cond = nn.Linear(cond_dim, channels)
        self.channels = channels

    def forward(self, feature: Tensor, cond: Tensor) -> Tensor:
        h = self.main(feature)
        h = (h + self.res(h)) / math.sqrt(2.0)
        projection = (h * self.cond(cond)[:, :, None, None]).sum(1, keepdim=True) / math.sqrt(self.channels)
        return (self.out(h) + projection).mean(dim=(1, 2, 3))


class TeacherFeatureDiscriminator(nn.Module):
    """``D(teacher, z_t_hat, t_hat, context, pooled) -> (B, len(layers))``: heads over the frozen teacher's block
    features. Only the heads are parameters of the discriminator; the teacher (an
    :class:`sd3_flow.models.mmdit.MMDiT`) is passed to each call, so it is stored once, by the recipe that owns it.

    Args:
        teacher: the teacher MMDiT, read here for its depth and widths.
        layers: block indices whose image tokens are read (default: 4 evenly spaced, ending at the last block).
        head_channels: width C of each head.
        time_embed_dim: width of the sinusoidal t_hat embedding the heads are conditioned on.
        num_train_timesteps: the teacher's timestep scale (t_hat in [0, 1] is fed as t_hat * this, as in sampling).
    """

    def __init__(
        self,
        teacher: nn.Module,
        layers: Sequence[int] | None = None,
        *,
        head_channels: int = 64,
        time_embed_dim: int = 128,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        depth = len(teacher.transformer_blocks)
        layers = evenly_spaced_layers(depth, min(4, depth)) if layers is None else sorted({int(i) for i in layers})
        if not layers or layers[0] < 0 or layers[-1] >= depth:
            raise ValueError(
                f"discriminator layers must be block indices in 0..{depth - 1} of the teacher, got {list(layers)}"
            )
        self.layers = layers
        dim = teacher.pos_embed.proj.out_channels
        self.time_embed_dim, self.num_train_timesteps = time_embed_dim, num_train_timesteps
        cond_dim = time_embed_dim + teacher.pooled_projection_dim
        self.heads = nn.ModuleList(DiscriminatorHead(dim, head_channels, cond_dim) for _ in layers)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def forward(self, teacher: nn.Module, z: Tensor, t: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
        timestep = t * self.num_train_timesteps
        features = teacher.block_features(z, context, pooled, timestep, self.layers)
        cond = torch.cat([timestep_embedding(timestep, self.time_embed_dim), pooled], dim=1).to(features[0].dtype)
        return torch.stack([head(f, cond) for head, f in zip(self.heads, features, strict=True)], dim=1)
