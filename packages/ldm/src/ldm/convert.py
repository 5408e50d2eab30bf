"""Official Latent Diffusion checkpoints in, diffusers weights in and out (Rombach et al. 2022).

Whole checkpoints: :func:`load_ldm` builds a :class:`ldm.lit.LatentDiffusion` from an official LDM / SD v1 ``.ckpt``
and its yaml in one call (UNet, first stage, conditioning stage, schedule, ``scale_factor``). The autoencoder maps
live in :mod:`ldm.convert_autoencoder`.

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
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from gencore.io import (
    CheckpointKeyError,
    extract_state_dict,
    load_checkpoint,
    load_state_dict,
    plain_config,
    read_state_dict,
)
from ldm.models.unet import UNET_PRESETS, UNetModel, attention_heads

__all__ = [
    "diffusers_unet_config",
    "load_ldm",
    "load_unet",
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
    or a taming VQ model for the VQ LDMs), ``cond_stage_model.*`` (``ClassEmbedder``; ``FrozenCLIPEmbedder``, whose
    tokenizer and architecture come from a local ``clip_path`` — e.g. a snapshot of openai/clip-vit-large-patch14 —
    and whose weights come from the checkpoint), the schedule and ``scale_factor``.

    Semantic-synthesis checkpoints (``SpatialRescaler``) load as ``concat="semantic"`` models. Unsupported conditioning
    stages (the 1.45B model's BERTEmbedder, the layout model's encoder) raise ValueError.
    """
    import torch

    from ldm.convert_autoencoder import load_autoencoder
    from ldm.lit import LatentDiffusion
    from ldm.models.autoencoder import KLCodec

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

    cs = params.get("cond_stage_config")
    cs_target = _target(cs)
    kwargs: dict[str, Any] = {}
    cond_prefix = "cond_stage_model."
    if cs_target in ("__is_unconditional__", ""):
        cond = None
    elif cs_target.endswith("ClassEmbedder"):
        n = int(cs.get("params", {}).get("n_classes", 1000))
        null = n == 1001  # cin256-v2: class 1000 is the guidance null class
        cond, kwargs = "class", {"num_classes": n - 1 if null else n, "null_class": null}
    elif cs_target.endswith("FrozenCLIPEmbedder"):
        if clip_path is None:
            raise ValueError(
                "this checkpoint conditions on CLIP ViT-L/14 text: pass clip_path=<a local folder with "
                "its tokenizer and config (transformers format)>"
            )
        cond = "text"
        kwargs = {"text_encoder": {"path": clip_path, "max_length": 77, "projection": False, "pooling": "model"}}
    elif cs_target.endswith("SpatialRescaler"):
        cond = None
        kwargs = {
            "concat": "semantic",
            "semantic": dict(cs.get("params", {})),
            "segmentation_key": params.get("cond_stage_key", "segmentation"),
        }
    else:
        raise ValueError(
            f"unsupported conditioning stage {cs_target!r} (supported: unconditional, ClassEmbedder, SpatialRescaler, "
            "FrozenCLIPEmbedder)"
        )
    scale_factor = float(state["scale_factor"]) if "scale_factor" in state else float(params.get("scale_factor", 1.0))
    res = int(params.get("image_size", unet.image_size or 32)) * codec.downsample_factor
    module = LatentDiffusion(
        unet,
        codec,
        image_size=res,
        cond_stage=cond,
        conditioning_key=params.get("conditioning_key"),
        schedule={
            "beta_schedule": params.get("beta_schedule", "linear"),
            "timesteps": int(params.get("timesteps", 1000)),
            "linear_start": float(params.get("linear_start", 1e-4)),
            "linear_end": float(params.get("linear_end", 2e-2)),
        },
        parameterization=params.get("parameterization", "eps"),
        scale_factor=scale_factor,
        **kwargs,
    )
    if module.cond_stage_model is not None:
        cond_state = {
            k[len(cond_prefix) :]: v
            for k, v in state.items()
            if k.startswith(cond_prefix) and not k.endswith("position_ids")
        }
        flat_clip = not any(".text_model." in k for k in module.cond_stage_model.state_dict())

        def key_map(k: str) -> str:  # transformers >= 5 dropped CLIPTextModel.text_model
            return k.replace("transformer.text_model.", "transformer.", 1) if flat_clip else k

        load_state_dict(
            module.cond_stage_model, cond_state, key_map=key_map, strict=strict, source=f"{source} (cond_stage_model)"
        )
    # the schedule is rebuilt from the config; the checkpoint's copy must agree
    if "alphas_cumprod" in state:
        ours = module.schedule.alphas_cumprod
        if not torch.allclose(state["alphas_cumprod"].float().to(ours.device), ours, atol=1e-6):
            raise ValueError(f"{source}: its alphas_cumprod buffer differs from the schedule its config describes")
    return module.eval()
