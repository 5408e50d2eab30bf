"""Official Net2Net checkpoints: a synthetic checkpoint in the official layout (a Lightning 1.x pickle whose state_dict
holds flow.*, the BigAE's first_stage_model.* and a training-only loss.* entry) loads in one call with its
configuration read off the tensors, and reproduces the flow it came from; the paper's creativity flow's layout
infers the creativity config; bad checkpoints are refused, naming what is wrong."""

from __future__ import annotations

import logging
import os
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from gencore.io import CheckpointError, CheckpointKeyError, UnsafeCheckpointError
from gencore.testing import fake_classes
from ldm.first_stage import KLCodec
from ldm.models.autoencoder import build_autoencoder
from net2net.convert import flow_config_from_state, load_official, net2net_from_official
from net2net.lit import Net2NetFlow
from net2net.models.flow import FLOW_PRESETS, ConditionalFlatCouplingFlow, build_flow

# the official tiny config, spelled out (FLOW_PRESETS["tiny"]), with the defaults the inference also reports
OFFICIAL = dict(
    in_channels=16,
    conditioning_dim=3,
    embedding_dim=10,
    conditioning_depth=2,
    n_flows=4,
    hidden_dim=32,
    hidden_depth=2,
    activation="none",
    conditioner_use_bn=True,
)
INFERRED = {**OFFICIAL, "conditioning_option": "none", "conditioning_hidden_dim": 256, "conditioner_use_an": False}


def _official_flow(seed: int = 0, **overrides) -> ConditionalFlatCouplingFlow:
    """The official tiny flow as training leaves it: ActNorms initialised from a batch, BatchNorm statistics not the
    defaults; eval mode."""
    torch.manual_seed(seed)
    flow = ConditionalFlatCouplingFlow(**{**OFFICIAL, **overrides})
    flow.train()
    with torch.no_grad():
        flow(torch.randn(32, 16) * 1.5 + 0.3, F.one_hot(torch.arange(32) % 3, 3).float())
        for m in flow.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(1000)
    return flow.eval()


def _official_state(flow: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A Net2NetFlow state dict: flow.*, the BigAE's first_stage_model.*, and a training-only loss.* entry."""
    state = {f"flow.{k}": v.clone() for k, v in flow.state_dict().items()}
    state["first_stage_model.encoder.resnet.conv1.weight"] = torch.randn(64, 3, 7, 7)
    state["first_stage_model.encoder.resnet.bn1.running_mean"] = torch.randn(64)
    state["first_stage_model.decoder.decoder.layers.0.conv.weight"] = torch.randn(8, 4, 3, 3)
    state["loss.logvar"] = torch.zeros(())
    return state


def _save_official(path, state) -> None:
    """Save ``state`` as a Lightning 1.x ``.ckpt`` would: classes of pytorch_lightning in the pickle."""
    spec = {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": object,
        "pytorch_lightning.utilities.parsing.AttributeDict": dict,
    }
    with fake_classes(spec) as cls:
        hp = cls["pytorch_lightning.utilities.parsing.AttributeDict"]()
        hp.update({"flow_config": {"target": "net2net.modules.flow.flatflow.ConditionalFlatCouplingFlow"}})
        torch.save(
            {
                "epoch": 12,
                "global_step": 120000,
                "pytorch-lightning_version": "1.0.8",
                "state_dict": OrderedDict(state),
                "callbacks": {cls["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]: {"best": 1.0}},
                "hyper_parameters": hp,
            },
            path,
        )


def _inputs(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 16, generator=g) * 1.5, F.one_hot(torch.arange(n) % 3, 3).float()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    flow = _official_flow()
    path = tmp_path_factory.mktemp("official") / "last.ckpt"
    _save_official(path, _official_state(flow))
    return flow, path


def test_official_checkpoint_loads_in_one_call_and_reproduces_its_flow(official):
    flow, path = official
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what users of the released .ckpt files hit with torch >= 2.6
    loaded = load_official(path)
    assert isinstance(loaded, ConditionalFlatCouplingFlow) and not loaded.training
    assert not any(m.training for m in loaded.modules())
    for k, v in flow.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert all(int(b.norm_layer.initialized) == 1 for b in loaded.sub_layers)
    z, c = _inputs()
    with torch.no_grad():
        v, logdet = flow(z, c)
        v2, logdet2 = loaded(z, c)
        assert torch.equal(v2, v) and torch.equal(logdet2, logdet)
        assert torch.equal(loaded.reverse(v, c), flow.reverse(v, c))
    # stays initialised: a training forward does not overwrite the released loc / scale
    loaded.train()
    with torch.no_grad():
        loaded(z * 10, c)
    assert torch.equal(loaded.sub_layers[0].norm_layer.loc, flow.sub_layers[0].norm_layer.loc)


def test_the_config_is_read_off_the_tensors(official):
    flow, _ = official
    state = flow.state_dict()
    assert flow_config_from_state(state) == INFERRED
    assert build_flow("tiny").state_dict().keys() == state.keys()  # the official names are ours
    assert flow_config_from_state(state, activation="lrelu")["activation"] == "lrelu"  # not in the tensors
    other = dict(
        in_channels=8,
        conditioning_dim=5,
        embedding_dim=6,
        hidden_dim=12,
        hidden_depth=1,
        n_flows=3,
        conditioning_hidden_dim=7,
        conditioning_depth=1,
        conditioner_use_an=True,
    )
    cfg = flow_config_from_state(ConditionalFlatCouplingFlow(**other).state_dict())
    assert cfg == {**other, "conditioning_option": "none", "activation": "none", "conditioner_use_bn": False}
    # an already loaded checkpoint and a bare flow state dict work as well as a path
    z, c = _inputs()
    with torch.no_grad():
        expected = flow(z, c)[0]
        assert torch.equal(load_official({"state_dict": _official_state(flow)})(z, c)[0], expected)
        assert torch.equal(load_official(state)(z, c)[0], expected)


def test_the_creativity_flow_layout_infers_the_creativity_config():
    with torch.device("meta"):  # 179 M parameters: shapes only
        flow = build_flow("creativity")
    state = flow.state_dict()
    assert sum(p.numel() for p in flow.parameters()) == 179_469_834
    assert state["sub_layers.19.coupling.s.1.main.0.weight"].shape == (1024, 64 + 10)
    assert state["sub_layers.0.norm_layer.loc"].shape == (1, 128, 1, 1)
    assert state["embedder.main.0.weight"].shape == (256, 3)
    assert state["embedder.main.9.weight"].shape == (10, 256)
    assert not any(k.startswith("sub_layers.20.") for k in state)
    cfg = flow_config_from_state(state)
    preset = FLOW_PRESETS["creativity"]
    assert {k: cfg[k] for k in preset} == preset
    assert cfg["conditioning_option"] == "none" and cfg["conditioning_hidden_dim"] == 256
    assert not cfg["conditioner_use_an"]


def test_a_missing_key_or_a_wrong_shape_is_named(official, tmp_path):
    flow, _ = official
    state = _official_state(flow)
    del state["flow.sub_layers.2.coupling.t.1.main.4.bias"]
    _save_official(tmp_path / "missing.ckpt", state)
    with pytest.raises(CheckpointKeyError, match=r"missing key.*sub_layers\.2\.coupling\.t\.1\.main\.4\.bias") as e:
        load_official(tmp_path / "missing.ckpt")
    assert e.value.missing == ["sub_layers.2.coupling.t.1.main.4.bias"] and not e.value.unexpected
    state = _official_state(flow)
    state["flow.sub_layers.3.norm_layer.scale"] = torch.ones(1, 18, 1, 1)
    _save_official(tmp_path / "shape.ckpt", state)
    with pytest.raises(CheckpointKeyError, match=r"sub_layers\.3\.norm_layer\.scale: checkpoint \(1, 18, 1, 1\)"):
        load_official(tmp_path / "shape.ckpt")
    state = _official_state(flow)
    state["flow.sub_layers.1.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointKeyError, match=r"unexpected key.*sub_layers\.1\.extra"):
        load_official(state)
    # no flow at all: the marker key is named
    no_flow = {k: v for k, v in _official_state(flow).items() if not k.startswith("flow.")}
    with pytest.raises(CheckpointKeyError, match="sub_layers.0.norm_layer.loc"):
        load_official(no_flow)
    with pytest.raises(CheckpointError, match="not a net2net flow"):
        flow_config_from_state({"embedder.main.0.weight": torch.zeros(4, 3)})


def test_conditioning_layers_need_their_option(tmp_path):
    flow = _official_flow(conditioning_option="sequential")
    path = tmp_path / "seq.ckpt"
    _save_official(path, _official_state(flow))
    with pytest.raises(CheckpointError, match="conditioning_layers.*conditioning_option"):
        load_official(path)
    loaded = load_official(path, conditioning_option="sequential")
    assert loaded.conditioning_option == "sequential" and len(loaded.conditioning_layers) == 4
    z, c = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(z, c)[0], flow(z, c)[0])
        # "parallel" has the same tensors but another computation: what the option is for
        assert not torch.allclose(load_official(path, conditioning_option="parallel")(z, c)[0], flow(z, c)[0])


def test_uninitialised_actnorms_load_with_a_warning(official, caplog):
    flow, _ = official
    state = _official_state(flow)
    state["flow.sub_layers.1.norm_layer.initialized"] = torch.tensor(0, dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="net2net.convert"):
        loaded = load_official(state)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "1 ActNorm layers were never initialised" in warnings[0].getMessage()
    assert "sub_layers.1.norm_layer.initialized" in warnings[0].getMessage()
    assert int(loaded.sub_layers[1].norm_layer.initialized) == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="net2net.convert"):
        load_official(_official_state(flow))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Exploit.marker = marker
    path = tmp_path / "evil.ckpt"
    flow = _official_flow()
    torch.save({"state_dict": _official_state(flow), "hyper_parameters": _Exploit()}, path)  # a .ckpt as torch saves
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_official(path)
    with pytest.raises(UnsafeCheckpointError):
        net2net_from_official(path, None, dataset_names=("a", "b", "c"), image_size=16)
    assert not marker.exists()  # nothing ran


def test_net2net_from_official_builds_the_cinn_over_a_codec(official):
    flow, path = official
    torch.manual_seed(0)  # a KL autoencoder with 1 x 4 x 4 = 16-d latents at 16 x 16 (f = 4)
    ae = build_autoencoder(
        "fmnist_kl_f4", ddconfig={"resolution": 16, "ch": 32, "ch_mult": [1, 1, 1], "z_channels": 1}, embed_dim=1
    )
    names = ("fashion_mnist", "digits", "lfw")
    module = net2net_from_official(path, KLCodec(ae), dataset_names=names, image_size=16)
    assert isinstance(module, Net2NetFlow) and not module.training
    assert module.dataset_names == names and module.latent_shape == (1, 4, 4)
    z, c = _inputs()
    with torch.no_grad():
        v, logdet = module(z.reshape(8, 1, 4, 4), c)
        v0, logdet0 = flow(z, c)
    assert torch.equal(v, v0) and torch.equal(logdet, logdet0)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    out = module.project(x, "digits", ["lfw", "fashion_mnist"])
    assert out.shape == (2, 2, 1, 16, 16) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="in_channels=16"):
        net2net_from_official(path, KLCodec(ae), dataset_names=names, image_size=32)  # 1 x 8 x 8 latents
