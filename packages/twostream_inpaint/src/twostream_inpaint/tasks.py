"""The ``inpaint-sample``, ``-image``, ``-video`` and ``-eval`` tasks (Hydra configs in twostream_inpaint/configs;
``inpaint-train`` is :func:`gencore.run.train`).

- :func:`sample`: held-out targets with holes, inpainted from their keyframes -> ``grid.png`` (one row per item:
  the masked target, the masked keyframes, the inpainted result, the truth) and ``samples.npz``;
- :func:`image`: your own image + mask + keyframe images -> ``inpainted.png`` (composited), ``predicted.png`` (raw)
  and ``panel.png``;
- :func:`video`: a clip (mp4 / avi in) with a mask per frame (a mask video, one mask image for every frame, or a
  synthetic moving hole), the holes of every frame filled from keyframes of the clip -> ``inpainted.mp4``,
  ``masked.mp4``, ``inpainted.gif``; the keyframes pass through the network once (:meth:`keyframe_state`);
- :func:`evaluate`: PSNR and SSIM inside the hole, LPIPS (VGG with local weights; otherwise the Fashion-MNIST
  network's LPIPS-form distance), FID (Inception with local weights; otherwise Fréchet distance of the Fashion-MNIST
  network's features) on held-out photos, and the same on held-out clips of the OpenCV sample videos.

Images are [0, 1] inside the package; masks are 1 in the hole.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from gencore import io, run

MOVING = ("moving", "box", "stroke", "mixed")  # mask=moving is a moving box

__all__ = ["evaluate", "image", "inpaint_clip", "load_model", "metrics_for", "sample", "video"]

log = logging.getLogger(__name__)


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def load_model(cfg: Any) -> Any:
    """The guided-inpainting model of ``cfg.checkpoint`` on the config's device."""
    from twostream_inpaint.lit import GuidedInpainting

    cfg = _cfg(cfg)
    run.check_sample_config(cfg)
    module = run.load_for_sampling(cfg, run.task_device(cfg))
    if not isinstance(module, GuidedInpainting):
        raise ValueError(f"{cfg.checkpoint} holds a {type(module).__name__}, not a twostream_inpaint model")
    return module


def _factor(module: Any) -> int:
    return 2 ** int(getattr(module.generator, "n_downsampling", 0))


def _size(cfg: DictConfig, module: Any) -> int:
    size = cfg.get("size") or getattr(module, "image_size", None) or 64
    return int(size)


def _val_items(cfg: DictConfig, module: Any, n: int) -> dict[str, Tensor]:
    from torch.utils.data import default_collate

    from twostream_inpaint.data import KeyframeImages

    ds = KeyframeImages(
        split="val",
        size=_size(cfg, module),
        n_references=int(cfg.get("n_references", 2)),
        fresh=False,
        length=n,
        seed=int(cfg.get("seed", 0)),
    )
    items = [ds[i] for i in range(n)]
    return {k: v.to(module.device) for k, v in default_collate(items).items() if isinstance(v, Tensor)}


@torch.no_grad()
def _inpaint_batches(module: Any, batch: dict[str, Tensor], batch_size: int) -> Tensor:
    """The composited results (the prediction in the hole, the image elsewhere) for a collated batch, ``batch_size``
    items at a time."""
    preds = []
    for i in range(0, batch["image"].shape[0], batch_size):
        part = {k: v[i : i + batch_size] for k, v in batch.items()}
        preds.append(module.inpaint(part["image"], part["mask"], part["srcs"], part.get("srcs_masks")))
    pred = torch.cat(preds)
    return batch["mask"] * pred + (1 - batch["mask"]) * batch["image"]


def _holed(x: Tensor, m: Tensor) -> Tensor:
    return x * (1 - m) + 0.5 * m


def sample(cfg: Any) -> Path:
    """``inpaint-sample``: ``num_samples`` held-out targets (default 8) inpainted from their keyframes -> ``out_dir``:
    ``grid.png`` (rows: masked target, masked keyframes, inpainted, truth) and ``samples.npz`` (``images``: the
    inpainted results, uint8 (N, 3, H, W); ``targets``, ``masks``)."""
    from gencore.viz import save_grid, to_uint8

    cfg = _cfg(cfg)
    n = int(cfg.get("num_samples") or 8)
    module = load_model(cfg)
    batch = _val_items(cfg, module, n)
    inpainted = _inpaint_batches(module, batch, int(cfg.get("batch_size", 16)))
    srcs, smasks = batch["srcs"], batch["srcs_masks"]
    cols = [_holed(batch["image"], batch["mask"])[:, None], _holed(srcs, smasks)]
    cols += [inpainted[:, None], batch["image"][:, None]]
    rows = torch.cat(cols, dim=1).cpu()
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(rows.flatten(0, 1) * 2 - 1, out_dir / "grid.png", nrow=rows.shape[1])
    arrays = {
        "images": to_uint8(inpainted.cpu() * 2 - 1).numpy(),
        "targets": to_uint8(batch["image"].cpu() * 2 - 1).numpy(),
        "masks": (batch["mask"].cpu() > 0.5).numpy(),
    }
    with io.atomic_path(out_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    log.info("wrote %d inpainted held-out images to %s (grid: masked target, keyframes, result, truth)", n, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------------ image


def _read_rgb(path: str, what: str) -> Tensor:
    from gencore.data.images import load_image

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return torch.from_numpy(load_image(p, channels=3)).permute(2, 0, 1).float() / 255.0


def _read_mask(path: str, what: str = "mask") -> Tensor:
    from gencore.data.images import load_image

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return (torch.from_numpy(load_image(p, channels=1)).permute(2, 0, 1).float() / 255.0 > 0.5).float()


def _resize(x: Tensor, hw: tuple[int, int], nearest: bool = False) -> Tensor:
    """(C, H, W) or (N, C, H, W) to ``hw``: nearest (masks) or antialiased bilinear clamped to [0, 1] (images)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    batch = x if x.dim() == 4 else x[None]
    if nearest:
        out = F.interpolate(batch, size=hw, mode="nearest")
    else:
        out = F.interpolate(batch, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return out if x.dim() == 4 else out[0]


def _target_size(cfg: DictConfig, hw: tuple[int, int], module: Any) -> tuple[int, int]:
    """The size the model runs at: ``size=[H,W]`` (multiples of the generator's factor), or by default the input's
    aspect with the short side at the model's training size and both sides rounded to multiples of the factor (the
    toy model was trained on 64 x 64 frames: at other scales its receptive field sees other things)."""
    factor = _factor(module)
    size = cfg.get("size")
    if size is None:
        scale = _size(cfg, module) / min(hw)
        return tuple(max(factor, round(s * scale / factor) * factor) for s in hw)  # type: ignore[return-value]
    if isinstance(size, (int, float)) or len(size) != 2:
        raise ValueError(f"size must be [H, W] (multiples of {factor}), got {size}")
    size = [int(s) for s in size]
    if size[0] % factor or size[1] % factor:
        raise ValueError(
            f"size {size[0]}x{size[1]} is not divisible by the generator's downsampling factor {factor}: use "
            f"multiples of {factor}"
        )
    return size[0], size[1]


def _paths(value: Any) -> list[str]:
    """A list option given as a list, or as one bare value (``keyframes=a.png``)."""
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [str(value)]
    return [str(v) for v in value]


def image(cfg: Any) -> Path:
    """``inpaint-image image=<png> mask=<png> keyframes=[<png>, ...]``: the hole (white in the mask) filled from the
    keyframes -> ``out_dir``: ``inpainted.png`` (the photo at its own size, the hole filled), ``predicted.png`` (the
    raw output at the size the model ran at) and ``panel.png``. The model runs at ``size`` (default: the short side
    at its training size); its prediction is resized back and fills the hole of the original photo."""
    from gencore.viz import save_grid
    from twostream_inpaint.lit import check_holes, check_inputs

    cfg = _cfg(cfg)
    for key in ("image", "mask"):
        if not cfg.get(key):
            raise ValueError(f"{key}: required (inpaint-image image=<photo> mask=<hole mask> keyframes=[<photos>])")
    frames = _paths(cfg.get("keyframes"))
    if not frames:
        raise ValueError("keyframes: give at least one keyframe image (keyframes=[a.png,b.png])")
    img = _read_rgb(cfg.image, "image")
    mask = _read_mask(cfg.mask)
    if mask.shape[-2:] != img.shape[-2:]:
        raise ValueError(
            f"mask size {tuple(mask.shape[-2:])} differs from the image size {tuple(img.shape[-2:])}: the mask must "
            "have the image's size"
        )
    check_holes(mask[None])
    masks_k = _paths(cfg.get("keyframe_masks"))
    if masks_k and len(masks_k) != len(frames):
        raise ValueError(f"keyframe_masks: {len(masks_k)} given for {len(frames)} keyframes")
    keys = [_read_rgb(p, f"keyframe {p}") for p in frames]
    for p, k in zip(frames, keys):
        if k.shape[-2:] != img.shape[-2:]:
            log.warning(
                "keyframe %s is %dx%d, the image %dx%d: resized to the image's size", p, *k.shape[-2:], *img.shape[-2:]
            )
    module = load_model(cfg)
    hw = _target_size(cfg, tuple(img.shape[-2:]), module)
    x, m = _resize(img, hw), _resize(mask, hw, nearest=True)
    srcs = torch.stack([_resize(k, hw) for k in keys])
    smasks = (
        torch.stack([_resize(_read_mask(p, f"keyframe mask {p}"), hw, nearest=True) for p in masks_k])
        if masks_k
        else None
    )
    dev = module.device
    x, m, srcs = x[None].to(dev), m[None].to(dev), srcs[None].to(dev)
    smasks = smasks[None].to(dev) if smasks is not None else None
    check_inputs(x, m, srcs, smasks)
    check_holes(m)
    with torch.no_grad():
        pred = module.inpaint(x, m, srcs, smasks)
    full = _resize(pred[0].cpu(), tuple(img.shape[-2:]))
    out = mask * full + (1 - mask) * img  # the photo's own pixels outside the hole, at its own size
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(out[None] * 2 - 1, out_dir / "inpainted.png", nrow=1)
    save_grid(pred * 2 - 1, out_dir / "predicted.png", nrow=1)
    shown = m * pred + (1 - m) * x
    refs = srcs[0] if smasks is None else _holed(srcs[0], smasks[0])
    panel = torch.cat([_holed(x, m), refs, shown]).cpu()
    save_grid(panel * 2 - 1, out_dir / "panel.png", nrow=panel.shape[0])
    log.info(
        "wrote %s (%dx%d; the model ran at %dx%d; panel.png: masked image, keyframes, result)",
        out_dir / "inpainted.png",
        *img.shape[-2:],
        *hw,
    )
    return out_dir


# ------------------------------------------------------------------------------------------------------ video


@torch.no_grad()
def inpaint_clip(
    module: Any,
    frames: Tensor,
    masks: Tensor,
    keyframe_index: list[int],
    *,
    batch_size: int = 8,
    mask_keyframes: bool = False,
) -> tuple[Tensor, float]:
    """Fill the holes of every frame of a clip from its keyframes.

    ``frames`` (F, 3, H, W) in [0, 1], ``masks`` (F, 1, H, W); ``keyframe_index``: the frames used as keyframes
    (whole, and written as they are, unless ``mask_keyframes``: then with their own holes, filled like the rest).
    The keyframes go through the encoder and the cross-attending blocks once (:meth:`GIResNetGenerator.
    keyframe_state`); each frame then needs its flows to the keyframes and the target pass. Returns (composited
    frames (F, 3, H, W), the holes used (F, 1, H, W): the keyframes' cleared unless ``mask_keyframes``, frames per
    second)."""
    from twostream_inpaint.lit import check_holes, check_inputs

    n = frames.shape[0]
    idx = [i % n if -n <= i < n else None for i in keyframe_index]
    if not idx:
        raise ValueError("keyframes: give at least one keyframe index (keyframes=[0,-1])")
    if any(i is None for i in idx):
        raise ValueError(f"keyframe indices {list(keyframe_index)} must be within the clip's {n} frames")
    dev = module.device
    frames, masks = frames.to(dev), masks.to(dev)
    if not mask_keyframes:  # keyframes given whole: no hole there, written as they are
        masks = masks.clone()
        masks[idx] = 0
    srcs, smasks = frames[idx][None], masks[idx][None]
    check_inputs(frames[:1], masks[:1], srcs, smasks)
    check_holes(masks)
    refs = torch.cat([srcs * (1 - smasks), smasks], dim=2)
    start = time.perf_counter()
    state = module.generator.keyframe_state(refs)
    out = []
    for i in range(0, n, batch_size):
        x, m = frames[i : i + batch_size], masks[i : i + batch_size]
        b = x.shape[0]
        s, sm = srcs.expand(b, -1, -1, -1, -1), smasks.expand(b, -1, -1, -1, -1)
        pred = module.inpaint(x, m, s, sm, keyframes=state)  # a batch-1 state serves any batch
        out.append(m * pred + (1 - m) * x)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    fps = n / (time.perf_counter() - start)
    return torch.cat(out), masks, fps


def _video_masks(cfg: DictConfig, indices: list[int], raw_hw: tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """The clip's holes at ``hw``: a synthetic moving hole, one mask image for every frame, or the frames
    ``indices`` of a mask video (the clip's own frames: ``start`` / ``stride`` apply to both). Mask files must have
    the video's size (``raw_hw``)."""
    from twostream_inpaint.masks import moving_masks

    n = len(indices)
    spec = str(cfg.get("mask") or "moving")
    if spec in MOVING:
        kind = "box" if spec == "moving" else spec
        rng = np.random.default_rng(int(cfg.get("seed", 0)))
        return moving_masks(rng, n, hw[0], hw[1], kind=kind)
    p = Path(spec).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"mask not found: {p} (a mask image, a mask video, or mask={' | '.join(MOVING)})")
    if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
        m = _read_mask(str(p))
        if tuple(m.shape[-2:]) != tuple(raw_hw):
            raise ValueError(f"mask size {tuple(m.shape[-2:])} differs from the video's frame size {tuple(raw_hw)}")
        return _resize(m, hw, nearest=True)[None].expand(n, -1, -1, -1).contiguous()
    from gencore.data.video import read_frames

    info = _video_info(p, "mask video")
    if (info.height, info.width) != tuple(raw_hw):
        raise ValueError(f"the mask video is {info.height}x{info.width}, the video {raw_hw[0]}x{raw_hw[1]}")
    if info.num_frames <= indices[-1]:
        raise ValueError(
            f"the mask video {p} has {info.num_frames} frames; the clip's frames {indices[0]}..{indices[-1]} need "
            f"{indices[-1] + 1}"
        )
    m = torch.from_numpy(read_frames(p, indices)).float().mean(-1, keepdim=True).permute(0, 3, 1, 2) / 255
    return (F.interpolate(m, size=hw, mode="nearest") > 0.5).float()


def _video_info(path: Path, what: str = "video") -> Any:
    from gencore.data.video import video_info

    try:
        return video_info(path)
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{what} {path} is not a readable video ({first})") from err


def video(cfg: Any) -> Path:
    """``inpaint-video video=<clip> [mask=<mask video|png|moving>] [keyframes=[0,-1]]``: every frame's hole filled
    from the keyframes (frames of the clip given whole, written as they are) -> ``out_dir``: ``inpainted.mp4``,
    ``masked.mp4`` and ``inpainted.gif`` (masked | result)."""
    from gencore.data.video import read_frames, write_video
    from gencore.viz import save_gif

    cfg = _cfg(cfg)
    if not cfg.get("video"):
        raise ValueError("video: required (inpaint-video video=<clip.mp4> mask=<mask video or png, or moving>)")
    path = Path(str(cfg.video)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    keys = cfg.get("keyframes")
    keys = [keys] if isinstance(keys, int) else list(keys if keys is not None else [0, -1])
    if not keys or not all(isinstance(k, int) for k in keys):
        raise ValueError(f"keyframes: give at least one frame index, e.g. keyframes=[0,-1]; got {keys}")
    info = _video_info(path)
    start, count, stride = int(cfg.get("start", 0)), cfg.get("num_frames"), int(cfg.get("stride", 1))
    if start < 0 or stride < 1 or (count is not None and int(count) < 1):
        raise ValueError(f"need start >= 0, stride >= 1 and num_frames >= 1, got {start}, {stride}, {count}")
    count = (info.num_frames - start + stride - 1) // stride if count is None else int(count)
    indices = list(range(start, start + count * stride, stride))
    if count < 1 or indices[-1] >= info.num_frames:
        raise ValueError(
            f"frames {start}..{start + (count - 1) * stride} (start, num_frames, stride) are outside the "
            f"{info.num_frames} frames of {path}"
        )
    raw_hw = (info.height, info.width)
    module = load_model(cfg)
    hw = _target_size(cfg, raw_hw, module)
    masks = _video_masks(cfg, indices, raw_hw, hw)
    raw = torch.from_numpy(read_frames(path, indices)).permute(0, 3, 1, 2).float() / 255
    frames = _resize(raw, hw)
    out, masks, fps = inpaint_clip(
        module,
        frames,
        masks,
        keys,
        batch_size=int(cfg.get("batch_size", 8)),
        mask_keyframes=bool(cfg.get("mask_keyframes", False)),
    )
    out, holed = out.cpu(), _holed(frames, masks.cpu())
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    rate = float(cfg.get("fps") or info.fps or 8.0)
    write_video(out.permute(1, 0, 2, 3) * 2 - 1, out_dir / "inpainted.mp4", fps=rate)
    write_video(holed.permute(1, 0, 2, 3) * 2 - 1, out_dir / "masked.mp4", fps=rate)
    pair = torch.stack([holed, out]).permute(0, 2, 1, 3, 4)  # (2, C, F, H, W)
    save_gif(pair * 2 - 1, out_dir / "inpainted.gif", fps=min(rate, 12.0), scale=max(1, 128 // min(hw)))
    log.info("inpainted %d frames (%dx%d) at %.1f frames/s -> %s", count, hw[0], hw[1], fps, out_dir / "inpainted.mp4")
    return out_dir


# ------------------------------------------------------------------------------------------------------- eval


def _ssim_map(x: Tensor, y: Tensor) -> Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    k = min(11, *x.shape[-2:]) // 2 * 2 - 1
    _, full = structural_similarity_index_measure(
        x, y, data_range=1.0, reduction="none", kernel_size=k, return_full_image=True
    )
    return full.mean(1, keepdim=True)


class _Perceptual:
    """LPIPS (VGG, local weights) or the Fashion-MNIST network's LPIPS-form distance; named accordingly."""

    def __init__(self, weights: str | None, device: torch.device) -> None:
        if weights:
            from gencore.metrics.pretrained import lpips_metric

            self.name, self.fn = "lpips", lpips_metric("vgg", weights, normalize=True).to(device)
            self.pairwise = False
        else:
            from gencore.metrics.fmnist_net import FMNISTPerceptual

            self.name, self.fn, self.pairwise = "lpips_fmnist", FMNISTPerceptual().to(device), True

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.pairwise:
            return self.fn(x * 2 - 1, y * 2 - 1).flatten()
        return torch.stack([self.fn(a[None], b[None]) for a, b in zip(x, y)])


def _fid(x: Tensor, y: Tensor, weights: str | None) -> tuple[str, float]:
    """FID with Inception weights from a local file; else the Fréchet distance of the Fashion-MNIST network's
    features (``fid_fmnist``) between the two sets."""
    if weights:
        from gencore.metrics.pretrained import inception_fid

        metric = inception_fid(weights, normalize=True).to(x.device)
        metric.update(y, real=True)
        metric.update(x, real=False)
        return "fid", float(metric.compute())
    from gencore.metrics import fmnist_features, frechet_distance

    fx, fy = fmnist_features(x * 2 - 1).double(), fmnist_features(y * 2 - 1).double()
    return "fid_fmnist", frechet_distance(fx.mean(0), torch.cov(fx.T), fy.mean(0), torch.cov(fy.T))


@torch.no_grad()
def metrics_for(pred: Tensor, target: Tensor, mask: Tensor, perceptual: _Perceptual) -> dict[str, Tensor]:
    """Per-item PSNR and SSIM inside the hole and the perceptual distance of the composited image."""
    from twostream_inpaint.lit import hole_psnr

    ssim = _ssim_map(pred, target)
    ssim_hole = (ssim * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    return {
        "psnr_hole": hole_psnr(pred, target, mask),
        "ssim_hole": ssim_hole,
        perceptual.name: perceptual(pred, target),
    }


def _summary(values: dict[str, list[Tensor]], prefix: str) -> dict[str, float]:
    """Means over items, and the standard error of the hole PSNR (items are the same for every model: compare
    models item by item)."""
    out = {}
    for k, v in values.items():
        x = torch.cat(v).double()
        out[f"{prefix}/{k}"] = round(float(x.mean()), 4)
        if k == "psnr_hole" and len(x) > 1:
            out[f"{prefix}/{k}_se"] = round(float(x.std() / len(x) ** 0.5), 4)
    return out


def evaluate(cfg: Any) -> dict[str, float]:
    """``inpaint-eval``: held-out photos (``num_samples`` targets with 2 keyframes each) and held-out clips of the
    OpenCV sample videos (``video_clips``; keyframes: first and last frame) -> ``out_dir/metrics.json``. Each metric
    is also given for the model fed another item's keyframes (``other_keyframes``: does it use its keyframes?), fed
    the target itself as its one keyframe (``self_keyframe``: does it copy a perfect keyframe?), and two
    references that need no network: the hole filled with the keyframe warped by the flow (``warp``: the local
    stream's raw material) and with the known pixels' mean colour (``mean_fill``)."""
    from twostream_inpaint.warp import flow_sample

    cfg = _cfg(cfg)
    module = load_model(cfg)
    n = int(cfg.get("num_samples") or 200)
    bs = int(cfg.get("batch_size", 16))
    perceptual = _Perceptual(cfg.get("lpips_weights"), module.device)
    batch = _val_items(cfg, module, n)
    inpainted = _inpaint_batches(module, batch, bs)
    img, mask = batch["image"], batch["mask"]
    refs: dict[str, Tensor] = {"model": inpainted}
    # the same model given another item's keyframes (same holes): how much it uses its keyframes at all
    other = {**batch, "srcs": batch["srcs"].roll(1, 0), "srcs_masks": batch["srcs_masks"].roll(1, 0)}
    refs["other_keyframes"] = _inpaint_batches(module, other, bs)
    # ... and the target itself, whole and undistorted, as its only keyframe: how much of a perfect keyframe it copies
    own = {**batch, "srcs": img[:, None], "srcs_masks": torch.zeros_like(mask)[:, None]}
    refs["self_keyframe"] = _inpaint_batches(module, own, bs)
    mean = (img * (1 - mask)).flatten(2).sum(2) / (1 - mask).flatten(2).sum(2).clamp_min(1)
    refs["mean_fill"] = mask * mean[..., None, None] + (1 - mask) * img
    if module.flow is not None:
        from twostream_inpaint.flow import keyframe_flows

        flows, _ = keyframe_flows(module.flow, img, mask, batch["srcs"][:, :1], batch["srcs_masks"][:, :1])
        warped = flow_sample(batch["srcs"][:, 0], flows[:, 0])
        refs["warp"] = mask * warped + (1 - mask) * img
    metrics: dict[str, Any] = {"images/num": n, "images/size": int(img.shape[-1])}
    for name, out in refs.items():
        vals: dict[str, list[Tensor]] = {}
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            for k, v in metrics_for(out[sl], img[sl], mask[sl], perceptual).items():
                vals.setdefault(k, []).append(v.cpu())
        metrics.update(_summary(vals, f"images/{name}" if name != "model" else "images"))
    fid_name, fid = _fid(inpainted, img, cfg.get("fid_weights"))
    metrics[f"images/{fid_name}"] = round(fid, 3)
    clips = int(cfg.get("video_clips", 4))
    if clips > 0:
        metrics.update(_video_metrics(module, cfg, clips, perceptual))
    out_dir = Path(str(cfg.get("out_dir") or Path(str(cfg.checkpoint)) / "eval"))
    run.write_metrics(metrics, out_dir)
    return metrics


def _video_metrics(module: Any, cfg: DictConfig, clips: int, perceptual: _Perceptual) -> dict[str, float]:
    from twostream_inpaint.data import VideoInpaintClips

    try:
        ds = VideoInpaintClips(split="val", size=_size(cfg, module), num_frames=int(cfg.get("video_frames", 12)))
    except (FileNotFoundError, ValueError) as err:  # no OpenCV sample videos here
        log.warning("video metrics skipped: %s", err)
        return {}
    vals: dict[str, list[Tensor]] = {}
    rates = []
    for i in range(min(clips, len(ds))):
        item = ds[i]
        keys = [int(k) for k in item["keyframe_index"]]
        out, _, fps = inpaint_clip(
            module, item["frames"], item["masks"], keys, batch_size=int(cfg.get("batch_size", 16))
        )
        rates.append(fps)
        inner = [j for j in range(len(out)) if j not in {k % len(out) for k in keys}]  # keyframes are given whole
        f, m = item["frames"][inner].to(out.device), item["masks"][inner].to(out.device)
        for k, v in metrics_for(out[inner], f, m, perceptual).items():
            vals.setdefault(k, []).append(v.cpu())
    if not vals:
        return {}
    return {**_summary(vals, "video"), "video/clips": len(rates), "video/fps": round(float(np.mean(rates)), 2)}
