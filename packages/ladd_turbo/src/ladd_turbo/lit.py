"""LADD as a LightningModule: a few-step student distilled adversarially from a frozen sd3_flow teacher (Sauer et al.
2024, Sec. 3; SD3-Turbo).

One batch of synthetic teacher latents x0 (:mod:`ladd_turbo.synth`) with their text features:

- **student step** (:meth:`LADDModule.generator_step`): t ~ the student's discrete noise levels (weighted toward
  t = 1), x_t = (1 - t) x0 + t eps, the student predicts the velocity and so x0_hat = x_t - t v in one step; x0_hat is
  re-noised at t_hat ~ logit-normal(m, s) and scored by the discriminator on the **frozen teacher's features**;
  the adversarial loss (hinge or non-saturating), plus optionally an ADD-style distillation term
  ||x0_hat - sg(teacher x0 of the re-noised x0_hat)||^2. Gradients flow through the teacher into the student.
- **discriminator step** (:meth:`LADDModule.discriminator_step`): the re-noised synthetic x0 is real, the re-noised
  (detached) x0_hat fake; optionally the approximate R1 penalty on the real side.

The two players step on the :class:`gencore.training.GANModule` schedule (manual optimization, generator every
``generator_every`` batches, the discriminator every batch at its own rate). The teacher (a whole
:class:`sd3_flow.lit.RectifiedFlowModule`: first stage, conditioner, latent normaliser, MMDiT) is frozen and kept for
decoding and text encoding; the student is an MMDiT initialised from the teacher's weights (an EMA of it via
``gencore.callbacks.EMA(target="student")``). Sampling: unguided Euler over the student's noise levels
(:mod:`ladd_turbo.sampling`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gencore.modules import freeze
from gencore.training import GANModule
from ladd_turbo.discriminator import TeacherFeatureDiscriminator
from ladd_turbo.losses import (
    approximate_r1,
    discriminator_loss,
    generator_loss,
    renoise,
    renoise_timesteps,
    sample_student_sigmas,
    student_sigmas,
)
from sd3_flow.lit import with_concat

__all__ = ["LADDModule", "load_teacher"]


def load_teacher(path: str, use_ema: bool = True) -> nn.Module:
    """An sd3_flow teacher from a run folder, export or .ckpt (``gencore.run.load_module``), checked to be one."""
    from gencore.run import load_module
    from sd3_flow.lit import RectifiedFlowModule

    teacher = load_module(path, use_ema=use_ema)
    if not isinstance(teacher, RectifiedFlowModule):
        raise ValueError(
            f"teacher {path} is a {type(teacher).__name__}, not an sd3_flow RectifiedFlowModule (an sd3-train run)"
        )
    if not teacher.objective_name.startswith("rf"):
        raise ValueError(f"teacher {path}: LADD distils a rectified-flow teacher, this one is {teacher.objective_name}")
    return teacher


def _check_student(student: nn.Module, teacher_net: nn.Module) -> None:
    """The student must have the teacher's architecture to start from its weights: every key and shape."""
    mine, theirs = student.state_dict(), teacher_net.state_dict()
    missing, extra = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
    shapes = [k for k in set(mine) & set(theirs) if mine[k].shape != theirs[k].shape]
    if missing or extra or shapes:
        detail = []
        if missing:
            detail.append(f"{len(missing)} teacher keys missing in the student (e.g. {missing[0]})")
        if extra:
            detail.append(f"{len(extra)} student keys not in the teacher (e.g. {extra[0]})")
        if shapes:
            k = sorted(shapes)[0]
            detail.append(f"{len(shapes)} shapes differ (e.g. {k}: {tuple(mine[k].shape)} vs {tuple(theirs[k].shape)})")
        raise ValueError(
            "the student config does not match the teacher's architecture, so it cannot start from the teacher: "
            + "; ".join(detail)
        )


class LADDModule(GANModule):
    """Latent adversarial diffusion distillation of an sd3_flow teacher.

    Args:
        teacher: the frozen :class:`sd3_flow.lit.RectifiedFlowModule` (``load_teacher(path)`` in the configs).
        student: the student MMDiT; ``None`` = a copy of the teacher's. Initialised from the teacher's weights
            (``init_from_teacher``), which requires the same architecture.
        num_steps / shift: the student's schedule (SD3-Turbo: 4 steps, shift 3): it trains at
            :func:`ladd_turbo.losses.student_sigmas` and samples with any 1..num_steps of them.
        timestep_weights: probabilities of the student's noise levels (default favours t = 1: 0.7 / rest equally).
        renoise_mean / renoise_std: m, s of the logit-normal re-noising (paper default 1, 1); renoise_min/max_t: its
            range. ``same_renoise``: real and fake share t_hat and the noise (FastGen's ``gan_use_same_t_noise``).
        discriminator: keyword arguments of :class:`~ladd_turbo.discriminator.TeacherFeatureDiscriminator`
            (``layers``, ``head_channels``, ``time_embed_dim``).
        loss: ``"hinge"`` (paper) or ``"non_saturating"``.
        r1_weight / r1_sigma: approximate R1 on the real side (0: off).
        distillation_weight: weight of the optional distillation loss (0: off, the paper's choice with synthetic
            data); ``distillation_guidance``: the teacher's guidance scale in it.
        learning_rate / discriminator_learning_rate / betas / generator_every: see :class:`gencore.training.GANModule`.
    """

    generator_loss_name = "train/g_adv"

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module | None = None,
        *,
        init_from_teacher: bool = True,
        num_steps: int = 4,
        shift: float = 3.0,
        timestep_weights: Sequence[float] | None = None,
        renoise_mean: float = 1.0,
        renoise_std: float = 1.0,
        renoise_min_t: float = 0.0,
        renoise_max_t: float = 1.0,
        same_renoise: bool = False,
        discriminator: Mapping[str, Any] | None = None,
        loss: str = "hinge",
        r1_weight: float = 0.0,
        r1_sigma: float = 0.1,
        distillation_weight: float = 0.0,
        distillation_guidance: float = 1.0,
        learning_rate: float = 1e-5,
        discriminator_learning_rate: float | None = 2e-5,
        betas: tuple[float, float] = (0.0, 0.99),
        generator_every: int = 1,
        latent_key: str = "latent",
        caption_key: str = "caption",
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            betas=betas,
            discriminator_learning_rate=discriminator_learning_rate,
            generator_every=generator_every,
        )
        from sd3_flow.lit import RectifiedFlowModule

        if not isinstance(teacher, RectifiedFlowModule):
            raise ValueError(f"teacher must be an sd3_flow RectifiedFlowModule, got {type(teacher).__name__}")
        generator_loss(torch.zeros(1), loss)  # an unknown loss name fails here, not at the first step
        if r1_weight < 0 or distillation_weight < 0:
            raise ValueError(f"r1_weight and distillation_weight must be >= 0, got {r1_weight}, {distillation_weight}")
        self.teacher = freeze(teacher)
        if student is None:
            student = copy.deepcopy(teacher.transformer)
        if init_from_teacher:
            _check_student(student, teacher.transformer)
            student.load_state_dict(teacher.transformer.state_dict())
        for p in student.parameters():
            p.requires_grad_(True)
        self.student = student.train()
        d_kwargs = {"num_train_timesteps": int(teacher.objective.timestep_scale), **dict(discriminator or {})}
        self.discriminator = TeacherFeatureDiscriminator(teacher.transformer, **d_kwargs)
        self.sigmas = student_sigmas(num_steps, shift)
        n = len(self.sigmas)
        if timestep_weights is None:
            timestep_weights = [1.0] if n == 1 else [0.7] + [0.3 / (n - 1)] * (n - 1)
        if len(timestep_weights) != n or any(w < 0 for w in timestep_weights) or sum(timestep_weights) <= 0:
            raise ValueError(f"timestep_weights: {n} non-negative weights expected, got {list(timestep_weights)}")
        self.timestep_weights = [float(w) for w in timestep_weights]
        renoise_timesteps(1, mean=renoise_mean, std=renoise_std, min_t=renoise_min_t, max_t=renoise_max_t)  # checks
        self.renoise_kwargs = {"mean": renoise_mean, "std": renoise_std, "min_t": renoise_min_t, "max_t": renoise_max_t}
        self.same_renoise, self.loss = same_renoise, loss
        self.r1_weight, self.r1_sigma = r1_weight, r1_sigma
        self.distillation_weight, self.distillation_guidance = distillation_weight, distillation_guidance
        self.num_steps, self.shift = n, shift
        self.latent_key, self.caption_key = latent_key, caption_key
        self.timestep_scale = float(teacher.objective.timestep_scale)
        self.sample_kwargs = {"num_steps": n}  # what generate uses by default (read by the sample / eval tasks)

    # ------------------------------------------------------------------------------------------ pieces

    def velocity(
        self, x: Tensor, timestep: Tensor, context: Tensor, pooled: Tensor, c_concat: Tensor | None = None
    ) -> Tensor:
        """The student's velocity; ``timestep`` in [0, 1000] as the teacher's; ``c_concat`` the image condition of an
        inpainting / editing teacher, concatenated to the input channels as the teacher does."""
        return self.student(with_concat(x, c_concat), context, pooled, timestep)

    def condition(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The stored conditions of a synthetic batch (text features, and the image condition ``c_concat`` of an
        inpainting / editing teacher), or the teacher's encoding of the batch."""
        if "context" in batch and "pooled" in batch:
            keys = [k for k in ("context", "pooled", "c_concat") if k in batch]
            return {k: batch[k].to(self.device, non_blocking=True) for k in keys}
        return self.teacher.cond_stage_model.encode(batch, len(batch[self.latent_key]))

    def predict_x0(self, velocity: Any, x_t: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """x0 = x_t - t v(x_t, t) in one step (rectified flow), for ``velocity`` the student's or the teacher's."""
        return x_t - t.view(-1, 1, 1, 1).to(x_t.dtype) * velocity(x_t, t * self.timestep_scale, **cond)

    def one_step_x0(self, x0: Tensor, cond: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(x0_hat, t): the student's one-step prediction from x0 noised at its training levels."""
        t = sample_student_sigmas(len(x0), self.sigmas, self.timestep_weights, device=x0.device)
        return self.predict_x0(self.velocity, renoise(x0, t), t, cond), t

    def _renoise_t(self, x0: Tensor) -> Tensor:
        return renoise_timesteps(len(x0), device=x0.device, **self.renoise_kwargs)

    def discriminate(self, z: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """(B, n_heads) logits of re-noised latents ``z`` at ``t`` in [0, 1] (with the image condition, if any, on
        the teacher's extra input channels)."""
        z = with_concat(z, cond.get("c_concat"))
        return self.discriminator(self.teacher.transformer, z, t, cond["context"], cond["pooled"])

    # ------------------------------------------------------------------------------------------ the two steps

    def generator_step(self, batch: Mapping[str, Any], step: int) -> tuple[Tensor, dict[str, Tensor], Any]:
        x0 = batch[self.latent_key]
        cond = self.condition(batch)
        x0_hat, t = self.one_step_x0(x0, cond)
        t_hat = self._renoise_t(x0_hat)
        fake_t = renoise(x0_hat, t_hat)
        adv = generator_loss(self.discriminate(fake_t, t_hat, cond), self.loss)
        logs = {"train/student_t": t.mean().detach()}
        loss = adv
        if self.distillation_weight > 0:
            with torch.no_grad():
                target = self._teacher_x0(fake_t.detach(), t_hat, cond)
            distill = F.mse_loss(x0_hat, target)
            loss = loss + self.distillation_weight * distill
            logs["train/distill"] = distill.detach()
        return loss, logs, (x0_hat.detach(), cond)

    def fake_state(self, batch: Mapping[str, Any], step: int) -> Any:
        cond = self.condition(batch)
        return self.one_step_x0(batch[self.latent_key], cond)[0], cond

    def discriminator_step(self, batch: Mapping[str, Any], state: Any, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = batch[self.latent_key]
        x0_hat, cond = state
        t_real, noise = self._renoise_t(x0), torch.randn_like(x0)
        real_t = renoise(x0, t_real, noise)
        if self.same_renoise:  # real and fake at the same t_hat with the same noise
            t_fake, fake_t = t_real, renoise(x0_hat, t_real, noise)
        else:
            t_fake = self._renoise_t(x0_hat)
            fake_t = renoise(x0_hat, t_fake)
        logits_real = self.discriminate(real_t, t_real, cond)
        logits_fake = self.discriminate(fake_t, t_fake, cond)
        loss = discriminator_loss(logits_real, logits_fake, self.loss)
        logs = {
            "train/d_loss": loss.detach(),
            "train/logits_real": logits_real.detach().mean(),
            "train/logits_fake": logits_fake.detach().mean(),
        }
        if self.r1_weight > 0:
            r1 = approximate_r1(lambda z: self.discriminate(z, t_real, cond), real_t, sigma=self.r1_sigma)
            loss = loss + self.r1_weight * r1
            logs["train/r1"] = r1.detach()
        return loss, logs

    def _teacher_x0(self, z: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        from gencore.diffusion import classifier_free_guidance

        fn = self.teacher.velocity
        if self.distillation_guidance != 1.0:
            fn = classifier_free_guidance(
                fn, self.distillation_guidance, self.teacher.cond_stage_model.unconditional(1)
            )
        return self.predict_x0(fn, z, t, cond)

    def generator_parameters(self) -> Iterable[nn.Parameter]:
        return self.student.parameters()

    def discriminator_parameters(self) -> Iterable[nn.Parameter]:
        return self.discriminator.head_parameters()

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, betas=self.betas, weight_decay=0.0)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """The student's one-step x0 error against the synthetic latents at its first (t = 1) level."""
        x0 = batch[self.latent_key]
        cond = self.condition(batch)
        g = torch.Generator(device=x0.device).manual_seed(batch_idx)
        eps = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        t = torch.full((len(x0),), self.sigmas[0], device=x0.device)
        x0_hat = self.predict_x0(self.velocity, renoise(x0, t, eps), t, cond)
        self.log("val/x0_mse", F.mse_loss(x0_hat, x0), batch_size=len(x0))

    # ------------------------------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample_latents(
        self, cond: Mapping[str, Tensor], *, num_steps: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Unguided few-step Euler latents for ``cond`` (``{"context", "pooled"}``)."""
        from gencore.conditioning import cond_batch_size
        from ladd_turbo.sampling import student_sample

        n = cond_batch_size(cond)
        x_T = torch.randn((n, *self.teacher.latent_shape), generator=generator, device=self.device)
        steps = self.num_steps if num_steps is None else num_steps
        return student_sample(self.velocity, x_T, self.sigmas, steps, cond=cond, timestep_scale=self.timestep_scale)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        captions: list[str] | None = None,
        labels: list[int] | Tensor | None = None,
        *,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
        **unused: Any,
    ) -> dict[str, Any]:
        """``n`` images for ``captions`` (or the Fashion-MNIST captions of ``labels``) in ``num_steps`` (default: the
        student's) unguided steps -> ``{"images", "captions", "labels"?}``."""
        from sd3_flow.lit import image_request

        request = image_request(unused)  # images / masks of an inpainting or editing student
        if unused.get("guidance_scale") not in (None, 1, 1.0):
            raise ValueError("the LADD student samples unguided (guidance_scale=1); it was distilled without guidance")
        passed = (k for k, v in unused.items() if v is not None)
        ignored = sorted(k for k in passed if k not in ("sampler", "shift", "guidance_scale"))
        if ignored:
            raise ValueError(f"unknown sampling options for the LADD student: {ignored} (num_steps, generator)")
        teacher = self.teacher
        batch, out = teacher.cond_stage_model.generation_batch(n, captions=captions, labels=labels, **request)
        cond = teacher.cond_stage_model.encode(batch, n)
        z = self.sample_latents(cond, num_steps=num_steps, generator=generator)
        out["images"] = teacher.decode(z).clamp(-1, 1)
        return out

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], n: int = 16) -> dict[str, Tensor]:
        x0 = batch[self.latent_key][:n].to(self.device)
        cond = {k: v[:n] for k, v in self.condition(batch).items()}
        out = {"synthetic": self.teacher.decode(x0).clamp(-1, 1)}
        for k in sorted({1, self.num_steps}):
            out[f"student_{k}step"] = self.teacher.decode(self.sample_latents(cond, num_steps=k)).clamp(-1, 1)
        return out
