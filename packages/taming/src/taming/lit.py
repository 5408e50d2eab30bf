"""Training recipes of Taming Transformers as LightningModules, built from injected networks and losses.

- :class:`VQGANModule` — the first stage: VQModel + :class:`~taming.losses.VQLPIPSWithDiscriminator`, manual
  optimisation with two Adam optimisers (betas 0.5, 0.9), codebook usage logging. With ``perceptual="none"``,
  ``pixel_loss="l2"`` and ``disc_weight=0`` the same module trains a plain VQ-VAE.
- :class:`Net2NetTransformer` — the second stage: a GPT over the frozen first stage's code indices, preceded by
  conditioning tokens (start token, class, or a second VQGAN's codes), with ``pkeep`` token corruption; AdamW
  (betas 0.9, 0.95, weight decay on Linear weights only).

Step counting: Lightning counts optimizer steps, so the VQGAN recipe advances ``global_step`` by 2 per batch
(generator + discriminator); ``disc_start`` and the EMA / image-grid callbacks count batches.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.modules import freeze
from taming.conditioning import ClassProvider, SOSProvider, condition_transform
from taming.losses import VQLPIPSWithDiscriminator
from taming.models.quantize import codebook_usage
from taming.sampling import sample_tokens, sliding_window_sample

__all__ = ["Net2NetTransformer", "VQGANModule", "psnr", "scaled_learning_rate"]


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (data range 2)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def scaled_learning_rate(module: L.LightningModule, lr: float, scale: bool) -> float:
    """Official rule (``main.py``): lr = base_lr × batch size × devices × accumulation."""
    if not scale:
        return lr
    trainer = module.trainer
    bs = getattr(trainer.datamodule, "batch_size", 1) if trainer.datamodule is not None else 1
    return lr * bs * trainer.world_size * trainer.accumulate_grad_batches


class VQGANModule(L.LightningModule):
    """VQGAN (or VQ-VAE) training.

    Args:
        model: a :class:`taming.models.vqgan.VQModel` (or GumbelVQ).
        loss: the VQGAN loss (its discriminator is trained here too).
        learning_rate: Adam lr; with ``scale_lr`` it is the official base rate (×batch×devices×accumulation).
        image_key: batch key of the images.
        condition: train on a condition image derived from the data (``edges`` / ``lowres``): the conditioning
            VQGAN of a spatially conditioned transformer.
        temperature_schedule: callable batch -> Gumbel temperature (GumbelVQ only; default: the model's own
            ``temperature_schedule`` if it has one).
        usage_every: batches per codebook-usage window (perplexity, used share, dead codes).
    """

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
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.model, self.loss = model, loss
        self.learning_rate, self.scale_lr, self.betas = learning_rate, scale_lr, tuple(betas)
        self.image_key, self.condition = image_key, condition
        self._to_input = condition_transform(condition)
        self.temperature_schedule = temperature_schedule
        self.usage_every = usage_every
        self.automatic_optimization = False
        self.register_buffer("_usage", torch.zeros(model.vocab_size, dtype=torch.long), persistent=False)
        self._usage_batches = 0

    @property
    def batch_step(self) -> int:
        """Training batches seen (two optimizer steps each)."""
        return self.global_step // 2

    def get_input(self, batch: dict[str, Any]) -> Tensor:
        if self.image_key not in batch:
            raise ValueError(f"batch has no key {self.image_key!r} (keys: {sorted(batch)})")
        return self._to_input(batch[self.image_key])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, codebook loss, indices)."""
        quant, qloss, info = self.model.encode(x)
        return self.model.decode(quant), qloss, info[2]

    def _track_usage(self, indices: Tensor) -> None:
        self._usage += torch.bincount(indices.flatten(), minlength=self._usage.numel())
        self._usage_batches += 1
        if self._usage_batches >= self.usage_every:
            used = self._usage > 0
            p = self._usage.double() / self._usage.sum()
            perplexity = torch.exp(-(p[used] * p[used].log()).sum())
            logs = {
                "train/perplexity": perplexity.float(),
                "train/codebook_used": used.double().mean().float(),
                "train/dead_codes": (~used).sum().float(),
            }
            if getattr(self.model.quantize, "restart_unused_after", 0):
                logs["train/codes_restarted"] = torch.tensor(float(self.model.quantize.restarts))
            self.log_dict(logs)
            self._usage.zero_()
            self._usage_batches = 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        opt_ae, opt_disc = self.optimizers()
        step = self.batch_step
        if self.temperature_schedule is not None:
            self.model.temperature = float(self.temperature_schedule(step))
        elif getattr(self.model, "temperature_schedule", None) is not None:
            self.model.temperature_scheduling(step)
        x = self.get_input(batch)
        xrec, qloss, indices = self(x)
        aeloss, log_ae = self.loss.generator_loss(qloss, x, xrec, step, last_layer=self.model.get_last_layer())
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(aeloss)
        opt_ae.step()
        dloss, log_d = self.loss.discriminator_loss(x, xrec, step)
        opt_disc.zero_grad(set_to_none=True)
        if dloss is not None:
            self.manual_backward(dloss)
        opt_disc.step()  # a no-op before disc_start (no gradients), keeps 2 optimizer steps per batch
        self.log("train/aeloss", aeloss.detach(), prog_bar=True)
        self.log_dict({**log_ae, **log_d})
        self._track_usage(indices)

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

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = scaled_learning_rate(self, self.learning_rate, self.scale_lr)
        ae_params = [p for p in self.model.parameters() if p.requires_grad]
        disc_params = list(self.loss.discriminator.parameters())
        return [
            torch.optim.Adam(ae_params, lr=lr, betas=self.betas),
            torch.optim.Adam(disc_params, lr=lr, betas=self.betas),
        ]

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = self.get_input(batch)[:n].to(self.device)
        return {"inputs": x, "reconstructions": self(x)[0].clamp(-1, 1)}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self(x)[0].clamp(-1, 1)


class Net2NetTransformer(L.LightningModule):
    """GPT over VQGAN codes, conditioned on tokens from a conditioning stage (``cond_transformer.py``).

    Args:
        transformer: the GPT (``taming.models.mingpt.GPT``); its vocabulary must cover the image codes and the
            conditioning tokens.
        first_stage: the frozen VQGAN whose code indices are modelled.
        cond_stage: ``"sos"`` (unconditional), ``"class"``, or a frozen VQGAN for spatial conditioning.
        n_classes / class_offset: class conditioning (class id + offset is the token; offset 0 is the official).
        sos_token: the start token for unconditional models.
        condition: for spatial conditioning, the condition image derived from the data image (``edges``,
            ``lowres``); ``None`` reads ``batch[cond_key]``.
        pkeep: probability of keeping each input image token during training (the rest are replaced by random
            codes; 1.0 = no corruption).
        learning_rate, scale_lr, weight_decay, betas: AdamW as in the official recipe.
        sample: default sampling arguments for image logging / ``generate`` (temperature, top_k, top_p).
    """

    def __init__(
        self,
        transformer: nn.Module,
        first_stage: nn.Module,
        cond_stage: str | nn.Module = "sos",
        n_classes: int = 10,
        class_offset: int = 0,
        sos_token: int = 0,
        condition: str | None = None,
        cond_key: str = "image",
        image_key: str = "image",
        pkeep: float = 1.0,
        learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        sample: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < pkeep <= 1.0:
            raise ValueError(f"pkeep must be in (0, 1], got {pkeep}")
        self.transformer = transformer
        self.first_stage_model = freeze(first_stage)
        if isinstance(cond_stage, str):
            if cond_stage == "sos":
                self.cond_stage_model: nn.Module = SOSProvider(sos_token)
            elif cond_stage == "class":
                self.cond_stage_model = ClassProvider(n_classes, class_offset)
            else:
                raise ValueError(f"cond_stage must be 'sos', 'class' or a VQGAN module, got {cond_stage!r}")
            self.cond_kind = cond_stage
        else:
            self.cond_stage_model = freeze(cond_stage)
            self.cond_kind = "spatial"
        self.condition, self.cond_key, self.image_key = condition, cond_key, image_key
        self._to_cond = condition_transform(condition)
        self.pkeep = pkeep
        self.learning_rate, self.scale_lr = learning_rate, scale_lr
        self.weight_decay, self.betas = weight_decay, tuple(betas)
        self.sample_kwargs = dict(sample or {})
        self._check_vocab()

    # --------------------------------------------------------------------------------------------- tokens

    def _check_vocab(self) -> None:
        vocab = self.transformer.vocab_size if hasattr(self.transformer, "vocab_size") else None
        if vocab is None:
            vocab = self.transformer.tok_emb.num_embeddings
        need = self.first_stage_model.vocab_size
        cond_end = self.cond_stage_model.vocab_size if self.cond_kind == "spatial" else self.cond_stage_model.vocab_end
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

    def cond_images(self, batch: dict[str, Any]) -> Tensor:
        src = batch[self.image_key] if self.condition is not None else batch[self.cond_key]
        return self._to_cond(src)

    def encode_to_c(self, batch: dict[str, Any], batch_size: int) -> Tensor:
        """The conditioning tokens (B, Lc) of a batch."""
        if self.cond_kind == "sos":
            return self.cond_stage_model.encode(batch_size, self.device)
        if self.cond_kind == "class":
            if "label" not in batch:
                raise ValueError("a class-conditional model needs batch['label']")
            return self.cond_stage_model.encode(torch.as_tensor(batch["label"], device=self.device))
        with torch.no_grad():
            return self.cond_stage_model.encode_to_indices(self.cond_images(batch).to(self.device)).flatten(1)

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
        cond_split: str = "test",
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``n`` images. Class models take ``labels`` (default: uniform random classes); spatial models take
        ``cond_images`` (default: conditions derived from random Fashion-MNIST ``cond_split`` images). An
        ``image_size`` above the training resolution samples its larger code grid with a sliding window."""
        grid = self.latent_grid(image_size)
        out: dict[str, Any] = {}
        if self.cond_kind == "sos":
            c = self.cond_stage_model.encode(n, self.device)
        elif self.cond_kind == "class":
            labels = (
                torch.randint(0, self.cond_stage_model.n_classes, (n,))
                if labels is None
                else torch.as_tensor(labels)[:n]
            )
            if len(labels) != n:
                raise ValueError(f"generate: {n} samples need {n} labels, got {len(labels)}")
            c = self.cond_stage_model.encode(labels.to(self.device))
            out["labels"] = labels.cpu()
        else:
            if cond_images is None:
                from gencore.data import FashionMNIST

                size = image_size or self.first_stage_model.encoder.resolution
                ds = FashionMNIST(
                    split=cond_split, image_size=size, channels=self.first_stage_model.encoder.in_channels
                )
                pick = torch.randint(0, len(ds), (n,))
                images = ds.to_model_range(ds.images[pick])
                cond_images = self._to_cond(images)
                out["labels"] = ds.labels[pick]
            c = self.cond_stage_model.encode_to_indices(cond_images.to(self.device)).flatten(1)
            out["conditions"] = cond_images.cpu()
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
        if self.cond_kind == "spatial":
            z = sliding_window_sample(self.transformer, shape, window=window, cond=c, cond_shape=grid, **opts)
        elif self.cond_kind == "sos":
            z = sliding_window_sample(
                self.transformer, shape, window=window, sos=self.cond_stage_model.sos_token, **opts
            )
        else:
            z = sliding_window_sample(self.transformer, shape, window=window, cond=c, **opts)
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
        if self.cond_kind == "spatial":
            logs["conditioning"] = self.cond_images(sub).to(self.device)
        return logs
