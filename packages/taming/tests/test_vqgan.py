"""VQGAN networks of taming: blocks, Encoder / Decoder, VQModel, GumbelVQ, presets (tiny CPU configs)."""

from __future__ import annotations

import pytest
import torch

from gencore.attention import attention_backend
from gencore.testing import assert_grads_reach_all_parameters, assert_state_dict_roundtrip, randomize_parameters
from taming.models.quantize import LambdaWarmUpCosineScheduler
from taming.models.vqgan import (
    VQGAN_PRESETS,
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    GumbelVQ,
    VQModel,
    build_vqmodel,
)

# taming.md "Suggested tests": the VQ parity configuration (183 state-dict keys in the official VQModel)
PARITY_DD = dict(
    double_z=False, z_channels=16, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
    num_res_blocks=1, attn_resolutions=[8], dropout=0.0,
)  # fmt: skip


def _parity_model(**kw) -> VQModel:
    torch.manual_seed(0)
    return VQModel(ddconfig=PARITY_DD, n_embed=64, embed_dim=16, **kw)


def _tiny(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return randomize_parameters(build_vqmodel("tiny"), seed=seed)


# ------------------------------------------------------------------------------------------------ key layout


def test_parity_config_has_the_official_183_keys():
    sd = _parity_model().state_dict()
    assert len(sd) == 183
    # encoder 72 = conv_in 2 + level0 (res 8 + down 2) + level1 (8 + 2) + level2 (res 8 + nin 2 + attn 10)
    #            + mid 26 + norm_out/conv_out 4; decoder 106; quantize 1 + quant_conv 2 + post_quant_conv 2
    assert sum(k.startswith("encoder.") for k in sd) == 72
    assert sum(k.startswith("decoder.") for k in sd) == 106
    for key in (
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.2.block.0.nin_shortcut.weight",
        "encoder.down.2.attn.0.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "decoder.up.2.attn.1.k.weight",  # lowest resolution level carries the attention (8x8)
        "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.norm_out.weight",
        "quantize.embedding.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ):
        assert key in sd, key
    assert "decoder.up.0.upsample.conv.weight" not in sd  # up[0] = full resolution, no upsample
    assert not any("temb_proj" in k for k in sd)
    assert sd["encoder.down.2.attn.0.q.weight"].shape == (64, 64, 1, 1)


def test_normalize_eps_and_groups():
    norm = _parity_model().encoder.norm_out
    assert norm.num_groups == 32 and norm.eps == 1e-6 and norm.affine


# ---------------------------------------------------------------------------------------------------- blocks


def test_attnblock_matches_the_official_bmm_formula():
    torch.manual_seed(0)
    blk = randomize_parameters(AttnBlock(32), std=0.2)
    x = torch.randn(2, 32, 4, 5)
    h = blk.norm(x)
    q, k, v = blk.q(h).flatten(2), blk.k(h).flatten(2), blk.v(h).flatten(2)  # (B, C, hw)
    w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * 32**-0.5, dim=2)  # (B, hw_q, hw_k)
    ref = x + blk.proj_out(torch.bmm(v, w.transpose(1, 2)).view_as(x))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)
        with attention_backend("math"):
            torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


def test_downsample_pads_right_bottom():
    down = Downsample(32, with_conv=True)
    assert down(torch.randn(1, 32, 8, 6)).shape == (1, 32, 4, 3)
    pool = Downsample(32, with_conv=False)
    x = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(pool(x), torch.nn.functional.avg_pool2d(x, 2))
    assert not list(pool.parameters())


@pytest.mark.parametrize("ch_mult,f", [((1, 1, 2), 4), ((1, 1, 2, 2), 8), ((1, 1, 1, 2, 2), 16)])
def test_encoder_decoder_shapes(ch_mult, f):
    dd = dict(PARITY_DD, ch_mult=ch_mult, attn_resolutions=[], resolution=32)
    enc, dec = Encoder(**dd), Decoder(**dd)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        z = enc(x)
        assert z.shape == (1, 16, 32 // f, 48 // f)
        assert dec(z).shape == (1, 3, 32, 48)
    assert dec.z_shape == (1, 16, 32 // f, 32 // f)
    assert Encoder(**dict(dd, double_z=True)).conv_out.out_channels == 32


def test_decoder_options_and_validation():
    dec = Decoder(**PARITY_DD, give_pre_end=True)
    with torch.no_grad():
        assert dec(torch.randn(1, 16, 8, 8)).shape == (1, 32, 32, 32)
        out = Decoder(**PARITY_DD, tanh_out=True)(torch.randn(1, 16, 8, 8) * 100)
    assert out.abs().max() <= 1
    with pytest.raises(ValueError, match="linear"):
        Encoder(**PARITY_DD, attn_type="linear")
    with pytest.raises(ValueError, match="divisible by 32, got 48"):
        Encoder(**dict(PARITY_DD, ch=48))
    with pytest.raises(ValueError, match=r"\(1, 5, 8, 8\)"):
        dec(torch.randn(1, 5, 8, 8))


def test_attn_type_none_has_no_attention_parameters():
    m = VQModel(ddconfig=dict(PARITY_DD, attn_type="none"), n_embed=64, embed_dim=16)
    sd = m.state_dict()
    assert not any(".attn" in k for k in sd)
    assert len(sd) == 183 - 2 * 10 - 3 * 10  # mid attentions (2) and level attentions (1 + 2) removed
    assert isinstance(m.encoder.mid.attn_1, torch.nn.Identity)
    with torch.no_grad():
        dec, _ = m(torch.randn(1, 3, 16, 16))
    assert dec.shape == (1, 3, 16, 16)


# ---------------------------------------------------------------------------------------------------- VQModel


def test_vqmodel_interface():
    m = _tiny().eval()
    x = torch.randn(2, 1, 16, 16)
    assert m.downsample_factor == 2 and m.n_embed == 64 and m.vocab_size == 64
    assert m.latent_shape(16, 16) == (16, 8, 8)
    assert m.get_last_layer() is m.decoder.conv_out.weight
    with torch.no_grad():
        quant, emb_loss, (perplexity, _, idx) = m.encode(x)
        assert quant.shape == (2, 16, 8, 8) and emb_loss.dim() == 0
        assert idx.shape == (2 * 8 * 8,) and 1 <= perplexity.item() <= 64
        codes = m.encode_to_indices(x)
        assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
        assert torch.equal(codes.flatten(), idx)
        dec, loss = m(x)
        torch.testing.assert_close(dec, m.decode(quant))
        torch.testing.assert_close(m.decode_code(codes), dec, atol=1e-5, rtol=1e-5)
    assert loss.item() == pytest.approx(emb_loss.item())


def test_input_validation_names_sizes():
    m = _tiny()
    with pytest.raises(ValueError, match=r"15x16.*factor 2"):
        m.encode(torch.randn(1, 1, 15, 16))
    with pytest.raises(ValueError, match="expected 1 image channels, got 3"):
        m.encode(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        m.encode(torch.randn(1, 16, 16))
    with pytest.raises(ValueError, match=r"ids \[64, 99\].*codebook size 64"):
        m.decode_code(torch.tensor([[[0, 64], [99, 1]]]))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        m.decode_code(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="not a positive multiple"):
        m.latent_shape(15, 16)
    with pytest.raises(ValueError, match="double_z=False"):
        VQModel(ddconfig=dict(PARITY_DD, double_z=True), n_embed=8, embed_dim=16)


def test_grads_reach_all_parameters():
    m = _parity_model()
    randomize_parameters(m, seed=3)
    dec, qloss = m(torch.randn(2, 3, 16, 16))
    # every parameter is used: the codebook through qloss, the encoder through the straight-through estimator
    assert_grads_reach_all_parameters(m, dec.square().mean() + qloss)


def test_safetensors_round_trip(tmp_path):
    x = torch.randn(1, 1, 16, 16)
    assert_state_dict_roundtrip(_tiny(seed=1), lambda: build_vqmodel("tiny"), (x,), tmp_path)


def test_sane_index_shape_and_remap():
    m = build_vqmodel("tiny", sane_index_shape=True, remap=torch.arange(0, 64, 2), unknown_index="extra")
    assert m.vocab_size == 33 and m.n_embed == 64
    with torch.no_grad():
        _, _, (_, _, idx) = m.encode(torch.randn(1, 1, 16, 16))
        assert idx.shape == (1, 8, 8) and idx.max() < 33
        assert m.decode_code(idx).shape == (1, 1, 16, 16)


# ------------------------------------------------------------------------------------------------------ Gumbel


def test_gumbel_vq_layout_and_temperature():
    torch.manual_seed(0)
    g = GumbelVQ(
        ddconfig=PARITY_DD,
        n_embed=64,
        embed_dim=16,
        temperature_schedule=dict(warm_up_steps=0, max_decay_steps=101, lr_start=0.9, lr_max=0.9, lr_min=1e-6),
    )
    sd = g.state_dict()
    assert len(sd) == 185  # 183 − quantize.embedding.weight + quantize.{proj.weight, proj.bias, embed.weight}
    assert sd["quantize.proj.weight"].shape == (64, 16, 1, 1) and sd["quantize.embed.weight"].shape == (64, 16)
    assert "quant_conv.weight" in sd and "post_quant_conv.weight" in sd  # official GumbelVQ keeps both
    assert g.temperature == 1.0 and isinstance(g.temperature_schedule, LambdaWarmUpCosineScheduler)
    assert g.temperature_scheduling(0) == pytest.approx(0.9) and g.quantize.temperature == pytest.approx(0.9)
    assert g.temperature_scheduling(101) == pytest.approx(1e-6)
    g.temperature = 0.5
    assert g.quantize.temperature == 0.5
    with pytest.raises(ValueError, match="> 0"):
        g.temperature = 0.0
    randomize_parameters(g, seed=2)
    g.temperature = 1.0
    x = torch.randn(2, 3, 16, 16)
    dec, loss = g.train()(x)
    assert dec.shape == x.shape
    assert_grads_reach_all_parameters(g, dec.square().mean() + loss)
    g.eval()
    with torch.no_grad():
        codes = g.encode_to_indices(x)
        assert codes.shape == (2, 4, 4)
        assert g.decode_code(codes).shape == x.shape


def test_gumbel_vq_needs_embed_dim_equal_z():
    with pytest.raises(ValueError, match="embed_dim=8, z_channels=16"):
        GumbelVQ(ddconfig=PARITY_DD, n_embed=64, embed_dim=8)


# ----------------------------------------------------------------------------------------------------- presets


def test_presets_build_on_meta():
    assert {"imagenet_f16_1024", "imagenet_f16_16384", "gumbel_f8_8192", "fmnist_f4", "tiny"} <= set(VQGAN_PRESETS)
    with torch.device("meta"):
        big = build_vqmodel("imagenet_f16_16384")
        gum = build_vqmodel("gumbel_f8_8192")
    assert type(big) is VQModel and big.downsample_factor == 16 and big.n_embed == 16384
    assert big.quantize.embedding.weight.shape == (16384, 256)
    assert len(big.decoder.up[4].attn) == 3 and len(big.encoder.down[4].attn) == 2  # attention at 16x16
    assert isinstance(gum, GumbelVQ) and gum.downsample_factor == 8
    assert gum.quantize.proj.weight.shape == (8192, 256, 1, 1) and gum.quantize.kl_weight == 1e-8
    assert len(gum.encoder.down[3].attn) == 2  # attention at 32x32
    assert gum.temperature_schedule(0) == pytest.approx(0.9)


def test_fmnist_preset_and_overrides():
    m = build_vqmodel("fmnist_f4")
    assert m.downsample_factor == 4 and m.n_embed == 512 and m.latent_shape(32, 32) == (64, 8, 8)
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 32))[0].shape == (1, 1, 32, 32)
    small = build_vqmodel("tiny", n_embed=32, ddconfig={"ch": 64})
    assert small.n_embed == 32 and small.encoder.ch == 64 and small.encoder.in_channels == 1
    assert VQGAN_PRESETS["tiny"]["ddconfig"]["ch"] == 32  # presets are not mutated
    with pytest.raises(ValueError, match="unknown VQGAN preset 'nope'"):
        build_vqmodel("nope")
