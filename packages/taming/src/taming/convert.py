"""Official VQGAN checkpoints in, diffusers ``VQModel`` weights in and out (Taming Transformers, Esser et al. 2021).

- :func:`load_vqgan` reads an official ``.ckpt`` (a Lightning-1.x dict whose ``state_dict`` holds ``encoder.*``,
  ``decoder.*``, ``quantize.*``, ``quant_conv.*``, ``post_quant_conv.*`` plus training-only ``loss.*`` weights of the
  discriminator and LPIPS), optionally nested in a Net2NetTransformer under ``first_stage_model.`` /
  ``cond_stage_model.``, and loads it strictly into :class:`~taming.models.vqgan.VQModel` or
  :class:`~taming.models.vqgan.GumbelVQ`. The architecture comes from the official ``*-project.yaml``, a preset, or
  is read off the weights.
- :func:`to_diffusers_vq` / :func:`from_diffusers_vq` map state dicts to and from ``diffusers.VQModel`` and
  :func:`diffusers_vq_config` gives its constructor arguments. diffusers stores the decoder levels in the opposite
  order (``up_blocks[0]`` = lowest resolution, ``decoder.up[0]`` = full resolution here), names the blocks
  ``resnets`` / ``attentions`` / ``downsamplers.0`` / ``upsamplers.0`` / ``mid_block``, ``nin_shortcut`` →
  ``conv_shortcut``, ``norm_out`` → ``conv_norm_out``, and its attention uses ``Linear`` ``to_q/to_k/to_v/to_out.0``
  (the 1x1 conv weights lose their two trailing unit dims) with ``group_norm``.
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
from taming.models.vqgan import GUMBEL_PRESETS, VQGAN_PRESETS, GumbelVQ, VQModel, build_vqmodel

__all__ = [
    "diffusers_vq_config",
    "from_diffusers_vq",
    "infer_vqgan_config",
    "load_vqgan",
    "to_diffusers_vq",
    "vqgan_config_from_yaml",
]

IGNORED_PREFIXES = ("loss.",)  # discriminator + LPIPS weights of training checkpoints
NESTED_PREFIXES = ("first_stage_model.", "cond_stage_model.")

# ------------------------------------------------------------------------------------------- official configs


def vqgan_config_from_yaml(config: Any, *, stage: str = "first_stage_config") -> tuple[type[VQModel], dict[str, Any]]:
    """(model class, constructor kwargs) from an official config (``*-project.yaml`` path, dict or DictConfig).

    Accepts the whole file (``model: {target, params}``), the model node itself (``{target, params}``, e.g. an LDM
    ``first_stage_config``) or its ``params``. For a Net2NetTransformer / LDM config, the VQGAN node named ``stage``
    (``first_stage_config`` or ``cond_stage_config``) is used. ``target`` ending in ``GumbelVQ`` selects
    :class:`GumbelVQ`; ``lossconfig``, ``ckpt_path``, ``image_key``, ``monitor`` and other training fields are dropped.
    """
    cfg = plain_config(config)
    node = cfg.get("model", cfg)
    params = node.get("params", node)
    if isinstance(params, Mapping) and "ddconfig" not in params and isinstance(params.get(stage), Mapping):
        node = params[stage]
        params = node.get("params", node)
    target = str(node.get("target", "taming.models.vqgan.VQModel"))
    if not isinstance(params, Mapping) or "ddconfig" not in params:
        raise ValueError(f"config has no model.params.ddconfig (top-level keys: {sorted(cfg)})")
    name = target.rsplit(".", 1)[-1]
    if name == "GumbelVQ":
        cls: type[VQModel] = GumbelVQ
        kwargs = {"kl_weight": params.get("kl_weight", 1e-8)}
        sched = params.get("temperature_scheduler_config")
        if sched is not None:
            kwargs["temperature_schedule"] = {
                k: v for k, v in dict(sched.get("params", {})).items() if k != "verbosity_interval"
            }
    elif name in ("VQModel", "VQSegmentationModel", "VQNoDiscModel", "VQModelInterface", "VQGANWrapper"):  # + imagebart
        cls, kwargs = VQModel, {"sane_index_shape": bool(params.get("sane_index_shape", False))}
    else:
        raise ValueError(f"unsupported model target {target!r}: expected a taming VQModel or GumbelVQ")
    kwargs.update(ddconfig=dict(params["ddconfig"]), n_embed=int(params["n_embed"]), embed_dim=int(params["embed_dim"]))
    if params.get("remap") is not None:
        kwargs["remap"] = params["remap"]
    return cls, kwargs


def infer_vqgan_config(state: Mapping[str, Tensor], *, resolution: int = 256) -> tuple[type[VQModel], dict[str, Any]]:
    """(model class, kwargs) read off an unprefixed VQGAN state dict.

    Channels, levels, res blocks, z / embed dims and codebook size come from tensor shapes; attention levels from
    the presence of ``encoder.down.{i}.attn`` keys (stated as pixel sizes for ``resolution``, which only places them).
    Dropout (training-only) is 0.
    """
    try:
        conv_in = state["encoder.conv_in.weight"]
        z_channels = int(state["decoder.conv_in.weight"].shape[1])
        levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        n_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    except (KeyError, ValueError) as err:
        raise ValueError(
            f"cannot infer a VQGAN architecture from these keys ({err}); pass config= or preset="
        ) from None
    ch = int(conv_in.shape[0])
    ch_mult = [int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels)]
    attn = [resolution // 2**i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
    ddconfig = dict(
        double_z=False,
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
    embed_dim = int(state["quant_conv.weight"].shape[0])
    kwargs: dict[str, Any] = {"ddconfig": ddconfig, "embed_dim": embed_dim}
    if "quantize.proj.weight" in state:
        kwargs["n_embed"] = int(state["quantize.embed.weight"].shape[0])
        cls: type[VQModel] = GumbelVQ
    else:
        kwargs["n_embed"] = int(state["quantize.embedding.weight"].shape[0])
        cls = VQModel
    return cls, kwargs


# --------------------------------------------------------------------------------------------------- loading


def load_vqgan(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    *,
    config: Any = None,
    preset: str | None = None,
    prefix: str | None = None,
    strict: bool = True,
    map_location: Any = "cpu",
    **vq_kwargs: Any,
) -> VQModel:
    """One call from an official VQGAN checkpoint to an eval-mode :class:`VQModel` / :class:`GumbelVQ`.

    Args:
        path_or_state: ``.ckpt`` / ``.safetensors`` path, a loaded checkpoint dict, or a state dict.
        config: official ``*-project.yaml`` (path / dict / DictConfig); else ``preset``; else read off the weights.
        preset: a name of :data:`~taming.models.vqgan.VQGAN_PRESETS`.
        prefix: key prefix of the VQGAN inside the checkpoint, e.g. ``"first_stage_model."`` or
            ``"cond_stage_model."`` of a Net2NetTransformer; ``None`` = auto (none, else first_stage_model.).
        strict: refuse missing / unexpected / mis-shaped keys (:class:`~gencore.io.CheckpointKeyError`).
        **vq_kwargs: constructor overrides (``ddconfig`` entries are merged).

    ``loss.*`` keys are ignored. A ``quantize.used`` buffer in the weights (a remapped model) is taken as the remap
    list when no usable ``remap`` file is given.
    """
    stage = "cond_stage_config" if prefix == "cond_stage_model." else "first_stage_config"
    config_cls_kwargs = vqgan_config_from_yaml(config, stage=stage) if config is not None else None
    state, source = read_state_dict(path_or_state, map_location=map_location)
    if prefix is None:
        prefix = find_prefix(state, "encoder.conv_in.weight", NESTED_PREFIXES, what="VQGAN", source=source)
    inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not inner:
        raise CheckpointKeyError(f"{source}: no keys start with prefix {prefix!r}", [], [], [])

    if config_cls_kwargs is not None:
        cls, kwargs = config_cls_kwargs
    elif preset is not None:
        if preset not in VQGAN_PRESETS:
            raise ValueError(f"unknown VQGAN preset {preset!r}; choose from {sorted(VQGAN_PRESETS)}")
        cls = GumbelVQ if preset in GUMBEL_PRESETS else VQModel
        kwargs = copy.deepcopy(VQGAN_PRESETS[preset])
    else:
        cls, kwargs = infer_vqgan_config(inner)
    if "ddconfig" in vq_kwargs:
        kwargs["ddconfig"] = {**kwargs["ddconfig"], **dict(vq_kwargs.pop("ddconfig"))}
    kwargs.update(vq_kwargs)

    used = inner.get("quantize.used")
    remap = kwargs.get("remap")
    if used is not None and (remap is None or (isinstance(remap, (str, os.PathLike)) and not os.path.isfile(remap))):
        kwargs["remap"] = used.long()
    elif used is None and isinstance(remap, (str, os.PathLike)) and not os.path.isfile(remap):
        raise ValueError(f"remap file {os.fspath(remap)!r} not found and the checkpoint carries no quantize.used")

    model = build_vqmodel(None, gumbel=cls is GumbelVQ, **kwargs)
    load_state_dict(model, state, prefix=prefix, ignore_prefixes=IGNORED_PREFIXES, strict=strict, source=source)
    return model.eval()


# ------------------------------------------------------------------------------------------------- diffusers

_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BACK = {**{v: k for k, v in _ATTN.items()}, "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_TOP = {"norm_out": "conv_norm_out"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_PASS = ("quant_conv.", "post_quant_conv.", "quantize.embedding.weight")


def _levels(state: Mapping[str, Tensor], pattern: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def _check_vq_keys(state: Mapping[str, Tensor]) -> None:
    bad = [k for k in state if k.startswith("quantize.") and k != "quantize.embedding.weight"]
    if bad:
        raise ValueError(f"diffusers VQModel has no equivalent for {bad[:4]} (Gumbel quantiser or remap buffer)")


_MID = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}
_MID_BACK = {v: k for k, v in _MID.items()}


def _leaf(kind: str, rest: str, forward: bool) -> str:
    """Rename the parameter part of a resnet / attention key."""
    head, _, tail = rest.partition(".")
    if kind == "attn":
        if forward:
            return f"{_ATTN[head]}.{tail}" if head in _ATTN else rest
        if rest.startswith("to_out.0."):
            return "proj_out." + rest[len("to_out.0.") :]
        return f"{_ATTN_BACK[head]}.{tail}" if head in _ATTN_BACK else rest
    table = _RESNET if forward else {v: k for k, v in _RESNET.items()}
    return f"{table.get(head, head)}.{tail}"


def _to_diffusers_key(key: str, n_up: int) -> tuple[str, str | None]:
    """(diffusers key, "attn" if the weight is an attention projection else None)."""
    if key.startswith(_PASS):
        return key, None
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        raise ValueError(f"unexpected VQGAN key {key!r}")
    if m := re.match(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)", rest):
        level, i, kind, j, leaf = m.groups()
        i = int(i) if level == "down" else n_up - 1 - int(i)
        blocks = "down_blocks" if level == "down" else "up_blocks"
        coll = "resnets" if kind == "block" else "attentions"
        return f"{part}.{blocks}.{i}.{coll}.{j}.{_leaf(kind, leaf, True)}", "attn" if kind == "attn" else None
    if m := re.match(r"down\.(\d+)\.downsample\.(.+)", rest):
        return f"{part}.down_blocks.{m.group(1)}.downsamplers.0.{m.group(2)}", None
    if m := re.match(r"up\.(\d+)\.upsample\.(.+)", rest):
        return f"{part}.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.{m.group(2)}", None
    if rest.startswith("mid."):
        name, _, leaf = rest[len("mid.") :].partition(".")
        if name not in _MID:
            raise ValueError(f"unexpected VQGAN key {key!r}")
        kind = "attn" if name == "attn_1" else "block"
        return f"{part}.mid_block.{_MID[name]}.{_leaf(kind, leaf, True)}", "attn" if kind == "attn" else None
    head, _, tail = rest.partition(".")
    return f"{part}.{_TOP.get(head, head)}.{tail}", None


def _from_diffusers_key(key: str, n_up: int) -> tuple[str, str | None]:
    if key.startswith(_PASS):
        return key, None
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        raise ValueError(f"unexpected diffusers VQModel key {key!r}")
    if m := re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", rest):
        blocks, i, coll, j, leaf = m.groups()
        level = "down" if blocks == "down_blocks" else "up"
        i = int(i) if level == "down" else n_up - 1 - int(i)
        kind = "block" if coll == "resnets" else "attn"
        return f"{part}.{level}.{i}.{kind}.{j}.{_leaf(kind, leaf, False)}", "attn" if kind == "attn" else None
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
        return f"{part}.down.{m.group(1)}.downsample.{m.group(2)}", None
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        return f"{part}.up.{n_up - 1 - int(m.group(1))}.upsample.{m.group(2)}", None
    if rest.startswith("mid_block."):
        coll, idx, leaf = rest[len("mid_block.") :].split(".", 2)
        if f"{coll}.{idx}" not in _MID_BACK:
            raise ValueError(f"unexpected diffusers VQModel key {key!r}")
        kind = "attn" if coll == "attentions" else "block"
        return (
            f"{part}.mid.{_MID_BACK[coll + '.' + idx]}.{_leaf(kind, leaf, False)}",
            "attn" if kind == "attn" else None,
        )
    head, _, tail = rest.partition(".")
    return f"{part}.{_TOP_BACK.get(head, head)}.{tail}", None


def to_diffusers_vq(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """VQGAN state dict (official keys, no ``loss.*``) → ``diffusers.VQModel`` state dict."""
    _check_vq_keys(state)
    n_up = _levels(state, r"decoder\.up\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new, kind = _to_diffusers_key(key, n_up)
        if kind == "attn" and value.dim() == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> Linear
        out[new] = value
    return out


def from_diffusers_vq(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``diffusers.VQModel`` state dict → VQGAN state dict with the official keys (also reads the pre-0.14 attention
    names ``query / key / value / proj_attn``)."""
    n_up = _levels(state, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new, kind = _from_diffusers_key(key, n_up)
        if kind == "attn" and value.dim() == 2:
            value = value[:, :, None, None]  # Linear -> 1x1 conv
        out[new] = value
    return out


def diffusers_vq_config(ddconfig: Mapping[str, Any], n_embed: int, embed_dim: int) -> dict[str, Any]:
    """Keyword arguments of ``diffusers.VQModel`` for the VQGAN with this ``ddconfig`` / codebook.

    Levels with attention become ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D`` (single head); ``up_block_types``
    are listed from the lowest resolution. diffusers cannot express ``ch_mult[0] != 1`` (its conv_in outputs
    ``block_out_channels[0]``), ``resamp_with_conv=False``, ``double_z``, ``tanh_out`` or ``give_pre_end``.
    """
    dd = dict(ddconfig)
    ch, ch_mult = int(dd["ch"]), list(dd.get("ch_mult", (1, 2, 4, 8)))
    if ch_mult[0] != 1:
        raise ValueError(f"diffusers VQModel needs ch_mult[0] == 1, got ch_mult={ch_mult}")
    for key, bad in (("resamp_with_conv", False), ("double_z", True), ("tanh_out", True), ("give_pre_end", True)):
        if key in dd and bool(dd[key]) == bad:
            raise ValueError(f"diffusers VQModel has no equivalent for {key}={dd[key]}")
    attn_type = dd.get("attn_type", "vanilla")
    res, attn_res = int(dd["resolution"]), set(dd.get("attn_resolutions", ()))
    has_attn = [attn_type == "vanilla" and res // 2**i in attn_res for i in range(len(ch_mult))]
    return dict(
        in_channels=int(dd["in_channels"]),
        out_channels=int(dd["out_ch"]),
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in has_attn),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(has_attn)),
        block_out_channels=tuple(ch * m for m in ch_mult),
        layers_per_block=int(dd["num_res_blocks"]),
        act_fn="silu",
        latent_channels=int(dd["z_channels"]),
        sample_size=res,
        num_vq_embeddings=int(n_embed),
        norm_num_groups=32,
        vq_embed_dim=int(embed_dim),
        mid_block_add_attention=attn_type == "vanilla",
    )


# ------------------------------------------------------------------------------------------ Net2NetTransformer


def load_net2net(
    path: str | os.PathLike,
    *,
    config: Any,
    strict: bool = True,
    map_location: Any = "cpu",
) -> Any:
    """An official Net2NetTransformer ``.ckpt`` and its ``*-project.yaml`` as a :class:`taming.lit.Net2NetTransformer`,
    in one call (``transformer.*``, ``first_stage_model.*``, ``cond_stage_model.*`` load strictly).

    Conditioning stages: ``__is_unconditional__`` / ``unconditional: true`` / ``SOSProvider`` (start token),
    ``Labelator`` (class token, no offset, as released), a VQGAN (spatial). Other stages (``CoordStage``,
    ``VQSegmentationModel`` with a 1x1 segmentation head...) and non-identity permuters raise ValueError.
    """
    from taming.conditioning import ClassConditioner, SOSConditioner, SpatialConditioner
    from taming.lit import Net2NetTransformer
    from taming.models.mingpt import GPT

    cfg = plain_config(config)
    node = cfg.get("model", cfg)
    params = node.get("params", node)
    if not isinstance(params, Mapping) or "transformer_config" not in params:
        raise ValueError(f"config has no model.params.transformer_config (top-level keys: {sorted(cfg)})")
    permuter = str((params.get("permuter_config") or {}).get("target", "Identity"))
    if not permuter.endswith("Identity"):
        raise ValueError(f"unsupported permuter {permuter!r}: only the identity order is implemented")
    gpt = GPT(**{k: v for k, v in params["transformer_config"].get("params", {}).items()})
    cls, kwargs = vqgan_config_from_yaml(cfg, stage="first_stage_config")
    first = cls(**kwargs)
    cond_node = params.get("cond_stage_config")
    target = cond_node if isinstance(cond_node, str) else str((cond_node or {}).get("target", ""))
    if params.get("unconditional") or target in ("__is_unconditional__", "") or target.endswith("SOSProvider"):
        sos_token = int(params.get("sos_token", 0))
        if target.endswith("SOSProvider"):
            sos_token = int(cond_node.get("params", {}).get("sos_token", sos_token))
        conditioner: Any = SOSConditioner(sos_token)
    elif target.endswith("Labelator"):
        conditioner = ClassConditioner(int(cond_node["params"]["n_classes"]), offset=0)
    elif target.rsplit(".", 1)[-1] in ("VQModel", "GumbelVQ"):
        ccls, ckwargs = vqgan_config_from_yaml(cfg, stage="cond_stage_config")
        conditioner = SpatialConditioner(ccls(**ckwargs), cond_key=params.get("cond_stage_key", "depth"))
    else:
        raise ValueError(
            f"unsupported conditioning stage {target!r} (supported: unconditional / SOSProvider, Labelator, a VQGAN)"
        )
    module = Net2NetTransformer(
        gpt,
        first,
        conditioner,
        pkeep=float(params.get("pkeep", 1.0)),
        image_key=params.get("first_stage_key", "image"),
    )
    state = extract_state_dict(load_checkpoint(path, map_location=map_location))
    load_state_dict(
        module,
        state,
        strict=strict,
        ignore_prefixes=("first_stage_model.loss.", "cond_stage_model.loss.", "permuter."),
        source=str(path),
    )
    return module.eval()
