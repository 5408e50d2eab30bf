"""Small nn.Module helpers shared by every package: frozen submodules and the parameters an optimizer gets.

A frozen submodule (a VAE codec, a text encoder, a feature network) has ``requires_grad=False`` on every
parameter, stays in eval mode whatever ``.train()`` says, and is marked ``_genlab_frozen`` so that
``gencore.io.export`` leaves its weights out of the released trainable state (the config rebuilds it).
"""

from __future__ import annotations

import types
from collections.abc import Iterator

from torch import nn

__all__ = ["FrozenModule", "freeze", "trainable_parameters"]


class FrozenModule(nn.Module):
    """Base class for modules that never train: call :meth:`freeze` at the end of ``__init__``."""

    _genlab_frozen = True

    def freeze(self) -> FrozenModule:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place and mark it frozen: no grad, eval mode, and ``.train()`` (e.g. a parent's) keeps it
    in eval mode (use :class:`FrozenModule` for classes of your own). ``copy.deepcopy`` keeps the behaviour."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    module._genlab_frozen = True  # type: ignore[attr-defined]
    if not isinstance(module, FrozenModule):
        module.train = types.MethodType(_frozen_train, module)  # type: ignore[method-assign]
    return module


def trainable_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters that require grad: what an optimizer should get (frozen codecs and encoders excluded)."""
    return (p for p in module.parameters() if p.requires_grad)
