"""The MMDiT (sd3_flow.models.mmdit): parity with diffusers' SD3Transformer2DModel, position table, presets and
parameter counts, adaLN-Zero init (run by the constructor), gradients, gradient checkpointing, input validation."""

from __future__ import annotations

import pytest
import torch

from gencore.testing import assert_grads_reach_all_parameters, assert_state_dict_roundtrip, randomize_parameters
from sd3_flow.convert import diffusers_config, to_diffusers
from sd3_flow.models.mmdit import (
    MMDIT_PRESETS,
    JointTransformerBlock,
    MMDiT,
    PatchEmbed,
    depth_config,
    get_2d_sincos_pos_embed,
    mmdit_from_preset,
    timestep_embedding,
)

TINY = dict(MMDIT_PRESETS["tiny"])  # sd3_flow.md "Suggested tests": 82,368 parameters, 75 state-dict keys
PARITY = {
    "tiny_qk_rms": (TINY, (16, 12)),
    "tiny_no_qk_norm": (dict(TINY, qk_norm=None), (12, 16)),
    "dual_attention_first_and_last": (dict(TINY, num_layers=3, dual_attention_layers=(0, 2)), (10, 14)),
    "dual_attention_no_qk_norm": (dict(TINY, dual_attention_layers=(0,), qk_norm=None), (16, 8)),
    "patch1_fmnist_tiny": (MMDIT_PRESETS["fmnist_tiny"], (8, 6)),
    "bench_row_small": (MMDIT_PRESETS["bench"], (16, 24)),
}


def _inputs(cfg: dict, hw: tuple[int, int], batch: int = 2, text_len: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg["in_channels"], *hw, generator=gen)
    ctx = torch.randn(batch, text_len, cfg["joint_attention_dim"], generator=gen)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=gen)
    t = torch.tensor([999.0, 250.0, 3.5, 600.0][:batch])  # sigma * 1000, float
    return x, ctx, pooled, t


def _pair(cfg: dict, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    ours = randomize_parameters(MMDiT(**cfg), seed=seed)
    theirs = diffusers.SD3Transformer2DModel(**diffusers_config(**cfg))
    theirs.load_state_dict(to_diffusers(ours.state_dict(), cfg), strict=True)
    return ours, theirs


def _dead_text_query(cfg: dict) -> tuple[str, ...]:
    """The last block's text queries feed nothing (its text outputs are dropped): no gradient, in diffusers too."""
    last = f"transformer_blocks.{cfg['num_layers'] - 1}.attn"
    return (f"{last}.add_q_proj.", f"{last}.norm_added_q.")


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_diffusers_forward_and_gradients(name):
    cfg, hw = PARITY[name]
    ours, theirs = _pair(cfg)
    x, ctx, pooled, t = _inputs(cfg, hw, batch=1 if name == "bench_row_small" else 2)
    a = ours(x, ctx, pooled, t)
    b = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    assert a.shape == (x.shape[0], cfg["out_channels"], *hw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(5))
    (a * w).sum().backward()
    (b * w).sum().backward()
    grads_ours = {n: p.grad for n, p in ours.named_parameters()}
    dead = _dead_text_query(cfg)
    for n, p in theirs.named_parameters():
        if n.startswith(dead):
            assert grads_ours[n] is None and p.grad.abs().max() == 0, n  # the dead text query, both sides
            continue
        torch.testing.assert_close(grads_ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def test_skip_layers_match_diffusers():
    cfg = dict(TINY, num_layers=3)
    ours, theirs = _pair(cfg)
    x, ctx, pooled, t = _inputs(cfg, (8, 8))
    with torch.no_grad():
        a = ours(x, ctx, pooled, t, skip_layers=[1])
        b = theirs(x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, skip_layers=[1]).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize(("dim", "m", "base"), [(32, 16, 16), (64, 24, 8), (96, 10, 4), (48, 7, 3)])
def test_pos_table_equals_diffusers(dim, m, base):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    ours = get_2d_sincos_pos_embed(dim, m, base_size=base)
    theirs = embeddings.get_2d_sincos_pos_embed(dim, m, base_size=base, output_type="pt").float()
    assert ours.shape == (m * m, dim)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(("h", "w"), [(16, 16), (8, 12), (12, 8), (3, 5), (1, 16), (15, 2)])
def test_pos_embed_centre_crop_equals_diffusers(h, w):
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    patch, m = 2, 16
    ours = PatchEmbed(in_channels=4, embed_dim=32, patch_size=patch, pos_embed_max_size=m, base_size=16)
    theirs = embeddings.PatchEmbed(
        height=32, width=32, patch_size=patch, in_channels=4, embed_dim=32, pos_embed_max_size=m
    )
    assert torch.equal(ours.pos_embed, theirs.pos_embed)
    crop = ours.cropped_pos_embed(h, w)
    assert torch.equal(crop, theirs.cropped_pos_embed(h * patch, w * patch))
    top, left = (m - h) // 2, (m - w) // 2  # the centre slice of the (M, M) grid
    assert torch.equal(crop, ours.pos_embed.view(m, m, -1)[top : top + h, left : left + w].reshape(1, h * w, -1))


def test_pos_table_is_a_persistent_buffer_and_timestep_embedding_is_cos_first():
    m = MMDiT(**TINY)
    assert "pos_embed.pos_embed" in m.state_dict() and "pos_embed.pos_embed" not in dict(m.named_parameters())
    assert m.pos_embed.pos_embed.shape == (1, 16 * 16, 32)
    emb = timestep_embedding(torch.tensor([0.0, 500.0]), 256)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))


# ----------------------------------------------------------------------------------- presets and sizes


@pytest.mark.parametrize(
    ("preset", "params"), [("sd3_medium", 2_028_328_000), ("sd35_medium", 2_243_171_520), ("sd35_large", 8_056_627_520)]
)
def test_published_parameter_counts_on_meta(preset, params):
    with torch.device("meta"):
        model = mmdit_from_preset(preset)
    assert sum(p.numel() for p in model.parameters()) == params


def test_sd3_medium_matches_diffusers_on_meta():
    diffusers = pytest.importorskip("diffusers")
    cfg = MMDIT_PRESETS["sd3_medium"]
    with torch.device("meta"):
        ours = MMDiT(**cfg)
        theirs = diffusers.SD3Transformer2DModel(**diffusers_config(**cfg))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 2_028_328_000
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)  # the same names (registration order differs inside attn)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    assert ours_sd["pos_embed.pos_embed"].shape == (1, 36864, 1536)


def test_depth_family_and_small_presets():
    for d in (2, 15, 24, 38):
        cfg = depth_config(d)
        assert cfg["num_attention_heads"] == d and cfg["attention_head_dim"] == 64 and cfg["num_layers"] == d
        assert cfg["caption_projection_dim"] == 64 * d
    assert depth_config(24) == MMDIT_PRESETS["sd3_medium"]
    assert mmdit_from_preset("depth2").inner_dim == 128
    fm = MMDIT_PRESETS["fmnist_tiny"]
    tokens = (8 // fm["patch_size"]) ** 2  # 16x8x8 toy-VAE latents
    assert tokens >= 16 and fm["joint_attention_dim"] == fm["pooled_projection_dim"] == 384
    assert fm["num_attention_heads"] * fm["attention_head_dim"] == 128 and fm["num_layers"] == 4
    bench = MMDIT_PRESETS["bench"]  # BENCHMARKS.md: caption_projection_dim 256 = 4 heads x 64
    assert bench["caption_projection_dim"] == bench["num_attention_heads"] * bench["attention_head_dim"] == 256
    tiny = MMDiT(**TINY)
    assert sum(p.numel() for p in tiny.parameters()) == 82_368 and len(tiny.state_dict()) == 75
    with pytest.raises(ValueError, match="unknown MMDiT preset 'nope'"):
        mmdit_from_preset("nope")


def test_fmnist_tiny_forward_shape():
    model = mmdit_from_preset("fmnist_tiny").init_weights()
    x, ctx, pooled, t = _inputs(MMDIT_PRESETS["fmnist_tiny"], (8, 8), text_len=5)
    assert model(x, ctx, pooled, t).shape == (2, 16, 8, 8)


# ------------------------------------------------------------------------------------- init and gradients


def test_adaln_zero_init_zero_output_and_identity_blocks():
    cfg = dict(TINY, num_layers=3, dual_attention_layers=(1,))
    model = MMDiT(**cfg)  # the constructor initialises: nothing to forget before training from scratch
    x, ctx, pooled, t = _inputs(cfg, (16, 12))
    with torch.no_grad():
        assert torch.equal(model(x, ctx, pooled, t), torch.zeros_like(x))
        gen = torch.Generator().manual_seed(3)
        h = torch.randn(2, 48, 32, generator=gen)
        c = torch.randn(2, 7, 32, generator=gen)
        temb = torch.randn(2, 32, generator=gen)
        for i, block in enumerate(model.transformer_blocks):
            h2, c2 = block(h, c, temb)
            assert torch.equal(h2, h), i
            assert (c2 is None) if i == cfg["num_layers"] - 1 else torch.equal(c2, c), i
    # the rest is not degenerate: every Linear outside the modulations / proj_out is non-zero
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() == 2 and "norm" not in name and not name.startswith("proj_out"):
            assert p.abs().sum() > 0, name


def test_gradients_reach_all_parameters_after_randomisation():
    cfg = dict(TINY, num_layers=3, dual_attention_layers=(0,))
    model = randomize_parameters(MMDiT(**cfg), seed=0)
    x, ctx, pooled, t = _inputs(cfg, (8, 12))
    loss = (model(x, ctx, pooled, t) ** 2).mean()
    assert_grads_reach_all_parameters(model, loss, allow=_dead_text_query(cfg))


def test_gradient_checkpointing_same_outputs_and_grads():
    cfg = dict(TINY, num_layers=3, dual_attention_layers=(1,))
    model = randomize_parameters(MMDiT(**cfg), seed=0)
    x, ctx, pooled, t = _inputs(cfg, (8, 10))
    results = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad(set_to_none=True)
        out = model(x, ctx, pooled, t)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert ga.keys() == gb.keys() and len(ga) == len(list(model.parameters())) - 3  # dead text query
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-7, rtol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert MMDiT(**cfg, gradient_checkpointing=True).gradient_checkpointing


def test_state_dict_roundtrip(tmp_path):
    model = randomize_parameters(MMDiT(**TINY), seed=2)
    assert_state_dict_roundtrip(model, lambda: MMDiT(**TINY), _inputs(TINY, (8, 8)), tmp_path)


def test_scalar_timestep_broadcasts():
    model = randomize_parameters(MMDiT(**TINY), seed=0).eval()
    x, ctx, pooled, _ = _inputs(TINY, (8, 8))
    with torch.no_grad():
        assert torch.equal(model(x, ctx, pooled, torch.tensor(500.0)), model(x, ctx, pooled, torch.full((2,), 500.0)))


# ----------------------------------------------------------------------------------------------- validation


def test_bad_inputs_raise_value_errors_naming_values():
    model = MMDiT(**TINY)
    x, ctx, pooled, t = _inputs(TINY, (8, 8))
    with pytest.raises(ValueError, match=r"latent size 9x8 is not divisible by the patch size 2"):
        model(torch.randn(2, 16, 9, 8), ctx, pooled, t)
    with pytest.raises(ValueError, match=r"34x8 gives a 17x4 token grid, larger than the position table.*=16"):
        model(torch.randn(2, 16, 34, 8), ctx, pooled, t)
    with pytest.raises(ValueError, match=r"latents must be \(B, 16, H, W\), got shape \(2, 4, 8, 8\)"):
        model(torch.randn(2, 4, 8, 8), ctx, pooled, t)
    with pytest.raises(ValueError, match=r"joint_attention_dim=64\), got shape \(2, 7, 65\)"):
        model(x, torch.randn(2, 7, 65), pooled, t)
    with pytest.raises(ValueError, match=r"pooled_projection_dim=48\), got shape \(2, 40\)"):
        model(x, ctx, torch.randn(2, 40), t)
    with pytest.raises(ValueError, match=r"timestep must be a scalar or have shape \(2,\), got \(3,\)"):
        model(x, ctx, pooled, torch.ones(3))
    with pytest.raises(ValueError, match=r"larger than the position table"):
        model.pos_embed.cropped_pos_embed(17, 3)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"caption_projection_dim \(48\) must equal .* \(4 \* 8 = 32\)"):
        MMDiT(**dict(TINY, caption_projection_dim=48))
    with pytest.raises(ValueError, match="qk_norm must be None or 'rms_norm', got 'layer_norm'"):
        MMDiT(**dict(TINY, qk_norm="layer_norm"))
    with pytest.raises(ValueError, match=r"dual_attention_layers \[2\] outside the 2 layers"):
        MMDiT(**dict(TINY, dual_attention_layers=(0, 2)))
    with pytest.raises(ValueError, match="num_layers must be a positive integer, got 0"):
        MMDiT(**dict(TINY, num_layers=0))
    assert MMDiT(**dict(TINY, caption_projection_dim=None)).context_embedder.out_features == 32


def test_joint_block_pre_only_has_no_text_output_weights():
    block = JointTransformerBlock(dim=32, num_heads=4, head_dim=8, context_pre_only=True, qk_norm="rms_norm")
    names = set(dict(block.named_parameters()))
    assert "attn.to_add_out.weight" not in names and not any(n.startswith("ff_context") for n in names)
    assert block.norm1_context.linear.weight.shape == (64, 32)  # (scale, shift)
    assert "attn.add_q_proj.weight" in names and "attn.norm_added_q.weight" in names  # kept for checkpoints


def test_block_features_are_the_forward_pass_tokens_on_their_grid():
    from sd3_flow.models.mmdit import mmdit_from_preset

    torch.manual_seed(0)
    m = randomize_parameters(mmdit_from_preset("tiny")).eval()
    x = torch.randn(2, 16, 8, 12, requires_grad=True)  # a 4 x 6 token grid: not square
    ctx, pooled, t = torch.randn(2, 5, 64), torch.randn(2, 48), torch.tensor([500.0, 900.0])
    seen = []
    hook = m.transformer_blocks[0].register_forward_hook(lambda mod, args, out: seen.append(out[0]))
    feats = m.block_features(x, ctx, pooled, t, [0, 1])
    hook.remove()
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 6), (2, 32, 4, 6)]
    tokens = seen[0]  # (B, N, D), row-major over the grid
    assert torch.equal(feats[0][:, :, 1, 2], tokens[:, 1 * 6 + 2])
    feats[1].sum().backward()  # gradients reach the input (the parameters may be frozen)
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="layers must be indices in 0..1"):
        m.block_features(x, ctx, pooled, t, [2])
