"""The conditional invertible network (cINN) of "A Note on Data Biases in Generative Models" (Esser, Rombach, Ommer,
2020, arXiv 2012.02516), the flow of Net2Net: ``net2net/modules/flow/flatflow.py::ConditionalFlatCouplingFlow``.

It maps the latent ``z`` (B, C) of a frozen autoencoder to ``v = T(z | y)`` with ``v ~ N(0, I)``; ``y`` is a
conditioning vector (the one-hot dataset label in the paper). Inverting with another label projects ``z`` onto another
dataset: ``z' = T^-1(T(z | y) | y')``. The blocks, in the official module layout:

- :class:`ConditionalFlatCouplingFlow` — ``embedder`` (a :class:`BasicFullyConnectedNet` from the conditioning to an
  ``embedding_dim`` vector), ``n_flows`` × :class:`ConditionalFlatDoubleCouplingFlowBlock` in ``sub_layers`` and,
  for ``conditioning_option`` "parallel" / "sequential", one 1×1 ``Conv2d`` per block in ``conditioning_layers``
  that turns the embedding into that block's conditioning;
- :class:`ConditionalFlatDoubleCouplingFlowBlock` — ``norm_layer`` (:class:`ActNorm`), ``activation``
  (:class:`InvLeakyRelu` or the identity :class:`IgnoreLeakyRelu`), ``coupling``
  (:class:`ConditionalDoubleVectorCouplingBlock`), ``shuffle`` (:class:`Shuffle`);
- :class:`ConditionalDoubleVectorCouplingBlock` — two affine couplings (the second with the halves swapped); the
  log-scale nets ``s`` end in ``tanh``, the shift nets ``t`` do not; both see ``[kept half, conditioning]``;
- :class:`ActNorm` — per-channel affine layer initialised from the first training batch (Glow);
- :class:`Shuffle` — a fixed random channel permutation (kept in the state dict);
- :func:`nll_loss` — the official ``NLL`` objective; :func:`bits_per_dim` — the exact NLL in bits per dimension.

Parameter and buffer names are the official ones: the ``flow.*`` entries of an official Lightning checkpoint load
with ``strict=True`` once the ``flow.`` prefix is stripped.

Differences from the official code (none changes what a checkpoint computes):

- ActNorm reads its ``initialized`` buffer at most once (and once more after each ``load_state_dict``) instead of
  calling ``.item()`` in every training forward; under ``torch.distributed`` its initial statistics are all-reduced
  so that every process starts from the same ``loc`` / ``scale``; the reverse-direction initialisation also works on
  2-D inputs (the official reshapes after initialising and fails there);
- ``InvLeakyRelu`` returns its true log-determinant ``#{x < 0} · log(alpha)`` (the official returns 0; the paper's
  configs use ``activation: none`` so they are unaffected);
- the "parallel" conditioning option applies its 1×1 convolutions to the (B, E, 1, 1) embedding (the official passes
  the 2-D embedding to ``Conv2d`` and fails); unknown options / activations raise instead of being ignored / KeyError;
- the coupling block refuses odd widths (the official builds nets of the wrong input width for them);
- the conditioning is cast to the embedder's dtype (the official's ``cond.float()``, the same for fp32 models);
- latents may be (B, C) or (B, C, 1, 1) and the output has the rank of the input (the official needs 4-D input);
  :meth:`ConditionalFlatCouplingFlow.sample` draws in the model's dtype (the official casts the noise to the
  conditioning's dtype, which truncates it for integer labels).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "FLOW_PRESETS",
    "ActNorm",
    "BasicFullyConnectedNet",
    "ConditionalDoubleVectorCouplingBlock",
    "ConditionalFlatCouplingFlow",
    "ConditionalFlatDoubleCouplingFlowBlock",
    "IgnoreLeakyRelu",
    "InvLeakyRelu",
    "Shuffle",
    "bits_per_dim",
    "build_flow",
    "nll_loss",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------- ActNorm
def _actnorm_state_loaded(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: the ``initialized`` buffer may have changed, read it again when next needed."""
    module._init_known = None


class ActNorm(nn.Module):
    """Per-channel affine normalisation, ``h = scale · (x + loc)`` (official ``autoencoder/basic.py::ActNorm``).

    On the first training forward ``loc = −mean`` and ``scale = 1 / (std + 1e-6)`` per channel (over batch and
    spatial positions, unbiased std as ``torch.std``) and the ``initialized`` buffer becomes 1; a loaded
    ``initialized = 1`` is respected. Inputs are (B, C) or (B, C, H, W); with ``logdet=True`` the forward also returns
    ``H · W · Σ log|scale|`` per sample, shape (B,).

    Whether the layer is initialised is cached on the host (``_init_known``: None = unknown, read the buffer once), so
    a training step does not synchronise with the device; ``load_state_dict`` drops the cache. Change the flag through
    ``load_state_dict`` or :meth:`reset`, not by writing the buffer. Under ``torch.distributed`` the initial
    statistics are pooled over all processes (sum, sum of squares and count are all-reduced).
    """

    def __init__(
        self, num_features: int, logdet: bool = False, affine: bool = True, allow_reverse_init: bool = False
    ) -> None:
        super().__init__()
        if not affine:
            raise ValueError("ActNorm: only affine=True is supported (as in the official code)")
        self.num_features = num_features
        self.logdet = logdet
        self.allow_reverse_init = allow_reverse_init
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))  # (1, C, 1, 1)
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))  # (1, C, 1, 1)
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._init_known: bool | None = None
        self.register_load_state_dict_post_hook(_actnorm_state_loaded)

    def reset(self) -> None:
        """Mark the layer uninitialised: the next training forward initialises it from its batch again."""
        self.initialized.zero_()
        self._init_known = None

    def _is_initialized(self) -> bool:
        if self._init_known is None:
            self._init_known = bool(self.initialized)  # one device read, then cached
        return self._init_known

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``loc`` / ``scale`` from the statistics of ``x`` (B, C, H, W); pooled over processes when distributed."""
        c = x.shape[1]
        flat = x.transpose(0, 1).contiguous().view(c, -1)  # (C, B·H·W), laid out as the official (same rounding)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        if dist.is_available() and dist.is_initialized():
            f64 = flat.double()
            stats = torch.stack([f64.sum(1), f64.square().sum(1), torch.full_like(f64[:, 0], flat.shape[1])])
            dist.all_reduce(stats)  # (3, C): Σx, Σx², n over all processes
            total, total_sq, n = stats
            mean = total / n
            var = (total_sq - n * mean.square()).clamp_min(0) / (n - 1)  # unbiased, as torch.std
            std = var.sqrt()
        else:
            mean = flat.mean(1)
            std = flat.std(1)
        self.loc.copy_(-mean.view(1, c, 1, 1).to(self.loc))
        self.scale.copy_((1.0 / (std + 1e-6)).view(1, c, 1, 1).to(self.scale))
        self.initialized.fill_(1)
        self._init_known = True

    @staticmethod
    def _as_4d(x: Tensor) -> Tensor:
        if x.dim() == 2:
            return x[:, :, None, None]
        if x.dim() != 4:
            raise ValueError(f"ActNorm: expected (B, C) or (B, C, H, W) inputs, got shape {tuple(x.shape)}")
        return x

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if reverse:
            return self.reverse(x)
        h4 = self._as_4d(x)  # (B, C, H, W)
        if self.training and not self._is_initialized():
            self.initialize(h4)
        h = self.scale * (h4 + self.loc)
        if x.dim() == 2:
            h = h.view(x.shape)
        if not self.logdet:
            return h
        height, width = h4.shape[2], h4.shape[3]
        logdet = height * width * torch.log(torch.abs(self.scale)).sum()
        return h, logdet * h4.new_ones(h4.shape[0])  # (B,)

    def reverse(self, h: Tensor) -> Tensor:
        h4 = self._as_4d(h)
        if self.training and not self._is_initialized():
            if not self.allow_reverse_init:
                raise RuntimeError(
                    "Initializing ActNorm in reverse direction is disabled by default. "
                    "Use allow_reverse_init=True to enable."
                )
            self.initialize(h4)
        x = h4 / self.scale - self.loc
        return x.view(h.shape) if h.dim() == 2 else x


# ------------------------------------------------------------------------------------------------------------- nets
class BasicFullyConnectedNet(nn.Module):
    """MLP ``Linear, [BN | ActNorm], LeakyReLU, depth × (Linear, [BN], LeakyReLU), Linear, [Tanh]``.

    The official layer order, so ``main.<i>.*`` keys match: ActNorm (``use_an``) only follows the first Linear,
    BatchNorm (``use_bn``) follows every hidden Linear. LeakyReLU has the default slope 0.01.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        hidden_dim: int = 256,
        use_tanh: bool = False,
        use_bn: bool = False,
        out_dim: int | None = None,
        use_an: bool = False,
    ) -> None:
        super().__init__()
        if use_bn and use_an:
            raise ValueError("BasicFullyConnectedNet: use_bn and use_an cannot both be set")
        layers: list[nn.Module] = [nn.Linear(dim, hidden_dim)]
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        if use_an:
            layers.append(ActNorm(hidden_dim))
        layers.append(nn.LeakyReLU())
        for _ in range(depth):
            layers.append(nn.Linear(hidden_dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.LeakyReLU())
        layers.append(nn.Linear(hidden_dim, dim if out_dim is None else out_dim))
        if use_tanh:
            layers.append(nn.Tanh())
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, dim) -> (B, out_dim)
        return self.main(x)


# ------------------------------------------------------------------------------------------------- simple layers
class Shuffle(nn.Module):
    """Fixed channel permutation; both index buffers are persistent (a checkpoint's permutation is the one used)."""

    def __init__(self, in_channels: int, seed: int | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        idx = torch.randperm(in_channels, generator=generator)
        self.register_buffer("forward_shuffle_idx", idx)
        self.register_buffer("backward_shuffle_idx", torch.argsort(idx))

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if reverse:
            return self.reverse(x)
        return x[:, self.forward_shuffle_idx], x.new_zeros(x.shape[0])  # a permutation: log|det| = 0

    def reverse(self, x: Tensor) -> Tensor:
        return x[:, self.backward_shuffle_idx]


class IgnoreLeakyRelu(nn.Module):
    """The identity (``activation="none"``, the paper's configs); log-determinant 0."""

    def __init__(self, alpha: float = 0.9) -> None:
        super().__init__()

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if reverse:
            return x
        return x, x.new_zeros(x.shape[0])

    def reverse(self, x: Tensor) -> Tensor:
        return x


class InvLeakyRelu(nn.Module):
    """Invertible leaky ReLU ``h = x if x >= 0 else alpha · x``.

    Returns the true log-determinant ``#{x < 0} · log(alpha)`` per sample; the official returns 0.
    """

    def __init__(self, alpha: float = 0.9) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"InvLeakyRelu: alpha must be > 0 to be invertible, got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if reverse:
            return self.reverse(x)
        negative = x < 0
        h = torch.where(negative, x * self.alpha, x)
        logdet = negative.flatten(1).sum(1).to(x.dtype) * math.log(self.alpha)  # (B,)
        return h, logdet

    def reverse(self, h: Tensor) -> Tensor:
        return torch.where(h < 0, h / self.alpha, h)


# ------------------------------------------------------------------------------------------------------- coupling
def _as_vectors(x: Tensor, what: str, hint: str = "give (B, C) vectors") -> Tensor:
    """(B, C) or (B, C, 1, 1) -> (B, C); any other shape is a ValueError naming ``what`` (``hint``: how to fix a
    spatial one)."""
    if x.dim() == 4 and x.shape[2] == 1 and x.shape[3] == 1:
        return x.reshape(x.shape[0], x.shape[1])
    if x.dim() == 4:
        raise ValueError(f"{what} of shape {tuple(x.shape)} have spatial size {x.shape[2]}x{x.shape[3]}; {hint}")
    if x.dim() != 2:
        raise ValueError(f"{what} of shape {tuple(x.shape)}: expected (B, C) or (B, C, 1, 1)")
    return x


class ConditionalDoubleVectorCouplingBlock(nn.Module):
    """Two conditional affine couplings over the two halves of x (official names ``s.{0,1}``, ``t.{0,1}``).

    Coupling i (halves swapped before i = 1) keeps ``a`` and maps ``b -> b · exp(s_i([a, c])) + t_i([a, c])``;
    ``s_i`` ends in tanh. The log-determinant is ``Σ s``. Output is ``[b', a']`` for input ``[a, b]``.
    """

    def __init__(self, in_channels: int, cond_channels: int, hidden_dim: int, depth: int = 2) -> None:
        super().__init__()
        if in_channels % 2 != 0 or in_channels < 2:
            raise ValueError(f"ConditionalDoubleVectorCouplingBlock: in_channels must be even, got {in_channels}")
        half = in_channels // 2
        self.s = nn.ModuleList(
            BasicFullyConnectedNet(half + cond_channels, depth, hidden_dim=hidden_dim, use_tanh=True, out_dim=half)
            for _ in range(2)
        )
        self.t = nn.ModuleList(
            BasicFullyConnectedNet(half + cond_channels, depth, hidden_dim=hidden_dim, use_tanh=False, out_dim=half)
            for _ in range(2)
        )

    def forward(self, x: Tensor, xc: Tensor, reverse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if reverse:
            return self.reverse(x, xc)
        v = _as_vectors(x, "coupling input")  # (B, C)
        c = _as_vectors(xc, "coupling conditioning")  # (B, E)
        a, b = v.chunk(2, dim=1)  # a: the half the nets see, b: the half they transform; (B, C/2) each
        logdet = v.new_zeros(v.shape[0])
        for i in range(len(self.s)):
            if i % 2 != 0:
                a, b = b, a
            hin = torch.cat((a, c), dim=1)  # (B, C/2 + E)
            log_scale = self.s[i](hin)
            b = b * log_scale.exp() + self.t[i](hin)
            logdet = logdet + log_scale.sum(1)
        out = torch.cat((a, b), dim=1)
        return (out.view(x.shape) if x.dim() == 4 else out), logdet

    def reverse(self, h: Tensor, xc: Tensor) -> Tensor:
        v = _as_vectors(h, "coupling input")
        c = _as_vectors(xc, "coupling conditioning")
        a, b = v.chunk(2, dim=1)
        for i in reversed(range(len(self.s))):
            hin = torch.cat((a, c), dim=1)
            b = (b - self.t[i](hin)) * self.s[i](hin).neg().exp()
            if i % 2 != 0:
                a, b = b, a
        out = torch.cat((a, b), dim=1)
        return out.view(h.shape) if h.dim() == 4 else out


_ACTIVATIONS: dict[str, type[nn.Module]] = {"lrelu": InvLeakyRelu, "none": IgnoreLeakyRelu}


class ConditionalFlatDoubleCouplingFlowBlock(nn.Module):
    """One flow step: ActNorm -> activation -> conditional double coupling -> shuffle (log-determinants summed)."""

    def __init__(
        self, in_channels: int, cond_channels: int, hidden_dim: int, hidden_depth: int, activation: str = "lrelu"
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        self.norm_layer = ActNorm(in_channels, logdet=True)
        self.coupling = ConditionalDoubleVectorCouplingBlock(in_channels, cond_channels, hidden_dim, hidden_depth)
        self.activation = _ACTIVATIONS[activation]()
        self.shuffle = Shuffle(in_channels)

    def forward(self, x: Tensor, xcond: Tensor, reverse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if reverse:
            return self.reverse(x, xcond)
        h, logdet = self.norm_layer(x)
        h, ld = self.activation(h)
        logdet = logdet + ld
        h, ld = self.coupling(h, xcond)
        logdet = logdet + ld
        h, ld = self.shuffle(h)
        return h, logdet + ld

    def reverse(self, h: Tensor, xcond: Tensor) -> Tensor:
        h = self.shuffle.reverse(h)
        h = self.coupling.reverse(h, xcond)
        h = self.activation.reverse(h)
        return self.norm_layer.reverse(h)


# ----------------------------------------------------------------------------------------------------------- flow
_CONDITIONING_OPTIONS = ("none", "parallel", "sequential")


class ConditionalFlatCouplingFlow(nn.Module):
    """The cINN ``v = T(z | y)`` (official ``flatflow.py::ConditionalFlatCouplingFlow``; see the module docstring).

    ``forward(x, cond)`` returns ``(v, logdet)`` with ``logdet = log|det ∂v/∂x|`` (B,); ``forward(v, cond,
    reverse=True)`` / :meth:`reverse` return ``x``. Latents are (B, in_channels) or (B, in_channels, 1, 1) (the output
    has the input's rank); the conditioning is (B, conditioning_dim) or (B, conditioning_dim, 1, 1). Instead of
    ``cond``, ``embedding=flow.embed(cond)`` (the per-block conditionings) may be passed to reuse them.
    """

    def __init__(
        self,
        in_channels: int,
        conditioning_dim: int,
        embedding_dim: int,
        hidden_dim: int,
        hidden_depth: int,
        n_flows: int,
        conditioning_option: str = "none",
        activation: str = "lrelu",
        conditioning_hidden_dim: int = 256,
        conditioning_depth: int = 2,
        conditioner_use_bn: bool = False,
        conditioner_use_an: bool = False,
    ) -> None:
        super().__init__()
        option = conditioning_option.lower()
        if option not in _CONDITIONING_OPTIONS:
            raise ValueError(
                f"unknown conditioning_option {conditioning_option!r}; choose one of {list(_CONDITIONING_OPTIONS)}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        if in_channels % 2 != 0 or in_channels < 2:
            raise ValueError(
                f"ConditionalFlatCouplingFlow: in_channels must be even (it is split in two halves), "
                f"got in_channels={in_channels}"
            )
        if n_flows < 1:
            raise ValueError(f"ConditionalFlatCouplingFlow: n_flows must be >= 1, got {n_flows}")
        if conditioner_use_bn and conditioner_use_an:
            raise ValueError("conditioner_use_bn and conditioner_use_an cannot both be set")
        if conditioner_use_bn:
            logger.debug("the conditioning network uses batch normalization: train with a sufficiently large batch")
        self.in_channels = in_channels
        self.conditioning_dim = conditioning_dim
        self.cond_channels = embedding_dim  # official attribute names
        self.mid_channels = hidden_dim
        self.num_blocks = hidden_depth
        self.n_flows = n_flows
        self.conditioning_option = option

        self.embedder = BasicFullyConnectedNet(
            dim=conditioning_dim,
            depth=conditioning_depth,
            out_dim=embedding_dim,
            hidden_dim=conditioning_hidden_dim,
            use_bn=conditioner_use_bn,
            use_an=conditioner_use_an,
        )
        self.sub_layers = nn.ModuleList(
            ConditionalFlatDoubleCouplingFlowBlock(
                in_channels, embedding_dim, hidden_dim, hidden_depth, activation=activation
            )
            for _ in range(n_flows)
        )
        if option != "none":
            self.conditioning_layers = nn.ModuleList(nn.Conv2d(embedding_dim, embedding_dim, 1) for _ in range(n_flows))

    # -- conditioning
    def embed(self, cond: Tensor) -> tuple[Tensor, ...]:
        """The per-block conditionings for ``cond`` (B, conditioning_dim[, 1, 1]): ``n_flows`` tensors (B, E)."""
        cond = _as_vectors(
            cond, "conditionings", "spatial conditionings are not supported (the official flow has none)"
        )
        if cond.shape[1] != self.conditioning_dim:
            raise ValueError(
                f"conditioning of width {cond.shape[1]}, expected conditioning_dim={self.conditioning_dim}"
            )
        embedding = self.embedder(cond.to(self.embedder.main[0].weight.dtype))  # (B, E)
        if self.conditioning_option == "none":
            return (embedding,) * self.n_flows
        hcond = embedding[:, :, None, None]  # (B, E, 1, 1)
        hconds = []
        for layer in self.conditioning_layers:
            hcond = layer(embedding[:, :, None, None] if self.conditioning_option == "parallel" else hcond)
            hconds.append(hcond.flatten(1))
        return tuple(hconds)

    def _conditionings(
        self, batch: int, cond: Tensor | None, embedding: tuple[Tensor, ...] | None
    ) -> tuple[Tensor, ...]:
        if (cond is None) == (embedding is None):
            raise ValueError("pass exactly one of cond and embedding (= flow.embed(cond))")
        if embedding is None:
            embedding = self.embed(cond)
        elif len(embedding) != self.n_flows:
            raise ValueError(f"embedding has {len(embedding)} entries, expected one per block ({self.n_flows})")
        if embedding[0].shape[0] != batch:
            raise ValueError(
                f"the latents have batch size {batch} but the conditioning has batch size {embedding[0].shape[0]}"
            )
        return embedding

    def _check_latents(self, x: Tensor) -> Tensor:
        """(B, C) or (B, C, 1, 1) -> (B, C), with readable errors."""
        hint = "the flow works on vectors: flatten them first (x.flatten(1)) and build the flow for their width"
        x = _as_vectors(x, "latents", hint)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"latents of width {x.shape[1]}, the flow was built for in_channels={self.in_channels}")
        return x

    # -- transforms
    def forward(
        self,
        x: Tensor,
        cond: Tensor | None = None,
        reverse: bool = False,
        *,
        embedding: tuple[Tensor, ...] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if reverse:
            return self.reverse(x, cond, embedding=embedding)
        h = self._check_latents(x)  # (B, C)
        hconds = self._conditionings(h.shape[0], cond, embedding)
        logdet = h.new_zeros(h.shape[0])  # (B,)
        for block, hcond in zip(self.sub_layers, hconds):
            h, ld = block(h, hcond)
            logdet = logdet + ld
        return h.view(x.shape), logdet

    def reverse(self, v: Tensor, cond: Tensor | None = None, *, embedding: tuple[Tensor, ...] | None = None) -> Tensor:
        h = self._check_latents(v)
        hconds = self._conditionings(h.shape[0], cond, embedding)
        for block, hcond in zip(reversed(self.sub_layers), reversed(hconds)):
            h = block.reverse(h, hcond)
        return h.view(v.shape)

    def sample(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``T^-1(v | cond)`` with ``v ~ N(0, I)``, one sample per row of ``cond``: (B, in_channels)."""
        weight = self.embedder.main[0].weight
        v = torch.randn(cond.shape[0], self.in_channels, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.reverse(v, cond)


# -------------------------------------------------------------------------------------------------------- presets
# what every official creativity config shares: the one-hot label of 3 datasets through a depth-2 BatchNorm embedder
# to 10 dims, coupling nets of depth 2, no activation between the layers
_CREATIVITY = dict(
    conditioning_dim=3,
    embedding_dim=10,
    conditioning_depth=2,
    hidden_depth=2,
    activation="none",
    conditioner_use_bn=True,
)
FLOW_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**_CREATIVITY, "in_channels": 16, "n_flows": 4, "hidden_dim": 32},  # CPU tests (171 keys)
    # the paper's configs/creativity/*.yaml (celeba_celebahq_ffhq: 3 datasets; anime_photography has 2)
    "creativity": {**_CREATIVITY, "in_channels": 128, "n_flows": 20, "hidden_dim": 1024},
    # the toy runs: the 4 x 8 x 8 latents of the union autoencoder, 3 datasets
    "toy": {**_CREATIVITY, "in_channels": 256, "n_flows": 8, "hidden_dim": 128, "conditioning_hidden_dim": 64},
}


def build_flow(preset: str | None = None, **overrides: Any) -> ConditionalFlatCouplingFlow:
    """A :class:`ConditionalFlatCouplingFlow` from a :data:`FLOW_PRESETS` entry, updated with ``overrides``."""
    if preset is None:
        kwargs: dict[str, Any] = {}
    elif preset in FLOW_PRESETS:
        kwargs = dict(FLOW_PRESETS[preset])
    else:
        raise ValueError(f"unknown flow preset {preset!r}; choose one of {sorted(FLOW_PRESETS)}")
    kwargs.update(overrides)
    return ConditionalFlatCouplingFlow(**kwargs)


# ----------------------------------------------------------------------------------------------------------- losses
def _half_sq_norm(v: Tensor) -> Tensor:
    return 0.5 * v.pow(2).flatten(1).sum(1)  # (B,)


def nll_loss(v: Tensor, logdet: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The official ``NLL``: ``mean_b ½‖v‖² − mean_b logdet`` (the Gaussian NLL up to the constant ``D/2 · log 2π``).

    ``parts`` (detached): ``nll_loss`` (mean ½‖v‖²), ``nlogdet_loss`` (−mean logdet) and ``reference_nll_loss``
    (mean ½‖ε‖² of ``ε ~ N(0, I)`` shaped like ``v``, what ``nll_loss`` tends to for a perfect flow).
    """
    if logdet.dim() != 1 or logdet.shape[0] != v.shape[0]:
        raise ValueError(f"logdet must have shape ({v.shape[0]},), got {tuple(logdet.shape)}")
    nll = _half_sq_norm(v).mean()
    nlogdet = -logdet.mean()
    loss = nll + nlogdet
    with torch.no_grad():
        reference = _half_sq_norm(torch.randn_like(v)).mean()
    parts = {"nll_loss": nll.detach(), "nlogdet_loss": nlogdet.detach(), "reference_nll_loss": reference}
    return loss, parts


def bits_per_dim(v: Tensor, logdet: Tensor) -> Tensor:
    """``−log2 p(x) / D`` per sample (B,): ``(½‖v‖² + D/2 · log 2π − logdet) / (D · ln 2)``, D = ``v[0].numel()``."""
    d = v[0].numel()
    nll = _half_sq_norm(v) + 0.5 * d * math.log(2 * math.pi) - logdet
    return nll / (d * math.log(2.0))
