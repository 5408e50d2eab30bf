"""Training pieces that several recipes share: the learning-rate rule of the CompVis code bases, and the two-optimizer
GAN step (generator, then discriminator, every batch) with its adaptive weight and late discriminator start.

:class:`GANModule` is the base of every adversarial recipe: taming's VQGAN, ldm's KL autoencoder (PatchGAN on
reconstructions, Esser et al. 2021 Eq. 7), and next ladd_turbo (a discriminator on a frozen teacher's features) and
twostream_inpaint. A recipe says what one generator step and one discriminator step compute; the base runs them with
manual optimization, in that order, with one optimizer each:

    loss_g, logs, state = generator_step(batch, step)     -> zero_grad, backward, step of the generator optimizer
    loss_d, logs = discriminator_step(batch, state, step)  -> zero_grad, backward (if not None), step of the other

``step`` counts training batches (:attr:`GANModule.batch_step`); Lightning's ``global_step`` counts optimizer steps,
two per batch. The discriminator optimizer steps every batch, also before the discriminator starts (an update with no
gradients changes nothing), so that the step count stays two per batch from the first batch on.

Loss pieces: :func:`adopt_weight` (a weight that switches on at a step), :func:`hinge_d_loss` and
:func:`vanilla_d_loss` (the non-saturating / softplus form), :func:`adaptive_weight` (lambda of Eq. 7).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GANModule",
    "LambdaWarmUpCosineScheduler",
    "adaptive_weight",
    "adopt_weight",
    "hinge_d_loss",
    "scaled_learning_rate",
    "vanilla_d_loss",
]


def scaled_learning_rate(module: L.LightningModule, lr: float, scale: bool) -> float:
    """The CompVis rule (taming / latent-diffusion ``main.py``): lr = base_lr x batch size x devices x accumulation
    when ``scale``, else ``lr``. The batch size is the datamodule's ``batch_size`` (1 without a datamodule)."""
    if not scale:
        return lr
    trainer = module.trainer
    bs = getattr(trainer.datamodule, "batch_size", 1) if trainer.datamodule is not None else 1
    return lr * bs * trainer.world_size * trainer.accumulate_grad_batches


def adamw_lambda_lr(
    module: L.LightningModule,
    groups: list[dict[str, Any]],
    *,
    learning_rate: float,
    scale_lr: bool,
    betas: tuple[float, float],
    lr_lambda: Callable[[int], float],
) -> dict[str, Any]:
    """``configure_optimizers``' answer for AdamW over ``groups`` at the rate (scaled with ``scale_lr``:
    :func:`scaled_learning_rate`) times ``lr_lambda(step)`` every optimizer step (``LambdaLR``): the recipe of the
    official taming-style transformers (a base rate x batch x devices x accumulation, times a warm-up + cosine
    multiplier)."""
    lr = scaled_learning_rate(module, learning_rate, scale_lr)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lr_lambda)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


class LambdaWarmUpCosineScheduler:
    """The official ``taming.lr_scheduler.LambdaWarmUpCosineScheduler`` as a callable ``step -> value`` (taming,
    imagebart, geofree; twostream_inpaint applies it to both GAN optimizers).

    Linear from ``lr_start`` to ``lr_max`` over ``warm_up_steps``, then cosine from ``lr_max`` down to ``lr_min`` at
    ``max_decay_steps``, constant afterwards. The released Gumbel VQGAN anneals its temperature with it
    (lr_start = lr_max = 0.9, lr_min = 1e-6, warm_up_steps = 0, max_decay_steps = 1,000,001).
    """

    def __init__(
        self, *, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int
    ) -> None:
        if warm_up_steps < 0:
            raise ValueError(f"warm_up_steps must be >= 0, got {warm_up_steps}")
        if max_decay_steps <= warm_up_steps:
            raise ValueError(f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps ({warm_up_steps})")
        self.warm_up_steps, self.max_decay_steps = warm_up_steps, max_decay_steps
        self.lr_min, self.lr_max, self.lr_start = float(lr_min), float(lr_max), float(lr_start)

    @classmethod
    def for_run(
        cls, *, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int
    ) -> LambdaWarmUpCosineScheduler:
        """The schedule of a run whose ``max_decay_steps`` may not exceed its warm-up (a short debug run): the cosine
        part then starts right after the warm-up."""
        return cls(
            warm_up_steps=warm_up_steps,
            lr_min=lr_min,
            lr_max=lr_max,
            lr_start=lr_start,
            max_decay_steps=max(max_decay_steps, warm_up_steps + 1),
        )

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warm_up_steps:
            return (self.lr_max - self.lr_start) / self.warm_up_steps * step + self.lr_start
        t = min((step - self.warm_up_steps) / (self.max_decay_steps - self.warm_up_steps), 1.0)
        return self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1.0 + math.cos(t * math.pi))

    def __repr__(self) -> str:
        return (
            f"LambdaWarmUpCosineScheduler(warm_up_steps={self.warm_up_steps}, lr_min={self.lr_min}, "
            f"lr_max={self.lr_max}, lr_start={self.lr_start}, max_decay_steps={self.max_decay_steps})"
        )


def adopt_weight(weight: float, step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps, ``weight`` from then on (the official ``adopt_weight``)."""
    return value if step < threshold else weight


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """1/2 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """1/2 (mean softplus(-D(real)) + mean softplus(D(fake))): the non-saturating GAN loss of the discriminator."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adaptive_weight(
    rec_loss: Tensor, g_loss: Tensor, last_layer: Tensor, *, max_weight: float = 1e4, eps: float = 1e-4
) -> Tensor:
    """lambda = ||grad_L rec_loss|| / (||grad_L g_loss|| + eps), clamped to [0, max_weight], detached (Esser et al.
    2021, Eq. 7; L = the generator's last layer). Both graphs are kept for the backward pass that follows."""
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.clamp(torch.norm(rec_grads) / (torch.norm(g_grads) + eps), 0.0, max_weight).detach()


class GANModule(L.LightningModule):
    """Base of the two-optimizer adversarial recipes (manual optimization, Adam for both players by default).

    ``generator_every = k`` updates the generator on every k-th batch only (the discriminator on every batch; the
    fakes of the other batches come from :meth:`fake_state`); ``discriminator_learning_rate`` gives the discriminator
    its own rate (default: the generator's).

    ``lr_lambda`` (a callable ``step -> multiplier``, e.g. :class:`LambdaWarmUpCosineScheduler`) scales both rates
    every batch through a ``LambdaLR`` per optimizer, stepped here (manual optimization steps no scheduler by itself;
    Lightning saves their state, so a resumed run continues the schedule). The official guided-inpainting recipe
    applies one warm-up + cosine multiplier to both players.

    Subclasses implement :meth:`generator_step`, :meth:`discriminator_step`, :meth:`generator_parameters` and
    :meth:`discriminator_parameters`; they may override :meth:`on_gan_step_end` (e.g. codebook statistics) and
    :meth:`make_optimizer`. ``learning_rate`` / ``scale_lr`` follow :func:`scaled_learning_rate`; ``betas`` are
    Adam's (taming / LDM use (0.5, 0.9)).
    """

    #: the key the generator loss is logged under on the progress bar
    generator_loss_name = "train/g_total"
    #: each player's backward pass leaves the other's parameters out: DDP must be told (gencore.run does)
    ddp_find_unused_parameters = True

    def __init__(
        self,
        *,
        learning_rate: float,
        scale_lr: bool = False,
        betas: tuple[float, float] = (0.5, 0.9),
        discriminator_learning_rate: float | None = None,
        generator_every: int = 1,
        lr_lambda: Callable[[int], float] | None = None,
    ) -> None:
        super().__init__()
        if not learning_rate > 0 or not (discriminator_learning_rate is None or discriminator_learning_rate > 0):
            raise ValueError(
                "learning_rate and discriminator_learning_rate must be > 0, "
                f"got {learning_rate}, {discriminator_learning_rate}"
            )
        if isinstance(generator_every, bool) or not isinstance(generator_every, int) or generator_every < 1:
            raise ValueError(f"generator_every must be an integer >= 1, got {generator_every!r}")
        self.learning_rate, self.scale_lr, self.betas = learning_rate, scale_lr, tuple(betas)
        self.discriminator_learning_rate = discriminator_learning_rate
        self.generator_every = generator_every
        if lr_lambda is not None and not callable(lr_lambda):
            raise ValueError(f"lr_lambda must be a callable step -> multiplier, got {lr_lambda!r}")
        self.lr_lambda = lr_lambda
        self.automatic_optimization = False

    @property
    def batch_step(self) -> int:
        """Training batches seen (Lightning's ``global_step`` counts two optimizer steps per batch)."""
        return self.global_step // 2

    # --- what a recipe provides -----------------------------------------------------------------------------------
    def generator_step(self, batch: Any, step: int) -> tuple[Tensor, dict[str, Tensor], Any]:
        """(generator loss, logs, state handed to :meth:`discriminator_step`, e.g. the fake images)."""
        raise NotImplementedError

    def discriminator_step(self, batch: Any, state: Any, step: int) -> tuple[Tensor | None, dict[str, Tensor]]:
        """(discriminator loss, or None while the discriminator is off; logs)."""
        raise NotImplementedError

    def generator_parameters(self) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def discriminator_parameters(self) -> Iterable[nn.Parameter]:
        raise NotImplementedError

    def fake_state(self, batch: Any, step: int) -> Any:
        """The state :meth:`discriminator_step` needs on batches where the generator does not step
        (``generator_every`` > 1), made without gradients."""
        raise NotImplementedError(f"{type(self).__name__}: generator_every > 1 needs fake_state(batch, step)")

    def on_gan_step_end(self, batch: Any, state: Any) -> None:
        """Called after both updates of a batch."""

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr, betas=self.betas)

    # --- the step -------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        step = self.batch_step
        opt_g.zero_grad(set_to_none=True)
        if step % self.generator_every == 0:
            loss_g, logs_g, state = self.generator_step(batch, step)
            self.manual_backward(loss_g)
        else:  # the discriminator's turn alone (LADD / FastGen's update ratio): the same fakes, no generator update
            loss_g, logs_g = None, {}
            with torch.no_grad():
                state = self.fake_state(batch, step)
        opt_g.step()  # a no-op without gradients: keeps two optimizer steps per batch
        loss_d, logs_d = self.discriminator_step(batch, state, step)
        opt_d.zero_grad(set_to_none=True)
        if loss_d is not None:
            self.manual_backward(loss_d)
        opt_d.step()  # a no-op without gradients (before the discriminator starts): keeps two steps per batch
        if self.lr_lambda is not None:
            schedulers = self.lr_schedulers()
            for sched in schedulers if isinstance(schedulers, list) else [schedulers]:
                sched.step()
        size = _batch_size(batch)
        if loss_g is not None:
            self.log(self.generator_loss_name, loss_g.detach(), prog_bar=True, batch_size=size)
        self.log_dict({**logs_g, **logs_d}, batch_size=size)
        self.on_gan_step_end(batch, state)

    def configure_optimizers(self) -> Any:
        lr = scaled_learning_rate(self, self.learning_rate, self.scale_lr)
        gen = [p for p in self.generator_parameters() if p.requires_grad]
        disc = [p for p in self.discriminator_parameters() if p.requires_grad]
        if not gen or not disc:
            raise ValueError(
                f"{type(self).__name__}: the generator has {len(gen)} and the discriminator {len(disc)} trainable "
                "parameter tensors; a GAN recipe needs both"
            )
        lr_d = lr if self.discriminator_learning_rate is None else self.discriminator_learning_rate
        lr_d = scaled_learning_rate(self, lr_d, self.scale_lr) if self.discriminator_learning_rate is not None else lr_d
        optimizers = [self.make_optimizer(gen, lr), self.make_optimizer(disc, lr_d)]
        if self.lr_lambda is None:
            return optimizers
        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=self.lr_lambda) for opt in optimizers]
        return optimizers, schedulers


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return v.shape[0]
    return batch.shape[0] if isinstance(batch, Tensor) else None
