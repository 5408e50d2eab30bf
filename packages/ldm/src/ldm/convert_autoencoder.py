"""Official KL first-stage checkpoints in, diffusers ``AutoencoderKL`` weights in and out (Latent Diffusion, Rombach
et al. 2022).

- :func:`load_autoencoder` reads, in one call, an official first-stage ``.ckpt`` (a Lightning-1.x dict whose
  ``state_dict`` holds ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*`` and the training-only
  ``loss.*`` weights: ``loss.logvar``, ``loss.discriminator.*``, ``loss.perceptual_loss.*``), or the
  ``first_stage_model.`` part of an LDM / Stable Diffusion v1 checkpoint (next to ``model.diffusion_model.*``,
  ``cond_stage_model.*`` and the schedule buffers), into :class:`~ldm.models.autoencoder.AutoencoderKL`, strictly.
  The architecture comes from the official yaml (``model.params.ddconfig`` / ``embed_dim`` of a first-stage config,
  or ``model.params.first_stage_config`` of an LDM config), a preset, or is read off the weights.
- :func:`autoencoder_to_diffusers` / :func:`autoencoder_from_diffusers` map state dicts to and from
  ``diffusers.AutoencoderKL``, and :func:`diffusers_autoencoder_config` gives its constructor arguments. The
  encoder / decoder layout is the one taming's VQGAN shares, so the key maps are :func:`taming.convert.to_diffusers_vq`
  / :func:`taming.convert.from_diffusers_vq` (decoder levels reversed, ``nin_shortcut`` → ``conv_shortcut``,
  ``norm_out`` → ``conv_norm_out``, attention 1x1 convs → ``Linear`` ``to_q/to_k/to_v/to_out.0``); ``quant_conv`` and
  ``post_quant_conv`` keep their names.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from gencore.io import (
    CheckpointKeyError,
    load_state_dict,
    plain_config,
    read_state_dict,
)
from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL, build_autoencoder
from taming.convert import diffusers_vq_config, from_diffusers_vq, to_diffusers_vq

__all__ = [
    "autoencoder_config_from_yaml",
    "autoencoder_from_diffusers",
    "autoencoder_to_diffusers",
    "diffusers_autoencoder_config",
    "infer_autoencoder_config",
    "load_autoencoder",
    "scale_factor_from",
]

IGNORED_PREFIXES = ("loss.",)  # discriminator, LPIPS and logvar of training checkpoints
NESTED_PREFIX = "first_stage_model."
_AE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")

# ------------------------------------------------------------------------------------------- official configs


def _model_params(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    node = cfg.get("model", cfg)
    params = node.get("params", node) if isinstance(node, Mapping) else node
    return params if isinstance(params, Mapping) else {}


def autoencoder_config_from_yaml(config: Any) -> dict[str, Any]:
    """``{"ddconfig": ..., "embed_dim": ...}`` from an official config (path, dict or DictConfig).

    Accepts a first-stage file (``model: {target: ldm.models.autoencoder.AutoencoderKL, params: {ddconfig,
    embed_dim, lossconfig}}``), an LDM / Stable Diffusion file (its ``model.params.first_stage_config``), either
    node itself or its ``params``. ``lossconfig``, ``monitor``, ``ckpt_path`` and other training fields are dropped.
    """
    cfg = plain_config(config)
    node = cfg.get("model", cfg)
    params = node.get("params", node) if isinstance(node, Mapping) else None
    if (
        isinstance(params, Mapping)
        and "ddconfig" not in params
        and isinstance(params.get("first_stage_config"), Mapping)
    ):
        node = params["first_stage_config"]
        params = node.get("params", node)
    if not isinstance(params, Mapping) or "ddconfig" not in params:
        raise ValueError(f"config has no model.params.ddconfig or first_stage_config (top-level keys: {sorted(cfg)})")
    target = str(node.get("target", "ldm.models.autoencoder.AutoencoderKL"))
    if target.rsplit(".", 1)[-1] != "AutoencoderKL":
        raise ValueError(
            f"unsupported first stage {target!r}: expected ldm.models.autoencoder.AutoencoderKL "
            "(VQ first stages load with taming.convert.load_vqgan)"
        )
    if "embed_dim" not in params:
        raise ValueError("config model.params has a ddconfig but no embed_dim")
    return {"ddconfig": dict(params["ddconfig"]), "embed_dim": int(params["embed_dim"])}


def scale_factor_from(state: Mapping[str, Tensor] | None = None, config: Any = None) -> float | None:
    """The latent scale of an LDM checkpoint: the root ``scale_factor`` buffer (saved when ``scale_by_std``), else
    ``model.params.scale_factor`` of its config (0.18215 for Stable Diffusion), else None."""
    if state is not None and isinstance(state.get("scale_factor"), Tensor):
        return float(state["scale_factor"])
    if config is not None:
        value = _model_params(plain_config(config)).get("scale_factor")
        if value is not None:
            return float(value)
    return None


def _level(pattern: str, state: Mapping[str, Tensor]) -> list[int]:
    return [int(m.group(1)) for k in state if (m := re.match(pattern, k))]


def infer_autoencoder_config(state: Mapping[str, Tensor], *, resolution: int = 256) -> dict[str, Any]:
    """``{"ddconfig", "embed_dim"}`` read off an unprefixed AutoencoderKL state dict.

    Channels, levels, res blocks and z / embed dims come from tensor shapes; attention levels from the presence of
    ``encoder.down.{i}.attn`` keys, stated as pixel sizes for ``resolution`` (which only places them). Dropout
    (training-only) is 0.
    """
    try:
        conv_in = state["encoder.conv_in.weight"]
        z_channels = int(state["decoder.conv_in.weight"].shape[1])
        enc_out = int(state["encoder.conv_out.weight"].shape[0])
        embed_dim = int(state["post_quant_conv.weight"].shape[1])
        levels = 1 + max(_level(r"encoder\.down\.(\d+)\.", state))
        n_blocks = 1 + max(_level(r"encoder\.down\.0\.block\.(\d+)\.", state))
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"cannot infer an AutoencoderKL architecture from these keys ({err!r}); pass config= or preset="
        ) from None
    if enc_out != 2 * z_channels:
        raise ValueError(
            f"encoder.conv_out has {enc_out} channels for z_channels={z_channels}: not a KL autoencoder (double_z)"
        )
    ch = int(conv_in.shape[0])
    ch_mult = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels)]
    attn = [resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
    ddconfig = dict(
        double_z=True,
        z_channels=z_channels,
        resolution=resolution,
        in_channels=int(conv_in.shape[1]),
        out_ch=int(state["decoder.conv_out.weight"].shape[0]),
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=n_blocks,
        attn_resolutions=attn,
        dropout=0.0,
        attn_type="vanilla" if "encoder.mid.attn_1.q.weight" in state else "none",
    )
    return {"ddconfig": ddconfig, "embed_dim": embed_dim}


# --------------------------------------------------------------------------------------------------- loading


def _resolve_prefix(state: Mapping[str, Tensor], prefix: str | None, source: str) -> str:
    if prefix is not None:
        return prefix
    if "encoder.conv_in.weight" in state:
        return ""
    if f"{NESTED_PREFIX}encoder.conv_in.weight" in state:
        return NESTED_PREFIX
    raise CheckpointKeyError(
        f"{source}: no autoencoder weights found: expected encoder.conv_in.weight, optionally under "
        f"{NESTED_PREFIX!r}; pass prefix=... (first keys: {sorted(state)[:6]})",
        ["encoder.conv_in.weight"],
        [],
        [],
    )


def load_autoencoder(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    *,
    config: Any = None,
    preset: str | None = None,
    prefix: str | None = None,
    strict: bool = True,
    map_location: Any = "cpu",
    **overrides: Any,
) -> AutoencoderKL:
    """One call from an official KL first-stage / LDM / SD v1 checkpoint to an eval-mode :class:`AutoencoderKL`.

    Args:
        path_or_state: ``.ckpt`` / ``.safetensors`` path, a loaded checkpoint dict, or a state dict.
        config: the official yaml (path / dict / DictConfig), first-stage or LDM; else ``preset``; else the
            architecture is read off the weights (:func:`infer_autoencoder_config`).
        preset: a name of :data:`~ldm.models.autoencoder.AUTOENCODER_PRESETS`.
        prefix: key prefix of the autoencoder inside the checkpoint; ``None`` = auto (none, else
            ``first_stage_model.``).
        strict: refuse missing / unexpected / mis-shaped keys (:class:`~gencore.io.CheckpointKeyError` names them).
        **overrides: constructor overrides (``ddconfig`` entries are merged).

    ``loss.*`` keys (training-only) are ignored; VQ first stages (``quantize.*``) are refused.
    """
    state, source = read_state_dict(path_or_state, map_location=map_location)
    prefix = _resolve_prefix(state, prefix, source)
    inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not inner:
        raise CheckpointKeyError(f"{source}: no keys start with prefix {prefix!r}", [], [], [])
    if any(k.startswith("quantize.") for k in inner):
        raise ValueError(f"{source}: a VQ first stage (quantize.* keys); load it with taming.convert.load_vqgan")

    if config is not None:
        kwargs = autoencoder_config_from_yaml(config)
    elif preset is not None:
        if preset not in AUTOENCODER_PRESETS:
            raise ValueError(f"unknown AutoencoderKL preset {preset!r}; choose from {sorted(AUTOENCODER_PRESETS)}")
        kwargs = copy.deepcopy(AUTOENCODER_PRESETS[preset])
    else:
        kwargs = infer_autoencoder_config({k: v for k, v in inner.items() if not k.startswith(IGNORED_PREFIXES)})
    if "ddconfig" in overrides:
        kwargs["ddconfig"] = {**kwargs["ddconfig"], **dict(overrides.pop("ddconfig"))}
    kwargs.update(overrides)

    model = build_autoencoder(None, **kwargs)
    load_state_dict(model, state, prefix=prefix, ignore_prefixes=IGNORED_PREFIXES, strict=strict, source=source)
    return model.eval()


# ------------------------------------------------------------------------------------------------- diffusers


def _check_keys(state: Mapping[str, Tensor], allowed: tuple[str, ...], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    bad = []
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        if not key.startswith(allowed):
            bad.append(key)
        out[key] = value
    if bad:
        hint = " (a VQ model: use taming.convert)" if any(k.startswith("quantize.") for k in bad) else ""
        raise ValueError(f"{what}: unexpected keys {bad[:4]}{hint}; expected only {', '.join(allowed)}*")
    return out


def autoencoder_to_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """:class:`AutoencoderKL` state dict (official keys; training-only ``loss.*`` entries are dropped) →
    ``diffusers.AutoencoderKL`` state dict."""
    return to_diffusers_vq(_check_keys(state, _AE_PREFIXES, "autoencoder_to_diffusers"))


def autoencoder_from_diffusers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``diffusers.AutoencoderKL`` state dict → :class:`AutoencoderKL` state dict with the official keys (also reads
    the pre-0.14 attention names ``query / key / value / proj_attn``)."""
    return from_diffusers_vq(_check_keys(state, _AE_PREFIXES, "autoencoder_from_diffusers"))


def diffusers_autoencoder_config(
    ddconfig: Mapping[str, Any], embed_dim: int, scaling_factor: float = 0.18215
) -> dict[str, Any]:
    """Keyword arguments of ``diffusers.AutoencoderKL`` for the autoencoder with this ``ddconfig`` / ``embed_dim``.

    ``scaling_factor`` (diffusers' latent scale; default 0.18215, Stable Diffusion's and diffusers') is metadata only.
    diffusers ties ``latent_channels`` to both the encoder output and ``quant_conv``, so it needs
    ``embed_dim == z_channels`` (true for every released config), and it cannot express ``ch_mult[0] != 1``,
    ``resamp_with_conv=False``, ``tanh_out`` or ``give_pre_end``.
    """
    dd = dict(ddconfig)
    if not dd.get("double_z", True):
        raise ValueError("diffusers AutoencoderKL needs ddconfig double_z=True")
    if int(embed_dim) != int(dd["z_channels"]):
        raise ValueError(
            f"diffusers AutoencoderKL needs embed_dim == z_channels, got embed_dim={embed_dim}, "
            f"z_channels={dd['z_channels']}"
        )
    cfg = diffusers_vq_config({**dd, "double_z": False}, 1, int(embed_dim))
    cfg.pop("num_vq_embeddings")
    cfg.pop("vq_embed_dim")
    cfg["scaling_factor"] = float(scaling_factor)
    return cfg
