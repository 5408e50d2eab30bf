"""VAE latents: the ``LatentCodec`` protocol, its implementations, and a latent cache.

A codec maps pixels in [-1, 1] to the latents a generative model trains on and back::

    latents = (z - shift) * scale          # encode:  z = first_stage.encode(x)
    x       = first_stage.decode(latents / scale + shift)

``scale`` and ``shift`` come from the first stage's own config: Stable Diffusion's VAE 0.18215 / 0; SD3's
1.5305 / 0.0609; ``1/std`` of the latents (:func:`estimate_scale`) for an autoencoder you trained. Codecs are
frozen (:class:`gencore.modules.FrozenModule`): no grad, eval mode, outside the optimizer and outside exported
trainable state.

Implementations here: :class:`IdentityCodec` (pixel space) and :class:`DiffusersVAECodec` over diffusers
``AutoencoderKL`` (loaded by :func:`diffusers_vae` from a local diffusers folder or a single file). The packages'
own first stages (taming VQGAN, ldm KL autoencoder) subclass :class:`FrozenCodec`.

The latent cache encodes a dataset once into safetensors shards (:func:`build_latent_cache`) and serves them as a
dataset (:class:`LatentCacheDataset`), so diffusion training does not pay for the encoder every epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from gencore.modules import FrozenModule, own_precision

log = logging.getLogger(__name__)

__all__ = [
    "VAE_PRESETS",
    "DiffusersVAECodec",
    "FrozenCodec",
    "IdentityCodec",
    "LatentCacheDataset",
    "LatentCodec",
    "LatentNormalizer",
    "build_latent_cache",
    "diffusers_vae",
    "estimate_scale",
]


@runtime_checkable
class LatentCodec(Protocol):
    """What a generative model needs from its first stage."""

    latent_channels: int
    downsample_factor: int

    def encode(self, x: Tensor) -> Tensor:
        """(B, C, H, W) pixels in [-1, 1] -> (B, latent_channels, H/f, W/f) scaled latents."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> pixels in (about) [-1, 1]."""
        ...


class FrozenCodec(FrozenModule):
    """Base class: validation, scale/shift and freezing; subclasses implement ``_encode`` / ``_decode``."""

    def __init__(
        self, *, in_channels: int, latent_channels: int, downsample_factor: int, scale: float = 1.0, shift: float = 0.0
    ) -> None:
        super().__init__()
        if scale <= 0 or not math.isfinite(scale):
            raise ValueError(f"codec scale must be a positive finite number, got {scale}")
        self.in_channels = int(in_channels)
        self.latent_channels = int(latent_channels)
        self.downsample_factor = int(downsample_factor)
        self.scale = float(scale)
        self.shift = float(shift)

    def _encode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def latent_shape(self, image_shape: Iterable[int]) -> tuple[int, int, int]:
        """(C, H, W) of the latents for an image of shape (C, H, W) or (H, W)."""
        *_, h, w = tuple(image_shape)
        self._check_size(h, w)
        f = self.downsample_factor
        return self.latent_channels, h // f, w // f

    def _check_size(self, h: int, w: int) -> None:
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(
                f"{type(self).__name__}: image size {h}x{w} is not divisible by the downsampling factor {f}"
            )

    @own_precision
    def encode(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{type(self).__name__}.encode: x must be (B, C, H, W), got {getattr(x, 'shape', x)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}.encode: expected {self.in_channels} image channels, got {x.shape[1]}"
            )
        self._check_size(x.shape[2], x.shape[3])
        return (self._encode(x) - self.shift) * self.scale

    @own_precision
    def decode(self, z: Tensor) -> Tensor:
        if not isinstance(z, Tensor) or z.dim() != 4:
            raise ValueError(f"{type(self).__name__}.decode: z must be (B, C, h, w), got {getattr(z, 'shape', z)}")
        if z.shape[1] != self.latent_channels:
            raise ValueError(
                f"{type(self).__name__}.decode: expected {self.latent_channels} latent channels, got {z.shape[1]}"
            )
        return self._decode(z / self.scale + self.shift)

    def extra_repr(self) -> str:
        f, c = self.downsample_factor, self.latent_channels
        return f"latent_channels={c}, f={f}, scale={self.scale}, shift={self.shift}"


class IdentityCodec(FrozenCodec):
    """Pixel space: latents are the pixels (scale 1, shift 0, f = 1)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__(in_channels=channels, latent_channels=channels, downsample_factor=1)

    def _encode(self, x: Tensor) -> Tensor:
        return x

    def _decode(self, z: Tensor) -> Tensor:
        return z


# diffusers AutoencoderKL configs of the released VAEs (config.json of the hub folders), for single-file loading
_SD_BLOCKS = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
}
VAE_PRESETS: dict[str, dict[str, Any]] = {
    # Stable Diffusion v1 / v2 KL-f8 VAE (= LDM kl-f8)
    "sd": {**_SD_BLOCKS, "latent_channels": 4, "sample_size": 512, "scaling_factor": 0.18215},
    # Stable Diffusion XL
    "sdxl": {**_SD_BLOCKS, "latent_channels": 4, "sample_size": 1024, "scaling_factor": 0.13025},
    # Stable Diffusion 3 / 3.5: 16 channels, no quant convs, scale and shift
    "sd3": {
        **_SD_BLOCKS,
        "latent_channels": 16,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
}


class DiffusersVAECodec(FrozenCodec):
    """A diffusers ``AutoencoderKL`` as a codec; scale/shift from ``vae.config`` unless given.

    ``sample_posterior``: encode with a sample of q(z|x) (LDM training) instead of its mode.
    """

    def __init__(
        self,
        vae: nn.Module,
        *,
        sample_posterior: bool = False,
        scale: float | None = None,
        shift: float | None = None,
    ) -> None:
        cfg = getattr(vae, "config", None)
        if cfg is None or not hasattr(cfg, "latent_channels"):
            raise ValueError(f"DiffusersVAECodec: expected a diffusers AutoencoderKL, got {type(vae).__name__}")
        scale = cfg.scaling_factor if scale is None else scale
        shift = (getattr(cfg, "shift_factor", None) or 0.0) if shift is None else shift
        super().__init__(
            in_channels=cfg.in_channels,
            latent_channels=cfg.latent_channels,
            downsample_factor=2 ** (len(cfg.block_out_channels) - 1),
            scale=scale,
            shift=shift,
        )
        self.vae = vae
        self.sample_posterior = sample_posterior
        self.freeze()

    def _encode(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
            z = dist.sample() if self.sample_posterior else dist.mode()
        return z.to(x.dtype)

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(self.vae.dtype)).sample.to(z.dtype)


def _vae_config(config: str | os.PathLike | Mapping | None) -> dict[str, Any]:
    if config is None:
        raise ValueError(
            f"diffusers_vae: a single-file VAE needs `config`: one of {sorted(VAE_PRESETS)}, a diffusers "
            "config.json / folder, or a dict"
        )
    if isinstance(config, Mapping):
        return dict(config)
    if str(config) in VAE_PRESETS:
        return dict(VAE_PRESETS[str(config)])
    p = Path(config)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(
            f"diffusers_vae: config {config!r} is neither a preset ({sorted(VAE_PRESETS)}) nor a file"
        )
    raw = json.loads(p.read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def diffusers_vae(
    path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    config: str | os.PathLike | Mapping | None = None,
    sample_posterior: bool = False,
    scale: float | None = None,
    shift: float | None = None,
    dtype: str | torch.dtype | None = None,
) -> DiffusersVAECodec:
    """Load an ``AutoencoderKL`` codec offline from a local diffusers folder or a single weights file.

    - folder: ``AutoencoderKL.from_pretrained(path, subfolder=...)`` (e.g. an SD3 snapshot with ``subfolder="vae"``);
    - file (``.safetensors`` / ``.ckpt``): weights in diffusers names, or in the original LDM names
      (``encoder.down.0.block.0...``, optionally under ``first_stage_model.`` in a full SD checkpoint), converted
      with diffusers' own key map; ``config`` gives the architecture (a preset name: ``sd``, ``sdxl``, ``sd3``).
    """
    from diffusers import AutoencoderKL

    from gencore.io import extract_state_dict, load_checkpoint, load_state_dict

    p = Path(path)
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if p.is_dir():
        vae = AutoencoderKL.from_pretrained(p, subfolder=subfolder, local_files_only=True, torch_dtype=torch_dtype)
    elif p.is_file():
        cfg = _vae_config(config)
        state = extract_state_dict(load_checkpoint(p))
        if any(k.startswith(("encoder.down.", "first_stage_model.", "vae.encoder.down.")) for k in state):
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            state = convert_ldm_vae_checkpoint(state, cfg)
        vae = AutoencoderKL(**cfg)
        load_state_dict(vae, state, source=str(p))
        if torch_dtype is not None:
            vae = vae.to(torch_dtype)
    else:
        raise FileNotFoundError(f"diffusers_vae: no VAE folder or weights file at {p}")
    return DiffusersVAECodec(vae, sample_posterior=sample_posterior, scale=scale, shift=shift)


@torch.no_grad()
def estimate_scale(codec: FrozenCodec, images: Tensor | Iterable[Tensor], *, set_scale: bool = True) -> float:
    """1/std of the *unscaled* latents of ``images`` (a batch or an iterable of batches); LDM's ``scale_by_std``.

    With ``set_scale`` the codec's scale is updated (shift is kept).
    """
    batches = [images] if isinstance(images, Tensor) else list(images)
    if not batches:
        raise ValueError("estimate_scale: no images given")
    z = torch.cat([codec._encode(b) - codec.shift for b in batches])
    std = z.float().std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"estimate_scale: latent std is {std}; cannot set a scale")
    if set_scale:
        codec.scale = 1.0 / std
    return 1.0 / std


# ------------------------------------------------------------------------------------------- latent normaliser


class LatentNormalizer(nn.Module):
    """The model-side scale and shift of the latents: ``normalize(z) = (z - shift) * scale``, ``denormalize`` back.

    A first stage's published constants (SD 0.18215; SD3 1.5305 / 0.0609) belong to its codec; this module holds the
    numbers that belong to the *generative model*: fixed ones, or ones estimated from the first training batch, as
    LDM's ``scale_by_std`` (scale = 1 / std of the latents) and the shift-and-scale SD3 applies, for an autoencoder you
    trained yourself. ``scale=None`` / ``shift=None`` estimate that number at the first :meth:`normalize` call in
    training mode (shift = the latents' mean; scale = 1 / their standard deviation, as LDM), averaged over every
    process of a ``torch.distributed`` run, so all replicas agree. Both are float32 buffers: saved in checkpoints,
    exported with the weights, restored by ``load_state_dict`` (an estimated run that resumes keeps its numbers).

    Readiness is a host flag (no device sync per call): known at construction, set by the estimate, and looked at
    again (one check, at load time) when a state dict is loaded. Normalising in eval mode before the numbers exist
    is a RuntimeError.
    """

    def __init__(self, scale: float | None = 1.0, shift: float | None = 0.0) -> None:
        super().__init__()
        if scale is not None and not (math.isfinite(float(scale)) and float(scale) > 0):
            raise ValueError(f"latent scale must be a finite number > 0 (or None to estimate it), got {scale!r}")
        if shift is not None and not math.isfinite(float(shift)):
            raise ValueError(f"latent shift must be a finite number (or None to estimate it), got {shift!r}")
        nan = float("nan")
        self.register_buffer("scale", torch.tensor(nan if scale is None else float(scale)))
        self.register_buffer("shift", torch.tensor(nan if shift is None else float(shift)))
        self._ready = scale is not None and shift is not None
        self.register_load_state_dict_post_hook(lambda module, keys: module._look_again())

    def _look_again(self) -> None:
        """After a state dict was loaded (one host check, at load time, not in a training step)."""
        self._ready = not bool(torch.isnan(self.scale) | torch.isnan(self.shift))

    @property
    def ready(self) -> bool:
        """Whether both numbers are known (a host flag: set at construction, by :meth:`estimate` and on loading)."""
        return self._ready

    @torch.no_grad()
    def estimate(self, z: Tensor) -> None:
        """Fill the unknown buffers from latents ``z`` (B, ...) (mean and variance over every element and process)."""
        import torch.distributed as dist

        z = z.detach().float()
        stats = torch.stack([z.sum(), z.square().sum(), z.new_tensor(float(z.numel()))])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)
        mean = stats[0] / stats[2]
        var = (stats[1] / stats[2] - mean.square()).clamp_min(0.0)
        self.shift.copy_(torch.where(torch.isnan(self.shift), mean, self.shift))
        self.scale.copy_(torch.where(torch.isnan(self.scale), var.sqrt().clamp_min(1e-8).reciprocal(), self.scale))
        self._ready = True
        log.info("latent normaliser estimated from a batch of %d", z.shape[0])

    def normalize(self, z: Tensor) -> Tensor:
        if not self.ready:
            if not self.training:
                raise RuntimeError(
                    "the latent scale / shift are not set: they are estimated at the first training batch (train, load "
                    "a trained checkpoint, or give them)"
                )
            self.estimate(z)
        return (z - self.shift.to(z.dtype)) * self.scale.to(z.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        if not self.ready:
            raise RuntimeError("the latent scale / shift are not set (train first, or load a trained checkpoint)")
        return z / self.scale.to(z.dtype) + self.shift.to(z.dtype)

    forward = normalize

    def extra_repr(self) -> str:
        return f"scale={self.scale.item():.6g}, shift={self.shift.item():.6g}"


# ----------------------------------------------------------------------------------------------- latent cache

INDEX_NAME = "index.json"


def _fingerprint(codec: FrozenCodec, dataset: Dataset, image_key: str, extra: Mapping[str, Any]) -> str:
    meta = {
        **extra,
        "codec": type(codec).__qualname__,
        "scale": codec.scale,
        "shift": codec.shift,
        "latent_channels": codec.latent_channels,
        "dataset": type(dataset).__qualname__,
        "len": len(dataset),  # type: ignore[arg-type]
        "key": image_key,
        "params": sum(float(p.double().sum()) for p in codec.parameters()),
        "dataset_fingerprint": getattr(dataset, "fingerprint", None),  # what len() cannot tell apart (a union)
    }
    return hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def build_latent_cache(
    codec: FrozenCodec,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    image_key: str = "image",
    encode: Callable[[Tensor], Tensor | Mapping[str, Tensor]] | None = None,
    keys: Sequence[str] = ("label",),
    batch_size: int = 64,
    shard_size: int = 10_000,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Encode ``dataset`` once and write ``latents-XXXXX.safetensors`` shards plus ``index.json`` to ``out_dir``.

    Each item must be a dict with ``image_key``; the per-item values named in ``keys`` (integer ``label``s by default,
    e.g. also a dataset index) are stored as tensors, string ``caption``s in the index. ``encode`` replaces
    ``codec.encode``: it may return a dict with ``"latents"`` and other per-sample tensors (e.g. the posterior's
    ``"std"``, so training can draw posterior samples), which :class:`LatentCacheDataset` returns under their names.
    An existing cache with the same fingerprint (codec, scale, dataset size and the dataset's own ``fingerprint``
    attribute when it has one, encode function, keys) is reused.
    """
    from gencore.io import atomic_path, save_safetensors

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"build_latent_cache: batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    out = Path(out_dir)
    encode_fn = codec.encode if encode is None else encode
    keys = tuple(keys)
    name = getattr(encode, "__qualname__", type(encode).__qualname__) if encode is not None else None
    fp = _fingerprint(codec, dataset, image_key, {"encode": name, "keys": list(keys)})
    index_path = out / INDEX_NAME
    if index_path.is_file() and not overwrite:
        index = json.loads(index_path.read_text())
        if index.get("fingerprint") == fp:
            log.info("latent cache %s is up to date (%d samples)", out, index["num_samples"])
            return out
    device = torch.device(device) if device is not None else next(codec.parameters(), torch.empty(0)).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    shards: list[str] = []
    captions: list[str] = []
    buf: dict[str, list[Tensor]] = {}
    count = buffered = 0

    def flush() -> None:
        nonlocal buffered
        if not buf.get("latents"):
            return
        tensors = {k: torch.cat(v) for k, v in buf.items() if v}
        shard = f"latents-{len(shards):05d}.safetensors"
        save_safetensors(tensors, out / shard)
        shards.append(shard)
        buf.clear()
        buffered = 0

    for batch in loader:
        if not isinstance(batch, Mapping) or image_key not in batch:
            raise ValueError(f"build_latent_cache: dataset items must be dicts with key {image_key!r}")
        encoded = encode_fn(batch[image_key].to(device))
        encoded = dict(encoded) if isinstance(encoded, Mapping) else {"latents": encoded}
        if "latents" not in encoded:
            raise ValueError(f"build_latent_cache: encode returned {sorted(encoded)}, without 'latents'")
        z = encoded["latents"]
        for k, v in encoded.items():
            buf.setdefault(k, []).append(v.detach().to("cpu", dtype))
        for k in keys:
            if k in batch:
                value = torch.as_tensor(batch[k])
                buf.setdefault(k, []).append(value.long() if not value.is_floating_point() else value)
        if "caption" in batch:
            captions.extend(list(batch["caption"]))
        count += z.shape[0]
        buffered += z.shape[0]
        if buffered >= shard_size:
            flush()
    flush()
    if count == 0:
        raise ValueError("build_latent_cache: the dataset is empty")
    index = {
        "fingerprint": fp,
        "num_samples": count,
        "shards": shards,
        "latent_shape": list(z.shape[1:]),
        "scale": codec.scale,
        "shift": codec.shift,
        "captions": captions or None,
    }
    with atomic_path(index_path) as tmp:
        tmp.write_text(json.dumps(index))
    for stale in out.glob("latents-*.safetensors"):  # shards of an earlier, different cache
        if stale.name not in shards:
            stale.unlink()
    log.info("latent cache: %d samples -> %s (%d shards)", count, out, len(shards))
    return out


class LatentCacheDataset(Dataset):
    """Items ``{"latent": (C, h, w), "label": int?, "caption": str?, <name>: tensor ...}`` of a cache from
    :func:`build_latent_cache` (or of the same layout, e.g. ladd_turbo's synthetic teacher latents): every other tensor
    a shard holds per sample (text features ``context`` / ``pooled``) is returned under its own name."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        root = Path(path)
        index_path = root / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"LatentCacheDataset: {index_path} not found (build the cache first)")
        self.index = json.loads(index_path.read_text())
        parts = [load_file(str(root / s)) for s in self.index["shards"]]
        self.latents = torch.cat([p["latents"] for p in parts])
        self.labels = torch.cat([p["label"] for p in parts]) if all("label" in p for p in parts) else None
        self.captions = self.index.get("captions")
        names = set.intersection(*(set(p) for p in parts)) - {"latents", "label"} if parts else set()
        self.extra = {name: torch.cat([p[name] for p in parts]) for name in sorted(names)}
        if len(self.latents) != self.index["num_samples"]:
            raise ValueError(
                f"LatentCacheDataset: {root} holds {len(self.latents)} latents, index says "
                f"{self.index['num_samples']} (rebuild the cache)"
            )

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"latent": self.latents[i]}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        if self.captions:
            item["caption"] = self.captions[i]
        for name, values in self.extra.items():
            item[name] = values[i]
        return item
