"""The shapebias console tasks beyond training (Islam et al., "Shape or Texture", ICLR 2021):

- ``shapebias-data``: write cue-conflict images with the official file naming (silhouettes filled with real textures
  offline, or AdaIN stylisation with the pytorch-AdaIN weights) and a preview of shape and texture pairs;
- ``shapebias-dims``: the shape / texture / residual dimensions of every stage of a network (a shapebias run, or a
  torchvision / timm encoder by name with local weights);
- ``shapebias-dynamics``: the same estimate for every per-epoch snapshot of a shapebias run;
- ``shapebias-readout``: per-pixel readouts (PosENet) trained on frozen features of each stage, for binary shape
  masks and for semantic masks; mIoU per stage;
- ``shapebias-sample`` / ``shapebias-eval``: the package's side of genlab's command contract (held-out stimuli with
  the network's answers; accuracy, shape bias and dimensions -> metrics.json).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from gencore import io, run
from gencore.progress import Progress

__all__ = ["data", "dims", "dynamics", "evaluate", "load_network", "readout", "sample"]

log = logging.getLogger(__name__)


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _write_json(obj: Any, path: Path) -> Path:
    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))
    return path


# --------------------------------------------------------------------------------------------------- networks


class Network:
    """What the analyses read: a feature extractor, where it came from, and the cue-conflict settings of the network
    (those it was trained on, for a shapebias run) that the default pairs follow."""

    def __init__(self, extractor: Any, name: str, data: Mapping[str, Any], module: Any = None) -> None:
        self.extractor, self.name, self.data, self.module = extractor, name, dict(data), module


def load_network(cfg: DictConfig, device: torch.device) -> Network:
    """``cfg.checkpoint`` (a shapebias run, export or ``pkg://`` checkpoint: its network, its stages, its inputs in
    [-1, 1]) or ``cfg.encoder`` (a torchvision / timm name, ``small_resnet``; ``cfg.weights``: a local weights file,
    ``cfg.preprocess``: imagenet | official | none, ``cfg.image_size``: resize inputs)."""
    checkpoint, encoder = cfg.get("checkpoint"), cfg.get("encoder")
    if (checkpoint is None) == (encoder is None):
        raise ValueError(
            "give exactly one of checkpoint=<a shapebias run, export or pkg:// checkpoint> and encoder=<a torchvision "
            f"or timm name, e.g. resnet50 weights=/path/resnet50.pth>; got checkpoint={checkpoint!r}, "
            f"encoder={encoder!r}"
        )
    if checkpoint is not None:
        from shapebias.lit import ShapeClassifier

        module = run.load_for_sampling(cfg, device)
        if not isinstance(module, ShapeClassifier):
            raise ValueError(f"{checkpoint} holds a {type(module).__name__}, not a shapebias ShapeClassifier")
        fx = module.extractor()
        return Network(fx.to(device).eval(), str(checkpoint), module.data, module)
    from shapebias.encoders import build_encoder

    fx = build_encoder(
        str(encoder),
        weights=cfg.get("weights"),
        preprocess=cfg.get("preprocess") or "imagenet",
        image_size=cfg.get("image_size"),
    )
    return Network(fx.to(device).eval(), str(encoder), {})


def _stages(net: Network, wanted: Any) -> list[str]:
    """The requested stages (all when None) in the network's order; an unknown one is a ValueError naming it."""
    return net.extractor.select(_plain(wanted))


# ------------------------------------------------------------------------------------------------------ pairs


def pairs_settings(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.pairs`` as a plain dict; ``pairs=folder`` without ``pairs.folder`` is a one-line error."""
    node = cfg.get("pairs")
    if node is None:
        return {}
    if OmegaConf.is_missing(node, "folder"):
        raise ValueError("pairs.folder: required with pairs=folder (a folder of <texIdx>_<cls>_<imgid>.jpg images)")
    return dict(_plain(node))


def stimuli(pairs_cfg: Mapping[str, Any], defaults: Mapping[str, Any], split: str = "test") -> Any:
    """The stylised images pairs are drawn from: a folder in the official naming (``folder``; read at
    ``pairs.image_size``, else the network's input size, else 64), or cue-conflict silhouettes of ``split``
    (settings from ``pairs_cfg``, else the network's own ``defaults``)."""
    from shapebias.data import CueConflict, StylizedFolder

    p = dict(pairs_cfg)
    if p.get("folder"):
        size = int(p.get("image_size") or defaults.get("image_size") or 64)
        folder = StylizedFolder(p["folder"], image_size=size)
        skipped = f"; {folder.num_skipped} unreadable files skipped" if folder.num_skipped else ""
        log.info("%s: %d stylised images, read at %dx%d%s", p["folder"], len(folder), size, size, skipped)
        return folder

    def pick(key: str, fallback: Any) -> Any:
        return p[key] if p.get(key) is not None else defaults.get(key, fallback)

    return CueConflict(
        split=split,
        num_contents=int(p.get("num_contents") or 200),
        textures=pick("textures", None),
        image_size=int(pick("image_size", 64)),
        background=pick("background", "gray"),
        pairing="all",
        seed=int(pick("seed", 0)),
    )


def _defaults(net: Network, cfg: DictConfig) -> dict[str, Any]:
    """The settings pairs fall back to: the network's training data (a shapebias run), else for a folder read by an
    encoder given by name, the encoder's ``image_size`` (the paper reads SVOC at 513)."""
    if net.data or cfg.get("image_size") is None:
        return net.data
    size = cfg.image_size
    return {"image_size": int(size if isinstance(size, int) else _plain(size)[0])}


def pair_loader(
    dataset: Any, *, num_pairs: int | None, sampling: str, batch_size: int, seed: int, num_workers: int = 0
) -> DataLoader:
    """Factor pairs over ``dataset`` (uniform factor, or the released loader's skew), one pass with every image as
    example 1, or a seeded subset of ``num_pairs`` of them."""
    from shapebias.data import FactorPairs

    pairs: Any = FactorPairs(dataset, seed=seed, sampling=sampling)
    if num_pairs is not None and num_pairs > len(pairs):
        log.info("num_pairs=%d but %d images: one pass, every image as example 1 once", num_pairs, len(pairs))
    if num_pairs is not None and num_pairs < len(pairs):
        pick = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:num_pairs]
        pairs = Subset(pairs, pick.sort().values.tolist())
    return DataLoader(pairs, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _estimate(net: Network, loader: DataLoader, stages: Sequence[str], device: torch.device, what: str) -> dict:
    from shapebias.dims import collect_pair_features, estimate_stages

    progress = Progress(what, len(loader), unit="batch")
    feats = collect_pair_features(net.extractor, loader, stages, device=device, progress=progress.update)
    return estimate_stages(feats, stages)


def _dims_table(estimates: Mapping[str, Any]) -> str:
    rows = [f"{'stage':>8} {'dim':>6} {'shape':>14} {'texture':>14} {'residual':>14}"]
    for s, e in estimates.items():
        cells = [f"{e.dims[k]:>5} ({e.percent[k]:>4.1f}%)" for k in range(3)]
        rows.append(f"{s:>8} {e.dim:>6} " + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(rows)


def _write_dims(estimates: Mapping[str, Any], out: Path, title: str, about: Mapping[str, Any]) -> dict[str, Any]:
    """dims.json (``about``: what was measured; then ``stages``), dims.csv (the official two rows per stage),
    dims.png."""
    from shapebias.plots import plot_dims

    stages = {s: e.as_dict() for s, e in estimates.items()}
    result = {**about, "stages": stages}
    out.mkdir(parents=True, exist_ok=True)
    _write_json(result, out / "dims.json")
    with io.atomic_path(out / "dims.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")  # per stage, the official script's rows: neurons, then %
        for s, e in estimates.items():
            writer.writerow([s, *e.dims])
            writer.writerow([s, *e.percent])
    plot_dims({s: r["percent"] for s, r in stages.items()}, out / "dims.png", title=title)
    return result


def _about(net: Network, cfg: DictConfig, loader: DataLoader) -> dict[str, Any]:
    """What a dims result was measured on: the network and its weights, the inputs, the pairs."""
    pairs = pairs_settings(cfg)
    return {
        "network": net.name,
        "weights": cfg.get("weights") if cfg.get("encoder") is not None else str(cfg.get("checkpoint")),
        "random_init": cfg.get("encoder") is not None and cfg.get("weights") is None,
        "preprocess": cfg.get("preprocess") or ("imagenet" if cfg.get("encoder") is not None else "none"),
        "image_size": _plain(cfg.get("image_size")),
        "pairs": len(loader.dataset),
        "pair_sampling": str(cfg.get("pair_sampling", "uniform")),
        "source": pairs.get("folder") or "cue_conflict",
    }


def _network_and_pairs(cfg: DictConfig, device: torch.device) -> tuple[Network, list[str], DataLoader]:
    """The network of a dims / dynamics config, its requested stages, and the loader of its factor pairs."""
    net = load_network(cfg, device)
    stages = _stages(net, cfg.get("stages"))
    loader = pair_loader(
        stimuli(pairs_settings(cfg), _defaults(net, cfg)),
        num_pairs=cfg.get("num_pairs"),
        sampling=str(cfg.get("pair_sampling", "uniform")),
        batch_size=int(cfg.get("batch_size", 32)),
        seed=int(cfg.get("seed", 0)),
        num_workers=int(cfg.get("num_workers", 0)),
    )
    return net, stages, loader


def dims(cfg: Any) -> dict[str, Any]:
    """``shapebias-dims``: shape / texture / residual dimensions of every requested stage -> dims.json, dims.csv
    (the official two rows per stage: neurons, %), dims.png."""
    cfg = _cfg(cfg)
    run.check_sample_config(cfg, ("num_pairs",))
    device = run.task_device(cfg)
    net, stages, loader = _network_and_pairs(cfg, device)
    estimates = _estimate(net, loader, stages, device, f"features of {len(loader.dataset)} pairs")
    out = Path(str(cfg.out_dir))
    result = _write_dims(estimates, out, f"{net.name}: dimensions per stage", _about(net, cfg, loader))
    log.info("dimensions per stage of %s:\n%s", net.name, _dims_table(estimates))
    log.info("wrote %s", out / "dims.json")
    return result


# --------------------------------------------------------------------------------------------------- dynamics


def dynamics(cfg: Any) -> dict[str, Any]:
    """``shapebias-dynamics``: the dimension estimate of every per-epoch snapshot of a shapebias run (epoch 0 = the
    initialisation) on the same pairs -> dynamics.json, dynamics.png."""
    from shapebias.lit import list_snapshots
    from shapebias.plots import plot_dynamics

    cfg = _cfg(cfg)
    run.check_sample_config(cfg, ("num_pairs",))
    folder = io.resolve_path(str(cfg.checkpoint))
    snaps = list_snapshots(folder)
    if not snaps:
        raise FileNotFoundError(
            f"{folder}: no per-epoch snapshots (epochs/epoch_*.safetensors); train with shapebias-train (the "
            "snapshots are on by default: module.snapshot_every_n_epochs) and pass the run folder"
        )
    device = run.task_device(cfg)
    net, stages, loader = _network_and_pairs(cfg, device)
    per_epoch: dict[float, dict[str, Any]] = {}
    for epoch, path in snaps:
        state, source = io.read_state_dict(path)
        io.load_state_dict(net.module.net, state, source=source)  # (in place: the frozen extractor's device and mode)
        estimates = _estimate(net, loader, stages, device, f"epoch {epoch:g}")
        per_epoch[epoch] = {s: e.as_dict() for s, e in estimates.items()}
        log.info("epoch %g:\n%s", epoch, _dims_table(estimates))
    epochs = sorted(per_epoch)
    percent = {s: [per_epoch[k][s]["percent"] for k in epochs] for s in stages}
    reached = {s: shape_gain_reached(epochs, [p["shape"] for p in percent[s]]) for s in stages}
    result = {
        "epochs": epochs,
        "stages": stages,
        "per_epoch": {f"{k:g}": v for k, v in per_epoch.items()},
        "shape_gain_reached": reached,
    }
    out = Path(str(cfg.out_dir))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(result, out / "dynamics.json")
    plot_dynamics(epochs, percent, out / "dynamics.png", title=f"{net.name}: dimensions over training")
    for s in stages:
        r = reached[s]
        start, end = percent[s][0]["shape"], percent[s][-1]["shape"]
        when = (
            f"half of that change by epoch {r['half']:g}, 90% by epoch {r['ninety']:g}"
            if r["half"] is not None
            else "no change"
        )
        log.info("stage %s: shape %.1f%% at the first snapshot -> %.1f%% at the last; %s", s, start, end, when)
    log.info("wrote %s", out / "dynamics.json")
    return result


def shape_gain_reached(epochs: Sequence[float], shape: Sequence[float]) -> dict[str, Any]:
    """The first epochs by which the shape share has made half and 90% of its change from the first snapshot to the
    last (None when it has not changed), and the share of that change made at each epoch."""
    start, end = float(shape[0]), float(shape[-1])
    change = end - start
    if abs(change) < 1e-9:
        return {"half": None, "ninety": None, "fraction": [None for _ in epochs]}
    fraction = [(float(v) - start) / change for v in shape]

    def first(level: float) -> float | None:
        return next((float(e) for e, f in zip(epochs, fraction, strict=True) if f >= level), None)

    return {"half": first(0.5), "ninety": first(0.9), "fraction": fraction}


# ---------------------------------------------------------------------------------------------------- readout


def split_by_content(dataset: Any, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(train, held out): a seeded ``fraction`` of the dataset's contents, with every texture of each, held out."""
    if not hasattr(dataset, "__getitem__") or "mask" not in dataset[0]:
        raise ValueError("the readout needs masks: a stylised folder with a masks/ folder beside the images")
    contents = np.unique(dataset.contents)
    if len(contents) < 2:
        raise ValueError(f"the readout needs at least 2 contents to hold one out, got {len(contents)}")
    rng = np.random.default_rng(seed)
    held = set(rng.permutation(contents)[: max(1, round(fraction * len(contents)))].tolist())
    is_held = np.array([c in held for c in dataset.contents])
    return Subset(dataset, np.flatnonzero(~is_held).tolist()), Subset(dataset, np.flatnonzero(is_held).tolist())


@contextlib.contextmanager
def _lightning_info_off() -> Any:
    """Lightning's per-fit info lines (devices, "max_steps reached") off while the readouts' short fits run: the
    task's own progress lines say where it is."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def readout(cfg: Any) -> dict[str, Any]:
    """``shapebias-readout``: for each stage and each task (binary shape masks, semantic masks), a PosENet readout
    trained on the frozen network's features of held-in cue-conflict images, scored on held-out ones (mIoU) ->
    readout.json, readout.png."""
    import lightning as L

    from shapebias.plots import plot_readout
    from shapebias.readout import ReadoutModule, StageReadout

    cfg = _cfg(cfg)
    run.check_sample_config(cfg, ("steps", "train_contents", "val_contents"))
    tasks = [str(t) for t in ([cfg.tasks] if isinstance(cfg.tasks, str) else _plain(cfg.tasks))]
    for t in tasks:
        if t not in ("binary", "semantic"):
            raise ValueError(f"tasks: unknown readout task {t!r}; known: binary, semantic")
    run.quiet_lightning()
    device = run.task_device(cfg)
    net = load_network(cfg, device)
    stages = _stages(net, cfg.get("stages"))
    pairs_cfg = pairs_settings(cfg)
    defaults = _defaults(net, cfg)
    if pairs_cfg.get("folder"):  # one folder: a fifth of its contents (all their textures) held out for scoring
        train_set, val_set = split_by_content(stimuli(pairs_cfg, defaults), 0.2, int(cfg.get("seed", 0)))
    else:
        train_set = stimuli({**pairs_cfg, "num_contents": int(cfg.train_contents)}, defaults, split="train")
        val_set = stimuli({**pairs_cfg, "num_contents": int(cfg.val_contents)}, defaults, split="test")
    num_classes = int(getattr(train_set, "num_classes", None) or train_set.dataset.num_classes)
    bs = int(cfg.batch_size)
    steps = int(cfg.steps)
    head = _plain(cfg.get("head") or {})
    results: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    progress = Progress("readouts", len(tasks) * len(stages), unit="readout")
    done = 0
    for task in tasks:
        for stage in stages:
            torch.manual_seed(int(cfg.get("seed", 0)))
            model = StageReadout(
                net.extractor,
                stage,
                2 if task == "binary" else num_classes + 1,
                hidden=tuple(head.get("hidden", (256, 128))),
                layers=int(head.get("layers", 3)),
                freeze_bn=bool(cfg.get("freeze_bn", True)),
                fuse=str(cfg.get("fuse", "single")),
                bias=task == "binary",  # (the official semantic head has no conv biases before its last layer)
            )
            module = ReadoutModule(model, task=task, lr=float(cfg.lr), max_steps=steps)
            trainer = L.Trainer(
                accelerator="gpu" if device.type == "cuda" else "cpu",
                devices=1,
                max_steps=steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                limit_val_batches=0,
            )
            loader = DataLoader(
                train_set,
                batch_size=bs,
                shuffle=True,
                drop_last=len(train_set) >= bs,
                generator=torch.Generator().manual_seed(int(cfg.get("seed", 0))),
                num_workers=int(cfg.get("num_workers", 0)),
            )
            with warnings.catch_warnings(), _lightning_info_off():
                for message in (*run.EXPECTED_LIGHTNING_WARNINGS, "You defined a `validation_step` but have no"):
                    warnings.filterwarnings("ignore", message=message)
                trainer.fit(module, train_dataloaders=loader)
            scores = module.to(device).evaluate_miou(DataLoader(val_set, batch_size=bs, shuffle=False))
            results[task][stage] = scores
            done += 1
            progress.update(done, f"{task} stage {stage}: mIoU {100 * scores['miou']:.1f}")
    miou = {t: {s: float(r["miou"]) for s, r in per.items()} for t, per in results.items()}
    out = Path(str(cfg.out_dir))
    out.mkdir(parents=True, exist_ok=True)
    result = {"network": net.name, "stages": stages, "miou": miou, "details": results}
    _write_json(result, out / "readout.json")
    plot_readout(miou, out / "readout.png", title=f"{net.name}: per-pixel readout")
    lines = [f"{'stage':>6} " + " ".join(f"{t:>9}" for t in tasks)]
    lines += [f"{s:>6} " + " ".join(f"{100 * miou[t][s]:>8.1f}%" for t in tasks) for s in stages]
    log.info("readout mIoU of %s:\n%s", net.name, "\n".join(lines))
    return result


# ------------------------------------------------------------------------------------------------------- data


def data(cfg: Any) -> dict[str, Any]:
    """``shapebias-data``: cue-conflict images written as ``<texture>_<class>_<content>.<ext>`` (the official naming;
    ``shapebias.data.StylizedFolder`` reads them back), masks, index.json, and preview.png (rows of shape pairs and
    texture pairs)."""
    from shapebias.data import CueConflict, FactorPairs, write_dataset

    cfg = _cfg(cfg)
    run.check_sample_config(cfg, ("num_contents", "image_size", "preview"))
    method = str(cfg.get("method", "silhouette"))
    out = Path(str(cfg.out_dir))
    ds = CueConflict(
        split=str(cfg.split),
        num_contents=int(cfg.num_contents),
        textures=_plain(cfg.get("textures")),
        image_size=int(cfg.image_size),
        background=str(cfg.get("background", "gray")),
        pairing=str(cfg.get("pairing", "all")),
        seed=int(cfg.get("seed", 0)),
    )
    if method == "silhouette":
        write_dataset(ds, out, ext=str(cfg.get("ext", "png")))
    elif method == "adain":
        from shapebias.adain import stylize_dataset

        a = cfg.adain
        stylize_dataset(
            ds,
            out,
            vgg=a.vgg,
            decoder=a.decoder,
            alpha=float(a.get("alpha", 1.0)),
            style_size=int(a.get("style_size", 512)),
            device=run.pick_device(cfg.get("device", "auto")),
            ext=str(cfg.get("ext", "png")),
        )
    else:
        raise ValueError(f"method: unknown method {method!r}; known: silhouette (offline), adain (needs weights)")
    from gencore.viz import save_grid
    from shapebias.data import StylizedFolder

    written = StylizedFolder(out, image_size=int(cfg.image_size))
    pairs = FactorPairs(written, seed=int(cfg.get("seed", 0)))
    n = min(int(cfg.preview), len(pairs))
    shape_rows, texture_rows = [], []
    for i in range(len(pairs)):
        item = pairs[i]
        rows = shape_rows if item["factor"] == 0 else texture_rows
        if len(rows) < n:
            rows.append(torch.stack([item["example1"], item["example2"]]))
        if len(shape_rows) >= n and len(texture_rows) >= n:
            break
    grid = [torch.stack([p[k] for p in rows]) for rows in (shape_rows, texture_rows) for k in (0, 1) if rows]
    save_grid(torch.cat(grid), out / "preview.png", nrow=n)
    info = {"folder": str(out), "images": len(written), "method": method}
    log.info("wrote %d cue-conflict images to %s (preview.png: shape pairs, then texture pairs)", len(written), out)
    return info


# --------------------------------------------------------------------------------------------- sample / eval


def sample(cfg: Any) -> Path:
    """``shapebias-sample``: held-out cue-conflict stimuli with the network's answers (gencore's sample task)."""
    return run.sample(cfg)


def _classifier(cfg: DictConfig) -> Any:
    from shapebias.lit import ShapeClassifier

    run.check_sample_config(cfg, ("num_images",))
    module = run.load_for_sampling(cfg, run.task_device(cfg))
    if not isinstance(module, ShapeClassifier):
        raise ValueError(f"{cfg.checkpoint} holds a {type(module).__name__}, not a shapebias ShapeClassifier")
    return module


@torch.no_grad()
def decisions(module: Any, dataset: Any, indices: Sequence[int], batch_size: int) -> dict[str, float]:
    """Accuracy on the shape class, and the shape bias (Geirhos et al.): among stimuli whose texture belongs to
    another class (class c's own texture is c mod T, as in ``pairing=class_texture``), the share of decisions for
    the shape among decisions for the shape or for the texture's class."""
    device = module.device
    num_textures, num_classes = dataset.num_textures, dataset.num_classes
    correct = shape = texture = 0
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        x = torch.stack([it["image"] for it in items]).to(device)
        pred = module.net(x).argmax(1).cpu().tolist()
        for it, p in zip(items, pred, strict=True):
            correct += int(p == it["label"])
            owners = {c for c in range(num_classes) if c % num_textures == it["texture"]}
            if it["label"] in owners:
                continue  # no conflict: the texture is the shape's own
            shape += int(p == it["label"])
            texture += int(p in owners)
    return {
        "accuracy": correct / max(1, len(indices)),
        "shape_bias": shape / (shape + texture) if shape + texture else float("nan"),
        "texture_decisions": texture / max(1, len(indices)),
    }


def evaluate(cfg: Any) -> dict[str, Any]:
    """``shapebias-eval``: shape accuracy and shape bias on held-out stimuli, and every stage's dimensions from
    ``num_samples`` factor pairs -> metrics.json (flat: ``accuracy``, ``shape_bias``, ``dims/<stage>/<factor>`` in %),
    dims.json, dims.png."""
    cfg = _cfg(cfg)
    module = _classifier(cfg)
    ds = module.stimuli("test")
    seed, bs = int(cfg.get("seed", 0)), int(cfg.get("batch_size", 64))
    g = torch.Generator().manual_seed(seed)
    n_images = min(int(cfg.get("num_images") or 1000), len(ds))
    picked = torch.randperm(len(ds), generator=g)[:n_images].sort().values.tolist()
    metrics: dict[str, Any] = decisions(module, ds, picked, bs)
    net = Network(module.extractor().eval(), str(cfg.checkpoint), module.data, module)
    loader = pair_loader(ds, num_pairs=int(cfg.num_samples), sampling="uniform", batch_size=bs, seed=seed)
    estimates = _estimate(net, loader, list(net.extractor.stage_names), module.device, "dimension estimate")
    out = Path(str(cfg.out_dir))
    about = {"network": str(cfg.checkpoint), "pairs": len(loader.dataset), "source": "cue_conflict"}
    _write_dims(estimates, out, f"{cfg.checkpoint}: dimensions per stage", about)
    for s, e in estimates.items():
        for k, name in enumerate(e.names):
            metrics[f"dims/{s}/{name}"] = e.percent[k]
    run.write_metrics(metrics, out)
    log.info("dimensions per stage:\n%s", _dims_table(estimates))
    return metrics
