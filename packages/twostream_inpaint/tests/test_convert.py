"""Official guided-inpainting checkpoints: a synthetic checkpoint in the official layout (a Lightning 1.x pickle whose
state_dict holds generator.*, discriminator.*, flow.raft.* in the princeton-vl naming, and the training-only
loss / evaluator weights) loads in one call and reproduces the model it came from; bad checkpoints are refused."""

from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch

from gencore.io import CheckpointError, CheckpointKeyError, UnsafeCheckpointError
from gencore.testing import fake_classes
from twostream_inpaint.convert import load_official, official_modules
from twostream_inpaint.flow import RAFTFlow, ZeroFlow
from twostream_inpaint.models import GIResNetGenerator, NLayerDiscriminator

# configs/ours.yaml's generator / discriminator sections, shrunk (the official key names and kinds)
GEN = {
    "kind": "gi.modules.gi.lama_guided.GIResNetGenerator",
    "is_deformable": True,
    "n_cross": 2,
    "is_crossattending": True,
    "num_latents_sqrt": 4,
    "num_groups": 4,
    "read_write_heads": 2,
    "pre_lama": 0,
    "post_lama": 0,
    "input_nc": 4,
    "output_nc": 3,
    "ngf": 8,
    "n_downsampling": 2,
    "n_blocks": 2,
    "block_type": "ffc",
    "add_out_act": "sigmoid",
    "resnet_conv_kwargs": {"ratio_gin": 0.75, "ratio_gout": 0.75, "enable_lfu": False},
}
DISC = {"kind": "pix2pixhd_nlayer", "input_nc": 3, "ndf": 8, "n_layers": 2}


def _official_state(seed: int = 0, to_princeton=None) -> tuple[dict[str, torch.Tensor], GIResNetGenerator]:
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in GEN.items() if k != "kind"}
    gen = GIResNetGenerator(**kwargs)
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2)
    for m in gen.modules():  # non-trivial BatchNorm statistics, as a trained checkpoint has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {f"generator.{k}": v.clone() for k, v in gen.state_dict().items()}
    state.update({f"discriminator.{k}": v.clone() for k, v in disc.state_dict().items()})
    if to_princeton is not None:  # the RAFT the official module holds (nn.DataParallel's module. stripped)
        flow = RAFTFlow(size="large", allow_random=True)
        for k, v in flow.raft.state_dict().items():
            state.update({f"flow.raft.{n.removeprefix('module.')}": v for n in to_princeton(k)})
    state["loss_resnet_pl.impl.conv1.weight"] = torch.randn(64, 3, 3, 3)
    state["val_evaluator_raw_two.scores.lpips.metric.net.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    return state, gen


def _save_official(path, state, hparams=True) -> None:
    spec = {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": object,
        "pytorch_lightning.utilities.parsing.AttributeDict": dict,
    }
    with fake_classes(spec) as cls:
        hp = cls["pytorch_lightning.utilities.parsing.AttributeDict"]()
        hp.update({"generator": dict(GEN), "discriminator": dict(DISC), "losses": {"l1": {"weight_known": 10}}})
        ckpt = {
            "epoch": 3,
            "global_step": 1000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": OrderedDict(state),
            "callbacks": {cls["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]: {"monitor": "x"}},
        }
        if hparams:
            ckpt["hyper_parameters"] = hp
        torch.save(ckpt, path)


def _batch(size: int = 32):
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, size, size, generator=g)
    mask = torch.zeros(1, 1, size, size)
    mask[..., 8:20, 10:24] = 1
    srcs = torch.rand(1, 2, 3, size, size, generator=g)
    return image, mask, srcs


def test_official_checkpoint_loads_in_one_call_and_reproduces_its_generator(tmp_path):
    state, gen = _official_state()
    path = tmp_path / "last.ckpt"
    _save_official(path, state)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what users of the released .ckpt hit with torch >= 2.6
    module = load_official(path, flow="zero")
    assert isinstance(module.flow, ZeroFlow) and not module.training
    for k, v in gen.state_dict().items():
        assert torch.equal(module.generator.state_dict()[k], v), k
    image, mask, srcs = _batch()
    zeros = torch.zeros(1, 2, 2, 32, 32), torch.zeros(1, 2, 1, 32, 32)
    gen.eval()
    refs = torch.cat([srcs, torch.zeros(1, 2, 1, 32, 32)], dim=2)
    with torch.no_grad():
        expected = gen(torch.cat([image * (1 - mask), mask], 1), refs, flows=zeros[0], flow_errs=zeros[1])
        got = module.inpaint(image, mask, srcs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_the_checkpoints_own_raft_weights_become_the_flow_estimator(tmp_path, to_princeton):
    state, _ = _official_state(to_princeton=to_princeton)
    path = tmp_path / "last.ckpt"
    _save_official(path, state)
    module = load_official(path)
    assert isinstance(module.flow, RAFTFlow)
    raft_keys = {k for k in state if k.startswith("flow.raft.")}
    assert raft_keys and len(module.flow.raft.state_dict()) <= len(raft_keys)
    image = torch.rand(1, 3, 128, 128)
    flow, err = module.flow(image, image)
    assert flow.shape == (1, 2, 128, 128) and err.shape == (1, 1, 128, 128)


def test_config_from_the_official_yaml_and_bad_checkpoints(tmp_path):
    from omegaconf import OmegaConf

    state, _ = _official_state()
    path = tmp_path / "nohp.ckpt"
    _save_official(path, state, hparams=False)
    with pytest.raises(CheckpointError, match="no hyper_parameters"):
        load_official(path, flow="zero")
    yaml = tmp_path / "ours.yaml"
    OmegaConf.save({"model": {"params": {"config": {"generator": GEN, "discriminator": DISC}}}}, yaml)
    assert load_official(path, yaml, flow="zero").generator.n_cross == 2
    bad = dict(state)
    bad["generator.model.1.conv.weight"] = torch.zeros(3, 3, 3, 3)
    _save_official(tmp_path / "bad.ckpt", bad)
    with pytest.raises(CheckpointKeyError, match="model.1.conv.weight"):
        load_official(tmp_path / "bad.ckpt", flow="zero")
    with pytest.raises(CheckpointError, match="holds no flow.raft"):
        load_official(path, yaml)
    with pytest.raises(CheckpointError, match="only GIResNetGenerator"):
        official_modules({"generator": {**GEN, "kind": "gi.modules.gi.lama_guided_ffc.Foo"}, "discriminator": DISC})
    with pytest.raises(CheckpointError, match="unsupported generator settings"):
        official_modules({"generator": {**GEN, "use_magic": True}, "discriminator": DISC})


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": _Exploit()}, f)
    with pytest.raises(UnsafeCheckpointError):
        load_official(path, flow="zero")
