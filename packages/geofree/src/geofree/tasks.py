"""The ``geofree-sample``, ``-render`` and ``-eval`` tasks (Hydra configs in geofree/configs; ``geofree-train`` is
:func:`gencore.run.train`).

- :func:`sample`: several samples of the target view for each of a few (source, camera) pairs -> ``grid.png`` (one
  row per pair: source, true target, the explicit warp of the source, the samples) and ``samples.npz``;
- :func:`render`: a camera trajectory from one source view -> ``video.mp4`` (each frame sampled from the source and
  its camera, as the paper's demo does) next to the true views where the data has them;
- :func:`evaluate`: PSNR / SSIM (/ LPIPS with local weights) of samples against the true targets on held-out pairs
  (mean over samples and best of n), the VQGAN's reconstruction and the bare geometric warp as references, and the
  depth probe of the transformer's hidden layers (:mod:`geofree.probe`).

The pairs come from ``data`` (default: held-out synthetic rooms at the model's view size; any dataset of the same
item keys, e.g. :class:`geofree.data.realestate.RealEstate10KSparse`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import default_collate

from gencore import io, run

__all__ = ["evaluate", "load_model", "pairs", "render", "sample", "token_nll", "trajectory_cameras", "view_metrics"]

log = logging.getLogger(__name__)

VAL_SEED = 1_000_003  # the seed offset of the datamodule's held-out scenes


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def load_model(cfg: Any) -> Any:
    """The view-synthesis model of ``cfg.checkpoint`` on the config's device (a first stage: one clear line)."""
    from geofree.lit import GeoTransformer

    cfg = _cfg(cfg)
    run.check_sample_config(cfg)
    module = run.load_for_sampling(cfg, run.task_device(cfg))
    if not isinstance(module, GeoTransformer):
        raise ValueError(
            f"{cfg.checkpoint} holds a {type(module).__name__}, not a geofree view-synthesis model (a first stage "
            "VQGAN is used through first_stage= / depth_stage=)"
        )
    return module


def _dataset(cfg: DictConfig, module: Any, kind: str = "pairs") -> Any:
    """``cfg.data`` (a dataset node) or the held-out synthetic rooms at the model's view size."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from geofree.data.synthetic import SyntheticScenes

    node = cfg.get("data")
    if node is None:
        return SyntheticScenes(int(cfg.get("num_scenes", 100)), size=module.image_size, kind=kind, seed=VAL_SEED)
    try:
        return instantiate(node)
    except InstantiationException as err:  # one line naming the dataset's own complaint, not Hydra's wrapper
        cause = err.__cause__ or err
        raise ValueError(f"data: {type(cause).__name__}: {cause}") from err


def pairs(dataset: Any, indices: list[int], device: torch.device | str = "cpu") -> dict[str, Any]:
    """The items ``indices`` of a pair dataset collated into one batch on ``device``."""
    bad = [i for i in indices if not 0 <= int(i) < len(dataset)]
    if bad:
        raise ValueError(f"indices {bad} are outside the {len(dataset)} pairs of the data")
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    batch = default_collate([dataset[int(i)] for i in indices])
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _options(cfg: DictConfig, module: Any) -> dict[str, Any]:
    _, opts = run.sample_request(cfg, module)
    return module.sample_options(**opts)


def _views(cfg: DictConfig, default_pairs: int = 8) -> tuple[list[int], int, int]:
    """(the pairs, samples_per_view, images in all) of a sample / eval config: ``indices`` (default the first ones),
    ``samples_per_view`` for each; ``num_samples`` (when set) is the number of images in all, from as many pairs as it
    needs."""
    per = int(cfg.get("samples_per_view", 4))
    if per < 1:
        raise ValueError(f"samples_per_view must be >= 1, got {per}")
    n = cfg.get("num_samples")
    indices = [int(i) for i in cfg.get("indices") or []]
    if n is None:
        indices = indices or list(range(default_pairs))
        return indices, per, len(indices) * per
    n = int(n)
    if n < 1:
        raise ValueError(f"num_samples must be >= 1, got {n}")
    per = min(per, n)
    needed = -(-n // per)
    if indices and len(indices) < needed:
        raise ValueError(
            f"indices lists {len(indices)} pair(s), but num_samples={n} at samples_per_view={per} needs {needed}: "
            "give more indices, or leave num_samples out (samples_per_view for each listed pair)"
        )
    return (indices or list(range(needed)))[:needed], per, n


def sample(cfg: Any) -> Path:
    """``geofree-sample``: ``samples_per_view`` views for each of the pairs ``indices`` (default 0 ... 7; with
    ``num_samples``: that many views in all, from the first pairs needed) -> ``out_dir``: ``grid.png`` (one row per
    pair: source, true target, the source warped with its depth, the samples) and ``samples.npz``."""
    from gencore.viz import save_grid, to_uint8

    cfg = _cfg(cfg)
    indices, n, total = _views(cfg)  # (the config's own checks before anything loads)
    module = load_model(cfg)
    opts = _options(cfg, module)
    batch = pairs(_dataset(cfg, module), indices, module.device)
    gen = torch.Generator(module.device).manual_seed(int(cfg.get("seed", 0)))
    samples = module.sample_views(batch, n, generator=gen, **opts).cpu()
    warped = module.warped_source(batch, check=True)[0]
    b = len(indices)
    shape = samples.shape[1:]
    cols = [batch["src_img"].cpu()[:, None]]
    if "dst_img" in batch:
        cols.append(batch["dst_img"].cpu()[:, None])
    cols += [warped.cpu()[:, None], samples.view(b, n, *shape)]
    rows = torch.cat(cols, dim=1)
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(rows.flatten(0, 1), out_dir / "grid.png", nrow=rows.shape[1])
    arrays = {"images": to_uint8(samples[:total]).numpy(), "sources": to_uint8(batch["src_img"].cpu()).numpy()}
    arrays["pairs"] = np.asarray(indices)
    if "dst_img" in batch:
        arrays["targets"] = to_uint8(batch["dst_img"].cpu()).numpy()
    with io.atomic_path(out_dir / "samples.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    log.info("wrote %d samples of %d view(s) to %s (grid columns: source, target, warp, samples)", total, b, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------------- render
TRAJECTORIES = ("scene", "forward", "backward", "left", "right", "orbit", "turn")


def trajectory_cameras(kind: str, steps: int, magnitude: float) -> tuple[Tensor, Tensor]:
    """Relative cameras (R (steps, 3, 3), t (steps, 3)) of a generated path, world-to-camera, the source camera at
    the origin: ``forward`` / ``backward`` along the optical axis, ``left`` / ``right`` sideways, ``turn`` yaws in
    place, ``orbit`` circles a point 2 units ahead while looking at it. ``magnitude``: the total translation in the
    data's pose units (``forward`` ... ``right``) or the total angle in radians (``turn``, ``orbit``)."""
    from geofree.data.synthetic import look_camera

    if kind not in TRAJECTORIES[1:]:
        raise ValueError(f"unknown trajectory {kind!r}; choose one of {', '.join(TRAJECTORIES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    Rs, ts = [], []
    for k in range(1, steps + 1):
        a = k / steps
        yaw = 0.0
        center = np.zeros(3)
        if kind == "forward":
            center[2] = magnitude * a
        elif kind == "backward":
            center[2] = -magnitude * a
        elif kind in ("left", "right"):
            center[0] = (-1 if kind == "left" else 1) * magnitude * a
        elif kind == "turn":
            yaw = magnitude * a
        else:  # orbit: sideways on a circle around a point 2 units ahead, looking at it
            phi = magnitude * a
            center = np.array([2.0 * math.sin(phi), 0.0, 2.0 - 2.0 * math.cos(phi)])
            yaw = -phi
        R, t = look_camera(center, yaw)
        Rs.append(R)
        ts.append(t)
    return torch.as_tensor(np.stack(Rs), dtype=torch.float32), torch.as_tensor(np.stack(ts), dtype=torch.float32)


def render(cfg: Any) -> Path:
    """``geofree-render``: frames along a camera trajectory from one source view -> ``out_dir/video.mp4`` (samples),
    ``truth.mp4`` (the synthetic scene's true views, for ``trajectory=scene``), ``frames.png`` and ``video.gif`` (both:
    the samples, and the true views beside them when there are)."""
    from gencore.data import write_video
    from gencore.viz import save_gif, save_grid

    cfg = _cfg(cfg)
    kind = str(cfg.get("trajectory", "scene"))  # (the config's own checks before anything loads)
    if kind not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {kind!r}; choose one of {', '.join(TRAJECTORIES)}")
    steps = int(cfg.get("steps", 8))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    module = load_model(cfg)
    opts = _options(cfg, module)
    dataset = _dataset(cfg, module)
    index = int(cfg.get("index", 0))
    truth = None
    if kind == "scene":
        if not hasattr(dataset, "pair") or not hasattr(dataset, "num_frames"):
            raise ValueError(
                "trajectory=scene needs the synthetic rooms (their whole camera walk); use a generated one"
            )
        if not 0 <= index < len(dataset):
            raise ValueError(f"index {index} is outside the {len(dataset)} scenes")
        if steps > dataset.num_frames - 1:
            raise ValueError(
                f"steps={steps} exceeds the room's camera walk ({dataset.num_frames - 1} frames after the source); "
                "a generated trajectory (orbit, forward, ...) takes any number"
            )
        frames = list(range(1, steps + 1))
        items = [dataset.pair(index, 0, f) for f in frames]
        batch = default_collate(items)
        truth = batch["dst_img"]
    else:
        base = pairs(dataset, [index])
        R, t = trajectory_cameras(kind, steps, float(cfg.get("magnitude", 0.6)))
        batch = {
            k: v.expand(steps, *v.shape[1:]) if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in base.items()
        }
        batch = {k: v for k, v in batch.items() if k not in ("dst_img", "dst_depth", "label")}
        # the relative camera of each frame (the source is the origin: R_rel = R_k, t_rel = t_k), in the data's units
        batch["R_rel"], batch["t_rel"] = R, t
    batch = {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    gen = torch.Generator(module.device).manual_seed(int(cfg.get("seed", 0)))
    views = module.sample_views(batch, 1, generator=gen, **opts).cpu()  # (steps, C, H, W)
    src = batch["src_img"][:1].cpu()
    video = torch.cat((src, views), dim=0)  # the source, then the synthesised frames
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    fps = float(cfg.get("fps", 4))
    write_video(video.permute(1, 0, 2, 3), out_dir / "video.mp4", fps=fps, min_size=int(cfg.get("min_size", 128)))
    rows = [video]
    if truth is not None:
        truth_video = torch.cat((src, truth), dim=0)
        write_video(
            truth_video.permute(1, 0, 2, 3), out_dir / "truth.mp4", fps=fps, min_size=int(cfg.get("min_size", 128))
        )
        rows.append(truth_video)
    save_grid(torch.cat(rows), out_dir / "frames.png", nrow=video.shape[0])
    # the same frames as a GIF (the samples, and the true views beside them): plays wherever an image shows
    scale = max(1, -(-int(cfg.get("min_size", 128)) // min(video.shape[-2:])))
    save_gif(torch.stack(rows).permute(0, 2, 1, 3, 4), out_dir / "video.gif", fps=fps, scale=scale)
    log.info("wrote %d frames (%s trajectory) to %s", video.shape[0], kind, out_dir / "video.mp4")
    return out_dir


# ------------------------------------------------------------------------------------------------------- eval
def _ssim(x: Tensor, y: Tensor) -> Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        (x + 1) / 2, (y + 1) / 2, data_range=1.0, reduction="none", kernel_size=min(11, *x.shape[-2:]) // 2 * 2 - 1
    )


def token_nll(module: Any, batch: dict[str, Any]) -> Tensor:
    """(B,) mean negative log-likelihood (nats) of each pair's target tokens under the model."""
    logits, z = module.target_logits(batch)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), z, reduction="none")
    return nll.mean(1)


def _psnr(x: Tensor, y: Tensor) -> Tensor:
    mse = ((x - y) / 2).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


@torch.no_grad()
def view_metrics(
    module: Any,
    dataset: Any,
    *,
    num_pairs: int,
    num_samples: int,
    batch_size: int,
    seed: int = 0,
    lpips: Any = None,
    **options: Any,
) -> dict[str, float]:
    """Samples of the first ``num_pairs`` pairs against the true targets: ``psnr`` / ``ssim`` (/ ``lpips``) averaged
    over samples, ``psnr_best`` (best of ``num_samples`` per pair), plus ``reconstruction/*`` (the VQGAN's
    reconstruction of the target: the ceiling of any token model), ``warp/*`` (the source splatted with the scaled
    depth, holes grey: geometry alone), ``source/*`` (the source view itself as the answer: no model), and ``nll`` /
    ``nll_other_source``: the target tokens' NLL (nats per token) given the true source and given another pair's
    source (the gap: how much the model uses the source)."""
    if num_pairs < 1 or num_pairs > len(dataset):
        raise ValueError(f"num_pairs must be in [1, {len(dataset)}] (the data's pairs), got {num_pairs}")
    scores: dict[str, list[Tensor]] = {}

    def add(name: str, value: Tensor) -> None:
        scores.setdefault(name, []).append(value.float().cpu())

    gen = torch.Generator(module.device).manual_seed(seed)
    t0 = time.perf_counter()
    for start in range(0, num_pairs, batch_size):
        idx = list(range(start, min(num_pairs, start + batch_size)))
        batch = pairs(dataset, idx, module.device)
        target = batch["dst_img"].float()
        samples = module.sample_views(batch, num_samples, generator=gen, **options).float()
        rep = target.repeat_interleave(num_samples, 0)
        psnr = _psnr(samples, rep).view(len(idx), num_samples)
        add("psnr", psnr.mean(1))
        add("psnr_best", psnr.amax(1))
        add("ssim", _ssim(samples, rep).view(len(idx), num_samples).mean(1))
        if lpips is not None:
            add(
                "lpips", torch.stack([lpips(s[None], r[None]) for s, r in zip(samples, rep)]).view(len(idx), -1).mean(1)
            )
        rec = module.decode_indices(module.encode_to_indices(target)[1]).float()
        add("reconstruction/psnr", _psnr(rec, target))
        add("reconstruction/ssim", _ssim(rec, target))
        warp = module.warped_source(batch, check=True)[0]
        add("warp/psnr", _psnr(warp, target))
        add("warp/ssim", _ssim(warp, target))
        src = batch["src_img"].float()  # no model at all: the source view as the answer
        add("source/psnr", _psnr(src, target))
        add("source/ssim", _ssim(src, target))
        # how much the model uses its conditioning: the target tokens' NLL given the true source vs another pair's
        # source (same camera); a model that ignores the source scores the same on both
        add("nll", token_nll(module, batch))
        if len(idx) > 1:
            other = {k: v.roll(1, 0) if k.startswith("src_") and isinstance(v, Tensor) else v for k, v in batch.items()}
            add("nll_other_source", token_nll(module, other))
    out = {}
    for name, values in scores.items():
        v = torch.cat(values)
        out[name] = float(v.mean())
        out[f"{name}_se"] = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0
    out["seconds_per_sample"] = (time.perf_counter() - t0) / (num_pairs * num_samples)
    return out


def evaluate(cfg: Any) -> dict[str, float]:
    """``geofree-eval``: :func:`view_metrics` of ``num_samples`` samples (``samples_per_view`` for each of the first
    held-out pairs) and, with ``probe.enabled``, the depth probe -> ``out_dir/metrics.json``."""
    from gencore.metrics.pretrained import lpips_metric
    from geofree.probe import depth_probe

    cfg = _cfg(cfg)
    module = load_model(cfg)
    opts = _options(cfg, module)
    lpips = None
    if cfg.get("lpips_weights"):
        lpips = lpips_metric("vgg", cfg.lpips_weights).to(module.device)
    dataset = _dataset(cfg, module)
    indices, per, _ = _views(cfg, default_pairs=100)
    if indices != list(range(len(indices))):
        raise ValueError("geofree-eval scores the first held-out pairs: set num_samples (and samples_per_view)")
    metrics = view_metrics(
        module,
        dataset,
        num_pairs=len(indices),
        num_samples=per,
        batch_size=int(cfg.get("batch_size", 50)),
        seed=int(cfg.get("seed", 0)),
        lpips=lpips,
        **opts,
    )
    probe = cfg.get("probe") or {}
    if probe.get("enabled", False):
        result = depth_probe(
            module,
            dataset,
            num_train=int(probe.get("num_train", 400)),
            num_test=int(probe.get("num_test", 100)),
            batch_size=int(cfg.get("batch_size", 50)),
            ridge=float(probe.get("ridge", 1e-3)),
        )
        metrics.update({f"probe/{k}": v for k, v in result.items()})
    run.write_metrics(metrics, Path(str(cfg.get("out_dir") or Path(str(cfg.checkpoint)) / "eval")))
    return metrics
