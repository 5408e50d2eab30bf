"""The latent video diffusion UNet of Gen-1 (Esser, Chiu, Atighehchian, Granskog, Germanidis, "Structure and
Content-Guided Video Synthesis with Diffusion Models", 2023, arXiv 2302.03011), inflated from ldm's image UNet.

Sec. 3 of the paper extends a latent *image* diffusion model (an LDM UNet, Rombach et al. 2022) to video (Fig. 2):

- **temporal convolution** after every spatial residual block: a 1-D convolution over frames
  (:class:`TemporalConvBlock`: ``num_layers`` × [GroupNorm, SiLU, Dropout, Conv3d with kernel (3, 1, 1)],
  residual, the last convolution zero-initialised);
- **temporal self-attention** after every spatial attention block: attention over the frames of each spatial
  position, with learned frame position embeddings (:class:`TemporalAttentionBlock`: GroupNorm, ``proj_in``,
  ``pos_embed``, ``depth`` × :class:`TemporalTransformerBlock`, zero-initialised ``proj_out``, residual);
- **image mode** (joint image / video training, Sec. 3.2): every temporal layer is skipped and the network is the
  image model applied to each frame (``forward(..., image_mode=True)``); temporal guidance (``gen1_video.sampling``)
  contrasts the two modes;
- **structure conditioning** (Sec. 3.1 / 3.2): the processed depth maps are concatenated to z_t as extra input
  channels (``structure=``), and the structure level t_s is embedded like the diffusion timestep
  (``structure_embed``: sinusoidal embedding, Linear, SiLU, zero-initialised Linear) and added to the time embedding
  (``structure_level=``);
- **content conditioning**: an embedding sequence (CLIP image embedding in the paper) cross-attended by every
  SpatialTransformer, shared by all frames of a clip (``context`` (B, L, D), repeated per frame inside).

Video tensors are (B, C, T, H, W) throughout; inside, frames are folded into the batch, (B·T, C, H, W), for the
spatial layers, which are ldm's own modules under ldm's official names (``input_blocks``, ``middle_block``,
``output_blocks``, ``time_embed``, ``out``): an image LDM checkpoint loads into the spatial part with strict key
checking (:meth:`VideoUNetModel.load_image_state_dict`, :meth:`VideoUNetModel.from_image_unet`). The temporal layer
after spatial layer ``input_blocks.i.j`` is ``temporal_input_blocks.i.j`` (likewise ``temporal_middle_block.j`` and
``temporal_output_blocks.i.j``); the t_s embedding is ``structure_embed``.

Initialisation (in the constructor, so on every path): temporal output layers, the t_s projection and the first
convolution's structure input channels are zero, so a freshly inflated model equals the image model frame by frame.

- helpers: :func:`image_unet_config` (an ldm UNet's constructor arguments read off the module);
- blocks: :class:`TemporalConvBlock`, :class:`TemporalTransformerBlock`, :class:`TemporalAttentionBlock`;
- the model: :class:`VideoUNetModel` (``forward(x, timesteps, context=None, y=None, *, structure=None,
  structure_level=None, image_mode=False)``, ``from_image_unet``, ``load_image_state_dict``);
- presets: :data:`VIDEO_UNET_PRESETS` (``tiny`` for tests, ``fmnist_toy`` over ldm's ``fmnist_tiny``, ``gen1`` the
  paper-scale SD-like model) and :func:`video_unet_from_preset`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gencore.io import load_state_dict
from gencore.modules import check_index_range
from ldm.models.unet import (
    UNET_PRESETS,
    AttentionBlock,
    CrossAttention,
    Downsample,
    FeedForward,
    GroupNorm32,
    ResBlock,
    SpatialTransformer,
    TimestepBlock,
    TimestepEmbedSequential,
    UNetModel,
    timestep_embedding,
    zero_module,
)

__all__ = [
    "TEMPORAL_PREFIXES",
    "VIDEO_UNET_PRESETS",
    "TemporalAttentionBlock",
    "TemporalConvBlock",
    "TemporalTransformerBlock",
    "VideoUNetModel",
    "image_unet_config",
    "video_unet_from_preset",
]

#: state-dict prefixes of everything the video model adds to the image UNet
TEMPORAL_PREFIXES = ("temporal_input_blocks.", "temporal_middle_block.", "temporal_output_blocks.", "structure_embed.")


# ------------------------------------------------------------------------------------------------------ helpers


def _maybe_checkpoint(enabled: bool, fn: Any, *args: Any) -> Any:
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _attention_modules(unet: nn.Module) -> list[tuple[str, int, int]]:
    """(name, heads, dim_head) of every attention in ``unet``'s spatial part (AttentionBlock: dim_head = C / heads)."""
    out = []
    for name, m in unet.named_modules():
        if name.startswith(TEMPORAL_PREFIXES):
            continue
        if isinstance(m, CrossAttention):
            out.append((name, m.heads, m.dim_head))
        elif isinstance(m, AttentionBlock):
            out.append((name, m.num_heads, m.channels // m.num_heads))
    return out


def image_unet_config(unet: UNetModel) -> dict[str, Any]:
    """The keyword arguments that rebuild ``unet`` (an ldm :class:`~ldm.models.unet.UNetModel`), read off its
    attributes and modules (UNetModel does not keep all of them): ``UNetModel(**image_unet_config(u))`` has the same
    state-dict keys and shapes and the same attention heads as ``u``."""
    if not isinstance(unet, UNetModel):
        raise ValueError(f"expected an ldm.models.unet.UNetModel, got {type(unet).__name__}")
    mods = list(unet.modules())
    res = [m for m in mods if isinstance(m, ResBlock)]
    downs = [m for m in mods if isinstance(m, Downsample)]
    transformers = [m for m in mods if isinstance(m, SpatialTransformer)]
    attn_blocks = [m for m in mods if isinstance(m, AttentionBlock)]
    in_channels = unet.in_channels - getattr(unet, "structure_channels", 0)
    cfg: dict[str, Any] = dict(
        image_size=unet.image_size,
        in_channels=in_channels,
        model_channels=unet.model_channels,
        out_channels=unet.out_channels,
        num_res_blocks=unet.num_res_blocks,
        attention_resolutions=list(unet.attention_resolutions),
        dropout=unet.dropout,
        channel_mult=list(unet.channel_mult),
        conv_resample=downs[0].use_conv if downs else True,
        num_classes=unet.num_classes,
        use_checkpoint=unet.use_checkpoint,
        num_heads=unet.num_heads,
        num_head_channels=unet.num_head_channels,
        num_heads_upsample=unet.num_heads_upsample,
        use_scale_shift_norm=res[0].use_scale_shift_norm,
        resblock_updown=any(m.updown for m in res),
        use_new_attention_order=attn_blocks[0].use_new_attention_order if attn_blocks else False,
        use_spatial_transformer=unet.use_spatial_transformer,
        transformer_depth=len(transformers[0].transformer_blocks) if transformers else 1,
        context_dim=unet.context_dim,
        legacy=False,
        use_linear_in_transformer=transformers[0].use_linear if transformers else False,
    )
    # ``legacy`` only changes heads where a decoder AttentionBlock with num_head_channels=-1 uses num_heads_upsample
    decoder_attn = [m for m in unet.output_blocks.modules() if isinstance(m, AttentionBlock)]
    if decoder_attn and unet.num_head_channels == -1 and unet.num_heads_upsample != unet.num_heads:
        cfg["legacy"] = decoder_attn[0].num_heads == unet.num_heads_upsample
    return cfg


# ------------------------------------------------------------------------------------------------------- blocks


class TemporalConvBlock(nn.Module):
    """Gen-1's 1-D temporal convolution after a spatial residual block (Sec. 3.2, Fig. 2), residual:
    x + layers(x) with ``num_layers`` × [GroupNorm32, SiLU, Dropout, Conv3d(C, C, kernel (3, 1, 1), padding
    (1, 0, 0))] over (B, C, T, H, W); the last convolution is zero-initialised, so the block starts as the identity.
    Frames past the clip's ends are zeros (the convolution's zero padding)."""

    def __init__(
        self, channels: int, *, num_layers: int = 2, dropout: float = 0.0, use_checkpoint: bool = False
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"TemporalConvBlock needs num_layers >= 1, got {num_layers}")
        self.channels = channels
        self.use_checkpoint = use_checkpoint
        self.layers = nn.Sequential(
            *[
                nn.Sequential(
                    GroupNorm32(channels),
                    nn.SiLU(),
                    nn.Dropout(dropout),
                    nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)),
                )
                for _ in range(num_layers)
            ]
        )
        zero_module(self.layers[-1][-1])

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        """x (B·T, C, H, W), frames of a clip adjacent -> (B·T, C, H, W)."""
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, num_frames)

    def _forward(self, x: Tensor, num_frames: int) -> Tensor:
        v = rearrange(x, "(b t) c h w -> b c t h w", t=num_frames)  # (B, C, T, H, W)
        v = v + self.layers(v)
        return rearrange(v, "b c t h w -> (b t) c h w")


class TemporalTransformerBlock(nn.Module):
    """Pre-LN transformer block over the frame axis: x += attn1(LN1 x) (self-attention across frames),
    x += ff(LN2 x) (GEGLU feed-forward); ldm's :class:`~ldm.models.unet.CrossAttention` and
    :class:`~ldm.models.unet.FeedForward`."""

    def __init__(self, dim: int, n_heads: int, d_head: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x  # (B·H·W, T, d)
        return self.ff(self.norm2(x)) + x


class TemporalAttentionBlock(nn.Module):
    """Gen-1's temporal self-attention after a spatial attention block (Sec. 3.2, Fig. 2): each spatial position of
    a clip attends over the clip's frames. GroupNorm (per frame, eps 1e-6), ``proj_in`` (C -> heads·d_head),
    learned frame position embeddings ``pos_embed`` (max_frames, heads·d_head) added to the tokens, ``depth`` ×
    :class:`TemporalTransformerBlock`, zero-initialised ``proj_out``, residual."""

    def __init__(
        self,
        channels: int,
        n_heads: int,
        d_head: int,
        *,
        max_frames: int,
        depth: int = 1,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        inner = n_heads * d_head
        self.channels, self.max_frames, self.use_checkpoint = channels, max_frames, use_checkpoint
        self.norm = nn.GroupNorm(32, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner)
        self.pos_embed = nn.Parameter(torch.zeros(max_frames, inner))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.transformer_blocks = nn.ModuleList(
            [TemporalTransformerBlock(inner, n_heads, d_head, dropout=dropout) for _ in range(depth)]
        )
        self.proj_out = zero_module(nn.Linear(inner, channels))

    def forward(self, x: Tensor, num_frames: int) -> Tensor:
        """x (B·T, C, H, W), frames of a clip adjacent -> (B·T, C, H, W)."""
        return _maybe_checkpoint(self.use_checkpoint, self._forward, x, num_frames)

    def _forward(self, x: Tensor, num_frames: int) -> Tensor:
        if num_frames > self.max_frames:
            raise ValueError(f"{num_frames} frames exceed the frame position table of {self.max_frames} frames")
        _, _, h, w = x.shape
        tokens = rearrange(self.norm(x), "(b t) c h w -> (b h w) t c", t=num_frames)  # (B·H·W, T, C)
        tokens = self.proj_in(tokens) + self.pos_embed[:num_frames].to(tokens.dtype)  # (B·H·W, T, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        out = self.proj_out(tokens)  # (B·H·W, T, C)
        return x + rearrange(out, "(b h w) t c -> (b t) c h w", h=h, w=w)


# -------------------------------------------------------------------------------------------------------- model


class VideoUNetModel(UNetModel):
    """Gen-1's video denoiser ε_θ(z_t, t, s, t_s, c): ldm's UNetModel with temporal layers, structure channels and a
    t_s embedding (see the module docstring for the paper's parts).

    Keyword arguments: ldm's :class:`~ldm.models.unet.UNetModel` ones (an image preset works unchanged:
    ``in_channels`` are z_t's channels, as in the image model; the first convolution takes ``in_channels +
    structure_channels``), plus

    - ``structure_channels``: channels of the structure map concatenated to z_t (1 for depth; 0: no structure
      conditioning, no t_s embedding);
    - ``max_structure_level``: the largest t_s (inputs outside [0, max_structure_level] are refused);
    - ``max_frames``: length of the learned frame position table (clips longer than this are refused in video mode);
    - ``temporal_conv_layers``: convolutions per :class:`TemporalConvBlock`; ``temporal_depth``: transformer blocks
      per :class:`TemporalAttentionBlock` (heads as in the spatial attention it follows).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        structure_channels: int = 1,
        max_structure_level: int = 5,
        max_frames: int = 16,
        temporal_conv_layers: int = 2,
        temporal_depth: int = 1,
        **unet_kwargs: Any,
    ) -> None:
        if structure_channels < 0:
            raise ValueError(f"structure_channels must be >= 0, got {structure_channels}")
        if max_structure_level < 0:
            raise ValueError(f"max_structure_level must be >= 0, got {max_structure_level}")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        super().__init__(in_channels=in_channels + structure_channels, **unet_kwargs)
        self.latent_channels = in_channels
        self.structure_channels = structure_channels
        self.max_structure_level = max_structure_level
        self.max_frames = max_frames
        self.temporal_conv_layers = temporal_conv_layers
        self.temporal_depth = temporal_depth

        with torch.no_grad():  # the structure channels start silent: the model equals the image model at init
            self.input_blocks[0][0].weight[:, in_channels:].zero_()
        if structure_channels:
            time_embed_dim = self.time_embed[0].out_features
            self.structure_embed = nn.Sequential(
                nn.Linear(self.model_channels, time_embed_dim),
                nn.SiLU(),
                zero_module(nn.Linear(time_embed_dim, time_embed_dim)),
            )
        self.temporal_input_blocks = nn.ModuleList([self._temporal_layers(b) for b in self.input_blocks])
        self.temporal_middle_block = self._temporal_layers(self.middle_block)
        self.temporal_output_blocks = nn.ModuleList([self._temporal_layers(b) for b in self.output_blocks])

    def _temporal_layers(self, block: TimestepEmbedSequential) -> nn.ModuleDict:
        """{index j of a spatial layer in ``block``: the temporal layer that follows it}."""
        layers = nn.ModuleDict()
        for j, layer in enumerate(block):
            if isinstance(layer, ResBlock):
                layers[str(j)] = TemporalConvBlock(
                    layer.out_channels,
                    num_layers=self.temporal_conv_layers,
                    dropout=self.dropout,
                    use_checkpoint=self.use_checkpoint,
                )
            elif isinstance(layer, SpatialTransformer | AttentionBlock):
                if isinstance(layer, SpatialTransformer):
                    attn = layer.transformer_blocks[0].attn1
                    channels, heads, d_head = layer.in_channels, attn.heads, attn.dim_head
                else:
                    channels, heads = layer.channels, layer.num_heads
                    d_head = channels // heads
                layers[str(j)] = TemporalAttentionBlock(
                    channels,
                    heads,
                    d_head,
                    max_frames=self.max_frames,
                    depth=self.temporal_depth,
                    dropout=self.dropout,
                    use_checkpoint=self.use_checkpoint,
                )
        return layers

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_image_unet(
        cls,
        unet: UNetModel,
        *,
        structure_channels: int = 1,
        max_structure_level: int = 5,
        max_frames: int = 16,
        temporal_conv_layers: int = 2,
        temporal_depth: int = 1,
    ) -> VideoUNetModel:
        """Inflate an image LDM UNet: same spatial configuration, every spatial weight copied unchanged, the first
        convolution widened by zero weights for the structure channels, fresh (zero-output) temporal layers. The
        result equals ``unet`` applied frame by frame, in video and image mode alike, until it is trained."""
        video = cls(
            **image_unet_config(unet),
            structure_channels=structure_channels,
            max_structure_level=max_structure_level,
            max_frames=max_frames,
            temporal_conv_layers=temporal_conv_layers,
            temporal_depth=temporal_depth,
        )
        ours, theirs = _attention_modules(video), _attention_modules(unet)
        if ours != theirs:
            diff = next((a, b) for a, b in zip(ours, theirs) if a != b) if len(ours) == len(theirs) else "count"
            raise ValueError(f"from_image_unet: rebuilt attention heads differ from the image UNet's ({diff})")
        video.load_image_state_dict(unet.state_dict(), source=f"image {type(unet).__name__}")
        dtype = next(unet.parameters()).dtype
        return video.to(device=next(unet.parameters()).device, dtype=dtype).train(unet.training)

    def load_image_state_dict(
        self,
        state: Mapping[str, Tensor],
        *,
        prefix: str = "",
        ignore_prefixes: Iterable[str] = (),
        source: str = "image checkpoint",
    ) -> tuple[list[str], list[str]]:
        """Load an image LDM UNet's weights (ldm names, e.g. an official checkpoint with
        ``prefix="model.diffusion_model."``) into the spatial part, strictly: every spatial key must be present with
        its shape, and no unknown key may appear. Temporal and ``structure_embed`` weights present in ``state`` (a
        video checkpoint) are loaded too; absent ones keep their current values (zero-output at construction). An
        ``input_blocks.0.0.weight`` with only the latent channels is widened with zeros for the structure channels.
        Returns ``(missing, unexpected)`` as :func:`gencore.io.load_state_dict` (absent temporal keys are not listed;
        anything else missing or unexpected raises :class:`~gencore.io.CheckpointKeyError` naming the keys)."""
        selected = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if prefix and not selected:
            raise ValueError(f"{source}: no keys start with prefix {prefix!r}")
        key = "input_blocks.0.0.weight"
        w = selected.get(key)
        if w is not None and self.structure_channels and w.dim() == 4 and w.shape[1] == self.latent_channels:
            wide = w.new_zeros(w.shape[0], self.latent_channels + self.structure_channels, *w.shape[2:])
            wide[:, : self.latent_channels] = w
            selected[key] = wide
        return load_state_dict(
            self, selected, ignore_prefixes=ignore_prefixes, allow_missing=TEMPORAL_PREFIXES, source=source
        )

    @torch.no_grad()
    def init_structure_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Draw the first convolution's structure-channel weights from N(0, std²) (they start at zero). A non-zero
        start lets the layers downstream see the structure from the first step, where zero weights leave it to
        grow out of a weak gradient; the model then no longer equals the image model at initialisation."""
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        w = self.input_blocks[0][0].weight
        noise = torch.randn(w[:, self.latent_channels :].shape, generator=generator, device="cpu", dtype=torch.float32)
        w[:, self.latent_channels :] = (std * noise).to(w)

    def temporal_parameters(self) -> list[nn.Parameter]:
        """Parameters of the temporal layers (e.g. to train only them, or give them their own learning rate)."""
        return [p for n, p in self.named_parameters() if n.startswith(TEMPORAL_PREFIXES[:3])]

    # ------------------------------------------------------------------------------------------------- forward

    def _check_video_inputs(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None,
        y: Tensor | None,
        structure: Tensor | None,
        structure_level: Tensor | int | None,
        image_mode: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> (z_t concatenated with the structure (B, C + S, T, H, W), timesteps (B,), t_s (B,) or None)."""
        if not isinstance(image_mode, bool):
            raise ValueError(f"image_mode must be a Python bool (one mode per call), got {type(image_mode).__name__}")
        if x.dim() != 5:
            raise ValueError(
                f"x must be a video (B, {self.latent_channels}, T, H, W) (an image batch is T = 1 with "
                f"image_mode=True), got shape {tuple(x.shape)}"
            )
        b, c, t, h, w = x.shape
        if c != self.latent_channels:
            raise ValueError(f"x has {c} channels, the model expects {self.latent_channels} latent channels")
        if not image_mode and t > self.max_frames:
            raise ValueError(
                f"{t} frames exceed the model's frame position table (max_frames={self.max_frames}); use shorter "
                "clips or a model built with a larger max_frames"
            )
        level = None
        if self.structure_channels:
            want = (b, self.structure_channels, t, h, w)
            if structure is None:
                raise ValueError(f"this model is structure-conditioned: pass structure of shape {want}")
            if tuple(structure.shape) != want:
                raise ValueError(
                    f"structure must have shape {want} (like x, {self.structure_channels} channels), "
                    f"got {tuple(structure.shape)}"
                )
            if structure_level is None:
                raise ValueError(f"pass structure_level (t_s in [0, {self.max_structure_level}], scalar or ({b},))")
            level = torch.as_tensor(structure_level, device=x.device)
            if level.is_floating_point() or level.is_complex() or level.dtype == torch.bool:
                raise ValueError(f"structure_level must be integer, got dtype {level.dtype}")
            if level.dim() == 0 or level.shape == (1,):
                level = level.reshape(1).expand(b)
            if level.shape != (b,):
                raise ValueError(f"structure_level must be a scalar or shape ({b},), got {tuple(level.shape)}")
            check_index_range(level, self.max_structure_level + 1, "structure_level (t_s)")
            x = torch.cat([x, structure.to(x.dtype)], dim=1)
        elif structure is not None or structure_level is not None:
            raise ValueError("this model has no structure conditioning (structure_channels=0) but got structure")
        # the rest (spatial size, timesteps, context, labels) as the image model checks it, on the first frame
        timesteps = super()._check_inputs(x[:, :, 0], timesteps, context, y)
        return x, timesteps, level

    def _run_block(
        self,
        block: TimestepEmbedSequential,
        temporal: nn.ModuleDict,
        h: Tensor,
        emb: Tensor,
        context: Tensor | None,
        num_frames: int | None,
    ) -> Tensor:
        """The spatial layers of ``block`` as TimestepEmbedSequential runs them, each followed by its temporal layer
        unless ``num_frames`` is None (image mode)."""
        for j, layer in enumerate(block):
            if isinstance(layer, TimestepBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            else:
                h = layer(h)
            if num_frames is not None and str(j) in temporal:
                h = temporal[str(j)](h, num_frames)
        return h

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
        *,
        structure: Tensor | None = None,
        structure_level: Tensor | int | None = None,
        image_mode: bool = False,
    ) -> Tensor:
        """ε̂ for a clip: x = z_t (B, C, T, H, W), timesteps (B,) or scalar, context (B, L, context_dim) (one content
        sequence per clip, shared by its frames), y (B,) class labels (class-conditional models), structure
        (B, S, T, H, W), structure_level t_s (B,) or scalar int; ``image_mode`` skips every temporal layer (the
        image model on each frame). Returns (B, out_channels, T, H, W)."""
        xs, timesteps, level = self._check_video_inputs(
            x, timesteps, context, y, structure, structure_level, image_mode
        )
        b, _, t = xs.shape[:3]
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))  # (B, 4·mc)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        if level is not None:  # t_s embedded like the timestep (Sec. 3.2), zero-initialised projection
            emb = emb + self.structure_embed(timestep_embedding(level, self.model_channels).to(dtype))
        emb = emb.repeat_interleave(t, dim=0)  # (B·T, 4·mc)
        ctx = context.repeat_interleave(t, dim=0) if context is not None else None  # (B·T, L, D)
        frames = None if image_mode else t

        h = rearrange(xs, "b c t h w -> (b t) c h w")  # (B·T, C + S, H, W)
        hs = []
        for block, temporal in zip(self.input_blocks, self.temporal_input_blocks):
            h = self._run_block(block, temporal, h, emb, ctx, frames)
            hs.append(h)
        h = self._run_block(self.middle_block, self.temporal_middle_block, h, emb, ctx, frames)
        for block, temporal in zip(self.output_blocks, self.temporal_output_blocks):
            h = self._run_block(block, temporal, torch.cat([h, hs.pop()], dim=1), emb, ctx, frames)
        out = self.out(h).type(x.dtype)  # (B·T, out, H, W)
        return rearrange(out, "(b t) c h w -> b c t h w", b=b)


# ------------------------------------------------------------------------------------------------------ presets

_VIDEO = dict(structure_channels=1, temporal_conv_layers=2, temporal_depth=1)

VIDEO_UNET_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: ldm's tiny UNet (cross-attention at ds 1 and 2, 8x8 latents, context 16), 8 frames
    "tiny": dict(UNET_PRESETS["tiny"], **_VIDEO, max_structure_level=5, max_frames=8),
    # toy: ldm's Fashion-MNIST latent UNet (4-channel 8x8 latents, context 384), 16 frames
    "fmnist_toy": dict(UNET_PRESETS["fmnist_tiny"], **_VIDEO, max_structure_level=5, max_frames=16),
    # paper scale: an SD-v1-like image LDM (64x64x4 KL-f8 latents, 768-wide content tokens = a CLIP ViT-L/14 image
    # embedding) with one depth channel. The paper gives no layer table: the base UNet, T_s = 7 and the 32-frame
    # position table are our choices, not the paper's numbers.
    "gen1": dict(UNET_PRESETS["sd_v1"], **_VIDEO, image_size=64, max_structure_level=7, max_frames=32),
}


def video_unet_from_preset(name: str, **overrides: Any) -> VideoUNetModel:
    """``VideoUNetModel(**VIDEO_UNET_PRESETS[name], **overrides)``."""
    if name not in VIDEO_UNET_PRESETS:
        raise ValueError(f"unknown video UNet preset {name!r}; choose from {sorted(VIDEO_UNET_PRESETS)}")
    return VideoUNetModel(**{**copy.deepcopy(VIDEO_UNET_PRESETS[name]), **overrides})
