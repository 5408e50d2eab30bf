"""The ``gen1-train``, ``gen1-sample``, ``gen1-eval`` and ``gen1-edit`` tasks (Hydra configs in gen1_video/configs).

- ``train``: :func:`gencore.run.train`, after filling ``first_stage`` from ``init_from`` (the image LDM's own
  autoencoder) when only ``init_from`` is given;
- ``sample``: source clips of real videos re-rendered with another clip's content -> grid.png, samples.npz, mp4s;
- ``evaluate``: frame and content consistency over a grid of ω_t and t_s, and of the frame-by-frame image model ->
  metrics.json;
- ``edit``: one input video, content from an image (or a prompt, with a CLIP content encoder) -> edited.mp4,
  input.mp4, strip.png.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gencore import run

log = logging.getLogger(__name__)

__all__ = ["edit", "evaluate", "image_ldm_first_stage", "load_model", "metric_encoder", "sample", "train"]


def _cfg(cfg: Any) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


# ---------------------------------------------------------------------------------------------------------- train


def image_ldm_first_stage(path: str) -> str:
    """The first stage an image LDM (ldm-train run folder, export or ``pkg://``) was trained over: the ``path`` of
    the ``module.first_stage`` node of its saved config."""
    from gencore.io import resolve_path

    folder = resolve_path(path)
    configs = [folder / "config.yaml", folder / "export" / "config.yaml"] if folder.is_dir() else []
    found = next((c for c in configs if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"init_from={path}: no image LDM config.yaml in {folder} or {folder / 'export'}")
    node = OmegaConf.load(found).get("module", {}).get("first_stage")
    first = node.get("path") if isinstance(node, DictConfig) else None
    if not first:
        raise ValueError(
            f"init_from={path}: {found} names no first stage path (a pixel-space model?); pass first_stage= yourself"
        )
    if not str(first).startswith("pkg://") and not Path(str(first)).exists():
        raise FileNotFoundError(
            f"init_from={path}: its first stage {first} does not exist here; pass first_stage=<that autoencoder>"
        )
    return str(first)


def train(cfg: Any) -> Any:
    """``gen1-train``: :func:`gencore.run.train`; with ``init_from`` and no ``first_stage``, the image LDM's."""
    cfg = _cfg(cfg)
    if cfg.get("init_from") and cfg.get("first_stage") is None:
        cfg.first_stage = image_ldm_first_stage(str(cfg.init_from))
        log.info("first_stage: %s (the autoencoder of init_from=%s)", cfg.first_stage, cfg.init_from)
    return run.train(cfg)


# ---------------------------------------------------------------------------------------------------- loading


def load_model(cfg: Any) -> Any:
    """The Gen-1 model of ``cfg.checkpoint`` (run folder, export, .ckpt, pkg://) on the config's device, eval mode;
    another package's model or a first stage is a one-line error naming the command that fits."""
    from gen1_video.lit import Gen1VideoDiffusion

    cfg = _cfg(cfg)
    run.check_sample_config(cfg)  # counts, checkpoint, device: before anything loads
    module = run.load_for_sampling(cfg, run.task_device(cfg))
    if not isinstance(module, Gen1VideoDiffusion):
        if not hasattr(module, "generate"):
            raise ValueError(
                f"{cfg.checkpoint} holds a {type(module).__name__}: a first stage (an autoencoder), not a Gen-1 "
                "video model; sample from the gen1-train run trained over it"
            )
        raise ValueError(f"{cfg.checkpoint} holds a {type(module).__name__}, not a Gen-1 video model")
    return module


def _options(cfg: DictConfig) -> dict[str, Any]:
    opts = OmegaConf.to_container(cfg.get("sample") or OmegaConf.create({}), resolve=True)
    assert isinstance(opts, dict)
    return {k: v for k, v in opts.items() if v is not None}


def _generator(module: Any, seed: int) -> torch.Generator:
    return torch.Generator(device=module.device).manual_seed(int(seed))


# ---------------------------------------------------------------------------------------------------- sample


def sample(cfg: Any) -> Path:
    """``gen1-sample``: ``num_samples`` source clips (the videos of ``paths`` in turn) re-rendered with the content of
    the next clip's middle frame (another video's); grid.png (rows: clips), samples.npz (``images``, ``sources``),
    sample_<i>.mp4."""
    from gen1_video.data import write_video

    cfg = _cfg(cfg)
    module = load_model(cfg)
    n, bs = int(cfg.num_samples), int(cfg.batch_size)
    opts = _options(cfg)
    videos = module.source_clips(n, cfg.get("paths"))
    content = videos[:, :, videos.shape[2] // 2].roll(-1, dims=0)
    outs = []
    for i in range(0, n, bs):
        out = module.generate(
            min(bs, n - i),
            videos=videos[i : i + bs],
            content_images=content[i : i + bs],
            generator=_generator(module, int(cfg.seed) + i),
            **opts,
        )
        outs.append(out["images"].cpu())
    images = torch.cat(outs)
    out_dir = Path(str(cfg.out_dir))
    run.write_samples(
        {"images": images, "sources": videos.cpu()}, out_dir, grid_size=int(cfg.grid_size), nrow=cfg.get("nrow")
    )
    if cfg.get("write_mp4", True):
        fps = 8.0
        for j, clip in enumerate(images):
            write_video(clip, out_dir / f"sample_{j:03d}.mp4", fps=fps)
    log.info("wrote %d clips to %s", n, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------- evaluate


def metric_encoder(name: str, module: Any) -> Any:
    """The image embedder of the metrics, ``images (N, 3, H, W) in [-1, 1] -> (N, D)``: ``fmnist`` (gencore's fixed
    Fashion-MNIST feature network on grey 28x28 frames: independent of the model, offline), ``content`` (the model's
    own content encoder), or a local CLIP folder (:class:`gen1_video.content.CLIPContentEncoder`)."""
    import torch.nn.functional as F

    from gen1_video.data import to_channels

    if name == "fmnist":
        from gencore.metrics.fmnist_net import load_feature_net

        net = load_feature_net()

        def fmnist(images: torch.Tensor) -> torch.Tensor:
            grey = to_channels(images, 1)
            grey = F.interpolate(grey, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
            return net(grey).float()

        return fmnist
    if name == "content":
        return module.content.embed_images
    from gen1_video.content import CLIPContentEncoder

    return CLIPContentEncoder(name).to(module.device).embed_images


def _as_rgb(videos: torch.Tensor) -> torch.Tensor:
    return videos.expand(-1, 3, -1, -1, -1) if videos.shape[1] == 1 else videos


def evaluate(cfg: Any) -> dict[str, dict[str, float]]:
    """``gen1-eval``: for each t_s in ``structure_levels`` and ω_t in ``temporal_scales`` (and the frame-by-frame
    image model at each t_s), edit ``num_samples`` real clips with another clip's content (the same noise for every
    row) and score frame consistency and content consistency with ``encoder`` (also against another clip's content
    image: how much the given content matters), and structure fidelity (the output's
    structure maps against the input clip's and against the content clip's, on the latent grid); plus the input
    clips' own frame consistency and the structure fidelity of two unrelated clips (chance). Writes metrics.json."""
    from gen1_video.metrics import (
        consecutive_similarity,
        frame_embeddings,
        map_correlation,
        reference_similarity,
        structure_maps,
    )

    cfg = _cfg(cfg)
    module = load_model(cfg)
    n, bs = int(cfg.num_samples), int(cfg.batch_size)
    levels = [int(x) for x in cfg.structure_levels]
    scales = [float(x) for x in cfg.temporal_scales]
    bad = [x for x in levels if not 0 <= x <= module.max_structure_level]
    if bad:
        raise ValueError(f"structure_levels: t_s={bad} outside [0, {module.max_structure_level}] (this model's range)")
    if n < 1 or not levels or not scales:
        raise ValueError("gen1-eval needs num_samples >= 1 and non-empty structure_levels and temporal_scales")
    opts = _options(cfg)
    embed = metric_encoder(str(cfg.encoder), module)
    videos = module.source_clips(n, cfg.get("paths")).to(module.device)
    content_images = videos[:, :, videos.shape[2] // 2].roll(-1, dims=0)
    with torch.no_grad():
        context = module.encode_content(content_images)
        reference = embed(_as_rgb(content_images[:, :, None])[:, :, 0])
    rows: list[tuple[str, dict[str, Any]]] = []
    for ts in levels:
        rows += [(f"wt{wt:g}_ts{ts}", {"structure_level": ts, "temporal_scale": wt}) for wt in scales]
        if cfg.get("frame_by_frame", True):
            rows.append((f"frame_by_frame_ts{ts}", {"structure_level": ts, "frame_by_frame": True}))
    metrics: dict[str, dict[str, float]] = {}

    def maps(clips: torch.Tensor) -> torch.Tensor:  # each clip's structure maps on the latent grid, computed once
        return structure_maps(_as_rgb(clips), module.structure, size=module.latent_size)

    input_maps = maps(videos)
    content_maps = input_maps.roll(-1, dims=0)  # the clips the content images come from
    fc_in, _ = consecutive_similarity(frame_embeddings(_as_rgb(videos), embed))
    # the chance level of structure fidelity: an input clip's layout against another clip's
    metrics["input"] = {
        "frame_consistency": fc_in,
        "structure_fidelity_other_clip": map_correlation(input_maps, content_maps)[0],
    }
    for name, row in rows:
        t0 = time.perf_counter()
        out = torch.cat(
            [
                module.edit(
                    videos[i : i + bs],
                    context[i : i + bs],
                    generator=_generator(module, int(cfg.seed) + i),
                    **opts,
                    **row,
                )
                for i in range(0, n, bs)
            ]
        )
        seconds = time.perf_counter() - t0
        e, out_maps = frame_embeddings(_as_rgb(out), embed), maps(out)  # each once per row
        metrics[name] = {
            "frame_consistency": consecutive_similarity(e)[0],
            "content_consistency": reference_similarity(e, reference)[0],
            # the chance level: against the content image of another clip
            "content_consistency_other": reference_similarity(e, reference.roll(-1, dims=0))[0],
            "structure_fidelity": map_correlation(out_maps, input_maps)[0],  # the input clip's layout (structure) ...
            "structure_fidelity_content_clip": map_correlation(out_maps, content_maps)[0],  # ... or the content's
            "seconds_per_frame": seconds / (out.shape[0] * out.shape[2]),
        }
        log.info("%s: %s", name, metrics[name])
    run.write_metrics(metrics, Path(str(cfg.out_dir)))
    return metrics


# -------------------------------------------------------------------------------------------------------- edit


def _content_from(cfg: DictConfig, module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context (1, L, D), the content image (1, C, H, W) or None for a prompt)."""
    from gencore.data import load_image, resize_center_crop
    from gencore.data.images import to_model_range
    from gencore.data.video import VIDEO_EXTENSIONS

    prompt, image = cfg.get("prompt"), cfg.get("image")
    if (prompt is None) == (image is None):
        raise ValueError("give the content as prompt=<text> or image=<file> (one of them)")
    if prompt is not None:
        if not hasattr(module.content, "encode_text"):
            raise ValueError(
                f"prompt={prompt!r} needs a content encoder with a text tower (CLIP); this model's is "
                f"{type(module.content).__name__}: pass image=<file> instead"
            )
        return module.content.encode_text([str(prompt)]).to(module.device), None
    path = Path(str(image))
    if not path.is_file():
        raise FileNotFoundError(f"content image {path} does not exist")
    if path.suffix.lower() in VIDEO_EXTENSIONS:  # a frame of another video: image_frame
        from gen1_video.data import read_video

        frame, _ = read_video(
            path, 1, start=int(cfg.get("image_frame") or 0), size=module.image_size, channels=module.image_channels
        )
        x = frame.permute(1, 0, 2, 3).to(module.device)  # (1, C, H, W)
    else:
        try:
            array = load_image(path, channels=module.image_channels)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read content image {path}: {err}") from err
        x = to_model_range(array)  # (C, H, W) in [-1, 1]
        x = resize_center_crop(x, module.image_size)[None].to(module.device)
    with torch.no_grad():
        return module.encode_content(x), x


def edit(cfg: Any) -> Path:
    """``gen1-edit``: read ``input`` (decord, OpenCV fallback) at the model's size, edit it (structure of the input at
    level ``ts``, content from ``image`` / ``prompt``, guidance ``omega``, temporal guidance ``omega_t``, DDIM from
    noise at ``strength``), write edited.mp4, input.mp4, strip.png (rows: input frames, edited frames) and edit.gif
    (input and edit side by side, playing)."""
    from gen1_video.data import read_video, write_video
    from gencore.viz import save_gif, save_grid

    cfg = _cfg(cfg)
    ts = cfg.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise ValueError(f"ts: the structure level t_s must be an integer, got {ts!r}")
    if cfg.get("input") is None:
        raise ValueError("gen1-edit: input=<video file> is required")
    module = load_model(cfg)
    if not 0 <= ts <= module.max_structure_level:
        raise ValueError(
            f"ts={ts} is outside [0, {module.max_structure_level}] (the structure levels this model knows)"
        )
    context, _ = _content_from(cfg, module)
    num_frames = cfg.get("num_frames") or module.num_frames
    video, fps = read_video(
        str(cfg.input),
        int(num_frames),
        stride=int(cfg.get("stride", 1)),
        start=int(cfg.get("start", 0)),
        size=module.image_size,
        channels=module.image_channels,
    )
    video = video[None].to(module.device)  # (1, C, T, H, W)
    t0 = time.perf_counter()
    edited = module.edit(
        video,
        context,
        generator=_generator(module, int(cfg.seed)),
        structure_level=ts,
        temporal_scale=float(cfg.omega_t),
        guidance_scale=float(cfg.omega),
        strength=float(cfg.strength),
        num_steps=int(cfg.num_steps),
        eta=float(cfg.eta),
    )
    seconds = time.perf_counter() - t0
    out_dir = Path(str(cfg.out_dir))
    write_video(edited[0].cpu(), out_dir / "edited.mp4", fps=fps)
    write_video(video[0].cpu(), out_dir / "input.mp4", fps=fps)
    rows = torch.cat([video, edited]).cpu()
    save_grid(rows, out_dir / "strip.png", nrow=rows.shape[2])
    save_gif(rows, out_dir / "edit.gif", fps=fps, scale=max(1, 128 // module.image_size))  # input | edit, playing
    log.info(
        "edited %d frames of %s (t_s=%d, omega_t=%g, omega=%g) in %.1f s: %s",
        video.shape[2],
        cfg.input,
        ts,
        float(cfg.omega_t),
        float(cfg.omega),
        seconds,
        out_dir,
    )
    return out_dir
