"""MMDiT weights in and out: diffusers ``SD3Transformer2DModel`` and the original Stability checkpoints (SD3 / SD3.5).

Three layouts of the same parameters:

- ours (:class:`sd3_flow.models.mmdit.MMDiT`) = **diffusers** ``SD3Transformer2DModel``: identical names and tensors,
  so :func:`to_diffusers` / :func:`from_diffusers` only check the keys; :func:`diffusers_config` gives the diffusers
  constructor arguments for our keyword arguments;
- the **original** layout of ``Stability-AI/sd3.5: mmditx.py`` (``sd3_medium.safetensors``,
  ``sd3.5_medium.safetensors``, ``sd3.5_large.safetensors``: keys under ``model.diffusion_model.``), the table of
  diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``:

  ========================================================  ==================================================
  original                                                  ours / diffusers
  ========================================================  ==================================================
  ``pos_embed`` (1, M², D)                                  ``pos_embed.pos_embed``
  ``x_embedder.proj``                                       ``pos_embed.proj``
  ``t_embedder.mlp.{0,2}`` / ``y_embedder.mlp.{0,2}``       ``time_text_embed.{timestep,text}_embedder.linear_{1,2}``
  ``context_embedder``                                      ``context_embedder``
  ``joint_blocks.i.x_block.attn.qkv`` (fused, q|k|v)        ``transformer_blocks.i.attn.to_{q,k,v}``
  ``joint_blocks.i.context_block.attn.qkv``                 ``transformer_blocks.i.attn.add_{q,k,v}_proj``
  ``x_block.attn.ln_{q,k}`` / ``context_block.attn.ln_*``   ``attn.norm_{q,k}`` / ``attn.norm_added_{q,k}``
  ``x_block.attn.proj`` / ``context_block.attn.proj``       ``attn.to_out.0`` / ``attn.to_add_out`` (not in the last)
  ``x_block.attn2.{qkv, ln_q, ln_k, proj}`` (MMDiT-X)       ``attn2.{to_q/k/v, norm_q, norm_k, to_out.0}``
  ``x_block.adaLN_modulation.1``                            ``norm1.linear``
  ``context_block.adaLN_modulation.1``                      ``norm1_context.linear`` (**halves swapped** in the last)
  ``{x,context}_block.mlp.fc{1,2}``                         ``ff{,_context}.net.0.proj`` / ``ff{,_context}.net.2``
  ``final_layer.linear``                                    ``proj_out``
  ``final_layer.adaLN_modulation.1``                        ``norm_out.linear`` (**halves swapped**)
  ========================================================  ==================================================

  The swaps: the reference's final layer and pre-only context block chunk their modulation as (shift, scale), ours
  and diffusers' adaLN-continuous as (scale, shift). :func:`from_original` / :func:`to_original` convert both ways;
- :func:`load_mmdit` reads any of them in one call (``.safetensors``, or a Lightning-style ``.ckpt`` through gencore's
  safe loader; the layout and the key prefix are detected, other components of a full checkpoint such as the VAE and
  text encoders are ignored) and builds the model from a preset, keyword arguments, or the weights themselves
  (:func:`config_from_state`).
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gencore.io import CheckpointKeyError, load_state_dict, read_state_dict
from sd3_flow.models.mmdit import MMDIT_PRESETS, MMDiT, depth_config

__all__ = [
    "ORIGINAL_PREFIX",
    "config_from_state",
    "detect_layout",
    "diffusers_config",
    "from_diffusers",
    "from_original",
    "load_mmdit",
    "to_diffusers",
    "to_original",
]

ORIGINAL_PREFIX = "model.diffusion_model."
_OURS_PROBE = "transformer_blocks.0.norm1.linear.weight"
_ORIGINAL_PROBE = "joint_blocks.0.x_block.adaLN_modulation.1.weight"

# Keys outside the blocks: original -> ours.
_GLOBAL = {
    "pos_embed": "pos_embed.pos_embed",
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "t_embedder.mlp.0.weight": "time_text_embed.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_text_embed.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_text_embed.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_text_embed.timestep_embedder.linear_2.bias",
    "y_embedder.mlp.0.weight": "time_text_embed.text_embedder.linear_1.weight",
    "y_embedder.mlp.0.bias": "time_text_embed.text_embedder.linear_1.bias",
    "y_embedder.mlp.2.weight": "time_text_embed.text_embedder.linear_2.weight",
    "y_embedder.mlp.2.bias": "time_text_embed.text_embedder.linear_2.bias",
    "context_embedder.weight": "context_embedder.weight",
    "context_embedder.bias": "context_embedder.bias",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.linear.bias": "proj_out.bias",
    "final_layer.adaLN_modulation.1.weight": "norm_out.linear.weight",
    "final_layer.adaLN_modulation.1.bias": "norm_out.linear.bias",
}
# Keys inside joint_blocks.i (original) / transformer_blocks.i (ours), one-to-one.
_BLOCK = {
    "x_block.attn.ln_q.weight": "attn.norm_q.weight",
    "x_block.attn.ln_k.weight": "attn.norm_k.weight",
    "context_block.attn.ln_q.weight": "attn.norm_added_q.weight",
    "context_block.attn.ln_k.weight": "attn.norm_added_k.weight",
    "x_block.attn.proj.weight": "attn.to_out.0.weight",
    "x_block.attn.proj.bias": "attn.to_out.0.bias",
    "context_block.attn.proj.weight": "attn.to_add_out.weight",
    "context_block.attn.proj.bias": "attn.to_add_out.bias",
    "x_block.attn2.ln_q.weight": "attn2.norm_q.weight",
    "x_block.attn2.ln_k.weight": "attn2.norm_k.weight",
    "x_block.attn2.proj.weight": "attn2.to_out.0.weight",
    "x_block.attn2.proj.bias": "attn2.to_out.0.bias",
    "x_block.adaLN_modulation.1.weight": "norm1.linear.weight",
    "x_block.adaLN_modulation.1.bias": "norm1.linear.bias",
    "context_block.adaLN_modulation.1.weight": "norm1_context.linear.weight",
    "context_block.adaLN_modulation.1.bias": "norm1_context.linear.bias",
    "x_block.mlp.fc1.weight": "ff.net.0.proj.weight",
    "x_block.mlp.fc1.bias": "ff.net.0.proj.bias",
    "x_block.mlp.fc2.weight": "ff.net.2.weight",
    "x_block.mlp.fc2.bias": "ff.net.2.bias",
    "context_block.mlp.fc1.weight": "ff_context.net.0.proj.weight",
    "context_block.mlp.fc1.bias": "ff_context.net.0.proj.bias",
    "context_block.mlp.fc2.weight": "ff_context.net.2.weight",
    "context_block.mlp.fc2.bias": "ff_context.net.2.bias",
}
# Fused qkv (original) -> three projections (ours), per block.
_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_BLOCK_KEY = re.compile(r"^(joint_blocks|transformer_blocks)\.(\d+)\.(.+)$")


def _swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) <-> (scale, shift) along dim 0 of an adaLN Linear's weight or bias."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _num_layers(state: Mapping[str, Any], block: str) -> int:
    idx = [int(m.group(2)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(1) == block]
    if not idx:
        raise CheckpointKeyError(f"no {block}.* keys: not an MMDiT state dict", [], [], [])
    return max(idx) + 1


# ------------------------------------------------------------------------------------------------- diffusers


def diffusers_config(**kwargs: Any) -> dict[str, Any]:
    """``SD3Transformer2DModel`` keyword arguments for ``MMDiT(**kwargs)`` (missing ones take MMDiT's defaults)."""
    params = inspect.signature(MMDiT.__init__).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"diffusers_config: unknown MMDiT argument(s) {unknown}")
    cfg = {k: p.default for k, p in params.items() if k != "self"} | kwargs
    cfg.pop("gradient_checkpointing")
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_projection_dim"] is None:
        cfg["caption_projection_dim"] = inner
    if cfg["out_channels"] is None:
        cfg["out_channels"] = cfg["in_channels"]
    cfg["dual_attention_layers"] = tuple(cfg["dual_attention_layers"])
    return cfg


def _expected_keys(config: Mapping[str, Any] | None) -> set[str] | None:
    if config is None:
        return None
    with torch.device("meta"):
        model = MMDiT(**{k: v for k, v in config.items() if k != "gradient_checkpointing"})
    return set(model.state_dict())


def _check_keys(state: Mapping[str, Tensor], config: Mapping[str, Any] | None, source: str) -> None:
    expected = _expected_keys(config)
    if expected is None:
        return
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointKeyError(
            f"{source}: {len(missing)} missing key(s) {missing[:8]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:8]}",
            missing,
            unexpected,
            [],
        )


def to_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Our state dict -> ``SD3Transformer2DModel`` state dict (the same names; checked against ``config`` if given)."""
    out = dict(state)
    _check_keys(out, config, "to_diffusers")
    return out


def from_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """``SD3Transformer2DModel`` state dict -> ours (the same names; checked against ``config`` if given)."""
    out = dict(state)
    _check_keys(out, config, "from_diffusers")
    return out


# -------------------------------------------------------------------------------------------------- original


def _original_name(key: str) -> str:
    """The original-layout name holding our ``key`` (fused ``qkv`` for q / k / v); for error messages."""
    for orig, ours in _GLOBAL.items():
        if ours == key:
            return orig
    m = _BLOCK_KEY.match(key)
    if m:
        i, rest = m.group(2), m.group(3)
        for orig, ours in _BLOCK.items():
            if ours == rest:
                return f"joint_blocks.{i}.{orig}"
        for orig, names in _QKV.items():
            for name in names:
                if rest.startswith(name + "."):
                    return f"joint_blocks.{i}.{orig}.{rest.rsplit('.', 1)[1]}"
    return key


def from_original(state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Original Stability layout (``joint_blocks.*``, with or without ``model.diffusion_model.``) -> ours.

    Keys outside the MMDiT (``first_stage_model.*``, ``text_encoders.*`` of a full checkpoint) are ignored when the
    prefix is present; any other unknown key raises :class:`~gencore.io.CheckpointKeyError`.
    """
    if any(k.startswith(ORIGINAL_PREFIX) for k in state):
        state = {k[len(ORIGINAL_PREFIX) :]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)}
    last = (config["num_layers"] if config is not None else _num_layers(state, "joint_blocks")) - 1
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in _GLOBAL:
            new = _GLOBAL[key]
            out[new] = _swap_halves(value) if new.startswith("norm_out.") else value
            continue
        m = _BLOCK_KEY.match(key)
        if not m or m.group(1) != "joint_blocks":
            unknown.append(key)
            continue
        i, rest = int(m.group(2)), m.group(3)
        base, _, kind = rest.rpartition(".")
        if base in _QKV:
            for name, part in zip(_QKV[base], value.chunk(3, dim=0), strict=True):
                out[f"transformer_blocks.{i}.{name}.{kind}"] = part
        elif rest in _BLOCK:
            swap = i == last and rest.startswith("context_block.adaLN_modulation.")
            out[f"transformer_blocks.{i}.{_BLOCK[rest]}"] = _swap_halves(value) if swap else value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointKeyError(
            f"from_original: {len(unknown)} key(s) outside the SD3 MMDiT layout: {unknown[:8]}", [], unknown, []
        )
    _check_keys(out, config, "from_original")
    return out


def to_original(
    state: Mapping[str, Tensor], config: Mapping[str, Any] | None = None, *, prefix: str = ""
) -> dict[str, Tensor]:
    """Ours -> the original Stability layout (fused ``qkv``, (shift, scale) halves), keys prefixed with ``prefix``
    (``"model.diffusion_model."`` as in the released files)."""
    _check_keys(state, config, "to_original")
    last = (config["num_layers"] if config is not None else _num_layers(state, "transformer_blocks")) - 1
    glob = {ours: orig for orig, ours in _GLOBAL.items()}
    block = {ours: orig for orig, ours in _BLOCK.items()}
    qkv_parts = {name: (orig, j) for orig, names in _QKV.items() for j, name in enumerate(names)}
    out: dict[str, Tensor] = {}
    fused: dict[str, list[Tensor | None]] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in glob:
            out[glob[key]] = _swap_halves(value) if key.startswith("norm_out.") else value
            continue
        m = _BLOCK_KEY.match(key)
        if not m or m.group(1) != "transformer_blocks":
            unknown.append(key)
            continue
        i, rest = int(m.group(2)), m.group(3)
        base, _, kind = rest.rpartition(".")
        if base in qkv_parts:
            orig, j = qkv_parts[base]
            fused.setdefault(f"joint_blocks.{i}.{orig}.{kind}", [None, None, None])[j] = value
        elif rest in block:
            swap = i == last and rest.startswith("norm1_context.")
            out[f"joint_blocks.{i}.{block[rest]}"] = _swap_halves(value) if swap else value
        else:
            unknown.append(key)
    for key, parts in fused.items():
        if any(p is None for p in parts):
            unknown.append(f"{key} (needs all of q, k, v)")
            continue
        out[key] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
    if unknown:
        raise CheckpointKeyError(f"to_original: {len(unknown)} key(s) not convertible: {unknown[:8]}", [], unknown, [])
    return {prefix + k: v for k, v in out.items()}


# ------------------------------------------------------------------------------------------- detect and load


def detect_layout(state: Mapping[str, Any], prefix: str | None = None) -> tuple[str, str]:
    """``("ours" | "original", prefix)``: which layout ``state`` holds and the prefix of its MMDiT keys.

    ``"ours"`` covers diffusers' names too. With several candidate prefixes (say raw and EMA weights in one
    Lightning checkpoint) pass ``prefix``.
    """
    found: list[tuple[str, str]] = []
    for key in state:
        for layout, probe in (("ours", _OURS_PROBE), ("original", _ORIGINAL_PROBE)):
            if key.endswith(probe) and (key == probe or key[: -len(probe)].endswith(".")):
                found.append((layout, key[: -len(probe)]))
    if prefix is not None:
        found = [f for f in found if f[1] == prefix]
    if len(found) == 1:
        return found[0]
    if not found:
        sample = sorted(map(str, state))[:8]
        where = f" under prefix {prefix!r}" if prefix is not None else ""
        raise CheckpointKeyError(
            f"no MMDiT weights found{where}: expected a key ending in {_OURS_PROBE!r} (ours / diffusers) or "
            f"{_ORIGINAL_PROBE!r} (original); first keys: {sample}",
            [],
            [],
            [],
        )
    raise CheckpointKeyError(
        f"several MMDiT weight sets in one checkpoint (layout, prefix): {found}; pass prefix= to choose", [], [], []
    )


def config_from_state(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """MMDiT keyword arguments read off a state dict in our / diffusers' layout (no prefix).

    ``attention_head_dim`` comes from the qk-norm weights, else 64 (the SD3 rule, hidden = 64·depth).
    ``sample_size`` only sets the position table's scale, which the checkpoint's ``pos_embed.pos_embed`` replaces:
    taken from a preset with the same architecture when there is one, else patch · min(pos_embed_max_size, 64).
    """
    try:
        proj = state["pos_embed.proj.weight"]  # (D, C, p, p)
        inner, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
        ctx = state["context_embedder.weight"]  # (D, joint_dim)
        pooled = state["time_text_embed.text_embedder.linear_1.weight"].shape[1]
        out_channels = state["proj_out.weight"].shape[0] // (patch * patch)
        pos = state["pos_embed.pos_embed"].shape[1]
    except KeyError as err:
        raise CheckpointKeyError(
            f"cannot infer the MMDiT configuration: key {err} is missing", [str(err)], [], []
        ) from None
    num_layers = _num_layers(state, "transformer_blocks")
    qk_norm = "rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in state else None
    head_dim = state["transformer_blocks.0.attn.norm_q.weight"].shape[0] if qk_norm else 64
    if inner % head_dim:
        raise CheckpointKeyError(
            f"hidden size {inner} is not a multiple of the head size {head_dim} (64 is assumed without qk-norm "
            "weights): pass preset= or config= with attention_head_dim",
            [],
            [],
            [],
        )
    dual = sorted({int(m.group(2)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(3).startswith("attn2.")})
    cfg: dict[str, Any] = dict(
        patch_size=patch,
        in_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=ctx.shape[1],
        caption_projection_dim=ctx.shape[0],
        pooled_projection_dim=pooled,
        out_channels=out_channels,
        pos_embed_max_size=math.isqrt(pos),
        dual_attention_layers=tuple(dual),
        qk_norm=qk_norm,
    )
    for preset in MMDIT_PRESETS.values():
        if all(preset.get(k) == v for k, v in cfg.items()):
            return dict(preset)
    return dict(cfg, sample_size=patch * min(cfg["pos_embed_max_size"], 64))


def load_mmdit(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    *,
    preset: str | None = None,
    config: Mapping[str, Any] | None = None,
    prefix: str | None = None,
    strict: bool = True,
    map_location: Any = "cpu",
    **mmdit_kwargs: Any,
) -> MMDiT:
    """One call from MMDiT weights in either layout to an eval-mode :class:`MMDiT`.

    Args:
        path_or_state: ``.safetensors`` / ``.ckpt`` path (read with :func:`gencore.io.load_checkpoint`), a loaded
            checkpoint dict (Lightning ``state_dict`` inside is found), or a state dict.
        preset: a name of :data:`~sd3_flow.models.mmdit.MMDIT_PRESETS` (or ``"depth<d>"``).
        config: MMDiT keyword arguments, on top of ``preset``; ``mmdit_kwargs`` on top of both. With none of them the
            architecture is read off the weights (:func:`config_from_state`).
        prefix: key prefix of the MMDiT weights; by default detected (``"model.diffusion_model."`` for the released
            original files, ``""`` for bare state dicts, a LightningModule attribute such as ``"model."``).
        strict: refuse missing / unexpected / mis-shaped keys with :class:`~gencore.io.CheckpointKeyError`, which
            names them in the checkpoint's own layout.
    """
    state, source = read_state_dict(path_or_state, map_location=map_location)
    layout, prefix = detect_layout(state, prefix)
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    ours = from_original(state) if layout == "original" else dict(state)

    kwargs: dict[str, Any] = {}
    if preset is not None:
        if not (preset in MMDIT_PRESETS or (preset.startswith("depth") and preset[5:].isdigit())):
            raise ValueError(f"unknown MMDiT preset {preset!r}; choose from {sorted(MMDIT_PRESETS)} or 'depth<d>'")
        named = MMDIT_PRESETS.get(preset)
        kwargs.update(copy.deepcopy(named) if named is not None else depth_config(int(preset[5:])))
    if config is not None:
        kwargs.update(config)
    kwargs.update(mmdit_kwargs)
    explicit = bool(kwargs)
    if not explicit:
        kwargs = config_from_state(ours)
    model = MMDiT(**kwargs)

    def rename(key: str) -> str:  # our name -> the checkpoint's
        return prefix + (_original_name(key) if layout == "original" else key)

    try:
        # the fixed position table may be absent (it is a function of the config): recomputed when the config is given
        allow = ("pos_embed.pos_embed",) if explicit else ()
        load_state_dict(model, ours, strict=strict, allow_missing=allow, source=f"{source} ({layout} layout)")
    except CheckpointKeyError as err:
        missing = [rename(k) for k in err.missing]
        unexpected = [rename(k) for k in err.unexpected]
        raise CheckpointKeyError(
            f"{source} ({layout} layout, prefix {prefix!r}) does not match MMDiT({_describe(kwargs)}): "
            f"{len(missing)} missing key(s) {missing[:8]}; {len(unexpected)} unexpected key(s) {unexpected[:8]}; "
            f"{len(err.mismatched)} shape mismatch(es) {err.mismatched[:4]}",
            missing,
            unexpected,
            err.mismatched,
        ) from None
    return model.eval()


def _describe(kwargs: Mapping[str, Any]) -> str:
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "qk_norm", "dual_attention_layers")
    return ", ".join(f"{k}={kwargs.get(k)!r}" for k in keys)
