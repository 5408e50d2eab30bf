"""The LaMa objective as ``configs/ours.yaml`` configures it (Esser, Michael, Sengupta 2022, Sec. 3.3; the official
``DefaultInpaintingTrainingModule.generator_loss`` / ``discriminator_loss`` and LaMa's loss modules).

Generator (predictions x̂ in [0, 1], mask m = 1 in the hole):

    L1      = mean((w_known (1 − m) + w_missing m) · |x̂ − x|)          w_known 10, w_missing 0: known pixels only
    adv     = weight · mean softplus(−D(x̂))                              weight 10 (non-saturating)
    fm      = weight · mean_l MSE(D_l(x̂), D_l(x))                        weight 100 (every D feature map, no mask)
    pl      = weight · Σ_l MSE(φ_l(x̂), φ_l(x))                           ResNetPL weight 30 (ADE20k ResNet50-dilated)

Discriminator (``NonSaturatingWithR1``, ``mask_as_fake_target=True``; the adversarial weight is NOT applied here):

    mean[ softplus(−D(x)) + gp_coef ‖∇ₓ D(x)‖² + m' softplus(D(x̂)) + (1 − m') softplus(−D(x̂)) ]

with m' the mask resized (nearest) to the logits' grid: only the hole of a fake counts as fake, the rest as real;
R1 (gp_coef 0.001) on the reals only.

Perceptual backbones (:func:`build_perceptual`): ``resnet_pl`` (the paper's: the ADE20k ``encoder_epoch_20.pth``
from a local path, ImageNet-normalised inputs, MSE summed over the four stages), ``fmnist`` (gencore's frozen
Fashion-MNIST network in the same LPIPS form taming's offline runs use: no ImageNet / ADE20k weights exist offline),
``none``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.modules import FrozenModule

__all__ = [
    "FMNISTPL",
    "PERCEPTUAL",
    "ADE20kResNet50Dilated",
    "NonSaturatingWithR1",
    "ResNetPL",
    "build_perceptual",
    "feature_matching_loss",
    "lpips_fid100_f1",
    "masked_l1_loss",
]

PERCEPTUAL = ("resnet_pl", "fmnist", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def masked_l1_loss(pred: Tensor, target: Tensor, mask: Tensor, weight_known: float, weight_missing: float) -> Tensor:
    """mean(|pred − target| · (w_missing · m + w_known · (1 − m))) over every pixel and channel (LaMa)."""
    weights = mask * weight_missing + (1 - mask) * weight_known
    return (weights * (pred - target).abs()).mean()


def feature_matching_loss(fake: Sequence[Tensor], real: Sequence[Tensor], mask: Tensor | None = None) -> Tensor:
    """Mean over layers of MSE(fake_l, real_l) (``mask``: only outside the hole, the mask resized bilinearly)."""
    if len(fake) != len(real) or not fake:
        raise ValueError(f"feature_matching_loss needs equally many (> 0) feature maps, got {len(fake)}, {len(real)}")
    if mask is None:
        return torch.stack([F.mse_loss(a, b) for a, b in zip(fake, real)]).mean()
    terms = []
    for a, b in zip(fake, real):
        keep = 1 - F.interpolate(mask, size=a.shape[-2:], mode="bilinear", align_corners=False)
        terms.append(((a - b).square() * keep).mean())
    return torch.stack(terms).mean()


class NonSaturatingWithR1(nn.Module):
    """LaMa's ``NonSaturatingWithR1`` (``kind: r1``): softplus GAN losses, R1 on reals, the hole-only fake target."""

    def __init__(
        self,
        weight: float = 10.0,
        gp_coef: float = 0.001,
        mask_as_fake_target: bool = True,
        mask_scale_mode: str = "nearest",
        extra_mask_weight_for_gen: float = 0.0,
    ) -> None:
        super().__init__()
        if weight < 0 or gp_coef < 0 or extra_mask_weight_for_gen < 0:
            raise ValueError(
                f"adversarial weight, gp_coef and extra_mask_weight_for_gen must be >= 0, got {weight}, {gp_coef}, "
                f"{extra_mask_weight_for_gen}"
            )
        self.weight, self.gp_coef = float(weight), float(gp_coef)
        self.mask_as_fake_target, self.mask_scale_mode = mask_as_fake_target, mask_scale_mode
        self.extra_mask_weight_for_gen = float(extra_mask_weight_for_gen)

    def _resized(self, mask: Tensor, logits: Tensor) -> Tensor:
        if mask.shape[-2:] == logits.shape[-2:]:
            return mask
        if self.mask_scale_mode == "maxpool":
            return F.adaptive_max_pool2d(mask, logits.shape[-2:])
        return F.interpolate(mask, size=logits.shape[-2:], mode=self.mask_scale_mode)

    def generator_loss(self, fake_logits: Tensor, mask: Tensor | None = None) -> Tensor:
        loss = F.softplus(-fake_logits)
        if self.mask_as_fake_target and self.extra_mask_weight_for_gen > 0:
            loss = loss * (1 + self._resized(mask, fake_logits) * self.extra_mask_weight_for_gen)
        return loss.mean() * self.weight

    def discriminator_loss(
        self, real: Tensor, real_logits: Tensor, fake_logits: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``real`` must require grad and ``real_logits`` be computed from it (the R1 term differentiates D there)."""
        real_loss = F.softplus(-real_logits)
        if self.gp_coef > 0 and torch.is_grad_enabled():
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            penalty = grad.flatten(1).square().sum(1).mean() * self.gp_coef
        else:
            penalty = real_logits.new_zeros(())
        fake_loss = F.softplus(fake_logits)
        if self.mask_as_fake_target:
            m = self._resized(mask, fake_logits)
            fake_loss = fake_loss * m + (1 - m) * F.softplus(-fake_logits)
        loss = (real_loss + penalty + fake_loss).mean()
        logs = {
            "train/d_real_out": real_logits.detach().mean(),
            "train/d_fake_out": fake_logits.detach().mean(),
            "train/d_r1": penalty.detach(),
        }
        return loss, logs


# ------------------------------------------------------------------------------------------- perceptual terms


class ADE20kResNet50Dilated(nn.Module):
    """The encoder of LaMa's ResNetPL: ResNet50 with the deep stem (3 x conv3x3: 64, 64, 128) of the CSAIL
    semantic-segmentation code, layer3 / layer4 dilated (2, 4) instead of strided (output stride 8). Official names
    (``conv1`` ... ``bn3``, ``layer1`` ... ``layer4``: ``encoder_epoch_20.pth`` loads as is); the bottlenecks are
    torchvision's (stride on the 3x3 conv and the same dilation pattern as the official ``_nostride_dilate``)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        def conv_bn(cin: int, cout: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
            return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)

        self.conv1, self.bn1 = conv_bn(3, 64, 2)
        self.conv2, self.bn2 = conv_bn(64, 64, 1)
        self.conv3, self.bn3 = conv_bn(64, 128, 1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        base = ResNet(Bottleneck, [3, 4, 6, 3], replace_stride_with_dilation=[False, True, True])
        base.inplanes, base.dilation = 128, 1  # the deep stem ends with 128 channels
        self.layer1 = base._make_layer(Bottleneck, 64, 3)
        self.layer2, self.layer3, self.layer4 = base.layer2, base.layer3, base.layer4

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.maxpool(self.relu(self.bn3(self.conv3(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


class ResNetPL(FrozenModule):
    """LaMa's high-receptive-field perceptual loss: Σ over the four stages of MSE between the frozen ADE20k encoder's
    features of the prediction and the target (inputs in [0, 1], ImageNet-normalised). ``weights``: the local
    ``encoder_epoch_20.pth`` (a :class:`gencore.io.MissingWeightsError` says where to get it);
    ``weights=None, allow_random=True`` builds it with random weights (tests only)."""

    def __init__(self, weights: str | os.PathLike | None = None, *, allow_random: bool = False) -> None:
        super().__init__()
        from gencore.io import MissingWeightsError, load_state_dict, read_state_dict

        self.impl = ADE20kResNet50Dilated()
        if weights is not None:
            path = Path(weights).expanduser()
            if path.is_dir():
                path = path / "ade20k" / "ade20k-resnet50dilated-ppm" / "encoder_epoch_20.pth"
            if not path.is_file():
                raise MissingWeightsError(
                    f"ResNetPL weights not found at {path}: the ADE20k encoder (encoder_epoch_20.pth of "
                    "ade20k-resnet50dilated-ppm, http://sceneparsing.csail.mit.edu/model/pytorch/); or "
                    "module.perceptual=fmnist for offline runs"
                )
            state, source = read_state_dict(path)
            state = {k.removeprefix("module."): v for k, v in state.items()}
            load_state_dict(self.impl, state, source=source)
        elif not allow_random:
            raise MissingWeightsError(
                "ResNetPL needs the ADE20k encoder weights (encoder_epoch_20.pth): pass "
                "module.perceptual_weights=<path>, or module.perceptual=fmnist for offline runs"
            )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        fp = self.impl((pred - self.mean) / self.std)
        with torch.no_grad():
            ft = self.impl((target - self.mean) / self.std)
        return torch.stack([F.mse_loss(a, b) for a, b in zip(fp, ft)]).sum()


class FMNISTPL(FrozenModule):
    """The offline stand-in: gencore's LPIPS-form distance over the frozen Fashion-MNIST network (gray, 28 x 28 view
    of the image), averaged over the batch. Inputs in [0, 1]."""

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        from gencore.metrics.fmnist_net import FMNISTPerceptual

        self.impl = FMNISTPerceptual(weights)
        self.freeze()

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.impl(pred * 2 - 1, target * 2 - 1).mean()


def build_perceptual(kind: str, weights: str | os.PathLike | None = None) -> nn.Module | None:
    """``resnet_pl`` | ``fmnist`` | ``none`` (see the module docstring)."""
    if kind not in PERCEPTUAL:
        raise ValueError(f"unknown perceptual loss {kind!r}; valid: {', '.join(PERCEPTUAL)}")
    if kind == "resnet_pl":
        return ResNetPL(weights)
    if kind == "fmnist":
        return FMNISTPL(weights)
    return None


def lpips_fid100_f1(lpips: float, fid: float, eps: float = 1e-3) -> float:
    """LaMa's integral score: the harmonic-mean-like 2 (1 − LPIPS) r / ((1 − LPIPS) + r + eps), r = max(0, 100 −
    FID) / 100. LPIPS 0 and FID 0 give 2 / (2 + eps) ≈ 1."""
    r = max(0.0, 100.0 - fid) / 100.0
    return 2 * (1 - lpips) * r / ((1 - lpips) + r + eps)
