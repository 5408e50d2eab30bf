"""LaMa's Fast Fourier Convolution blocks, as vendored in the official guided-inpainting code
(``gi/modules/gi/lama_guided.py``), with the official module and parameter names so checkpoints load by name.

- :class:`FourierUnit`: real FFT over (H, W) (``ortho``), real / imaginary parts stacked as channels, a 1x1 conv
  (``conv_layer``) + BatchNorm (``bn``) + ReLU in the spectral domain, inverse FFT. The FFTs run in float32 even under
  autocast (half precision FFTs only accept power-of-two sizes and lose too much precision).
- :class:`SpectralTransform`: the global branch: optional 2x average pool (``downsample``), 1x1 conv halving the
  channels (``conv1`` = Sequential(conv, bn, relu)), a :class:`FourierUnit` (``fu``), optionally LaMa's local Fourier
  unit (``lfu``) on 2x2 spatial quadrants, and a 1x1 conv back (``conv2``) applied to ``x + fu(x) [+ lfu(x)]``.
- :class:`FFC`: the four paths local->local, local->global, global->local (convs with reflect padding) and
  global->global (:class:`SpectralTransform`) over a (local, global) channel split given by ``ratio_gin`` /
  ``ratio_gout``; a missing part of the split is the integer 0, as in LaMa.
- :class:`FFC_BN_ACT`, :class:`FFCResnetBlock` (``inline=True`` takes and returns one tensor whose last
  ``global_in_num`` channels are the global part), :class:`CONV_NORM_ACT`, :class:`RESIDUAL_CONV_NORM_ACT`.

``norm_layer`` / ``activation_layer`` may be classes (called with the channel count / ``inplace=True``) or the
strings of :func:`get_norm_layer` / :func:`get_activation_layer`, so configs can name them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONV_NORM_ACT",
    "FFC",
    "FFC_BN_ACT",
    "RESIDUAL_CONV_NORM_ACT",
    "FFCResnetBlock",
    "FourierUnit",
    "SpectralTransform",
    "get_activation_layer",
    "get_norm_layer",
    "make_activation",
]

_NORMS: dict[str, Callable[..., nn.Module]] = {
    "bn": nn.BatchNorm2d,
    "batchnorm": nn.BatchNorm2d,
    "in": nn.InstanceNorm2d,
    "instancenorm": nn.InstanceNorm2d,
    "none": nn.Identity,
    "identity": nn.Identity,
}
_ACTS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "lrelu": functools.partial(nn.LeakyReLU, 0.2),
    "leakyrelu": functools.partial(nn.LeakyReLU, 0.2),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "none": nn.Identity,
    "identity": nn.Identity,
}


def get_norm_layer(norm: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A norm-layer constructor ``f(num_channels)`` from a class / callable or a name ('bn', 'in', 'none')."""
    if isinstance(norm, str):
        try:
            return _NORMS[norm.lower()]
        except KeyError:
            raise ValueError(f"unknown norm layer {norm!r}; valid names: {', '.join(sorted(_NORMS))}") from None
    if not callable(norm):
        raise ValueError(f"norm_layer must be a class, a callable or a name, got {norm!r}")
    return norm


def get_activation_layer(act: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """An activation constructor from a class / callable or a name ('relu', 'lrelu' (slope 0.2), 'gelu', ...)."""
    if isinstance(act, str):
        try:
            return _ACTS[act.lower()]
        except KeyError:
            raise ValueError(f"unknown activation {act!r}; valid names: {', '.join(sorted(_ACTS))}") from None
    if not callable(act):
        raise ValueError(f"activation_layer must be a class, a callable or a name, got {act!r}")
    return act


def make_activation(act: str | Callable[..., nn.Module], inplace: bool = True) -> nn.Module:
    """``act(inplace=inplace)`` as LaMa builds activations, or ``act()`` for activations without ``inplace``."""
    ctor = get_activation_layer(act)
    try:
        return ctor(inplace=inplace)
    except TypeError:
        return ctor()


def _is_part(x: Any) -> bool:
    return isinstance(x, Tensor)


class FourierUnit(nn.Module):
    """Spectral 1x1 conv: rfftn over (H, W) (or (C, H, W) with ``ffc3d``), conv + BN + ReLU on the stacked
    (real, imaginary) channels, irfftn back to the input size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        groups: int = 1,
        spatial_scale_factor: float | None = None,
        spatial_scale_mode: str = "bilinear",
        spectral_pos_encoding: bool = False,
        use_se: bool = False,
        se_kwargs: dict | None = None,
        ffc3d: bool = False,
        fft_norm: str = "ortho",
    ) -> None:
        super().__init__()
        if use_se:
            raise ValueError("FourierUnit: use_se (squeeze-excitation) is not implemented; no official config uses it")
        self.groups = groups
        self.conv_layer = nn.Conv2d(
            in_channels * 2 + (2 if spectral_pos_encoding else 0),
            out_channels * 2,
            kernel_size=1,
            stride=1,
            padding=0,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels * 2)
        self.relu = nn.ReLU(inplace=True)
        self.spatial_scale_factor = spatial_scale_factor
        self.spatial_scale_mode = spatial_scale_mode
        self.spectral_pos_encoding = spectral_pos_encoding
        self.use_se = use_se
        self.ffc3d = ffc3d
        self.fft_norm = fft_norm

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        fft_dtype = torch.promote_types(dtype, torch.float32)  # float32 at least: no half-precision FFTs
        batch = x.shape[0]
        orig_size = x.shape[-2:]
        if self.spatial_scale_factor is not None:
            x = F.interpolate(
                x, scale_factor=self.spatial_scale_factor, mode=self.spatial_scale_mode, align_corners=False
            )
        fft_dim = (-3, -2, -1) if self.ffc3d else (-2, -1)
        ffted = torch.fft.rfftn(x.to(fft_dtype), dim=fft_dim, norm=self.fft_norm)  # (B, C, H, W // 2 + 1)
        ffted = torch.stack((ffted.real, ffted.imag), dim=2)  # (B, C, 2, H, W')
        ffted = ffted.reshape(batch, -1, *ffted.shape[3:])  # channel 2c = real of c, 2c + 1 = imaginary of c
        if self.spectral_pos_encoding:
            h, w = ffted.shape[-2:]
            vert = torch.linspace(0, 1, h, device=ffted.device, dtype=ffted.dtype)[:, None].expand(h, w)
            hor = torch.linspace(0, 1, w, device=ffted.device, dtype=ffted.dtype)[None, :].expand(h, w)
            ffted = torch.cat((torch.stack((vert, hor))[None].expand(batch, -1, -1, -1), ffted), dim=1)
        ffted = self.relu(self.bn(self.conv_layer(ffted.to(dtype))))  # (B, 2 C_out, H, W')
        ffted = ffted.to(fft_dtype).reshape(batch, -1, 2, *ffted.shape[2:])
        ffted = torch.complex(ffted[:, :, 0], ffted[:, :, 1])
        size = x.shape[-3:] if self.ffc3d else x.shape[-2:]
        out = torch.fft.irfftn(ffted, s=size, dim=fft_dim, norm=self.fft_norm)
        if self.spatial_scale_factor is not None:
            out = F.interpolate(out, size=orig_size, mode=self.spatial_scale_mode, align_corners=False)
        return out.to(dtype)


class SpectralTransform(nn.Module):
    """The global->global path of an FFC: [avgpool] -> conv1 (C_in -> C_out / 2) -> x + fu(x) [+ lfu] -> conv2."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        groups: int = 1,
        enable_lfu: bool = True,
        separable_fu: bool = False,
        **fu_kwargs: Any,
    ) -> None:
        super().__init__()
        if separable_fu:
            raise ValueError("SpectralTransform: separable_fu is not implemented; no official config uses it")
        if enable_lfu and out_channels // 2 < 4:
            raise ValueError(
                f"SpectralTransform: enable_lfu needs at least 8 global output channels (its local Fourier unit takes "
                f"a quarter of half of them), got {out_channels}"
            )
        self.enable_lfu = enable_lfu
        self.stride = stride
        self.downsample = nn.AvgPool2d(kernel_size=(2, 2), stride=2) if stride == 2 else nn.Identity()
        half = out_channels // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, half, kernel_size=1, groups=groups, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
        )
        self.fu = FourierUnit(half, half, groups, **fu_kwargs)
        if enable_lfu:
            self.lfu = FourierUnit(half, half, groups)
        self.conv2 = nn.Conv2d(half, out_channels, kernel_size=1, groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(self.downsample(x))
        out = x + self.fu(x)
        if self.enable_lfu:
            # LaMa's local Fourier unit: the first quarter of the channels, cut into 2 x 2 spatial quadrants stacked
            # along the channels, transformed, and tiled back over the map.
            c, h = x.shape[1], x.shape[2]
            split = h // 2
            xs = torch.cat(torch.split(x[:, : c // 4], split, dim=-2), dim=1)
            xs = torch.cat(torch.split(xs, split, dim=-1), dim=1)
            out = out + self.lfu(xs).repeat(1, 1, 2, 2)
        return self.conv2(out)


class FFC(nn.Module):
    """Fast Fourier Convolution over a (local, global) pair; either part may be the integer 0 (absent)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        enable_lfu: bool = True,
        padding_type: str = "reflect",
        gated: bool = False,
        **spectral_kwargs: Any,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"FFC: stride must be 1 or 2, got {stride}")
        self.stride = stride
        in_cg = int(in_channels * ratio_gin)
        in_cl = in_channels - in_cg
        out_cg = int(out_channels * ratio_gout)
        out_cl = out_channels - out_cg
        self.ratio_gin = ratio_gin
        self.ratio_gout = ratio_gout
        self.global_in_num = in_cg
        self.in_cl, self.in_cg, self.out_cl, self.out_cg = in_cl, in_cg, out_cl, out_cg

        def conv(cin: int, cout: int) -> nn.Module:
            if cin == 0 or cout == 0:
                return nn.Identity()
            return nn.Conv2d(cin, cout, kernel_size, stride, padding, dilation, groups, bias, padding_mode=padding_type)

        self.convl2l = conv(in_cl, out_cl)
        self.convl2g = conv(in_cl, out_cg)
        self.convg2l = conv(in_cg, out_cl)
        self.convg2g = (
            nn.Identity()
            if in_cg == 0 or out_cg == 0
            else SpectralTransform(
                in_cg, out_cg, stride, 1 if groups == 1 else groups // 2, enable_lfu, **spectral_kwargs
            )
        )
        self.gated = gated
        self.gate = nn.Conv2d(in_channels, 2, 1) if gated and in_cg > 0 and out_cl > 0 else nn.Identity()

    def forward(self, x: Tensor | tuple[Tensor | int, Tensor | int]) -> tuple[Tensor | int, Tensor | int]:
        x_l, x_g = x if isinstance(x, tuple) else (x, 0)
        g2l_gate: Tensor | int = 1
        l2g_gate: Tensor | int = 1
        if self.gated and isinstance(self.gate, nn.Conv2d):
            parts = [p for p in (x_l, x_g) if _is_part(p)]
            g2l_gate, l2g_gate = torch.sigmoid(self.gate(torch.cat(parts, dim=1))).chunk(2, dim=1)
        has_l = self.in_cl > 0 and _is_part(x_l)
        has_g = self.in_cg > 0 and _is_part(x_g)
        out_xl: Tensor | int = 0
        out_xg: Tensor | int = 0
        if self.out_cl > 0:
            if has_l:
                out_xl = self.convl2l(x_l)
            if has_g:
                out_xl = out_xl + self.convg2l(x_g) * g2l_gate
        if self.out_cg > 0:
            if has_l:
                out_xg = self.convl2g(x_l) * l2g_gate
            if has_g:
                out_xg = out_xg + self.convg2g(x_g)
        return out_xl, out_xg


class FFC_BN_ACT(nn.Module):
    """:class:`FFC` followed by a norm and an activation on each of the local (``bn_l``, ``act_l``) and global
    (``bn_g``, ``act_g``) outputs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        ratio_gin: float,
        ratio_gout: float,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm_layer: str | Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: str | Callable[..., nn.Module] = nn.Identity,
        padding_type: str = "reflect",
        enable_lfu: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        norm_layer = get_norm_layer(norm_layer)
        self.ffc = FFC(
            in_channels,
            out_channels,
            kernel_size,
            ratio_gin,
            ratio_gout,
            stride,
            padding,
            dilation,
            groups,
            bias,
            enable_lfu,
            padding_type=padding_type,
            **kwargs,
        )
        global_channels = int(out_channels * ratio_gout)
        local_channels = out_channels - global_channels
        self.bn_l = nn.Identity() if local_channels == 0 else norm_layer(local_channels)
        self.bn_g = nn.Identity() if global_channels == 0 else norm_layer(global_channels)
        self.act_l = nn.Identity() if local_channels == 0 else make_activation(activation_layer)
        self.act_g = nn.Identity() if global_channels == 0 else make_activation(activation_layer)

    def forward(self, x: Tensor | tuple[Tensor | int, Tensor | int]) -> tuple[Tensor | int, Tensor | int]:
        x_l, x_g = self.ffc(x)
        if _is_part(x_l):
            x_l = self.act_l(self.bn_l(x_l))
        if _is_part(x_g):
            x_g = self.act_g(self.bn_g(x_g))
        return x_l, x_g


class FFCResnetBlock(nn.Module):
    """Two 3x3 :class:`FFC_BN_ACT` with a residual connection. ``inline=True``: one tensor in and out whose last
    ``conv1.ffc.global_in_num`` channels are the global part."""

    def __init__(
        self,
        dim: int,
        padding_type: str,
        norm_layer: str | Callable[..., nn.Module],
        activation_layer: str | Callable[..., nn.Module] = nn.ReLU,
        dilation: int = 1,
        spatial_transform_kwargs: dict | None = None,
        inline: bool = False,
        **conv_kwargs: Any,
    ) -> None:
        super().__init__()
        if spatial_transform_kwargs is not None:
            raise ValueError("FFCResnetBlock: spatial_transform_kwargs is not implemented; no official config uses it")
        kw = dict(
            kernel_size=3,
            padding=dilation,
            dilation=dilation,
            norm_layer=norm_layer,
            activation_layer=activation_layer,
            padding_type=padding_type,
            **conv_kwargs,
        )
        self.conv1 = FFC_BN_ACT(dim, dim, **kw)
        self.conv2 = FFC_BN_ACT(dim, dim, **kw)
        self.inline = inline

    def forward(self, x: Tensor | tuple[Tensor | int, Tensor | int]) -> Tensor | tuple[Tensor | int, Tensor | int]:
        if self.inline:
            n_g = self.conv1.ffc.global_in_num
            n_l = x.shape[1] - n_g
            x_l = x[:, :n_l] if n_l > 0 else 0
            x_g = x[:, n_l:] if n_g > 0 else 0
        else:
            x_l, x_g = x if isinstance(x, tuple) else (x, 0)
        y_l, y_g = self.conv2(self.conv1((x_l, x_g)))
        out_l, out_g = x_l + y_l, x_g + y_g
        if self.inline:
            parts = [p for p in (out_l, out_g) if _is_part(p)]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out_l, out_g


class CONV_NORM_ACT(nn.Module):
    """``act(norm(conv(x)))``, the conv without bias and with ``padding_type`` padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm_layer: str | Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: str | Callable[..., nn.Module] = nn.Identity,
        padding_type: str = "reflect",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode=padding_type
        )
        self.norm = get_norm_layer(norm_layer)(out_channels)
        self.act = make_activation(activation_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class RESIDUAL_CONV_NORM_ACT(CONV_NORM_ACT):
    """``x + act(norm(conv(x)))`` (the bottleneck block of ``ours_no_ffc``: grouped 3x3 convs)."""

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.norm(self.conv(x)))
