"""Official Net2Net checkpoints in one call: the cINN of a released ``Net2NetFlow`` ``.ckpt``.

The official Lightning state dict holds ``flow.*`` (``flow.embedder.main.*``, ``flow.sub_layers.<k>.norm_layer.
{loc, scale, initialized}``, ``flow.sub_layers.<k>.coupling.{s,t}.<i>.main.*``, ``flow.sub_layers.<k>.shuffle.
{forward,backward}_shuffle_idx``), ``first_stage_model.*`` (the BigAE) and nothing for the parameter-free
``Labelator``. Our modules keep these names, so loading the flow is a prefix strip with strict checking;
the configuration is read off the tensors' shapes (``in_channels``, ``n_flows``, ``hidden_dim``, ``hidden_depth``,
``conditioning_dim``, ``embedding_dim``, ``conditioning_hidden_dim``, ``conditioning_depth``, BatchNorm or ActNorm in
the embedder, conditioning layers). The activation has no parameters: "none" (the paper's configs) unless given.

Two things the official code would get silently wrong are checked here: ActNorm ``initialized`` flags must be 1
(a 0 would re-initialise loc / scale from the first training batch and overwrite the released values), and the
shuffles are read from the checkpoint, never regenerated.

The released checkpoints are Lightning 1.x pickles; :func:`gencore.io.load_checkpoint` reads them with a restricted
unpickler (tensors and plain containers; anything that would run code is refused).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from gencore.io import CheckpointError, find_prefix, load_state_dict, read_state_dict
from net2net.models.flow import ConditionalFlatCouplingFlow

log = logging.getLogger(__name__)

__all__ = ["flow_config_from_state", "load_official", "net2net_from_official"]

MARKER = "sub_layers.0.norm_layer.loc"


def _linears(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    """Indices of the Linear layers (2-D weights) of a ``BasicFullyConnectedNet`` under ``prefix`` (``...main.``)."""
    found = []
    for k, v in state.items():
        m = re.fullmatch(re.escape(prefix) + r"(\d+)\.weight", k)
        if m and v.dim() == 2:
            found.append(int(m.group(1)))
    return sorted(found)


def flow_config_from_state(
    state: Mapping[str, Tensor], *, activation: str = "none", conditioning_option: str | None = None
) -> dict[str, Any]:
    """The ``ConditionalFlatCouplingFlow`` keyword arguments a flow state dict (keys without ``flow.``) came from."""
    if MARKER not in state:
        raise CheckpointError(f"not a net2net flow state dict: no {MARKER} (first keys: {sorted(state)[:5]})")
    n_flows = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"sub_layers\.(\d+)\.", k)))
    in_channels = int(state[MARKER].shape[1])
    s0 = "sub_layers.0.coupling.s.0.main."
    lin = _linears(state, s0)
    hidden_dim = int(state[f"{s0}{lin[0]}.weight"].shape[0])
    cond_channels = int(state[f"{s0}{lin[0]}.weight"].shape[1]) - in_channels // 2
    emb = "embedder.main."
    elin = _linears(state, emb)
    uses_bn = f"{emb}1.running_mean" in state
    uses_an = f"{emb}1.loc" in state
    has_layers = any(k.startswith("conditioning_layers.") for k in state)
    if has_layers and conditioning_option is None:
        raise CheckpointError(
            "the checkpoint has conditioning_layers: say whether they were 'parallel' or 'sequential' "
            "(conditioning_option=...; the official configs' value)"
        )
    embedding_dim = int(state[f"{emb}{elin[-1]}.weight"].shape[0])
    if embedding_dim != cond_channels:
        raise CheckpointError(
            f"embedder output {embedding_dim} != coupling conditioning width {cond_channels}: not a flat flow"
        )
    return {
        "in_channels": in_channels,
        "conditioning_dim": int(state[f"{emb}{elin[0]}.weight"].shape[1]),
        "embedding_dim": embedding_dim,
        "hidden_dim": hidden_dim,
        "hidden_depth": len(lin) - 2,
        "n_flows": n_flows,
        "conditioning_option": (conditioning_option or "none") if has_layers else "none",
        "activation": activation,
        "conditioning_hidden_dim": int(state[f"{emb}{elin[0]}.weight"].shape[0]),
        "conditioning_depth": len(elin) - 2,
        "conditioner_use_bn": uses_bn,
        "conditioner_use_an": uses_an,
    }


def load_official(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    *,
    activation: str = "none",
    conditioning_option: str | None = None,
    prefix: str | None = None,
) -> ConditionalFlatCouplingFlow:
    """The cINN of an official Net2Net checkpoint (a ``.ckpt`` path, a loaded checkpoint or a state dict), in eval
    mode, loaded strictly (a missing / unexpected key or a shape mismatch is a CheckpointKeyError naming them)."""
    state, source = read_state_dict(path_or_state)
    if prefix is None:
        prefix = find_prefix(state, MARKER, ("flow.", "model.flow."), what="Net2Net flow", source=source)
    flow_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    cfg = flow_config_from_state(flow_state, activation=activation, conditioning_option=conditioning_option)
    flow = ConditionalFlatCouplingFlow(**cfg)
    load_state_dict(flow, flow_state, source=source)
    fresh = [k for k, v in flow_state.items() if k.endswith("initialized") and int(v) == 0]
    if fresh:
        log.warning(
            "%s: %d ActNorm layers were never initialised (initialized = 0, e.g. %s): the first training step "
            "will set their loc / scale from data",
            source,
            len(fresh),
            fresh[0],
        )
    log.info(
        "loaded the official flow from %s: %d blocks, in_channels %d, width %d, conditioning_dim %d",
        source,
        cfg["n_flows"],
        cfg["in_channels"],
        cfg["hidden_dim"],
        cfg["conditioning_dim"],
    )
    return flow.eval()


def net2net_from_official(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    first_stage: Any,
    *,
    dataset_names: Sequence[str],
    image_size: int,
    **kwargs: Any,
) -> Any:
    """A :class:`net2net.lit.Net2NetFlow` with the official flow of ``path_or_state`` over ``first_stage`` (a gencore
    codec whose latents have the flow's width; the official BigAE is not re-implemented) and the one-hot expert
    over ``dataset_names`` (the order the checkpoint's labels were trained with)."""
    from net2net.lit import Net2NetFlow

    flow = load_official(path_or_state, **kwargs)
    return Net2NetFlow(flow, first_stage, dataset_names=dataset_names, image_size=image_size).eval()
