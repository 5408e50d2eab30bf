"""Training objectives of Latent Diffusion (Rombach et al., CVPR 2022): the diffusion loss of the denoiser and the loss
of the KL-regularised first stage.

**DiffusionLoss** (official ``ldm/models/diffusion/ddpm.py``, ``LatentDiffusion.p_losses``; LDM Eq. 2 = DDPM Eq. 14
on latents): t ~ U{0..T-1}, x_t = q_sample(x0, t, eps), L_simple = ||target - f(x_t, t, c)||^2 averaged over C, H, W
(target eps, x0 or v), then over the batch; plus the optional VLB term ``original_elbo_weight * mean(lvlb_w[t] L_t)``.
Classifier-free conditioning dropout is the conditioner's (:mod:`ldm.conditioning`), not the loss's; the per-timestep
curves go to a :class:`gencore.diffusion.LossBuckets`.

**LPIPSWithDiscriminator** (App. G; official ``ldm/modules/losses/contperceptual.py``). The first stage is trained
like taming's VQGAN (a perceptual loss plus a patch-based adversarial loss), with the codebook term replaced by a
slight KL penalty on q(z|x) and the reconstruction read as a Laplace likelihood with one learnable scale::

    rec      = pixel_weight·|x − x̂| + w_p·LPIPS(x, x̂)                  (LPIPS (B,1,1,1) broadcast to every pixel)
    nll      = Σ (rec / exp(logvar) + logvar) / B                         (a SUM over C,H,W per sample: taming MEANs)
    kl       = Σ KL(q(z|x) || N(0, I)) / B
    g_loss   = −mean D(x̂)
    λ        = ‖∇_L nll‖ / (‖∇_L g_loss‖ + 1e-4), clamped to [0, 1e4], × disc_weight     (L = decoder.conv_out.weight)
    total    = nll + kl_weight·kl + λ·disc_factor·g_loss
    D loss   = disc_factor · ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))                    (hinge; or softplus)

``disc_factor`` is 0 before ``disc_start`` (training batches). Released configs: disc_start 50001, kl_weight 1e-6,
disc_weight 0.5; two Adam optimisers, betas (0.5, 0.9) (:class:`ldm.lit.AutoencoderKLModule`).

The learnable ``logvar`` is a parameter of the LOSS module. The official ``AutoencoderKL.configure_optimizers`` gives
the autoencoder optimiser only encoder / decoder / quant_conv / post_quant_conv parameters, so officially
``loss.logvar`` receives gradients but is never stepped and stays at ``logvar_init`` (despite the "train
encoder+decoder+logvar" comment). To learn it, add it to the autoencoder optimiser (``learn_logvar=True`` of the
recipe); the discriminator optimiser takes ``loss.discriminator.parameters()``.

Submodule names are official (``logvar``, ``perceptual_loss.*``, ``discriminator.main.*``) so the ``loss.*`` entries
of official checkpoints load. The perceptual distance, the discriminator and the GAN losses are taming's
(:mod:`taming.losses`): ``perceptual="lpips"`` (VGG16 from a local file), ``"fmnist"`` (offline Fashion-MNIST runs) or
``"none"``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gencore.diffusion import PARAMETERIZATIONS, LossBuckets, call_denoiser
from gencore.modules import check_index_range
from ldm.diffusion import DiffusionSchedule
from taming.losses import PatchGANLoss, build_perceptual

__all__ = ["DiffusionLoss", "LPIPSWithDiscriminator"]


# ---------------------------------------------------------------------------------------------- the diffusion loss


class DiffusionLoss:
    """The LDM training objective (``LatentDiffusion.p_losses``); owns timestep sampling and weighting.

    ``loss, log = DiffusionLoss(schedule)(model_fn, x0, cond, noise=..., t=..., buckets=...)``:
    t ~ U{0..T-1} per sample, x_t = q_sample(x0, t, noise), target = noise | x0 | v for parameterization
    "eps" | "x0" | "v", ``loss_simple`` = ((out - target)^2).mean over all but the batch dim (|.| for ``loss_type``
    "l1"), ``loss = l_simple_weight * mean_b(loss_simple) + original_elbo_weight * mean_b(lvlb_w[t] loss_simple)``.
    The official learnable per-timestep ``logvar`` is not implemented (``learn_logvar=False``, logvar = 0, in every
    official config, where the division by exp(0) and the + 0 are no-ops); ``original_elbo_weight`` is 0 in all
    official configs. ``model_fn`` is called through :func:`gencore.diffusion.call_denoiser`.

    The log dict holds detached scalars: ``loss``, ``loss_simple``, ``loss_vlb``. ``buckets`` (a
    :class:`gencore.diffusion.LossBuckets`) receives the per-sample ``loss_simple`` at t / T (on the device, no host
    sync). The schedule is referenced, not owned: move it with the module that registers it.
    """

    def __init__(
        self,
        schedule: DiffusionSchedule,
        *,
        parameterization: str = "eps",
        loss_type: str = "l2",
        l_simple_weight: float = 1.0,
        original_elbo_weight: float = 0.0,
    ) -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization={parameterization!r}; expected one of {PARAMETERIZATIONS}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"unknown loss_type={loss_type!r}; expected 'l1' or 'l2'")
        self.schedule = schedule
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.l_simple_weight = float(l_simple_weight)
        self.original_elbo_weight = float(original_elbo_weight)
        self._lvlb = schedule.lvlb_weights(parameterization)  # (T,), moved to the data's device on first use

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def sample_t(self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """t ~ U{0, ..., T-1}, shape (batch_size,), long."""
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)

    def __call__(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        cond: Any = None,
        *,
        noise: Tensor | None = None,
        t: Tensor | int | None = None,
        generator: torch.Generator | None = None,
        buckets: LossBuckets | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b = x0.shape[0]  # x0: (B, C, H, W) latents (any (B, ...) works)
        if t is None:
            t = self.sample_t(b, x0.device, generator)
        else:
            t = torch.as_tensor(t, device=x0.device).long()
            t = t.expand(b) if t.dim() == 0 else t
            if t.shape != (b,):
                raise ValueError(f"t must have shape ({b},), got t.shape={tuple(t.shape)}")
            check_index_range(t, self.num_timesteps, "DiffusionLoss: t")
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")

        x_t = self.schedule.q_sample(x0, t, noise)  # (B, C, H, W)
        out = call_denoiser(model_fn, x_t, t, cond)
        if out.shape != x0.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} != x0 shape {tuple(x0.shape)}")
        if self.parameterization == "eps":
            target = noise
        elif self.parameterization == "x0":
            target = x0
        else:
            target = self.schedule.get_v(x0, noise, t)
        err = (out - target).abs() if self.loss_type == "l1" else (out - target) ** 2
        loss_simple = err.float().mean(dim=tuple(range(1, err.dim())))  # (B,)
        loss = self.l_simple_weight * loss_simple.mean()
        if self._lvlb.device != loss_simple.device:
            self._lvlb = self._lvlb.to(loss_simple.device)
        loss_vlb = (self._lvlb[t] * loss_simple).mean()  # logged always, as officially
        if self.original_elbo_weight:
            loss = loss + self.original_elbo_weight * loss_vlb
        if buckets is not None:
            buckets.update(loss_simple, t.float() / self.num_timesteps)
        log = {"loss": loss.detach(), "loss_simple": loss_simple.mean().detach(), "loss_vlb": loss_vlb.detach()}
        return loss, log


# ------------------------------------------------------------------------------------ the first stage's loss


class LPIPSWithDiscriminator(PatchGANLoss):
    """The KL-autoencoder loss with the official arguments, plus ``disc_ndf``, ``perceptual`` and
    ``perceptual_weights`` (the VGG16 / Fashion-MNIST network file).

    :meth:`generator_loss` and :meth:`discriminator_loss` (taming's, returning ``None`` before ``disc_start``) are the
    generator and discriminator steps of :class:`ldm.lit.AutoencoderKLModule`; ``step`` counts training batches.
    ``pixelloss_weight`` scales |x − x̂| (the official code stores but ignores it; released configs leave it at 1).
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        *,
        disc_ndf: int = 64,
        perceptual: str = "lpips",
        perceptual_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(
            disc_start=disc_start,
            disc_num_layers=disc_num_layers,
            disc_in_channels=disc_in_channels,
            disc_factor=disc_factor,
            disc_weight=disc_weight,
            use_actnorm=use_actnorm,
            disc_conditional=disc_conditional,
            disc_ndf=disc_ndf,
            disc_loss=disc_loss,
        )
        for name, value in (
            ("kl_weight", kl_weight),
            ("perceptual_weight", perceptual_weight),
            ("pixelloss_weight", pixelloss_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight if perceptual != "none" else 0.0
        self.perceptual_loss = build_perceptual(perceptual, perceptual_weights) if self.perceptual_weight > 0 else None
        # output log variance: a learnable scalar (put it in the autoencoder optimiser to learn it; see module doc)
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)

    # ---------------------------------------------------------------------------------------------- pieces

    def nll_loss(
        self, inputs: Tensor, reconstructions: Tensor, weights: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(nll, weighted nll, per-pixel rec loss (B, C, H, W), perceptual loss): both NLLs are sums / B."""
        if inputs.shape != reconstructions.shape:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and reconstructions {tuple(reconstructions.shape)} differ in shape"
            )
        rec = self.pixel_weight * (inputs.contiguous() - reconstructions.contiguous()).abs()
        p_loss = torch.zeros((), device=inputs.device)
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous())  # (B, 1, 1, 1)
            rec = rec + self.perceptual_weight * p_loss
        nll = rec / torch.exp(self.logvar) + self.logvar  # (B, C, H, W)
        weighted = nll if weights is None else weights * nll
        b = nll.shape[0]
        return nll.sum() / b, weighted.sum() / weighted.shape[0], rec, p_loss

    @staticmethod
    def kl_loss(posterior: Any) -> Tensor:
        """Σ KL(q(z|x) || N(0, I)) / B."""
        kl = posterior.kl()  # (B,)
        return kl.sum() / kl.shape[0]

    # ------------------------------------------------------------------------------------------- the losses

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: Any,
        step: int,
        last_layer: Tensor | None = None,
        split: str = "train",
        *,
        cond: Tensor | None = None,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder loss ``nll + kl_weight·kl + λ·disc_factor·g_loss`` and its log.

        ``last_layer`` (``ae.get_last_layer()``) is required for the adaptive weight once the discriminator is on
        and gradients are enabled; without gradients (validation) λ is 0, as officially.
        """
        nll, weighted_nll, rec, p_loss = self.nll_loss(inputs, reconstructions, weights)
        kl = self.kl_loss(posterior)
        g_loss, d_weight, disc_factor = self.adversarial_term(nll, reconstructions, step, last_layer, cond)
        loss = weighted_nll + self.kl_weight * kl + d_weight * disc_factor * g_loss
        log = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl.detach(),
            f"{split}/nll_loss": nll.detach(),
            f"{split}/rec_loss": rec.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.full((), float(disc_factor), device=inputs.device),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log
