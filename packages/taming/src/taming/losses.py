"""VQGAN training objective (Taming Transformers, Sec. 3.2, Eq. 4-6; ``taming/modules/losses/vqperceptual.py``).

    rec      = |x − x̂|  (or (x − x̂)²)  + w_p · perceptual(x, x̂)
    nll      = mean(rec)                                              (a MEAN; LDM's KL loss sums)
    g_loss   = −mean(D(x̂))
    λ        = ‖∇_L nll‖ / (‖∇_L g_loss‖ + 1e-4), clamped to [0, 1e4], × disc_weight       (Eq. 7, L = last layer)
    total    = nll + λ · disc_factor · g_loss + codebook_weight · q_loss
    D loss   = disc_factor · ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))                  (hinge; or softplus)

``disc_factor`` is 0 before ``disc_start`` (counted in training batches). The GAN pieces (``adopt_weight``, the hinge /
vanilla discriminator losses, the adaptive weight λ) are gencore's (:mod:`gencore.training`), shared with ldm's
autoencoder loss. The modules keep the official names
(``perceptual_loss.{scaling_layer,net.slice*,lin*}``, ``discriminator.main.*``) so the ``loss.*`` entries of official
training checkpoints load into them.

Perceptual distances:

- ``lpips`` — LPIPS (VGG16 + the learned linear heads). The heads ship with the ``lpips`` package (byte-identical to
  taming's ``vgg.pth``); the ImageNet VGG16 weights cannot be downloaded here and are read from a local file
  (``vgg16-397923af.pth``, torchvision's), or a :class:`MissingWeightsError` says what is missing;
- ``fmnist`` — for offline Fashion-MNIST runs: the same LPIPS form (unit-normalised activations, squared
  differences, spatial mean) over the conv blocks of gencore's frozen Fashion-MNIST network, uniform channel weights;
- ``none`` — pixel loss only (the plain VQ-VAE baseline, with ``pixel_loss="l2"``).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from gencore.metrics.fmnist_net import FMNISTPerceptual
from gencore.modules import FrozenModule
from gencore.training import adaptive_weight, adopt_weight, hinge_d_loss, vanilla_d_loss

__all__ = [
    "LPIPS",
    "ActNorm",
    "FMNISTPerceptual",
    "NLayerDiscriminator",
    "PatchGANLoss",
    "VQLPIPSWithDiscriminator",
    "build_perceptual",
    "weights_init",
]

PERCEPTUAL = ("lpips", "fmnist", "none")


# ------------------------------------------------------------------------------------------- discriminator


class ActNorm(nn.Module):
    """Per-channel affine layer initialised from the first training batch (Glow); official ``ActNorm`` names.

    The official ``initialized`` buffer is kept (checkpoints carry it); whether the layer is initialised is also
    known on the host (set at the first training forward and when a state dict is loaded), so that the forward
    pass never reads the buffer back from the device.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self._initialized = False  # host copy of `initialized`

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if f"{prefix}initialized" in state_dict:  # read once when loading, not in every forward
            self._initialized = bool(self.initialized.item())

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self._initialized:
            with torch.no_grad():
                flat = x.transpose(0, 1).reshape(x.shape[1], -1)
                self.loc.copy_(-flat.mean(1).view(1, -1, 1, 1))
                self.scale.copy_(1.0 / (flat.std(1).view(1, -1, 1, 1) + 1e-6))
                self.initialized.fill_(1)
            self._initialized = True
        return self.scale * (x + self.loc)


def weights_init(m: nn.Module) -> None:
    """Official init: conv N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0."""
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix): k4 s2 p1 convs, LeakyReLU 0.2, the last two convs stride 1, a 1-channel logit map.

    ``main`` indices match the official module: 0 conv, 1 act, then (conv, norm, act) per layer, last conv.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False) -> None:
        super().__init__()
        if input_nc < 1 or ndf < 1 or n_layers < 1:
            raise ValueError(
                f"NLayerDiscriminator: input_nc, ndf, n_layers must be >= 1, got {input_nc}, {ndf}, {n_layers}"
            )
        norm = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own affine shift
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=use_bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=use_bias),
            norm(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # (B, 1, h, w) patch logits


# ---------------------------------------------------------------------------------------------- perceptual


class LPIPS(FrozenModule):
    """LPIPS with the VGG16 backbone (Zhang et al. 2018) as taming uses it; inputs in [-1, 1], output (B, 1, 1, 1).

    Args:
        vgg_weights: torchvision's ImageNet VGG16 state dict (``vgg16-397923af.pth``); default: torch's hub cache.
    """

    def __init__(self, vgg_weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        import lpips

        from gencore.io import load_checkpoint
        from gencore.metrics.pretrained import LPIPS_BACKBONES, _checked

        url = LPIPS_BACKBONES["vgg"]
        path = _checked(vgg_weights, url.rsplit("/", 1)[-1], url, "the LPIPS perceptual loss")
        with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # heads from the package
        state = load_checkpoint(path)
        slices = {
            **dict.fromkeys(range(0, 4), 1),
            **dict.fromkeys(range(4, 9), 2),
            **dict.fromkeys(range(9, 16), 3),
            **dict.fromkeys(range(16, 23), 4),
            **dict.fromkeys(range(23, 30), 5),
        }
        mapped = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "features" and int(parts[1]) in slices:
                mapped[f"slice{slices[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
        missing, _ = model.net.load_state_dict(mapped, strict=False)
        if missing:
            raise ValueError(f"LPIPS: {path} is not a torchvision VGG16 state dict (missing {missing[:4]})")
        self.scaling_layer, self.net = model.scaling_layer, model.net
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (
            model.lin0,
            model.lin1,
            model.lin2,
            model.lin3,
            model.lin4,
        )
        self._model = [model]  # for its forward; not registered twice
        self.freeze()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape[1] == 1:  # grayscale images: LPIPS is defined on RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self._model[0](x, y)


def build_perceptual(kind: str, weights: str | os.PathLike | None = None) -> nn.Module | None:
    if kind not in PERCEPTUAL:
        raise ValueError(f"unknown perceptual loss {kind!r}; valid: {', '.join(PERCEPTUAL)}")
    if kind == "lpips":
        return LPIPS(weights)
    if kind == "fmnist":
        return FMNISTPerceptual(weights)
    return None


# -------------------------------------------------------------------------------------------------- the loss


class PatchGANLoss(nn.Module):
    """The adversarial half shared by the VQGAN loss and LDM's autoencoder loss: a PatchGAN discriminator
    (``discriminator.main.*``), its hinge / vanilla loss, the adaptive generator weight λ (Eq. 7) and ``disc_start``
    (counted in training batches)."""

    def __init__(
        self,
        *,
        disc_start: int,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
    ) -> None:
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {disc_start}")
        for name, value in (("disc_factor", disc_factor), ("disc_weight", disc_weight)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, use_actnorm)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor, self.discriminator_weight = disc_factor, disc_weight
        self.disc_conditional = disc_conditional

    def calculate_adaptive_weight(self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor) -> Tensor:
        """λ = ‖∇_L nll‖ / (‖∇_L g‖ + 1e-4), clamped to [0, 1e4], × disc_weight (detached; official name)."""
        return adaptive_weight(nll_loss, g_loss, last_layer) * self.discriminator_weight

    def _disc_input(self, x: Tensor, cond: Tensor | None) -> Tensor:
        if (cond is not None) != self.disc_conditional:
            raise ValueError(
                f"discriminator is {'' if self.disc_conditional else 'un'}conditional, "
                f"cond {'missing' if cond is None else 'given'}"
            )
        x = x.contiguous()
        return x if cond is None else torch.cat((x, cond), dim=1)

    def adversarial_term(
        self, nll: Tensor, recon: Tensor, step: int, last_layer: Tensor | None, cond: Tensor | None = None
    ) -> tuple[Tensor, Tensor, float]:
        """(g_loss, λ, disc_factor). Before ``disc_start`` the discriminator is not run (its term is multiplied by 0
        officially); without a graph (validation) λ is 0; with one, ``last_layer`` is required."""
        disc_factor = adopt_weight(self.disc_factor, step, threshold=self.discriminator_iter_start)
        zero = torch.zeros((), device=recon.device)
        if disc_factor == 0 or self.discriminator_weight == 0:
            return zero, zero, disc_factor
        g_loss = -self.discriminator(self._disc_input(recon, cond)).mean()
        if not (torch.is_grad_enabled() and recon.requires_grad):
            return g_loss, zero, disc_factor
        if last_layer is None:
            raise ValueError("the GAN term needs last_layer=model.get_last_layer() (the adaptive weight) once it is on")
        return g_loss, self.calculate_adaptive_weight(nll, g_loss, last_layer), disc_factor

    def _d_loss(
        self, inputs: Tensor, recon: Tensor, disc_factor: float, cond: Tensor | None, split: str
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits_real = self.discriminator(self._disc_input(inputs.detach(), cond))
        logits_fake = self.discriminator(self._disc_input(recon.detach(), cond))
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        return d_loss, {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().mean(),
            f"{split}/logits_fake": logits_fake.detach().mean(),
        }

    def discriminator_loss(
        self, inputs: Tensor, recon: Tensor, step: int, split: str = "train", *, cond: Tensor | None = None
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """The D loss, or ``(None, {})`` before ``disc_start`` (the official code computes it and multiplies by 0)."""
        disc_factor = adopt_weight(self.disc_factor, step, threshold=self.discriminator_iter_start)
        if disc_factor == 0:
            return None, {}
        return self._d_loss(inputs, recon, disc_factor, cond, split)


class VQLPIPSWithDiscriminator(PatchGANLoss):
    """The VQGAN loss with the official arguments, plus ``perceptual`` / ``perceptual_weights`` / ``pixel_loss``.

    Use :meth:`generator_loss` and :meth:`discriminator_loss` from a manual-optimisation training step.
    ``disc_start`` and ``step`` count training batches.
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        perceptual: str = "lpips",
        perceptual_weights: str | None = None,
        pixel_loss: str = "l1",
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
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
        self.codebook_weight, self.pixel_weight = codebook_weight, pixelloss_weight
        self.perceptual_weight = perceptual_weight if perceptual != "none" else 0.0
        self.perceptual_loss = build_perceptual(perceptual, perceptual_weights) if self.perceptual_weight > 0 else None
        self.pixel_loss = pixel_loss

    def reconstruction_loss(self, inputs: Tensor, recon: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(nll, per-pixel rec loss, perceptual loss)."""
        diff = inputs - recon
        rec = diff.abs() if self.pixel_loss == "l1" else diff.square()
        rec = self.pixel_weight * rec
        p_loss = torch.zeros((), device=inputs.device)
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, recon)
            rec = rec + self.perceptual_weight * p_loss
        return rec.mean(), rec, p_loss

    def generator_loss(
        self,
        codebook_loss: Tensor,
        inputs: Tensor,
        recon: Tensor,
        step: int,
        last_layer: Tensor | None = None,
        cond: Tensor | None = None,
        split: str = "train",
    ) -> tuple[Tensor, dict[str, Tensor]]:
        nll, rec, p_loss = self.reconstruction_loss(inputs, recon)
        g_loss, d_weight, disc_factor = self.adversarial_term(nll, recon, step, last_layer, cond)
        loss = nll + d_weight * disc_factor * g_loss + self.codebook_weight * codebook_loss.mean()
        log = {
            f"{split}/total_loss": loss.detach(),
            f"{split}/quant_loss": codebook_loss.detach().mean(),
            f"{split}/nll_loss": nll.detach(),
            f"{split}/rec_loss": rec.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.full((), float(disc_factor), device=loss.device),
            f"{split}/g_loss": g_loss.detach(),
        }
        return loss, log
