"""The transformer side of Geometry-Free View Synthesis (Rombach, Esser, Ommer, ICCV 2021, arXiv 2104.07652), Sec. 3.

The model is taming's minGPT (:class:`taming.models.mingpt.GPT`) over the target view's VQGAN tokens, after a
conditioning prefix that attends to itself bidirectionally (``n_unmasked``) while the targets are causal (Sec. 3.1).
The pieces this module adds, with the official parameter names (``geofree/modules/util.py``,
``geofree/modules/transformer/{mingpt,warper}.py``):

- :class:`MultiEmbedder` (``emb_stage_model``): the camera as tokens (Sec. 3.2, "implicit"): the 30 scalars
  ``[vec(R), t, vec(K), vec(K^-1)]`` each become ``v_i · w`` with one shared vector ``w`` (``fc``, Linear(1, n_embd)
  without bias); the GPT's positional embedding tells them apart;
- :class:`ConvWarper` (``transformer.warper``): the explicit / hybrid conditioning (Sec. 3.3): the prefix's token
  embeddings *and* their positional embeddings are forward-warped into the target view with the source depth (softmax
  splatting, :func:`geofree.geometry.warp_features`), and each is merged with its unwarped self by a 1x1 convolution
  (``emb_conv``, ``pos_conv``: 2·n_embd -> n_embd, no bias); the camera tokens before ``start_idx`` are left alone.
  As officially, the warp itself runs without gradient (the merge convolutions and the unwarped path are trained);
- :class:`WarpGPT`: the GPT whose prefix goes through the warper before the blocks (``expl_emb``, ``hybrid``).

KV-cached sampling works for both GPTs (the prefix is embedded, and warped, once in the first cached call).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from gencore.attention import KVCache
from geofree.geometry import warp_features
from taming.models.mingpt import GPT

__all__ = ["CAMERA_KEYS", "ConvWarper", "MultiEmbedder", "WarpBinding", "WarpGPT"]

CAMERA_KEYS = ("R", "t", "K", "K_inv")


class MultiEmbedder(nn.Module):
    """Scalars as tokens: the values of ``keys`` (flattened row-major, concatenated in that order) ->
    (B, n_positions, n_embed), ``e_i = fc(v_i)`` with ``n_channels`` values per token (official: 1)."""

    def __init__(
        self,
        keys: Sequence[str] = CAMERA_KEYS,
        n_positions: int = 30,
        n_channels: int = 1,
        n_embed: int = 1024,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.keys, self.n_positions, self.n_channels, self.n_embed = tuple(keys), n_positions, n_channels, n_embed
        self.fc = nn.Linear(n_channels, n_embed, bias=bias)

    def forward(self, **values: Tensor) -> Tensor:
        missing = [k for k in self.keys if k not in values]
        if missing:
            raise ValueError(f"MultiEmbedder: missing {', '.join(missing)} (expects {', '.join(self.keys)})")
        b = values[self.keys[0]].shape[0]
        x = torch.cat([values[k].reshape(b, -1, self.n_channels) for k in self.keys], dim=1)
        if x.shape[1] != self.n_positions:
            raise ValueError(
                f"MultiEmbedder: {' + '.join(self.keys)} give {x.shape[1]} tokens of {self.n_channels} value(s), "
                f"expected n_positions={self.n_positions}"
            )
        return self.fc(x.to(self.fc.weight.dtype))


class ConvWarper(nn.Module):
    """Warp the prefix positions ``start_idx .. n_unmasked`` (a ``size`` = (h, w) token grid in raster order) into
    the target view and merge: ``new = conv1x1([orig, warped])`` for token and positional embeddings alike."""

    def __init__(
        self, *, n_unmasked: int, n_embd: int, block_size: int, size: Sequence[int], start_idx: int = 0
    ) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        if n_unmasked - start_idx != self.size[0] * self.size[1]:
            raise ValueError(
                f"ConvWarper: the warped prefix n_unmasked - start_idx = {n_unmasked} - {start_idx} must be the "
                f"{self.size[0]}x{self.size[1]} token grid ({self.size[0] * self.size[1]} positions)"
            )
        self.n_unmasked, self.n_embd, self.block_size, self.start_idx = n_unmasked, n_embd, block_size, start_idx
        self.emb_conv = nn.Conv2d(2 * n_embd, n_embd, kernel_size=1, bias=False)
        self.pos_conv = nn.Conv2d(2 * n_embd, n_embd, kernel_size=1, bias=False)

    def _grid(self, seq: Tensor) -> Tensor:  # (B, h*w, C) -> (B, C, h, w)
        return seq.transpose(1, 2).reshape(seq.shape[0], seq.shape[2], *self.size)

    def _merge(self, conv: nn.Conv2d, orig: Tensor, warp: Mapping[str, Any]) -> Tensor:
        grid = self._grid(orig)
        with torch.no_grad():  # official: the warp is not differentiated (no_depth_grad, inside torch.no_grad)
            warped = warp_features(
                grid.float(),
                warp["depth"].float(),
                warp["R"].float(),
                warp["t"].float(),
                warp["K_inv"].float(),
                warp["K"].float(),
                image_size=tuple(warp["depth"].shape[-2:]),
            )
            warped = torch.nan_to_num(warped.to(grid.dtype))
        return conv(torch.cat((grid, warped), dim=1)).flatten(2).transpose(1, 2)  # (B, h*w, C)

    def forward(self, token_embeddings: Tensor, position_embeddings: Tensor, warp: Mapping[str, Any]):
        """(B, L, C) token and (1, L, C) positional embeddings of a sequence starting at position 0 -> both with the
        prefix warped and merged (positional ones now per item: (B, L, C))."""
        if token_embeddings.shape[1] < self.n_unmasked:
            raise ValueError(
                f"ConvWarper: the sequence ({token_embeddings.shape[1]} positions) must hold the whole prefix "
                f"(n_unmasked={self.n_unmasked})"
            )
        b = token_embeddings.shape[0]
        a, e = self.start_idx, self.n_unmasked
        pos = position_embeddings.expand(b, -1, -1)
        new_emb = self._merge(self.emb_conv, token_embeddings[:, a:e], warp)
        new_pos = self._merge(self.pos_conv, pos[:, a:e], warp)
        tok = torch.cat((token_embeddings[:, :a], new_emb, token_embeddings[:, e:]), dim=1)
        pos = torch.cat((pos[:, :a], new_pos, pos[:, e:]), dim=1)
        return tok, pos


class WarpGPT(GPT):
    """The GPT with a :class:`ConvWarper` on its prefix (official ``WarpGPT``; ``warper`` is a factory that receives
    ``n_unmasked``, ``block_size`` and ``n_embd``, e.g. a ``_partial_`` ConvWarper with ``size`` and ``start_idx``).

    ``forward`` / ``forward_cached`` (GPT's: they pass it on to :meth:`_embed`) take the warp inputs ``warp = {depth
    (B, H, W), R, t, K, K_inv}`` (image-size depth in the pose's scale); :meth:`bind` fixes them, giving the plain GPT
    interface that :func:`taming.sampling.sample_tokens` drives."""

    def __init__(
        self,
        *,
        warper: Any,
        n_unmasked: int,
        block_size: int,
        n_embd: int = 256,
        warp_grid: Sequence[int] | None = None,
        warp_start: int | None = None,
        **kwargs: Any,
    ) -> None:
        if n_unmasked < 1:
            raise ValueError("WarpGPT needs a conditioning prefix (n_unmasked >= 1)")
        super().__init__(n_unmasked=n_unmasked, block_size=block_size, n_embd=n_embd, **kwargs)
        extra = {}  # the model's token grid and camera-token count, unless the warper config names them
        if warp_grid is not None:
            extra["size"] = tuple(warp_grid)
        if warp_start is not None:
            extra["start_idx"] = int(warp_start)
        keywords = getattr(warper, "keywords", {}) or {}
        extra = {k: v for k, v in extra.items() if k not in keywords}
        self.warper = warper(n_unmasked=n_unmasked, block_size=block_size, n_embd=n_embd, **extra)

    def _embed(
        self, idx: Tensor, embeddings: Tensor | None, start: int, warp: Mapping[str, Any] | None = None
    ) -> Tensor:
        """GPT's input with the prefix warped (``forward`` / ``forward_cached`` pass ``warp`` here)."""
        if warp is None:
            raise ValueError("WarpGPT: the warp inputs (depth, R, t, K, K_inv) are required")
        if start:  # later cached calls: the prefix was warped in the first one
            return super()._embed(idx, embeddings, start)
        tok = self._token_embeddings(idx, embeddings, 0)
        pos = self.pos_emb[:, : tok.shape[1]]
        if not torch.is_grad_enabled():  # a no-grad view of a parameter has requires_grad but no grad_fn: module
            pos = pos.detach()  # hooks (torch.utils.flop_counter, module_tracker) refuse such inputs
        tok, pos = self.warper(tok, pos, warp)
        return self.drop(tok + pos)

    def bind(self, warp: Mapping[str, Any]) -> WarpBinding:
        return WarpBinding(self, warp)


class WarpBinding(nn.Module):
    """A :class:`WarpGPT` with its warp inputs fixed: the ``GPT`` interface (forward, forward_cached, make_caches,
    block_size, n_unmasked) for the shared samplers."""

    def __init__(self, gpt: WarpGPT, warp: Mapping[str, Any]) -> None:
        super().__init__()
        self.gpt, self.warp = gpt, dict(warp)
        self.block_size, self.n_unmasked = gpt.block_size, gpt.n_unmasked

    def forward(self, idx: Tensor, embeddings: Tensor | None = None, targets: Tensor | None = None):
        return self.gpt(idx, embeddings=embeddings, targets=targets, warp=self.warp)

    def forward_cached(self, idx: Tensor, caches: list[KVCache], embeddings: Tensor | None = None) -> Tensor:
        return self.gpt.forward_cached(idx, caches, embeddings=embeddings, warp=self.warp)

    def make_caches(self, *args: Any, **kwargs: Any) -> list[KVCache]:
        return self.gpt.make_caches(*args, **kwargs)
