"""Geometry-free (and geometry-based) view synthesis as LightningModules: a GPT over the target view's VQGAN tokens
after a conditioning prefix built from the source view and the relative camera (Rombach, Esser, Ommer, ICCV 2021).

The official classes, with their attribute names (so official checkpoints map one to one, :mod:`geofree.convert`):

- :class:`GeoTransformer` — the implicit variants (Sec. 3.2) and, with a :class:`~geofree.models.geogpt.WarpGPT`,
  the hybrid / embedding-warping ones (Sec. 3.3). Per pair: the source disparity is estimated
  (``depth_estimator``), put into the pose's scale by the sparse points (least squares), normalised so its maximum is
  1, and the camera translation multiplied by the same alpha (:func:`geofree.geometry.normalize_camera`); the camera
  [R, alpha·t, K, K^-1] becomes 30 tokens (``emb_stage_model``); the prefix is then
    - ``impl_nodepth``: the source tokens (``use_depth=False``),
    - ``impl_catdepth``: depth tokens then source tokens, one shared embedding table (``use_depth=True``),
    - ``impl_depth`` / ``hybrid``: one continuous embedding per cell, ``merge_conv([quant_depth, quant_src])``
      (``merge_channels`` = the two codebooks' widths), the hybrid's warped as well (WarpGPT, ``start_idx`` 30),
    - ``expl_emb``: no camera tokens, the source token embeddings warped (WarpGPT, ``start_idx`` 0);
- :class:`WarpingTransformer` — ``expl_img``: the source image forward-warped into the target view with the scaled
  depth (softmax splatting) and VQ-encoded; no camera tokens.

The prefix attends to itself bidirectionally (``n_unmasked`` = its length), targets are causal; the loss is the
cross-entropy of the target tokens from logits at positions ``n_unmasked - 1 ...`` (Sec. 3.1). AdamW (0.9, 0.95):
weight decay 0.01 on the transformer's Linear / Conv2d weights, none on biases, LayerNorm, embeddings, ``pos_emb``
and on the extra group (camera embedder, ``merge_conv``); the official warm-up + cosine LambdaLR.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.modules import freeze
from gencore.training import LambdaWarmUpCosineScheduler, adamw_lambda_lr
from geofree.depth import BatchDisparity
from geofree.geometry import (
    check_intrinsics,
    check_rotation,
    fixed_scale_disparity,
    normalize_camera,
    render_forward,
    scaled_disparity,
)
from geofree.models.geogpt import MultiEmbedder, WarpGPT
from taming.sampling import sample_tokens

__all__ = ["GeoTransformer", "WarpingTransformer"]

N_CAMERA = 30  # [vec(R) 9, t 3, vec(K) 9, vec(K_inv) 9]
SAMPLE_OPTIONS = ("top_k", "temperature", "use_cache")


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _vq(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


class GeoTransformer(L.LightningModule):
    """View synthesis p(target tokens | source, camera) with a GPT; implicit, hybrid or embedding-warping by config.

    Args:
        first_stage: the frozen image VQGAN (also the source's encoder: the official ``__is_first_stage__``).
        transformer: factory of the GPT (``_partial_``): receives ``vocab_size``, ``block_size``, ``n_unmasked`` (and a
            :class:`WarpGPT` also ``warp_grid``, ``warp_start``).
        depth_stage: the frozen depth VQGAN (encodes ``2·disparity/alpha - 1``); needed when ``use_depth``.
        depth_estimator: monocular source disparity, ``estimator(batch) -> (B, H, W)`` (default: the batch's
            ``src_mono_disparity``; :class:`geofree.depth.MidasDisparity` for MiDaS).
        use_depth: condition on the source depth (tokens, or merged with ``merge_channels``).
        merge_channels: the merged width (depth code dim + image code dim; official 512): one embedding per cell
            instead of two tokens. None: depth tokens before the source tokens (``impl_catdepth``).
        camera_tokens: the 30 camera tokens first (False for ``expl_emb``, whose camera enters through the warp).
        depth_scale: ``sparse`` (least squares to the batch's ``src_points``, the paper) or ``fixed`` (min-max to the
            official fixed range: data without sparse points).
        image_size: (H, W) of the views (default: from the data, checked against the VQGAN's downsampling).
        learning_rate, scale_lr: the multiplier (official 0.0625 × batch 8 × accumulate 2 = 1.0, so the schedule's
            value is the rate), times the warm-up + cosine values (lr_start -> lr_max over warmup_steps, cosine to
            lr_min at max_decay_steps).
        sample: default sampling options (top_k: official 100; temperature; use_cache).
    """

    generates = True  # a generative model (sampled by geofree-sample / -render from a source view and a camera)

    def __init__(
        self,
        first_stage: nn.Module,
        transformer: Callable[..., nn.Module],
        depth_stage: nn.Module | None = None,
        depth_estimator: nn.Module | None = None,
        *,
        use_depth: bool = True,
        merge_channels: int | None = None,
        camera_tokens: bool = True,
        depth_scale: str = "sparse",
        image_size: Sequence[int] = (32, 48),
        learning_rate: float = 0.0625,
        scale_lr: bool = True,
        warmup_steps: int = 5000,
        lr_start: float = 2.5e-6,
        lr_max: float = 1.5e-4,
        lr_min: float = 1e-8,
        max_decay_steps: int = 500_001,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        sample: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.first_stage_model = freeze(_vq(first_stage))
        self.cond_stage_model = self.first_stage_model  # official "__is_first_stage__"
        if use_depth and depth_stage is None:
            raise ValueError("use_depth needs a depth_stage (the depth VQGAN): give depth_stage=<run | export | .ckpt>")
        self.depth_stage_model = freeze(_vq(depth_stage)) if depth_stage is not None else None
        self.depth_estimator = depth_estimator if depth_estimator is not None else BatchDisparity()
        if depth_scale not in ("sparse", "fixed"):
            raise ValueError(f"depth_scale must be sparse (fit to the sparse points) or fixed, got {depth_scale!r}")
        if merge_channels is not None and not use_depth:
            raise ValueError("merge_channels merges depth and source codes: it needs use_depth=True")
        self.use_depth, self.merge_channels, self.depth_scale = use_depth, merge_channels, depth_scale
        self.camera_tokens = camera_tokens

        h, w = (int(s) for s in image_size)
        f = self.first_stage_model.downsample_factor
        if h % f or w % f:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the VQGAN's downsampling factor {f} (the token grid must be "
                "whole)"
            )
        self.image_size, self.grid = (h, w), (h // f, w // f)
        if self.depth_stage_model is not None:
            fd = self.depth_stage_model.downsample_factor
            if fd != f:
                raise ValueError(f"the depth VQGAN downsamples by {fd}, the image VQGAN by {f}: they must match")
        self.num_codes = int(self.first_stage_model.vocab_size)
        n_cells = self.grid[0] * self.grid[1]
        self.n_camera = N_CAMERA if camera_tokens else 0

        if merge_channels is not None:
            widths = self.depth_stage_model.quantize.e_dim + self.first_stage_model.quantize.e_dim
            if int(merge_channels) != widths:
                raise ValueError(
                    f"merge_channels={merge_channels} but the depth and image codes are {widths} wide together"
                )
        n_index = self._prefix_indices(n_cells)
        self.n_unmasked = self.n_camera + (n_cells if merge_channels is not None else 0) + n_index
        if self.n_unmasked < 1:
            raise ValueError("the conditioning prefix is empty (no camera tokens, no source tokens)")
        self.seq_len = n_cells
        vocab = self.num_codes
        if use_depth and merge_channels is None:  # depth codes share the embedding table (official impl_catdepth)
            vocab = max(vocab, int(self.depth_stage_model.vocab_size))
        kwargs = dict(vocab_size=vocab, block_size=self.n_unmasked + n_cells - 1, n_unmasked=self.n_unmasked)
        if _accepts(transformer, "warp_grid"):
            kwargs.update(warp_grid=self.grid, warp_start=self.n_camera)
        self.transformer = transformer(**kwargs)
        self.n_embd = int(self.transformer.n_embd)
        if camera_tokens:
            self.emb_stage_model = MultiEmbedder(n_positions=N_CAMERA, n_channels=1, n_embed=self.n_embd)
        if merge_channels is not None:
            self.merge_conv = nn.Conv2d(int(merge_channels), self.n_embd, kernel_size=1, bias=False)
        self.warps = isinstance(self.transformer, WarpGPT)
        if not self._conditions_on_camera():
            raise ValueError(
                "without camera tokens the camera must enter through a warp: use a WarpGPT transformer (expl_emb) or "
                "geofree.lit.WarpingTransformer (expl_img), or camera_tokens=true"
            )

        self.learning_rate, self.scale_lr = float(learning_rate), scale_lr
        self.lr_schedule = LambdaWarmUpCosineScheduler.for_run(
            warm_up_steps=warmup_steps,
            lr_min=lr_min,
            lr_max=lr_max,
            lr_start=lr_start,
            max_decay_steps=max_decay_steps,
        )
        self.weight_decay, self.betas = float(weight_decay), tuple(betas)
        self.sample_kwargs = dict(sample or {})
        self._checked_data = False

    def _conditions_on_camera(self) -> bool:
        """Overridden by variants whose conditioning carries the camera otherwise (the warped source image)."""
        return self.camera_tokens or self.warps

    probe_view = "src"  # the view whose cells the prefix's grid positions hold (the depth probe's target)

    def _prefix_indices(self, n_cells: int) -> int:
        """How many conditioning *indices* the prefix holds (after the continuous embeddings)."""
        if self.merge_channels is not None:
            return 0
        return n_cells * (2 if self.use_depth else 1)

    # ------------------------------------------------------------------------------------------------- inputs
    def check_datamodule(self, datamodule: Any) -> None:
        """The data's view size against the model's (gencore.validate.check_fits)."""
        from gencore.validate import ConfigError

        size = getattr(datamodule, "image_size", None)
        if size is not None and tuple(int(s) for s in size) != self.image_size:
            raise ConfigError(
                f"the data gives {tuple(size)} views but the model is built for {self.image_size} (module.image_size)"
            )

    def check_batch(self, batch: dict[str, Any]) -> None:
        """The user-facing input checks (host reads: run once per call of sampling, and on the first training batch):
        view sizes against the VQGAN's, orthonormal rotations, 3x3 intrinsics, matching batch sizes."""
        for key in ("src_img", "R_rel", "t_rel", "K", "K_inv"):
            if key not in batch:
                raise ValueError(f"the batch has no {key!r} (needs src_img, R_rel, t_rel, K, K_inv)")
        src = batch["src_img"]
        if src.dim() != 4 or src.shape[1] != self.first_stage_model.encoder.in_channels:
            raise ValueError(
                f"src_img must be (B, {self.first_stage_model.encoder.in_channels}, H, W), got {tuple(src.shape)}"
            )
        for key in ("src_img", "dst_img"):
            if key in batch and tuple(batch[key].shape[-2:]) != self.image_size:
                raise ValueError(
                    f"{key} is {batch[key].shape[-2]}x{batch[key].shape[-1]} but the model (and its VQGAN grid "
                    f"{self.grid[0]}x{self.grid[1]}) takes {self.image_size[0]}x{self.image_size[1]} views"
                )
        b = src.shape[0]
        check_rotation(batch["R_rel"], "R_rel")
        K, K_inv = check_intrinsics(batch["K"], "K"), batch["K_inv"]
        if K_inv.shape != K.shape:
            raise ValueError(f"K_inv must have the shape of K {tuple(K.shape)}, got {tuple(K_inv.shape)}")
        eye = torch.eye(3, dtype=torch.float64, device=K.device)
        err = float((K.double() @ K_inv.double() - eye).abs().amax())
        if not err < 1e-3:
            raise ValueError(f"K_inv is not the inverse of K (max |K K_inv - I| = {err:.3g})")
        if batch["t_rel"].shape[-1] != 3:
            raise ValueError(f"t_rel must be (B, 3), got {tuple(batch['t_rel'].shape)}")
        for key in ("R_rel", "t_rel", "K", "K_inv"):
            if batch[key].shape[0] != b:
                raise ValueError(f"{key} holds {batch[key].shape[0]} cameras for {b} source views")

    @torch.no_grad()
    def encode_to_indices(self, x: Tensor, stage: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """Views (B, C, H, W) in [-1, 1] -> (quantised codes (B, e, h, w), indices (B, h·w))."""
        stage = self.first_stage_model if stage is None else stage
        quant, _, info = stage.encode(x)
        return quant, info[2].reshape(x.shape[0], -1)

    @torch.no_grad()
    def decode_indices(self, indices: Tensor) -> Tensor:
        grid = indices.reshape(indices.shape[0], *self.grid)
        return self.first_stage_model.decode_code(grid).clamp(-1, 1)

    @torch.no_grad()
    def source_disparity(self, batch: dict[str, Any], *, check: bool = True) -> Tensor:
        """The source disparity in the pose's scale (B, H, W): the estimate fitted to the sparse points (or the fixed
        range)."""
        est = self.depth_estimator(batch).float()
        if tuple(est.shape[-2:]) != self.image_size:
            raise ValueError(f"the disparity estimate is {tuple(est.shape[-2:])}, the views {self.image_size}")
        if self.depth_scale == "fixed":
            return fixed_scale_disparity(est)
        if "src_points" not in batch:
            raise ValueError("depth_scale=sparse needs the batch's src_points (or module.depth_scale=fixed)")
        return scaled_disparity(est, batch["src_points"].float(), check=check)

    @torch.no_grad()
    def warped_source(self, batch: dict[str, Any], *, check: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The source view splatted into the target camera with its scaled depth (holes 0, i.e. grey: geometry
        alone; ``expl_img``'s conditioning), with the normalised disparity and alpha it used."""
        disp = self.source_disparity(batch, check=check)
        disp_n, t_n, alpha = normalize_camera(disp, batch["t_rel"].float())
        K, K_inv = batch["K"].float(), batch["K_inv"].float()
        warped = render_forward(batch["src_img"].float(), 1.0 / disp_n, batch["R_rel"].float(), t_n, K_inv, K)
        return warped, disp_n, alpha

    def conditioning(self, batch: dict[str, Any], *, check: bool = False) -> dict[str, Any]:
        """The prefix: ``embeddings`` (B, E, n_embd) or None, ``indices`` (B, P) long, ``warp`` inputs or None, and
        the normalised disparity ``disparity`` (B, H, W) / ``alpha`` (B,)."""
        src = batch["src_img"]
        with torch.no_grad():
            quant_c, c_idx = self.encode_to_indices(src)
            disp = self.source_disparity(batch, check=check)
            disp_n, t_n, alpha = normalize_camera(disp, batch["t_rel"].float())
        cam = dict(R=batch["R_rel"].float(), t=t_n, K=batch["K"].float(), K_inv=batch["K_inv"].float())
        emb = [self.emb_stage_model(**cam)] if self.camera_tokens else []
        idx = []
        if self.use_depth:
            quant_d, d_idx = self.encode_to_indices(disp_n[:, None] * 2.0 - 1.0, self.depth_stage_model)
            if self.merge_channels is not None:
                merged = self.merge_conv(torch.cat((quant_d, quant_c), dim=1))  # (B, n_embd, h, w)
                emb.append(merged.flatten(2).transpose(1, 2))
            else:
                idx += [d_idx, c_idx]
        else:
            idx.append(c_idx)
        warp = None
        if self.warps:  # depth and translation scaled alike (alpha cancels in the projection)
            warp = dict(depth=1.0 / disp_n, R=cam["R"], t=t_n, K=cam["K"], K_inv=cam["K_inv"])
        return dict(
            embeddings=torch.cat(emb, dim=1) if emb else None,
            indices=torch.cat(idx, dim=1) if idx else c_idx[:, :0],
            warp=warp,
            disparity=disp_n,
            alpha=alpha,
        )

    def _gpt(self, warp: dict[str, Any] | None) -> nn.Module:
        return self.transformer.bind(warp) if self.warps else self.transformer

    # ------------------------------------------------------------------------------------------------- training
    def target_logits(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Teacher-forced logits of the target tokens (B, h·w, V) and the targets (B, h·w)."""
        _, z = self.encode_to_indices(batch["dst_img"])
        c = self.conditioning(batch)
        seq = torch.cat((c["indices"], z), dim=1)
        logits = self._gpt(c["warp"])(seq[:, :-1], embeddings=c["embeddings"])[0]
        return logits[:, self.n_unmasked - 1 :], z

    def _step(self, batch: dict[str, Any], split: str) -> Tensor:
        if not self._checked_data:  # the user-facing checks once (host reads), then none on the hot path
            self.check_batch(batch)
            if self.depth_scale == "sparse":
                self.source_disparity(batch, check=True)
            self._checked_data = True
        logits, z = self.target_logits(batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), z.reshape(-1))
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=split == "val")
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Official groups: transformer Linear / Conv2d weights decayed; its biases, norms, embeddings, pos_emb not;
        the camera embedder and merge_conv in an extra undecayed group."""
        decay, no_decay = [], []
        for m in self.transformer.modules():
            for pn, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if pn == "weight" and isinstance(m, (nn.Linear, nn.Conv2d)):
                    decay.append(p)
                else:
                    no_decay.append(p)
        extra = [
            p
            for name in ("emb_stage_model", "merge_conv")
            if hasattr(self, name)
            for p in getattr(self, name).parameters()
        ]
        groups = [
            {"params": decay, "weight_decay": self.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if extra:
            groups.append({"params": extra, "weight_decay": 0.0})
        return groups

    def configure_optimizers(self) -> Any:
        return adamw_lambda_lr(
            self,
            self.optimizer_groups(),
            learning_rate=self.learning_rate,
            scale_lr=self.scale_lr,
            betas=self.betas,
            lr_lambda=self.lr_schedule,
        )

    # ------------------------------------------------------------------------------------------------- sampling
    def sample_options(self, **kwargs: Any) -> dict[str, Any]:
        opts = {**self.sample_kwargs, **{k: v for k, v in kwargs.items() if v is not None}}
        unknown = sorted(set(opts) - set(SAMPLE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown sampling option(s) {', '.join(unknown)} ({', '.join(SAMPLE_OPTIONS)})")
        top_k = opts.get("top_k")
        if top_k is not None and (int(top_k) != top_k or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {top_k}")
        if top_k is not None:
            opts["top_k"] = min(int(top_k), self.num_codes)
        if not float(opts.get("temperature", 1.0)) > 0:
            raise ValueError(f"temperature must be > 0, got {opts.get('temperature')}")
        return opts

    @torch.no_grad()
    def sample_views(
        self,
        batch: dict[str, Any],
        num_samples: int = 1,
        *,
        generator: torch.Generator | None = None,
        return_tokens: bool = False,
        **options: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``num_samples`` target views per source view and camera: (B·num_samples, C, H, W) in [-1, 1], the samples
        of item i at rows i·num_samples ... (the model is probabilistic: several plausible views)."""
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples}")
        opts = self.sample_options(**options)
        self.check_batch(batch)
        c = self.conditioning(batch, check=True)
        rep = lambda x: None if x is None else x.repeat_interleave(num_samples, dim=0)
        warp = None if c["warp"] is None else {k: rep(v) for k, v in c["warp"].items()}
        tokens = sample_tokens(
            self._gpt(warp),
            rep(c["indices"]),
            self.seq_len,
            temperature=float(opts.get("temperature", 1.0)),
            top_k=opts.get("top_k"),
            embeddings=rep(c["embeddings"]),
            use_cache=bool(opts.get("use_cache", True)),
            generator=generator,
            vocab_limit=self.num_codes,
        )
        images = self.decode_indices(tokens)
        return (images, tokens) if return_tokens else images

    @torch.no_grad()
    def hidden_states(self, batch: dict[str, Any]) -> list[Tensor]:
        """The transformer's representations of [prefix, target tokens[:-1]] (official ``get_layers``): the input
        embeddings (index 0) and every block's output, each (B, L, n_embd). For the depth probe."""
        _, z = self.encode_to_indices(batch["dst_img"])
        c = self.conditioning(batch, check=True)
        seq = torch.cat((c["indices"], z), dim=1)[:, :-1]
        gpt = self.transformer
        x = gpt._embed(seq, c["embeddings"], 0, **({"warp": c["warp"]} if self.warps else {}))
        states = [x]
        for block in gpt.blocks:
            x = block(x)
            states.append(x)
        return states

    def source_positions(self) -> slice:
        """Where the source view's cells sit in the sequence (one per token-grid cell, raster order)."""
        n_cells = self.seq_len
        return slice(self.n_unmasked - n_cells, self.n_unmasked)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], max_images: int = 4, **kwargs: Any) -> dict[str, Tensor]:
        n = min(max_images, batch["src_img"].shape[0])
        part = {k: v[:n] if isinstance(v, Tensor) else v for k, v in batch.items()}
        out = {"source": part["src_img"], "target": part["dst_img"]}
        out["samples"] = self.sample_views(part, top_k=self.sample_kwargs.get("top_k"))
        return out


class WarpingTransformer(GeoTransformer):
    """``expl_img`` (official ``net2net.WarpingTransformer``): the source image forward-warped into the target view
    with the scaled source depth (softmax splatting), VQ-encoded: 299 (here h·w) conditioning tokens, no camera
    tokens, no depth tokens."""

    def __init__(self, first_stage: nn.Module, transformer: Callable[..., nn.Module], **kwargs: Any) -> None:
        kwargs.setdefault("use_depth", False)
        kwargs.setdefault("camera_tokens", False)
        if kwargs["use_depth"] or kwargs["camera_tokens"]:
            raise ValueError("WarpingTransformer (expl_img) conditions on the warped image only")
        super().__init__(first_stage, transformer, **kwargs)

    probe_view = "dst"  # its prefix holds the source warped into the target view

    def _conditions_on_camera(self) -> bool:
        return True  # through the warp

    def conditioning(self, batch: dict[str, Any], *, check: bool = False) -> dict[str, Any]:
        with torch.no_grad():
            warped, disp_n, alpha = self.warped_source(batch, check=check)
            _, idx = self.encode_to_indices(warped.to(batch["src_img"].dtype))
        return dict(embeddings=None, indices=idx, warp=None, disparity=disp_n, alpha=alpha, warped=warped)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], max_images: int = 4, **kwargs: Any) -> dict[str, Tensor]:
        out = super().log_images(batch, max_images)
        n = out["source"].shape[0]
        out["warped"] = self.warped_source({k: v[:n] if isinstance(v, Tensor) else v for k, v in batch.items()})[0]
        return out
