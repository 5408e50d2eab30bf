"""ImageBART as one LightningModule: a frozen (remapped) VQGAN, the multinomial forward process and T reverse stages.

Esser, Rombach, Blattmann, Ommer, NeurIPS 2021 (arXiv 2108.08827). The official code trains one network per stage
(``single_scale: t``, one run each) and assembles them in ``ImageBARTSampler``; here the T stage networks live in one
module (``transformers[t - 1]``) and ``train_stages`` picks which of them a run trains:

- ``train_stages: [t]`` is the official per-stage run (the other stages are frozen and untouched);
- several stages (default: all) share each batch: the batch is dealt round-robin to the trained stages (item i to
  stage ``train_stages[i % n]``), so every step trains every listed stage on its share with no data-dependent
  branching (the official joint config draws one t per batch instead).

Stage t < T is an encoder-decoder (:class:`~imagebart.models.xtransformer.ResidualScaledXTransformer` by default):
encoder input ``[t, (class), x_t]``, decoder input ``[sos, x_{t-1}[:-1]]``; stage T is a GPT over ``[T, (class),
x_{T-1}]`` whose prefix is bidirectional (``n_unmasked`` = its length). Stage and class ids share the encoder's / GPT's
input vocabulary with the codes, as officially (class c is token c; stage t is token t). Loss per stage:
``alpha_t·KL(q(x_{t-1} | x_t, x_0) ‖ p) + (1 - alpha_t)·CE`` (:func:`imagebart.diffusion.stage_loss`). Optimiser:
AdamW betas (0.9, 0.95), weight decay 0.01 (on every parameter of the encoder-decoder stages, the minGPT split for
the GPT), the official LambdaLR warm-up + cosine schedule; EMA through ``gencore.callbacks.EMA``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from gencore.conditioning import Conditioner, NoConditioner
from gencore.modules import check_index_range, freeze
from gencore.training import LambdaWarmUpCosineScheduler, adamw_lambda_lr
from imagebart.diffusion import MultinomialSchedule, posterior, stage_loss
from imagebart.editing import expand_masks, masked_view
from imagebart.sampling import coarse_to_fine, gpt_session, keep_guide, per_stage, sample_sequence

__all__ = ["ImageBART"]


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params


class ImageBART(L.LightningModule):
    """Multinomial diffusion over VQGAN tokens with autoregressive reverse stages.

    Args:
        first_stage: the frozen VQGAN (its ``vocab_size`` is K: the remapped size when it has a remap).
        stage_network: factory (``_partial_``) of the networks for t < T; receives the vocabulary sizes, sequence
            lengths and (when it takes them) ``scale_pos``, ``n_scales``, ``xt_start``, ``xt_size``.
        last_stage_network: factory of the GPT for t = T; receives ``vocab_size``, ``input_vocab_size``,
            ``block_size``, ``n_unmasked``.
        conditioner: ``taming.conditioning.ClassConditioner(num_classes, offset=0)`` for class-conditional models
            (class c is input token c, as officially); default unconditional.
        num_steps: T (``n_scales``).
        redraw_prob / alphacum: the forward schedule (:class:`~imagebart.diffusion.MultinomialSchedule`).
        alpha: loss mixing per stage (one value or T values for t = 1 ... T; official cIN: [0, 1, 1, 1]).
        train_stages: the stages this run trains (default all).
        num_codes: K as the config expects it (an official config's ``dec_num_tokens``); checked against the first
            stage, which must then carry the matching remap.
        input_vocab_size: the shared input vocabulary (official cIN: 1000); default max(K, classes, T + 1).
        image_size: training image size (default the first stage's resolution); the token grid is image_size / f.
        learning_rate, scale_lr: the schedule's multiplier, ×batch×devices×accumulation with ``scale_lr``
            (official: 0.0625 × 16 × 2 × ngpu), times the LambdaLR values (lr_start -> lr_max over warmup_steps,
            cosine to lr_min at max_decay_steps).
        sample: default sampling arguments (top_k, temperature, use_cache, chains).
    """

    def __init__(
        self,
        first_stage: nn.Module,
        stage_network: Callable[..., nn.Module],
        last_stage_network: Callable[..., nn.Module],
        conditioner: Conditioner | None = None,
        *,
        num_steps: int = 4,
        redraw_prob: str | float | Sequence[float] | None = "geometric",
        alphacum: Sequence[float] | None = None,
        alpha: float | Sequence[float] = (0.0, 1.0, 1.0, 1.0),
        train_stages: Sequence[int] | None = None,
        num_codes: int | None = None,
        input_vocab_size: int | None = None,
        image_size: int | None = None,
        learning_rate: float = 0.0625,
        scale_lr: bool = True,
        warmup_steps: int = 10_000,
        lr_start: float = 2.5e-6,
        lr_max: float = 1e-4,
        lr_min: float = 1e-8,
        max_decay_steps: int = 10_000_000,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.95),
        sample: dict[str, Any] | None = None,
        image_key: str = "image",
        sos_token: int = 0,
    ) -> None:
        super().__init__()
        self.first_stage_model = freeze(first_stage)
        self.cond_stage_model = conditioner if conditioner is not None else NoConditioner()
        self.schedule = MultinomialSchedule(num_steps, redraw_prob, alphacum=alphacum)
        T = self.num_steps = self.schedule.num_steps
        if not self.schedule.final_noise:
            raise ValueError(
                f"the schedule leaves signal at t = T (alphacum[T] = {float(self.schedule.alphacum[-1]):.3g}): the "
                "last stage is a GPT that never sees x_T, so x_T must be pure noise (alphacum[T] = 0)"
            )
        self.alpha = [float(a) for a in per_stage(alpha, T, "alpha")]
        if any(not 0.0 <= a <= 1.0 for a in self.alpha):
            raise ValueError(f"alpha values must be in [0, 1], got {self.alpha}")
        stages = list(range(1, T + 1)) if train_stages is None else [int(t) for t in train_stages]
        if not stages or any(not 1 <= t <= T for t in stages) or len(set(stages)) != len(stages):
            raise ValueError(f"train_stages must be distinct stages in [1, T={T}], got {list(train_stages or [])}")
        self.train_stages = sorted(stages)

        # vocabulary: K codes (after the remap), the shared input vocabulary, the token grid
        quantize = first_stage.quantize
        self.num_codes = K = int(first_stage.vocab_size)
        if num_codes is not None and int(num_codes) != K:
            full = quantize.codebook().num_embeddings
            hint = (
                f"it has {full} codes and no remap: load it with remap=<the used indices> (e.g. "
                "data/vqgan_indices/<dataset>_indices.npy, or remap=auto in imagebart-train)"
                if quantize.remap is None
                else f"its remap lists {K} codes"
            )
            raise ValueError(
                f"the model is configured for num_codes={num_codes} (a remapped vocabulary) but the "
                f"first stage gives {K} token ids: {hint}"
            )
        num_classes = int(getattr(self.cond_stage_model, "num_classes", 0) or 0)
        if num_classes and getattr(self.cond_stage_model, "offset", 0) != 0:
            raise ValueError(
                "ImageBART shares ids between classes and codes (class c is token c): conditioner offset 0"
            )
        self.num_classes = num_classes
        self.n_cond = 1 if num_classes else 0
        need = max(K, num_classes, T + 1, sos_token + 1)
        self.input_vocab_size = need if input_vocab_size is None else int(input_vocab_size)
        if self.input_vocab_size < need:
            raise ValueError(f"input_vocab_size={input_vocab_size} is below the ids it must embed ({need})")
        size = image_size or first_stage.encoder.resolution
        f = first_stage.downsample_factor
        if size % f:
            raise ValueError(f"image size {size} is not divisible by the first stage's downsampling factor {f}")
        self.image_size, self.grid = size, (size // f, size // f)
        self.seq_len = Ls = self.grid[0] * self.grid[1]
        self.register_buffer("sos_token", torch.tensor([sos_token]))  # official buffer

        nets = []
        for _ in range(1, T):
            kwargs = dict(
                enc_num_tokens=self.input_vocab_size,
                enc_max_seq_len=1 + self.n_cond + Ls,
                dec_num_tokens=K,
                dec_max_seq_len=Ls,
            )
            if _accepts(stage_network, "scale_pos"):
                kwargs.update(scale_pos=0, n_scales=T, xt_start=1 + self.n_cond, xt_size=Ls)
            net = stage_network(**kwargs)
            if hasattr(net, "set_alphas"):
                net.set_alphas(self.schedule.alphas)
            nets.append(net)
        nets.append(
            last_stage_network(
                vocab_size=K,
                input_vocab_size=self.input_vocab_size,
                block_size=1 + self.n_cond + Ls,
                n_unmasked=1 + self.n_cond,
            )
        )
        self.transformers = nn.ModuleList(nets)
        for t, net in enumerate(self.transformers, start=1):
            if t not in self.train_stages:
                freeze(net)

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
        self.image_key = image_key

    def take_stages(self, other: ImageBART, stages: Sequence[int]) -> ImageBART:
        """Copy the networks of ``stages`` from ``other`` (a run that trained them, e.g. ``train_stages=[t]``): how
        per-stage runs, the official way of training, become one model. Both must share T, the token grid, the
        vocabulary and the remapped codes."""
        mine, theirs = (
            getattr(self.first_stage_model.quantize, "used", None),
            getattr(other.first_stage_model.quantize, "used", None),
        )
        same_codes = (mine is None) == (theirs is None) and (
            mine is None or (mine.shape == theirs.shape and bool((mine.cpu() == theirs.cpu()).all()))
        )
        if (self.num_steps, self.grid, self.num_codes, self.input_vocab_size, self.num_classes) != (
            other.num_steps,
            other.grid,
            other.num_codes,
            other.input_vocab_size,
            other.num_classes,
        ) or not same_codes:
            raise ValueError(
                "take_stages: the models differ (T, token grid, codes, input vocabulary, classes or the remap): "
                f"T={self.num_steps} vs {other.num_steps}, grid {self.grid} vs {other.grid}, K={self.num_codes} vs "
                f"{other.num_codes}"
            )
        for t in stages:
            if not 1 <= int(t) <= self.num_steps:
                raise ValueError(f"take_stages: stage {t} is outside [1, T={self.num_steps}]")
            self.transformers[int(t) - 1].load_state_dict(other.transformers[int(t) - 1].state_dict())
        return self

    # ----------------------------------------------------------------------------------------------- tokens
    def encode_to_tokens(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] -> clean tokens x_0 (B, L) in the remapped space."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images of size {x.shape[-2]}x{x.shape[-1]} do not match the model's {self.image_size}x"
                f"{self.image_size} (its {self.grid[0]}x{self.grid[1]} token grid)"
            )
        with torch.no_grad():
            return self.first_stage_model.encode_to_indices(x).flatten(1)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Tokens (B, L) -> images (B, C, H, W) in [-1, 1]."""
        with torch.no_grad():
            return self.first_stage_model.decode_code(tokens.view(tokens.shape[0], *self.grid)).clamp(-1, 1)

    def class_tokens(self, batch: dict[str, Any], n: int) -> Tensor | None:
        """(B, 1) class tokens (class c = token c), or None for an unconditional model."""
        if not self.num_classes:
            return None
        c = self.cond_stage_model(batch, n)
        check_index_range(c, self.num_classes, f"class ids (num_classes={self.num_classes})")
        return c

    def _prefix(self, t: int, n: int, cond: Tensor | None, device: torch.device) -> Tensor:
        stage = torch.full((n, 1), t, dtype=torch.long, device=device)
        return stage if cond is None else torch.cat((stage, cond.to(device)), dim=1)

    def stage_logits(self, t: int, x_t: Tensor, x_prev: Tensor, cond: Tensor | None) -> Tensor:
        """Teacher-forced logits (B, L, K) of stage t for the target x_{t-1} = ``x_prev`` given ``x_t``."""
        net = self.transformers[t - 1]
        prefix = self._prefix(t, x_t.shape[0], cond, x_t.device)
        if t < self.num_steps:
            sos = self.sos_token.expand(x_prev.shape[0], 1)
            return net(torch.cat((prefix, x_t), 1), torch.cat((sos, x_prev[:, :-1]), 1))[0]
        seq = torch.cat((prefix, x_prev), 1)
        return net(seq[:, :-1])[0][:, prefix.shape[1] - 1 :]

    # ----------------------------------------------------------------------------------------------- training
    def stage_losses(self, batch: dict[str, Any], split: str) -> Tensor:
        x = batch[self.image_key]
        n = len(self.train_stages)
        if x.shape[0] < n:
            raise ValueError(f"a batch of {x.shape[0]} cannot feed the {n} trained stages (one item each at least)")
        x0 = self.encode_to_tokens(x)
        cond = self.class_tokens(batch, x.shape[0])
        total = x0.new_zeros((), dtype=torch.float32)
        logs = {}
        for j, t in enumerate(self.train_stages):
            part = slice(j, None, n)  # items j, j + n, ...: stage t's share of the batch
            x0_t = x0[part]
            x_prev, x_t = self.schedule.q_pair(x0_t, t, self.num_codes)
            q = posterior(x0_t, x_t, t, self.schedule, self.num_codes)
            logits = self.stage_logits(t, x_t, x_prev, None if cond is None else cond[part])
            loss, parts = stage_loss(logits, x_prev, q, self.alpha[t - 1])
            total = total + loss
            logs[f"{split}/loss_t{t}"] = loss.detach()
            logs[f"{split}/nll_t{t}"] = parts["loss_hard"]
        self.log(f"{split}/loss", total, prog_bar=True)
        self.log_dict(logs)
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.stage_losses(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.stage_losses(batch, "val")

    def configure_optimizers(self) -> Any:
        groups = []
        for t in self.train_stages:
            net = self.transformers[t - 1]
            if hasattr(net, "optimizer_groups"):  # the GPT: minGPT's decay / no-decay split
                groups.extend(net.optimizer_groups(self.weight_decay))
            else:  # the official AdamW(transformer.parameters()): weight decay on everything
                groups.append({"params": list(net.parameters()), "weight_decay": self.weight_decay})
        return adamw_lambda_lr(
            self,
            groups,
            learning_rate=self.learning_rate,
            scale_lr=self.scale_lr,
            betas=self.betas,
            lr_lambda=self.lr_schedule,
        )

    # ----------------------------------------------------------------------------------------------- sampling
    def _sample_opts(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        opts = {**self.sample_kwargs, **{k: v for k, v in kwargs.items() if v is not None}}
        unknown = sorted(set(opts) - {"top_k", "temperature", "use_cache", "chains"})
        if unknown:
            raise ValueError(f"unknown sampling option(s) {', '.join(unknown)} (top_k, temperature, use_cache, chains)")
        T, K = self.num_steps, self.num_codes
        for t in per_stage(opts.get("top_k"), T, "top_k"):
            if t is not None and (int(t) != t or t < 1):
                raise ValueError(f"top_k must be an integer >= 1 (values >= K={K} mean no filtering), got {t}")
        for temp in per_stage(opts.get("temperature", 1.0), T, "temperature"):
            if not float(temp) > 0:
                raise ValueError(f"temperature must be > 0, got {temp}")
        for c in per_stage(opts.get("chains", 1), T, "chains"):
            if int(c) != c or c < 1:
                raise ValueError(f"chains must be an integer >= 1, got {c}")
        return opts

    @torch.no_grad()
    def sample_stage(
        self,
        t: int,
        x_t: Tensor,
        cond: Tensor | None = None,
        *,
        guide: Tensor | None = None,
        top_k: int | None = None,
        temperature: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x_{t-1} ~ p(x_{t-1} | x_t) token by token (stage T ignores x_t: it is pure noise)."""
        net = self.transformers[t - 1]
        prefix = self._prefix(t, x_t.shape[0], cond, x_t.device)
        was_training = net.training
        net.eval()
        try:
            if t < self.num_steps:
                sos = self.sos_token.to(x_t.device).expand(x_t.shape[0], 1)
                session = net.session(torch.cat((prefix, x_t), 1), sos, use_cache=use_cache)
            else:
                session = gpt_session(net, prefix, use_cache=use_cache)
            return sample_sequence(
                session, self.seq_len, guide=guide, top_k=top_k, temperature=temperature, generator=generator
            )
        finally:
            net.train(was_training)

    @torch.no_grad()
    def sample_tokens(
        self,
        n: int,
        cond: Tensor | None = None,
        *,
        clean: Tensor | None = None,
        keep: Tensor | None = None,
        top_k: int | Sequence[int | None] | None = None,
        temperature: float | Sequence[float] = 1.0,
        use_cache: bool = True,
        chains: int | Sequence[int] = 1,
        generator: torch.Generator | None = None,
        return_chain: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """x_0 (n, L) by the coarse-to-fine chain from x_T ~ uniform. With ``clean`` tokens (n, L) and ``keep``
        (n, L) bool, the kept tokens are forced at every stage (the official masked editing: x_T starts as the kept
        tokens plus noise, the guide ``log onehot`` holds them) and the others are resampled with context on both
        sides. ``top_k`` / ``temperature`` / ``chains``: one value or T values (for t = 1 ... T)."""
        T, K = self.num_steps, self.num_codes
        device = self.sos_token.device
        if self.num_classes and cond is None:
            raise ValueError("a class-conditional model needs class tokens (labels) to sample")
        tops = per_stage(top_k, T, "top_k")
        temps = per_stage(temperature, T, "temperature")
        x_T = torch.randint(0, K, (n, self.seq_len), device=device, generator=generator)
        guide = None
        if keep is not None or clean is not None:
            if keep is None or clean is None:
                raise ValueError("masked editing needs both the clean tokens and the keep mask")
            if clean.shape != (n, self.seq_len) or keep.shape != (n, self.seq_len):
                raise ValueError(
                    f"clean tokens {tuple(clean.shape)} and keep mask {tuple(keep.shape)} must be (n={n}, "
                    f"L={self.seq_len})"
                )
            clean, keep = clean.to(device), keep.to(device).bool()
            x_T = torch.where(keep, clean, x_T)
            guide = keep_guide(clean, keep, K)

        def stage(t: int, x: Tensor) -> Tensor:
            return self.sample_stage(
                t,
                x,
                cond,
                guide=guide,
                top_k=tops[t - 1],
                temperature=float(temps[t - 1]),
                use_cache=use_cache,
                generator=generator,
            )

        def renoise(t: int, x: Tensor, weight: float) -> Tensor:
            return self.schedule.redraw(x, weight * self.schedule.beta_values[t], K, generator)

        return coarse_to_fine(stage, x_T, T, chains=chains, renoise=renoise, return_chain=return_chain)

    def _condition(self, n: int, labels: Sequence[int] | Tensor | None) -> tuple[Tensor | None, dict[str, Any]]:
        """(class tokens or None, what to return with the images) for ``n`` samples of ``labels``."""
        batch, out = self.cond_stage_model.generation_batch(n, labels=labels)
        return self.class_tokens(batch, n), out

    @torch.no_grad()
    def generate(
        self, n: int, labels: Sequence[int] | Tensor | None = None, *, return_chain: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        """``n`` images (and the labels asked for): gencore's sampling contract (``<name>-sample`` / ``-eval``).
        ``return_chain`` adds ``chain``: the token maps [x_T, ..., x_0] of the coarse-to-fine chain."""
        opts = self._sample_opts(kwargs)
        cond, out = self._condition(n, labels)
        tokens = self.sample_tokens(n, cond, **opts, return_chain=return_chain)
        if return_chain:
            tokens, out["chain"] = tokens
        out["images"] = self.decode_tokens(tokens)
        return out

    @torch.no_grad()
    def inpaint(
        self,
        images: Tensor,
        keep: Tensor,
        labels: Sequence[int] | Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        """Masked editing of ``images`` (B, C, H, W) in [-1, 1]: ``keep`` (1 = keep) as pixels (H, W) / (B, 1, H, W)
        or on the token grid; the tokens touching the hole are resampled. ``labels``: the images' classes (needed
        by a class-conditional model, ignored by an unconditional one). Returns ``images`` (the edits), ``sources``
        (the inputs with the hole greyed) and ``keep`` (the token mask, (B, h·w) bool)."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        n = images.shape[0]
        tmask = expand_masks(keep.to(images.device), n, self.grid, tuple(images.shape[-2:]))
        clean = self.encode_to_tokens(images.to(self.sos_token.device))
        if self.num_classes and labels is None:
            raise ValueError("a class-conditional model edits an image of a given class: pass labels (one per image)")
        cond = self._condition(n, labels if self.num_classes else None)[0]
        opts = self._sample_opts(kwargs)
        tokens = self.sample_tokens(n, cond, clean=clean, keep=tmask, **opts)
        return {"images": self.decode_tokens(tokens), "sources": masked_view(images, tmask, self.grid), "keep": tmask}

    def evaluation_request(self) -> dict[str, Any]:
        return self.cond_stage_model.evaluation_request()

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 16) -> dict[str, Tensor]:
        x = batch[self.image_key][:n].to(self.device)
        labels = batch.get(getattr(self.cond_stage_model, "label_key", "label"))
        labels = labels[: x.shape[0]] if labels is not None and self.num_classes else None
        logs = {"inputs": x, "reconstructions": self.decode_tokens(self.encode_to_tokens(x))}
        logs["samples"] = self.generate(x.shape[0], labels=labels)["images"]
        return logs
