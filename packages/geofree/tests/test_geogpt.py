"""Tests for geofree.models.geogpt: the camera tokens (MultiEmbedder), the embedding warper (ConvWarper) and the GPT
whose prefix it warps (WarpGPT), with the official parameter names."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from gencore.testing import randomize_parameters
from geofree.geometry import camera_vector, intrinsics_inverse
from geofree.models.geogpt import CAMERA_KEYS, ConvWarper, MultiEmbedder, WarpBinding, WarpGPT
from taming.models.mingpt import GPT

IMAGE = (6, 8)  # image size the warp's depth and intrinsics refer to
GRID = (3, 4)  # the token grid (12 cells)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rot_y(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _K(batch: int, size=IMAGE) -> torch.Tensor:
    h, w = size
    K = torch.tensor([[7.0, 0.0, (w - 1) / 2], [0.0, 7.0, (h - 1) / 2], [0.0, 0.0, 1.0]])
    return K.expand(batch, 3, 3).clone()


def _camera(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    R = torch.stack([_rot_y(0.1 * (i + 1)) for i in range(batch)])
    t = torch.randn(batch, 3, generator=g) * 0.3
    K = _K(batch)
    return dict(R=R, t=t, K=K, K_inv=intrinsics_inverse(K))


def _warp(batch: int, *, identity: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    cam = _camera(batch, seed)
    if identity:
        cam["R"] = torch.eye(3).expand(batch, 3, 3).clone()
        cam["t"] = torch.zeros(batch, 3)
        depth = torch.full((batch, *IMAGE), 2.0)
    else:
        depth = 1.5 + torch.rand(batch, *IMAGE, generator=_gen(seed + 1))
    return dict(depth=depth, **cam)


# ------------------------------------------------------------------------------------------------- MultiEmbedder
def test_multiembedder_tokens_are_the_30_scalars_times_one_shared_vector():
    emb = MultiEmbedder(n_embed=16)
    torch.nn.init.normal_(emb.fc.weight, generator=_gen(1))
    cam = _camera(3)
    out = emb(**cam)
    assert out.shape == (3, 30, 16)
    w = emb.fc.weight[:, 0]  # (n_embed,): the one shared vector
    # the documented order: R row-major (0-8), t (9-11), K row-major (12-20), K_inv row-major (21-29)
    values = torch.cat([cam["R"].reshape(3, 9), cam["t"], cam["K"].reshape(3, 9), cam["K_inv"].reshape(3, 9)], dim=1)
    torch.testing.assert_close(out, values[..., None] * w, rtol=0, atol=1e-6)
    torch.testing.assert_close(values, camera_vector(cam["R"], cam["t"], cam["K"], cam["K_inv"]))
    # row-major: R[0, 1] is token 1 (column-major would put it at 3)
    R = torch.zeros(1, 3, 3)
    R[0, 0, 1] = 1.0
    one_hot = emb(R=R, t=torch.zeros(1, 3), K=torch.zeros(1, 3, 3), K_inv=torch.zeros(1, 3, 3))
    assert one_hot[0].abs().sum(-1).nonzero().flatten().tolist() == [1]
    # each token is a multiple of the same vector: rank one over the 30 positions
    assert torch.linalg.matrix_rank(out[0].detach()) == 1


def test_multiembedder_keys_order_is_r_t_k_kinv():
    assert CAMERA_KEYS == ("R", "t", "K", "K_inv")
    emb = MultiEmbedder(n_embed=4)
    cam = {k: torch.zeros(1, 3) if k == "t" else torch.zeros(1, 3, 3) for k in CAMERA_KEYS}
    for key, position in (("R", 0), ("t", 9), ("K", 12), ("K_inv", 21)):
        probe = {k: v.clone() for k, v in cam.items()}
        probe[key].view(-1)[0] = 1.0
        nonzero = emb(**probe)[0].abs().sum(-1).nonzero().flatten().tolist()
        assert nonzero == [position], (key, nonzero)


def test_multiembedder_zero_input_gives_zero_embeddings():
    emb = MultiEmbedder(n_embed=8)
    cam = {k: torch.zeros(2, 3) if k == "t" else torch.zeros(2, 3, 3) for k in CAMERA_KEYS}
    out = emb(**cam)
    assert out.shape == (2, 30, 8) and torch.count_nonzero(out) == 0


def test_multiembedder_state_dict_is_one_weight_without_bias():
    emb = MultiEmbedder(n_embed=12)
    sd = emb.state_dict()
    assert list(sd) == ["fc.weight"] and sd["fc.weight"].shape == (12, 1)
    assert emb.fc.bias is None


def test_multiembedder_wrong_token_count_and_missing_key():
    emb = MultiEmbedder(n_embed=8)
    cam = _camera(2)
    with pytest.raises(ValueError, match=r"n_positions=30") as err:
        emb(**{**cam, "t": torch.zeros(2, 4)})
    assert "31" in str(err.value)
    with pytest.raises(ValueError, match="missing K_inv"):
        emb(R=cam["R"], t=cam["t"], K=cam["K"])


# ---------------------------------------------------------------------------------------------------- ConvWarper
def _warper(n_embd: int = 8, start_idx: int = 5) -> ConvWarper:
    n_cells = GRID[0] * GRID[1]
    w = ConvWarper(
        n_unmasked=start_idx + n_cells,
        n_embd=n_embd,
        block_size=start_idx + 2 * n_cells,
        size=GRID,
        start_idx=start_idx,
    )
    return randomize_parameters(w, seed=3, std=0.2)


def test_convwarper_parameter_names_and_shapes():
    w = _warper(n_embd=8)
    sd = w.state_dict()
    assert set(sd) == {"emb_conv.weight", "pos_conv.weight"}
    assert sd["emb_conv.weight"].shape == (8, 16, 1, 1) and sd["pos_conv.weight"].shape == (8, 16, 1, 1)
    assert w.emb_conv.bias is None and w.pos_conv.bias is None


def test_convwarper_identity_camera_merges_each_cell_with_itself():
    """Identity pose and constant depth: the warp is the identity, so new = conv([x, x]); the camera tokens before
    start_idx and the targets after the prefix pass through."""
    b, c, a = 2, 8, 5
    w = _warper(n_embd=c, start_idx=a)
    n = GRID[0] * GRID[1]
    length = a + n + 4
    tok = torch.randn(b, length, c, generator=_gen(4))
    pos = torch.randn(1, length, c, generator=_gen(5))
    new_tok, new_pos = w(tok, pos, _warp(b, identity=True))
    assert new_tok.shape == (b, length, c) and new_pos.shape == (b, length, c)

    def expected(conv, x):  # x (B, n, C) in raster order -> conv([x, x]) per cell
        return F.linear(torch.cat((x, x), dim=-1), conv.weight[:, :, 0, 0])

    torch.testing.assert_close(new_tok[:, a : a + n], expected(w.emb_conv, tok[:, a : a + n]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        new_pos[:, a : a + n], expected(w.pos_conv, pos.expand(b, -1, -1)[:, a : a + n]), atol=1e-4, rtol=1e-4
    )
    assert torch.equal(new_tok[:, :a], tok[:, :a]) and torch.equal(new_tok[:, a + n :], tok[:, a + n :])
    assert torch.equal(new_pos[:, :a], pos.expand(b, -1, -1)[:, :a])
    assert torch.equal(new_pos[:, a + n :], pos.expand(b, -1, -1)[:, a + n :])


def test_convwarper_a_real_camera_moves_the_warped_half():
    b, c, a = 2, 8, 5
    w = _warper(n_embd=c, start_idx=a)
    n = GRID[0] * GRID[1]
    tok = torch.randn(b, a + n, c, generator=_gen(6))
    pos = torch.zeros(1, a + n, c)
    same, _ = w(tok, pos, _warp(b, identity=True))
    moved, _ = w(tok, pos, _warp(b))
    assert not torch.allclose(same[:, a:], moved[:, a:], atol=1e-3)
    assert torch.equal(same[:, :a], moved[:, :a])


def test_convwarper_gradient_flows_through_the_unwarped_half_only():
    """Officially the warp runs without gradient: d(sum out)/d(token) is the first half of emb_conv only."""
    b, c, a = 1, 8, 5
    w = _warper(n_embd=c, start_idx=a)
    n = GRID[0] * GRID[1]
    tok = torch.randn(b, a + n, c, generator=_gen(7), requires_grad=True)
    out, _ = w(tok, torch.zeros(1, a + n, c), _warp(b))
    out.sum().backward()
    first_half = w.emb_conv.weight[:, :c, 0, 0].sum(0)  # (C,)
    torch.testing.assert_close(tok.grad[0, a:], first_half.expand(n, c).detach())
    torch.testing.assert_close(tok.grad[0, :a], torch.ones(a, c))
    assert w.emb_conv.weight.grad is not None and w.emb_conv.weight.grad.abs().sum() > 0


def test_convwarper_wrong_grid_or_short_sequence():
    with pytest.raises(ValueError, match=r"3x5 token grid \(15 positions\)"):
        ConvWarper(n_unmasked=17, n_embd=8, block_size=30, size=(3, 5), start_idx=5)
    w = _warper(n_embd=8, start_idx=5)
    with pytest.raises(ValueError, match=r"n_unmasked=17"):
        w(torch.zeros(1, 10, 8), torch.zeros(1, 10, 8), _warp(1))


# -------------------------------------------------------------------------------------------------------- WarpGPT
N_CAM, N_CELLS, VOCAB, N_EMBD = 3, GRID[0] * GRID[1], 20, 16
N_UNMASKED = N_CAM + N_CELLS  # like the hybrid: embeddings first (not warped), then the source cells (warped)
BLOCK = N_UNMASKED + N_CELLS - 1
GPT_KW = dict(vocab_size=VOCAB, block_size=BLOCK, n_unmasked=N_UNMASKED, n_layer=2, n_head=2, n_embd=N_EMBD)


def _warpgpt(seed: int = 0, **kw) -> WarpGPT:
    torch.manual_seed(seed)
    gpt = WarpGPT(warper=functools.partial(ConvWarper), warp_grid=GRID, warp_start=N_CAM, **{**GPT_KW, **kw})
    return randomize_parameters(gpt, seed=seed, std=0.1).eval()  # pos_emb non-zero: the positional warp matters


def test_warpgpt_state_dict_is_the_gpt_plus_the_two_warper_convs():
    warp_keys = set(_warpgpt().state_dict())
    gpt_keys = set(GPT(**GPT_KW).state_dict())
    assert warp_keys - gpt_keys == {"warper.emb_conv.weight", "warper.pos_conv.weight"}
    assert gpt_keys <= warp_keys
    gpt = _warpgpt()
    assert gpt.warper.size == GRID and gpt.warper.start_idx == N_CAM and gpt.warper.n_unmasked == N_UNMASKED


def test_warpgpt_warper_config_wins_over_the_model_grid():
    gpt = WarpGPT(
        warper=functools.partial(ConvWarper, size=(4, 3), start_idx=N_CAM), warp_grid=(99, 1), warp_start=0, **GPT_KW
    )
    assert gpt.warper.size == (4, 3) and gpt.warper.start_idx == N_CAM
    with pytest.raises(ValueError, match="conditioning prefix"):
        WarpGPT(warper=functools.partial(ConvWarper), **{**GPT_KW, "n_unmasked": 0})


def _inputs(batch: int = 2):
    g = _gen(11)
    idx = torch.randint(0, VOCAB, (batch, BLOCK - N_CAM), generator=g)  # N_CELLS source + N_CELLS - 1 target ids
    emb = torch.randn(batch, N_CAM, N_EMBD, generator=g)
    return idx, emb


def test_warpgpt_forward_cached_through_bind_equals_forward():
    gpt = _warpgpt()
    idx, emb = _inputs()
    warp = _warp(2)
    with torch.no_grad():
        full, _ = gpt(idx, embeddings=emb, warp=warp)
        assert full.shape == (2, BLOCK, VOCAB)
        bound = gpt.bind(warp)
        assert isinstance(bound, WarpBinding)
        assert (bound.block_size, bound.n_unmasked) == (BLOCK, N_UNMASKED)
        torch.testing.assert_close(bound(idx, embeddings=emb)[0], full, rtol=0, atol=0)
        caches = bound.make_caches(2)
        first = bound.forward_cached(idx[:, :N_CELLS], caches, embeddings=emb)  # the whole prefix
        steps = [first] + [bound.forward_cached(idx[:, i : i + 1], caches) for i in range(N_CELLS, idx.shape[1])]
        cached = torch.cat(steps, dim=1)
    assert cached.shape == full.shape
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_warpgpt_the_warp_changes_the_logits():
    gpt = _warpgpt()
    idx, emb = _inputs()
    with torch.no_grad():
        a = gpt(idx, embeddings=emb, warp=_warp(2, identity=True))[0]
        b = gpt(idx, embeddings=emb, warp=_warp(2))[0]
    assert (a - b).abs().amax() > 1e-3


def test_warpgpt_needs_the_warp_inputs():
    gpt = _warpgpt()
    idx, emb = _inputs()
    with pytest.raises(ValueError, match=r"warp inputs \(depth, R, t, K, K_inv\)"):
        gpt(idx, embeddings=emb)
    with pytest.raises(ValueError, match="warp inputs"):
        gpt.forward_cached(idx[:, :N_CELLS], gpt.make_caches(2), embeddings=emb)
    with pytest.raises(ValueError, match="expected 2 caches"):
        gpt.forward_cached(idx[:, :N_CELLS], gpt.make_caches(2)[:1], embeddings=emb, warp=_warp(2))
