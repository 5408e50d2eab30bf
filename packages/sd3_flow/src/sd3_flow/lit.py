"""The SD3 training recipe as a LightningModule: an MMDiT over a frozen VAE's latents, conditioned on frozen text
encoders, trained with a rectified-flow objective (or the eps/linear LDM baseline of the paper's comparison).

Built from injected objects: the network, the first stage (a gencore codec), the conditioner
(:class:`sd3_flow.conditioning.SD3TextConditioner`, under the official name ``cond_stage_model``) and the objective
(:func:`sd3_flow.losses.make_objective`). The latents are normalised by a :class:`gencore.latents.LatentNormalizer`.
Text encoders are dropped independently per sample during training (SD3: each encoder on its own), which is both the
classifier-free-guidance dropout and what lets the model run without T5. Sampling: Euler or Heun on the flow ODE with
the resolution shift and guidance (rf objectives), deterministic DDIM (eps/linear); guidance is
:func:`gencore.diffusion.classifier_free_guidance` around :meth:`RectifiedFlowModule.velocity`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from gencore.conditioning import Conditioner, cond_batch_size
from gencore.diffusion import LossBuckets, check_probability
from gencore.io import accept_legacy_keys
from gencore.latents import LatentNormalizer
from gencore.modules import freeze

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_REQUESTS",
    "SAMPLE_DEFAULTS",
    "RectifiedFlowModule",
    "image_request",
    "legacy_arguments",
    "with_concat",
]

SAMPLERS = ("euler", "heun", "ddim")
#: what ``generate`` uses unless the module's ``sample`` defaults (the YAML configs set them) or the call say otherwise;
#: the sampler defaults to the objective's first (euler for rf, ddim for eps/linear)
SAMPLE_DEFAULTS: dict[str, Any] = {"num_steps": 28, "shift": 1.0, "guidance_scale": 1.0}
LOG_IMAGES_MAX_STEPS = 28  # image grids during training sample with at most this many steps
#: state-dict keys of older versions -> today's (exports and Lightning checkpoints written before the gencore pieces)
LEGACY_KEYS = {
    "latent_scale": "latent_norm.scale",
    "latent_shift": "latent_norm.shift",
    "text.": "cond_stage_model.",
}


def legacy_arguments(cond_stage_model: Any, text: Any, sample: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """Constructor arguments of configs written before the gencore refactor, in today's names (the one place that
    knows them): ``text`` (SD3TextConditioner keyword arguments, or a conditioner) -> ``cond_stage_model``;
    ``sample: {steps: N}`` -> ``sample: {num_steps: N}``. Returns ``(cond_stage_model, sample)``."""
    if text is not None:
        if cond_stage_model is not None:
            raise ValueError("pass the conditioner as cond_stage_model or (older configs) text, not both")
        if isinstance(text, nn.Module):
            cond_stage_model = text
        elif isinstance(text, Mapping):
            from sd3_flow.conditioning import SD3TextConditioner

            cond_stage_model = SD3TextConditioner(**dict(text))
        else:
            raise ValueError(f"text must be SD3TextConditioner arguments or a module, got {type(text).__name__}")
    sample = {k: v for k, v in dict(sample or {}).items() if v is not None}  # None: the default
    if "steps" in sample:
        if "num_steps" in sample:
            raise ValueError("sample defaults give both num_steps and (the older name) steps; keep num_steps")
        sample["num_steps"] = sample.pop("steps")
    return cond_stage_model, sample


#: generation requests of image-conditioned models, passed to the conditioner rather than the sampler
IMAGE_REQUESTS = ("images", "masks")


def with_concat(x: Tensor, c_concat: Tensor | None) -> Tensor:
    """The network input of an image-conditioned model: the image condition ``c_concat`` (if any) concatenated to the
    latent on the channels."""
    return x if c_concat is None else torch.cat([x, c_concat.to(x.dtype)], dim=1)


def image_request(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The image requests (:data:`IMAGE_REQUESTS`) taken out of ``kwargs`` (``None`` values dropped)."""
    taken = {k: kwargs.pop(k) for k in IMAGE_REQUESTS if k in kwargs}
    return {k: v for k, v in taken.items() if v is not None}


class RectifiedFlowModule(L.LightningModule):
    """Rectified-flow (or eps/linear) training of a text-conditional MMDiT.

    Args:
        transformer: ``sd3_flow.models.mmdit.MMDiT`` (``forward(latents, context, pooled, timestep)``).
        first_stage: a frozen gencore codec (``gencore.latents.diffusers_vae`` for the SD3 VAE; a toy 16-channel KL
            autoencoder through ``ldm.first_stage.kl_codec`` by config); ``None`` = pixel space.
        cond_stage_model: the conditioner, a :class:`gencore.conditioning.Conditioner` producing ``{"context",
            "pooled"}`` (:class:`sd3_flow.conditioning.SD3TextConditioner`; chosen by ``_target_`` in the configs);
            ``None``: the offline MiniLM one.
        objective: ``"rf/lognorm(0.00,1.00)"``, ``"rf/mode(1.29)"``, ``"rf/cosmap"``, ``"rf"`` (uniform t),
            ``"eps/linear"``; ``objective_kwargs`` go to it (e.g. ``shift``, ``weighting``, ``num_train_timesteps``).
        p_drop_text: per-encoder dropout probability in training (a float for all, or ``{name: p}``), passed to the
            conditioner as ``drop``.
        sample: defaults for ``generate`` / image logging: sampler (euler | heun | ddim), num_steps, shift,
            guidance_scale (older configs' ``steps`` is read as ``num_steps``).
        latent_scale / latent_shift: the model works on ``(first_stage.encode(x) - latent_shift) * latent_scale``
            (a :class:`gencore.latents.LatentNormalizer`). 1 / 0 (the default) when the codec is already normalised
            (the SD3 VAE codec applies its config's 1.5305 / 0.0609); ``None`` estimates them from the first training
            batch (shift = latent mean, scale = 1 / std, over every process), the scale-and-shift SD3 does with fixed
            numbers, for an autoencoder you trained. Saved with the weights, used again for sampling.
        loss_buckets: number of equal t bins of the per-timestep loss log ``{split}/loss_t/<lo>-<hi>`` (0: none).
        text: the older name of ``cond_stage_model`` (SD3TextConditioner keyword arguments), see
            :func:`legacy_arguments`.
    """

    def __init__(
        self,
        transformer: nn.Module,
        first_stage: nn.Module | None = None,
        cond_stage_model: Conditioner | None = None,
        *,
        objective: str = "rf/lognorm(0.00,1.00)",
        objective_kwargs: Mapping[str, Any] | None = None,
        p_drop_text: float | Mapping[str, float] = 0.1,
        image_channels: int = 3,
        image_size: int = 32,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        image_key: str = "image",
        sample: Mapping[str, Any] | None = None,
        latent_scale: float | None = 1.0,
        latent_shift: float | None = 0.0,
        loss_buckets: int = 10,
        text: Mapping[str, Any] | nn.Module | None = None,
    ) -> None:
        super().__init__()
        from gencore.latents import IdentityCodec
        from sd3_flow.conditioning import SD3TextConditioner
        from sd3_flow.losses import make_objective

        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        cond_stage_model, sample = legacy_arguments(cond_stage_model, text, sample)
        self.transformer = transformer
        codec = first_stage if first_stage is not None else IdentityCodec(image_channels)
        self.first_stage_model = freeze(codec)
        if image_size % codec.downsample_factor:
            raise ValueError(
                f"image_size {image_size} is not divisible by the first stage's factor {codec.downsample_factor}"
            )
        f = codec.downsample_factor
        self.latent_shape = (codec.latent_channels, image_size // f, image_size // f)
        self.latent_norm = LatentNormalizer(latent_scale, latent_shift)
        # older exports / checkpoints: the numbers were buffers of the module, the conditioner was called "text"
        accept_legacy_keys(self, LEGACY_KEYS)

        if cond_stage_model is None:
            cond_stage_model = SD3TextConditioner()
        if not isinstance(cond_stage_model, Conditioner):
            raise ValueError(
                f"cond_stage_model must be a gencore.conditioning.Conditioner, got {type(cond_stage_model).__name__}"
            )
        self.cond_stage_model = cond_stage_model
        self.cond_stage_model.bind(model=transformer, codec=codec, latent_shape=self.latent_shape, encode=self.encode)
        self.p_drop_text = check_probability(p_drop_text, "p_drop_text")

        self.objective_name = objective
        self.objective = make_objective(objective, **dict(objective_kwargs or {}))
        self.loss_buckets = {split: LossBuckets(loss_buckets, prefix="loss_t") for split in ("train", "val")}
        self.image_size, self.image_key = image_size, image_key
        self.learning_rate, self.weight_decay, self.betas = learning_rate, weight_decay, tuple(betas)
        self.sample_kwargs = {"sampler": self.objective.samplers[0], **SAMPLE_DEFAULTS, **sample}
        unknown = sorted(set(self.sample_kwargs) - {"sampler", *SAMPLE_DEFAULTS})
        if unknown:
            raise ValueError(f"unknown sample defaults {unknown}; expected sampler, {', '.join(SAMPLE_DEFAULTS)}")
        self._check_sampler(self.sample_kwargs["sampler"])

    # ------------------------------------------------------------------------------------------ network

    def velocity(
        self, x: Tensor, timestep: Tensor, context: Tensor, pooled: Tensor, c_concat: Tensor | None = None
    ) -> Tensor:
        """The network output (velocity for rf, eps for eps/linear); ``timestep`` in [0, 1000]. ``c_concat``: an image
        condition concatenated to the input channels (inpainting / editing models, :class:`~sd3_flow.conditioning.
        ConcatConditioner`)."""
        return self.transformer(with_concat(x, c_concat), context, pooled, timestep)

    # -------------------------------------------------------------------------------------------- latents

    @property
    def latent_scale(self) -> Tensor:
        """The latent scale (read-only; a buffer of :attr:`latent_norm`)."""
        return self.latent_norm.scale

    @property
    def latent_shift(self) -> Tensor:
        """The latent shift (read-only; a buffer of :attr:`latent_norm`)."""
        return self.latent_norm.shift

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Pixels -> the model's latents (the codec's, then shifted and scaled; estimated at the first training
        batch when not given)."""
        return self.latent_norm.normalize(self.first_stage_model.encode(x))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.first_stage_model.decode(self.latent_norm.denormalize(z))

    # -------------------------------------------------------------------------------------------- training

    def _step(self, batch: dict[str, Any], split: str) -> Tensor:
        z = self.encode(batch[self.image_key])
        cond = self.cond_stage_model(batch, drop=self.p_drop_text if split == "train" else 0.0)
        loss, logs = self.objective(self.velocity, z, cond, buckets=self.loss_buckets[split])
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=z.shape[0])
        self.log_dict({f"{split}/{k}": v for k, v in logs.items() if k != "loss"}, batch_size=z.shape[0])
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.loss_buckets["train"].log(self, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        state = torch.random.get_rng_state()
        torch.manual_seed(batch_idx)  # the same t / noise at every validation
        try:
            self._step(batch, "val")
        finally:
            torch.random.set_rng_state(state)

    def on_validation_epoch_end(self) -> None:
        self.loss_buckets["val"].log(self, "val", force=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay, betas=self.betas)

    # -------------------------------------------------------------------------------------------- sampling

    def _check_sampler(self, sampler: str) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if sampler not in self.objective.samplers:
            raise ValueError(
                f"sampler {sampler!r} does not fit objective {self.objective_name!r} "
                f"({' / '.join(self.objective.samplers)} expected)"
            )

    @torch.no_grad()
    def sample_latents(
        self,
        cond: Mapping[str, Tensor],
        *,
        sampler: str,
        num_steps: int,
        shift: float,
        guidance_scale: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Latents for the conditions ``cond`` (``{"context", "pooled"}``): Euler / Heun over
        ``flow_timesteps(num_steps, shift)`` or DDIM over ``ddim_timesteps(num_steps, T)``, with classifier-free
        guidance against the conditioner's unconditional condition when ``guidance_scale`` != 1."""
        from gencore.diffusion import classifier_free_guidance, ddim_timesteps
        from sd3_flow.sampling import ddim_eps_sample, euler_sample, flow_timesteps, heun_sample

        self._check_sampler(sampler)
        fn = self.velocity
        if guidance_scale != 1.0:
            fn = classifier_free_guidance(fn, guidance_scale, self.cond_stage_model.unconditional(1))
        x_T = torch.randn((cond_batch_size(cond), *self.latent_shape), generator=generator, device=self.device)
        scale = self.objective.timestep_scale
        if sampler == "ddim":
            timesteps = ddim_timesteps(num_steps, self.objective.num_train_timesteps)
            return ddim_eps_sample(fn, x_T, self.objective.alphas_cumprod, timesteps, cond=cond, timestep_scale=scale)
        integrate = euler_sample if sampler == "euler" else heun_sample
        return integrate(fn, x_T, flow_timesteps(num_steps, shift), cond=cond, timestep_scale=scale)

    @torch.no_grad()
    def generate(
        self, n: int, captions: list[str] | None = None, labels: list[int] | Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """``n`` images for ``captions`` (or for the Fashion-MNIST captions of ``labels``; default: random
        classes) -> ``{"images", "captions", "labels"?}``. sampler / num_steps / shift / guidance_scale / generator
        override the module's ``sample`` defaults. Image-conditioned models (inpainting, editing) also take their
        conditioner's image requests (``images``, ``masks``) and return ``sources`` (and ``targets`` where known)."""
        batch, out = self.cond_stage_model.generation_batch(
            n, captions=captions, labels=labels, **image_request(kwargs)
        )
        cond = self.cond_stage_model.encode(batch, n)
        z = self.sample_latents(cond, **{**self.sample_kwargs, **kwargs})
        out["images"] = self.decode(z).clamp(-1, 1)
        return out

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = batch[self.image_key][:n].to(self.device)
        cond = self.cond_stage_model.encode(batch, len(x))  # the batch's own captions
        opts = {**self.sample_kwargs, "num_steps": min(int(self.sample_kwargs["num_steps"]), LOG_IMAGES_MAX_STEPS)}
        return {
            "inputs": x,
            "reconstructions": self.decode(self.encode(x)),
            "samples": self.decode(self.sample_latents(cond, **opts)).clamp(-1, 1),
        }
