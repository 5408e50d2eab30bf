"""MMDiT weights (sd3_flow.convert): diffusers and original-Stability key maps, one-call loading, error messages."""

from __future__ import annotations

import pytest
import torch

from gencore.io import CheckpointKeyError, save_safetensors
from gencore.testing import randomize_parameters
from sd3_flow.convert import (
    ORIGINAL_PREFIX,
    config_from_state,
    detect_layout,
    diffusers_config,
    from_diffusers,
    from_original,
    load_mmdit,
    to_diffusers,
    to_original,
)
from sd3_flow.models.mmdit import MMDIT_PRESETS, MMDiT

TINY = dict(MMDIT_PRESETS["tiny"])
CONFIGS = {
    "tiny_qk_rms": TINY,
    "no_qk_norm": dict(TINY, qk_norm=None, num_layers=3),
    "dual_attention": dict(TINY, num_layers=3, dual_attention_layers=(0, 2)),
}


def _model(cfg: dict, seed: int = 0) -> MMDiT:
    return randomize_parameters(MMDiT(**cfg), seed=seed).eval()


def _run(model, cfg: dict, hw=(12, 10)):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], *hw, generator=gen)
    ctx = torch.randn(2, 5, cfg["joint_attention_dim"], generator=gen)
    pooled = torch.randn(2, cfg["pooled_projection_dim"], generator=gen)
    with torch.no_grad():
        return model(x, ctx, pooled, torch.tensor([800.0, 30.0]))


def _equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_map_is_exact_and_strict(name):
    diffusers = pytest.importorskip("diffusers")
    cfg = CONFIGS[name]
    ours = _model(cfg)
    state = ours.state_dict()
    theirs = diffusers.SD3Transformer2DModel(**diffusers_config(**cfg))
    theirs.load_state_dict(to_diffusers(state, cfg), strict=True)
    _equal_states(from_diffusers(theirs.state_dict(), cfg), state)
    _equal_states(from_diffusers(to_diffusers(state, cfg), cfg), state)


def test_diffusers_config_fills_defaults_and_checks_names():
    cfg = diffusers_config(num_layers=2, num_attention_heads=3, attention_head_dim=16, in_channels=4)
    assert cfg["caption_projection_dim"] == 48 and cfg["out_channels"] == 4 and "gradient_checkpointing" not in cfg
    with pytest.raises(ValueError, match=r"unknown MMDiT argument\(s\) \['depth'\]"):
        diffusers_config(depth=3)
    state = _model(TINY).state_dict()
    state.pop("proj_out.bias")
    with pytest.raises(CheckpointKeyError, match="proj_out.bias"):
        to_diffusers(state, TINY)


# -------------------------------------------------------------------------------------------------- original


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_round_trip_is_exact(name):
    cfg = CONFIGS[name]
    state = _model(cfg).state_dict()
    original = to_original(state, cfg)
    last = cfg["num_layers"] - 1
    assert f"joint_blocks.{last}.context_block.attn.qkv.weight" in original
    assert f"joint_blocks.{last}.context_block.attn.proj.weight" not in original
    assert not any(k.startswith(f"joint_blocks.{last}.context_block.mlp") for k in original)
    assert any(".x_block.attn2.qkv." in k for k in original) == bool(cfg["dual_attention_layers"])
    _equal_states(from_original(original, cfg), state)
    _equal_states(from_original(to_original(state, prefix=ORIGINAL_PREFIX)), state)  # config read off the keys


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_layout_agrees_with_the_official_diffusers_converter(name):
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    cfg = CONFIGS[name]
    state = _model(cfg).state_dict()
    original = to_original(state, cfg, prefix=ORIGINAL_PREFIX)
    converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    _equal_states(converted, state)


def test_swapped_halves_in_final_and_last_context_norm():
    cfg = TINY
    state = _model(cfg).state_dict()
    original = to_original(state, cfg)
    d = 32
    fin, ctx = (
        original["final_layer.adaLN_modulation.1.weight"],
        original["joint_blocks.1.context_block.adaLN_modulation.1.weight"],
    )
    assert torch.equal(fin[:d], state["norm_out.linear.weight"][d:])  # original (shift, scale), ours (scale, shift)
    assert torch.equal(ctx[d:], state["transformer_blocks.1.norm1_context.linear.weight"][:d])
    assert torch.equal(
        original["joint_blocks.0.context_block.adaLN_modulation.1.weight"],
        state["transformer_blocks.0.norm1_context.linear.weight"],
    )
    qkv = original["joint_blocks.0.x_block.attn.qkv.weight"]
    assert torch.equal(qkv[d : 2 * d], state["transformer_blocks.0.attn.to_k.weight"])


def test_from_original_names_unknown_keys():
    original = to_original(_model(TINY).state_dict(), TINY)
    original["joint_blocks.0.x_block.attn.mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match="joint_blocks.0.x_block.attn.mystery.weight"):
        from_original(original, TINY)


# ---------------------------------------------------------------------------------------- one-call loading


def _full_original_checkpoint(state: dict, cfg: dict) -> dict:
    """An ``sd3_medium.safetensors``-like file: the MMDiT under model.diffusion_model. next to other components."""
    out = to_original(state, cfg, prefix=ORIGINAL_PREFIX)
    out["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 16, 3, 3)
    out["text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight"] = torch.randn(77, 8)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_safetensors_loads_in_one_call_with_the_same_outputs(name, tmp_path):
    cfg = CONFIGS[name]
    ours = _model(cfg)
    path = save_safetensors(_full_original_checkpoint(ours.state_dict(), cfg), tmp_path / "sd3_tiny.safetensors")
    assert detect_layout(_full_original_checkpoint(ours.state_dict(), cfg)) == ("original", ORIGINAL_PREFIX)
    # architecture read off the weights (the head size needs qk-norm weights, else the config)
    loaded = load_mmdit(path) if cfg["qk_norm"] else load_mmdit(path, config=cfg)
    assert not loaded.training
    assert loaded.config == ours.config
    assert torch.equal(_run(loaded, cfg), _run(ours, cfg))
    assert torch.equal(_run(load_mmdit(path, config=cfg), cfg), _run(ours, cfg))


def test_lightning_ckpt_in_both_layouts_loads_in_one_call(tmp_path):
    ours = _model(TINY)
    ref = _run(ours, TINY)
    own = {"model." + k: v for k, v in ours.state_dict().items()}
    torch.save(
        {"state_dict": own, "epoch": 3, "global_step": 10, "hyper_parameters": {"lr": 1e-4}}, tmp_path / "a.ckpt"
    )
    assert torch.equal(_run(load_mmdit(tmp_path / "a.ckpt", preset="tiny"), TINY), ref)
    torch.save({"state_dict": _full_original_checkpoint(ours.state_dict(), TINY)}, tmp_path / "b.ckpt")
    assert torch.equal(_run(load_mmdit(tmp_path / "b.ckpt"), TINY), ref)


def test_diffusers_state_dict_loads_in_one_call():
    diffusers = pytest.importorskip("diffusers")
    ours = _model(TINY)
    theirs = diffusers.SD3Transformer2DModel(**diffusers_config(**TINY))
    theirs.load_state_dict(to_diffusers(ours.state_dict(), TINY))
    assert torch.equal(_run(load_mmdit(theirs.state_dict()), TINY), _run(ours, TINY))


def test_missing_key_is_named_in_the_checkpoints_layout(tmp_path):
    state = _model(TINY).state_dict()
    original = _full_original_checkpoint(state, TINY)
    gone = ORIGINAL_PREFIX + "joint_blocks.1.x_block.mlp.fc2.weight"
    original.pop(gone)
    with pytest.raises(CheckpointKeyError, match=gone.replace(".", r"\.")) as err:
        load_mmdit(original, preset="tiny")
    assert err.value.missing == [gone]
    original.pop(ORIGINAL_PREFIX + "joint_blocks.0.context_block.attn.qkv.bias")
    with pytest.raises(CheckpointKeyError, match=r"joint_blocks\.0\.context_block\.attn\.qkv\.bias"):
        load_mmdit(original, preset="tiny")
    bare = dict(state)
    bare.pop("transformer_blocks.0.attn.norm_added_k.weight")
    with pytest.raises(CheckpointKeyError, match=r"transformer_blocks\.0\.attn\.norm_added_k\.weight"):
        load_mmdit(bare, preset="tiny")
    with pytest.raises(CheckpointKeyError, match=r"shape mismatch"):
        load_mmdit(state, preset="tiny", num_layers=2, attention_head_dim=16, num_attention_heads=2)


def test_unexpected_keys_and_ambiguous_prefixes():
    state = _model(TINY).state_dict()
    extra = dict(state, **{"transformer_blocks.0.attn.extra.weight": torch.zeros(2)})
    with pytest.raises(
        CheckpointKeyError, match=r"unexpected key\(s\) \['transformer_blocks\.0\.attn\.extra\.weight'\]"
    ):
        load_mmdit(extra, preset="tiny")
    two = {"model." + k: v for k, v in state.items()} | {"ema." + k: v for k, v in state.items()}
    with pytest.raises(CheckpointKeyError, match="pass prefix="):
        load_mmdit(two, preset="tiny")
    assert torch.equal(_run(load_mmdit(two, prefix="ema.", preset="tiny"), TINY), _run(_model(TINY), TINY))
    with pytest.raises(CheckpointKeyError, match="no MMDiT weights found"):
        load_mmdit({"foo.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown MMDiT preset"):
        load_mmdit(state, preset="sd4")


def test_config_from_state_reads_the_architecture():
    assert config_from_state(_model(TINY).state_dict()) == TINY  # recognised as the preset
    cfg = dict(TINY, qk_norm=None, num_layers=3, dual_attention_layers=(1,), pos_embed_max_size=12)
    cfg.update(num_attention_heads=2, attention_head_dim=64, caption_projection_dim=128)  # no qk-norm: 64-wide heads
    with torch.device("meta"):
        state = MMDiT(**cfg).state_dict()
    assert config_from_state(state) == dict(cfg, sample_size=24)  # sample_size = patch * min(pos_embed_max_size, 64)
    with torch.device("meta"):
        state = MMDiT(**dict(TINY, qk_norm=None)).state_dict()  # 32 wide without qk-norm: head size unknowable
    with pytest.raises(CheckpointKeyError, match="hidden size 32 is not a multiple of the head size 64"):
        config_from_state(state)


def test_position_table_may_be_absent_when_the_config_is_given():
    ours = _model(TINY)
    state = ours.state_dict()
    state.pop("pos_embed.pos_embed")
    assert torch.equal(_run(load_mmdit(state, preset="tiny"), TINY), _run(ours, TINY))
    with pytest.raises(CheckpointKeyError, match="pos_embed.pos_embed"):
        load_mmdit(state)  # without a config the table's scale cannot be known
