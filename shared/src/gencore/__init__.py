"""gencore: the thin shared core of genlab.

Four jobs, one submodule each (import what you need; nothing heavy happens at import time):

- :mod:`gencore.attention` — one attention function over pluggable backends, and a KV cache;
- :mod:`gencore.latents` — the ``LatentCodec`` protocol, identity / diffusers-VAE codecs, the latent cache;
- :mod:`gencore.data` — real datasets (Fashion-MNIST, OpenCV videos, scikit-image photos, image folders) and
  LightningDataModules;
- :mod:`gencore.run`, :mod:`gencore.callbacks`, :mod:`gencore.io`, :mod:`gencore.metrics` — run plumbing over
  Hydra + Lightning, safetensors export, safe checkpoint loading, and metrics.
"""

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["KVCache", "__version__", "attention_backend", "causal_mask"]


def __getattr__(name: str) -> Any:
    """``gencore.KVCache`` etc. on first use: importing ``gencore`` (every console script does) stays free of torch,
    so ``--help`` and config errors answer at once. (``gencore.attention`` is the module; its function is
    ``gencore.attention.attention``.)"""
    if name in ("KVCache", "attention_backend", "causal_mask"):
        return getattr(importlib.import_module("gencore.attention"), name)
    raise AttributeError(f"module 'gencore' has no attribute {name!r}")
