"""Training recipes of Latent Diffusion as LightningModules, built from injected networks and objectives.

- :class:`LatentDiffusion` — the DDPM (eps / x0 / v) over a frozen first stage's latents (or pixels), with class,
  text, concat (super-resolution, inpainting) or hybrid conditioning, classifier-free guidance dropout, and DDIM /
  PLMS / DDPM sampling (guided, masked).
- :class:`AutoencoderKLModule` — the KL-regularised first stage (``ldm/models/autoencoder.py``): reconstruction +
  perceptual NLL with a scalar log-variance, KL, PatchGAN with adaptive weight from ``disc_start``; manual
  optimisation with two Adam optimisers (betas 0.5, 0.9), like taming's VQGAN recipe.

Step counting: Lightning counts optimizer steps, two per batch here; ``disc_start`` counts batches.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from ldm.losses import LPIPSWithDiscriminator
from taming.lit import psnr, scaled_learning_rate

log = logging.getLogger(__name__)

__all__ = ["AutoencoderKLModule", "LatentDiffusion"]


class AutoencoderKLModule(L.LightningModule):
    """KL autoencoder training.

    Args:
        model: an :class:`ldm.models.autoencoder.AutoencoderKL`.
        loss: :class:`ldm.losses.LPIPSWithDiscriminator`.
        learning_rate / scale_lr / betas: Adam, official lr rule (base × batch × devices × accumulation).
        learn_logvar: also optimise the loss's scalar ``logvar``. The official recipe does not (its optimizer holds
            only the encoder, decoder and quant convs, so ``logvar`` stays at ``logvar_init``); default False.
        image_key: batch key of the images.
    """

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
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.model, self.loss = model, loss
        self.learning_rate, self.scale_lr, self.betas = learning_rate, scale_lr, tuple(betas)
        self.learn_logvar, self.image_key = learn_logvar, image_key
        self.automatic_optimization = False

    @property
    def batch_step(self) -> int:
        return self.global_step // 2

    def get_input(self, batch: dict[str, Any]) -> Tensor:
        if self.image_key not in batch:
            raise ValueError(f"batch has no key {self.image_key!r} (keys: {sorted(batch)})")
        return batch[self.image_key]

    def forward(self, x: Tensor, sample_posterior: bool = True) -> tuple[Tensor, Any]:
        return self.model(x, sample_posterior=sample_posterior)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_ae, opt_disc = self.optimizers()
        step = self.batch_step
        x = self.get_input(batch)
        rec, posterior = self(x)
        aeloss, log_ae = self.loss.generator_loss(x, rec, posterior, step, last_layer=self.model.get_last_layer())
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(aeloss)
        opt_ae.step()
        dloss, log_d = self.loss.discriminator_loss(x, rec, step)
        opt_disc.zero_grad(set_to_none=True)
        if dloss is not None:
            self.manual_backward(dloss)
        opt_disc.step()  # no gradients before disc_start: a no-op that keeps 2 optimizer steps per batch
        self.log("train/aeloss", aeloss.detach(), prog_bar=True, batch_size=x.shape[0])
        self.log_dict({**log_ae, **log_d}, batch_size=x.shape[0])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self.get_input(batch)
        rec, posterior = self(x, sample_posterior=False)
        _, log = self.loss.generator_loss(x, rec, posterior, self.batch_step, split="val")
        self.log("val/rec_loss", log["val/rec_loss"], prog_bar=True, batch_size=x.shape[0])
        self.log_dict(
            {
                "val/psnr": psnr(rec.clamp(-1, 1), x).mean(),
                "val/kl_loss": log["val/kl_loss"],
                "val/latent_std": posterior.mode().std(),
            },
            batch_size=x.shape[0],
        )

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = scaled_learning_rate(self, self.learning_rate, self.scale_lr)
        ae_params = [p for p in self.model.parameters() if p.requires_grad]
        if self.learn_logvar:
            ae_params.append(self.loss.logvar)
        return [
            torch.optim.Adam(ae_params, lr=lr, betas=self.betas),
            torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=self.betas),
        ]

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = self.get_input(batch)[:n].to(self.device)
        rec, posterior = self(x, sample_posterior=False)
        samples = self.model.decode(torch.randn_like(posterior.mode()))  # decoder on N(0, I): the KL's prior
        return {"inputs": x, "reconstructions": rec.clamp(-1, 1), "prior_samples": samples.clamp(-1, 1)}


SAMPLERS = ("ddim", "plms", "ddpm")


class LatentDiffusion(L.LightningModule):
    """A (latent) DDPM with a UNet, a frozen first stage and optional conditioning (``LatentDiffusion`` in ddpm.py).

    Args:
        unet: ``ldm.models.unet.UNetModel`` (its ``in_channels`` include the concat-conditioning channels).
        first_stage: a frozen gencore codec (``ldm.models.autoencoder.KLCodec``, ``taming.first_stage.VQGANCodec``,
            ``gencore.latents.DiffusersVAECodec``); ``None`` = pixel space (``IdentityCodec(image_channels)``).
        cond_stage: ``None``, ``"class"`` (a trainable :class:`ClassEmbedder`, with a null class for guidance unless
            ``null_class=False`` as in the original cIN LDM), ``"text"`` (a
            frozen ``gencore.text.FrozenTextEncoder``; ``text_encoder`` = its keyword arguments; a ``path`` to a
            ``.safetensors`` file of ``gencore.text.save_text_features`` serves precomputed features), or a module.
        conditioning_key: how conditions enter the UNet (``crossattn``, ``concat``, ``hybrid``, ``adm``); default:
            ``crossattn`` for class / text, ``concat`` for concat-only models, ``hybrid`` for both.
        concat: ``"lowres"`` (super-resolution by ``sr_factor``), ``"inpaint"`` (masked latent + mask) or
            ``"semantic"`` (``batch[segmentation_key]`` through a ``SpatialRescaler(**semantic)``).
        schedule: ``DiffusionSchedule`` keyword arguments (official "linear" 1e-4..2e-2 over 1000 steps by default).
        parameterization: ``eps`` (all official configs), ``x0`` or ``v``.
        p_uncond: conditioning dropout for classifier-free guidance (the official code has none; SD used 0.1).
        scale_by_std: set ``scale_factor`` = 1 / std of the first training batch's latents (official); else
            ``scale_factor`` (1.0 unless given) multiplies the codec's own scaling.
        sample: default ``generate`` / image-logging arguments (sampler, steps, eta, guidance_scale).
    """

    def __init__(
        self,
        unet: nn.Module,
        first_stage: nn.Module | None = None,
        *,
        image_channels: int = 3,
        image_size: int = 32,
        cond_stage: str | nn.Module | None = None,
        conditioning_key: str | None = None,
        num_classes: int = 10,
        null_class: bool = True,
        text_encoder: dict[str, Any] | None = None,
        concat: str | None = None,
        sr_factor: int = 4,
        semantic: dict[str, Any] | None = None,
        segmentation_key: str = "segmentation",
        schedule: dict[str, Any] | None = None,
        parameterization: str = "eps",
        p_uncond: float = 0.0,
        learning_rate: float = 1e-4,
        scale_lr: bool = False,
        weight_decay: float = 0.0,
        scale_by_std: bool = False,
        scale_factor: float = 1.0,
        image_key: str = "image",
        label_key: str = "label",
        caption_key: str = "caption",
        sample: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from gencore.latents import IdentityCodec
        from gencore.modules import freeze
        from ldm.conditioning import ClassEmbedder, DiffusionWrapper
        from ldm.diffusion import DiffusionLoss, DiffusionSchedule

        if concat not in (None, "lowres", "inpaint", "semantic"):
            raise ValueError(f"concat must be None, 'lowres', 'inpaint' or 'semantic', got {concat!r}")
        if concat == "semantic" and not semantic:
            raise ValueError("concat='semantic' needs semantic={in_channels: <classes>, ...} (SpatialRescaler kwargs)")
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        codec = first_stage if first_stage is not None else IdentityCodec(image_channels)
        self.first_stage_model = freeze(codec)
        self.image_size = image_size
        if image_size % codec.downsample_factor:
            raise ValueError(
                f"image_size {image_size} is not divisible by the first stage's factor {codec.downsample_factor}"
            )
        self.latent_shape = (
            codec.latent_channels,
            image_size // codec.downsample_factor,
            image_size // codec.downsample_factor,
        )
        self.cond_kind = cond_stage if isinstance(cond_stage, str) or cond_stage is None else "module"
        context_dim = getattr(unet, "context_dim", None)
        if cond_stage == "class":
            key_default = "crossattn"
            if conditioning_key == "adm":
                self.cond_stage_model: nn.Module | None = None
            else:
                if context_dim is None:
                    raise ValueError("class conditioning through cross-attention needs a UNet with context_dim")
                self.cond_stage_model = ClassEmbedder(context_dim, num_classes, null_class=null_class)
        elif cond_stage == "text":
            from gencore.text import text_encoder as build_text_encoder

            key_default = "crossattn"
            self.cond_stage_model = build_text_encoder(**(text_encoder or {}))
            if context_dim is not None and self.cond_stage_model.hidden_size != context_dim:
                raise ValueError(
                    f"text encoder width {self.cond_stage_model.hidden_size} does not match the UNet's "
                    f"context_dim {context_dim}"
                )
        elif cond_stage is None:
            key_default, self.cond_stage_model = None, None
        elif isinstance(cond_stage, nn.Module):
            key_default, self.cond_stage_model = "crossattn", cond_stage
        else:
            raise ValueError(f"cond_stage must be None, 'class', 'text' or a module, got {cond_stage!r}")
        if concat == "semantic":
            from ldm.conditioning import SpatialRescaler

            rescaler = SpatialRescaler(**semantic)
            if self.cond_stage_model is None:  # the official layout: the rescaler is the cond_stage_model
                self.cond_stage_model = rescaler
            else:
                self.semantic_model = rescaler
            self.segmentation_key = segmentation_key
        if concat is not None:
            key_default = "hybrid" if key_default == "crossattn" else "concat"
        self.model = DiffusionWrapper(unet, conditioning_key or key_default)
        self.num_classes, self.concat, self.sr_factor = num_classes, concat, sr_factor
        self.schedule = DiffusionSchedule(**(schedule or {}))
        self.parameterization = parameterization
        self.loss_fn = DiffusionLoss(self.schedule, parameterization=parameterization, p_uncond=p_uncond)
        self.p_uncond = p_uncond
        self.learning_rate, self.scale_lr, self.weight_decay = learning_rate, scale_lr, weight_decay
        self.scale_by_std = scale_by_std
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.image_key, self.label_key, self.caption_key = image_key, label_key, caption_key
        self.sample_kwargs = {"sampler": "ddim", "steps": 50, "eta": 0.0, "guidance_scale": 1.0, **(sample or {})}
        self._uncond_text: Tensor | None = None

    # -------------------------------------------------------------------------------------- latents, conditions

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self.first_stage_model.encode(x) * self.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    def conditions(self, batch: dict[str, Any], n: int | None = None) -> dict[str, Tensor] | None:
        """The UNet's conditions for (the first ``n`` items of) a batch."""
        x = batch[self.image_key][:n] if self.image_key in batch else None
        n = x.shape[0] if x is not None else n
        cond: dict[str, Tensor] = {}
        if self.cond_kind == "class":
            if self.label_key not in batch:
                raise ValueError(f"a class-conditional model needs batch[{self.label_key!r}]")
            labels = torch.as_tensor(batch[self.label_key][:n], device=self.device)
            if self.model.conditioning_key == "adm":
                cond["y"] = labels
            else:
                cond["c_crossattn"] = self.cond_stage_model(labels)
        elif self.cond_kind == "text":
            if self.caption_key not in batch:
                raise ValueError(f"a text-conditional model needs batch[{self.caption_key!r}]")
            cond["c_crossattn"] = self.cond_stage_model.encode(list(batch[self.caption_key][:n]))
        elif self.cond_kind == "module":
            cond["c_crossattn"] = self.cond_stage_model(batch[self.label_key][:n])
        if self.concat is not None:
            if x is None:
                raise ValueError(f"concat conditioning needs batch[{self.image_key!r}]")
            x = x.to(self.device)
            if self.concat == "lowres":
                cond["c_concat"] = self.encode_lowres(x)
            elif self.concat == "semantic":
                cond["c_concat"] = self.encode_semantic(batch, n)
            else:
                mask = batch.get("mask")
                mask = random_masks_like(x) if mask is None else mask[:n].to(self.device)
                from ldm.conditioning import inpainting_condition

                cond["c_concat"] = inpainting_condition(x, mask, self.encode)
        return cond or None

    def encode_semantic(self, batch: dict[str, Any], n: int | None) -> Tensor:
        """The segmentation map of the batch through the SpatialRescaler, resized to the latent grid."""
        from ldm.conditioning import one_hot_map

        if self.segmentation_key not in batch:
            raise ValueError(f"semantic synthesis needs batch[{self.segmentation_key!r}]")
        rescaler = getattr(self, "semantic_model", None) or self.cond_stage_model
        seg = one_hot_map(torch.as_tensor(batch[self.segmentation_key][:n]).to(self.device), rescaler.in_channels)
        c = rescaler(seg)
        if c.shape[-2:] != self.latent_shape[1:]:
            c = torch.nn.functional.interpolate(c, size=self.latent_shape[1:], mode="nearest")
        return c

    def encode_lowres(self, x: Tensor) -> Tensor:
        from ldm.conditioning import low_resolution_condition

        return low_resolution_condition(x, self.sr_factor, self.latent_shape[1:])

    def unconditional(self, n: int) -> dict[str, Tensor] | None:
        """The null condition of classifier-free guidance (concat inputs are shared, so they are not in it)."""
        if self.cond_kind == "class":
            null = torch.full((n,), self.num_classes, device=self.device, dtype=torch.long)
            if self.model.conditioning_key == "adm":
                return {"y": null}
            return {"c_crossattn": self.cond_stage_model(null)}
        if self.cond_kind == "text":
            if self._uncond_text is None or self._uncond_text.device != self.device:
                self._uncond_text = self.cond_stage_model.encode([""])
            return {"c_crossattn": self._uncond_text.expand(n, -1, -1)}
        return None

    # -------------------------------------------------------------------------------------------- training

    def denoise(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self.model(x, t, **cond)

    def _maybe_set_scale(self, x: Tensor) -> None:
        if self.scale_by_std and self.training and self.global_step == 0 and float(self.scale_factor) == 1.0:
            z = self.first_stage_model.encode(x).detach()
            self.scale_factor.fill_(1.0 / z.float().std().clamp_min(1e-8))
            log.info("scale_by_std: scale_factor = %.5f", float(self.scale_factor))

    def _step(self, batch: dict[str, Any], split: str) -> Tensor:
        x = batch[self.image_key]
        self._maybe_set_scale(x)
        z = self.encode(x)
        cond = self.conditions(batch)
        uncond = self.unconditional(z.shape[0]) if self.p_uncond > 0 else None
        loss, logs = self.loss_fn(self.denoise, z, cond, uncond=uncond)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=z.shape[0])
        self.log_dict({f"{split}/{k}": v for k, v in logs.items() if k != "loss"}, batch_size=z.shape[0])
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(batch_idx)  # the same t / noise every validation
        x = batch[self.image_key]
        z = self.encode(x)
        t = torch.randint(0, self.schedule.num_timesteps, (z.shape[0],), generator=g, device=self.device)
        noise = torch.randn(z.shape, generator=g, device=self.device)
        loss, _ = self.loss_fn(self.denoise, z, self.conditions(batch), noise=noise, t=t, drop=False)  # conditional
        self.log("val/loss", loss, prog_bar=True, batch_size=z.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = scaled_learning_rate(self, self.learning_rate, self.scale_lr)
        params = [p for p in self.parameters() if p.requires_grad]  # UNet (+ a trainable class embedder)
        return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)

    # -------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_latents(
        self,
        n: int,
        cond: dict[str, Tensor] | None = None,
        *,
        sampler: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        x0: Tensor | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        from ldm.sampling import classifier_free_guidance, ddim_sample, ddpm_sample, plms_sample

        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if guidance_scale != 1.0 and self.cond_kind in (None, "module"):
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a class- or text-conditional model; this one is "
                f"{'unconditional' if self.cond_kind is None else 'conditioned by a custom module'}"
            )
        if guidance_scale != 1.0 and self.p_uncond == 0:
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
        if sampler == "ddim":
            return ddim_sample(denoise, x_T, self.schedule, steps, eta=eta, **kw)
        if sampler == "plms":
            return plms_sample(denoise, x_T, self.schedule, steps, **kw)
        if steps != self.schedule.num_timesteps:
            log.info("ddpm runs all %d steps (steps=%d is for ddim / plms)", self.schedule.num_timesteps, steps)
        return ddpm_sample(denoise, x_T, self.schedule, **kw)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        labels: list[int] | Tensor | None = None,
        captions: list[str] | None = None,
        segmentation: Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``n`` images: class models take ``labels`` (default: random), text models ``captions`` (default: the
        Fashion-MNIST caption of a random class), semantic-synthesis models ``segmentation`` maps; sampler / steps /
        eta / guidance_scale as in ``sample``."""
        opts = {**self.sample_kwargs, **kwargs}
        batch: dict[str, Any] = {}
        out: dict[str, Any] = {}
        if self.cond_kind == "class":
            labels = torch.randint(0, self.num_classes, (n,)) if labels is None else torch.as_tensor(labels)[:n]
            batch[self.label_key] = labels
            out["labels"] = labels.cpu()
        elif self.cond_kind == "text":
            if captions is None:
                from gencore.data import caption_for

                picks = torch.randint(0, 10, (n,))
                captions, out["labels"] = [caption_for(int(c)) for c in picks], picks
            batch[self.caption_key] = list(captions)[:n]
            out["captions"] = batch[self.caption_key]
        if self.concat == "semantic":
            if segmentation is None:
                raise ValueError("a semantic-synthesis model needs segmentation maps: generate(n, segmentation=...)")
            batch[self.segmentation_key] = segmentation
            batch[self.image_key] = torch.zeros(n, self.first_stage_model.in_channels, self.image_size, self.image_size)
        elif self.concat is not None:
            raise ValueError("concat-conditioned models sample with inpaint(...) / superres(...), not generate()")
        cond = self.conditions(batch, n) if batch else None
        z = self.sample_latents(n, cond, **opts)
        out["images"] = self.decode(z).clamp(-1, 1)
        return out

    @torch.no_grad()
    def inpaint(
        self,
        images: Tensor,
        masks: Tensor,
        labels: list[int] | Tensor | None = None,
        captions: list[str] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Fill ``masks`` (1 = hole) of ``images``: conditionally for an ``inpaint`` model, otherwise by masked
        sampling (the known latents are re-noised into every step, official DDIM ``mask``/``x0``); class / text
        models fill with ``labels`` / ``captions`` when given, else with the null condition."""
        opts = {**self.sample_kwargs, **kwargs}
        images, masks = images.to(self.device), masks.to(self.device)
        n = images.shape[0]
        if self.concat == "inpaint":
            z = self.sample_latents(n, self.conditions({self.image_key: images, "mask": masks}), **opts)
        else:
            if labels is not None or captions is not None:
                cond = self.conditions(
                    {
                        self.label_key: torch.as_tensor(labels) if labels is not None else None,
                        self.caption_key: captions,
                    },
                    n,
                )
            else:
                cond = self.unconditional(n)
            keep = 1 - torch.nn.functional.interpolate(masks, size=self.latent_shape[1:], mode="nearest")
            z = self.sample_latents(n, cond, x0=self.encode(images), mask=keep, **opts)
        out = self.decode(z).clamp(-1, 1)
        return out * masks + images * (1 - masks)

    @torch.no_grad()
    def superres(self, images: Tensor, **kwargs: Any) -> Tensor:
        """Upsample by ``sr_factor``: ``images`` are the high-resolution targets' size (their downsampled version is
        the condition), or low-resolution images ``image_size / sr_factor`` wide (upsampled first)."""
        if self.concat != "lowres":
            raise ValueError("superres() needs a model trained with concat='lowres'")
        images = images.to(self.device)
        if images.shape[-1] * self.sr_factor == self.image_size:
            images = torch.nn.functional.interpolate(images, scale_factor=self.sr_factor, mode="bicubic")
        opts = {**self.sample_kwargs, **kwargs}
        z = self.sample_latents(images.shape[0], {"c_concat": self.encode_lowres(images)}, **opts)
        return self.decode(z).clamp(-1, 1)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = batch[self.image_key][:n].to(self.device)
        logs: dict[str, Tensor] = {"inputs": x, "reconstructions": self.decode(self.encode(x)).clamp(-1, 1)}
        opts = {**self.sample_kwargs, "steps": min(int(self.sample_kwargs.get("steps", 50)), 50)}
        cond = self.conditions(batch, n)
        if self.concat == "inpaint":
            masks = random_masks_like(x)
            logs["masked"] = x * (1 - masks)
            logs["inpainted"] = self.inpaint(x, masks, **opts)
        elif self.concat == "lowres":
            logs["low_resolution"] = torch.nn.functional.interpolate(
                torch.nn.functional.avg_pool2d(x, self.sr_factor), scale_factor=self.sr_factor, mode="nearest"
            )
            logs["super_resolved"] = self.superres(x, **opts)
        else:
            logs["samples"] = self.decode(self.sample_latents(x.shape[0], cond, **opts)).clamp(-1, 1)
        return logs


def random_masks_like(x: Tensor) -> Tensor:
    from ldm.conditioning import random_masks

    return random_masks(x.shape[0], x.shape[-1], device=x.device)
