"""The net2net console tasks beyond training: ``net2net-sample``, ``net2net-translate``, ``net2net-bias-report`` and
``net2net-eval``. Each loads a trained cINN (a run folder, an export, a shipped ``pkg://`` checkpoint or a ``.ckpt``)
with its frozen autoencoder, and reads held-out images of the union's datasets (:func:`net2net.data.load_member`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from gencore import io, run

__all__ = ["bias_report", "evaluate", "held_out", "load_model", "sample", "translate"]

log = logging.getLogger(__name__)


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


COUNTS = ("num_images", "classifier_images")  # checked with gencore's sample counts before the model loads


def _count(cfg: DictConfig, key: str, default: int) -> int:
    """``cfg[key]`` (checked by :func:`load_model`: an integer >= 1), or ``default`` when unset."""
    value = cfg.get(key)
    return default if value is None else int(value)


def _names(value: Any) -> list[Any]:
    """A list option given as one bare value (``targets=lfw``) or a list (``targets=[lfw,digits]``)."""
    return [value] if isinstance(value, (str, int)) else list(value)


def load_model(cfg: Any, *, first_stage_ok: bool = False) -> Any:
    """The cINN of ``cfg.checkpoint`` on the config's device (eval mode); with ``first_stage_ok`` also the union
    autoencoder a cINN is trained over."""
    from net2net.lit import Net2NetFlow

    cfg = _cfg(cfg)
    run.check_sample_config(cfg, COUNTS)
    module = run.load_for_sampling(cfg, run.task_device(cfg))
    if first_stage_ok and hasattr(getattr(module, "model", None), "encoder"):
        return module
    if not isinstance(module, Net2NetFlow):
        raise ValueError(
            f"{cfg.checkpoint} holds a {type(module).__name__}, not a net2net cINN (an autoencoder run is the first "
            "stage: train the cINN over it with net2net-train experiment=cinn_union first_stage=<it>)"
        )
    return module


def _channels(module: Any) -> int:
    return int(getattr(module.first_stage_model, "in_channels", 1))


def held_out(module: Any, name: str, n: int | None, split: str = "val", seed: int = 0) -> Tensor:
    """Up to ``n`` images of dataset ``name``'s ``split`` at the model's size (a seeded random subset; all if None)."""
    from net2net.data import load_member

    module.dataset_index(name)  # an unknown name fails here with the model's datasets
    images, _ = load_member(name, split, image_size=module.image_size, channels=_channels(module))
    if n is not None and n < len(images):
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        images = images[pick.sort().values]
    return images


def _batched(fn: Any, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def _write_npz(out_dir: Path, name: str, **arrays: Any) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out_dir / name) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return out_dir / name


def _u8(x: Tensor) -> np.ndarray:
    from gencore.viz import to_uint8

    return to_uint8(x.detach().float().cpu()).numpy()


def _projection_rows(module: Any, x: Tensor, src: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """(reconstructions (B, C, H, W), projections onto every dataset (B, K, C, H, W)) of images ``x`` with source
    labels ``src``."""
    recs, projs = [], []
    for i in range(0, x.shape[0], batch_size):
        xb, sb = x[i : i + batch_size].to(module.device), src[i : i + batch_size]
        recs.append(module.decode(module.encode(xb)).cpu())
        projs.append(module.project(xb, sb).cpu())
    return torch.cat(recs), torch.cat(projs)


def _grid(rows: Tensor, path: Path) -> Path:
    """Save (R, C, c, H, W) images as a grid of R rows."""
    from gencore.viz import save_grid

    return save_grid(rows.flatten(0, 1), path, nrow=rows.shape[1])


# ---------------------------------------------------------------------------------------------------- sample


def sample(cfg: Any) -> Path:
    """``net2net-sample``: ``num_samples`` samples z = T⁻¹(v | dataset), v ~ N(0, t² I) -> ``grid.png`` and
    ``samples.npz`` (``images``, ``labels`` = dataset ids). ``sample.labels`` picks datasets (ids or names, cycled;
    default: each dataset for an equal block of samples), ``sample.temperature`` t."""
    cfg = _cfg(cfg)

    def request(cfg: DictConfig, module: Any) -> tuple[int, dict[str, Any]]:
        n, kwargs = run.sample_request(cfg, module)
        if kwargs.get("labels") is None:  # every dataset in turn, in blocks (a grid row per dataset with nrow)
            k = len(module.dataset_names)
            kwargs["labels"] = [module.dataset_names[i * k // n] for i in range(n)]
        elif isinstance(kwargs["labels"], (int, str)):
            kwargs["labels"] = [kwargs["labels"]]
        for label in kwargs["labels"]:
            module.dataset_index(label)  # unknown names fail before sampling
        return n, kwargs

    return run.sample(cfg, load=lambda c, d: load_model(c), request=request)


# ------------------------------------------------------------------------------------------------- translate


def _user_images(paths: Sequence[str], size: int, channels: int) -> Tensor:
    from gencore.data.images import load_image, resize_center_crop, to_model_range

    out = []
    for p in paths:
        path = Path(str(p)).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            arr = load_image(path, channels=channels)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} as an image ({e})") from e
        out.append(resize_center_crop(to_model_range(arr), size))
    return torch.stack(out)


@torch.no_grad()
def translate(cfg: Any) -> Path:
    """``net2net-translate``: project images onto every dataset (or ``targets``) of the union, z' =
    T⁻¹(T(z | y_src) | y_tgt) -> ``translate.png`` (rows: input, its reconstruction, its projection onto each
    target) and ``projections.npz`` (``inputs``, ``projections`` (N, K, C, H, W), ``sources``, ``targets``).

    Images: ``images=[a.png, ...]`` (your own, read as the model's channels and resized / centre-cropped to its size)
    with their dataset ``source=<name>``; else ``num_images`` held-out images of ``source`` (default: of every
    dataset). ``translate.png`` has one row per image: the input, its reconstruction, then its projection onto each
    target. ``alphas=[0, 0.25, ...]`` also writes the path from each input to its projection onto the first target
    (``interpolation.png`` and ``interpolation.gif``; ``mode=latent`` blends latents as the official demo,
    ``mode=label`` blends the dataset labels)."""
    from gencore.viz import save_gif
    from net2net import ops

    cfg = _cfg(cfg)
    module = load_model(cfg)
    names = module.dataset_names
    source = cfg.get("source")
    images = cfg.get("images")
    n = _count(cfg, "num_images", 8)
    bs = _count(cfg, "batch_size", 64)
    mode = str(cfg.get("mode", "latent"))
    if mode not in ops.MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(ops.MODES)}")
    alphas = cfg.get("alphas")
    if alphas is not None:
        alphas = [float(a) for a in _names(alphas)]
        if not alphas:
            raise ValueError("alphas=[] is empty: give the path's points, e.g. alphas=[0,0.5,1], or leave it out")
    if images is not None:
        if isinstance(images, str):
            images = [images]
        if len(images) == 0:
            raise ValueError("images=[] is empty: give image files, or leave images out for held-out ones")
        if source is None:
            raise ValueError(f"say which dataset your images are from: source=<one of {', '.join(names)}>")
        x = _user_images(list(images), module.image_size, _channels(module))
        src = module.labels_tensor(source, x.shape[0])
    else:
        sources = [source] if source is not None else list(names)
        parts = [held_out(module, str(s), n, str(cfg.get("split", "val")), int(cfg.get("seed", 0))) for s in sources]
        x = torch.cat(parts)
        src = torch.cat([module.labels_tensor(s, len(p)) for s, p in zip(sources, parts, strict=True)])
    targets = cfg.get("targets")
    tgt = list(range(len(names))) if targets is None else [module.dataset_index(t) for t in _names(targets)]
    if not tgt:
        raise ValueError("targets=[] is empty: name datasets to project onto, or leave targets out for all")
    rec, proj = _projection_rows(module, x, src, bs)
    proj = proj[:, tgt]
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    _grid(torch.cat([x[:, None], rec[:, None], proj], dim=1), out_dir / "translate.png")
    _write_npz(
        out_dir,
        "projections.npz",
        inputs=_u8(x),
        projections=_u8(proj),
        sources=src.numpy(),
        targets=np.asarray(tgt),
        names=np.asarray(names),
    )
    if alphas is not None:
        t = module.one_hot([tgt[0]])
        paths = []
        for i in range(0, x.shape[0], bs):
            xb = x[i : i + bs].to(module.device)
            z = module.encode(xb)
            zs = ops.interpolate(module.flow, z, module.one_hot(src[i : i + bs]), t, alphas, mode=mode)
            paths.append(module.decode(zs.flatten(0, 1)).reshape(xb.shape[0], len(alphas), *xb.shape[1:]).cpu())
        path = torch.cat(paths)  # (B, A, C, H, W)
        _grid(path, out_dir / "interpolation.png")
        frames = torch.cat([path, path.flip(1)], dim=1)  # there and back
        save_gif(frames.permute(0, 2, 1, 3, 4)[:16], out_dir / "interpolation.gif", fps=6.0, scale=3)
    log.info(
        "projected %d image(s) onto %s -> %s (one row per image: input, reconstruction, each target)",
        x.shape[0],
        ", ".join(names[j] for j in tgt),
        out_dir,
    )
    return out_dir


# ------------------------------------------------------------------------------------------------ bias report


def _classifier(module: Any, per_dataset: int, seed: int) -> Any:
    from net2net.bias import DatasetClassifier

    xs, ys = [], []
    for i, name in enumerate(module.dataset_names):
        x = held_out(module, name, per_dataset, "train", seed)
        xs.append(x)
        ys.append(torch.full((len(x),), i))
    return DatasetClassifier(module.dataset_names, seed=seed).fit(torch.cat(xs), torch.cat(ys))


def _report_markdown(report: dict[str, Any]) -> str:
    from net2net.bias import ATTRIBUTES

    lines = ["| source -> target | n | " + " | ".join(ATTRIBUTES) + " | recognised as target |", "|---|" + "---|" * 6]
    for p in report["pairs"]:
        cells = []
        for a in ATTRIBUTES:
            shift = p["shift"][a]
            cells.append(f"{p['attributes'][a]:.3f}" + (f" ({shift:+.2f})" if shift is not None else ""))
        rec = p.get("recognised_as_target")
        rec_s = f"{rec:.2f}" if rec is not None else "-"
        lines.append(f"| {p['source']} -> {p['target']} | {p['n']} | " + " | ".join(cells) + f" | {rec_s} |")
    lines += ["", "| real dataset | " + " | ".join(ATTRIBUTES) + " |", "|---|" + "---|" * 4]
    for name, s in report["real"].items():
        lines.append(f"| {name} | " + " | ".join(f"{s[a]:.3f}" for a in ATTRIBUTES) + " |")
    lines.append("")
    lines.append(
        "(shift) = (projection − source) / (target − source) of the real datasets' means: 1 = the target's value."
    )
    return "\n".join(lines) + "\n"


@torch.no_grad()
def bias_report(cfg: Any) -> Path:
    """``net2net-bias-report``: ``num_images`` held-out images of each dataset projected onto every dataset; their
    attributes (brightness, contrast, ink, centre mass, the Fashion-MNIST classifier's classes, the dataset a
    classifier fitted on real training images assigns) against the real datasets' -> ``report.json``,
    ``report.md`` (the table), ``bias.png`` (the plots) and ``projection_grid.png`` (rows: inputs; columns: input and
    its projection onto each dataset)."""
    from net2net.bias import bias_table, plot_report

    cfg = _cfg(cfg)
    module = load_model(cfg)
    names = module.dataset_names
    n = _count(cfg, "num_images", 200)
    bs = _count(cfg, "batch_size", 64)
    seed = int(cfg.get("seed", 0))
    split = str(cfg.get("split", "val"))
    real = {i: held_out(module, name, n, split, seed) for i, name in enumerate(names)}
    projected: dict[tuple[int, int], Tensor] = {}
    rows = []
    for s, x in real.items():
        _, proj = _projection_rows(module, x, module.labels_tensor(s, len(x)), bs)
        for t in range(len(names)):
            projected[(s, t)] = proj[:, t]
        rows.append(torch.cat([x[:4, None], proj[:4]], dim=1))
    clf = _classifier(module, _count(cfg, "classifier_images", 1000), seed)
    report = bias_table(names, real, projected, classifier=clf)
    report["classifier_train_accuracy"] = clf.train_accuracy
    report["real_recognised"] = {names[i]: clf.accuracy(x, torch.full((len(x),), i)) for i, x in real.items()}
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with io.atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(_report_markdown(report))
    plot_report(report, out_dir / "bias.png")
    _grid(torch.cat(rows), out_dir / "projection_grid.png")
    counts = ", ".join(f"{names[i]} {len(x)}" for i, x in real.items())
    log.info("bias report of held-out images (%s) -> %s (report.md, bias.png, projection_grid.png)", counts, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------------- evaluate


@torch.no_grad()
def _bits_per_dim(module: Any, x: Tensor, label: int, bs: int, seed: int) -> tuple[Tensor, Tensor]:
    """(bits/dim under the true label (N,), bits/dim under every label (N, K)) of posterior samples of ``x``."""
    from net2net.models.flow import bits_per_dim

    g = torch.Generator(device=module.device).manual_seed(seed)
    k = len(module.dataset_names)
    per_label = []
    for i in range(0, x.shape[0], bs):
        z = module.encode(x[i : i + bs].to(module.device), sample=module.sample_posterior, generator=g)
        cols = []
        for j in range(k):
            v, logdet = module.flow(z, module.one_hot([j]).expand(z.shape[0], -1))
            cols.append(bits_per_dim(v, logdet).cpu())
        per_label.append(torch.stack(cols, dim=1))
    all_labels = torch.cat(per_label)
    return all_labels[:, label], all_labels


@torch.no_grad()
def evaluate(cfg: Any) -> dict[str, float]:
    """``net2net-eval`` -> ``metrics.json``: for the union autoencoder (a first stage), reconstruction PSNR per
    dataset; for a cINN, per dataset the cINN's bits per latent dimension on held-out images
    (``num_images`` each) and how often the likelihood picks the right dataset (argmax_y p(z | y)); the autoencoder's
    reconstruction PSNR; ``num_samples`` samples (spread over the datasets) and the projections of the held-out images
    onto every dataset, each scored by a dataset classifier fitted on real training images (share recognised as the
    dataset they were made for); the round trip error T⁻¹(T(z | y) | y) − z. Also ``samples.png`` and
    ``projections.png``."""
    from gencore.metrics import psnr

    cfg = _cfg(cfg)
    module = load_model(cfg, first_stage_ok=True)
    if not hasattr(module, "flow"):
        return _evaluate_autoencoder(cfg, module)
    names = module.dataset_names
    k = len(names)
    n_img = _count(cfg, "num_images", 200)
    n_samples = _count(cfg, "num_samples", 60)
    bs = _count(cfg, "batch_size", 64)
    seed = int(cfg.get("seed", 0))
    clf = _classifier(module, _count(cfg, "classifier_images", 1000), seed)
    metrics: dict[str, Any] = {"classifier/train_accuracy": clf.train_accuracy}
    grid_rows = []
    sample_rows = []
    torch.manual_seed(seed)
    for i, name in enumerate(names):
        per = n_samples * (i + 1) // k - n_samples * i // k  # num_samples spread over the datasets
        x = held_out(module, name, n_img, str(cfg.get("split", "val")), seed)
        bpd, all_bpd = _bits_per_dim(module, x, i, bs, seed)
        metrics[f"bits_per_dim/{name}"] = float(bpd.mean())
        metrics[f"likelihood_picks_dataset/{name}"] = float((all_bpd.argmin(1) == i).double().mean())
        rec, proj = _projection_rows(module, x, module.labels_tensor(i, len(x)), bs)
        metrics[f"recon_psnr/{name}"] = float(psnr(rec, x).mean())
        metrics[f"real_recognised/{name}"] = clf.accuracy(x, torch.full((len(x),), i))
        for j, tgt in enumerate(names):
            metrics[f"projection_recognised/{name}->{tgt}"] = clf.accuracy(proj[:, j], torch.full((len(x),), j))
        z = module.encode(x[:bs].to(module.device))
        c = module.one_hot([i]).expand(z.shape[0], -1)
        metrics[f"round_trip_max_abs/{name}"] = float((module.flow.reverse(module.flow(z, c)[0], c) - z).abs().max())
        grid_rows.append(torch.cat([x[:4, None], rec[:4, None], proj[:4]], dim=1))
        if per > 0:
            counts = [min(bs, per - s) for s in range(0, per, bs)]
            samples = torch.cat([module.generate(c, labels=[i] * c)["images"].cpu() for c in counts])
            metrics[f"sample_recognised/{name}"] = clf.accuracy(samples, torch.full((len(samples),), i))
            sample_rows.append(samples[:8])
    metrics["bits_per_dim/mean"] = float(np.mean([metrics[f"bits_per_dim/{n}"] for n in names]))
    recognised = [metrics[f"sample_recognised/{n}"] for n in names if f"sample_recognised/{n}" in metrics]
    metrics["sample_recognised/mean"] = float(np.mean(recognised)) if recognised else float("nan")
    off = [metrics[f"projection_recognised/{a}->{b}"] for a in names for b in names if a != b]
    metrics["projection_recognised/mean_other"] = float(np.mean(off)) if off else float("nan")
    metrics["num_images_per_dataset"] = n_img
    metrics["num_samples"] = n_samples
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    _grid(torch.cat(grid_rows), out_dir / "projections.png")
    from gencore.viz import save_grid

    if sample_rows:
        width = min(len(r) for r in sample_rows)
        save_grid(torch.cat([r[:width] for r in sample_rows]), out_dir / "samples.png", nrow=width)
    run.write_metrics(metrics, out_dir)
    return metrics


@torch.no_grad()
def _evaluate_autoencoder(cfg: DictConfig, module: Any) -> dict[str, float]:
    """``net2net-eval`` of the union autoencoder: reconstruction PSNR of ``num_images`` held-out images of each member
    of ``members`` (default: all) -> ``metrics.json`` and ``reconstructions.png`` (rows: inputs, reconstructions)."""
    from gencore.metrics import psnr
    from gencore.viz import save_grid
    from net2net.data import MEMBERS, load_member

    ae = module.model
    size = int(cfg.get("image_size") or getattr(ae.encoder, "resolution", 32))
    channels = int(ae.encoder.in_channels)
    n = _count(cfg, "num_images", 200)
    bs = _count(cfg, "batch_size", 64)
    metrics: dict[str, Any] = {"num_images_per_dataset": n}
    rows = []
    for name in cfg.get("members") or MEMBERS:
        x, _ = load_member(str(name), str(cfg.get("split", "val")), image_size=size, channels=channels)
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(int(cfg.get("seed", 0))))[:n]]
        rec = _batched(lambda b: module.log_images({"image": b.to(module.device)}, len(b))["reconstructions"], x, bs)
        rec = rec.clamp(-1, 1).cpu()
        metrics[f"recon_psnr/{name}"] = float(psnr(rec, x).mean())
        rows += [x[:8], rec[:8]]
    out_dir = Path(str(cfg.out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    width = min(len(r) for r in rows)
    save_grid(torch.cat([r[:width] for r in rows]), out_dir / "reconstructions.png", nrow=width)
    run.write_metrics(metrics, out_dir)
    return metrics
