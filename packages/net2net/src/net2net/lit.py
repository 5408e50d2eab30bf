"""The cINN training recipe of Net2Net / the data-bias note as a LightningModule (official ``Net2NetFlow``).

One autoencoder is trained on the union of the datasets first (``net2net-train experiment=autoencoder_union``: ldm's
KL recipe over :class:`net2net.data.UnionDataModule`) and then frozen (``first_stage_model``). The conditional
invertible network ``flow`` maps its latent z to a residual v given the expert's conditioning c (the one-hot dataset
label, ``cond_stage_model``), trained by maximum likelihood (Net2Net Eq. 2-3):

    v, log|det J| = T(z | c);   loss = mean_b ½‖v‖² − mean_b log|det J|         (official ``NLL``)

with z a sample of the autoencoder's posterior (``encode_to_z``). What the datasets share lives in v; the label
carries what differs. Inverting with another label projects onto another dataset (the note's Eq. 1):

    z' = T⁻¹(T(z | y_src) | y_tgt)

Training reads cached posterior moments (:class:`net2net.data.LatentUnionDataModule`: mean and std, a fresh posterior
sample each step as the official code draws one) or, as the official code does, encodes images every step.
Optimiser: Adam(flow parameters, betas (0.5, 0.9), amsgrad) at the official rule lr = base × batch × devices ×
accumulation; the frozen autoencoder and the parameter-free label expert are outside it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from gencore.conditioning import take
from gencore.modules import freeze
from gencore.training import scaled_learning_rate
from net2net import ops
from net2net.conditioning import Labelator
from net2net.models.flow import bits_per_dim, nll_loss

log = logging.getLogger(__name__)

__all__ = ["Net2NetFlow"]


def _conditioning_dim(flow: nn.Module) -> int:
    return int(flow.embedder.main[0].in_features)


class Net2NetFlow(L.LightningModule):
    """A cINN over a frozen first stage's latents, conditioned by an expert.

    Args:
        flow: :class:`net2net.models.flow.ConditionalFlatCouplingFlow` (``in_channels`` = C·h·w of the latents).
        first_stage: a frozen gencore codec (``ldm.first_stage.KLCodec`` by default in the configs; taming's VQGAN
            codec works too) of the autoencoder trained on the union.
        conditioner: the expert (:mod:`net2net.conditioning`); default: :class:`Labelator` over ``dataset_names``.
        dataset_names: the union's member names, in label order (``fashion_mnist``, ``digits``, ``lfw``).
        image_size: the images' size (the latents are C × size/f × size/f).
        learning_rate / scale_lr / betas / amsgrad: the official optimiser (base 4.5e-6 × batch × devices × accum).
        fused: torch's fused Adam kernel (the same update; 3-5x faster steps of the paper's 180M-parameter flow on a
            CPU); None: where every parameter is a float tensor on a CPU or CUDA device.
        sample_posterior: train on posterior samples (official) rather than the posterior mean.
        latent_noise: the standard deviation of extra Gaussian noise added to the training latents (not in the
            official code, 0 there): the flow then fits the latents' density smoothed by N(0, σ²), a regulariser when
            a dataset is small (the toy's 85 training faces); validation and inference see the latents without it.
        image_key / latent_key: batch keys of images (encoded every step) or cached latents (with ``std``).
        temperature: default scale of v when sampling.
    """

    def __init__(
        self,
        flow: nn.Module,
        first_stage: nn.Module,
        conditioner: nn.Module | None = None,
        *,
        dataset_names: Sequence[str] = ("fashion_mnist", "digits", "lfw"),
        image_size: int = 32,
        learning_rate: float = 4.5e-6,
        scale_lr: bool = True,
        betas: Sequence[float] = (0.5, 0.9),
        amsgrad: bool = True,
        fused: bool | None = None,
        sample_posterior: bool = True,
        latent_noise: float = 0.0,
        image_key: str = "image",
        latent_key: str = "latent",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not latent_noise >= 0:
            raise ValueError(f"latent_noise must be >= 0, got {latent_noise}")
        self.dataset_names = tuple(str(n) for n in dataset_names)
        if conditioner is None:
            conditioner = Labelator(len(self.dataset_names), "dataset", names=self.dataset_names)
        f = int(first_stage.downsample_factor)
        if image_size % f:
            raise ValueError(f"image_size {image_size} is not divisible by the first stage's downsampling factor {f}")
        self.latent_shape = (int(first_stage.latent_channels), image_size // f, image_size // f)
        width = math.prod(self.latent_shape)
        if width != flow.in_channels:
            raise ValueError(
                f"latents of width {width} ({'x'.join(map(str, self.latent_shape))} from the first stage at "
                f"image_size {image_size}), but the flow was built for in_channels={flow.in_channels}: build it "
                f"with in_channels={width} (on the command line: +module.flow.in_channels={width})"
            )
        cond_width = int(getattr(conditioner, "width", _conditioning_dim(flow)))
        if cond_width != _conditioning_dim(flow):
            raise ValueError(
                f"the expert {type(conditioner).__name__} gives conditionings of width {cond_width}, the flow's "
                f"embedder takes conditioning_dim={_conditioning_dim(flow)}"
            )
        self.first_stage_model = freeze(first_stage)
        self.cond_stage_model = conditioner
        self.flow = flow
        self.image_size = int(image_size)
        self.learning_rate, self.scale_lr = float(learning_rate), bool(scale_lr)
        self.betas, self.amsgrad, self.fused = (float(betas[0]), float(betas[1])), bool(amsgrad), fused
        self.sample_posterior = bool(sample_posterior)
        self.latent_noise = float(latent_noise)
        self.image_key, self.latent_key = image_key, latent_key
        self.temperature = float(temperature)
        k = len(self.dataset_names)
        # per-dataset bits/dim of the validation epoch, accumulated on the device (no host sync per batch)
        self.register_buffer("_val_bpd_sum", torch.zeros(k, dtype=torch.float64), persistent=False)
        self.register_buffer("_val_count", torch.zeros(k, dtype=torch.float64), persistent=False)

    # ------------------------------------------------------------------------------------- latents

    @property
    def latent_width(self) -> int:
        return int(self.flow.in_channels)

    def flatten(self, z: Tensor) -> Tensor:
        """(B, C, h, w) latents -> (B, D); a clear error for latents of another shape."""
        if z.dim() == 2 and z.shape[1] == self.latent_width:
            return z
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents of shape {tuple(z.shape[1:])}, this model's first stage makes "
                f"{self.latent_shape} (width {self.latent_width})"
            )
        return z.reshape(z.shape[0], -1)

    def unflatten(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *self.latent_shape)

    @torch.no_grad()
    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] -> (B, D) latents: the posterior mean (projection, official ``return_mode=True``) or a
        sample (training, ``encode_to_z``)."""
        codec = self.first_stage_model
        model = getattr(codec, "model", None)
        if sample and model is not None and hasattr(model, "encode"):
            posterior = model.encode(x)
            if hasattr(posterior, "sample"):
                z = (posterior.sample(generator=generator) - codec.shift) * codec.scale
                return self.flatten(z)
        return self.flatten(codec.encode(x))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """(B, D) latents -> images in [-1, 1]."""
        return self.first_stage_model.decode(self.unflatten(z)).clamp(-1, 1)

    def latents(self, batch: Mapping[str, Any]) -> Tensor:
        """The (B, D) latents the flow trains on: cached moments (+ a posterior sample) or images encoded now."""
        if self.latent_key in batch:
            z = batch[self.latent_key]
            if self.sample_posterior and "std" in batch:
                z = z + batch["std"] * torch.randn_like(z)
            return self.flatten(z)
        if self.image_key in batch:
            return self.encode(batch[self.image_key], sample=self.sample_posterior)
        raise ValueError(f"batch has neither {self.latent_key!r} (cached latents) nor {self.image_key!r} (images)")

    def conditioning(self, batch: Mapping[str, Any], n: int | None = None) -> Tensor:
        return self.cond_stage_model.encode(batch, n).to(self.device)

    def forward(self, z: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """(v, log|det J|) = T(z | c)."""
        return self.flow(self.flatten(z), c)

    # ------------------------------------------------------------------------------------- training

    def shared_step(self, batch: Mapping[str, Any], split: str) -> tuple[Tensor, Tensor, Tensor]:
        z = self.latents(batch)
        if split == "train" and self.latent_noise > 0:
            z = z + self.latent_noise * torch.randn_like(z)
        v, logdet = self(z, self.conditioning(batch, z.shape[0]))
        loss, parts = nll_loss(v, logdet)
        bpd = bits_per_dim(v, logdet)
        on_step = split == "train"
        self.log(f"{split}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=not on_step)
        self.log(f"{split}/bits_per_dim", bpd.mean(), on_step=on_step, on_epoch=not on_step)
        self.log_dict({f"{split}/{k}": v_ for k, v_ in parts.items()}, on_step=on_step, on_epoch=not on_step)
        return loss, bpd, z

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, _, _ = self.shared_step(batch, "train")
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, bpd, _ = self.shared_step(batch, "val")
        if "dataset" in batch:
            idx = torch.as_tensor(batch["dataset"], device=bpd.device).long().reshape(-1)
            self._val_bpd_sum.index_add_(0, idx, bpd.double())
            self._val_count.index_add_(0, idx, torch.ones_like(bpd, dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        mean = self._val_bpd_sum / self._val_count.clamp(min=1)
        seen = (self._val_count > 0).tolist()  # one host read per validation epoch
        for i, name in enumerate(self.dataset_names):
            if seen[i]:  # a dataset without validation items this epoch has no bits/dim (not 0)
                self.log(f"val/bits_per_dim/{name}", mean[i].float())
        self._val_bpd_sum.zero_()
        self._val_count.zero_()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = scaled_learning_rate(self, self.learning_rate, self.scale_lr)
        params = list(self.flow.parameters())
        fused = self.fused
        if fused is None:
            fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.Adam(params, lr=lr, betas=self.betas, amsgrad=self.amsgrad, fused=fused or None)

    # ------------------------------------------------------------------------------------- inference

    def dataset_index(self, name: int | str) -> int:
        """A dataset's label from its name or id; an unknown one is a ValueError naming the known ones."""
        known = ", ".join(f"{i}={n}" for i, n in enumerate(self.dataset_names))
        if isinstance(name, str) and not name.lstrip("-").isdigit():
            if name not in self.dataset_names:
                raise ValueError(f"unknown dataset {name!r}; this model knows {known}")
            return self.dataset_names.index(name)
        i = int(name)
        if not 0 <= i < len(self.dataset_names):
            raise ValueError(f"unknown dataset label {name!r}; this model knows {known}")
        return i

    def labels_tensor(self, labels: Any, n: int | None = None) -> Tensor:
        """(B,) dataset ids from one label (repeated ``n`` times), a list of ids / names, or a tensor."""
        if isinstance(labels, (int, str)):
            labels = [labels] * (n or 1)
        if isinstance(labels, Tensor):
            labels = labels.reshape(-1).tolist()
        return torch.tensor([self.dataset_index(v) for v in labels], dtype=torch.long)

    def one_hot(self, labels: Any) -> Tensor:
        """Dataset labels (ids or names) -> the expert's one-hot conditioning on this device."""
        return self.cond_stage_model.make_one_hot(self.labels_tensor(labels)).to(self.device)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        labels: Any = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
        **request: Any,
    ) -> dict[str, Any]:
        """``n`` samples: v ~ N(0, temperature² I), z = T⁻¹(v | c), x = decode(z) (official ``sample_all_labels``);
        ``labels`` picks each sample's dataset (ids or names; default random), returned as ``labels``."""
        batch, out = self.cond_stage_model.generation_batch(n, labels=labels, **request)
        c = self.conditioning(batch, n)
        t = self.temperature if temperature is None else float(temperature)
        z = ops.sample(self.flow, c, self.latent_width, temperature=t, generator=generator)
        return {**out, "images": self.decode(z)}

    @torch.no_grad()
    def project(self, x: Tensor, source: Any, targets: Sequence[Any] | None = None) -> Tensor:
        """Project images ``x`` (B, C, H, W) of dataset(s) ``source`` onto each of ``targets`` (default: every
        dataset): (B, K, C, H, W) images of z' = T⁻¹(T(z | y_src) | y_tgt), z the posterior mean."""
        x = x.to(self.device)
        src = self.labels_tensor(source, x.shape[0])
        if src.shape[0] != x.shape[0]:
            raise ValueError(f"project: {x.shape[0]} images but {src.shape[0]} source labels")
        tgt = list(range(len(self.dataset_names))) if targets is None else [self.dataset_index(t) for t in targets]
        z = self.encode(x)
        zp = ops.project_all(self.flow, z, self.one_hot(src), self.one_hot(tgt))  # (B, K, D)
        b, k = zp.shape[:2]
        return self.decode(zp.reshape(b * k, -1)).reshape(b, k, *x.shape[1:])

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        """Inputs (decoded latents when the batch holds latents), flow reconstructions, the official "shift" (each
        item inverted with the next item's conditioning) and samples with the batch's conditionings."""
        if self.latent_key in batch:
            z = self.flatten(take(batch, self.latent_key, n, "log_images").to(self.device))
            inputs = self.decode(z)
        else:
            inputs = take(batch, self.image_key, n, "log_images").to(self.device)
            z = self.encode(inputs)
        c = self.conditioning(batch, z.shape[0])
        v, _ = self.flow(z, c)
        return {
            "inputs": inputs,
            "reconstructions": self.decode(self.flow.reverse(v, c)),
            "shift": self.decode(self.flow.reverse(v, torch.roll(c, -1, dims=0))),
            "samples": self.decode(ops.sample(self.flow, c, self.latent_width)),
        }
