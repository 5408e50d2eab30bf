"""Official Latent Diffusion checkpoints in, diffusers weights in and out (Rombach et al. 2022): one module for every
key map of the package.

Whole checkpoints: :func:`load_ldm` builds a :class:`ldm.lit.LatentDiffusion` from an official LDM / SD v1 ``.ckpt``
and its yaml in one call (UNet, first stage, the conditioner of its conditioning stage, schedule, ``scale_factor``).

UNet:

- :func:`load_unet` reads, in one call, an official LDM / Stable Diffusion v1 ``.ckpt`` (a Lightning-1.x dict whose
  ``state_dict`` holds ``model.diffusion_model.*`` next to ``first_stage_model.*``, ``cond_stage_model.*``, the
  schedule buffers and, when trained with EMA, ``model_ema.decay``, ``model_ema.num_updates`` and
  ``model_ema.<parameter name without dots>``), a bare UNet state dict or a diffusers ``UNet2DConditionModel`` state
  dict, and loads it strictly into :class:`~ldm.models.unet.UNetModel`. ``use_ema=True`` takes the LitEma copies:
  ``model.diffusion_model.time_embed.0.weight`` is stored as ``model_ema.diffusion_modeltime_embed0weight``.
  The architecture comes from a preset, UNetModel keyword arguments, or the official yaml (``unet_config``).
- :func:`unet_to_diffusers` / :func:`unet_from_diffusers` map state dicts to and from diffusers
  ``UNet2DConditionModel`` and :func:`diffusers_unet_config` gives its constructor arguments. The names follow
  diffusers' own ``convert_ldm_unet_checkpoint``: ``time_embed.{0,2}`` → ``time_embedding.linear_{1,2}``,
  ``input_blocks.0.0`` → ``conv_in``, ``input_blocks.{1+l·(n+1)+j}`` → ``down_blocks.l.{resnets,attentions}.j``,
  the level's last input block ``….0.op`` → ``down_blocks.l.downsamplers.0.conv``, ``middle_block.{0,1,2}`` →
  ``mid_block.{resnets.0, attentions.0, resnets.1}``, ``output_blocks.{l'·(n+1)+j}`` →
  ``up_blocks.l'.{resnets,attentions}.j`` (+ ``upsamplers.0.conv``), ``out.{0,2}`` → ``conv_norm_out`` /
  ``conv_out``, ``label_emb`` → ``class_embedding``; inside ResBlocks ``in_layers.{0,2}`` → ``norm1`` / ``conv1``,
  ``emb_layers.1`` → ``time_emb_proj``, ``out_layers.{0,3}`` → ``norm2`` / ``conv2``, ``skip_connection`` →
  ``conv_shortcut``; SpatialTransformer keys are identical. diffusers' ``attention_head_dim`` is a per-level head
  *count* (a historical misnomer) and it uses ``channels // heads`` as the head width.

KL autoencoder (first stage):

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
    extract_state_dict,
    find_prefix,
    load_checkpoint,
    load_state_dict,
    plain_config,
    read_state_dict,
)
from ldm.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL, build_autoencoder
from ldm.models.unet import UNET_PRESETS, UNetModel, attention_heads
from taming.convert import diffusers_vq_config, from_diffusers_vq, to_diffusers_vq

__all__ = [
    "autoencoder_config_from_yaml",
    "autoencoder_from_diffusers",
    "autoencoder_to_diffusers",
    "diffusers_autoencoder_config",
    "diffusers_unet_config",
    "infer_autoencoder_config",
    "load_autoencoder",
    "load_ldm",
    "load_unet",
    "scale_factor_from",
    "unet_config_from_yaml",
    "unet_from_diffusers",
    "unet_to_diffusers",
]

# ============================================================================================================ UNet

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
_UNET_DEFAULTS: dict[str, Any] = dict(
    dropout=0.0,
    channel_mult=(1, 2, 4, 8),
    conv_resample=True,
    dims=2,
    num_classes=None,
    num_heads=-1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    resblock_updown=False,
    use_new_attention_order=False,
    use_spatial_transformer=False,
    transformer_depth=1,
    context_dim=None,
    n_embed=None,
    legacy=True,
    use_linear_in_transformer=False,
)
_RESNET_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_FROM_DIFFUSERS = {v: k for k, v in _RESNET_TO_DIFFUSERS.items()}


def _unet_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """UNetModel keyword arguments with the official defaults filled in."""
    cfg = {**_UNET_DEFAULTS, **dict(config)}
    for key in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions"):
        if key not in cfg:
            raise ValueError(f"UNet config lacks {key!r} (got keys {sorted(config)})")
    return cfg


def diffusers_unet_config(**unet_kwargs: Any) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` keyword arguments equivalent to ``UNetModel(**unet_kwargs)``.

    Raises ``ValueError`` for official configurations that ``UNet2DConditionModel`` cannot express: AttentionBlock
    models (``use_spatial_transformer=False``, the unconditional LDMs), ``resblock_updown``, ``conv_resample=False``,
    ``use_new_attention_order``, or a head split whose width is not ``channels // heads``.
    """
    cfg = _unet_kwargs(unet_kwargs)
    if not cfg["use_spatial_transformer"]:
        raise ValueError(
            "UNet2DConditionModel has no AttentionBlock (self-attention without context): a UNet with "
            "use_spatial_transformer=False (unconditional / concat LDMs) has no diffusers UNet2DConditionModel form"
        )
    for key, ok in (("resblock_updown", False), ("conv_resample", True), ("dims", 2), ("n_embed", None)):
        if cfg[key] != ok:
            raise ValueError(f"UNet2DConditionModel cannot express {key}={cfg[key]!r} (needs {ok!r})")
    mc, mults = int(cfg["model_channels"]), [int(m) for m in cfg["channel_mult"]]
    attn_res = {int(a) for a in cfg["attention_resolutions"]}
    has_attn = [2**level in attn_res for level in range(len(mults))]
    heads = []
    for level, mult in enumerate(mults):
        ch = mc * mult
        try:
            n, d = attention_heads(
                ch,
                num_heads=cfg["num_heads"],
                num_head_channels=cfg["num_head_channels"],
                legacy=cfg["legacy"],
                use_spatial_transformer=True,
            )
        except ValueError:
            if has_attn[level] or level == len(mults) - 1:
                raise
            n, d = 1, ch  # no attention at this level: diffusers ignores the value
        if (has_attn[level] or level == len(mults) - 1) and ch // n != d:
            raise ValueError(
                f"level {level}: the official split is {n} heads × {d} channels at width {ch}, but diffusers always "
                f"uses width // heads = {ch // n} channels per head"
            )
        heads.append(n)
    context_dim = cfg["context_dim"]
    if not isinstance(context_dim, int):  # a list of one width (validated by UNetModel)
        context_dim = int(next(iter(context_dim)))
    return dict(
        sample_size=cfg.get("image_size"),
        in_channels=int(cfg["in_channels"]),
        out_channels=int(cfg["out_channels"]),
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        block_out_channels=[mc * m for m in mults],
        layers_per_block=int(cfg["num_res_blocks"]),
        downsample_padding=1,
        mid_block_scale_factor=1,
        dropout=float(cfg["dropout"]),
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=context_dim,
        transformer_layers_per_block=int(cfg["transformer_depth"]),
        attention_head_dim=heads,
        use_linear_projection=bool(cfg["use_linear_in_transformer"]),
        num_class_embeds=cfg["num_classes"],
        upcast_attention=False,
        resnet_time_scale_shift="scale_shift" if cfg["use_scale_shift_norm"] else "default",
    )


def _unet_module_pairs(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(official module prefix, diffusers module prefix, is a ResBlock) for every parameterised module."""
    cfg = _unet_kwargs(config)
    n, levels = int(cfg["num_res_blocks"]), len(cfg["channel_mult"])
    attn_res = {int(a) for a in cfg["attention_resolutions"]}
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", False),
        ("time_embed.2", "time_embedding.linear_2", False),
        ("label_emb", "class_embedding", False),
        ("input_blocks.0.0", "conv_in", False),
        ("middle_block.0", "mid_block.resnets.0", True),
        ("middle_block.1", "mid_block.attentions.0", False),
        ("middle_block.2", "mid_block.resnets.1", True),
        ("out.0", "conv_norm_out", False),
        ("out.2", "conv_out", False),
    ]
    for level in range(levels):
        for j in range(n):
            i = 1 + level * (n + 1) + j
            pairs.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", True))
            pairs.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", False))
        if level < levels - 1:
            i = 1 + level * (n + 1) + n
            pairs.append((f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", False))
    for block in range(levels):  # diffusers up_blocks[0] = lowest resolution = output_blocks[0 .. n]
        level = levels - 1 - block
        for j in range(n + 1):
            i = block * (n + 1) + j
            pairs.append((f"output_blocks.{i}.0", f"up_blocks.{block}.resnets.{j}", True))
            upsample_index = 2 if 2**level in attn_res else 1
            if 2**level in attn_res:
                pairs.append((f"output_blocks.{i}.1", f"up_blocks.{block}.attentions.{j}", False))
            if level > 0 and j == n:
                pairs.append(
                    (f"output_blocks.{i}.{upsample_index}.conv", f"up_blocks.{block}.upsamplers.0.conv", False)
                )
    return pairs


def _rename(
    state: Mapping[str, Tensor], table: dict[str, tuple[str, bool]], sub: dict[str, str], direction: str
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
            head = ".".join(parts[:cut])
            if head in table:
                new_head, is_resnet = table[head]
                rest = ".".join(parts[cut:])
                if is_resnet:
                    for old, new in sub.items():
                        if rest.startswith(old + "."):
                            rest = new + rest[len(old) :]
                            break
                out[f"{new_head}.{rest}"] = value
                break
        else:
            raise ValueError(f"{direction}: key {key!r} has no counterpart for this UNet config")
    return out


def unet_to_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Official-named UNet state dict -> diffusers ``UNet2DConditionModel`` state dict (same tensors).

    ``config`` holds the UNetModel keyword arguments; configurations diffusers cannot express raise ``ValueError``
    (see :func:`diffusers_unet_config`).
    """
    diffusers_unet_config(**config)
    table = {ours: (theirs, res) for ours, theirs, res in _unet_module_pairs(config)}
    return _rename(state, table, _RESNET_TO_DIFFUSERS, "unet_to_diffusers")


def unet_from_diffusers(state: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> official-named UNet state dict (inverse of
    :func:`unet_to_diffusers`)."""
    diffusers_unet_config(**config)
    table = {theirs: (ours, res) for ours, theirs, res in _unet_module_pairs(config)}
    return _rename(state, table, _RESNET_FROM_DIFFUSERS, "unet_from_diffusers")


def unet_config_from_yaml(config: Any) -> dict[str, Any]:
    """UNetModel keyword arguments from an official config: the whole LDM yaml (``model.params.unet_config``),
    the ``unet_config`` node (``{target, params}``), its ``params``, or plain UNetModel kwargs (path, dict or
    DictConfig). ``use_fp16`` is dropped (False is the only value UNetModel accepts)."""
    cfg = plain_config(config)
    node: Any = cfg
    for key in ("model", "params", "unet_config", "params"):  # descend as far as the file nests
        if isinstance(node, Mapping) and "model_channels" not in node and isinstance(node.get(key), Mapping):
            node = node[key]
    if not isinstance(node, Mapping) or "model_channels" not in node:
        raise ValueError(f"no UNet parameters (model_channels, ...) found in config (top-level keys: {sorted(cfg)})")
    return {k: v for k, v in node.items() if k != "use_fp16" or v}


def _detect_bare_unet(state: Mapping[str, Tensor], prefix: str | None, source: str) -> str | None:
    """ "" for a bare official UNet state dict, None for a diffusers one; else CheckpointKeyError."""
    if "time_embed.0.weight" in state:
        return ""
    if "time_embedding.linear_1.weight" in state:
        return None
    raise CheckpointKeyError(
        f"{source}: no UNet weights found: no key starts with {prefix!r} and there is no bare "
        f"time_embed.0.weight or diffusers time_embedding.linear_1.weight (first keys: {sorted(state)[:6]})",
        ["time_embed.0.weight"],
        [],
        [],
    )


def load_unet(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    *,
    preset: str | None = None,
    config: Any = None,
    prefix: str | None = UNET_PREFIX,
    use_ema: bool = False,
    strict: bool = True,
    map_location: Any = "cpu",
    **unet_kwargs: Any,
) -> UNetModel:
    """One call from an official LDM / SD v1 checkpoint to an eval-mode :class:`UNetModel`.

    Args:
        path_or_state: ``.ckpt`` / ``.safetensors`` path, a loaded checkpoint dict, or a state dict.
        preset: a name of :data:`~ldm.models.unet.UNET_PRESETS`.
        config: UNetModel kwargs or an official yaml (path / dict / DictConfig, see :func:`unet_config_from_yaml`);
            applied on top of ``preset``; ``unet_kwargs`` on top of both.
        prefix: key prefix of the UNet (``"model.diffusion_model."`` in LDM checkpoints). If no key carries it, a
            bare UNet state dict (``time_embed.0.weight``) or a diffusers one (``time_embedding.linear_1.weight``)
            is recognised. ``None`` = that detection only.
        use_ema: load the LitEma weights ``model_ema.<name without dots>`` instead of the raw ones.
        strict: refuse missing / unexpected / mis-shaped keys (:class:`~gencore.io.CheckpointKeyError`, naming them).
    """
    kwargs: dict[str, Any] = {}
    if preset is not None:
        if preset not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {preset!r}; choose from {sorted(UNET_PRESETS)}")
        kwargs.update(copy.deepcopy(UNET_PRESETS[preset]))
    if config is not None:
        kwargs.update(unet_config_from_yaml(config))
    kwargs.update(unet_kwargs)
    if not kwargs:
        raise ValueError("load_unet needs preset= or config= (attention heads cannot be read off the weights)")
    model = UNetModel(**kwargs)

    state, source = read_state_dict(path_or_state, map_location=map_location)

    if prefix is None or not any(k.startswith(prefix) for k in state):
        prefix = _detect_bare_unet(state, prefix, source)
    if prefix is None:  # diffusers names
        if use_ema:
            raise ValueError("use_ema=True needs an official checkpoint with model_ema.* keys, got diffusers keys")
        load_state_dict(model, unet_from_diffusers(state, kwargs), strict=strict, source=f"{source} (diffusers)")
        return model.eval()

    if not use_ema:
        load_state_dict(model, state, prefix=prefix, strict=strict, source=source)
        return model.eval()

    if not prefix.startswith("model."):
        raise ValueError(
            f"use_ema=True: LitEma names the UNet parameters after LatentDiffusion.model, so the UNet prefix must "
            f"start with 'model.' (got {prefix!r})"
        )
    ema_base = prefix[len("model.") :]
    wanted = {name: EMA_PREFIX + (ema_base + name).replace(".", "") for name, _ in model.named_parameters()}
    missing = [f"{ema} (for {name})" for name, ema in wanted.items() if ema not in state]
    if missing and strict:
        n_ema = sum(k.startswith(EMA_PREFIX) for k in state)
        raise CheckpointKeyError(
            f"{source}: {len(missing)} missing EMA key(s) ({n_ema} model_ema.* keys present): "
            + ", ".join(missing[:8])
            + (f", ... (+{len(missing) - 8} more)" if len(missing) > 8 else ""),
            missing,
            [],
            [],
        )
    ema_state = {name: state[ema] for name, ema in wanted.items() if ema in state}
    load_state_dict(model, ema_state, strict=strict, source=f"{source} (EMA)")
    return model.eval()


# ============================================================================================== KL autoencoder

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
    if prefix is None:
        prefix = find_prefix(state, "encoder.conv_in.weight", [NESTED_PREFIX], what="autoencoder", source=source)
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


# ====================================================================================== whole LDM / SD checkpoints

_ROOT_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights",
    "logvar",
)


def _target(node: Any) -> str:
    return node if isinstance(node, str) else str((node or {}).get("target", ""))


def _conditioner(cs: Any, params: Mapping[str, Any], clip_path: str | os.PathLike | None) -> tuple[Any, Any]:
    """(the conditioner of an official ``cond_stage_config``, the submodule the ``cond_stage_model.*`` weights load
    into, or None when there are none)."""
    from ldm.conditioning import ClassConditioner, SemanticConditioner, TextConditioner, Unconditional

    cs_target = _target(cs)
    cs_params = dict((cs or {}).get("params", {})) if isinstance(cs, Mapping) else {}
    if cs_target in ("__is_unconditional__", ""):
        return Unconditional(), None
    if cs_target.endswith("ClassEmbedder"):
        n = int(cs_params.get("n_classes", 1000))
        null = n == 1001  # cin256-v2: class 1000 is the guidance null class
        embed_dim = cs_params.get("embed_dim")
        conditioner = ClassConditioner(
            n - 1 if null else n, embed_dim=None if embed_dim is None else int(embed_dim), null_class=null
        )
        return conditioner, conditioner
    if cs_target.endswith("FrozenCLIPEmbedder"):
        if clip_path is None:
            raise ValueError(
                "this checkpoint conditions on CLIP ViT-L/14 text: pass clip_path=<a local folder with "
                "its tokenizer and config (transformers format)>"
            )
        conditioner = TextConditioner(clip_path, max_length=77, projection=False, pooling="model")
        return conditioner, conditioner.encoder
    if cs_target.endswith("SpatialRescaler"):
        segmentation_key = params.get("cond_stage_key", "segmentation")
        conditioner = SemanticConditioner(**cs_params, segmentation_key=segmentation_key)
        return conditioner, conditioner
    raise ValueError(
        f"unsupported conditioning stage {cs_target!r} (supported: unconditional, ClassEmbedder, SpatialRescaler, "
        "FrozenCLIPEmbedder)"
    )


def load_ldm(
    path: str | os.PathLike,
    *,
    config: Any,
    clip_path: str | os.PathLike | None = None,
    use_ema: bool = False,
    strict: bool = True,
    map_location: Any = "cpu",
) -> Any:
    """An official LDM / Stable Diffusion v1 ``.ckpt`` and its yaml as a :class:`ldm.lit.LatentDiffusion`, in one
    call: ``model.diffusion_model.*`` (raw or ``use_ema`` LitEma weights), ``first_stage_model.*`` (KL autoencoder,
    or a taming VQ model for the VQ LDMs), ``cond_stage_model.*`` (``ClassEmbedder`` -> a
    :class:`~ldm.conditioning.ClassConditioner`; ``FrozenCLIPEmbedder`` -> a :class:`~ldm.conditioning.TextConditioner`
    whose tokenizer and architecture come from a local ``clip_path`` — e.g. a snapshot of
    openai/clip-vit-large-patch14 — and whose weights come from the checkpoint; ``SpatialRescaler`` -> a
    :class:`~ldm.conditioning.SemanticConditioner`), the schedule and ``scale_factor``.

    Unsupported conditioning stages (the 1.45B model's BERTEmbedder, the layout model's encoder) raise ValueError.
    """
    import torch

    from ldm.first_stage import KLCodec
    from ldm.lit import LatentDiffusion

    cfg = plain_config(config)
    node = cfg.get("model", cfg)
    params = node.get("params", node)
    if not isinstance(params, Mapping) or "unet_config" not in params:
        raise ValueError(f"config has no model.params.unet_config (top-level keys: {sorted(cfg)})")
    source = os.fspath(path)
    state = extract_state_dict(load_checkpoint(path, map_location=map_location))
    unet = load_unet(state, config=params["unet_config"], use_ema=use_ema, strict=strict)

    fs_target = _target(params.get("first_stage_config"))
    if fs_target.rsplit(".", 1)[-1] in ("VQModelInterface", "VQModel"):
        from taming.convert import load_vqgan
        from taming.first_stage import VQGANCodec

        vq = load_vqgan(state, config=params["first_stage_config"], prefix="first_stage_model.", strict=strict)
        codec = VQGANCodec(vq)
    else:
        ae = load_autoencoder(state, config=params["first_stage_config"], prefix="first_stage_model.", strict=strict)
        codec = KLCodec(ae)

    conditioner, weights_into = _conditioner(params.get("cond_stage_config"), params, clip_path)
    scale_factor = float(state["scale_factor"]) if "scale_factor" in state else float(params.get("scale_factor", 1.0))
    res = int(params.get("image_size", unet.image_size or 32)) * codec.downsample_factor
    module = LatentDiffusion(
        unet,
        codec,
        conditioner,
        image_size=res,
        conditioning_key=params.get("conditioning_key"),
        schedule={
            "beta_schedule": params.get("beta_schedule", "linear"),
            "timesteps": int(params.get("timesteps", 1000)),
            "linear_start": float(params.get("linear_start", 1e-4)),
            "linear_end": float(params.get("linear_end", 2e-2)),
        },
        parameterization=params.get("parameterization", "eps"),
        scale_factor=scale_factor,
    )
    if weights_into is not None:
        cond_prefix = "cond_stage_model."
        cond_state = {
            k[len(cond_prefix) :]: v
            for k, v in state.items()
            if k.startswith(cond_prefix) and not k.endswith("position_ids")
        }
        flat_clip = not any(".text_model." in k for k in weights_into.state_dict())

        def key_map(k: str) -> str:  # transformers >= 5 dropped CLIPTextModel.text_model
            return k.replace("transformer.text_model.", "transformer.", 1) if flat_clip else k

        load_state_dict(weights_into, cond_state, key_map=key_map, strict=strict, source=f"{source} (cond_stage_model)")
    # the schedule is rebuilt from the config; the checkpoint's copy must agree
    if "alphas_cumprod" in state:
        ours = module.schedule.alphas_cumprod
        if not torch.allclose(state["alphas_cumprod"].float().to(ours.device), ours, atol=1e-6):
            raise ValueError(f"{source}: its alphas_cumprod buffer differs from the schedule its config describes")
    return module.eval()
