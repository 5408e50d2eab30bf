"""Guided inpainting as a LightningModule: the official ``DefaultInpaintingTrainingModule`` of
runwayml/guided-inpainting (Esser, Michael, Sengupta 2022) on :class:`gencore.training.GANModule`.

Attribute names follow the official module (``generator``, ``discriminator``, ``flow``), so the ``generator.*`` and
``discriminator.*`` entries of an official checkpoint load by name (:mod:`twostream_inpaint.convert`).

One training batch (``{"image", "mask", "srcs", "srcs_masks"}``, images in [0, 1], masks 1 = hole):

1. flows target -> keyframe t and their forward-backward errors from the frozen ``flow`` estimator (no gradients;
   the hole's flow is inpainted from its boundary), when the generator has the local (deformable) stream;
2. the generator sees [x (1 − m), m] and the keyframes [s_t (1 − m_t), m_t] and predicts x̂ = sigmoid(...);
   ``inpainted`` = m x̂ + (1 − m) x;
3. generator loss (:mod:`twostream_inpaint.losses`): 10 x L1 on the known pixels, 10 x non-saturating adversarial,
   100 x feature matching, 30 x perceptual (ResNetPL in the paper);
4. discriminator: non-saturating with R1 (0.001) on the reals, the hole of a fake labelled fake and the rest real.

Both players use Adam (torch defaults), the discriminator at 0.1 x the generator's rate, both scaled by one warm-up +
cosine multiplier per batch (``gi.lr_scheduler.LambdaWarmUpCosineScheduler``, which the official repository does not
ship: issue #6): 1e-4 -> 1 over 1,000 steps, cosine down to 1e-4 at 1e6 steps.

Ablations by config (the generator's official switches): two-stream (both), global-only (``is_deformable: false``:
keyframes reach the target only through the latents' cross-frame attention; no flow needed) and local-only
(``is_crossattending: false``: only through the flow-warped local features).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.modules import freeze
from gencore.training import GANModule, LambdaWarmUpCosineScheduler
from twostream_inpaint.losses import NonSaturatingWithR1, build_perceptual, feature_matching_loss, masked_l1_loss

__all__ = ["GuidedInpainting", "check_inputs", "hole_psnr"]


def check_inputs(image: Tensor, mask: Tensor, srcs: Tensor, srcs_masks: Tensor | None = None) -> None:
    """Clear errors for what a user can get wrong: shapes, sizes, zero keyframes, a hole covering everything."""
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    if mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"mask size {tuple(mask.shape[-2:])} differs from the image size {tuple(image.shape[-2:])}: "
            "resize the mask to the image"
        )
    if srcs.dim() != 5 or srcs.shape[2] != 3:
        raise ValueError(f"keyframes must be (B, T, 3, H, W), got {tuple(srcs.shape)}")
    if srcs.shape[1] == 0:
        raise ValueError("no keyframes: guided inpainting needs at least one keyframe (T >= 1)")
    if srcs.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"keyframe size {tuple(srcs.shape[-2:])} differs from the image size {tuple(image.shape[-2:])}"
        )
    if srcs_masks is not None and (srcs_masks.shape[:2] != srcs.shape[:2] or srcs_masks.shape[-2:] != srcs.shape[-2:]):
        raise ValueError(f"keyframe masks must be (B, T, 1, H, W) like the keyframes, got {tuple(srcs_masks.shape)}")
    if mask.shape[0] != image.shape[0] or srcs.shape[0] != image.shape[0]:
        raise ValueError(f"batch sizes differ: image {image.shape[0]}, mask {mask.shape[0]}, keyframes {srcs.shape[0]}")


def check_holes(mask: Tensor) -> None:
    """A hole that covers the whole frame leaves nothing to condition on (one host sync: inference entry only)."""
    full = (mask.flatten(1) > 0.5).all(dim=1)
    if bool(full.any()):
        which = "" if mask.shape[0] == 1 else f" (items {full.nonzero().flatten().tolist()})"
        raise ValueError(f"the mask covers the whole image{which}: there is no known pixel to inpaint from")


def hole_psnr(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """(B,) PSNR (dB, images in [0, 1]) over the hole's pixels only: MSE = Σ m (x̂ − x)² / (3 Σ m)."""
    se = ((pred - target).square() * mask).flatten(1).sum(1)
    n = (mask.flatten(1).sum(1) * pred.shape[1]).clamp_min(1)
    return -10 * torch.log10((se / n).clamp_min(1e-10))


class GuidedInpainting(GANModule):
    """Args:
    generator: :class:`twostream_inpaint.models.GIResNetGenerator`.
    discriminator: :class:`twostream_inpaint.models.NLayerDiscriminator` (LaMa's pix2pixhd_nlayer).
    flow: a frozen :class:`twostream_inpaint.flow.FlowEstimator` (RAFT, DIS, zero); required when the generator
        has deformable writes, unused otherwise.
    l1_weight_known / l1_weight_missing: the masked L1 (10 / 0).
    adversarial: keyword arguments of :class:`~twostream_inpaint.losses.NonSaturatingWithR1` (weight 10,
        gp_coef 0.001, mask_as_fake_target).
    feature_matching_weight: 100. perceptual / perceptual_weight / perceptual_weights: ``resnet_pl`` (paper, 30) |
        ``fmnist`` | ``none``.
    learning_rate / scale_lr: the official 1e-5 x accumulate x GPUs x batch (3.2e-4 for the README's 2 GPUs).
    discriminator_lr_factor: 0.1. betas: Adam's (torch defaults, as official).
    warm_up_steps / max_decay_steps / lr_start / lr_max / lr_min: the per-batch multiplier on both rates.
    image_size: the training frame size (the tasks' default size).
    """

    generator_loss_name = "train/g_total"
    #: sampled by inpaint-sample / inpaint-image / inpaint-video (tasks), not by a generate(n) method
    generates = True

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        flow: nn.Module | None = None,
        *,
        l1_weight_known: float = 10.0,
        l1_weight_missing: float = 0.0,
        adversarial: Mapping[str, Any] | None = None,
        feature_matching_weight: float = 100.0,
        perceptual: str = "resnet_pl",
        perceptual_weight: float = 30.0,
        perceptual_weights: str | None = None,
        learning_rate: float = 3.2e-4,
        scale_lr: bool = False,
        discriminator_lr_factor: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        warm_up_steps: int = 1000,
        max_decay_steps: int = 1_000_000,
        lr_start: float = 1e-4,
        lr_max: float = 1.0,
        lr_min: float = 1e-4,
        image_size: int | None = None,
    ) -> None:
        if not discriminator_lr_factor > 0:
            raise ValueError(f"discriminator_lr_factor must be > 0, got {discriminator_lr_factor}")
        super().__init__(
            learning_rate=float(learning_rate),
            scale_lr=scale_lr,
            betas=tuple(betas),
            discriminator_learning_rate=float(learning_rate) * float(discriminator_lr_factor),
            lr_lambda=LambdaWarmUpCosineScheduler.for_run(
                warm_up_steps=warm_up_steps,
                max_decay_steps=max_decay_steps,
                lr_start=lr_start,
                lr_max=lr_max,
                lr_min=lr_min,
            ),
        )
        self.generator = generator
        self.discriminator = discriminator
        self.image_size = int(image_size) if image_size is not None else None  # the training frame size (task default)
        self.deformable = bool(getattr(generator, "is_deformable", False))
        if self.deformable and flow is None:
            raise ValueError(
                "the generator has the local (deformable, flow-guided) stream but no flow estimator was given: "
                "set flow= (raft with weights, dis, zero) or the generator's is_deformable=false (global-only)"
            )
        self.flow = freeze(flow) if flow is not None else None
        if min(l1_weight_known, l1_weight_missing, feature_matching_weight, perceptual_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        self.l1_weight_known, self.l1_weight_missing = float(l1_weight_known), float(l1_weight_missing)
        self.adversarial_loss = NonSaturatingWithR1(**dict(adversarial or {}))
        self.feature_matching_weight = float(feature_matching_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.loss_pl = build_perceptual(perceptual, perceptual_weights) if perceptual_weight > 0 else None
        if self.loss_pl is not None:
            freeze(self.loss_pl)

    # ---------------------------------------------------------------------------------------------- checks

    def check_datamodule(self, datamodule: Any) -> None:
        """Before training (gencore.validate.check_fits): the frame size against the generator's downsampling factor
        and the module's image_size, and keyframes in the data when the generator uses them."""
        from gencore.validate import ConfigError

        size = getattr(datamodule, "image_size", None)
        factor = 2 ** int(getattr(self.generator, "n_downsampling", 0))
        problems = []
        if isinstance(size, int) and size % factor:
            problems.append(
                f"datamodule.size={size} is not divisible by the generator's downsampling factor {factor} "
                "(2 ** module.generator.n_downsampling)"
            )
        if isinstance(size, int) and self.image_size is not None and size != self.image_size:
            problems.append(f"datamodule.size={size} but module.image_size={self.image_size}")
        if problems:
            raise ConfigError("; ".join(problems))

    # --------------------------------------------------------------------------------------------- forward

    def keyframe_flows(
        self, image: Tensor, mask: Tensor, srcs: Tensor, srcs_masks: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Flows target -> each keyframe (B, T, 2, H, W) and errors (B, T, 1, H, W); (None, None) without the local
        stream."""
        if not self.deformable:
            return None, None
        from twostream_inpaint.flow import keyframe_flows

        return keyframe_flows(self.flow, image, mask, srcs, srcs_masks)

    def inpaint(
        self,
        image: Tensor,
        mask: Tensor,
        srcs: Tensor,
        srcs_masks: Tensor | None = None,
        *,
        flows: Tensor | None = None,
        flow_errs: Tensor | None = None,
        keyframes: Any = None,
        return_attn: bool = False,
    ) -> Tensor | tuple[Tensor, list]:
        """The raw prediction x̂ (B, 3, H, W) in (0, 1) for targets ``image`` with holes ``mask`` from keyframes
        ``srcs`` (B, T, 3, H, W) with their own holes ``srcs_masks`` (None: none). Flows are estimated unless given;
        ``keyframes`` is a cached :meth:`GIResNetGenerator.keyframe_state` (video propagation, eval mode)."""
        if srcs_masks is None:
            srcs_masks = srcs.new_zeros(srcs.shape[0], srcs.shape[1], 1, *srcs.shape[-2:])
        if self.deformable and flows is None:
            with torch.no_grad():
                flows, flow_errs = self.keyframe_flows(image, mask, srcs, srcs_masks)
        target = torch.cat([image * (1 - mask), mask], dim=1)
        refs = torch.cat([srcs * (1 - srcs_masks), srcs_masks], dim=2)
        if keyframes is not None:  # the keyframes' pass is cached: only their flows are needed (above)
            return self.generator(
                target, None, return_attn=return_attn, flows=flows, flow_errs=flow_errs, keyframes=keyframes
            )
        return self.generator(target, refs, return_attn=return_attn, flows=flows, flow_errs=flow_errs)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        image, mask = batch["image"], batch["mask"]
        pred = self.inpaint(image, mask, batch["srcs"], batch.get("srcs_masks"))
        return {"predicted_image": pred, "inpainted": mask * pred + (1 - mask) * image}

    # ------------------------------------------------------------------------------------------ GAN steps

    def _set_discriminator_grad(self, flag: bool) -> None:
        for p in self.discriminator.parameters():
            p.requires_grad_(flag)

    def generator_step(self, batch: Mapping[str, Tensor], step: int) -> tuple[Tensor, dict[str, Tensor], Any]:
        image, mask = batch["image"], batch["mask"]
        pred = self(batch)["predicted_image"]
        l1 = masked_l1_loss(pred, image, mask, self.l1_weight_known, self.l1_weight_missing)
        logs = {"train/gen_l1": l1.detach()}
        total = l1
        self._set_discriminator_grad(False)  # the generator's backward leaves D alone (restored in the D step)
        fake_logits, fake_feats = self.discriminator(pred)
        with torch.no_grad():
            _, real_feats = self.discriminator(image)
        adv = self.adversarial_loss.generator_loss(fake_logits, mask)
        total = total + adv
        logs["train/gen_adv"] = adv.detach()
        if self.feature_matching_weight > 0:
            fm = feature_matching_loss(fake_feats, real_feats) * self.feature_matching_weight
            total = total + fm
            logs["train/gen_fm"] = fm.detach()
        if self.loss_pl is not None:
            pl = self.loss_pl(pred, image) * self.perceptual_weight
            total = total + pl
            logs["train/gen_pl"] = pl.detach()
        return total, logs, pred.detach()

    def fake_state(self, batch: Mapping[str, Tensor], step: int) -> Tensor:
        return self(batch)["predicted_image"]

    def discriminator_step(
        self, batch: Mapping[str, Tensor], fake: Tensor, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        self._set_discriminator_grad(True)
        real = batch["image"].detach().requires_grad_(True)
        real_logits, _ = self.discriminator(real)
        fake_logits, _ = self.discriminator(fake.detach())
        loss, logs = self.adversarial_loss.discriminator_loss(real, real_logits, fake_logits, batch["mask"])
        logs["train/d_total"] = loss.detach()
        return loss, logs

    def generator_parameters(self) -> Iterable[nn.Parameter]:
        return self.generator.parameters()

    def discriminator_parameters(self) -> Iterable[nn.Parameter]:
        return self.discriminator.parameters()

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr, betas=self.betas)

    # --------------------------------------------------------------------------------------------- validation

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        out = self(batch)
        image, mask = batch["image"], batch["mask"]
        n = image.shape[0]
        self.log("val/psnr_hole", hole_psnr(out["inpainted"], image, mask).mean(), batch_size=n, prog_bar=True)
        self.log("val/l1_hole", ((out["predicted_image"] - image).abs() * mask).sum() / (3 * mask.sum()), batch_size=n)
        self.log("val/l1_known", F.l1_loss(out["predicted_image"] * (1 - mask), image * (1 - mask)), batch_size=n)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Tensor], n: int = 8) -> dict[str, Tensor]:
        batch = {k: v[:n].to(self.device) for k, v in batch.items() if isinstance(v, Tensor)}
        out = self(batch)
        image, mask = batch["image"], batch["mask"]
        logs = {
            "masked": image * (1 - mask) + mask * 0.5,
            "inpainted": out["inpainted"],
            "predicted": out["predicted_image"],
            "image": image,
        }
        srcs, srcs_masks = batch["srcs"], batch.get("srcs_masks")
        for t in range(srcs.shape[1]):
            s = srcs[:, t] if srcs_masks is None else srcs[:, t] * (1 - srcs_masks[:, t]) + srcs_masks[:, t] * 0.5
            logs[f"keyframe_{t}"] = s
        return {k: v * 2 - 1 for k, v in logs.items()}  # the grid loggers take [-1, 1]
