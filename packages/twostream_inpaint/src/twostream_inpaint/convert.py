"""Official guided-inpainting checkpoints (runwayml/guided-inpainting) -> a :class:`~twostream_inpaint.lit.
GuidedInpainting`, one call.

A checkpoint of the official ``DefaultInpaintingTrainingModule`` is a Lightning 1.4 pickle whose ``state_dict`` holds,
under the attribute names this package keeps:

- ``generator.*``: ``GIResNetGenerator`` (``model.<i>.…`` in the official order, ``deformable_writes.<i>.{q,v}``);
- ``discriminator.*``: LaMa's ``NLayerDiscriminator`` (``model0`` … ``model5``);
- ``flow.raft.*``: the frozen RAFT the module was trained with, in the princeton-vl naming (``fnet``, ``cnet``,
  ``update_block``): loaded into torchvision's RAFT (:func:`twostream_inpaint.flow.load_raft_weights`), so the
  checkpoint needs no separate ``raft-things.pth``;
- training-only parts, skipped: ``loss_resnet_pl.*`` (the ADE20k encoder), ``val_evaluator_*`` / ``test_evaluator_*``
  (LPIPS / Inception weights of LaMa's evaluators), ``generator_average.*``.

The generator / discriminator settings come from the official config (``configs/ours.yaml`` or a run's
``project.yaml``: ``model.params.config.{generator,discriminator}``) or, when no config is given, from the
checkpoint's ``hyper_parameters`` (the official module saves its ``config`` there). The pickle is read with gencore's
restricted unpickler (tensors and Lightning / OmegaConf metadata only; anything that would run code is refused).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from gencore.io import CheckpointError, load_checkpoint, load_state_dict, plain_config

__all__ = ["TRAINING_ONLY", "load_official", "official_modules"]

TRAINING_ONLY = ("loss_resnet_pl.", "val_evaluator", "test_evaluator", "generator_average.", "loss_pl.")
GENERATOR_KEYS = (
    "input_nc",
    "output_nc",
    "ngf",
    "n_downsampling",
    "n_blocks",
    "max_features",
    "num_latents_sqrt",
    "num_groups",
    "pre_lama",
    "post_lama",
    "read_write_heads",
    "block_type",
    "num_heads",
    "is_deformable",
    "is_crossattending",
    "n_cross",
    "add_out_act",
    "resnet_conv_kwargs",
    "padding_type",
)


def official_modules(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(generator kwargs, discriminator kwargs) of an official config: a whole ``ours.yaml`` (``model.params.config``),
    its ``config`` node, or the ``hyper_parameters`` an official checkpoint stores."""
    cfg = plain_config(config)
    node = cfg
    for key in ("model", "params", "config"):
        if isinstance(node, Mapping) and key in node and isinstance(node[key], Mapping):
            node = node[key]
    gen, disc = node.get("generator"), node.get("discriminator") if isinstance(node, Mapping) else None
    if not isinstance(gen, Mapping) or not isinstance(disc, Mapping):
        raise CheckpointError(
            "not a guided-inpainting config: no model.params.config.generator / discriminator (give the official "
            "configs/ours.yaml or the run's project.yaml)"
        )
    kind = str(gen.get("kind", "gi.modules.gi.lama_guided.GIResNetGenerator"))
    if not kind.endswith("GIResNetGenerator"):
        raise CheckpointError(
            f"unsupported generator kind {kind!r}: only GIResNetGenerator (configs/ours*.yaml) is built here; the "
            "official lama.yaml / transformer.yaml point to modules that do not exist in the official repository"
        )
    unknown = sorted(set(gen) - set(GENERATOR_KEYS) - {"kind"})
    if unknown:
        raise CheckpointError(f"unsupported generator settings {unknown} in the official config")
    dkind = str(disc.get("kind", "pix2pixhd_nlayer"))
    if dkind != "pix2pixhd_nlayer":
        raise CheckpointError(f"unsupported discriminator kind {dkind!r} (the official configs use pix2pixhd_nlayer)")
    g = {k: v for k, v in gen.items() if k != "kind"}
    d = {k: disc[k] for k in ("input_nc", "ndf", "n_layers") if k in disc}
    return g, d


def load_official(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    config: Any = None,
    *,
    flow: Any = "checkpoint",
    image_size: int | None = None,
) -> Any:
    """The official checkpoint as a :class:`GuidedInpainting` (eval mode), every generator and discriminator tensor
    loaded strictly (a :class:`gencore.io.CheckpointKeyError` names what does not match).

    ``flow``: ``"checkpoint"`` (the RAFT weights stored in the checkpoint, ``flow.raft.*``), a
    :class:`~twostream_inpaint.flow.FlowEstimator`, or a :func:`~twostream_inpaint.flow.build_flow` kind (``"dis"``,
    ``"zero"``). ``image_size``: the frame size the tasks default to (the paper: 256)."""
    from twostream_inpaint.flow import FlowEstimator, RAFTFlow, build_flow
    from twostream_inpaint.lit import GuidedInpainting
    from twostream_inpaint.models import GIResNetGenerator, NLayerDiscriminator

    ckpt = checkpoint if isinstance(checkpoint, Mapping) else load_checkpoint(checkpoint)
    source = "state dict" if isinstance(checkpoint, Mapping) else os.fspath(checkpoint)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(f"{source}: not a Lightning checkpoint (no state_dict)")
    state = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(TRAINING_ONLY)}
    if config is None:
        config = ckpt.get("hyper_parameters")
        if not config:
            raise CheckpointError(
                f"{source} stores no hyper_parameters: pass the official config (configs/ours.yaml of "
                "runwayml/guided-inpainting); a checkpoint of this package loads with inpaint-* checkpoint=<run> or "
                "twostream_inpaint.tasks.load_model"
            )
    elif isinstance(config, (str, os.PathLike)):
        from omegaconf import OmegaConf

        config = OmegaConf.load(config)
    gen_kwargs, disc_kwargs = official_modules(config)
    generator = GIResNetGenerator(**gen_kwargs)
    discriminator = NLayerDiscriminator(**disc_kwargs)
    estimator = None
    if generator.is_deformable:
        if isinstance(flow, FlowEstimator):
            estimator = flow
        elif flow == "checkpoint":
            raft = {k.removeprefix("flow.raft."): v for k, v in state.items() if k.startswith("flow.raft.")}
            if not raft:
                raise CheckpointError(
                    f"{source} holds no flow.raft.* weights: pass flow=RAFTFlow(weights=<raft-things.pth>) or "
                    "flow='dis'"
                )
            estimator = RAFTFlow(weights=raft)
        else:
            estimator = build_flow(str(flow))
    module = GuidedInpainting(
        generator, discriminator, estimator, perceptual="none", perceptual_weight=0.0, image_size=image_size
    )
    load_state_dict(module.generator, state, prefix="generator.", source=source)
    load_state_dict(module.discriminator, state, prefix="discriminator.", source=source)
    others = sorted(k for k in state if not k.startswith(("generator.", "discriminator.", "flow.")))
    if others:
        raise CheckpointError(f"{source}: unexpected entries {others[:8]} (not an official guided-inpainting module?)")
    return module.eval()
