import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.utils.data import Dataset

from gencore import io
from gencore.latents import (
    DiffusersVAECodec,
    IdentityCodec,
    LatentCacheDataset,
    LatentCodec,
    build_latent_cache,
    diffusers_vae,
    estimate_scale,
)
from gencore.modules import trainable_parameters


def tiny_vae(latent_channels=4, scaling_factor=0.18215, shift_factor=None, **kw):
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **kw,
    )


def test_identity_codec_is_a_frozen_codec():
    c = IdentityCodec(3)
    x = torch.randn(2, 3, 8, 8)
    assert isinstance(c, LatentCodec)
    assert torch.equal(c.decode(c.encode(x)), x)
    assert c.latent_shape((3, 8, 8)) == (3, 8, 8)


def test_vae_codec_shapes_and_scale_from_config():
    vae = tiny_vae()
    codec = DiffusersVAECodec(vae)
    assert isinstance(codec, LatentCodec)
    assert (codec.scale, codec.shift, codec.downsample_factor, codec.latent_channels) == (0.18215, 0.0, 2, 4)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 8, 8) and codec.latent_shape(x.shape[1:]) == (4, 8, 8)
    # the codec applies exactly (z - shift) * scale on top of the VAE's posterior mode
    raw = vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, raw * 0.18215)
    y = codec.decode(z)
    assert y.shape == x.shape
    torch.testing.assert_close(y, vae.decode(raw).sample)


def test_sd3_style_scale_and_shift_round_trip():
    vae = tiny_vae(
        latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )
    codec = DiffusersVAECodec(vae)
    assert (codec.scale, codec.shift) == (1.5305, 0.0609)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    raw = vae.encode(x).latent_dist.mode()
    z = codec.encode(x)
    torch.testing.assert_close(z, (raw - 0.0609) * 1.5305)
    # decode undoes the scaling exactly: decode(encode) == vae.decode(raw)
    torch.testing.assert_close(codec.decode(z), vae.decode(raw).sample, atol=1e-5, rtol=1e-5)
    # explicit values win over the config
    assert DiffusersVAECodec(vae, scale=2.0, shift=0.0).scale == 2.0


def test_codec_is_frozen_and_excluded_from_optimization():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.codec = DiffusersVAECodec(tiny_vae())
            self.net = nn.Conv2d(4, 4, 1)

    m = Model().train()
    assert not m.codec.training and not m.codec.vae.training  # .train() does not wake it up
    assert all(not p.requires_grad for p in m.codec.parameters())
    opt_params = list(trainable_parameters(m))
    assert opt_params and {id(p) for p in opt_params} == {id(p) for p in m.net.parameters()}
    assert io.frozen_prefixes(m) == ["codec."]
    z = m.codec.encode(torch.randn(1, 3, 16, 16))
    assert not z.requires_grad


def test_codec_rejects_bad_input():
    codec = DiffusersVAECodec(tiny_vae())
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 2"):
        codec.encode(torch.randn(1, 3, 15, 16))
    with pytest.raises(ValueError, match="expected 3 image channels, got 1"):
        codec.encode(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="expected 4 latent channels, got 16"):
        codec.decode(torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        codec.encode(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="expected a diffusers AutoencoderKL"):
        DiffusersVAECodec(nn.Linear(2, 2))


def test_load_from_local_folder_and_single_file(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    ref = DiffusersVAECodec(vae).encode(x)
    from_dir = diffusers_vae(tmp_path / "vae")
    torch.testing.assert_close(from_dir.encode(x), ref)
    # a single safetensors file in diffusers names + the config
    single = io.save_safetensors(vae.state_dict(), tmp_path / "vae.safetensors")
    from_file = diffusers_vae(single, config=tmp_path / "vae" / "config.json")
    torch.testing.assert_close(from_file.encode(x), ref)
    with pytest.raises(ValueError, match="needs `config`"):
        diffusers_vae(single)
    with pytest.raises(FileNotFoundError, match="no VAE folder or weights file"):
        diffusers_vae(tmp_path / "missing")
    # weights of another architecture: the mismatch is named
    other = io.save_safetensors(tiny_vae(latent_channels=8).state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(io.CheckpointKeyError, match="shape mismatch"):
        diffusers_vae(other, config=tmp_path / "vae" / "config.json")


def test_sd_presets_build_the_released_architectures():
    from gencore.latents import VAE_PRESETS

    sd3 = AutoencoderKL(**VAE_PRESETS["sd3"])
    assert sd3.config.latent_channels == 16 and sd3.quant_conv is None
    assert sum(p.numel() for p in sd3.parameters()) == 83_819_683  # the released SD3 VAE's size


def test_estimate_scale_gives_unit_variance():
    codec = DiffusersVAECodec(tiny_vae())
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    s = estimate_scale(codec, [x[:4], x[4:]])
    assert codec.scale == s
    assert codec.encode(x).std().item() == pytest.approx(1.0, rel=1e-4)


class _Images(Dataset):
    def __init__(self, n=10):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": i % 3, "caption": f"item {i}"}


def test_latent_cache_round_trip(tmp_path):
    codec = DiffusersVAECodec(tiny_vae())
    data = _Images(10)
    out = build_latent_cache(codec, data, tmp_path / "cache", batch_size=4, shard_size=4)
    ds = LatentCacheDataset(out)
    assert len(ds) == 10 and len(ds.index["shards"]) == 3
    with torch.no_grad():
        ref = codec.encode(data.x)
    for i in (0, 5, 9):
        item = ds[i]
        torch.testing.assert_close(item["latent"], ref[i], atol=1e-6, rtol=1e-5)
        assert item["label"] == i % 3 and item["caption"] == f"item {i}"
    # a second build with the same codec reuses the cache; a changed scale rebuilds it
    mtime = (out / "index.json").stat().st_mtime_ns
    build_latent_cache(codec, data, out, batch_size=4, shard_size=4)
    assert (out / "index.json").stat().st_mtime_ns == mtime
    codec.scale = 1.0
    build_latent_cache(codec, data, out, batch_size=4, shard_size=100)
    ds2 = LatentCacheDataset(out)
    assert ds2.index["scale"] == 1.0 and len(ds2.index["shards"]) == 1
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["latents-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match="build the cache first"):
        LatentCacheDataset(tmp_path / "nothing")


def test_freeze_keeps_any_module_in_eval_mode():
    import copy

    from gencore.modules import freeze

    parent = nn.Sequential(nn.Linear(2, 2), freeze(nn.Dropout(0.5)))
    parent.train()
    assert parent[0].training and not parent[1].training
    clone = copy.deepcopy(parent)
    clone.train()
    assert not clone[1].training and parent[1] is not clone[1]
    x = torch.ones(4, 2)
    assert torch.equal(clone[1](x), x)  # dropout inactive


def test_latent_cache_stores_what_encode_returns_and_named_keys(tmp_path):
    class _Tagged(_Images):
        fingerprint = "v1"

        def __getitem__(self, i):
            return {**super().__getitem__(i), "dataset": 2 - i % 2}

    codec = IdentityCodec(3)
    data = _Tagged(6)

    def moments(x):
        return {"latents": x, "std": x.abs() * 0.5}

    out = build_latent_cache(codec, data, tmp_path / "c", encode=moments, keys=("label", "dataset"), batch_size=4)
    ds = LatentCacheDataset(out)
    assert set(ds.extra) == {"std", "dataset"}
    item = ds[3]
    torch.testing.assert_close(item["latent"], data.x[3])
    torch.testing.assert_close(item["std"], data.x[3].abs() * 0.5)
    assert item["label"] == 0 and int(item["dataset"]) == 1
    # the dataset's own fingerprint is part of the cache's: another composition of the same length rebuilds it
    mtime = (out / "index.json").stat().st_mtime_ns
    _Tagged.fingerprint = "v2"
    build_latent_cache(codec, data, out, encode=moments, keys=("label", "dataset"), batch_size=4)
    assert (out / "index.json").stat().st_mtime_ns != mtime
    with pytest.raises(ValueError, match="without 'latents'"):
        build_latent_cache(codec, data, tmp_path / "d", encode=lambda x: {"mean": x})


def test_codecs_keep_their_own_precision_inside_bf16_autocast():
    """A frozen VAE runs in fp32 inside a bf16-mixed step (gencore.modules.own_precision): the same latents and
    pixels as outside autocast, in float32, while the caller's layers around it still run in bf16."""
    from gencore.latents import FrozenCodec

    class ConvCodec(FrozenCodec):
        def __init__(self) -> None:
            super().__init__(in_channels=3, latent_channels=4, downsample_factor=2, scale=0.5)
            self.enc = torch.nn.Conv2d(3, 4, 2, stride=2)
            self.dec = torch.nn.ConvTranspose2d(4, 3, 2, stride=2)
            self.freeze()

        def _encode(self, x):
            return self.enc(x)

        def _decode(self, z):
            return self.dec(z)

    torch.manual_seed(0)
    codec, layer = ConvCodec(), torch.nn.Conv2d(4, 4, 1)
    x = torch.randn(2, 3, 8, 8)
    z_ref, x_ref = codec.encode(x), codec.decode(codec.encode(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = codec.encode(x)
        around = layer(z)
        rec = codec.decode(z.bfloat16())  # a bf16 denoiser's output
    assert z.dtype == torch.float32 and torch.equal(z, z_ref)
    assert around.dtype == torch.bfloat16  # autocast still on for the caller's layers
    assert rec.dtype == torch.float32 and (rec - x_ref).abs().max() < 0.05  # (z was rounded to bf16 on the way)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(codec.decode(z), x_ref)
