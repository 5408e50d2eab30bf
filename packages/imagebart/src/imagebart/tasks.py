"""The ``imagebart-train``, ``-sample``, ``-inpaint`` and ``-eval`` tasks (Hydra configs in imagebart/configs).

- :func:`train`: :func:`gencore.run.train`, after the VQGAN stage (when ``first_stage=null``) and the ``remap: auto``
  listing of the codes the VQGAN uses on the training images (:func:`imagebart.first_stage.resolve_auto_remap`).
- :func:`sample`: images from a trained model (``grid.png``, ``samples.npz``) and ``chain.png``, the coarse-to-fine
  chain x_T ... x_0 of the first samples decoded (each row one sample, columns t = T ... 0).
- :func:`inpaint`: masked editing of Fashion-MNIST test images or image files with a named or drawn mask.
- :func:`evaluate`: FID-FMNIST / KID / precision-recall / class accuracy of samples, and with ``inpaint.masks`` the
  masked-editing comparison against taming's autoregressive transformer on the same images and masks
  (:mod:`imagebart.editing`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gencore import run

__all__ = ["evaluate", "inpaint", "load_model", "sample", "train"]

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
    return module


def _write_chain(module: Any, cfg: DictConfig, out_dir: Path, n: int = 8) -> None:
    """``chain.png``: the coarse-to-fine chain of ``n`` samples, decoded (rows: samples; columns: x_T ... x_0)."""
    from gencore.viz import save_grid

    _, kwargs = run.sample_request(cfg, module)
    labels = kwargs.pop("labels", None)
    torch.manual_seed(int(cfg.get("seed", 0)))
    batch, _ = module.cond_stage_model.generation_batch(
        n, labels=None if labels is None else [labels[i % len(labels)] for i in range(n)]
    )
    cond = module.class_tokens(batch, n)
    _, chain = module.sample_tokens(n, cond, **module._sample_opts(kwargs), return_chain=True)
    images = torch.stack([module.decode_tokens(x) for x in chain], dim=1)  # (n, T + 1, C, H, W)
    save_grid(images.flatten(0, 1).cpu(), out_dir / "chain.png", nrow=len(chain))


def sample(cfg: Any) -> Path:
    """``imagebart-sample``: ``num_samples`` images (``sample.labels`` cycled for class models) -> ``out_dir``
    (``grid.png``, ``samples.npz``, ``chain.png``); returns ``out_dir``."""
    cfg = _cfg(cfg)

    def load(c: DictConfig, device: torch.device) -> Any:
        return load_model(c).to(device)

    def write(out: dict[str, Any], out_dir: Path, c: DictConfig) -> None:
        if c.get("chain_rows", 8):
            _write_chain(load_model(c), c, out_dir, int(c.get("chain_rows", 8)))

    return run.sample(cfg, load=load, write=write)


def inpaint(cfg: Any) -> Path:  # filled in below
    raise NotImplementedError


def evaluate(cfg: Any) -> dict[str, float]:  # filled in below
    raise NotImplementedError
