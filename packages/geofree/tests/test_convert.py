"""Official checkpoints: the paper's configuration builds with the official key set and sizes, and synthetic
checkpoints in the official layout (Lightning 1.x dicts, official config files) load in one call, strictly, safely."""

from __future__ import annotations

import copy
import functools
import os
import pickle

import pytest
import torch
from torch.utils.data import default_collate

from gencore.io import CheckpointKeyError, UnsafeCheckpointError
from geofree.convert import load_geofree, official_settings
from geofree.data.synthetic import SyntheticScenes
from geofree.lit import GeoTransformer, WarpingTransformer
from geofree.models.geogpt import ConvWarper, WarpGPT
from taming.models.mingpt import GPT
from taming.models.vqgan import VQGAN_PRESETS, build_vqmodel

TINY_DD = dict(VQGAN_PRESETS["tiny"]["ddconfig"], in_channels=3, out_ch=3)


def _vq_node(in_ch: int, n_embed: int = 64) -> dict:
    dd = dict(TINY_DD, in_channels=in_ch, out_ch=in_ch)
    return {
        "target": "geofree.models.vqgan.VQModel",
        "params": {
            "ckpt_path": "pretrained_models/x/last.ckpt",
            "embed_dim": 16,
            "n_embed": n_embed,
            "ddconfig": dd,
            "lossconfig": {"target": "geofree.modules.losses.vqperceptual.DummyLoss"},
        },
    }


def _official_config(target: str, *, merge: int | None, use_depth: bool, warp: bool, n_unmasked: int, cells: int):
    tparams = dict(vocab_size=64, block_size=n_unmasked + cells - 1, n_unmasked=n_unmasked, n_layer=1, n_head=2)
    tparams["n_embd"] = 32
    transformer = {"target": "geofree.modules.transformer.mingpt.GPT", "params": tparams}
    if warp:
        transformer["target"] = "geofree.modules.transformer.mingpt.WarpGPT"
        tparams["warper_config"] = {
            "target": "geofree.modules.transformer.warper.ConvWarper",
            "params": {"start_idx": 30 if target.endswith("WarpGeoTransformer") else 0, "size": [4, 6]},
        }
    params = {
        "merge_channels": merge,
        "use_depth": use_depth,
        "transformer_config": transformer,
        "first_stage_config": _vq_node(3),
        "cond_stage_config": "__is_first_stage__",
        "depth_stage_config": _vq_node(1, 32),
        "emb_stage_config": {
            "target": "geofree.modules.util.MultiEmbedder",
            "params": {"keys": ["R", "t", "K", "K_inv"], "n_positions": 30, "n_channels": 1, "n_embed": 32},
        },
    }
    return {"model": {"base_learning_rate": 0.0625, "target": target, "params": params}}


def _our_model(config: dict) -> GeoTransformer:
    """The model the official config describes, built directly (random weights), as a run would train it."""
    s = official_settings(config)
    torch.manual_seed(0)
    first = build_vqmodel(None, ddconfig=dict(TINY_DD), n_embed=64, embed_dim=16)
    depth = build_vqmodel(None, ddconfig=dict(TINY_DD, in_channels=1, out_ch=1), n_embed=32, embed_dim=16)
    tp = {k: v for k, v in s["transformer"].items() if k not in ("vocab_size", "block_size", "n_unmasked")}
    if s["warper"]:
        transformer = functools.partial(WarpGPT, warper=functools.partial(ConvWarper), **tp)
    else:
        transformer = functools.partial(GPT, **tp)
    if s["variant"] == "expl_img":
        return WarpingTransformer(first, transformer, image_size=(8, 12))
    use_depth = s["use_depth"] and s["variant"] != "expl_emb"
    return GeoTransformer(
        first,
        transformer,
        depth if use_depth else None,
        use_depth=use_depth,
        merge_channels=s["merge_channels"],
        camera_tokens=s["variant"] != "expl_emb",
        image_size=(8, 12),
    )


def _official_checkpoint(model: GeoTransformer, path, *, depth_keys=None, midas=True) -> None:
    """The model's weights as an official Lightning 1.x checkpoint: ``state_dict`` with the official prefixes, plus
    the MiDaS copies every official module carries and the depth VQGAN an impl_nodepth run still holds."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if depth_keys is not None:
        state.update({f"depth_stage_model.{k}": v for k, v in depth_keys.items()})
    if midas:
        state["_midas.model.pretrained.layer1.0.weight"] = torch.randn(4, 3, 3, 3)
        state["transformer.warper._midas.model.pretrained.layer1.0.weight"] = torch.randn(4, 3, 3, 3)
    torch.save({"state_dict": state, "pytorch-lightning_version": "1.0.8", "global_step": 7, "epoch": 0}, path)


def _batch(n: int = 2) -> dict:
    ds = SyntheticScenes(num_scenes=n, size=(8, 12), num_points=16)
    return default_collate([ds[i] for i in range(n)])


VARIANTS = {
    "impl_depth": ("geofree.models.transformers.geogpt.GeoTransformer", 32, True, False, 30 + 24),
    "impl_catdepth": ("geofree.models.transformers.geogpt.GeoTransformer", None, True, False, 30 + 48),
    "hybrid": ("geofree.models.transformers.geogpt.WarpGeoTransformer", 32, True, True, 30 + 24),
    "expl_emb": ("geofree.models.transformers.warpgpt.WarpTransformer", None, False, True, 24),
    "expl_img": ("geofree.models.transformers.net2net.WarpingTransformer", None, False, False, 24),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_official_checkpoint_loads_in_one_call(tmp_path, variant):
    target, merge, use_depth, warp, n_u = VARIANTS[variant]
    config = _official_config(target, merge=merge, use_depth=use_depth, warp=warp, n_unmasked=n_u, cells=24)
    ours = _our_model(config).eval()
    assert ours.n_unmasked == n_u
    path = tmp_path / "last.ckpt"
    _official_checkpoint(ours, path)
    loaded = load_geofree(path, config, image_size=(8, 12))
    batch = _batch()
    torch.manual_seed(1)
    a = ours.target_logits(batch)[0]
    b = loaded.target_logits(batch)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_impl_nodepth_checkpoint_drops_the_unused_depth_vqgan(tmp_path):
    config = _official_config(
        "geofree.models.transformers.geogpt.GeoTransformer",
        merge=None,
        use_depth=False,
        warp=False,
        n_unmasked=54,
        cells=24,
    )
    ours = _our_model(config).eval()
    assert ours.depth_stage_model is None and ours.n_unmasked == 30 + 24
    depth = build_vqmodel(None, ddconfig=dict(TINY_DD, in_channels=1, out_ch=1), n_embed=32, embed_dim=16)
    _official_checkpoint(ours, tmp_path / "last.ckpt", depth_keys=depth.state_dict())
    loaded = load_geofree(tmp_path / "last.ckpt", config, image_size=(8, 12))
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_mismatched_keys_and_config_are_refused(tmp_path):
    config = _official_config(
        "geofree.models.transformers.geogpt.GeoTransformer",
        merge=32,
        use_depth=True,
        warp=False,
        n_unmasked=54,
        cells=24,
    )
    ours = _our_model(config)
    state = dict(ours.state_dict())
    del state["merge_conv.weight"]
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointKeyError, match="merge_conv.weight"):
        load_geofree(tmp_path / "bad.ckpt", config, image_size=(8, 12))
    wrong = copy.deepcopy(config)
    wrong["model"]["params"]["transformer_config"]["params"]["n_unmasked"] = 99
    _official_checkpoint(ours, tmp_path / "ok.ckpt")
    with pytest.raises(ValueError, match="n_unmasked=99"):
        load_geofree(tmp_path / "ok.ckpt", wrong, image_size=(8, 12))
    with pytest.raises(ValueError, match="expl_feat"):
        official_settings({"model": {"target": "geofree.models.transformers.net2net.WarpingFeatureTransformer"}})


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    config = _official_config(
        "geofree.models.transformers.geogpt.GeoTransformer",
        merge=None,
        use_depth=False,
        warp=False,
        n_unmasked=54,
        cells=24,
    )
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "callbacks": _Exploit()}, f)
    with pytest.raises(UnsafeCheckpointError):
        load_geofree(path, config, image_size=(8, 12))


def test_paper_configuration_key_set_and_size():
    """realestate_13x23_impl_depth built on the meta device: 437.3 M transformer parameters, the official key set
    (549 minGPT keys, the camera embedder, merge_conv), n_unmasked 329, block 627; impl_catdepth 628 / 926."""
    with torch.device("meta"):
        first = build_vqmodel("imagenet_f16_16384")
        depth = build_vqmodel(
            None,
            ddconfig=dict(VQGAN_PRESETS["imagenet_f16_1024"]["ddconfig"], in_channels=1, out_ch=1),
            n_embed=1024,
            embed_dim=256,
        )
        gpt = functools.partial(GPT, n_layer=32, n_head=16, n_embd=1024)
        model = GeoTransformer(first, gpt, depth, merge_channels=512, image_size=(208, 368))
        cat = GeoTransformer(first, gpt, depth, merge_channels=None, image_size=(208, 368))
    assert model.grid == (13, 23) and model.n_unmasked == 329 and model.transformer.block_size == 627
    assert cat.n_unmasked == 628 and cat.transformer.block_size == 926
    n_params = sum(p.numel() for p in model.transformer.parameters())
    assert round(n_params / 1e6, 1) == 437.3
    keys = set(model.state_dict())
    gpt_keys = {k for k in keys if k.startswith("transformer.")}
    assert len(gpt_keys) == 549
    assert {"emb_stage_model.fc.weight", "merge_conv.weight", "transformer.blocks.31.attn.mask"} <= keys
    assert model.state_dict()["merge_conv.weight"].shape == (1024, 512, 1, 1)
    assert any(k.startswith("cond_stage_model.encoder.") for k in keys)  # the official alias of the first stage
    assert any(k.startswith("depth_stage_model.quantize.") for k in keys)
