"""The view-synthesis LightningModules (GeoTransformer, WarpingTransformer) in all six variants of the paper, built in
Python over tiny untrained VQGANs (f = 2: 8x12 views -> 4x6 = 24 tokens) on rendered rooms: prefix lengths and masks,
the loss slice, gradients and optimizer groups, sampling, camera conditioning, the input checks, no host syncs,
hidden states and a safetensors round trip."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from gencore.io import load_checkpoint, load_state_dict, save_safetensors
from gencore.testing import assert_grads_reach_all_parameters, assert_no_host_sync, sync_test_devices
from geofree.data.synthetic import SyntheticScenes, SyntheticScenesDataModule
from geofree.lit import GeoTransformer, WarpingTransformer
from geofree.models.geogpt import ConvWarper, MultiEmbedder, WarpGPT
from taming.models.mingpt import GPT
from taming.models.vqgan import build_vqmodel

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

SIZE = (8, 12)
HW = 24  # (8 / 2) x (12 / 2) token cells
N_EMBD = 32
VARIANTS = ("impl_nodepth", "impl_depth", "impl_catdepth", "expl_img", "expl_emb", "hybrid")
# n_unmasked as the reference table's formulas with h*w cells: 30 + hw (impl_*), 30 + 2 hw (catdepth), hw (expl_*)
N_UNMASKED = dict(
    impl_nodepth=30 + HW, impl_depth=30 + HW, impl_catdepth=30 + 2 * HW, expl_img=HW, expl_emb=HW, hybrid=30 + HW
)
CAMERA_TOKENS = ("impl_nodepth", "impl_depth", "impl_catdepth", "hybrid")
WARPS = ("expl_emb", "hybrid")


def _vqgans(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    image = build_vqmodel("tiny", ddconfig={"in_channels": 3, "out_ch": 3})
    depth = build_vqmodel("tiny")  # 1 channel
    return image, depth


def build(variant: str, seed: int = 0, **overrides) -> GeoTransformer:
    image_vq, depth_vq = _vqgans(seed)
    gpt = functools.partial(GPT, n_layer=1, n_head=2, n_embd=N_EMBD)
    warp_gpt = functools.partial(WarpGPT, warper=functools.partial(ConvWarper), n_layer=1, n_head=2, n_embd=N_EMBD)
    merge = depth_vq.quantize.e_dim + image_vq.quantize.e_dim
    kwargs = dict(image_size=SIZE, scale_lr=False, learning_rate=1.0, warmup_steps=2)
    kwargs.update(
        {
            "impl_nodepth": dict(transformer=gpt, use_depth=False),
            "impl_depth": dict(transformer=gpt, depth_stage=depth_vq, merge_channels=merge),
            "impl_catdepth": dict(transformer=gpt, depth_stage=depth_vq, use_depth=True, merge_channels=None),
            "expl_img": dict(transformer=gpt),
            "expl_emb": dict(transformer=warp_gpt, camera_tokens=False, use_depth=False),
            "hybrid": dict(transformer=warp_gpt, depth_stage=depth_vq, merge_channels=merge),
        }[variant]
    )
    kwargs.update(overrides)
    cls = WarpingTransformer if variant == "expl_img" else GeoTransformer
    torch.manual_seed(seed + 1)
    module = cls(image_vq, **kwargs)
    with torch.no_grad():  # minGPT zero-initialises pos_emb; make it non-trivial (the warper also warps it)
        module.transformer.pos_emb.normal_(0.0, 0.02)
    return module


@pytest.fixture(scope="module")
def batch() -> dict:
    return default_collate([SyntheticScenes(num_scenes=4, size=SIZE)[i] for i in range(4)])


def _rot_y(angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _full_logits(m: GeoTransformer, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPT's logits over the whole teacher-forced sequence [prefix, targets[:-1]], and the targets."""
    _, z = m.encode_to_indices(batch["dst_img"])
    c = m.conditioning(batch)
    seq = torch.cat((c["indices"], z), dim=1)[:, :-1]
    gpt = m.transformer.bind(c["warp"]) if m.warps else m.transformer
    return gpt(seq, embeddings=c["embeddings"])[0], z


# ------------------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefix_length_block_size_and_mask(variant):
    m = build(variant)
    n_u = N_UNMASKED[variant]
    assert m.grid == (4, 6) and m.seq_len == HW and m.num_codes == 64
    assert m.n_unmasked == n_u and m.transformer.n_unmasked == n_u
    assert m.transformer.block_size == n_u + HW - 1
    assert isinstance(m.transformer, WarpGPT) == (variant in WARPS) == m.warps
    assert hasattr(m, "emb_stage_model") == (variant in CAMERA_TOKENS)
    assert hasattr(m, "merge_conv") == (variant in ("impl_depth", "hybrid"))
    if variant in WARPS:  # the warper covers the source cells after the camera tokens
        assert m.transformer.warper.size == (4, 6)
        assert m.transformer.warper.start_idx == (30 if variant == "hybrid" else 0)
    mask = m.transformer.blocks[0].attn.mask[0, 0]
    L = m.transformer.block_size
    assert mask.shape == (L, L)
    assert (mask[:n_u, :n_u] == 1).all()  # the prefix attends to itself bidirectionally
    assert (mask[:n_u, n_u:] == 0).all()  # ... and never to the targets
    assert torch.equal(mask[n_u:], torch.tril(torch.ones(L, L))[n_u:])  # targets: causal, see the whole prefix


def test_the_mask_acts_in_the_forward():
    """Changing the last prefix token moves the first prefix position's logits (bidirectional); changing a target
    token moves neither the prefix nor the earlier targets (causal)."""
    m = build("impl_nodepth")
    gpt = m.transformer
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 30, N_EMBD, generator=g)
    idx = torch.randint(0, 64, (1, 2 * HW - 1), generator=g)
    with torch.no_grad():
        base = gpt(idx, embeddings=emb)[0]
        prefix = idx.clone()
        prefix[0, HW - 1] = (prefix[0, HW - 1] + 1) % 64  # the last prefix token (position n_unmasked - 1)
        moved = gpt(prefix, embeddings=emb)[0]
        target = idx.clone()
        target[0, HW + 5] = (target[0, HW + 5] + 1) % 64  # a target token (position n_unmasked + 5)
        later = gpt(target, embeddings=emb)[0]
    assert (moved[0, 0] - base[0, 0]).abs().amax() > 1e-6
    n_u = 30 + HW
    assert torch.equal(later[:, : n_u + 5], base[:, : n_u + 5])
    assert (later[0, n_u + 5] - base[0, n_u + 5]).abs().amax() > 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_target_logits_are_the_slice_from_n_unmasked_minus_one(variant, batch):
    m = build(variant)
    logits, z = m.target_logits(batch)
    assert logits.shape == (4, HW, 64) and z.shape == (4, HW) and z.dtype == torch.long
    full, z_full = _full_logits(m, batch)
    assert full.shape == (4, m.transformer.block_size, 64)
    assert torch.equal(z, z_full)
    torch.testing.assert_close(logits, full[:, m.n_unmasked - 1 :], rtol=0, atol=0)
    c = m.conditioning(batch)
    n_emb = 0 if c["embeddings"] is None else c["embeddings"].shape[1]
    assert n_emb + c["indices"].shape[1] == m.n_unmasked  # the prefix is exactly n_unmasked long


# -------------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_training_step_trains_the_transformer_and_not_the_vqgans(variant, batch):
    m = build(variant)
    m.train()
    assert not m.first_stage_model.training  # frozen stages stay in eval mode
    loss = m.training_step(batch, 0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    logits, z = m.target_logits(batch)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 64), z.reshape(-1)))
    assert abs(loss.item() - math.log(64)) < 1.0  # an untrained model: about uniform over the 64 codes
    assert_grads_reach_all_parameters(m, m.training_step(batch, 1))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    expected = {"transformer.tok_emb.weight", "transformer.pos_emb", "transformer.head.weight"}
    if variant in CAMERA_TOKENS:
        expected.add("emb_stage_model.fc.weight")
    if variant in ("impl_depth", "hybrid"):
        expected.add("merge_conv.weight")
    if variant in WARPS:
        expected |= {"transformer.warper.emb_conv.weight", "transformer.warper.pos_conv.weight"}
    assert expected <= trainable
    assert not (trainable - expected - {n for n in trainable if n.startswith("transformer.")})
    frozen = [m.first_stage_model] + ([m.depth_stage_model] if m.depth_stage_model is not None else [])
    for stage in frozen:
        assert all(not p.requires_grad and p.grad is None for p in stage.parameters())
    assert (m.depth_stage_model is not None) == (variant in ("impl_depth", "impl_catdepth", "hybrid"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_optimizer_groups(variant):
    m = build(variant)
    groups = m.optimizer_groups()
    decay, no_decay = groups[0], groups[1]
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    linear_conv = {id(mod.weight) for mod in m.transformer.modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}
    assert {id(p) for p in decay["params"]} == linear_conv
    names = {id(p): n for n, p in m.named_parameters()}
    for p in no_decay["params"]:
        n = names[id(p)]
        assert n.endswith(".bias") or ".ln" in n or n in ("transformer.tok_emb.weight", "transformer.pos_emb"), n
    assert any(names[id(p)] == "transformer.pos_emb" for p in no_decay["params"])
    assert any(names[id(p)] == "transformer.tok_emb.weight" for p in no_decay["params"])
    extra = {
        id(p) for name in ("emb_stage_model", "merge_conv") if hasattr(m, name) for p in getattr(m, name).parameters()
    }
    if extra:
        assert len(groups) == 3 and groups[2]["weight_decay"] == 0.0
        assert {id(p) for p in groups[2]["params"]} == extra
    else:
        assert len(groups) == 2
    held = [id(p) for g in groups for p in g["params"]]
    assert len(held) == len(set(held))  # every parameter once
    assert set(held) == {id(p) for p in m.parameters() if p.requires_grad}
    opt = m.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)


# -------------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("variant", VARIANTS)
def test_sample_views(variant, batch):
    m = build(variant).eval()
    part = {k: v[:2] for k, v in batch.items()}

    def draw(seed: int, **kw):
        return m.sample_views(part, 3, generator=torch.Generator().manual_seed(seed), return_tokens=True, **kw)

    images, tokens = draw(0, top_k=20)
    assert images.shape == (6, 3, *SIZE) and images.min() >= -1 and images.max() <= 1
    assert tokens.shape == (6, HW) and int(tokens.max()) < 64
    assert torch.equal(images, m.decode_indices(tokens))
    again, tokens_again = draw(0, top_k=20)
    assert torch.equal(tokens_again, tokens) and torch.equal(again, images)
    _, uncached = draw(0, top_k=20, use_cache=False)
    assert torch.equal(uncached, tokens)  # KV-cached and recomputed decoding draw the same tokens
    _, other = draw(1, top_k=20)
    assert not torch.equal(other, tokens)
    with pytest.raises(ValueError, match="num_samples"):
        m.sample_views(part, 0)
    with pytest.raises(ValueError, match="unknown sampling option"):
        m.sample_views(part, 1, top_p=0.9)


def test_sampling_options(batch):
    m = build("impl_depth", sample={"top_k": 1000, "temperature": 0.5})
    assert m.sample_options() == {"top_k": 64, "temperature": 0.5}  # top_k capped at the codebook size
    assert m.sample_options(top_k=5, temperature=None) == {"top_k": 5, "temperature": 0.5}
    for bad, match in ((dict(top_k=0), "top_k must be an integer >= 1"), (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=match):
            m.sample_options(**bad)
    part = {k: v[:1] for k, v in batch.items()}
    greedy = [m.sample_views(part, 1, generator=torch.Generator().manual_seed(s), top_k=1) for s in (0, 1)]
    assert torch.equal(greedy[0], greedy[1])  # top_k = 1 is greedy: the seed does not matter


@pytest.mark.parametrize("variant", ["impl_depth", "expl_img"])
def test_log_images(variant, batch):
    m = build(variant, sample={"top_k": 10}).eval()
    out = m.log_images(batch, max_images=3)
    expected = {"source", "target", "samples"} | ({"warped"} if variant == "expl_img" else set())
    assert set(out) == expected
    assert all(v.shape == (3, 3, *SIZE) for v in out.values())
    assert torch.equal(out["source"], batch["src_img"][:3])


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_camera_conditions_the_model(variant, batch):
    m = build(variant).eval()
    base, _ = m.target_logits(batch)
    assert torch.equal(base, m.target_logits(batch)[0])  # deterministic: differences below are the camera's
    turned = {**batch, "R_rel": _rot_y(0.3) @ batch["R_rel"]}
    assert (m.target_logits(turned)[0] - base).abs().amax() > 1e-4
    moved = {**batch, "t_rel": batch["t_rel"] * 1.5 + 0.1}
    assert (m.target_logits(moved)[0] - base).abs().amax() > 1e-4


def test_the_camera_tokens_carry_the_rescaled_translation(batch):
    """The 30 camera embeddings are MultiEmbedder([R, alpha t, K, K_inv]), alpha = max scaled disparity."""
    m = build("impl_nodepth")
    c = m.conditioning(batch)
    assert isinstance(m.emb_stage_model, MultiEmbedder)
    disp = 1.0 / batch["src_depth"]  # the sparse fit recovers the true disparity (exact points)
    alpha = disp.flatten(1).amax(1)
    torch.testing.assert_close(c["alpha"], alpha, rtol=1e-4, atol=0)
    expected = m.emb_stage_model(
        R=batch["R_rel"], t=batch["t_rel"] * alpha[:, None], K=batch["K"], K_inv=batch["K_inv"]
    )
    torch.testing.assert_close(c["embeddings"], expected, rtol=1e-4, atol=1e-6)
    assert c["disparity"].amax() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------- checks
def test_check_batch_errors(batch):
    m = build("impl_depth")
    m.check_batch(batch)
    with pytest.raises(ValueError, match="orthonormal"):
        m.check_batch({**batch, "R_rel": batch["R_rel"] * 1.1})
    flipped = batch["R_rel"].clone()
    flipped[:, 0] *= -1
    with pytest.raises(ValueError, match="reflection"):
        m.check_batch({**batch, "R_rel": flipped})
    with pytest.raises(ValueError, match=r"shape .*\(4, 3, 4\)"):
        m.check_batch({**batch, "K": torch.cat((batch["K"], torch.zeros(4, 3, 1)), dim=2)})
    big = F.interpolate(batch["src_img"], size=(16, 24), mode="nearest")
    with pytest.raises(ValueError, match=r"src_img is 16x24 .* takes 8x12 views"):
        m.check_batch({**batch, "src_img": big})
    with pytest.raises(ValueError, match=r"dst_img is 16x24 .* takes 8x12 views"):
        m.check_batch({**batch, "dst_img": big})
    with pytest.raises(ValueError, match="no 't_rel'"):
        m.check_batch({k: v for k, v in batch.items() if k != "t_rel"})
    with pytest.raises(ValueError, match="2 cameras for 4 source views"):
        m.check_batch({**batch, "t_rel": batch["t_rel"][:2]})
    with pytest.raises(ValueError, match="orthonormal"):  # sampling checks its inputs too
        m.sample_views({**batch, "R_rel": batch["R_rel"] * 1.1})
    with pytest.raises(ValueError, match=r"K_inv is not the inverse of K"):
        m.check_batch({**batch, "K_inv": torch.eye(3).expand(4, 3, 3)})
    with pytest.raises(ValueError, match=r"K_inv must have the shape of K \(4, 3, 3\), got \(4, 3, 4\)"):
        m.check_batch({**batch, "K_inv": torch.zeros(4, 3, 4)})


def test_construction_errors():
    with pytest.raises(ValueError, match=r"9x12 is not divisible .* factor 2"):
        build("impl_nodepth", image_size=(9, 12))
    image_vq, _ = _vqgans(0)
    gpt = functools.partial(GPT, n_layer=1, n_head=2, n_embd=N_EMBD)
    with pytest.raises(ValueError, match="use_depth needs a depth_stage"):
        GeoTransformer(image_vq, gpt, image_size=SIZE, use_depth=True)
    with pytest.raises(ValueError, match="merge_channels=33 .* 32 wide"):
        build("impl_depth", merge_channels=33)
    with pytest.raises(ValueError, match="depth_scale must be sparse .* or fixed"):
        build("impl_nodepth", depth_scale="median")
    with pytest.raises(ValueError, match="merge_channels .* needs use_depth=True"):
        build("impl_nodepth", merge_channels=32)
    with pytest.raises(ValueError, match="warped image only"):
        build("expl_img", camera_tokens=True)
    with pytest.raises(ValueError, match="without camera tokens the camera must enter through a warp"):
        GeoTransformer(image_vq, gpt, image_size=SIZE, use_depth=False, camera_tokens=False)
    f4_depth = build_vqmodel("fmnist_f4")  # 1 channel, f = 4
    with pytest.raises(ValueError, match="depth VQGAN downsamples by 4, the image VQGAN by 2"):
        GeoTransformer(image_vq, gpt, f4_depth, image_size=SIZE, merge_channels=80)
    m = build("impl_nodepth")
    m.check_datamodule(SyntheticScenesDataModule(size=SIZE))
    with pytest.raises(ValueError, match=r"\(16, 24\) views but the model is built for \(8, 12\)"):
        m.check_datamodule(SyntheticScenesDataModule(size=(16, 24)))


def test_fixed_depth_scale_needs_no_sparse_points(batch):
    no_points = {k: v for k, v in batch.items() if k != "src_points"}
    sparse = build("hybrid")
    with pytest.raises(ValueError, match="src_points"):
        sparse.target_logits(no_points)
    m = build("hybrid", depth_scale="fixed")
    logits, _ = m.target_logits(no_points)
    assert logits.shape == (4, HW, 64) and torch.isfinite(logits).all()
    disp = m.source_disparity(no_points)
    lo, hi = disp.flatten(1).amin(1), disp.flatten(1).amax(1)
    torch.testing.assert_close(lo, torch.full((4,), 0.18577382), rtol=0, atol=1e-6)
    torch.testing.assert_close(hi, torch.full((4,), 0.93059154), rtol=0, atol=1e-6)
    images = m.sample_views(no_points, 1, generator=torch.Generator().manual_seed(0), top_k=10)
    assert images.shape == (4, 3, *SIZE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_steps_do_not_sync(variant):
    dm = SyntheticScenesDataModule(size=SIZE, num_scenes=12, num_val_scenes=2, batch_size=4, num_workers=0)
    assert_no_host_sync(build(variant), dm, steps=2, warmup=1)


@pytest.mark.parametrize("device", sync_test_devices())
def test_hybrid_training_steps_do_not_sync_on_the_device(device):
    dm = SyntheticScenesDataModule(size=SIZE, num_scenes=12, num_val_scenes=2, batch_size=4, num_workers=0)
    assert_no_host_sync(build("hybrid"), dm, steps=2, warmup=1, device=device)


# ------------------------------------------------------------------------------------------------ states, round trip
@pytest.mark.parametrize("variant", ["impl_catdepth", "hybrid"])
def test_hidden_states(variant, batch):
    m = build(variant).eval()
    states = m.hidden_states(batch)
    L = m.transformer.block_size
    assert len(states) == m.transformer.n_layer + 1 == 2
    assert all(s.shape == (4, L, N_EMBD) for s in states)
    full, _ = _full_logits(m, batch)
    torch.testing.assert_close(m.transformer._head(states[-1]), full, rtol=0, atol=1e-6)
    assert m.source_positions() == slice(m.n_unmasked - HW, m.n_unmasked)


@pytest.mark.parametrize("variant", VARIANTS)
def test_safetensors_round_trip_reproduces_the_logits(variant, batch, tmp_path):
    m = build(variant, seed=0).eval()
    path = save_safetensors(m.state_dict(), tmp_path / "model.safetensors")
    other = build(variant, seed=7).eval()
    before, _ = other.target_logits(batch)
    load_state_dict(other, load_checkpoint(path))
    expected, _ = m.target_logits(batch)
    assert not torch.equal(before, expected)  # a differently seeded model differs until loaded
    assert torch.equal(other.target_logits(batch)[0], expected)
