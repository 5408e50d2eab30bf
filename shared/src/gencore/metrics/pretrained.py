"""FID / LPIPS (torchmetrics) and CLIP score with real pretrained weights from local paths.

None of these weights can be downloaded on an offline machine. Each wrapper looks for the file where torch's hub cache
keeps it (or takes a path), checks it with the safe checkpoint reader, and otherwise raises
:class:`MissingWeightsError` saying which file is needed and where to put it. For Fashion-MNIST-scale experiments use
the in-project feature network instead (``gencore.metrics.fid_fmnist``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gencore.io import MissingWeightsError, model_folder

__all__ = ["CLIPScorer", "MissingWeightsError", "clip_score", "inception_fid", "lpips_metric"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
LPIPS_BACKBONES = {
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}


def _hub_file(name: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _checked(path: str | os.PathLike | None, default_name: str, url: str, what: str) -> Path:
    from gencore.io import load_checkpoint

    p = Path(path) if path is not None else _hub_file(default_name)
    if not p.is_file():
        raise MissingWeightsError(
            f"{what} needs pretrained weights that are not on this machine: {p} does not exist. Download {url} on a "
            f"machine with internet and pass its path (weights_path=...) or copy it to {_hub_file(default_name)}."
        )
    load_checkpoint(p)  # refuses pickles that would execute code, before any library torch.load()s it
    return p


@contextlib.contextmanager
def _hub_with(path: Path, name: str) -> Iterator[None]:
    """Make ``path`` visible as ``<hub>/checkpoints/<name>`` while a library looks it up in torch's hub cache."""
    if path.resolve() == _hub_file(name).resolve():
        yield
        return
    old = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / name).symlink_to(path.resolve())
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub.set_dir(old)


def inception_fid(weights_path: str | os.PathLike | None = None, feature: int = 2048, **kwargs: Any) -> Any:
    """torchmetrics ``FrechetInceptionDistance`` with the FID Inception-v3 weights from a local file."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    p = _checked(weights_path, INCEPTION_FILE, INCEPTION_URL, "Inception FID")
    return FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=str(p), **kwargs)


def lpips_metric(net_type: str = "vgg", weights_path: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """torchmetrics ``LearnedPerceptualImagePatchSimilarity`` (inputs in [-1, 1]) with the ImageNet backbone weights
    from a local file (the LPIPS linear heads ship with torchmetrics)."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    if net_type not in LPIPS_BACKBONES:
        raise ValueError(f"lpips_metric: net_type must be one of {sorted(LPIPS_BACKBONES)}, got {net_type!r}")
    url = LPIPS_BACKBONES[net_type]
    name = url.rsplit("/", 1)[-1]
    p = _checked(weights_path, name, url, f"LPIPS ({net_type})")
    with _hub_with(p, name):
        return LearnedPerceptualImagePatchSimilarity(net_type=net_type, **kwargs)


class CLIPScorer(torch.nn.Module):
    """CLIP score (Hessel et al. 2021) as torchmetrics defines it: 100 · max(cos(E_image, E_text), 0).

    torchmetrics 1.9's ``CLIPScore`` cannot run with transformers 5 (``get_image_features`` now returns an output
    object, not a tensor) and accepts local folders only if their path contains "openai"; this computes the same
    formula with the model's own processor. Images: (B, 3, H, W) uint8, or floats in [-1, 1].
    """

    def __init__(self, model_path: str | os.PathLike) -> None:
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model_path, local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)

    @staticmethod
    def _embeds(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def scores(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Per-pair scores (B,)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP score: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(texts) != len(images):
            raise ValueError(f"CLIP score: {len(images)} images but {len(texts)} texts")
        if images.dtype != torch.uint8:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        device = next(self.model.parameters()).device
        inputs = self.processor(
            text=list(texts), images=list(images.permute(0, 2, 3, 1).cpu().numpy()), return_tensors="pt", padding=True
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        img = self._embeds(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = self._embeds(
            self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        )
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return 100 * cos.clamp_min(0)

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Mean score of the batch."""
        return self.scores(images, texts).mean()


def clip_score(model_path: str | os.PathLike) -> CLIPScorer:
    """CLIP score with a CLIP model saved locally in transformers format (config.json + weights + processor)."""
    needs = "CLIP score needs a local CLIP model folder (transformers format, e.g. a snapshot of "
    needs += "openai/clip-vit-large-patch14)"
    return CLIPScorer(model_folder(model_path, needs))
