"""Training objective of LDM's KL autoencoder (Rombach et al., CVPR 2022, App. G; official
``ldm/modules/losses/contperceptual.py``, ``LPIPSWithDiscriminator``).

The first stage is trained like taming's VQGAN (a perceptual loss plus a patch-based adversarial loss), with the
codebook term replaced by a slight KL penalty on q(z|x) and the reconstruction read as a Laplace likelihood with
one learnable scale::

    rec      = pixel_weight·|x − x̂| + w_p·LPIPS(x, x̂)                  (LPIPS (B,1,1,1) broadcast to every pixel)
    nll      = Σ (rec / exp(logvar) + logvar) / B                         (a SUM over C,H,W per sample: taming MEANs)
    kl       = Σ KL(q(z|x) || N(0, I)) / B
    g_loss   = −mean D(x̂)
    λ        = ‖∇_L nll‖ / (‖∇_L g_loss‖ + 1e-4), clamped to [0, 1e4], × disc_weight     (L = decoder.conv_out.weight)
    total    = nll + kl_weight·kl + λ·disc_factor·g_loss
    D loss   = disc_factor · ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))                    (hinge; or softplus)

``disc_factor`` is 0 before ``disc_start`` (training batches). Released configs: disc_start 50001, kl_weight 1e-6,
disc_weight 0.5; two Adam optimisers, betas (0.5, 0.9).

The learnable ``logvar`` is a parameter of the LOSS module. The official ``AutoencoderKL.configure_optimizers`` gives
the autoencoder optimiser only encoder / decoder / quant_conv / post_quant_conv parameters, so officially
``loss.logvar`` receives gradients but is never stepped and stays at ``logvar_init`` (despite the "train
encoder+decoder+logvar" comment). To learn it, add it to the autoencoder optimiser:
``Adam([*ae.parameters(), loss.logvar], ...)``; the discriminator optimiser takes ``loss.discriminator.parameters()``.

Submodule names are official (``logvar``, ``perceptual_loss.*``, ``discriminator.main.*``) so the ``loss.*`` entries
of official checkpoints load. The perceptual distance, the discriminator and the GAN losses are taming's
(:mod:`taming.losses`): ``perceptual="lpips"`` (VGG16 from a local file), ``"fmnist"`` (offline Fashion-MNIST runs) or
``"none"``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from taming.losses import PatchGANLoss, adopt_weight, build_perceptual

__all__ = ["LPIPSWithDiscriminator"]


class LPIPSWithDiscriminator(PatchGANLoss):
    """The KL-autoencoder loss with the official arguments, plus ``disc_ndf``, ``perceptual`` and
    ``perceptual_weights`` (the VGG16 / Fashion-MNIST network file).

    Use :meth:`generator_loss` and :meth:`discriminator_loss` from a manual-optimisation training step, or the
    official :meth:`forward` (``optimizer_idx`` 0 / 1). ``step`` / ``global_step`` count training batches.
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
            f"{split}/disc_factor": torch.tensor(float(disc_factor)),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log

    def forward(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posteriors: Any,
        optimizer_idx: int,
        global_step: int,
        last_layer: Tensor | None = None,
        cond: Tensor | None = None,
        split: str = "train",
        weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The official calling convention: optimizer_idx 0 → autoencoder loss, 1 → discriminator loss (before
        ``disc_start`` a zero that still backpropagates into the discriminator, as officially)."""
        if optimizer_idx == 0:
            return self.generator_loss(
                inputs, reconstructions, posteriors, global_step, last_layer, split, cond=cond, weights=weights
            )
        if optimizer_idx == 1:
            disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
            return self._d_loss(inputs, reconstructions, disc_factor, cond, split)
        raise ValueError(f"optimizer_idx must be 0 or 1, got {optimizer_idx}")
