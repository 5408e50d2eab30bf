"""Every experiment composes; the toy builds from its config with the shipped remap listing; the paper presets build
(on the meta device: no memory) with the official shapes of the cIN / FFHQ stage networks."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from gencore.cli import compose
from imagebart.cli import CONFIGS
from imagebart.lit import ImageBART
from taming.models.vqgan import build_vqmodel

EXPERIMENTS = ["fmnist_class", "fmnist", "tiny", "cin_geometric", "ffhq_geometric"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(experiment):
    cfg = compose(CONFIGS, "train", [f"experiment={experiment}"])
    assert cfg.module._target_ == "imagebart.lit.ImageBART"
    assert len(cfg.module.alpha) == cfg.module.num_steps
    assert cfg.module.stage_network._partial_ and cfg.module.last_stage_network._partial_


def test_the_toy_builds_from_its_config_with_the_shipped_listing():
    from imagebart.first_stage import SHIPPED_REMAPS, resolve_auto_remap

    cfg = compose(CONFIGS, "train", ["experiment=fmnist_class", "run_dir=unused"])
    codes = resolve_auto_remap(cfg)  # the shipped listing of the shipped VQGAN on Fashion-MNIST: no data pass
    assert codes is not None and len(codes) == 44 and any(SHIPPED_REMAPS.glob("*.json"))
    module = instantiate(cfg.module)
    assert isinstance(module, ImageBART) and module.num_codes == 44 and module.grid == (8, 8)
    assert module.transformers[0].encoder.attn_layers.layers[0][1].to_q.weight.shape == (80, 80)
    assert 1.3e6 < sum(p.numel() for p in module.transformers.parameters()) < 1.5e6


@pytest.mark.parametrize(
    ("experiment", "codes", "classes", "stage_keys", "gpt_layers"),
    [("cin_geometric", 973, 1000, 549, 36), ("ffhq_geometric", 548, 0, 367, 26)],
)
def test_paper_presets_build_with_the_official_shapes(experiment, codes, classes, stage_keys, gpt_layers):
    cfg = compose(CONFIGS, "train", [f"experiment={experiment}"])
    m = cfg.module
    vq = build_vqmodel("tiny", ddconfig={"resolution": 256, "ch_mult": [1, 1, 1, 1, 1]}, n_embed=16384)
    vq.quantize.set_remap(list(range(codes)))  # the official remap's size (its 16x16 token grid at f16)
    with torch.device("meta"):
        model = ImageBART(
            vq,
            instantiate(m.stage_network),
            instantiate(m.last_stage_network),
            instantiate(m.conditioner) if m.conditioner else None,
            num_steps=m.num_steps,
            alpha=list(m.alpha),
            num_codes=m.num_codes,
            input_vocab_size=m.input_vocab_size,
        )
    assert model.seq_len == 256 and model.num_codes == codes and model.num_classes == classes
    stage, gpt = model.transformers[0], model.transformers[-1]
    assert len(stage.state_dict()) == stage_keys  # 12 + 13 per encoder layer + 20 per decoder layer + log_scalors
    assert stage.decoder.to_logits.weight.shape == (codes, m.stage_network.dim)
    assert stage.encoder.token_emb.weight.shape == (m.input_vocab_size, m.stage_network.dim)
    assert stage.encoder.pos_emb.emb.weight.shape[0] == 256 + 1 + (1 if classes else 0)
    assert len(gpt.blocks) == gpt_layers and gpt.head.weight.shape == (codes, m.last_stage_network.n_embd)


def test_a_required_key_of_a_preset_is_set_from_the_command_line():
    from gencore.cli import check_overrides

    # module.first_stage.remap is ??? in the paper presets: setting it is not a misspelling
    assert check_overrides(CONFIGS, "train", ["experiment=cin_geometric", "module.first_stage.remap=/x.npy"]) is None
    message = check_overrides(CONFIGS, "train", ["experiment=cin_geometric", "module.first_stage.remapp=/x.npy"])
    assert message is not None and "did you mean module.first_stage.remap?" in message
