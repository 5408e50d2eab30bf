"""Codebook quantisers of Taming Transformers (Esser, Rombach, Ommer, CVPR 2021, arXiv 2012.09841).

Section 3.1 of the paper ("Learning an Effective Codebook of Image Constituents"): an encoder output ẑ is replaced by
its nearest codebook entry, ``z_q = argmin_k ‖ẑ − e_k‖``, gradients pass straight through, and the codebook is learned
with ``L_VQ = ‖sg[ẑ] − z_q‖² + β‖sg[z_q] − ẑ‖²`` (Eq. 4).

- :class:`VectorQuantizer` is the official ``VectorQuantizer2`` (``taming/modules/vqvae/quantize.py``), with its
  parameter names (``embedding``, the ``used`` buffer of remapped models) and its **legacy loss**, which puts β on the
  codebook term instead of the commitment term (a bug kept by the authors for checkpoint compatibility).
- :class:`GumbelQuantize` is the Gumbel-softmax quantiser of the released ``vqgan_gumbel_f8`` model (Jang et al.
  2016): 1x1 ``proj`` to logits, relaxed one-hot samples, a KL-to-uniform prior term.
- :class:`LambdaWarmUpCosineScheduler` is the official temperature schedule (``taming/lr_scheduler.py``).
- :func:`codebook_usage` gives perplexity / used fraction / dead codes of a set of indices, for logging.

Remapping (ImageBART's shrunken vocabularies): ``remap`` lists the codebook indices in use; indices are reported in
that reduced space, unknown codes go to a random index or to an extra one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from gencore.modules import check_index_range, on_accelerator
from gencore.training import LambdaWarmUpCosineScheduler

__all__ = [
    "GumbelQuantize",
    "LambdaWarmUpCosineScheduler",
    "VectorQuantizer",
    "code_counts",
    "codebook_usage",
    "perplexity_of",
]

RemapSpec = str | os.PathLike | np.ndarray | Tensor | Sequence[int] | None


# ------------------------------------------------------------------------------------------------------ helpers


def _check_indices(indices: Tensor, size: int, what: str) -> None:
    """ValueError naming the offending ids when ``indices`` is not an integer tensor inside [0, size); on an
    accelerator the range check is an asynchronous device assertion (:func:`gencore.modules.check_index_range`)."""
    if not isinstance(indices, Tensor):
        raise ValueError(f"{what} must be a tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
        raise ValueError(f"{what} must be an integer tensor, got dtype {indices.dtype}")
    if indices.numel() == 0:
        return
    if on_accelerator(indices):
        check_index_range(indices, size, what)
        return
    bad = (indices < 0) | (indices >= size)
    if bool(bad.any()):
        ids = torch.unique(indices[bad])[:8].tolist()
        raise ValueError(f"{what} out of range: ids {ids} are not in [0, {size}) (codebook size {size})")


def code_counts(indices: Tensor, n: int) -> Tensor:
    """How often each of ``n`` codes occurs in ``indices`` (long (n,), on their device): ``index_add_``, which,
    unlike ``bincount``, needs no host sync to size its output."""
    flat = indices.reshape(-1).long()
    return torch.zeros(n, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def perplexity_of(indices: Tensor, n: int) -> Tensor:
    """exp(entropy) of the empirical code distribution of ``indices`` (a 0-d float tensor, no gradient)."""
    with torch.no_grad():
        counts = code_counts(indices, n).float()
        p = counts / counts.sum().clamp_min(1.0)
        return torch.exp(-(p * torch.log(p + 1e-10)).sum())


def codebook_usage(indices: Tensor, n_embed: int) -> dict[str, float]:
    """Usage statistics of codebook ``indices`` (any shape) over a codebook of ``n_embed`` entries.

    Returns ``perplexity`` (exp of the entropy of the code histogram; n_embed for uniform use, 1 for a single code),
    ``used_fraction`` (share of codes that occur) and ``dead_codes`` (number of codes that never occur).
    """
    if n_embed < 1:
        raise ValueError(f"n_embed must be >= 1, got {n_embed}")
    _check_indices(indices, n_embed, "codebook_usage: indices")
    counts = torch.bincount(indices.detach().reshape(-1).long().cpu(), minlength=n_embed)
    used = int((counts > 0).sum())
    return {
        "perplexity": float(perplexity_of(indices.detach().cpu(), n_embed)),
        "used_fraction": used / n_embed,
        "dead_codes": n_embed - used,
    }


def _load_used(remap: RemapSpec, n: int) -> Tensor:
    """The ``used`` index list from a ``.npy`` path, an array, a tensor or a sequence (1-D, unique, in [0, n))."""
    if isinstance(remap, (str, os.PathLike)):
        if not os.path.isfile(remap):
            raise ValueError(f"remap file {os.fspath(remap)!r} does not exist (expected a .npy of used indices)")
        used = torch.as_tensor(np.load(remap))
    elif isinstance(remap, np.ndarray):
        used = torch.from_numpy(remap.copy())
    elif isinstance(remap, Tensor):
        used = remap.detach().clone().cpu()
    else:
        used = torch.as_tensor(list(remap))
    if used.dim() != 1 or used.numel() == 0:
        raise ValueError(f"remap must be a non-empty 1-D list of used indices, got shape {tuple(used.shape)}")
    used = used.long()
    _check_indices(used, n, "remap: used indices")
    if torch.unique(used).numel() != used.numel():
        raise ValueError("remap: used indices must be unique")
    return used


class _Remap(nn.Module):
    """Index remapping shared by both quantisers (official ``remap_to_used`` / ``unmap_to_all`` semantics)."""

    remap: Any
    re_embed: int
    unknown_index: str | int

    def codebook(self) -> nn.Embedding:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_codebook_entry(self, indices: Tensor, shape: Sequence[int] | None) -> Tensor:
        """Codes for ``indices`` (remapped space if ``remap``); ``shape`` = (B, H, W, C) gives (B, C, H, W)."""
        _check_indices(indices, self.re_embed, "codebook indices")
        indices = indices.reshape(-1)
        if self.remap is not None:
            indices = self.unmap_to_all(indices)
        table = self.codebook()
        z_q = table(indices)  # (N, C)
        if shape is None:
            return z_q
        b, h, w, c = shape
        dim = table.embedding_dim
        if b * h * w != indices.numel() or c != dim:
            raise ValueError(f"shape {tuple(shape)} does not fit {indices.numel()} indices of dim {dim}")
        return rearrange(z_q.view(b, h, w, c), "b h w c -> b c h w").contiguous()

    def _init_remap(self, remap: RemapSpec, unknown_index: str | int, n: int) -> None:
        self.remap = remap
        if remap is None:
            self.re_embed = n
            self.unknown_index = unknown_index
            return
        used = _load_used(remap, n)
        self.register_buffer("used", used)  # persistent, as in the official code (checkpoints carry it)
        self.register_buffer("_lut", self._make_lut(used, n), persistent=False)
        self.re_embed = used.numel()
        if unknown_index == "extra":
            self.unknown_index = self.re_embed
            self.re_embed += 1
        elif unknown_index == "random":
            self.unknown_index = "random"
        elif isinstance(unknown_index, int) and not isinstance(unknown_index, bool):
            if not 0 <= unknown_index < self.re_embed:
                raise ValueError(f"unknown_index {unknown_index} is not in [0, {self.re_embed}) (the remapped range)")
            self.unknown_index = unknown_index
        else:
            raise ValueError(f"unknown_index must be 'random', 'extra' or an int, got {unknown_index!r}")

    def set_remap(self, remap: RemapSpec, unknown_index: str | int = "random") -> None:
        """Report indices in the space of the codes ``remap`` lists (ImageBART's ``data/vqgan_indices/*.npy``), or
        in the full codebook again with ``remap=None``: what building the quantiser with ``remap=`` does, for a
        quantiser that exists (a trained first stage whose used codes are known only after training)."""
        n = self.codebook().num_embeddings
        if remap is None:
            for name in ("used", "_lut"):
                if name in self._buffers:
                    del self._buffers[name]
        self._init_remap(remap, unknown_index, n)
        if remap is not None:
            device = self.codebook().weight.device
            self.used, self._lut = self.used.to(device), self._lut.to(device)

    @staticmethod
    def _make_lut(used: Tensor, n: int) -> Tensor:
        lut = torch.full((n,), -1, dtype=torch.long)
        lut[used] = torch.arange(used.numel())
        return lut

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # keep the lookup table in sync when a checkpoint brings its own `used` list
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.remap is not None and f"{prefix}used" in state_dict:
            self._lut = self._make_lut(self.used.long().cpu(), self._lut.numel()).to(self._lut.device)

    def remap_to_used(self, inds: Tensor) -> Tensor:
        """Full codebook indices -> positions in ``used`` (unknown ones -> random or ``unknown_index``)."""
        if self.remap is None:
            raise ValueError("remap_to_used needs a quantiser built with remap=...")
        _check_indices(inds, self._lut.numel(), "remap_to_used: indices")
        return self._remap(inds)

    def _remap(self, inds: Tensor) -> Tensor:
        """:meth:`remap_to_used` of indices known to be in range (the quantiser's own picks): no host sync, so a
        random replacement is drawn for every position and kept where the code is unknown."""
        new = self._lut.to(inds.device)[inds.long()]
        unknown = new < 0
        if self.unknown_index == "random":
            fill = torch.randint(0, self.re_embed, new.shape, device=new.device)
        else:
            fill = torch.full_like(new, int(self.unknown_index))
        return torch.where(unknown, fill, new)

    def unmap_to_all(self, inds: Tensor) -> Tensor:
        """Positions in ``used`` -> full codebook indices (the extra index maps to ``used[0]``, as officially)."""
        if self.remap is None:
            raise ValueError("unmap_to_all needs a quantiser built with remap=...")
        _check_indices(inds, self.re_embed, "unmap_to_all: indices")
        used = self.used.to(inds.device)
        inds = torch.where(inds >= used.numel(), torch.zeros_like(inds), inds).long()
        return used[inds]


# ------------------------------------------------------------------------------------- vector quantisation


class VectorQuantizer(_Remap):
    """Nearest-neighbour codebook lookup with a straight-through gradient (official ``VectorQuantizer2``).

    ``forward(z)`` on (B, e_dim, H, W) returns ``(z_q, loss, (perplexity, None, indices))``: ``z_q`` (B, e_dim, H, W)
    with identity gradient w.r.t. ``z``; ``indices`` flat (B·H·W,) or (B, H, W) with ``sane_index_shape`` (in the
    remapped space when ``remap`` is set; the official code returns (B·H·W, 1) there). Unlike the official code,
    ``perplexity`` is a real 0-d tensor.

    Loss with ``legacy=True`` (official default): ``mean((sg[z_q] − z)²) + β·mean((z_q − sg[z])²)``, i.e. β on the
    codebook term; ``legacy=False`` gives the paper's form ``mean((z_q − sg[z])²) + β·mean((sg[z_q] − z)²)``.

    ``restart_unused_after=N`` (not in the official code; 0 = off, the default) fights codebook collapse, the usual
    complaint with VQGAN (a few percent of the codes in use): in training, every N-th forward pass moves each code
    that no input picked in the last N (or more) consecutive passes onto a random encoder output of the current batch
    (the dead-code restart of Jukebox / SoundStream). Nothing waits for the device: picks are counted on it every
    pass, and the restart replaces every code's row by ``where(dead, candidate, row)`` instead of selecting the dead
    ones on the host; restarting every N passes rather than in every pass keeps the DDP exchange of candidate codes
    to one per N passes (a code is therefore moved after N to 2N - 1 unused passes). Under DDP the usage counts are
    summed over processes and the new codes come from rank 0, so every replica keeps the same codebook. The counters
    are not saved (a resumed run waits N passes again), so the state dict is the official one either way.
    ``restart_count`` (a 0-d device tensor) counts the codes moved so far, ``restarts`` is the same as an int (a
    read from the device: for logs and tests, not for the training step).
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        remap: RemapSpec = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
        restart_unused_after: int = 0,
    ) -> None:
        super().__init__()
        if n_e < 1 or e_dim < 1:
            raise ValueError(f"n_e and e_dim must be >= 1, got n_e={n_e}, e_dim={e_dim}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if restart_unused_after < 0:
            raise ValueError(f"restart_unused_after must be >= 0 (0 = off), got {restart_unused_after}")
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, float(beta), legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)
        self._init_remap(remap, unknown_index, n_e)
        self.sane_index_shape = sane_index_shape
        self.restart_unused_after = int(restart_unused_after)
        self._passes = 0  # training passes counted since construction (host side: the restart cadence)
        self.register_buffer("unused_for", torch.zeros(n_e, dtype=torch.long), persistent=False)
        self.register_buffer("restart_count", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def codebook_size(self) -> int:
        return self.n_e

    @property
    def restarts(self) -> int:
        """Codes moved by dead-code restarts so far (reads :attr:`restart_count` from the device)."""
        return int(self.restart_count)

    def nearest(self, z_flat: Tensor) -> Tensor:
        """Index of the nearest code for each row of ``z_flat`` (N, e_dim), via ‖z‖² + ‖e‖² − 2 z·e."""
        e = self.embedding.weight  # (n_e, e_dim)
        d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2.0 * z_flat @ e.t()  # (N, n_e)
        return d.argmin(dim=1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, None, Tensor]]:
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.e_dim}, H, W), got shape {tuple(z.shape)}")
        b, _, h, w = z.shape
        z = rearrange(z, "b c h w -> b h w c").contiguous()  # (B, H, W, C)
        idx = self.nearest(z.reshape(-1, self.e_dim))  # (B·H·W,)
        z_q = self.embedding(idx).view(z.shape)  # (B, H, W, C)

        codebook = torch.mean((z_q - z.detach()) ** 2)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        loss = commitment + self.beta * codebook if self.legacy else codebook + self.beta * commitment

        z_q = z + (z_q - z).detach()  # straight-through estimator
        z_q = rearrange(z_q, "b h w c -> b c h w").contiguous()  # (B, C, H, W)
        perplexity = perplexity_of(idx, self.n_e)
        if self.training and self.restart_unused_after:
            self.restart_dead_codes(z.reshape(-1, self.e_dim), idx)

        if self.remap is not None:
            idx = self._remap(idx)
        if self.sane_index_shape:
            idx = idx.reshape(b, h, w)
        return z_q, loss, (perplexity, None, idx)

    def codebook(self) -> nn.Embedding:
        return self.embedding

    @torch.no_grad()
    def restart_dead_codes(self, z_flat: Tensor, idx: Tensor) -> Tensor:
        """Count this pass's picks ``idx`` (N,); on every ``restart_unused_after``-th pass move the codes unused for
        at least that many passes onto random rows of ``z_flat`` (N, e_dim). Returns how many moved (a 0-d device
        tensor; 0 between restart passes). No host sync (see the class docstring)."""
        counts = code_counts(idx, self.n_e)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:
            torch.distributed.all_reduce(counts)
        self.unused_for.add_(1).masked_fill_(counts > 0, 0)
        self._passes += 1
        if self._passes % self.restart_unused_after:
            return torch.zeros((), dtype=torch.long, device=idx.device)
        dead = self.unused_for >= self.restart_unused_after  # (n_e,) bool, on the device
        pick = torch.randint(0, z_flat.shape[0], (self.n_e,), device=z_flat.device)  # a candidate row for every code
        candidates = z_flat.detach()[pick].to(self.embedding.weight.dtype).contiguous()  # (n_e, e_dim)
        if distributed:
            torch.distributed.broadcast(candidates, src=0)
        weight = self.embedding.weight.data
        weight.copy_(torch.where(dead[:, None], candidates, weight))
        self.unused_for.masked_fill_(dead, 0)
        moved = dead.sum()
        self.restart_count.add_(moved)
        return moved


# ------------------------------------------------------------------------------------------- Gumbel softmax


class GumbelQuantize(_Remap):
    """Gumbel-softmax quantiser (official ``GumbelQuantize``, credited to Karpathy's deep-vector-quantization).

    ``proj`` (1x1 conv, ``num_hiddens`` → ``n_embed`` logits) → ``F.gumbel_softmax(logits, tau=temperature, dim=1,
    hard=straight_through if training else True)`` → ``z_q = Σ_n onehot_n · embed_n``. Loss = ``kl_weight ·
    mean_{b,h,w} Σ_n q_n log(q_n · n_embed)``, the KL from q = softmax(logits) to the uniform prior. As officially, the
    Gumbel noise is also drawn in eval mode (the sample is then an exact one-hot). ``temperature`` is a plain
    attribute, set every step from :class:`LambdaWarmUpCosineScheduler`.
    """

    def __init__(
        self,
        num_hiddens: int,
        embedding_dim: int,
        n_embed: int,
        *,
        straight_through: bool = True,
        kl_weight: float = 5e-4,
        temp_init: float = 1.0,
        remap: RemapSpec = None,
        unknown_index: str | int = "random",
    ) -> None:
        super().__init__()
        if min(num_hiddens, embedding_dim, n_embed) < 1:
            raise ValueError(
                f"num_hiddens, embedding_dim, n_embed must be >= 1, got {num_hiddens}, {embedding_dim}, {n_embed}"
            )
        if temp_init <= 0:
            raise ValueError(f"temp_init must be > 0, got {temp_init}")
        self.embedding_dim, self.n_embed = embedding_dim, n_embed
        self.straight_through, self.kl_weight = straight_through, float(kl_weight)
        self.temperature = float(temp_init)
        self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embedding_dim)
        self._init_remap(remap, unknown_index, n_embed)

    @property
    def codebook_size(self) -> int:
        return self.n_embed

    def forward(
        self, z: Tensor, temp: float | None = None, return_logits: bool = False
    ) -> tuple[Tensor, Tensor, tuple[Tensor, None, Tensor]] | tuple[Tensor, Tensor, tuple, Tensor]:
        if z.dim() != 4 or z.shape[1] != self.proj.in_channels:
            raise ValueError(f"GumbelQuantize expects (B, {self.proj.in_channels}, H, W), got shape {tuple(z.shape)}")
        hard = self.straight_through if self.training else True
        tau = self.temperature if temp is None else float(temp)
        if tau <= 0:
            raise ValueError(f"Gumbel temperature must be > 0, got {tau}")

        logits = self.proj(z)  # (B, n_embed, H, W)
        if self.remap is not None:
            logits = logits[:, self.used]  # continue with the used codes only
        one_hot = F.gumbel_softmax(logits, tau=tau, dim=1, hard=hard)
        if self.remap is not None:  # back to all codes, unused ones at zero
            full = torch.zeros(z.shape[0], self.n_embed, *z.shape[2:], dtype=one_hot.dtype, device=one_hot.device)
            full[:, self.used] = one_hot
            one_hot = full
        z_q = torch.einsum("b n h w, n d -> b d h w", one_hot, self.embed.weight)  # (B, D, H, W)

        qy = F.softmax(logits, dim=1)
        loss = self.kl_weight * torch.sum(qy * torch.log(qy * self.n_embed + 1e-10), dim=1).mean()

        idx = one_hot.argmax(dim=1)  # (B, H, W)
        perplexity = perplexity_of(idx, self.n_embed)
        if self.remap is not None:
            idx = self._remap(idx)
        if return_logits:
            return z_q, loss, (perplexity, None, idx), logits
        return z_q, loss, (perplexity, None, idx)

    def codebook(self) -> nn.Embedding:
        return self.embed
