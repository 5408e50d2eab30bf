"""Gen-1 training as a LightningModule (Esser et al. 2023, arXiv 2302.03011, Sec. 3.2 "training"), built from injected
objects: the video UNet (:mod:`gen1_video.models.video_unet`), ldm's frozen first stage (or pixel space), a structure
estimator (:mod:`gen1_video.structure`) and a content encoder (:mod:`gen1_video.content`).

**Objective** (ldm's :class:`~ldm.losses.DiffusionLoss` on video latents (B, C, T, h, w), ldm's schedule): for each
clip, t ~ U{0..T-1}, z_t = q_sample(z_0, t, ε), L = ||ε − ε_θ(z_t, t, s, t_s, c)||² with

- the structure s: the estimator's per-frame map, taken through t_s blur + downsample levels and resized to the latent
  grid (:func:`~gen1_video.structure.structure_condition`), t_s ~ U{0..max_structure_level} **per clip**;
- the content c: the content encoder's embedding of **one uniformly random frame** of the clip
  (:func:`~gen1_video.content.random_frame_index`), replaced by the null content (zeros) with probability
  ``p_uncond`` (:func:`gencore.diffusion.drop_condition`) for classifier-free guidance.

**Joint image / video training**: when the batches carry images (``batch["image"]``, (B, K, C, H, W), see
:class:`gen1_video.data.JointClips`), a fraction ``image_ratio`` of the training steps trains on them instead, as
one-frame clips in image mode (every temporal layer skipped), with the image's own embedding as content. Which steps
are image steps is a fixed function of the step count (no randomness, no host sync, the same after a resume).

**From an image LDM**: ``init_from`` (an ldm-train run, export or ``pkg://`` path of a :class:`ldm.lit.LatentDiffusion`)
loads that model's UNet into the spatial layers (strict: the video UNet must be built with the image UNet's
configuration) and its latent scale, when training starts (a resumed run's checkpoint then replaces them); its first
stage must be this module's first stage (compared weight by weight). ``train_only_temporal`` trains the temporal
layers alone (everything else frozen); ``temporal_learning_rate`` gives them their own learning rate.

The training step never waits on the device: the step's kind is decided from the Python step counter, t / t_s / the
content frame are drawn on the device, and the loss curves per timestep bin are written only on logging steps.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from gen1_video.content import ContentEncoder, ConvContentEncoder, random_frame_index, select_frames
from gen1_video.models.video_unet import VideoUNetModel
from gen1_video.sampling import sample_video
from gen1_video.structure import SobelEdges, structure_condition
from gencore.diffusion import LossBuckets, check_probability, ddim_timesteps, drop_condition
from gencore.latents import IdentityCodec, LatentNormalizer
from gencore.modules import freeze
from gencore.training import scaled_learning_rate
from ldm.diffusion import DiffusionSchedule
from ldm.losses import DiffusionLoss

log = logging.getLogger(__name__)

__all__ = ["SAMPLE_OPTIONS", "Gen1VideoDiffusion", "is_image_step"]

#: defaults of the sampling options of :meth:`Gen1VideoDiffusion.edit` / ``generate`` (the module's ``sample``)
_SAMPLE_DEFAULTS = dict(
    num_steps=50,
    eta=0.0,
    guidance_scale=1.0,
    temporal_scale=1.0,
    structure_level=0,
    strength=1.0,
    frame_by_frame=False,
)
SAMPLE_OPTIONS = tuple(_SAMPLE_DEFAULTS)  #: their names


def is_image_step(step: int, ratio: float) -> bool:
    """Whether training step ``step`` is an image step when a fraction ``ratio`` of the steps are: the steps where
    ⌊(step + 1)·ratio⌋ grows (evenly spread; ratio 0.5 alternates video, image, ...; a pure function of the step)."""
    return int((step + 1) * ratio) > int(step * ratio)


def _rgb(x: Tensor) -> Tensor:
    """(N, 1 | 3, H, W) -> (N, 3, H, W): grey images repeated to RGB for the estimators and encoders."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _check_sample_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(opts) - set(SAMPLE_OPTIONS))
    if unknown:
        raise ValueError(f"sample: unknown option(s) {unknown}; expected {', '.join(SAMPLE_OPTIONS)}")
    out = {**_SAMPLE_DEFAULTS, **{k: v for k, v in opts.items() if v is not None}}
    if isinstance(out["num_steps"], bool) or not isinstance(out["num_steps"], int) or out["num_steps"] < 1:
        raise ValueError(f"sample.num_steps must be an integer >= 1, got {out['num_steps']!r}")
    strength = out["strength"]
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"sample.strength must be in (0, 1] (1: from pure noise), got {strength!r}")
    return out


class Gen1VideoDiffusion(L.LightningModule):
    """Gen-1's latent video diffusion (see the module docstring).

    Args:
        unet: a :class:`~gen1_video.models.video_unet.VideoUNetModel` (``latent_channels`` = the first stage's).
        first_stage: a frozen gencore codec (``ldm.first_stage.kl_codec``); None = pixel space
            (``IdentityCodec(image_channels)``).
        structure: a structure estimator (frames (N, 3, H, W) -> maps (N, 1, H, W)); default Sobel edges.
        content: a content encoder (images -> (N, L, context_dim)); default a ConvContentEncoder of the UNet's width.
        image_channels / image_size / num_frames: the data (1 = grey frames, repeated to RGB for the estimator and
            the content encoder).
        frame_stride: frames between a clip's frames when ``generate`` reads its own source clips.
        schedule / parameterization: ldm's DiffusionSchedule kwargs and eps | x0 | v.
        p_uncond: probability of the null content per clip (classifier-free guidance).
        image_ratio: fraction of training steps on the image batches (image mode); needs batches with ``image``.
        train_only_temporal: train only the temporal layers (spatial UNet, content encoder frozen).
        learning_rate / temporal_learning_rate (default: learning_rate) / weight_decay / scale_lr: AdamW.
        scale_by_std / scale_factor: the latent scale (LDM's): 1/std of the first batch's latents, or fixed.
        init_from: an image LDM (ldm run / export / pkg://) to start the spatial layers from.
        structure_init_std: > 0 draws the structure channels' first-conv weights from N(0, std²) when training
            starts (after ``init_from``) instead of leaving them at zero (``VideoUNetModel.init_structure_weights``).
        content_augment: > 0 moves the content frame at random in training (:meth:`augment_content`: zoom up to
            1 / (1 − a), shift up to a, horizontal flip), so its embedding cannot carry the clip's exact layout (ours,
            not the paper's: CLIP embeddings carry little layout; an encoder trained with the model learns to).
        sample: defaults of ``generate`` / ``edit`` (``num_steps``, ``eta``, ``guidance_scale``, ``temporal_scale``,
            ``structure_level``, ``strength``, ``frame_by_frame``).
        n_buckets: timestep bins of the logged loss curves.
    """

    def __init__(
        self,
        unet: VideoUNetModel,
        first_stage: nn.Module | None = None,
        structure: nn.Module | None = None,
        content: ContentEncoder | None = None,
        *,
        image_channels: int = 3,
        image_size: int = 32,
        num_frames: int = 8,
        frame_stride: int = 1,
        schedule: dict[str, Any] | None = None,
        parameterization: str = "eps",
        p_uncond: float = 0.1,
        image_ratio: float = 0.0,
        train_only_temporal: bool = False,
        learning_rate: float = 1e-4,
        temporal_learning_rate: float | None = None,
        weight_decay: float = 0.0,
        scale_lr: bool = False,
        scale_by_std: bool = False,
        scale_factor: float = 1.0,
        init_from: str | None = None,
        structure_init_std: float = 0.0,
        content_augment: float = 0.0,
        video_key: str = "video",
        image_key: str = "image",
        sample: dict[str, Any] | None = None,
        n_buckets: int = 10,
    ) -> None:
        super().__init__()
        if not isinstance(unet, VideoUNetModel):
            raise ValueError(f"unet must be a gen1_video VideoUNetModel, got {type(unet).__name__}")
        if unet.structure_channels != 1:
            raise ValueError(f"the structure estimators give 1-channel maps; unet has {unet.structure_channels}")
        for name, value in (("learning_rate", learning_rate), ("temporal_learning_rate", temporal_learning_rate)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0.0 <= image_ratio < 1.0:
            raise ValueError(f"image_ratio must be in [0, 1) (the fraction of image steps), got {image_ratio}")
        if num_frames < 1 or num_frames > unet.max_frames:
            raise ValueError(f"num_frames={num_frames} must be in [1, unet.max_frames={unet.max_frames}]")
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {frame_stride}")
        if not 0.0 <= content_augment < 1.0:
            raise ValueError(f"content_augment must be in [0, 1) (0: off), got {content_augment}")
        if not structure_init_std >= 0:
            raise ValueError(f"structure_init_std must be >= 0, got {structure_init_std}")
        if scale_by_std and scale_factor != 1.0:
            raise ValueError(f"scale_by_std estimates the latent scale: do not also give scale_factor={scale_factor}")

        codec = first_stage if first_stage is not None else IdentityCodec(image_channels)
        self.first_stage_model = freeze(codec)
        if codec.in_channels != image_channels:
            raise ValueError(f"image_channels={image_channels} but the first stage takes {codec.in_channels}")
        if codec.latent_channels != unet.latent_channels:
            raise ValueError(
                f"the first stage gives {codec.latent_channels}-channel latents, unet takes {unet.latent_channels}"
            )
        f = codec.downsample_factor
        if image_size % f:
            raise ValueError(f"image_size {image_size} is not divisible by the first stage's factor {f}")
        self.latent_size = image_size // f
        self.latent_norm = LatentNormalizer(scale=None if scale_by_std else scale_factor, shift=0.0)

        self.unet = unet
        self.structure = structure if structure is not None else SobelEdges()
        if content is None:
            content = ConvContentEncoder(context_dim=unet.context_dim, image_size=image_size)
        if getattr(content, "context_dim", None) != unet.context_dim:
            raise ValueError(
                f"the content encoder gives {getattr(content, 'context_dim', None)}-wide tokens, the unet "
                f"cross-attends {unet.context_dim}"
            )
        self.content = content
        self.image_channels, self.image_size, self.num_frames = image_channels, image_size, num_frames
        self.frame_stride = frame_stride
        self.max_structure_level = unet.max_structure_level

        self.schedule = DiffusionSchedule(**(schedule or {}))
        self.parameterization = parameterization
        self.loss_fn = DiffusionLoss(self.schedule, parameterization=parameterization)
        self.p_uncond = float(check_probability(p_uncond, "p_uncond"))  # type: ignore[arg-type]
        self.image_ratio = float(image_ratio)
        self.train_only_temporal = bool(train_only_temporal)
        if self.train_only_temporal:
            temporal = {id(p) for p in unet.temporal_parameters()}
            for p in self.parameters():
                if id(p) not in temporal:
                    p.requires_grad_(False)
        self.learning_rate, self.temporal_learning_rate = learning_rate, temporal_learning_rate
        self.weight_decay, self.scale_lr = weight_decay, scale_lr
        self.init_from = init_from
        self.structure_init_std = float(structure_init_std)
        self.content_augment = float(content_augment)
        self.video_key, self.image_key = video_key, image_key
        self.sample_kwargs = _check_sample_options(sample or {})
        self.loss_buckets = {
            split: LossBuckets(n_buckets, prefix="loss_simple_t", num_train_timesteps=self.schedule.num_timesteps)
            for split in ("train", "val")
        }

    # ------------------------------------------------------------------------------------------ data checks

    def check_datamodule(self, datamodule: Any) -> None:
        """The data fits the model (called by gencore.run.train before anything is written)."""
        from gencore.validate import ConfigError

        problems = []
        size, channels = getattr(datamodule, "image_size", None), getattr(datamodule, "channels", None)
        frames = getattr(datamodule, "num_frames", None)
        if isinstance(size, int) and size != self.image_size:
            problems.append(f"datamodule.size={size} but module.image_size={self.image_size}")
        if isinstance(channels, int) and channels != self.image_channels:
            problems.append(f"datamodule.channels={channels} but module.image_channels={self.image_channels}")
        if isinstance(frames, int) and frames > self.unet.max_frames:
            problems.append(f"datamodule.num_frames={frames} exceeds the unet's max_frames={self.unet.max_frames}")
        if self.image_ratio > 0 and not getattr(datamodule, "images_per_clip", 0):
            problems.append(
                f"module.image_ratio={self.image_ratio} needs image batches: set datamodule.images and "
                "datamodule.images_per_clip > 0"
            )
        if problems:
            raise ConfigError("the data does not fit the model:\n  " + "\n  ".join(problems))

    # ------------------------------------------------------------------------------ latents and conditions

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images (N, C, H, W) or clips (B, C, T, H, W) in [-1, 1] -> normalised latents of the same layout."""
        if x.dim() == 5:
            b = x.shape[0]
            z = self.encode(rearrange(x, "b c t h w -> (b t) c h w"))
            return rearrange(z, "(b t) c h w -> b c t h w", b=b)
        return self.latent_norm.normalize(self.first_stage_model.encode(x))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Latents (N, c, h, w) or (B, c, T, h, w) -> images / clips in [-1, 1] (clamped)."""
        if z.dim() == 5:
            b = z.shape[0]
            x = self.decode(rearrange(z, "b c t h w -> (b t) c h w"))
            return rearrange(x, "(b t) c h w -> b c t h w", b=b)
        return self.first_stage_model.decode(self.latent_norm.denormalize(z)).clamp(-1, 1)

    @torch.no_grad()
    def structure_maps(self, videos: Tensor) -> Tensor:
        """Clips (B, C, T, H, W) -> the estimator's maps (B, 1, T, H, W) at pixel resolution."""
        b = videos.shape[0]
        frames = rearrange(videos, "b c t h w -> (b t) c h w")
        maps = self.structure(_rgb(frames).float())
        return rearrange(maps, "(b t) c h w -> b c t h w", b=b)

    def structure_input(self, videos: Tensor, level: Tensor | int) -> Tensor:
        """The UNet's structure channels for clips at level t_s (int or (B,)): (B, 1, T, h, w)."""
        maps = self.structure_maps(videos)
        return structure_condition(maps, level, self.latent_size, max_level=self.max_structure_level)

    def encode_content(self, images: Tensor) -> Tensor:
        """Content images (N, C, H, W) -> context (N, L, D)."""
        return self.content(_rgb(images))

    def null_content(self, n: int) -> Tensor:
        return self.content.unconditional(n, device=self.device)

    # ---------------------------------------------------------------------------------------------- training

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        if self.init_from:
            self.load_image_ldm(self.init_from)
        if self.structure_init_std > 0:  # before a resumed run's checkpoint replaces every weight
            self.unet.init_structure_weights(self.structure_init_std)

    def load_image_ldm(self, path: str) -> None:
        """Start from the image LDM at ``path``: its UNet into the spatial layers, its latent scale (see the module
        docstring). Its first stage must equal this module's."""
        from gencore.run import load_module
        from ldm.lit import LatentDiffusion

        image = load_module(path)
        if not isinstance(image, LatentDiffusion):
            raise ValueError(f"init_from={path} holds a {type(image).__name__}, not an ldm LatentDiffusion model")
        ours, theirs = self.first_stage_model.state_dict(), image.first_stage_model.state_dict()
        same = type(self.first_stage_model) is type(image.first_stage_model) and ours.keys() == theirs.keys()
        same = same and all(
            ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k].to(ours[k])) for k in ours
        )
        if not same:
            raise ValueError(
                f"init_from={path}: that image LDM was trained over another first stage than this module's "
                "(pass first_stage=<the autoencoder it used>, or leave first_stage unset to take it from init_from)"
            )
        self.unet.load_image_state_dict(image.model.diffusion_model.state_dict(), source=f"init_from={path}")
        if image.latent_norm.ready:
            self.latent_norm.load_state_dict(image.latent_norm.state_dict())
        log.info("initialised the spatial layers and the latent scale from the image LDM %s", path)

    def _loss(
        self, clips: Tensor, split: str, *, image_mode: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """The diffusion loss of clips (B, C, T, H, W): t_s per clip, content from one random frame (dropped with
        ``p_uncond`` in training). ``image_mode``: images as one-frame clips through the image model (no temporal
        layers; their content is the image itself), kept out of the video loss's per-timestep buckets."""
        b, _, t = clips.shape[:3]
        z = self.encode(clips)  # (B, c, T, h, w)
        level = torch.randint(0, self.max_structure_level + 1, (b,), device=self.device, generator=generator)
        structure = self.structure_input(clips, level)
        frame = random_frame_index(b, t, device=self.device, generator=generator)
        content_images = select_frames(clips, frame)
        if split == "train" and self.content_augment > 0:
            content_images = self.augment_content(content_images, generator=generator)
        content = self.encode_content(content_images)  # (B, L, D)
        if split == "train" and self.p_uncond > 0:
            content, _ = drop_condition(content, self.null_content(1), self.p_uncond)
        cond = {"context": content, "structure": structure, "structure_level": level}
        denoise = functools.partial(self.unet, image_mode=image_mode)
        kw: dict[str, Any] = {}
        if generator is not None:
            kw = {
                "t": torch.randint(0, self.schedule.num_timesteps, (b,), device=self.device, generator=generator),
                "noise": torch.randn(z.shape, device=self.device, generator=generator),
            }
        buckets = None if image_mode else self.loss_buckets[split]
        loss, _ = self.loss_fn(denoise, z, cond, buckets=buckets, **kw)
        return loss

    def augment_content(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Content images (N, C, H, W), each zoomed by 1 / s with s ~ U[1 − a, 1], shifted by up to ±a (of the half
        width, in each direction), flipped left-right with probability 1/2 (a = ``content_augment``; reflected
        borders). Drawn on the device: no host sync."""
        n, a = images.shape[0], self.content_augment
        where = generator.device if generator is not None else images.device
        u = torch.rand(n, 4, generator=generator, device=where).to(images.device, torch.float32)
        scale = 1.0 - a * u[:, 0]
        flip = torch.where(u[:, 3] < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=images.device)
        theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
        theta[:, 0, 2], theta[:, 1, 2] = a * (2 * u[:, 1] - 1), a * (2 * u[:, 2] - 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images.float(), grid, padding_mode="reflection", align_corners=False).to(images.dtype)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        if self.image_ratio > 0 and is_image_step(self.global_step, self.image_ratio):
            images = batch.get(self.image_key)
            if images is None:
                raise ValueError(f"image_ratio={self.image_ratio} but the batch has no {self.image_key!r} images")
            images = images.flatten(0, 1) if images.dim() == 5 else images  # (B, K, C, H, W) -> (B·K, C, H, W)
            loss = self._loss(images[:, :, None], "train", image_mode=True)  # (N, C, 1, H, W)
            self.log("train/loss_image", loss, prog_bar=True, batch_size=images.shape[0])
        else:
            videos = batch[self.video_key]
            loss = self._loss(videos, "train")
            self.log("train/loss_video", loss, prog_bar=True, batch_size=videos.shape[0])
        self.log("train/loss", loss, batch_size=1)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.loss_buckets["train"].log(self, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.latent_norm.ready:
            return  # the latent scale is estimated at the first training batch
        g = torch.Generator(device=self.device).manual_seed(batch_idx)  # the same t / noise every validation
        videos = batch[self.video_key]
        loss = self._loss(videos, "val", generator=g)
        self.log("val/loss", loss, prog_bar=True, batch_size=videos.shape[0])

    def on_validation_epoch_end(self) -> None:
        self.loss_buckets["val"].log(self, "val", force=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = scaled_learning_rate(self, self.learning_rate, self.scale_lr)
        t_lr = lr if self.temporal_learning_rate is None else self.temporal_learning_rate
        temporal = {id(p) for p in self.unet.temporal_parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if id(p) in temporal], "lr": t_lr, "name": "temporal"},
            {"params": [p for p in params if id(p) not in temporal], "lr": lr, "name": "spatial"},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=self.weight_decay)

    # ---------------------------------------------------------------------------------------------- sampling

    def _denoiser(self, frame_by_frame: bool) -> Any:
        if not frame_by_frame:
            return self.unet

        def image_model(x: Tensor, t: Tensor, *, image_mode: bool, **cond: Any) -> Tensor:
            return self.unet(x, t, image_mode=True, **cond)  # every call frame-wise: the image model

        return image_model

    @torch.no_grad()
    def edit(
        self,
        videos: Tensor,
        content: Tensor,
        *,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> Tensor:
        """Clips (B, C, T, H, W) in [-1, 1] re-rendered with content ``content`` (context (B, L, D) or (1, L, D),
        e.g. :meth:`encode_content`) and the clips' own structure at level ``structure_level``; guided DDIM
        (``guidance_scale`` ω on the content, ``temporal_scale`` ω_t) from the clips' latents noised to ``strength``
        (1: from pure noise; the structure alone carries the input), or with the image model on every frame
        (``frame_by_frame``: the baseline). Returns (B, C, T, H, W) in [-1, 1]."""
        opts = _check_sample_options({**self.sample_kwargs, **{k: v for k, v in options.items() if v is not None}})
        videos = videos.to(self.device)
        if videos.dim() != 5 or videos.shape[1] != self.image_channels:
            raise ValueError(
                f"videos must be (B, {self.image_channels}, T, H, W) clips in [-1, 1], got {tuple(videos.shape)}"
            )
        if tuple(videos.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"videos must be {self.image_size}x{self.image_size}, got {tuple(videos.shape[-2:])}")
        b, _, t = videos.shape[:3]
        if not opts["frame_by_frame"] and t > self.unet.max_frames:
            raise ValueError(f"{t} frames exceed the model's max_frames={self.unet.max_frames}: edit shorter clips")
        level = opts["structure_level"]
        structure = self.structure_input(videos, level)  # (checks t_s against max_structure_level)
        content = content.to(self.device)
        if content.shape[0] == 1 and b > 1:
            content = content.expand(b, -1, -1)
        z0 = self.encode(videos)
        steps = ddim_timesteps(int(opts["num_steps"]), self.schedule.num_timesteps)
        full = float(opts["strength"]) >= 1.0
        steps = steps if full else steps[: max(1, round(float(opts["strength"]) * len(steps)))]
        noise = torch.randn(z0.shape, generator=generator, device="cpu" if generator is None else generator.device)
        noise = noise.to(self.device)
        z_T = noise if full else self.schedule.q_sample(z0, steps[-1], noise)  # SDEdit-style: noised to strength
        z = sample_video(
            self._denoiser(bool(opts["frame_by_frame"])),
            z_T,
            self.schedule,
            steps,
            context=content,
            uncond_context=self.null_content(1),
            structure=structure,
            structure_level=level,
            guidance_scale=float(opts["guidance_scale"]),
            # the image model on every frame has no video mode to guide towards: ω_t would only add passes
            temporal_scale=1.0 if opts["frame_by_frame"] else float(opts["temporal_scale"]),
            eta=float(opts["eta"]),
            parameterization=self.parameterization,
            generator=generator,
        )
        return self.decode(z)

    def source_clips(self, n: int, paths: Any = None) -> Tensor:
        """``n`` clips of the module's length, size and channels from the videos at ``paths`` (default: the opencv-doc
        samples), taken from the videos in turn (clip j from video j mod V, evenly spread within it), so that
        neighbouring clips come from different videos: (n, C, T, H, W)."""
        from gen1_video.data import Clips

        clips = Clips(
            paths,
            num_frames=self.num_frames,
            stride=self.frame_stride,
            size=self.image_size,
            channels=self.image_channels,
        )
        per_video: dict[int, list[int]] = {}
        for i, (v, _, _) in enumerate(clips.clips):
            per_video.setdefault(v, []).append(i)
        videos = list(per_video.values())
        v_count = len(videos)
        # clips j = v, v + V, ... come from video v, spread evenly over its clips
        pick = [
            [own[int(i)] for i in torch.linspace(0, len(own) - 1, len(range(v, n, v_count))).round().long()]
            for v, own in enumerate(videos)
        ]
        order = [pick[j % v_count][j // v_count] for j in range(n)]
        return torch.stack([clips[i]["video"] for i in order])

    @torch.no_grad()
    def generate(
        self,
        n: int,
        *,
        videos: Tensor | None = None,
        content_images: Tensor | None = None,
        paths: Any = None,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> dict[str, Tensor]:
        """``n`` edited clips (``gencore.run.sample``'s call): structure from ``videos`` (default: :meth:`source_clips`
        of ``paths``), content from ``content_images`` (default: the middle frame of the next clip: another clip than
        the structure's, of another video when there are several). Returns ``{"images": (n, C, T, H, W), "sources":
        the input clips, "content": the content images}``; ``options`` as :meth:`edit`."""
        videos = self.source_clips(n, paths) if videos is None else videos[:n]
        videos = videos.to(self.device)
        if content_images is None:
            content_images = videos[:, :, videos.shape[2] // 2].roll(-1, dims=0)  # (n, C, H, W)
        content_images = content_images[:n].to(self.device)
        out = self.edit(videos, self.encode_content(content_images), generator=generator, **options)
        return {"images": out, "sources": videos, "content": content_images}

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 4) -> dict[str, Tensor]:
        videos = batch[self.video_key][:n].to(self.device)
        opts = {"num_steps": min(int(self.sample_kwargs["num_steps"]), 20)}
        edited = self.generate(videos.shape[0], videos=videos, **opts)["images"]
        return {"inputs": videos, "reconstructions": self.decode(self.encode(videos)), "samples": edited}
