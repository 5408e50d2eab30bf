"""LaMa's pix2pixHD-style patch discriminator (``pix2pixhd_nlayer``, ``saicinpainting/training/modules/pix2pixhd.py``)
with the official module names ``model0`` .. ``model{n_layers + 1}``.

4x4 convs with padding 2: one stride-2 conv + LeakyReLU(0.2), ``n_layers - 1`` stride-2 conv + norm + LeakyReLU
blocks (channels doubling up to 512), one stride-1 conv + norm + LeakyReLU, and a stride-1 conv to one logit channel.
``forward`` returns ``(logits, features)`` with the outputs of every block but the last (for feature matching).
A 256x256 input with ``n_layers=4`` gives (B, 1, 19, 19) logits and 5 feature maps.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .ffc import get_norm_layer

__all__ = ["NLayerDiscriminator"]


class NLayerDiscriminator(nn.Module):
    def __init__(
        self,
        input_nc: int,
        ndf: int = 64,
        n_layers: int = 3,
        norm_layer: str | Callable[..., nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        norm_layer = get_norm_layer(norm_layer)
        self.n_layers = n_layers
        kw, padw = 4, 2
        blocks: list[list[nn.Module]] = [
            [nn.Conv2d(input_nc, ndf, kernel_size=kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        ]
        nf = ndf
        for _ in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            blocks.append(
                [
                    nn.Conv2d(nf_prev, nf, kernel_size=kw, stride=2, padding=padw),
                    norm_layer(nf),
                    nn.LeakyReLU(0.2, True),
                ]
            )
        nf_prev, nf = nf, min(nf * 2, 512)
        blocks.append(
            [nn.Conv2d(nf_prev, nf, kernel_size=kw, stride=1, padding=padw), norm_layer(nf), nn.LeakyReLU(0.2, True)]
        )
        blocks.append([nn.Conv2d(nf, 1, kernel_size=kw, stride=1, padding=padw)])
        for n, block in enumerate(blocks):
            setattr(self, f"model{n}", nn.Sequential(*block))

    def get_all_activations(self, x: Tensor) -> list[Tensor]:
        acts = []
        for n in range(self.n_layers + 2):
            x = getattr(self, f"model{n}")(x)
            acts.append(x)
        return acts

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        acts = self.get_all_activations(x)
        return acts[-1], acts[:-1]
