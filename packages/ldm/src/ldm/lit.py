"""Training recipes of Latent Diffusion as LightningModules, built from injected networks, conditioners and objectives.

- :class:`LatentDiffusion` — the DDPM (eps / x0 / v) over a frozen first stage's latents (or pixels), conditioned by
  an injected :mod:`ldm.conditioning` conditioner (class, text, concat for super-resolution / inpainting / semantic
  maps, hybrid, none) that also does the classifier-free-guidance dropout; DDIM / PLMS / DDPM sampling (guided,
  masked); the latents normalised by a :class:`gencore.latents.LatentNormalizer` (LDM's ``scale_factor``).
- :class:`AutoencoderKLModule` — the KL-regularised first stage (``ldm/models/autoencoder.py``): reconstruction +
  perceptual NLL with a scalar log-variance, KL, PatchGAN with adaptive weight from ``disc_start``; the two-optimizer
  GAN step of :class:`gencore.training.GANModule` (Adam, betas 0.5, 0.9), like taming's VQGAN recipe.

Step counting: Lightning counts optimizer steps, two per batch in the autoencoder recipe; ``disc_start`` counts batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.conditioning import NoConditioner, take
from gencore.diffusion import LossBuckets, check_probability, classifier_free_guidance, ddim_timesteps
from gencore.io import accept_legacy_keys
from gencore.latents import IdentityCodec, LatentNormalizer
from gencore.metrics import psnr
from gencore.modules import freeze
from gencore.training import GANModule, scaled_learning_rate
from ldm.conditioning import ROUTED, DiffusionWrapper, LatentConditioner, Unconditional, conditioner_from_legacy
from ldm.diffusion import DiffusionSchedule
from ldm.losses import DiffusionLoss, LPIPSWithDiscriminator
from ldm.sampling import ddim_sample, ddpm_sample, plms_sample

log = logging.getLogger(__name__)

__all__ = ["LEGACY_ARGUMENTS", "SAMPLERS", "AutoencoderKLModule", "LatentDiffusion"]


class AutoencoderKLModule(GANModule):
    """KL autoencoder training: the generator step is the autoencoder loss (``loss.generator_loss``), the
    discriminator step the PatchGAN loss on the same reconstructions (``loss.discriminator_loss``).

    Args:
        model: an :class:`ldm.models.autoencoder.AutoencoderKL`.
        loss: :class:`ldm.losses.LPIPSWithDiscriminator`.
        learning_rate / scale_lr / betas: Adam, official lr rule (base × batch × devices × accumulation).
        learn_logvar: also optimise the loss's scalar ``logvar``. The official recipe does not (its optimizer holds
            only the encoder, decoder and quant convs, so ``logvar`` stays at ``logvar_init``); default False.
        image_key: batch key of the images.
    """

    generator_loss_name = "train/aeloss"

    def __init__(
        self,
        model: nn.Module,
        loss: LPIPSWithDiscriminator,
        learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        betas: tuple[float, float] = (0.5, 0.9),
        learn_logvar: bool = False,
        image_key: str = "image",
    ) -> None:
        super().__init__(learning_rate=learning_rate, scale_lr=scale_lr, betas=betas)
        self.model, self.loss = model, loss
        self.learn_logvar, self.image_key = learn_logvar, image_key

    def get_input(self, batch: dict[str, Any]) -> Tensor:
        return take(batch, self.image_key, None, "AutoencoderKLModule")

    def forward(self, x: Tensor, sample_posterior: bool = True) -> tuple[Tensor, Any]:
        return self.model(x, sample_posterior=sample_posterior)

    # --- the GAN step ---------------------------------------------------------------------------------------------
    def generator_step(self, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor], Any]:
        x = self.get_input(batch)
        rec, posterior = self(x)
        loss, logs = self.loss.generator_loss(x, rec, posterior, step, last_layer=self.model.get_last_layer())
        return loss, logs, (x, rec)

    def discriminator_step(
        self, batch: dict[str, Any], state: tuple[Tensor, Tensor], step: int
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        x, rec = state
        return self.loss.discriminator_loss(x, rec, step)  # None before disc_start

    def generator_parameters(self) -> Iterable[nn.Parameter]:
        yield from self.model.parameters()
        if self.learn_logvar:
            yield self.loss.logvar

    def discriminator_parameters(self) -> Iterable[nn.Parameter]:
        return self.loss.discriminator.parameters()

    # --- evaluation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self.get_input(batch)
        rec, posterior = self(x, sample_posterior=False)
        _, logs = self.loss.generator_loss(x, rec, posterior, self.batch_step, split="val")
        self.log("val/rec_loss", logs["val/rec_loss"], prog_bar=True, batch_size=x.shape[0])
        self.log_dict(
            {
                "val/psnr": psnr(rec.clamp(-1, 1), x).mean(),
                "val/kl_loss": logs["val/kl_loss"],
                "val/latent_std": posterior.mode().std(),
            },
            batch_size=x.shape[0],
        )

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = self.get_input(batch)[:n].to(self.device)
        rec, posterior = self(x, sample_posterior=False)
        samples = self.model.decode(torch.randn_like(posterior.mode()))  # decoder on N(0, I): the KL's prior
        return {"inputs": x, "reconstructions": rec.clamp(-1, 1), "prior_samples": samples.clamp(-1, 1)}


SAMPLERS = ("ddim", "plms", "ddpm")
SAMPLE_OPTIONS = ("sampler", "num_steps", "eta", "guidance_scale", "generator")
# the conditioning arguments of the older constructor (configs written before name them); see conditioner_from_legacy
LEGACY_ARGUMENTS = (
    "cond_stage",
    "num_classes",
    "null_class",
    "text_encoder",
    "concat",
    "sr_factor",
    "semantic",
    "segmentation_key",
    "label_key",
    "caption_key",
)


def _sample_defaults(sample: Mapping[str, Any] | None) -> dict[str, Any]:
    """The module's ``sample`` defaults, checked; the older ``steps`` is ``num_steps``."""
    opts = dict(sample or {})
    if "steps" in opts:
        if "num_steps" in opts:
            raise ValueError("sample: give num_steps (steps is its older name), not both")
        opts["num_steps"] = opts.pop("steps")
    allowed = [k for k in SAMPLE_OPTIONS if k != "generator"]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"sample: unknown option(s) {unknown}; expected {', '.join(allowed)}")
    if opts.get("sampler", "ddim") not in SAMPLERS:
        raise ValueError(f"sample: unknown sampler {opts['sampler']!r}; valid: {', '.join(SAMPLERS)}")
    return opts


class LatentDiffusion(L.LightningModule):
    """A (latent) DDPM with a UNet, a frozen first stage and an injected conditioner (``LatentDiffusion`` in
    ddpm.py).

    Args:
        unet: ``ldm.models.unet.UNetModel`` (its ``in_channels`` include the concat-conditioning channels).
        first_stage: a frozen gencore codec (``ldm.first_stage.KLCodec``, ``taming.first_stage.VQGANCodec``,
            ``gencore.latents.DiffusersVAECodec``); ``None`` = pixel space (``IdentityCodec(image_channels)``).
        conditioner: an :mod:`ldm.conditioning` conditioner (``ClassConditioner``, ``TextConditioner``,
            ``LowResolutionConditioner``, ``InpaintingConditioner``, ``SemanticConditioner``, ``HybridConditioner``),
            kept as ``cond_stage_model``; ``None`` (or gencore's ``NoConditioner``) = unconditional.
        conditioning_key: how conditions enter the UNet (``crossattn``, ``concat``, ``hybrid``, ``adm``); default:
            the conditioner's. Official configs set it; it must route what the conditioner produces.
        schedule: ``DiffusionSchedule`` keyword arguments (official "linear" 1e-4..2e-2 over 1000 steps by default).
        parameterization: ``eps`` (all official configs), ``x0`` or ``v``.
        p_uncond: conditioning dropout for classifier-free guidance, done by the conditioner (the official code has
            none; SD used 0.1); a float, or per condition key.
        scale_by_std: the latent scale = 1 / std of the first training batch's latents (official), kept in the
            ``latent_norm`` buffers; else the fixed ``scale_factor`` (1.0 unless given) multiplies the codec's own
            scaling. Read it as ``scale_factor``.
        image_key: batch key of the images.
        sample: default ``generate`` / image-logging options (``sampler``, ``num_steps``, ``eta``,
            ``guidance_scale``; the older ``steps`` means ``num_steps``).
        n_buckets: timestep bins of the logged ``loss_simple_t/…`` curves (0: none).

    The older conditioning arguments (``cond_stage``, ``num_classes``, ``null_class``, ``text_encoder``, ``concat``,
    ``sr_factor``, ``semantic``, ``segmentation_key``, ``label_key``, ``caption_key``) still build the same model
    (:func:`ldm.conditioning.conditioner_from_legacy`), and the state dicts of those models load.
    """

    def __init__(
        self,
        unet: nn.Module,
        first_stage: nn.Module | None = None,
        conditioner: nn.Module | None = None,
        *,
        image_channels: int = 3,
        image_size: int = 32,
        conditioning_key: str | None = None,
        schedule: dict[str, Any] | None = None,
        parameterization: str = "eps",
        p_uncond: float | Mapping[str, float] = 0.0,
        learning_rate: float = 1e-4,
        scale_lr: bool = False,
        weight_decay: float = 0.0,
        scale_by_std: bool = False,
        scale_factor: float = 1.0,
        image_key: str = "image",
        sample: dict[str, Any] | None = None,
        n_buckets: int = 10,
        **legacy: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(legacy) - set(LEGACY_ARGUMENTS))
        if unknown:
            raise TypeError(f"LatentDiffusion.__init__() got an unexpected keyword argument {unknown[0]!r}")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if scale_by_std and scale_factor != 1.0:
            raise ValueError(f"scale_by_std estimates the latent scale: do not also give scale_factor={scale_factor}")

        # --- first stage and the latent normaliser (LDM's scale_factor)
        codec = first_stage if first_stage is not None else IdentityCodec(image_channels)
        self.first_stage_model = freeze(codec)
        self.image_size = image_size
        if image_size % codec.downsample_factor:
            raise ValueError(
                f"image_size {image_size} is not divisible by the first stage's factor {codec.downsample_factor}"
            )
        f = codec.downsample_factor
        self.latent_shape = (codec.latent_channels, image_size // f, image_size // f)
        self.latent_norm = LatentNormalizer(scale=None if scale_by_std else scale_factor, shift=0.0)  # LDM: no shift

        # --- the conditioner and the router
        renames: dict[str, str] = {}
        if legacy:
            if conditioner is not None:
                raise ValueError(f"give conditioner= or the older conditioning arguments {sorted(legacy)}, not both")
            conditioner, renames = conditioner_from_legacy(conditioning_key=conditioning_key, **legacy)
        if conditioner is None or type(conditioner) is NoConditioner:
            conditioner = Unconditional()
        if not isinstance(conditioner, LatentConditioner):
            raise ValueError(
                f"conditioner must be an ldm.conditioning conditioner (LatentConditioner), got {type(conditioner)}"
            )
        self.cond_stage_model = conditioner
        key = conditioning_key if conditioning_key is not None else conditioner.conditioning_key
        self.model = DiffusionWrapper(unet, key)
        routed, produced = set(ROUTED[key]), set(conditioner.produces)
        if routed != produced:
            raise ValueError(
                f"conditioning_key={key!r} routes {sorted(routed) or 'no conditions'}, but "
                f"{type(conditioner).__name__} produces {sorted(produced) or 'none'}"
            )
        self.p_uncond = check_probability(p_uncond, "p_uncond")
        if self._dropout_on and not conditioner.guidable:
            raise ValueError(
                f"p_uncond={p_uncond} drops conditions to the unconditional one, which {type(conditioner).__name__} "
                "does not have"
            )

        # --- the diffusion process and its objective
        self.schedule = DiffusionSchedule(**(schedule or {}))
        self.parameterization = parameterization
        self.loss_fn = DiffusionLoss(self.schedule, parameterization=parameterization)
        big_t = self.schedule.num_timesteps
        self.loss_buckets = {  # per-timestep-bin loss curves, accumulated on the device
            split: LossBuckets(n_buckets, prefix="loss_simple_t", num_train_timesteps=big_t)
            for split in ("train", "val")
        }
        self.learning_rate, self.scale_lr, self.weight_decay = learning_rate, scale_lr, weight_decay
        self.image_key = image_key
        self.sample_kwargs = _sample_defaults(sample)
        self._warned_not_ready = False

        conditioner.bind(
            model=unet, encode=self.encode, latent_shape=self.latent_shape, image_size=image_size, image_key=image_key
        )
        # the official / older layout: one root scale_factor, and no shift (LDM never shifts its latents)
        accept_legacy_keys(self, {"scale_factor": "latent_norm.scale", **renames}, defaults={"latent_norm.shift": 0.0})

    @property
    def scale_factor(self) -> Tensor:
        """The latent scale (LDM's ``scale_factor`` buffer; NaN until ``scale_by_std`` has seen a training batch)."""
        return self.latent_norm.scale

    @property
    def _dropout_on(self) -> bool:
        p = self.p_uncond
        return any(v > 0 for v in p.values()) if isinstance(p, Mapping) else p > 0

    # -------------------------------------------------------------------------------------- latents, conditions

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Images -> normalised latents (the first stage's encoding times ``scale_factor``)."""
        return self.latent_norm.normalize(self.first_stage_model.encode(x))

    def decode(self, z: Tensor) -> Tensor:
        return self.first_stage_model.decode(self.latent_norm.denormalize(z))

    def conditions(self, batch: Mapping[str, Any], n: int | None = None) -> Any:
        """The UNet's conditions for (the first ``n`` items of) a batch (no dropout)."""
        return self.cond_stage_model.encode(batch, n)

    def unconditional(self, n: int) -> Any:
        """The null condition of classifier-free guidance (concat inputs are shared, so they are not in it)."""
        return self.cond_stage_model.unconditional(n)

    def _on_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    # -------------------------------------------------------------------------------------------- training

    def denoise(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self.model(x, t, **cond)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        z = self.encode(take(batch, self.image_key, None, "LatentDiffusion"))  # scale_by_std: estimated here, once
        cond = self.cond_stage_model(batch, drop=self.p_uncond)  # classifier-free-guidance dropout
        loss, logs = self.loss_fn(self.denoise, z, cond, buckets=self.loss_buckets["train"])
        self.log("train/loss", loss, prog_bar=True, batch_size=z.shape[0])
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k != "loss"}, batch_size=z.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.loss_buckets["train"].log(self, "train")  # writes (one host sync) only on Lightning's logging steps

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.latent_norm.ready:  # a sanity check before the first training batch estimated the scale
            if not self._warned_not_ready:
                log.info("validation skipped: the latent scale is estimated at the first training batch")
                self._warned_not_ready = True
            return
        g = torch.Generator(device=self.device).manual_seed(batch_idx)  # the same t / noise every validation
        z = self.encode(take(batch, self.image_key, None, "LatentDiffusion"))
        t = torch.randint(0, self.schedule.num_timesteps, (z.shape[0],), generator=g, device=self.device)
        noise = torch.randn(z.shape, generator=g, device=self.device)
        cond = self.conditions(batch)  # the conditional loss: no dropout
        loss, _ = self.loss_fn(self.denoise, z, cond, noise=noise, t=t, buckets=self.loss_buckets["val"])
        self.log("val/loss", loss, prog_bar=True, batch_size=z.shape[0])

    def on_validation_epoch_end(self) -> None:
        self.loss_buckets["val"].log(self, "val", force=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = scaled_learning_rate(self, self.learning_rate, self.scale_lr)
        params = [p for p in self.parameters() if p.requires_grad]  # UNet (+ a trainable conditioner)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)

    # -------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_latents(
        self,
        n: int,
        cond: Any = None,
        *,
        sampler: str = "ddim",
        num_steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        x0: Tensor | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` latents from N(0, I) noise: DDIM / PLMS over ``ddim_timesteps(num_steps, T)`` (official spacing) or
        ancestral DDPM over all T steps; ``guidance_scale`` != 1 guides with the conditioner's unconditional
        condition; ``x0`` / ``mask`` (1 = known) is masked sampling."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if guidance_scale != 1.0 and not self.cond_stage_model.guidable:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a conditioner with an unconditional condition (class with a "
                f"null class, or text); {type(self.cond_stage_model).__name__} has none"
            )
        if guidance_scale != 1.0 and not self._dropout_on:
            log.warning("guidance with a model trained without conditioning dropout (p_uncond=0)")
        denoise = self.denoise
        if guidance_scale != 1.0:
            denoise = classifier_free_guidance(denoise, guidance_scale, uncond=self.unconditional(n))
        x_T = torch.randn((n, *self.latent_shape), generator=generator, device=self.device)
        kw: dict[str, Any] = {
            "parameterization": self.parameterization,
            "cond": cond,
            "generator": generator,
            "x0": x0,
            "mask": mask,
        }
        big_t = self.schedule.num_timesteps
        if sampler == "ddim":
            return ddim_sample(denoise, x_T, self.schedule, ddim_timesteps(num_steps, big_t), eta=eta, **kw)
        if sampler == "plms":
            return plms_sample(denoise, x_T, self.schedule, ddim_timesteps(num_steps, big_t), **kw)
        if num_steps != big_t:
            log.info("ddpm runs all %d steps (num_steps=%d is for ddim / plms)", big_t, num_steps)
        return ddpm_sample(denoise, x_T, self.schedule, **kw)

    def _options(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(sampler options: the module's defaults updated by the given ones, the generation request)."""
        if "steps" in kwargs:
            raise ValueError("the number of sampler steps is num_steps= (steps= is its older name)")
        opts = {**self.sample_kwargs, **{k: v for k, v in kwargs.items() if k in SAMPLE_OPTIONS and v is not None}}
        return opts, {k: v for k, v in kwargs.items() if k not in SAMPLE_OPTIONS}

    @torch.no_grad()
    def generate(self, n: int, **kwargs: Any) -> dict[str, Any]:
        """``n`` images and what conditioned them: the conditioner's request (class models ``labels``, default
        random; text models ``captions``, default the Fashion-MNIST caption of a random class; semantic-synthesis
        models ``segmentation`` maps) and sampler options (``sampler``, ``num_steps``, ``eta``, ``guidance_scale``,
        ``generator``; default: the module's ``sample``)."""
        opts, request = self._options(kwargs)
        batch, out = self.cond_stage_model.generation_batch(n, **request)
        z = self.sample_latents(n, self.conditions(self._on_device(batch), n), **opts)
        return {**out, "images": self.decode(z).clamp(-1, 1)}

    @torch.no_grad()
    def inpaint(self, images: Tensor, masks: Tensor, **kwargs: Any) -> Tensor:
        """Fill ``masks`` (1 = hole) of ``images``: conditionally for an inpainting model, otherwise by masked
        sampling (the known latents are re-noised into every step, official DDIM ``mask``/``x0``); class / text
        models fill with ``labels`` / ``captions`` when given, else with the null condition. Sampler options as in
        :meth:`generate`."""
        opts, request = self._options(kwargs)
        images, masks = images.to(self.device), masks.to(self.device)
        n = images.shape[0]
        cond, masked = self.cond_stage_model.inpainting(images, masks, **request)
        if masked:
            keep = 1 - F.interpolate(masks, size=self.latent_shape[1:], mode="nearest")
            z = self.sample_latents(n, cond, x0=self.encode(images), mask=keep, **opts)
        else:
            z = self.sample_latents(n, cond, **opts)
        out = self.decode(z).clamp(-1, 1)
        return out * masks + images * (1 - masks)

    @torch.no_grad()
    def superres(self, images: Tensor, **kwargs: Any) -> Tensor:
        """Upsample by the conditioner's ``sr_factor``: ``images`` are the high-resolution targets' size (their
        downsampled version is the condition), or low-resolution images ``image_size / sr_factor`` wide (upsampled
        first). Sampler options as in :meth:`generate`."""
        opts, request = self._options(kwargs)
        images = images.to(self.device)
        z = self.sample_latents(images.shape[0], self.cond_stage_model.superres_condition(images, **request), **opts)
        return self.decode(z).clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        batch = self._on_device(batch)
        x = take(batch, self.image_key, n, "LatentDiffusion.log_images")
        logs: dict[str, Tensor] = {"inputs": x, "reconstructions": self.decode(self.encode(x)).clamp(-1, 1)}
        opts = dict(self.sample_kwargs)
        if opts.get("num_steps", 0) > 50:  # image logging stays cheap
            opts["num_steps"] = 50
        logs.update(self.cond_stage_model.log_samples(self, batch, x.shape[0], **opts))
        return logs
