"""The LDM UNet (ldm.models.unet): official structure and names, head arithmetic, embedding, validation, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from gencore.testing import assert_grads_reach_all_parameters, assert_state_dict_roundtrip, randomize_parameters
from ldm.models.unet import (
    UNET_PRESETS,
    AttentionBlock,
    CrossAttention,
    SpatialTransformer,
    UNetModel,
    attention_heads,
    timestep_embedding,
    unet_from_preset,
)

# ldm.md "Suggested tests": the tiny UNet (286 state-dict keys in the official openaimodel.UNetModel)
TINY = dict(UNET_PRESETS["tiny"])
TINY_ATTN_BLOCK = dict(TINY, use_spatial_transformer=False, context_dim=None)


def _inputs(batch: int = 2, size: int = 8, ctx_dim: int = 16):
    torch.manual_seed(0)
    x = torch.randn(batch, 4, size, size)
    t = torch.tensor([10, 500][:batch])
    ctx = torch.randn(batch, 5, ctx_dim)
    return x, t, ctx


def _random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return randomize_parameters(model, seed=seed).eval()


# --------------------------------------------------------------------------------------------- official structure


def test_tiny_config_has_the_official_286_keys():
    sd = UNetModel(**TINY).state_dict()
    assert len(sd) == 286
    for key in (
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.0.out_layers.3.weight",
        "input_blocks.1.1.norm.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias",
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
        "input_blocks.1.1.transformer_blocks.0.norm3.bias",
        "input_blocks.2.0.op.weight",
        "input_blocks.3.0.skip_connection.weight",
        "middle_block.0.in_layers.2.weight",
        "middle_block.1.proj_out.weight",
        "middle_block.2.out_layers.0.bias",
        "output_blocks.1.2.conv.weight",
        "output_blocks.3.0.skip_connection.weight",
        "out.0.weight",
        "out.2.bias",
    ):
        assert key in sd, key
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in sd)  # no qkv bias
    assert sd["input_blocks.1.1.proj_in.weight"].shape == (32, 32, 1, 1)  # Conv2d 1x1
    assert sd["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (256, 32)  # GEGLU: 2 × 4d
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 16)  # context_dim 16


def test_attention_block_variant_keys_and_shapes():
    model = UNetModel(**TINY_ATTN_BLOCK)
    sd = model.state_dict()
    assert len(sd) == 146  # official module with use_spatial_transformer=False
    assert sd["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)  # Conv1d C -> 3C
    assert sd["middle_block.1.proj_out.weight"].shape == (64, 64, 1)
    x, t, _ = _inputs()
    assert model(x, t).shape == (2, 4, 8, 8)


def test_zero_initialised_layers_make_the_default_output_zero():
    model = UNetModel(**TINY)
    for name in ("out.2.weight", "input_blocks.1.0.out_layers.3.weight", "middle_block.1.proj_out.weight"):
        assert model.state_dict()[name].abs().sum() == 0, name
    assert UNetModel(**TINY_ATTN_BLOCK).state_dict()["middle_block.1.proj_out.weight"].abs().sum() == 0
    x, t, ctx = _inputs()
    assert torch.equal(model(x, t, ctx), torch.zeros(2, 4, 8, 8))


def test_shapes_including_non_square_and_scalar_timestep():
    model = _random(UNetModel(**TINY))
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert model(x, t, ctx).shape == (2, 4, 8, 8)
        assert model(torch.randn(2, 4, 8, 12), t, ctx).shape == (2, 4, 8, 12)
        out_scalar = model(x, torch.tensor(10), ctx)
        out_vector = model(x, torch.tensor([10, 10]), ctx)
    torch.testing.assert_close(out_scalar, out_vector)


def test_presets_build_with_the_published_sizes():
    with torch.device("meta"):
        sd_v1 = unet_from_preset("sd_v1")
        assert sum(p.numel() for p in sd_v1.parameters()) == 859_520_964  # the SD v1 UNet
        assert len(sd_v1.state_dict()) == 686
        for name in UNET_PRESETS:
            unet_from_preset(name)
    with pytest.raises(ValueError, match="unknown UNet preset"):
        unet_from_preset("nope")


def test_fmnist_presets_are_comparable_in_size():
    sizes = {n: sum(p.numel() for p in unet_from_preset(n).parameters()) for n in ("fmnist_tiny", "fmnist_pixel")}
    assert 0.8 < sizes["fmnist_pixel"] / sizes["fmnist_tiny"] < 1.25
    model = _random(unet_from_preset("fmnist_pixel"))
    with torch.no_grad():
        out = model(torch.randn(1, 1, 32, 32), torch.tensor([3]), torch.randn(1, 7, 384))
    assert out.shape == (1, 1, 32, 32)


# ------------------------------------------------------------------------------------------------ head arithmetic


@pytest.mark.parametrize(
    "ch,num_heads,nhc,legacy,st,expected",
    [
        (320, 8, -1, False, True, (8, 40)),  # SD v1
        (1280, 8, -1, False, True, (8, 160)),
        (256, -1, 32, True, True, (8, 32)),  # cin-ldm-vq-f8
        (960, 1, -1, True, True, (1, 960)),  # cin256-v2
        (672, -1, 32, True, False, (21, 32)),  # celebahq: AttentionBlock(num_head_channels=32)
        (384, 8, -1, True, False, (8, -1)),  # churches, legacy AttentionBlock: num_heads passed through
        (384, 8, -1, False, False, (8, 48)),
        (32, 3, -1, False, True, (3, 10)),  # inner width 30 != 32, as in the official code
    ],
)
def test_official_head_arithmetic(ch, num_heads, nhc, legacy, st, expected):
    got = attention_heads(ch, num_heads=num_heads, num_head_channels=nhc, legacy=legacy, use_spatial_transformer=st)
    assert got == expected


def test_head_arithmetic_reaches_the_modules():
    with torch.device("meta"):
        sd = unet_from_preset("sd_v1")
        cin = unet_from_preset("cin256_v2")
        celeba = unet_from_preset("celebahq_vq4")
        churches = unet_from_preset("lsun_churches_kl8", num_heads_upsample=4)
    attn = sd.input_blocks[1][1].transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == (8, 40)
    attn = sd.middle_block[1].transformer_blocks[0].attn2
    assert (attn.heads, attn.dim_head) == (8, 160)
    attn = cin.middle_block[1].transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == (1, 960)
    assert celeba.middle_block[1].num_heads == 224 * 4 // 32
    # legacy AttentionBlock with num_head_channels=-1: num_heads in the encoder, num_heads_upsample in the decoder
    assert churches.input_blocks[1][1].num_heads == 8
    assert churches.output_blocks[3][1].num_heads == 4  # level 3 (ds 8) of 5
    assert churches.middle_block[1].num_heads == 8


def test_spatial_transformer_inner_width_follows_heads_times_dim():
    block = SpatialTransformer(32, 3, 10, context_dim=16)
    assert block.proj_in.weight.shape == (30, 32, 1, 1) and block.proj_out.weight.shape == (32, 30, 1, 1)
    linear = SpatialTransformer(64, 2, 32, context_dim=16, use_linear=True)
    assert isinstance(linear.proj_in, torch.nn.Linear) and linear.proj_in.weight.shape == (64, 64)
    randomize_parameters(linear)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        assert linear(x, torch.randn(2, 3, 16)).shape == x.shape


# ------------------------------------------------------------------------------------------ embedding, attention


@pytest.mark.parametrize("dim", [32, 33, 320])
def test_timestep_embedding_is_cos_then_sin_as_diffusers_flip_sin_to_cos(dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 10, 500, 999])
    ours = timestep_embedding(t, dim)
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours[:, 0], torch.cos(t.float()))  # frequency 1 first, cos half first
    torch.testing.assert_close(ours[:, dim // 2], torch.sin(t.float()))
    half = dim // 2
    torch.testing.assert_close(
        ours[3, half - 1], torch.cos(torch.tensor(500.0 * math.exp(-math.log(1e4) * (half - 1) / half)))
    )


def _legacy_qkv_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """openaimodel.QKVAttentionLegacy, written out: split heads first, q and k each scaled by ch^-1/4."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def _new_qkv_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """openaimodel.QKVAttention: split q, k, v first, then heads."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum(
        "bct,bcs->bts", (q * scale).view(bs * heads, ch, length), (k * scale).view(bs * heads, ch, length)
    )
    weight = torch.softmax(weight, dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v.reshape(bs * heads, ch, length)).reshape(bs, -1, length)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_the_official_qkv_split(new_order):
    block = randomize_parameters(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order), seed=3)
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        flat = x.reshape(2, 64, 16)
        qkv = block.qkv(block.norm(flat))
        ref_attn = (_new_qkv_attention if new_order else _legacy_qkv_attention)(qkv, 4)
        ref = (flat + block.proj_out(ref_attn)).reshape(2, 64, 4, 4)
        torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_the_official_formula():
    attn = randomize_parameters(CrossAttention(32, context_dim=16, heads=4, dim_head=8), seed=5)
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 3, 16)
    with torch.no_grad():
        q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = (z.reshape(2, -1, 4, 8).permute(0, 2, 1, 3).reshape(8, -1, 8) for z in (q, k, v))  # (b h) n d
        w = torch.softmax(torch.einsum("bid,bjd->bij", q, k) * 8**-0.5, dim=-1)
        out = torch.einsum("bij,bjd->bid", w, v).reshape(2, 4, 10, 8).permute(0, 2, 1, 3).reshape(2, 10, 32)
        torch.testing.assert_close(attn(x, ctx), attn.to_out(out), atol=1e-5, rtol=1e-5)
        self_attn = CrossAttention(32, heads=4, dim_head=8)
        assert self_attn(x).shape == x.shape  # context None -> self-attention


# ------------------------------------------------------------------------------------------------------ variants


def test_class_conditional_scale_shift_updown_variant():
    cfg = dict(TINY_ATTN_BLOCK, num_classes=3, use_scale_shift_norm=True, resblock_updown=True)
    model = _random(UNetModel(**cfg))
    sd = model.state_dict()
    assert sd["label_emb.weight"].shape == (3, 128)
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (64, 128)  # 2C for FiLM
    assert "input_blocks.2.0.in_layers.2.weight" in sd  # ResBlock(down=True) instead of Downsample.op
    x, t, _ = _inputs()
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([0, 1]))
        b = model(x, t, y=torch.tensor([2, 1]))
    assert a.shape == (2, 4, 8, 8)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


# --------------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors():
    model = UNetModel(**TINY)
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match=r"7x8.*factor 2"):
        model(torch.randn(2, 4, 7, 8), t, ctx)
    with pytest.raises(ValueError, match=r"context last dim 17 != context_dim 16"):
        model(x, t, torch.randn(2, 5, 17))
    with pytest.raises(ValueError, match="pass context"):
        model(x, t)
    with pytest.raises(ValueError, match="without num_classes"):
        model(x, t, ctx, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="timesteps"):
        model(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        model(torch.randn(2, 3, 8, 8), t, ctx)
    with pytest.raises(ValueError, match="no cross-attention"):
        UNetModel(**TINY_ATTN_BLOCK)(x, t, ctx)
    with pytest.raises(ValueError, match="class-conditional"):
        UNetModel(**dict(TINY_ATTN_BLOCK, num_classes=3))(x, t)


@pytest.mark.parametrize(
    "override,match",
    [
        (dict(n_embed=16), "n_embed=16"),
        (dict(dims=3), "dims=3"),
        (dict(context_dim=None), "needs context_dim"),
        (dict(use_spatial_transformer=False), "needs use_spatial_transformer"),
        (dict(num_heads=-1), "num_heads or num_head_channels"),
        (dict(model_channels=48), "multiple of 32"),
        (dict(use_fp16=True), "use_fp16"),
        (dict(num_head_channels=128), "num_head_channels 128"),
    ],
)
def test_bad_configs_raise_clear_errors(override, match):
    with pytest.raises(ValueError, match=match):
        UNetModel(**{**TINY, **override})


# ------------------------------------------------------------------------------------------- gradients, weights


@pytest.mark.parametrize("cfg", [TINY, dict(TINY_ATTN_BLOCK, num_classes=3)], ids=["spatial_transformer", "attn_block"])
def test_gradients_reach_all_parameters(cfg):
    model = _random(UNetModel(**cfg)).train()
    x, t, ctx = _inputs()
    kwargs = {"context": ctx} if cfg.get("context_dim") else {"y": torch.tensor([0, 2])}
    assert_grads_reach_all_parameters(model, model(x, t, **kwargs).square().mean())


@pytest.mark.parametrize("cfg", [TINY, TINY_ATTN_BLOCK], ids=["spatial_transformer", "attn_block"])
def test_use_checkpoint_gives_the_same_outputs_and_grads(cfg):
    plain = _random(UNetModel(**cfg)).train()
    ckpt = UNetModel(**{**cfg, "use_checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = _inputs()
    context = ctx if cfg.get("context_dim") else None
    outs = []
    for model in (plain, ckpt):
        xi = x.clone().requires_grad_()
        out = model(xi, t, context)
        out.square().mean().backward()
        outs.append((out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=0, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-7, rtol=1e-6)
    for name, grad in outs[0][2].items():
        torch.testing.assert_close(grad, outs[1][2][name], atol=1e-7, rtol=1e-6, msg=name)


def test_state_dict_roundtrip_is_exact(tmp_path):
    model = _random(UNetModel(**TINY))
    x, t, ctx = _inputs()
    assert_state_dict_roundtrip(model, lambda: UNetModel(**TINY), (x, t, ctx), tmp_path)


def test_dropout_is_active_in_training_only():
    model = _random(UNetModel(**{**TINY, "dropout": 0.5}))
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, ctx), model(x, t, ctx))
        model.train()
        assert not torch.equal(model(x, t, ctx), model(x, t, ctx))
