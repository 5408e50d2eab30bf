"""Official ImageBART checkpoints load in one call: synthetic stage checkpoints written in the official layout
(Lightning-1.x dicts with ``transformer.*``, LitEma ``transformer_ema.*`` names without dots, ``first_stage_model.*``
with the ``quantize.used`` remap, the ``sos_token`` / ``alphats`` / ``alphacum`` buffers) and the official configs'
shape (``model.params.transformer_config``, ``first_stage_config`` with a remap ``.npy`` that is not here)."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gencore.io import CheckpointKeyError, UnsafeCheckpointError
from gencore.testing import randomize_parameters
from imagebart.convert import load_imagebart
from imagebart.models.xtransformer import ResidualScaledXTransformer
from taming.models.mingpt import GPT
from taming.models.vqgan import VQGAN_PRESETS, build_vqmodel

USED = [1, 3, 4, 7, 9, 12, 15, 20, 21, 30]  # the remap: K = 10 of the tiny VQGAN's codes
K, V, L = len(USED), 16, 64  # codes, shared input vocabulary (classes 0..15), tokens of a 16x16 image at f2 -> 8x8


def _vq_params() -> dict:
    p = copy.deepcopy(VQGAN_PRESETS["tiny"])
    return {**p, "remap": "data/vqgan_indices/tiny_indices.npy", "sane_index_shape": True}


def _xt_params() -> dict:  # an official ResidualScaledXTransformer node (dim_head left at the default 64)
    return dict(
        scale_pos=0, n_scales=2, xt_start=2, xt_size=L, wrap_decoder=False, dim=32, enc_num_tokens=V, enc_depth=1,
        enc_heads=2, enc_max_seq_len=2 + L, dec_num_tokens=K, dec_depth=1, dec_heads=2, tie_token_emb=False,
        dec_max_seq_len=L,
    )  # fmt: skip


def _gpt_params() -> dict:
    return dict(input_vocab_size=V, vocab_size=K, block_size=2 + L, n_layer=1, n_head=2, n_embd=32, n_unmasked=2)


def _config(t: int, target: str, params: dict, alpha: float) -> dict:
    return {
        "model": {
            "base_learning_rate": 0.0625,
            "target": "imagebart.models.diffusion.DenoisingXTransformer" if t < 2 else "...DecoderOnlyDenoiser",
            "params": {
                "n_scales": 2,
                "single_scale": t,
                "top_k": K,
                "alpha": alpha,
                "redraw_prob": "geometric",
                "use_ema": True,
                "conditioner_config": {"target": "imagebart.util.ClassProvider", "params": {"key": "class_label"}},
                "transformer_config": {"target": target, "params": params},
                "first_stage_config": {"target": "imagebart.models.vqgan.VQGANWrapper", "params": _vq_params()},
            },
        }
    }


def _lightning1(state: dict) -> dict:
    return {
        "epoch": 3,
        "global_step": 120_000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.1)}},
        "optimizer_states": [],
        "lr_schedulers": [],
    }


def _stage_checkpoint(net: torch.nn.Module, vq_state: dict, *, wrap: bool = False) -> tuple[dict, dict]:
    """(official checkpoint dict, the EMA weights it holds): EMA copies differ from the raw weights."""
    sd = {}
    for k, v in net.state_dict().items():
        name = "decoder.net." + k[len("decoder.") :] if wrap and k.startswith("decoder.") else k
        sd["transformer." + name] = v.clone()
    ema = {}
    for k, p in net.named_parameters():
        name = "decoder.net." + k[len("decoder.") :] if wrap and k.startswith("decoder.") else k
        ema[k] = p.detach() + 0.01
        sd["transformer_ema." + name.replace(".", "")] = ema[k].clone()
    sd["transformer_ema.decay"] = torch.tensor(0.9999)
    sd["transformer_ema.num_updates"] = torch.tensor(1000, dtype=torch.int)
    sd.update({"first_stage_model." + k: v.clone() for k, v in vq_state.items()})
    sd.update(
        sos_token=torch.tensor([0]), alphats=torch.tensor([1.0, 0.5, 0.0]), alphacum=torch.tensor([1.0, 0.5, 0.0])
    )
    return _lightning1(sd), ema


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    vq = build_vqmodel("tiny", remap=USED, sane_index_shape=True)
    randomize_parameters(vq, seed=1)
    stage1 = randomize_parameters(ResidualScaledXTransformer(**_xt_params()), seed=2)
    stage2 = randomize_parameters(GPT(**_gpt_params()), seed=3)
    paths, configs, emas = [], [], []
    for t, (net, target, params, alpha) in enumerate(
        [
            (stage1, "imagebart.modules.xtransformers.x_transformer.ResidualScaledXTransformer", _xt_params(), 0.0),
            (stage2, "imagebart.modules.transformer.mingpt.GPT", _gpt_params(), 1.0),
        ],
        start=1,
    ):
        ckpt, ema = _stage_checkpoint(net, vq.state_dict(), wrap=False)
        path = folder / f"scale{t}.ckpt"
        torch.save(ckpt, path)
        paths.append(path)
        configs.append(_config(t, target, params, alpha))
        emas.append(ema)
    return {"vq": vq, "nets": [stage1, stage2], "paths": paths, "configs": configs, "emas": emas, "dir": folder}


def test_official_stages_load_in_one_call_and_match(official):
    model = load_imagebart(official["paths"], official["configs"])
    assert model.num_steps == 2 and model.num_codes == K and model.input_vocab_size == V
    assert model.alpha == [0.0, 1.0] and model.num_classes == V
    used = model.first_stage_model.quantize.used
    assert used.tolist() == USED  # the remap came from quantize.used (the .npy of the config is not here)
    ref1, ref2 = official["nets"]
    ref1.set_alphas(model.schedule.alphas)
    gen = torch.Generator().manual_seed(0)
    src = torch.cat((torch.tensor([[1, 5], [1, 2]]), torch.randint(0, K, (2, L), generator=gen)), 1)
    tgt = torch.cat((torch.zeros(2, 1, dtype=torch.long), torch.randint(0, K, (2, L - 1), generator=gen)), 1)
    torch.testing.assert_close(model.transformers[0](src, tgt)[0], ref1(src, tgt)[0], rtol=0, atol=1e-6)
    seq = torch.cat((torch.tensor([[2, 5], [2, 2]]), torch.randint(0, K, (2, L - 1), generator=gen)), 1)
    torch.testing.assert_close(model.transformers[1](seq)[0], ref2(seq)[0], rtol=0, atol=1e-6)
    # the inner attention width is heads x 64, not dim (a parity trap of the official x-transformers)
    assert model.transformers[0].encoder.attn_layers.layers[0][1].to_q.weight.shape == (2 * 64, 32)
    # the model samples and decodes
    out = model.generate(2, labels=[3, 4])
    assert out["images"].shape == (2, 1, 16, 16)


def test_ema_weights_load_with_use_ema(official):
    model = load_imagebart(official["paths"], official["configs"], use_ema=True)
    for t, ema in enumerate(official["emas"]):
        got = dict(model.transformers[t].named_parameters())
        for name, value in ema.items():
            torch.testing.assert_close(got[name], value)


def test_wrapped_decoder_keys_are_mapped(official, tmp_path):
    ckpt, _ = _stage_checkpoint(official["nets"][0], official["vq"].state_dict(), wrap=True)
    assert any(k.startswith("transformer.decoder.net.") for k in ckpt["state_dict"])
    path = tmp_path / "wrapped.ckpt"
    torch.save(ckpt, path)
    model = load_imagebart([path, official["paths"][1]], official["configs"], use_ema=True)
    torch.testing.assert_close(
        model.transformers[0].decoder.to_logits.weight, official["emas"][0]["decoder.to_logits.weight"]
    )


def test_mismatched_stage_and_remap_are_refused(official, tmp_path):
    ckpt = torch.load(official["paths"][0], weights_only=False)
    del ckpt["state_dict"]["transformer.decoder.to_logits.bias"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointKeyError, match="to_logits.bias"):
        load_imagebart([tmp_path / "broken.ckpt", official["paths"][1]], official["configs"])
    other = torch.load(official["paths"][1], weights_only=False)
    other["state_dict"]["first_stage_model.quantize.used"] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    torch.save(other, tmp_path / "other_remap.ckpt")
    with pytest.raises(ValueError, match="remapped to 10 codes"):
        load_imagebart([official["paths"][0], tmp_path / "other_remap.ckpt"], official["configs"])
    with pytest.raises(ValueError, match="one config per stage"):
        load_imagebart(official["paths"], official["configs"][:1])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_in_a_checkpoint_is_refused(official, tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": _Exploit()}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        load_imagebart([path, official["paths"][1]], official["configs"])
