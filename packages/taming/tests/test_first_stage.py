import pytest
import torch
from hydra.utils import instantiate

from gencore import io
from gencore.latents import LatentCodec
from gencore.testing import randomize_parameters
from taming.first_stage import VQGANCodec, load_first_stage
from taming.lit import VQGANModule
from taming.losses import VQLPIPSWithDiscriminator
from taming.models.vqgan import build_vqmodel


def _module():
    torch.manual_seed(0)
    model = build_vqmodel("tiny")
    randomize_parameters(model, seed=3)
    loss = VQLPIPSWithDiscriminator(disc_start=0, disc_in_channels=1, disc_ndf=8, disc_num_layers=2, perceptual="none")
    return VQGANModule(model, loss, scale_lr=False)


MODULE_CFG = {
    "_target_": "taming.lit.VQGANModule",
    "scale_lr": False,
    "model": {"_target_": "taming.models.vqgan.build_vqmodel", "preset": "tiny"},
    "loss": {
        "_target_": "taming.losses.VQLPIPSWithDiscriminator",
        "disc_start": 0,
        "disc_in_channels": 1,
        "disc_ndf": 8,
        "disc_num_layers": 2,
        "perceptual": "none",
    },
}


def test_first_stage_from_an_export_and_from_an_official_checkpoint(tmp_path):
    m = _module()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    io.export(m, {"module": MODULE_CFG}, tmp_path / "run" / "export")
    for path in (tmp_path / "run", tmp_path / "run" / "export"):
        vq = load_first_stage(path)
        assert not vq.training and all(not p.requires_grad for p in vq.parameters())
        torch.testing.assert_close(vq(x)[0], m.model.eval()(x)[0])
    # the official layout: VQModel keys at the top level, loss.* beside them
    state = {**m.model.state_dict(), **{f"loss.{k}": v for k, v in m.loss.state_dict().items()}}
    torch.save({"state_dict": state, "global_step": 5}, tmp_path / "official.ckpt")
    vq = load_first_stage(tmp_path / "official.ckpt")
    torch.testing.assert_close(vq(x)[0], m.model(x)[0])
    with pytest.raises(ValueError, match="no first stage given"):
        load_first_stage(None)
    with pytest.raises(FileNotFoundError, match="first stage not found"):
        load_first_stage(tmp_path / "nope")


def test_vqgan_codec_is_a_frozen_latent_codec(tmp_path):
    m = _module()
    codec = VQGANCodec(m)
    assert isinstance(codec, LatentCodec)
    assert (codec.latent_channels, codec.downsample_factor, codec.vocab_size) == (16, 2, 64)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (3, 16, 8, 8) and not z.requires_grad
    # decode quantises: decode(encode(x)) is the VQGAN reconstruction
    torch.testing.assert_close(codec.decode(z), m.model.eval()(x)[0])
    idx = codec.encode_to_indices(x)
    assert idx.shape == (3, 8, 8)
    torch.testing.assert_close(codec.decode_indices(idx), codec.decode(z))  # up to the straight-through roundoff
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        codec.encode(torch.rand(1, 1, 15, 16))
    io.export(m, {"module": MODULE_CFG}, tmp_path / "export")
    built = instantiate({"_target_": "taming.first_stage.vqgan_codec", "path": str(tmp_path / "export")})
    torch.testing.assert_close(built.encode(x), z)
