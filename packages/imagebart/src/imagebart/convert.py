"""Official ImageBART checkpoints (``CompVis/imagebart``) -> :class:`imagebart.lit.ImageBART`, in one call.

The official models are T separate Lightning 1.x runs, one per stage (``single_scale: t``), each a
``DenoisingXTransformer`` (t < T) or ``DecoderOnlyDenoiser`` (t = T) whose checkpoint holds

- ``transformer.*``: the stage network (x-transformers encoder-decoder keys, or the GPT's minGPT keys), with
  ``transformer.log_scalors`` for the residual stages;
- ``transformer_ema.*``: its LitEma copy, names without dots (``transformer_ema.encodertoken_embweight``) plus
  ``decay`` / ``num_updates``;
- ``first_stage_model.*``: the VQGAN, including the ``quantize.used`` remap buffer;
- ``sos_token``, ``alphats``, ``alphacum`` buffers.

:func:`load_imagebart` reads them with gencore's restricted unpickler (tensors and Lightning / OmegaConf metadata load;
anything that would run code is refused), builds the model from the stages' ``*-project.yaml`` configs (the stage
networks' sizes, the schedule, the per-stage ``alpha``), takes the VQGAN from the first stage checkpoint (its remap from
``quantize.used``), and loads every stage strictly. ``decoder.net.*`` (an ``AutoregressiveWrapper`` decoder) is mapped
to ``decoder.*``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from gencore.io import CheckpointKeyError, load_state_dict, plain_config, read_state_dict

__all__ = ["load_imagebart", "load_stage", "stage_settings", "stage_state_dict"]

TRANSFORMER_PREFIX = "transformer."
EMA_PREFIX = "transformer_ema."


def stage_settings(config: Any) -> dict[str, Any]:
    """The model node of one official stage config: ``single_scale``, ``n_scales``, ``redraw_prob``, ``alpha``,
    ``target`` and ``params`` of ``transformer_config``, and whether it is class-conditional."""
    cfg = plain_config(config)
    node = cfg.get("model", cfg)
    params = node.get("params", node)
    tc = params.get("transformer_config")
    if not isinstance(tc, Mapping):
        raise ValueError("not an ImageBART stage config: no model.params.transformer_config")
    return {
        "single_scale": params.get("single_scale"),
        "n_scales": int(params["n_scales"]),
        "redraw_prob": params.get("redraw_prob"),
        "alpha": float(params.get("alpha", 0.0)),
        "target": str(tc.get("target", "")),
        "params": dict(tc.get("params", {})),
        "conditional": params.get("conditioner_config") is not None,
        "top_k": params.get("top_k"),
    }


def _ema_key(name: str, state: Mapping[str, Tensor]) -> str | None:
    """The LitEma key of parameter ``name`` (dots removed), also for a decoder stored as ``decoder.net.*``."""
    for official in (name, "decoder.net." + name[len("decoder.") :] if name.startswith("decoder.") else None):
        if official is not None and EMA_PREFIX + official.replace(".", "") in state:
            return EMA_PREFIX + official.replace(".", "")
    return None


def stage_state_dict(
    state: Mapping[str, Tensor], parameters: Sequence[str], *, use_ema: bool, source: str
) -> dict[str, Tensor]:
    """The stage network's weights from a whole official checkpoint: ``transformer.*`` (``decoder.net.*`` renamed to
    ``decoder.*``), with the LitEma copies of ``parameters`` (the network's parameter names) when ``use_ema``."""
    inner = {k[len(TRANSFORMER_PREFIX) :]: v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}
    if not inner:
        raise CheckpointKeyError(
            f"{source}: no {TRANSFORMER_PREFIX}* keys (not an ImageBART stage checkpoint)", [], [], []
        )
    out = {("decoder." + k[len("decoder.net.") :] if k.startswith("decoder.net.") else k): v for k, v in inner.items()}
    if use_ema:
        keys = {name: _ema_key(name, state) for name in parameters}
        missing = [name for name, key in keys.items() if key is None]
        if missing:
            n_ema = sum(k.startswith(EMA_PREFIX) for k in state)
            raise CheckpointKeyError(
                f"{source}: no EMA copy of {len(missing)} parameter(s) ({n_ema} {EMA_PREFIX}* keys present), e.g. "
                f"{', '.join(missing[:4])}; load with use_ema=False",
                missing,
                [],
                [],
            )
        out.update({name: state[key] for name, key in keys.items()})  # buffers (the GPT's masks) stay as stored
    return out


def load_stage(model: Any, t: int, checkpoint: str | os.PathLike | Mapping[str, Any], *, use_ema: bool = False) -> None:
    """Load one official stage checkpoint strictly into ``model.transformers[t - 1]`` (``decoder.net.*`` mapped)."""
    if not 1 <= t <= model.num_steps:
        raise ValueError(f"stage t={t} is outside [1, T={model.num_steps}]")
    state, source = read_state_dict(checkpoint)
    net = model.transformers[t - 1]
    names = [n for n, _ in net.named_parameters()]
    stage = stage_state_dict(state, names, use_ema=use_ema, source=source)
    used = state.get("first_stage_model.quantize.used")
    quantize = model.first_stage_model.quantize
    if used is not None:
        mine = getattr(quantize, "used", None)
        if mine is None or mine.shape != used.shape or not bool((mine.cpu() == used.cpu()).all()):
            raise ValueError(
                f"{source}: stage {t} was trained on a VQGAN remapped to {used.numel()} codes, but the model's first "
                f"stage {'has no remap' if mine is None else f'remaps to {mine.numel()} other codes'}"
            )
    load_state_dict(net, stage, strict=True, source=f"{source} (stage {t})")


def load_imagebart(
    checkpoints: Sequence[str | os.PathLike],
    configs: Sequence[Any],
    *,
    use_ema: bool = False,
    num_classes: int | None = None,
) -> Any:
    """An eval-mode :class:`~imagebart.lit.ImageBART` from the T official stage checkpoints and their configs (in
    stage order, t = 1 ... T). The VQGAN comes from the first checkpoint's ``first_stage_model.*`` (its remap from
    ``quantize.used``); class-conditional models get ``num_classes`` (default: the shared input vocabulary, 1000
    for ImageNet)."""
    from imagebart.lit import ImageBART
    from imagebart.models.xtransformer import ResidualScaledXTransformer, XTransformer
    from taming.conditioning import ClassConditioner
    from taming.convert import load_vqgan
    from taming.models.mingpt import GPT

    if len(checkpoints) != len(configs) or not checkpoints:
        raise ValueError(f"give one config per stage checkpoint, got {len(checkpoints)} and {len(configs)}")
    settings = [stage_settings(c) for c in configs]
    T = settings[0]["n_scales"]
    if len(settings) != T:
        raise ValueError(f"the configs say n_scales={T}, but {len(settings)} stages were given")
    for t, s in enumerate(settings, start=1):
        if s["single_scale"] not in (None, t) or s["n_scales"] != T:
            raise ValueError(
                f"config {t} is for stage {s['single_scale']} of {s['n_scales']}, expected stage {t} of {T}"
            )
    first = settings[0]["params"]
    last = settings[-1]
    if not last["target"].endswith(".GPT"):
        raise ValueError(f"the last stage must be a GPT (DecoderOnlyDenoiser), its config has {last['target']}")
    ignore = {"scale_pos", "n_scales", "xt_start", "xt_size", "enc_num_tokens", "enc_max_seq_len", "dec_num_tokens"}
    ignore |= {"dec_max_seq_len", "wrap_decoder", "tie_token_emb"}
    residual = settings[0]["target"].endswith("ResidualScaledXTransformer")
    if not residual and not settings[0]["target"].endswith(".XTransformer"):
        raise ValueError(f"unsupported stage network {settings[0]['target']}: (ResidualScaled)XTransformer expected")
    stage_cls = ResidualScaledXTransformer if residual else XTransformer
    stage_network = functools.partial(stage_cls, **{k: v for k, v in first.items() if k not in ignore})
    gpt = {k: v for k, v in last["params"].items() if k not in {"vocab_size", "input_vocab_size", "block_size"}}
    gpt.pop("n_unmasked", None)
    gpt.pop("autoset_layers", None)
    vq = load_vqgan(checkpoints[0], config=configs[0], prefix="first_stage_model.")
    input_vocab = int(first.get("enc_num_tokens", last["params"].get("input_vocab_size")))
    conditioner = None
    if settings[0]["conditional"]:
        conditioner = ClassConditioner(num_classes or input_vocab, offset=0, label_key="class_label")
    model = ImageBART(
        vq,
        stage_network,
        functools.partial(GPT, **gpt),
        conditioner,
        num_steps=T,
        redraw_prob=settings[0]["redraw_prob"],
        alpha=[s["alpha"] for s in settings],
        num_codes=int(first.get("dec_num_tokens", last["params"]["vocab_size"])),
        input_vocab_size=input_vocab,
        sample={"top_k": settings[0]["top_k"]} if settings[0]["top_k"] else None,
    )
    for t, ckpt in enumerate(checkpoints, start=1):
        load_stage(model, t, ckpt, use_ema=use_ema)
    return model.eval()
