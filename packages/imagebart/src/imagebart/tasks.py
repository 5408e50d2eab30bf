"""The ``imagebart-train``, ``-sample``, ``-inpaint`` and ``-eval`` tasks (Hydra configs in imagebart/configs).

- :func:`train`: :func:`gencore.run.train`, after the VQGAN stage (when ``first_stage=null``) and the ``remap: auto``
  listing of the codes the VQGAN uses on the training images (:func:`imagebart.first_stage.resolve_auto_remap`).
- :func:`sample`: images from a trained model (``grid.png``, ``samples.npz``) and ``chain.png``, the coarse-to-fine
  chain x_T ... x_0 of ``chain_rows`` more samples decoded (each row one sample, columns t = T ... 0).
- :func:`inpaint`: masked editing of Fashion-MNIST test images or image files with a named or drawn mask.
- :func:`evaluate`: FID-FMNIST / KID / precision-recall / class accuracy of samples, and with ``inpaint.masks`` the
  masked-editing comparison against taming's autoregressive transformer on the same images and masks
  (:mod:`imagebart.editing`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from gencore import io, run

__all__ = ["compare_editing", "evaluate", "inpaint", "load_model", "sample", "train"]

log = logging.getLogger(__name__)


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def train(cfg: Any) -> Any:
    """``imagebart-train``: the VQGAN first when ``first_stage`` is null, then ``remap: auto`` resolved into the
    list of used codes (written into the run's config), then :func:`gencore.run.train`."""
    from gencore.validate import validate_config
    from imagebart.first_stage import resolve_auto_remap

    cfg = _cfg(cfg)
    validate_config(cfg)  # a bad field fails here, before the VQGAN stage or the remap listing take time
    if cfg.get("first_stage") is None and cfg.get("stages"):
        run.train_missing_stages(cfg, Path(str(cfg.run_dir)).expanduser().resolve())
    resolve_auto_remap(cfg)
    return run.train(cfg)


def load_model(cfg: Any) -> Any:
    """The ImageBART model of ``cfg.checkpoint`` on the config's device (another package's model or a first stage:
    one line naming what fits)."""
    from imagebart.lit import ImageBART

    cfg = _cfg(cfg)
    run.check_sample_config(cfg)
    module = run.load_for_sampling(cfg, run.task_device(cfg))
    if not isinstance(module, ImageBART):
        what = "a first stage (a VQGAN)" if not hasattr(module, "generate") else "not an ImageBART model"
        raise ValueError(f"{cfg.checkpoint} holds a {type(module).__name__}: {what}; use the command of its package")
    for t, path in dict(cfg.get("stage_checkpoints") or {}).items():  # per-stage runs -> one model
        other = run.load_module(str(path), use_ema=cfg.get("use_ema", True))
        if not isinstance(other, ImageBART):
            raise ValueError(f"stage_checkpoints.{t}={path} holds a {type(other).__name__}, not an ImageBART run")
        module.take_stages(other.to(module.device), [int(t)])
        log.info("stage %s from %s", t, path)
    return module


def _write_chain(module: Any, cfg: DictConfig, out_dir: Path, n: int = 8) -> None:
    """``chain.png``: the coarse-to-fine chain of ``n`` more samples (drawn for the figure, not those of the grid),
    decoded (rows: samples; columns: x_T ... x_0)."""
    from gencore.viz import save_grid

    _, kwargs = run.sample_request(cfg, module)
    labels = kwargs.pop("labels", None)
    if labels is not None:
        labels = [labels[i % len(labels)] for i in range(n)]  # cycled, as for the grid
    torch.manual_seed(int(cfg.get("seed", 0)))
    chain = module.generate(n, labels, return_chain=True, **kwargs)["chain"]
    images = torch.stack([module.decode_tokens(x) for x in chain], dim=1)  # (n, T + 1, C, H, W)
    save_grid(images.flatten(0, 1).cpu(), out_dir / "chain.png", nrow=len(chain))


def sample(cfg: Any) -> Path:
    """``imagebart-sample``: ``num_samples`` images (``sample.labels`` cycled for class models) -> ``out_dir``
    (``grid.png``, ``samples.npz``, ``chain.png``); returns ``out_dir``."""
    cfg = _cfg(cfg)

    loaded: list[Any] = []

    def load(c: DictConfig, device: torch.device) -> Any:
        loaded.append(load_model(c).to(device))
        return loaded[-1]

    def write(out: dict[str, Any], out_dir: Path, c: DictConfig) -> None:
        if c.get("chain_rows", 8):
            _write_chain(loaded[-1], c, out_dir, int(c.get("chain_rows", 8)))

    return run.sample(cfg, load=load, write=write)


def _input_images(cfg: DictConfig, module: Any) -> tuple[Tensor, Tensor | None]:
    """(images (N, C, S, S) in [-1, 1], labels (N,) or None) of ``cfg.input`` (files / a folder) or of the
    Fashion-MNIST test images ``cfg.indices``."""
    from gencore.data import FashionMNIST, load_image
    from gencore.data.images import to_model_range

    size, channels = module.image_size, module.first_stage_model.encoder.in_channels
    labels = cfg.get("labels")
    if cfg.get("input") is None:
        indices = [int(i) for i in (cfg.get("indices") or [])]
        if not indices:
            raise ValueError(
                "imagebart-inpaint: give input=<image files> or indices=[...] of Fashion-MNIST test images"
            )
        ds = FashionMNIST(split="test", image_size=size, channels=channels)
        bad = [i for i in indices if not 0 <= i < len(ds)]
        if bad:
            raise ValueError(f"indices {bad} are outside the {len(ds)} Fashion-MNIST test images")
        images, all_labels = ds.tensors()
        picked = torch.as_tensor(indices)
        if labels is not None and len(list(labels)) != len(indices):
            raise ValueError(f"{len(indices)} images need {len(indices)} labels, got {len(list(labels))}")
        return images[picked], (all_labels[picked] if labels is None else torch.as_tensor(list(labels)).long())
    paths = [Path(str(p)) for p in (cfg.input if OmegaConf.is_list(cfg.input) else [cfg.input])]
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"}))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input image not found: {p}")
    if not files:
        raise ValueError(f"no images in {[str(p) for p in paths]}")
    images = []
    for f in files:
        x = to_model_range(load_image(f, channels=channels))
        if x.shape[-2:] != (size, size):
            raise ValueError(f"{f} is {x.shape[-2]}x{x.shape[-1]}; this model edits {size}x{size} images")
        images.append(x)
    if labels is not None:
        labels = torch.as_tensor(list(labels)).long()
        if len(labels) != len(files):
            raise ValueError(f"{len(files)} input images need {len(files)} labels, got {len(labels)}")
    return torch.stack(images), labels


def _keep_mask(cfg: DictConfig, size: int) -> Tensor:
    from imagebart.editing import mask_from_spec

    return mask_from_spec(str(cfg.get("mask", "upper")), size)


def _sample_opts(cfg: DictConfig, module: Any) -> dict[str, Any]:
    """The ``sample.*`` options of an inpaint / eval config (:func:`gencore.run.sample_request`) without ``labels``
    (editing takes the images' own classes)."""
    return {k: v for k, v in run.sample_request(cfg, module)[1].items() if k != "labels"}


def inpaint(cfg: Any) -> Path:
    """``imagebart-inpaint``: ``num_samples`` edits of each input image with ``mask`` resampled -> ``out_dir``:
    ``grid.png`` (one row per image: original, what is kept, the edits) and ``edits.npz``."""
    from gencore.viz import save_grid, to_uint8

    cfg = _cfg(cfg)
    module = load_model(cfg)
    n_edits = int(cfg.get("num_samples", 4))
    if n_edits < 1:
        raise ValueError(f"num_samples (edits per image) must be >= 1, got {n_edits}")
    keep = _keep_mask(cfg, module.image_size)  # (a bad mask is refused before the images are read)
    images, labels = _input_images(cfg, module)
    if module.num_classes and labels is None:
        raise ValueError("a class-conditional model needs labels=[...] (one class per input image)")
    if not module.num_classes:
        if cfg.get("labels") is not None:
            raise ValueError("this model is unconditional: it takes no labels (leave labels= out)")
        labels = None
    torch.manual_seed(int(cfg.get("seed", 0)))
    reps = images.repeat_interleave(n_edits, 0)
    rep_labels = None if labels is None else labels.repeat_interleave(n_edits, 0)
    out = module.inpaint(reps.to(module.device), keep, rep_labels, **_sample_opts(cfg, module))
    edits = out["images"].cpu().view(len(images), n_edits, *images.shape[1:])
    shown = out["sources"].cpu().view(len(images), n_edits, *images.shape[1:])[:, 0]
    rows = torch.cat((images[:, None], shown[:, None], edits), dim=1)  # (N, 2 + n, C, H, W)
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_grid(rows.flatten(0, 1), out_dir / "grid.png", nrow=2 + n_edits)
    arrays = {"images": to_uint8(images).numpy(), "edits": to_uint8(edits.flatten(0, 1)).numpy()}
    arrays["keep_tokens"] = out["keep"][::n_edits].view(len(images), *module.grid).cpu().numpy()
    if labels is not None:
        arrays["labels"] = labels.numpy()
    with io.atomic_path(out_dir / "edits.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    log.info("wrote %d edits of %d image(s) to %s", edits.shape[0] * n_edits, len(images), out_dir)
    return out_dir


@torch.no_grad()
def compare_editing(
    module: Any,
    baseline: Any | None,
    masks: list[str],
    *,
    num_images: int = 500,
    batch_size: int = 100,
    seed: int = 0,
    **sample_kwargs: Any,
) -> dict[str, float]:
    """The masked-editing table: the first ``num_images`` Fashion-MNIST test images, each mask, ImageBART (and the
    taming ``baseline`` on the same images and masks) -> ``<mask>/<model>/<metric>`` (:func:`editing_metrics`),
    plus the first stage's reconstructions (``reconstruction/...``: what a perfect edit of the tokens scores)."""
    from gencore.data import FashionMNIST
    from gencore.metrics import class_accuracy, fid_fmnist
    from imagebart.editing import ar_inpaint, editing_metrics, mask_from_spec

    size, channels = module.image_size, module.first_stage_model.encoder.in_channels
    images, labels = FashionMNIST(split="test", image_size=size, channels=channels, limit=num_images).tensors()
    out: dict[str, float] = {}
    recs = torch.cat(
        [
            module.decode_tokens(module.encode_to_tokens(images[i : i + batch_size].to(module.device))).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    out["reconstruction/fid"] = fid_fmnist(recs)
    out["reconstruction/class_accuracy"] = class_accuracy(recs, labels)
    models = {"imagebart": module}
    if baseline is not None:
        models["taming_ar"] = baseline
    for name in masks:
        keep = mask_from_spec(name, size)
        for model_name, model in models.items():
            t0 = time.perf_counter()
            edits, tmasks = [], []
            for i in range(0, len(images), batch_size):
                torch.manual_seed(seed + i)
                x, y = images[i : i + batch_size], labels[i : i + batch_size]
                if model_name == "imagebart":
                    res = model.inpaint(x.to(model.device), keep, y, **sample_kwargs)
                else:
                    res = ar_inpaint(model, x, keep, y, top_k=sample_kwargs.get("top_k"))
                edits.append(res["images"].cpu())
                tmasks.append(res["keep"].cpu())
            seconds = time.perf_counter() - t0
            metrics = editing_metrics(torch.cat(edits), images, labels, torch.cat(tmasks), module.grid)
            metrics["seconds_per_image"] = seconds / len(images)
            out.update({f"{name}/{model_name}/{k}": v for k, v in metrics.items()})
            log.info("editing %s, %s: %s", name, model_name, {k: round(v, 3) for k, v in metrics.items()})
    return out


def evaluate(cfg: Any) -> dict[str, float]:
    """``imagebart-eval``: sample metrics (``num_samples`` > 0) and the editing comparison (``inpaint.masks``) ->
    ``out_dir/metrics.json``; returns the metrics (``{}`` on the non-main processes of a distributed launch)."""
    from gencore.metrics import fmnist_report

    cfg = _cfg(cfg)
    if not cfg.get("score_samples", True) and not (cfg.get("inpaint") or {}).get("masks"):
        raise ValueError("nothing to evaluate: score_samples=false and no inpaint.masks=[...]")
    module = load_model(cfg)
    metrics: dict[str, float] = {}
    n, bs, seed = int(cfg.get("num_samples", 1000)), int(cfg.get("batch_size", 100)), int(cfg.get("seed", 0))
    opts = _sample_opts(cfg, module)
    state = run.process_state(cfg.get("device"))
    if cfg.get("score_samples", True):
        kwargs = {**module.evaluation_request(), **opts}
        t0 = time.perf_counter()
        out = run.generate_sharded(module, n, batch_size=bs, seed=seed, **kwargs)
        if out is not None:
            labels = out.get("labels") if kwargs.get("labels") is not None else None
            metrics.update(fmnist_report(out["images"], labels))
            metrics["seconds_per_image"] = (time.perf_counter() - t0) / n
    ed = cfg.get("inpaint") or {}
    masks = [str(m) for m in (ed.get("masks") or [])]
    if masks and state.is_main_process:
        baseline = None
        if ed.get("baseline"):
            baseline = run.load_module(str(ed.baseline)).to(module.device).eval()
            if not hasattr(baseline, "transformer") or not hasattr(baseline, "encode_to_z"):
                raise ValueError(
                    f"inpaint.baseline={ed.baseline} is a {type(baseline).__name__}, not a taming "
                    "transformer (Net2NetTransformer)"
                )
        metrics.update(
            {
                f"inpaint/{k}": v
                for k, v in compare_editing(
                    module, baseline, masks, num_images=int(ed.get("num_images", 500)), batch_size=bs, seed=seed, **opts
                ).items()
            }
        )
    if not state.is_main_process:
        return {}
    run.write_metrics(metrics, Path(str(cfg.get("out_dir") or Path(str(cfg.checkpoint)) / "eval")))
    return metrics
