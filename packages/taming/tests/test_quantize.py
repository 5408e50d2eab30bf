"""Quantisers of taming: VectorQuantizer (official VectorQuantizer2), GumbelQuantize, the temperature schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from taming.models.quantize import (
    GumbelQuantize,
    LambdaWarmUpCosineScheduler,
    VectorQuantizer,
    code_counts,
    codebook_usage,
)


def _vq(**kw) -> VectorQuantizer:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, **kw)
    with torch.no_grad():
        vq.embedding.weight.normal_()
    return vq


# ------------------------------------------------------------------------------------------ vector quantiser


def test_embedding_init_is_uniform_in_one_over_n():
    vq = VectorQuantizer(64, 8)
    w = vq.embedding.weight
    assert w.abs().max() <= 1 / 64 and w.std() > 0.25 / 64  # U(-1/n, 1/n)


def test_nearest_code_equals_brute_force_argmin():
    vq = _vq()
    z = torch.randn(3, 4, 5, 6)
    z_q, _, (_, _, idx) = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, vq.embedding.weight).argmin(1)
    assert torch.equal(idx, brute)
    assert idx.shape == (3 * 5 * 6,)  # flat unless sane_index_shape
    expected = vq.embedding.weight[brute].view(3, 5, 6, 4).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, expected)


def test_sane_index_shape():
    _, _, (_, _, idx) = _vq(sane_index_shape=True)(torch.randn(2, 4, 3, 5))
    assert idx.shape == (2, 3, 5) and idx.dtype == torch.long


def test_straight_through_gradient_is_identity_wrt_z():
    vq = _vq()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, _, _ = vq(z)
    g = torch.randn_like(z_q)
    (z_q * g).sum().backward()
    assert torch.equal(z.grad, g)
    assert vq.embedding.weight.grad is None  # the codebook learns from the loss only


@pytest.mark.parametrize("legacy", [True, False])
def test_beta_placement_legacy_vs_fixed(legacy):
    """legacy=True (official default) puts β on the codebook term: |∂L/∂e| = β·|∂L/∂z|; legacy=False the reverse."""
    beta = 0.25
    vq = _vq(beta=beta, legacy=legacy)
    z = torch.randn(1, 4, 1, 1, requires_grad=True)  # one vector: one code gets the whole gradient
    _, loss, (_, _, idx) = vq(z)
    loss.backward()
    g_z = z.grad.flatten()
    g_e = vq.embedding.weight.grad[idx[0]]
    e = vq.embedding.weight[idx[0]].detach()
    zf = z.detach().flatten()
    w_commit, w_code = (1.0, beta) if legacy else (beta, 1.0)
    torch.testing.assert_close(g_z, w_commit * 2 * (zf - e) / 4)
    torch.testing.assert_close(g_e, w_code * 2 * (e - zf) / 4)
    ratio = g_e.norm() / g_z.norm()
    assert math.isclose(ratio.item(), beta if legacy else 1 / beta, rel_tol=1e-5)
    # loss value: (1 + β)·mean((z_q − z)²) in both forms
    assert math.isclose(loss.item(), (1 + beta) * ((zf - e) ** 2).mean().item(), rel_tol=1e-5)


def test_perplexity_is_a_real_tensor():
    vq = _vq()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.eye(16, 4) * 10)  # codes 0..3 are basis vectors, the rest are zero
    z = torch.zeros(1, 4, 1, 4)
    z[0, :, 0, :] = torch.eye(4) * 10  # one vector per basis code -> 4 codes used equally
    _, _, (perplexity, min_encodings, idx) = vq(z)
    assert min_encodings is None
    assert idx.tolist() == [0, 1, 2, 3]
    assert torch.is_tensor(perplexity) and math.isclose(perplexity.item(), 4.0, rel_tol=1e-5)


def test_code_counts_equal_bincount():
    idx = torch.randint(0, 50, (3, 7, 7), generator=torch.Generator().manual_seed(0))
    counts = code_counts(idx, 64)
    assert counts.dtype == torch.long and torch.equal(counts, torch.bincount(idx.flatten(), minlength=64))


def test_codebook_usage_numbers():
    idx = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    stats = codebook_usage(idx, 8)
    assert math.isclose(stats["perplexity"], 4.0, rel_tol=1e-6)
    assert stats["used_fraction"] == 0.5 and stats["dead_codes"] == 4
    skew = codebook_usage(torch.tensor([5, 5, 5, 7]), 8)
    p = np.array([0.75, 0.25])
    assert math.isclose(skew["perplexity"], float(np.exp(-(p * np.log(p)).sum())), rel_tol=1e-5)
    assert skew["dead_codes"] == 6
    with pytest.raises(ValueError, match=r"\[8\].*codebook size 8"):
        codebook_usage(torch.tensor([1, 8]), 8)


def test_get_codebook_entry_shapes_and_range():
    vq = _vq()
    idx = torch.tensor([3, 1, 0, 15, 2, 2])
    out = vq.get_codebook_entry(idx, (1, 2, 3, 4))
    assert out.shape == (1, 4, 2, 3)
    assert torch.equal(out[0, :, 1, 0], vq.embedding.weight[15])
    assert vq.get_codebook_entry(idx, None).shape == (6, 4)
    with pytest.raises(ValueError, match=r"ids \[-1, 16\].*\[0, 16\)"):
        vq.get_codebook_entry(torch.tensor([0, 16, -1]), None)
    with pytest.raises(ValueError, match="integer"):
        vq.get_codebook_entry(torch.tensor([0.0]), None)


def test_wrong_channel_count_raises():
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\).*\(2, 3, 4, 4\)"):
        _vq()(torch.randn(2, 3, 4, 4))


# ------------------------------------------------------------------------------------------------- remapping


def test_remap_round_trip_with_extra_index(tmp_path):
    used = np.array([2, 5, 7, 11])
    np.save(tmp_path / "used.npy", used)
    vq = VectorQuantizer(16, 4, remap=str(tmp_path / "used.npy"), unknown_index="extra")
    assert vq.re_embed == 5 and vq.unknown_index == 4
    assert "used" in vq.state_dict()  # persistent buffer, as in official checkpoints
    full = torch.tensor([[2, 5, 7, 11, 3]])
    small = vq.remap_to_used(full)
    assert small.tolist() == [[0, 1, 2, 3, 4]]  # unknown code 3 -> the extra index
    assert vq.unmap_to_all(small).tolist() == [[2, 5, 7, 11, 2]]  # extra -> used[0], as officially
    # quantise with only used codes reachable: indices come back remapped, get_codebook_entry inverts them
    with torch.no_grad():
        vq.embedding.weight.normal_()
    z = vq.embedding.weight[torch.tensor(used)].T.reshape(1, 4, 1, 4) * 1.0
    z_q, _, (_, _, idx) = vq(z)
    assert idx.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(vq.get_codebook_entry(idx, (1, 1, 4, 4)), z_q)


def test_remap_unknown_random_stays_in_range():
    vq = VectorQuantizer(16, 4, remap=torch.tensor([1, 3, 5]), unknown_index="random")
    torch.manual_seed(0)
    out = vq.remap_to_used(torch.tensor([[0, 2, 4, 6, 8, 10, 12, 14] * 8]))
    assert out.min() >= 0 and out.max() < 3 and len(out.unique()) == 3
    assert vq.remap_to_used(torch.tensor([[1, 3, 5]])).tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match=r"\[3\].*\[0, 3\)"):
        vq.unmap_to_all(torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match=r"\[16\]"):
        vq.remap_to_used(torch.tensor([[16]]))


def test_remap_validation():
    with pytest.raises(ValueError, match="unique"):
        VectorQuantizer(8, 2, remap=[1, 1])
    with pytest.raises(ValueError, match=r"\[9\]"):
        VectorQuantizer(8, 2, remap=[1, 9])
    with pytest.raises(ValueError, match="does not exist"):
        VectorQuantizer(8, 2, remap="/nonexistent/used.npy")
    with pytest.raises(ValueError, match="unknown_index"):
        VectorQuantizer(8, 2, remap=[1, 2], unknown_index="nearest")


def test_remap_buffer_loads_from_state_dict():
    a = VectorQuantizer(16, 4, remap=[1, 2, 3])
    b = VectorQuantizer(16, 4, remap=[4, 5, 6])
    b.load_state_dict(a.state_dict())
    assert b.remap_to_used(torch.tensor([[3, 2, 1]])).tolist() == [[2, 1, 0]]


# ----------------------------------------------------------------------------------------------------- Gumbel


def _gumbel(**kw) -> GumbelQuantize:
    torch.manual_seed(0)
    return GumbelQuantize(6, 4, 10, **kw)


def test_gumbel_official_layout():
    gq = _gumbel()
    assert sorted(gq.state_dict()) == ["embed.weight", "proj.bias", "proj.weight"]
    assert gq.proj.weight.shape == (10, 6, 1, 1) and gq.embed.weight.shape == (10, 4)


def test_gumbel_eval_is_hard_one_hot():
    gq = _gumbel().eval()
    z = torch.randn(2, 6, 3, 3)
    z_q, _, (perplexity, _, idx) = gq(z)
    assert idx.shape == (2, 3, 3) and torch.is_tensor(perplexity)
    expected = gq.embed.weight[idx].permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(gq.get_codebook_entry(idx.flatten(), (2, 3, 3, 4)), expected, atol=1e-6, rtol=0)


def test_gumbel_training_soft_without_straight_through():
    gq = _gumbel(straight_through=False).train()
    z = torch.randn(1, 6, 2, 2)
    _, _, _, logits = gq(z, return_logits=True)
    torch.manual_seed(1)
    z_q, _, _ = gq(z, temp=5.0)
    torch.manual_seed(1)
    soft = F.gumbel_softmax(logits, tau=5.0, dim=1, hard=False)
    torch.testing.assert_close(z_q, torch.einsum("bnhw,nd->bdhw", soft, gq.embed.weight))


def test_gumbel_kl_closed_form():
    gq = _gumbel(kl_weight=0.5)
    with torch.no_grad():
        gq.proj.weight.zero_()
        gq.proj.bias.zero_()
    _, loss, _ = gq(torch.randn(2, 6, 3, 3))
    assert abs(loss.item()) < 1e-6  # uniform logits: KL(q || uniform) = 0
    with torch.no_grad():
        gq.proj.bias.copy_(torch.linspace(-2, 2, 10))
    _, loss, _ = gq(torch.randn(1, 6, 1, 1))
    q = torch.softmax(torch.linspace(-2, 2, 10), 0)
    kl = (q * (q.log() + math.log(10))).sum()
    assert math.isclose(loss.item(), 0.5 * kl.item(), rel_tol=1e-5)


def test_gumbel_gradients_reach_proj_and_embed():
    gq = _gumbel().train()
    z_q, loss, _ = gq(torch.randn(2, 6, 3, 3))
    (z_q.square().mean() + loss).backward()
    assert gq.proj.weight.grad.abs().sum() > 0 and gq.embed.weight.grad.abs().sum() > 0


def test_gumbel_remap_indices():
    gq = GumbelQuantize(6, 4, 10, remap=[2, 4, 6]).eval()
    _, _, (_, _, idx) = gq(torch.randn(2, 6, 3, 3))
    assert idx.min() >= 0 and idx.max() < 3


# --------------------------------------------------------------------------------------------- schedule


def test_lambda_warmup_cosine_schedule_values():
    s = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110)
    assert s(0) == 0.0
    assert math.isclose(s(5), 0.5)
    assert math.isclose(s(10), 1.0)
    assert math.isclose(s(60), 0.55)  # halfway through the cosine
    assert math.isclose(s(110), 0.1) and math.isclose(s(10_000), 0.1)
    released = LambdaWarmUpCosineScheduler(
        warm_up_steps=0, max_decay_steps=1_000_001, lr_start=0.9, lr_max=0.9, lr_min=1e-6
    )
    assert math.isclose(released(0), 0.9)
    assert math.isclose(released(500_000), 1e-6 + 0.5 * (0.9 - 1e-6) * (1 + math.cos(math.pi * 500_000 / 1_000_001)))
    assert math.isclose(released(2_000_000), 1e-6)
    with pytest.raises(ValueError, match="max_decay_steps"):
        LambdaWarmUpCosineScheduler(warm_up_steps=5, lr_min=0, lr_max=1, lr_start=0, max_decay_steps=5)


def test_dead_code_restart_mechanics():
    q = VectorQuantizer(8, 2, restart_unused_after=2)
    assert set(q.state_dict()) == set(VectorQuantizer(8, 2).state_dict())  # official keys either way
    with torch.no_grad():
        q.embedding.weight.zero_()
        q.embedding.weight[1:] = 100.0  # only code 0 is ever nearest
    z = torch.randn(2, 2, 3, 3) * 0.1
    rows = z.permute(0, 2, 3, 1).reshape(-1, 2)
    q.eval()
    for _ in range(3):
        q(z)
    assert q.restarts == 0 and torch.all(q.embedding.weight[1:] == 100.0)  # never in eval mode
    q.train()
    q(z)
    assert q.restarts == 0 and q.unused_for.tolist() == [0] + [1] * 7
    q(z)  # second pass without a pick: codes 1..7 move onto this batch's encoder outputs
    assert q.restarts == 7 and q.unused_for.tolist() == [0] * 8
    moved = q.embedding.weight[1:]
    assert torch.cdist(moved, rows).min(dim=1).values.max() < 1e-6
    assert q.restart_count.shape == () and q.restart_count.device == q.embedding.weight.device  # logged as is
    with pytest.raises(ValueError, match="restart_unused_after must be >= 0"):
        VectorQuantizer(8, 2, restart_unused_after=-1)


def test_dead_code_restarts_run_every_n_passes():
    """Restarts happen on passes N, 2N, ...: a code unused since pass p is moved at the first of them with at least
    N unused passes behind it (after N to 2N - 1 passes), never in between."""
    q = VectorQuantizer(4, 2, restart_unused_after=3).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]]))
    near = {c: q.embedding.weight[c].detach().clone().view(1, 2, 1, 1) for c in range(4)}
    moved = []
    for code, shift in [(1, 0.01), (0, 0.01), (0, 0.5), (0, 0.01), (0, 0.01), (0, 0.01)]:  # picks 1, then only 0
        before = q.embedding.weight.detach().clone()
        q(near[code] + shift)  # (codes moved at pass 3 land at 0.5: farther from the later inputs than code 0)
        moved.append(sorted(set(torch.nonzero((q.embedding.weight != before).any(1)).flatten().tolist())))
    # pass 3: codes 2, 3 unused for 3 passes move (code 1 only for 2); pass 6: code 1 (unused for 5) and the moved
    # codes 2, 3 (unused since pass 3) move; nothing moves in between
    assert moved == [[], [], [2, 3], [], [], [1, 2, 3]]
    assert q.restarts == 5


def test_dead_code_restart_uses_more_of_the_codebook_on_real_patches():
    """A small VQ autoencoder of real 4x4 Fashion-MNIST patches collapses onto about a third of its codebook (0.30 to
    0.37 over seeds 0-3); with restarts it uses nearly all codes and reconstructs better (MSE -14 to -27 %)."""
    from gencore.data import load_fashion_mnist

    images, _ = load_fashion_mnist(split="test")
    x = torch.from_numpy(np.array(images[:500])).float().div(127.5).sub(1.0)
    patches = x.unfold(1, 4, 4).unfold(2, 4, 4).reshape(-1, 16)  # 24,500 real 4x4 patches

    def fit(restart: int) -> tuple[float, float]:
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
        dec = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
        q = VectorQuantizer(128, 8, restart_unused_after=restart)

        def run(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            z_q, loss, (_, _, idx) = q(enc(b).T.reshape(1, 8, -1, 1))  # (1, e_dim, N, 1) as (B, C, H, W)
            return dec(z_q.reshape(8, -1).T), loss, idx

        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), *q.parameters()], lr=2e-3)
        for _ in range(200):
            b = patches[torch.randint(0, len(patches), (512,))]
            rec, qloss, _ = run(b)
            loss = (rec - b).pow(2).mean() + qloss
            opt.zero_grad()
            loss.backward()
            opt.step()
        q.eval()
        with torch.no_grad():
            rec, _, idx = run(patches)
        return idx.unique().numel() / 128, (rec - patches).pow(2).mean().item()

    used_plain, mse_plain = fit(0)
    used_restart, mse_restart = fit(10)
    assert used_plain < 0.5 and used_restart > 0.9
    assert mse_restart < 0.9 * mse_plain


def _restart_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        q = VectorQuantizer(16, 4, restart_unused_after=1)  # same init on both ranks
        torch.manual_seed(100 + rank)  # but each rank sees its own batch and draws its own picks
        with torch.no_grad():
            q.embedding.weight[:2] = torch.tensor([[1.0] * 4, [-1.0] * 4])
            q.embedding.weight[2:] = 50.0  # codes 2..15 unused everywhere -> restarted
        sign = 1.0 if rank == 0 else -1.0  # code 0 is picked on rank 0 only, code 1 on rank 1 only -> both kept
        q(sign + torch.randn(2, 4, 2, 2) * 0.01)
        torch.save({"weight": q.embedding.weight.detach().clone(), "restarts": q.restarts}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dead_code_restart_keeps_ddp_replicas_identical(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_restart_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert torch.equal(r0["weight"], r1["weight"])  # the same codebook on every replica
    assert r0["restarts"] == r1["restarts"] == 14  # usage summed over ranks: codes 0 and 1 stay
    assert torch.equal(r0["weight"][:2], torch.tensor([[1.0] * 4, [-1.0] * 4]))
    assert torch.all((r0["weight"][2:] - 1.0).abs() < 0.1)  # moved onto rank 0's encoder outputs (near +1)
