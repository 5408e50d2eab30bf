"""Training recipes of Taming Transformers as LightningModules, built from injected networks, losses and conditioners.

- :class:`VQGANModule` — the first stage: VQModel + :class:`~taming.losses.VQLPIPSWithDiscriminator` on the shared
  two-optimizer GAN step (:class:`gencore.training.GANModule`: generator, then discriminator, Adam betas (0.5, 0.9)),
  codebook usage logging. With ``perceptual="none"``, ``pixel_loss="l2"`` and ``disc_weight=0`` the same module
  trains a plain VQ-VAE.
- :class:`Net2NetTransformer` — the second stage: a GPT over the frozen first stage's code indices, preceded by the
  tokens of a conditioner (:mod:`taming.conditioning`: start token, class, or a second VQGAN's codes), with ``pkeep``
  token corruption; AdamW (betas 0.9, 0.95, weight decay on Linear weights only).

Step counting: Lightning counts optimizer steps, so the VQGAN recipe advances ``global_step`` by 2 per batch
(generator + discriminator); ``disc_start`` and the EMA / image-grid callbacks count batches. No training step waits
for the device (``tests/test_no_sync.py``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.conditioning import Conditioner
from gencore.metrics import psnr
from gencore.modules import freeze
from gencore.training import GANModule, scaled_learning_rate
from taming.conditioning import (
    LEGACY_ARGUMENTS,
    SOSConditioner,
    TokenConditioner,
    condition_transform,
    legacy_conditioner,
)
from taming.losses import VQLPIPSWithDiscriminator
from taming.models.quantize import codebook_usage
from taming.sampling import sample_tokens, sliding_window_sample

__all__ = ["Net2NetTransformer", "VQGANModule"]


class VQGANModule(GANModule):
    """VQGAN (or VQ-VAE) training: one generator step (reconstruction + codebook + adaptive GAN loss, Eq. 5-7) and
    one discriminator step per batch.

    Args:
        model: a :class:`taming.models.vqgan.VQModel` (or GumbelVQ).
        loss: the VQGAN loss (its discriminator is the other player).
        learning_rate: Adam lr; with ``scale_lr`` it is the official base rate (×batch×devices×accumulation).
        betas: Adam's, for both players.
        image_key: batch key of the images.
        condition: train on a condition image derived from the data (``edges`` / ``lowres``): the conditioning
            VQGAN of a spatially conditioned transformer.
        temperature_schedule: callable batch -> Gumbel temperature (GumbelVQ only; default: the model's own
            ``temperature_schedule`` if it has one).
        usage_every: batches per codebook-usage window (perplexity, used share, dead codes).
    """

    generator_loss_name = "train/aeloss"

    def __init__(
        self,
        model: nn.Module,
        loss: VQLPIPSWithDiscriminator,
        learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        betas: tuple[float, float] = (0.5, 0.9),
        image_key: str = "image",
        condition: str | None = None,
        temperature_schedule: Any = None,
        usage_every: int = 100,
    ) -> None:
        super().__init__(learning_rate=learning_rate, scale_lr=scale_lr, betas=betas)
        if usage_every < 1:
            raise ValueError(f"usage_every must be >= 1, got {usage_every}")
        self.model, self.loss = model, loss
        self.image_key, self.condition = image_key, condition
        self._to_input = condition_transform(condition)
        self.temperature_schedule = temperature_schedule
        self.usage_every = usage_every
        self.register_buffer("_usage", torch.zeros(model.vocab_size, dtype=torch.long), persistent=False)
        self._usage_batches = 0

    def get_input(self, batch: dict[str, Any]) -> Tensor:
        if self.image_key not in batch:
            raise ValueError(f"batch has no key {self.image_key!r} (keys: {sorted(batch)})")
        return self._to_input(batch[self.image_key])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, codebook loss, indices)."""
        quant, qloss, info = self.model.encode(x)
        return self.model.decode(quant), qloss, info[2]

    # --- the GAN step (gencore.training.GANModule runs the updates) ------------------------------------------------
    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.loss.discriminator.parameters())

    def generator_step(self, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor], Any]:
        if self.temperature_schedule is not None:
            self.model.temperature = float(self.temperature_schedule(step))
        elif getattr(self.model, "temperature_schedule", None) is not None:
            self.model.temperature_scheduling(step)
        x = self.get_input(batch)
        xrec, qloss, indices = self(x)
        loss, logs = self.loss.generator_loss(qloss, x, xrec, step, last_layer=self.model.get_last_layer())
        return loss, logs, (x, xrec, indices)

    def discriminator_step(self, batch: dict[str, Any], state: Any, step: int) -> tuple[Tensor | None, dict]:
        x, xrec, _ = state
        return self.loss.discriminator_loss(x, xrec, step)

    def on_gan_step_end(self, batch: dict[str, Any], state: Any) -> None:
        self._track_usage(state[2])

    def _track_usage(self, indices: Tensor) -> None:
        """Count the batch's codes on the device; every ``usage_every`` batches log perplexity, used share and dead
        codes of the window (no host sync: no bincount, no boolean masks)."""
        flat = indices.reshape(-1).long()
        self._usage.index_add_(0, flat, torch.ones_like(flat))
        self._usage_batches += 1
        if self._usage_batches < self.usage_every:
            return
        p = self._usage.double() / self._usage.sum()
        used = self._usage > 0
        logs = {
            "train/perplexity": torch.exp(-torch.xlogy(p, p).sum()).float(),  # 0 log 0 = 0 for unused codes
            "train/codebook_used": used.double().mean().float(),
            "train/dead_codes": (~used).sum().float(),
        }
        if getattr(self.model.quantize, "restart_unused_after", 0):
            logs["train/codes_restarted"] = self.model.quantize.restart_count.float()
        self.log_dict(logs)
        self._usage.zero_()
        self._usage_batches = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self.get_input(batch)
        xrec, qloss, indices = self(x)
        _, log = self.loss.generator_loss(qloss, x, xrec, self.batch_step, last_layer=None, split="val")
        stats = codebook_usage(indices, self._usage.numel())
        self.log("val/rec_loss", log["val/rec_loss"], prog_bar=True)
        self.log_dict(
            {
                "val/psnr": psnr(xrec.clamp(-1, 1), x).mean(),
                "val/nll_loss": log["val/nll_loss"],
                "val/perplexity": torch.as_tensor(stats["perplexity"]).float(),
            }
        )

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = self.get_input(batch)[:n].to(self.device)
        return {"inputs": x, "reconstructions": self(x)[0].clamp(-1, 1)}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self(x)[0].clamp(-1, 1)


class Net2NetTransformer(L.LightningModule):
    """GPT over VQGAN codes, conditioned on the tokens of a conditioner (official ``cond_transformer.py``).

    The sequence is ``[c, z]`` (conditioning tokens, then the image's code indices in raster order) and the GPT
    predicts every image token from the ones before it (Eq. 8). The conditioner is an injected object
    (:mod:`taming.conditioning`) stored under the official name ``cond_stage_model``.

    Args:
        transformer: the GPT (``taming.models.mingpt.GPT``); its vocabulary must cover the image codes and the
            conditioning tokens.
        first_stage: the frozen VQGAN whose code indices are modelled.
        conditioner: a :class:`~taming.conditioning.TokenConditioner` (default: the start token 0 of an
            unconditional model, ``SOSConditioner()``).
        pkeep: probability of keeping each input image token during training (the rest are replaced by random
            codes; 1.0 = no corruption).
        learning_rate, scale_lr, weight_decay, betas: AdamW as in the official recipe.
        sample: default sampling arguments for image logging / ``generate`` (temperature, top_k, top_p).
        image_key: batch key of the images.
        **legacy: the arguments of the constructor before conditioners (``cond_stage``, ``n_classes``,
            ``class_offset``, ``sos_token``, ``condition``, ``cond_key``; exports written then have them in their
            config), translated by :func:`taming.conditioning.legacy_conditioner`.
    """

    def __init__(
        self,
        transformer: nn.Module,
        first_stage: nn.Module,
        conditioner: TokenConditioner | None = None,
        *,
        pkeep: float = 1.0,
        learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        sample: dict[str, Any] | None = None,
        image_key: str = "image",
        **legacy: Any,
    ) -> None:
        super().__init__()
        if not 0.0 < pkeep <= 1.0:
            raise ValueError(f"pkeep must be in (0, 1], got {pkeep}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.transformer = transformer
        self.first_stage_model = freeze(first_stage)
        self.cond_stage_model: TokenConditioner = self._conditioner(conditioner, legacy, image_key)
        self.cond_stage_model.bind(model=transformer, first_stage=self.first_stage_model)
        self.image_key = image_key
        self.pkeep = pkeep
        self.learning_rate, self.scale_lr = learning_rate, scale_lr
        self.weight_decay, self.betas = weight_decay, tuple(betas)
        self.sample_kwargs = dict(sample or {})
        self._check_vocab()

    @staticmethod
    def _conditioner(conditioner: Any, legacy: dict[str, Any], image_key: str) -> TokenConditioner:
        """The injected conditioner, or the one the old arguments stand for (a string / VQGAN passed where the
        old signature had ``cond_stage`` counts as one)."""
        unknown = sorted(set(legacy) - set(LEGACY_ARGUMENTS))
        if unknown:
            raise TypeError(f"Net2NetTransformer got unexpected keyword argument(s) {', '.join(unknown)}")
        if conditioner is not None and not isinstance(conditioner, Conditioner):
            if "cond_stage" in legacy:
                raise ValueError("Net2NetTransformer: give the conditioner or cond_stage, not both")
            legacy = {"cond_stage": conditioner, **legacy}
            conditioner = None
        if legacy:
            if conditioner is not None:
                raise ValueError(
                    f"Net2NetTransformer: give a conditioner or the old arguments ({', '.join(sorted(legacy))}), "
                    "not both"
                )
            return legacy_conditioner(**legacy, image_key=image_key)
        if conditioner is None:
            return SOSConditioner()
        if not isinstance(conditioner, TokenConditioner):
            raise ValueError(
                f"Net2NetTransformer needs a conditioner that produces tokens (taming.conditioning), got "
                f"{type(conditioner).__name__}"
            )
        return conditioner

    # --------------------------------------------------------------------------------------------- tokens

    def _check_vocab(self) -> None:
        vocab = self.transformer.vocab_size if hasattr(self.transformer, "vocab_size") else None
        if vocab is None:
            vocab = self.transformer.tok_emb.num_embeddings
        need = self.first_stage_model.vocab_size
        cond_end = self.cond_stage_model.vocab_end
        if max(need, cond_end) > vocab:
            raise ValueError(
                f"transformer vocab_size {vocab} is smaller than the token ids it must model: image "
                f"codes need {need}, conditioning tokens need {cond_end}"
            )
        self.vocab_size = vocab

    def encode_to_z(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Image -> code indices (B, h·w) and the grid size (h, w)."""
        with torch.no_grad():
            idx = self.first_stage_model.encode_to_indices(x)  # (B, h, w)
        return idx.flatten(1), (idx.shape[1], idx.shape[2])

    def encode_to_c(self, batch: dict[str, Any], batch_size: int) -> Tensor:
        """The conditioning tokens (B, Lc) of a batch (official name)."""
        return self.cond_stage_model(batch, batch_size)

    def forward(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Official ``forward(x, c)`` on token ids: (logits for every image token, target ids)."""
        if self.training and self.pkeep < 1.0:
            keep = torch.bernoulli(torch.full(z.shape, self.pkeep, device=z.device)).bool()
            z_in = torch.where(keep, z, torch.randint_like(z, self.first_stage_model.vocab_size))
        else:
            z_in = z
        cz = torch.cat((c, z_in), dim=1)
        logits, _ = self.transformer(cz[:, :-1])
        return logits[:, c.shape[1] - 1 :], z  # (B, Lz, V), (B, Lz)

    def _step(self, batch: dict[str, Any], split: str) -> Tensor:
        x = batch[self.image_key]
        z, _ = self.encode_to_z(x)
        c = self.encode_to_c(batch, x.shape[0])
        logits, target = self(z, c)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        acc = (logits.argmax(-1) == target).float().mean()
        self.log(f"{split}/loss", loss, prog_bar=True)
        self.log(f"{split}/token_acc", acc)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = scaled_learning_rate(self, self.learning_rate, self.scale_lr)
        return torch.optim.AdamW(self.transformer.optimizer_groups(self.weight_decay), lr=lr, betas=self.betas)

    # ------------------------------------------------------------------------------------------- sampling

    def decode_to_img(self, z: Tensor, grid: tuple[int, int]) -> Tensor:
        return self.first_stage_model.decode_code(z.view(z.shape[0], *grid)).clamp(-1, 1)

    def latent_grid(self, image_size: int | None = None) -> tuple[int, int]:
        f = self.first_stage_model.downsample_factor
        size = image_size or self.first_stage_model.encoder.resolution
        if size % f:
            raise ValueError(f"image size {size} is not divisible by the first stage's factor {f}")
        return size // f, size // f

    def _sample_opts(self, **kwargs: Any) -> dict[str, Any]:
        """Sampling arguments: draws limited to image codes, then the configured defaults, then ``kwargs``."""
        return {"vocab_limit": self.first_stage_model.vocab_size, **self.sample_kwargs, **kwargs}

    @torch.no_grad()
    def sample_from_c(self, c: Tensor, grid: tuple[int, int], **kwargs: Any) -> Tensor:
        z = sample_tokens(self.transformer, c, grid[0] * grid[1], **self._sample_opts(**kwargs))
        return self.decode_to_img(z, grid)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        labels: list[int] | Tensor | None = None,
        cond_images: Tensor | None = None,
        image_size: int | None = None,
        cond_split: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``n`` images, with what the conditioner returns beside them. Class models take ``labels`` (default:
        uniform random classes); spatial models take ``cond_images`` (default: conditions derived from random
        Fashion-MNIST ``cond_split`` images). An ``image_size`` above the training resolution samples its larger
        code grid with a sliding window. Other keyword arguments go to the sampler (temperature, top_k, ...)."""
        grid = self.latent_grid(image_size)
        size = image_size or self.first_stage_model.encoder.resolution
        batch, out = self.cond_stage_model.generation_batch(
            n, image_size=size, labels=labels, cond_images=cond_images, cond_split=cond_split
        )
        c = self.cond_stage_model(batch, n)
        window = self.latent_grid()  # the grid the transformer was trained on
        if grid[0] > window[0] or grid[1] > window[1]:
            out["images"] = self.sample_sliding(c, grid, window, **kwargs)
        else:
            out["images"] = self.sample_from_c(c, grid, **kwargs)
        return out

    @torch.no_grad()
    def sample_sliding(self, c: Tensor, grid: tuple[int, int], window: tuple[int, int], **kwargs: Any) -> Tensor:
        """Images whose code grid is larger than the training window (official ``sample_conditional.py``): every
        position is sampled from the window crop around it; spatial conditions are cropped alike."""
        opts = self._sample_opts(**kwargs)
        opts.pop("use_cache", None)
        shape = (c.shape[0], *grid)
        cond = self.cond_stage_model.window_conditioning(c, grid)
        z = sliding_window_sample(self.transformer, shape, window=window, **cond, **opts)
        return self.decode_to_img(z.flatten(1), grid)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = batch[self.image_key][:n].to(self.device)
        sub = {k: (v[:n] if isinstance(v, (Tensor, list)) else v) for k, v in batch.items()}
        z, grid = self.encode_to_z(x)
        c = self.encode_to_c(sub, x.shape[0])
        logs = {"inputs": x, "reconstructions": self.decode_to_img(z, grid), "samples": self.sample_from_c(c, grid)}
        half = z.shape[1] // 2  # complete the second half of each image (official "samples_half")
        z_half = sample_tokens(
            self.transformer, torch.cat((c, z[:, :half]), 1), z.shape[1] - half, **self._sample_opts()
        )
        logs["samples_half"] = self.decode_to_img(torch.cat((z[:, :half], z_half), 1), grid)
        logs.update(self.cond_stage_model.log_conditioning(sub, x.shape[0]))
        return logs
