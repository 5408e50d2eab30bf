"""The multinomial forward process of ImageBART (Esser, Rombach, Blattmann, Ommer, NeurIPS 2021, arXiv 2108.08827).

Sec. 3.1 / App. A of the paper, ``DenoisingTransformer.set_noise_schedule`` / ``get_scales`` / ``compute_loss`` of the
official ``imagebart/models/diffusion.py``. A token map ``x_0`` of a VQGAN (K codes, after the remap to the codes in
use) is corrupted in T steps by uniform redraws (Sohl-Dickstein et al. 2015; Hoogeboom et al. 2021):

    q(x_t | x_{t-1}) = Cat((1 - β_t)·onehot(x_{t-1}) + β_t / K)          (each token redrawn with probability β_t)
    q(x_t | x_0)     = Cat(ᾱ_t·onehot(x_0) + (1 - ᾱ_t) / K),  α_t = 1 - β_t,  ᾱ_t = Π_{s≤t} α_s
    q(x_{t-1} | x_t, x_0) ∝ (ᾱ_{t-1}·onehot(x_0) + (1 - ᾱ_{t-1}) / K) ⊙ (α_t·onehot(x_t) + (1 - α_t) / K)

β_0 = 0 (so ᾱ_0 = 1). Schedules (:class:`MultinomialSchedule`): ``geometric`` (β = [0, 1/T, 1/(T-1), ..., 1]: ᾱ falls
linearly to 0 and x_T is pure noise), ``alphacum:a,b,...`` (the ᾱ values literally), a constant redraw probability,
or an explicit β list. The loss of one reverse stage p(x_{t-1} | x_t) is ``α·KL(q(x_{t-1} | x_t, x_0) ‖ p) + (1 -
α)·CE(p, x_{t-1})`` (:func:`stage_loss`); the network's logits are a correction to the log-prior
``log(α_t·onehot(x_t) + (1 - α_t)/K)`` (:func:`prior_log_probs`) in the residual stages.

Not supported: the ``<dset>_bernoulli_<metric>`` schedules, which read ᾱ values off pickled reconstruction-metric
curves shipped in the official repository's ``data/``; give their ᾱ values with ``alphacum:`` instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MultinomialSchedule", "posterior", "prior_log_probs", "stage_loss"]

#: the schedule lives on the host (read as Python floats), whatever the default device
HOST = {"dtype": torch.float64, "device": "cpu"}


def _check_tokens(x: Tensor, num_codes: int, name: str) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.long or x.dim() != 2:
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a long tensor of token ids (B, L), got {got}")
    from gencore.modules import check_index_range

    check_index_range(x, num_codes, f"{name} (num_codes={num_codes})")


class MultinomialSchedule:
    """β_t, α_t = 1 - β_t and ᾱ_t for t = 0 ... T (index 0 is the clean data: β_0 = 0, ᾱ_0 = 1).

    Args:
        num_steps: T, the number of reverse stages (``n_scales`` in the official configs).
        redraw_prob: ``"geometric"`` (the official default), ``"alphacum:a_1,...,a_T"`` (ᾱ_1 ... ᾱ_T; the official
            string, ᾱ_0 = 1 implied; a list of T floats works too through ``alphacum=``), a float (the same β
            for every step), or a sequence of T betas β_1 ... β_T.
        alphacum: ᾱ_1 ... ᾱ_T as a list (instead of ``redraw_prob``).
    """

    def __init__(
        self,
        num_steps: int,
        redraw_prob: str | float | Sequence[float] | None = "geometric",
        *,
        alphacum: Sequence[float] | None = None,
    ) -> None:
        if int(num_steps) != num_steps or num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps}")
        self.num_steps = T = int(num_steps)
        if alphacum is not None:
            if redraw_prob not in (None, "geometric"):
                raise ValueError("give redraw_prob or alphacum, not both")
            redraw_prob = "alphacum:" + ",".join(str(float(a)) for a in alphacum)
        if redraw_prob is None or redraw_prob == "geometric":  # Sohl-Dickstein: β_t = 1 / (T - t + 1)
            betas = torch.cat((torch.zeros(1, **HOST), 1.0 / torch.arange(T, 0, -1, **HOST)))
        elif isinstance(redraw_prob, str) and redraw_prob.startswith("alphacum:"):
            try:
                acum = [float(a) for a in redraw_prob[len("alphacum:") :].split(",")]
            except ValueError:
                raise ValueError(f"redraw_prob {redraw_prob!r}: alphacum values must be numbers") from None
            if len(acum) != T:
                raise ValueError(f"redraw_prob {redraw_prob!r} lists {len(acum)} alphacum values, need T={T}")
            full = [1.0, *acum]
            if any(not 0.0 <= a <= 1.0 for a in acum) or any(b > a for a, b in itertools.pairwise(full)):
                raise ValueError(f"alphacum values must decrease from 1 within [0, 1], got {acum}")
            alphas = [1.0] + [(b / a if a > 0 else 1.0) for a, b in itertools.pairwise(full)]
            betas = torch.tensor([1.0 - a for a in alphas], **HOST)
            betas[0] = 0.0
        elif isinstance(redraw_prob, str):
            raise ValueError(
                f"unknown redraw_prob {redraw_prob!r}: use 'geometric', 'alphacum:a_1,...,a_T', a float or T betas "
                "(the official '<dset>_bernoulli_<metric>' schedules read pickled metric curves; pass their "
                "alphacum values instead)"
            )
        elif isinstance(redraw_prob, (int, float)):
            if not 0.0 < float(redraw_prob) <= 1.0:
                raise ValueError(f"a constant redraw_prob must be in (0, 1], got {redraw_prob}")
            betas = torch.cat((torch.zeros(1, **HOST), torch.full((T,), float(redraw_prob), **HOST)))
        else:
            values = [float(b) for b in redraw_prob]
            if len(values) != T or any(not 0.0 <= b <= 1.0 for b in values):
                raise ValueError(f"betas must be T={T} values in [0, 1], got {values}")
            betas = torch.tensor([0.0, *values], **HOST)
        self.betas = betas.float()  # (T + 1,)
        self.alphas = (1.0 - betas).float()
        self.alphacum = torch.cumprod(1.0 - betas, 0).float()
        # the same as Python floats: what the training step reads (no tensor -> float conversion on its path)
        self.beta_values = [float(b) for b in betas]
        self.alpha_values = [1.0 - b for b in self.beta_values]
        self.alphacum_values = [float(a) for a in torch.cumprod(1.0 - betas, 0)]
        # whether x_T is pure noise (ᾱ_T = 0): the last stage's GPT never sees x_T and is right only then
        self.final_noise = bool(self.alphacum[-1] <= 1e-6)

    def __repr__(self) -> str:
        return f"MultinomialSchedule(T={self.num_steps}, alphacum={[round(float(a), 4) for a in self.alphacum]})"

    def _check_t(self, t: int) -> int:
        if int(t) != t or not 1 <= t <= self.num_steps:
            raise ValueError(f"step t must be an integer in [1, T={self.num_steps}], got {t}")
        return int(t)

    # ----------------------------------------------------------------------------------------------- sampling q
    @staticmethod
    def redraw(x: Tensor, prob: float | Tensor, num_codes: int, generator: torch.Generator | None = None) -> Tensor:
        """Each token of ``x`` replaced with probability ``prob`` by a uniformly drawn code (which may be itself)."""
        u = torch.rand(x.shape, device=x.device, generator=generator)
        rand = torch.randint(0, num_codes, x.shape, device=x.device, generator=generator)
        return torch.where(u < prob, rand, x)

    def q_sample(self, x0: Tensor, t: int, num_codes: int, generator: torch.Generator | None = None) -> Tensor:
        """x_t ~ q(x_t | x_0): every token kept with probability ᾱ_t, else a uniform code."""
        t = self._check_t(t) if t != 0 else 0
        return self.redraw(x0, 1.0 - self.alphacum_values[t], num_codes, generator)

    def q_pair(
        self, x0: Tensor, t: int, num_codes: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """(x_{t-1}, x_t): x_{t-1} ~ q(x_{t-1} | x_0), then x_t ~ q(x_t | x_{t-1}) (one redraw step with β_t). The
        same joint distribution as the official sequential chain, which draws every x_s from x_{s-1}."""
        t = self._check_t(t)
        prev = self.q_sample(x0, t - 1, num_codes, generator) if t > 1 else x0
        return prev, self.redraw(prev, self.beta_values[t], num_codes, generator)

    def q_chain(self, x0: Tensor, num_codes: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """[x_0, x_1, ..., x_T] drawn step by step as the official ``get_scales`` does (for figures and tests)."""
        chain = [x0]
        for t in range(1, self.num_steps + 1):
            chain.append(self.redraw(chain[-1], self.beta_values[t], num_codes, generator))
        return chain


def prior_log_probs(xt: Tensor, alpha_t: Tensor | float, num_codes: int) -> Tensor:
    """``log(α_t·onehot(x_t) + (1 - α_t)/K)`` (B, L, K): the forward-process term q(x_t | x_{t-1}) as a function
    of x_{t-1}, which the residual reverse stages add to their scaled logits (``ResidualScaledXTransformer``).
    ``alpha_t``: a float or a (B,) tensor."""
    alpha = torch.as_tensor(alpha_t, dtype=torch.float32, device=xt.device)
    if alpha.dim() == 1:
        alpha = alpha[:, None, None]
    onehot = F.one_hot(xt, num_codes).float()  # (B, L, K)
    return torch.log(alpha * onehot + (1.0 - alpha) / num_codes)


def posterior(x0: Tensor, xt: Tensor, t: int, schedule: MultinomialSchedule, num_codes: int) -> Tensor:
    """q(x_{t-1} | x_t, x_0) as probabilities (B, L, K) (the official ``get_scales`` posterior, normalised)."""
    t = schedule._check_t(t)
    _check_tokens(x0, num_codes, "x0")
    _check_tokens(xt, num_codes, "xt")
    if x0.shape != xt.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and xt {tuple(xt.shape)} must have the same shape")
    k = num_codes
    a_t, acum_prev = schedule.alpha_values[t], schedule.alphacum_values[t - 1]
    from_x0 = acum_prev * F.one_hot(x0, k).float() + (1.0 - acum_prev) / k  # q(x_{t-1} | x_0)
    to_xt = a_t * F.one_hot(xt, k).float() + (1.0 - a_t) / k  # q(x_t | x_{t-1}) as a function of x_{t-1}
    joint = from_x0 * to_xt
    return joint / joint.sum(-1, keepdim=True)


def stage_loss(logits: Tensor, target: Tensor, target_probs: Tensor, alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``alpha·KL(q ‖ softmax(logits)) + (1 - alpha)·CE(logits, target)`` (official ``compute_loss``): the KL
    summed over codes and averaged over tokens and batch, the CE averaged likewise. ``logits`` (B, L, K),
    ``target`` (B, L) = x_{t-1}, ``target_probs`` (B, L, K) = the posterior. Returns (loss, parts)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if logits.shape != target_probs.shape or logits.shape[:2] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, target {tuple(target.shape)} and posterior {tuple(target_probs.shape)} "
            "must agree as (B, L, K), (B, L), (B, L, K)"
        )
    log_p = F.log_softmax(logits.float(), dim=-1)
    hard = F.nll_loss(log_p.transpose(1, 2), target)  # mean over (B, L)
    q = target_probs.float()
    # KL(q ‖ p) with 0·log 0 = 0 where q vanishes, also against log p = -inf there (a stage with β_t = 0: the residual
    # stage's logits are -inf off x_t, and so is the posterior's support)
    soft = (torch.xlogy(q, q) - torch.where(q > 0, q * log_p, 0.0)).sum(-1).mean()
    loss = alpha * soft + (1.0 - alpha) * hard if 0.0 < alpha < 1.0 else (soft if alpha == 1.0 else hard)
    return loss, {"loss_hard": hard.detach(), "loss_soft": soft.detach()}
