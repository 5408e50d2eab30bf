"""The SD3 training recipe as a LightningModule: an MMDiT over a frozen VAE's latents, conditioned on frozen text
encoders, trained with a rectified-flow objective (or the eps/linear LDM baseline of the paper's comparison).

Text encoders are dropped independently per sample during training (SD3: each encoder on its own), which is both the
classifier-free-guidance dropout and what lets the model run without T5. Sampling: Euler or Heun on the flow ODE with
the resolution shift and guidance (rf objectives), deterministic DDIM (eps/linear).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from gencore.modules import freeze

log = logging.getLogger(__name__)

__all__ = ["RectifiedFlowModule"]

SAMPLERS = ("euler", "heun", "ddim")


class RectifiedFlowModule(L.LightningModule):
    """Rectified-flow (or eps/linear) training of a text-conditional MMDiT.

    Args:
        transformer: ``sd3_flow.models.mmdit.MMDiT`` (``forward(latents, context, pooled, timestep)``).
        first_stage: a frozen gencore codec (``gencore.latents.diffusers_vae`` for the SD3 VAE; a toy 16-channel KL
            autoencoder through ``ldm.models.autoencoder.kl_codec`` by config); ``None`` = pixel space.
        text: ``sd3_flow.conditioning.SD3TextConditioner`` (or its keyword arguments).
        objective: ``"rf/lognorm(0.00,1.00)"``, ``"rf/mode(1.29)"``, ``"rf/cosmap"``, ``"rf"`` (uniform t),
            ``"eps/linear"``; ``objective_kwargs`` go to it (e.g. ``shift``, ``weighting``).
        p_drop_text: per-encoder dropout probability (a float for all, or ``{name: p}``).
        sample: defaults for ``generate`` / image logging: sampler (euler | heun | ddim), steps, shift, guidance_scale.
        latent_scale / latent_shift: the model works on ``(first_stage.encode(x) - latent_shift) * latent_scale``.
            1 / 0 (the default) when the codec is already normalised (the SD3 VAE codec applies its config's 1.5305 /
            0.0609); ``None`` estimates them from the first training batch (shift = latent mean, scale = 1 / std of
            the shifted latents, averaged over processes), the scale-and-shift SD3 does with fixed numbers, for an
            autoencoder you trained. They are buffers: saved with the checkpoint, used again for sampling.
    """

    def __init__(
        self,
        transformer: nn.Module,
        first_stage: nn.Module | None = None,
        text: nn.Module | Mapping[str, Any] | None = None,
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
        caption_key: str = "caption",
        sample: Mapping[str, Any] | None = None,
        latent_scale: float | None = 1.0,
        latent_shift: float | None = 0.0,
    ) -> None:
        super().__init__()
        from gencore.latents import IdentityCodec
        from sd3_flow.conditioning import SD3TextConditioner
        from sd3_flow.flow import EpsilonLinearLoss, make_objective

        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        self.transformer = transformer
        codec = first_stage if first_stage is not None else IdentityCodec(image_channels)
        self.first_stage_model = freeze(codec)
        if image_size % codec.downsample_factor:
            raise ValueError(
                f"image_size {image_size} is not divisible by the first stage's factor {codec.downsample_factor}"
            )
        self.latent_shape = (
            codec.latent_channels,
            image_size // codec.downsample_factor,
            image_size // codec.downsample_factor,
        )
        if latent_scale is not None and not latent_scale > 0:
            raise ValueError(f"latent_scale must be > 0 (or None to estimate it), got {latent_scale}")
        nan = float("nan")
        self.register_buffer("latent_scale", torch.tensor(nan if latent_scale is None else float(latent_scale)))
        self.register_buffer("latent_shift", torch.tensor(nan if latent_shift is None else float(latent_shift)))
        # known once the buffers hold numbers: checked on the host at most until then (not a device sync per step);
        # loading a state dict makes it look again
        self._latent_stats_known = latent_scale is not None and latent_shift is not None
        self.register_load_state_dict_post_hook(self._forget_latent_stats)
        self.text = text if isinstance(text, nn.Module) else SD3TextConditioner(**dict(text or {}))
        joint = getattr(transformer, "joint_attention_dim", None)
        if joint is not None and joint != self.text.joint_attention_dim:
            raise ValueError(
                f"text features are {self.text.joint_attention_dim} wide, the transformer's "
                f"joint_attention_dim is {joint}"
            )
        pooled = getattr(transformer, "pooled_projection_dim", None)
        if pooled is not None and pooled != self.text.pooled_dim:
            raise ValueError(f"pooled text is {self.text.pooled_dim} wide, the transformer expects {pooled}")
        self.objective_name = objective
        self.objective = make_objective(objective, **dict(objective_kwargs or {}))
        self.eps_model = isinstance(self.objective, EpsilonLinearLoss)
        self.p_drop_text = dict(p_drop_text) if isinstance(p_drop_text, Mapping) else float(p_drop_text)
        self.image_size, self.image_key, self.caption_key = image_size, image_key, caption_key
        self.learning_rate, self.weight_decay, self.betas = learning_rate, weight_decay, tuple(betas)
        default_sampler = "ddim" if self.eps_model else "euler"
        self.sample_kwargs = {
            "sampler": default_sampler,
            "steps": 28,
            "shift": 1.0,
            "guidance_scale": 1.0,
            **dict(sample or {}),
        }

    # ------------------------------------------------------------------------------------------ conditions

    def conditions(self, captions: list[str], keep: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        out = self.text(list(captions), keep)
        return {k: v.to(self.device) for k, v in out.items()}

    def velocity(self, x: Tensor, timestep: Tensor, context: Tensor, pooled: Tensor) -> Tensor:
        """The network output (velocity for rf, eps for eps/linear); ``timestep`` in [0, 1000]."""
        return self.transformer(x, context, pooled, timestep)

    # -------------------------------------------------------------------------------------------- latents

    def _forget_latent_stats(self, module: nn.Module, incompatible_keys: Any) -> None:
        self._latent_stats_known = False

    def _latent_stats_set(self) -> bool:
        if not self._latent_stats_known:
            self._latent_stats_known = not bool(torch.isnan(self.latent_shift) | torch.isnan(self.latent_scale))
        return self._latent_stats_known

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Pixels -> the model's latents (the codec's, then shifted and scaled)."""
        z = self.first_stage_model.encode(x)
        if not self._latent_stats_set():
            if not self.training:
                raise RuntimeError(
                    "latent_scale / latent_shift are not set: they are estimated at the first training batch "
                    "(train, load a trained checkpoint, or pass them)"
                )
            self._estimate_latent_stats(z)
        return (z - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        if not self._latent_stats_set():
            raise RuntimeError("latent_scale / latent_shift are not set (train first or load a trained checkpoint)")
        return self.first_stage_model.decode(z / self.latent_scale + self.latent_shift)

    def _estimate_latent_stats(self, z: Tensor) -> None:
        z = z.detach().float()
        shift = z.mean() if torch.isnan(self.latent_shift) else self.latent_shift.float()
        stats = torch.stack([shift, (z - shift).pow(2).mean()])
        if self._trainer is not None and self.trainer.world_size > 1:
            stats = self.all_gather(stats).reshape(-1, 2).mean(0)
        if torch.isnan(self.latent_shift):
            self.latent_shift.fill_(stats[0].item())
        if torch.isnan(self.latent_scale):
            self.latent_scale.fill_(1.0 / stats[1].sqrt().clamp_min(1e-8).item())
        self._latent_stats_known = True
        log.info("latents: shift %.5f, scale %.5f", float(self.latent_shift), float(self.latent_scale))

    # -------------------------------------------------------------------------------------------- training

    def _step(self, batch: dict[str, Any], split: str) -> Tensor:
        x = batch[self.image_key]
        if self.caption_key not in batch:
            raise ValueError(f"a text-conditional model needs batch[{self.caption_key!r}]")
        z = self.encode(x)
        keep = self.text.random_keep(z.shape[0], self.p_drop_text, device="cpu") if split == "train" else None
        cond = self.conditions(batch[self.caption_key], keep)
        loss, logs = self.objective(self.velocity, z, cond)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=z.shape[0])
        self.log_dict({f"{split}/{k}": v for k, v in logs.items() if k != "loss"}, batch_size=z.shape[0])
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        state = torch.random.get_rng_state()
        torch.manual_seed(batch_idx)  # the same t / noise at every validation
        try:
            self._step(batch, "val")
        finally:
            torch.random.set_rng_state(state)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay, betas=self.betas)

    # -------------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample_latents(
        self,
        cond: dict[str, Tensor],
        *,
        sampler: str = "euler",
        steps: int = 28,
        shift: float = 1.0,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        from sd3_flow.sampling import classifier_free_guidance, ddim_eps_sample, euler_sample, heun_sample

        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if (sampler == "ddim") != self.eps_model:
            raise ValueError(
                f"sampler {sampler!r} does not fit objective {self.objective_name!r} "
                f"({'ddim' if self.eps_model else 'euler / heun'} expected)"
            )
        n = cond["context"].shape[0]
        fn = self.velocity
        if guidance_scale != 1.0:
            fn = classifier_free_guidance(fn, guidance_scale, self.text.unconditional(1, self.device))
        x_T = torch.randn((n, *self.latent_shape), generator=generator, device=self.device)
        if sampler == "ddim":
            return ddim_eps_sample(fn, x_T, self.objective.alphas_cumprod, steps, cond=cond)
        sample = euler_sample if sampler == "euler" else heun_sample
        return sample(fn, x_T, steps, shift=shift, cond=cond)

    @torch.no_grad()
    def generate(
        self, n: int, captions: list[str] | None = None, labels: list[int] | Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """``n`` images for ``captions`` (or for the Fashion-MNIST captions of ``labels``; default: random
        classes). Sampler / steps / shift / guidance_scale as in ``sample``."""
        out: dict[str, Any] = {}
        if captions is None:
            from gencore.data import caption_for

            labels = torch.randint(0, 10, (n,)) if labels is None else torch.as_tensor(labels)[:n]
            captions = [caption_for(int(c)) for c in labels]
            out["labels"] = labels
        captions = list(captions)[:n]
        if len(captions) != n:
            raise ValueError(f"generate: {n} samples need {n} captions, got {len(captions)}")
        opts = {**self.sample_kwargs, **kwargs}
        z = self.sample_latents(self.conditions(captions), **opts)
        out.update(images=self.decode(z).clamp(-1, 1), captions=captions)
        return out

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = batch[self.image_key][:n].to(self.device)
        captions = list(batch[self.caption_key][:n])
        opts = {**self.sample_kwargs, "steps": min(int(self.sample_kwargs.get("steps", 28)), 28)}
        return {
            "inputs": x,
            "reconstructions": self.decode(self.encode(x)),
            "samples": self.generate(len(captions), captions=captions, **opts)["images"],
        }
