"""Official geofree checkpoints (``CompVis/geometry-free-view-synthesis``) -> a :mod:`geofree.lit` model, one call.

The released ``re_impl_nodepth`` / ``re_impl_depth`` / ``ac_*`` checkpoints (and any run of the official configs) are
Lightning 1.x pickles whose ``state_dict`` holds, under the official attribute names this package keeps:

- ``transformer.*``: the minGPT (``tok_emb``, ``pos_emb``, ``blocks.<i>.{ln1,ln2,attn.{key,query,value,proj,mask},
  mlp.{0,2}}``, ``ln_f``, ``head``), a WarpGPT also ``transformer.warper.{emb_conv,pos_conv}.weight``;
- ``first_stage_model.*`` and its alias ``cond_stage_model.*`` (the image VQGAN), ``depth_stage_model.*`` (the depth
  VQGAN), ``emb_stage_model.fc.weight`` (the camera embedder), ``merge_conv.weight``;
- ``_midas.*`` and ``transformer.warper._midas.*``: MiDaS, which the official classes build inside every module.

:func:`load_geofree` reads them with gencore's restricted unpickler (tensors and Lightning / OmegaConf metadata;
anything that would run code is refused), builds the variant from the official config (``model.target`` picks
GeoTransformer / WarpGeoTransformer / WarpingTransformer / WarpTransformer; ``transformer_config``, ``merge_channels``,
``use_depth``, the VQGANs' ``ddconfig``), and loads every part strictly. The MiDaS weights are loaded into a
:class:`geofree.depth.MidasDisparity` when ``midas_hub_dir`` (a local MiDaS checkout) is given; otherwise they are
skipped and the model reads the disparity from the batch (``src_mono_disparity``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from gencore.io import CheckpointKeyError, load_state_dict, plain_config, read_state_dict

__all__ = ["MIDAS_PREFIXES", "VARIANTS", "load_geofree", "official_settings", "split_state_dict"]

MIDAS_PREFIXES = ("_midas.", "transformer.warper._midas.")
# official model targets (last component) -> how this package builds them
VARIANTS = {
    "GeoTransformer": "implicit",
    "WarpGeoTransformer": "hybrid",
    "WarpingTransformer": "expl_img",
    "WarpTransformer": "expl_emb",
}


def official_settings(config: Any) -> dict[str, Any]:
    """The parts of an official geofree config this package needs: the class name, ``merge_channels``,
    ``use_depth``, the transformer's target and params, the warper's params and the three stage nodes."""
    cfg = plain_config(config)
    node = cfg.get("model", cfg)
    params = node.get("params", node)
    target = str(node.get("target", ""))
    name = target.rsplit(".", 1)[-1]
    if name not in VARIANTS:
        raise ValueError(
            f"unsupported geofree model target {target!r}: expected one of {', '.join(VARIANTS)} (the official "
            "configs/{realestate,acid}/*_13x23_*.yaml); expl_feat (WarpingFeatureTransformer) is not supported"
        )
    tc = params.get("transformer_config")
    if not isinstance(tc, Mapping):
        raise ValueError("not a geofree config: no model.params.transformer_config")
    tparams = dict(tc.get("params", {}))
    warper = tparams.pop("warper_config", None)
    return {
        "class": name,
        "variant": VARIANTS[name],
        "merge_channels": params.get("merge_channels"),
        "use_depth": bool(params.get("use_depth", True)),
        "transformer_target": str(tc.get("target", "")),
        "transformer": tparams,
        "warper": dict((warper or {}).get("params") or {}),
        "first_stage": params.get("first_stage_config"),
        "depth_stage": params.get("depth_stage_config"),
        "has_camera": params.get("emb_stage_config") is not None,
    }


def split_state_dict(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the model's keys, the MiDaS keys with their prefix removed)."""
    model, midas = {}, {}
    for k, v in state.items():
        hit = next((p for p in MIDAS_PREFIXES if k.startswith(p)), None)
        if hit is None:
            model[k] = v
        elif hit == "_midas.":
            midas[k[len(hit) :]] = v  # the warper's copy is the same network
    return model, midas


def load_geofree(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    config: Any,
    *,
    image_size: Sequence[int] = (208, 368),
    midas_hub_dir: str | os.PathLike | None = None,
    depth_scale: str = "sparse",
) -> Any:
    """An eval-mode geofree model from an official checkpoint and its config (path / dict / DictConfig).

    ``image_size``: the views' size (official: 208 x 368, 13 x 23 tokens). ``midas_hub_dir``: a local clone of
    intel-isl/MiDaS, to run the checkpoint's own MiDaS weights (else the disparity comes from the batch).
    """
    from geofree.lit import GeoTransformer, WarpingTransformer
    from geofree.models.geogpt import ConvWarper, WarpGPT
    from taming.convert import load_vqgan
    from taming.models.mingpt import GPT

    s = official_settings(config)
    state, source = read_state_dict(checkpoint)
    state, midas_state = split_state_dict(state)
    if not any(k.startswith("transformer.") for k in state):
        raise CheckpointKeyError(f"{source}: no transformer.* keys (not a geofree checkpoint)", [], [], [])
    if s["first_stage"] is None:
        raise ValueError("the config has no first_stage_config")
    first = load_vqgan(state, config=s["first_stage"], prefix="first_stage_model.")
    depth = None
    if any(k.startswith("depth_stage_model.") for k in state) and s["depth_stage"] is not None:
        depth = load_vqgan(state, config=s["depth_stage"], prefix="depth_stage_model.")
    tparams = {k: v for k, v in s["transformer"].items() if k not in ("vocab_size", "block_size", "n_unmasked")}
    if s["transformer_target"].endswith("WarpGPT"):
        warper_kw = {k: v for k, v in s["warper"].items() if k not in ("n_unmasked", "block_size", "n_embd")}
        transformer = functools.partial(WarpGPT, warper=functools.partial(ConvWarper, **warper_kw), **tparams)
    elif s["transformer_target"].endswith(".GPT"):
        transformer = functools.partial(GPT, **tparams)
    else:
        raise ValueError(f"unsupported transformer {s['transformer_target']!r} (minGPT GPT or WarpGPT)")
    kwargs: dict[str, Any] = dict(image_size=tuple(image_size), depth_scale=depth_scale)
    variant = s["variant"]
    if variant == "expl_img":
        model = WarpingTransformer(first, transformer, **kwargs)
    else:
        use_depth = variant in ("implicit", "hybrid") and s["use_depth"]
        model = GeoTransformer(
            first,
            transformer,
            depth if use_depth else None,
            use_depth=use_depth,
            merge_channels=s["merge_channels"],
            camera_tokens=variant != "expl_emb",
            **kwargs,
        )
    expected = (s["transformer"].get("n_unmasked"), s["transformer"].get("block_size"))
    if expected[0] is not None and int(expected[0]) != model.n_unmasked:
        raise ValueError(
            f"{source}: the config's n_unmasked={expected[0]} does not match {model.n_unmasked} for this variant at "
            f"image_size={tuple(image_size)} (the token grid {model.grid})"
        )
    # the model's own keys, the frozen stages' copies included (loaded strictly too); an official impl_nodepth run
    # still carries the depth VQGAN it never feeds to the transformer: dropped with the model's lack of one
    if model.depth_stage_model is None:
        state = {k: v for k, v in state.items() if not k.startswith("depth_stage_model.")}
    load_state_dict(model, state, strict=True, source=source)
    if midas_hub_dir is not None:
        if not midas_state:
            raise CheckpointKeyError(f"{source}: no _midas.* keys to load MiDaS from", [], [], [])
        model.depth_estimator = _midas_from(midas_hub_dir, midas_state, source)
    return model.eval()


def _midas_from(hub_dir: str | os.PathLike, state: Mapping[str, Tensor], source: str) -> Any:
    import torch

    from gencore.io import resolve_path
    from geofree.depth import MidasDisparity

    hub = resolve_path(hub_dir)
    if not (hub / "hubconf.py").is_file():
        raise FileNotFoundError(f"midas_hub_dir={hub} is not a MiDaS checkout (no hubconf.py)")
    net = torch.hub.load(os.fspath(hub), "MiDaS", source="local", pretrained=False)
    inner = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    load_state_dict(net, inner, strict=True, source=f"{source} (_midas.model.*)")
    return MidasDisparity(net)
