"""Gen-1's video UNet (gen1_video.models.video_unet): inflation from ldm's image UNet, zero-initialised temporal layers,
image mode, structure channels and the t_s embedding, content shared by frames, gradients, round trip, bad input."""

from __future__ import annotations

import pytest
import torch

from gen1_video.models.video_unet import (
    TEMPORAL_PREFIXES,
    VIDEO_UNET_PRESETS,
    TemporalAttentionBlock,
    TemporalConvBlock,
    VideoUNetModel,
    image_unet_config,
    video_unet_from_preset,
)
from gencore.io import CheckpointKeyError
from gencore.testing import (
    assert_deterministic,
    assert_grads_reach_all_parameters,
    assert_state_dict_roundtrip,
    randomize_parameters,
)
from ldm.models.unet import UNET_PRESETS, UNetModel, unet_from_preset

B, T, HW = 2, 4, 8


def _trained_image_unet(seed: int = 0, **overrides) -> UNetModel:
    """ldm's tiny UNet with random non-zero weights (a fresh one outputs zeros: its ``out.2`` is zero-initialised)."""
    torch.manual_seed(seed)
    return randomize_parameters(unet_from_preset("tiny", **overrides), seed=seed).eval()


def _inputs(frames: int = T, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, frames, HW, HW, generator=g)
    structure = torch.rand(B, 1, frames, HW, HW, generator=g) * 2 - 1
    ctx = torch.randn(B, 3, 16, generator=g)
    t = torch.tensor([10, 600])
    return x, t, ctx, structure


def _framewise(image_unet: UNetModel, x, t, ctx, **kw):
    """The image UNet on every frame of (B, C, T, H, W) on its own."""
    frames = x.shape[2]
    outs = [image_unet(x[:, :, i], t, ctx, **kw) for i in range(frames)]
    return torch.stack(outs, dim=2)


def _perturb_temporal(model: VideoUNetModel, seed: int = 3, std: float = 0.1) -> VideoUNetModel:
    """What training does to the temporal layers (and the t_s projection): every such weight non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(TEMPORAL_PREFIXES):
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


# ---------------------------------------------------------------------------------------------- structure / keys


def test_spatial_keys_are_ldms_and_temporal_layers_follow_each_resblock_and_attention():
    image = unet_from_preset("tiny")
    video = video_unet_from_preset("tiny")
    img_sd, vid_sd = image.state_dict(), video.state_dict()
    spatial = {k: v for k, v in vid_sd.items() if not k.startswith(TEMPORAL_PREFIXES)}
    assert set(spatial) == set(img_sd)  # the 286 official keys, nothing renamed
    for k, v in img_sd.items():
        want = (v.shape[0], 5, *v.shape[2:]) if k == "input_blocks.0.0.weight" else v.shape
        assert spatial[k].shape == want, k
    # one temporal conv per ResBlock, one temporal attention per SpatialTransformer, at the same (block, index)
    from ldm.models.unet import ResBlock, SpatialTransformer

    for prefix, blocks, temporal in (
        ("input_blocks", video.input_blocks, video.temporal_input_blocks),
        ("output_blocks", video.output_blocks, video.temporal_output_blocks),
        ("middle_block", [video.middle_block], [video.temporal_middle_block]),
    ):
        for i, (block, temp) in enumerate(zip(blocks, temporal)):
            for j, layer in enumerate(block):
                kind = {ResBlock: TemporalConvBlock, SpatialTransformer: TemporalAttentionBlock}.get(type(layer))
                if kind is None:
                    assert str(j) not in temp, f"{prefix}.{i}.{j}"
                else:
                    assert isinstance(temp[str(j)], kind), f"{prefix}.{i}.{j}"
    assert vid_sd["temporal_input_blocks.1.1.pos_embed"].shape == (8, 32)  # max_frames x heads·d_head
    assert vid_sd["temporal_middle_block.0.layers.1.3.weight"].shape == (64, 64, 3, 1, 1)  # kernel 3 over frames
    assert vid_sd["structure_embed.2.weight"].shape == (128, 128)


def test_paper_scale_preset_has_sd_v1_spatial_keys():
    with torch.device("meta"):
        video = video_unet_from_preset("gen1")
        image = UNetModel(**UNET_PRESETS["sd_v1"])
    img_sd = image.state_dict()
    spatial = {k: v.shape for k, v in video.state_dict().items() if not k.startswith(TEMPORAL_PREFIXES)}
    assert set(spatial) == set(img_sd)
    assert spatial["input_blocks.0.0.weight"] == (320, 5, 3, 3)  # 4 latent + 1 depth channel
    assert video.context_dim == 768 and video.max_frames == 32
    n_temporal = sum(p.numel() for n, p in video.named_parameters() if n.startswith(TEMPORAL_PREFIXES))
    n_spatial = sum(p.numel() for p in image.parameters())
    assert 0.2 < n_temporal / n_spatial < 1.0  # a substantial but smaller temporal part


def test_presets_are_ldm_presets_plus_video_settings():
    for name, base in (("tiny", "tiny"), ("fmnist_toy", "fmnist_tiny"), ("gen1", "sd_v1")):
        preset = VIDEO_UNET_PRESETS[name]
        for k, v in UNET_PRESETS[base].items():
            if k != "image_size":
                assert preset[k] == v, (name, k)
    with pytest.raises(ValueError, match="unknown video UNet preset"):
        video_unet_from_preset("nope")


# ------------------------------------------------------------------------------------------------ initialisation


def test_temporal_outputs_and_structure_inputs_are_zero_at_construction():
    video = video_unet_from_preset("tiny")
    sd = video.state_dict()
    zero = [k for k in sd if k.startswith("temporal_") and (".proj_out." in k or ".layers.1.3." in k)]
    n_temporal = sum(isinstance(m, TemporalConvBlock | TemporalAttentionBlock) for m in video.modules())
    assert n_temporal == 8 + 7  # 8 ResBlocks, 7 SpatialTransformers in ldm's tiny UNet
    assert len(zero) == 2 * n_temporal  # weight + bias of each temporal conv's last conv / attention's proj_out
    assert all(sd[k].abs().max() == 0 for k in zero)
    assert sd["structure_embed.2.weight"].abs().max() == 0 and sd["structure_embed.2.bias"].abs().max() == 0
    assert sd["input_blocks.0.0.weight"][:, 4:].abs().max() == 0
    assert sd["input_blocks.0.0.weight"][:, :4].abs().max() > 0
    # every other temporal weight is non-trivial (not left at zero by accident)
    assert sd["temporal_input_blocks.1.0.layers.0.3.weight"].abs().max() > 0
    assert sd["temporal_input_blocks.1.1.proj_in.weight"].abs().max() > 0
    assert sd["temporal_input_blocks.1.1.pos_embed"].abs().max() > 0


def test_inflated_model_equals_the_image_model_frame_by_frame_at_init():
    image = _trained_image_unet()
    video = VideoUNetModel.from_image_unet(image, max_frames=8).eval()
    x, t, ctx, s = _inputs()
    with torch.no_grad():
        out_video = video(x, t, ctx, structure=s, structure_level=torch.tensor([0, 5]))
        out_image_mode = video(x, t, ctx, structure=s, structure_level=3, image_mode=True)
        ref = _framewise(image, x, t, ctx)
        # the image model's own float32 rounding between batch layouts (all frames at once vs one at a time)
        flat = x.permute(0, 2, 1, 3, 4).reshape(B * T, 4, HW, HW)
        batched = image(flat, t.repeat_interleave(T), ctx.repeat_interleave(T, 0))
        floor = (batched.reshape(B, T, 4, HW, HW).permute(0, 2, 1, 3, 4) - ref).abs().max()
    assert ref.abs().max() > 0.5  # a non-trivial image model
    # zero-initialised temporal layers, t_s projection and structure columns contribute exactly nothing ...
    assert torch.equal(out_video, out_image_mode)
    # ... so video mode is the image model on each frame, up to float32 kernel rounding (1e-6 of the output scale)
    err = (out_video - ref).abs().max()
    assert err <= 1e-6 * ref.abs().max() + 2 * floor, (float(err), float(floor))
    assert err < 1e-5


def test_video_dtype_device_and_mode_follow_the_image_unet():
    image = _trained_image_unet().train()
    video = VideoUNetModel.from_image_unet(image)
    assert video.training and next(video.parameters()).dtype == torch.float32
    video_sd = video.state_dict()
    for name, p in image.state_dict().items():
        q = video_sd[name]
        assert torch.equal(q[:, :4] if name == "input_blocks.0.0.weight" else q, p), name


# --------------------------------------------------------------------------------------------------- image mode


def test_image_mode_bypasses_trained_temporal_layers():
    image = _trained_image_unet()
    video = _perturb_temporal(VideoUNetModel.from_image_unet(image, max_frames=8, structure_channels=0)).eval()
    x, t, ctx, _ = _inputs()
    with torch.no_grad():
        ref = _framewise(image, x, t, ctx)
        out_image = video(x, t, ctx, image_mode=True)
        out_video = video(x, t, ctx)
    assert (out_image - ref).abs().max() < 1e-5
    assert (out_video - ref).abs().max() > 1e-2  # the temporal layers now do something in video mode


def test_temporal_layers_couple_frames_only_in_video_mode():
    video = _perturb_temporal(VideoUNetModel.from_image_unet(_trained_image_unet(), structure_channels=0)).eval()
    x, t, ctx, _ = _inputs()
    x2 = x.clone()
    x2[:, :, 0] += 1.0  # change the first frame only
    with torch.no_grad():
        for image_mode, coupled in ((False, True), (True, False)):
            a = video(x, t, ctx, image_mode=image_mode)
            b = video(x2, t, ctx, image_mode=image_mode)
            later = (a[:, :, 1:] - b[:, :, 1:]).abs().max()
            assert (later > 1e-3) == coupled, (image_mode, float(later))
            assert (a[:, :, 0] - b[:, :, 0]).abs().max() > 1e-3


def test_single_frame_video_mode_equals_image_mode_only_while_temporal_layers_are_zero():
    """An image is a 1-frame clip, but after training the temporal layers act on it (attention over one frame is
    still proj_out(v), the temporal conv's centre tap is a 1x1 conv): images must use image mode."""
    video = VideoUNetModel.from_image_unet(_trained_image_unet(), structure_channels=0).eval()
    x, t, ctx, _ = _inputs(frames=1)
    with torch.no_grad():
        assert torch.equal(video(x, t, ctx), video(x, t, ctx, image_mode=True))
        _perturb_temporal(video)
        assert (video(x, t, ctx) - video(x, t, ctx, image_mode=True)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ structure / content


def test_structure_level_embedding_changes_the_output_once_its_projection_is_trained():
    video = VideoUNetModel.from_image_unet(_trained_image_unet()).eval()
    x, t, ctx, s = _inputs()
    with torch.no_grad():
        assert torch.equal(
            video(x, t, ctx, structure=s, structure_level=0), video(x, t, ctx, structure=s, structure_level=5)
        )
        torch.nn.init.normal_(video.structure_embed[2].weight, std=0.1)
        a = video(x, t, ctx, structure=s, structure_level=0)
        b = video(x, t, ctx, structure=s, structure_level=5)
        c = video(x, t, ctx, structure=s, structure_level=torch.tensor([0, 5]))
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(c[0], a[0]) and torch.allclose(c[1], b[1], atol=1e-6)  # per-clip levels


def test_structure_channels_are_read_once_their_weights_are_trained():
    video = VideoUNetModel.from_image_unet(_trained_image_unet()).eval()
    x, t, ctx, s = _inputs()
    with torch.no_grad():
        assert torch.equal(
            video(x, t, ctx, structure=s, structure_level=1), video(x, t, ctx, structure=-s, structure_level=1)
        )
        torch.nn.init.normal_(video.input_blocks[0][0].weight[:, 4:], std=0.1)
        assert (
            video(x, t, ctx, structure=s, structure_level=1) - video(x, t, ctx, structure=-s, structure_level=1)
        ).abs().max() > 1e-3


def test_content_is_shared_by_the_frames_of_a_clip():
    video = _perturb_temporal(VideoUNetModel.from_image_unet(_trained_image_unet(), structure_channels=0)).eval()
    x, t, ctx, _ = _inputs()
    ctx2 = ctx.clone()
    ctx2[1] = torch.randn(3, 16)
    with torch.no_grad():
        a, b = video(x, t, ctx), video(x, t, ctx2)
    assert torch.allclose(a[0], b[0], atol=1e-6)  # clip 0's content unchanged
    assert ((a[1] - b[1]).abs().amax(dim=(0, 2, 3)) > 1e-3).all()  # every frame of clip 1 sees the new content


# ----------------------------------------------------------------------------------------------- model contract


@pytest.mark.parametrize("frames", [1, 3, 8])
def test_shapes(frames):
    video = randomize_parameters(video_unet_from_preset("tiny")).eval()
    x, t, ctx, s = _inputs(frames=frames)
    with torch.no_grad():
        out = video(x, t, ctx, structure=s, structure_level=2)
    assert out.shape == (B, 4, frames, HW, HW) and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter_in_video_mode_and_no_temporal_one_in_image_mode():
    video = randomize_parameters(video_unet_from_preset("tiny"))
    x, t, ctx, s = _inputs()
    assert_grads_reach_all_parameters(video, video(x, t, ctx, structure=s, structure_level=3).square().mean())
    video.zero_grad(set_to_none=True)
    video(x, t, ctx, structure=s, structure_level=3, image_mode=True).square().mean().backward()
    temporal = {n for n, _ in video.named_parameters() if n.startswith(TEMPORAL_PREFIXES[:3])}
    assert temporal and {n for n, p in video.named_parameters() if p.grad is None} == temporal
    assert {id(p) for p in video.temporal_parameters()} == {id(p) for n, p in video.named_parameters() if n in temporal}


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, ctx, s = _inputs()
    grads = []
    for use_checkpoint in (False, True):
        video = randomize_parameters(video_unet_from_preset("tiny", use_checkpoint=use_checkpoint))
        video(x, t, ctx, structure=s, structure_level=1).square().mean().backward()
        grads.append(video.temporal_input_blocks[1]["1"].proj_in.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_deterministic_and_safetensors_round_trip(tmp_path):
    video = randomize_parameters(video_unet_from_preset("tiny")).eval()
    x, t, ctx, s = _inputs()
    kwargs = dict(structure=s, structure_level=torch.tensor([1, 4]))
    with torch.no_grad():
        assert_deterministic(lambda: video(x, t, ctx, **kwargs))
    assert_state_dict_roundtrip(video, lambda: video_unet_from_preset("tiny"), (x, t, ctx), tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------ image checkpoints


def test_an_official_image_checkpoint_loads_strictly_into_the_spatial_part():
    image = _trained_image_unet()
    official = {f"model.diffusion_model.{k}": v for k, v in image.state_dict().items()}
    official["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)  # other parts of an LDM checkpoint
    video = video_unet_from_preset("tiny")
    fresh_temporal = {k: v.clone() for k, v in video.state_dict().items() if k.startswith(TEMPORAL_PREFIXES)}
    assert video.load_image_state_dict(official, prefix="model.diffusion_model.") == ([], [])
    image_sd = image.state_dict()
    for k, v in video.state_dict().items():
        assert torch.equal(v, fresh_temporal[k] if k in fresh_temporal else v), k  # temporal weights untouched
        if not k.startswith(TEMPORAL_PREFIXES) and k != "input_blocks.0.0.weight":
            assert torch.equal(v, image_sd[k]), k
    assert torch.equal(video.input_blocks[0][0].weight[:, :4], image.input_blocks[0][0].weight)
    assert video.input_blocks[0][0].weight[:, 4:].abs().max() == 0

    state = dict(image.state_dict())
    del state["middle_block.1.proj_out.weight"]
    with pytest.raises(CheckpointKeyError, match=r"middle_block\.1\.proj_out\.weight"):
        video.load_image_state_dict(state)
    state = dict(image.state_dict(), **{"input_blocks.9.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match="unexpected"):
        video.load_image_state_dict(state)
    with pytest.raises(ValueError, match="prefix"):
        video.load_image_state_dict(image.state_dict(), prefix="model.diffusion_model.")


def test_a_video_state_dict_reloads_with_its_temporal_weights():
    trained = _perturb_temporal(randomize_parameters(video_unet_from_preset("tiny")))
    fresh = video_unet_from_preset("tiny")
    assert fresh.load_image_state_dict(trained.state_dict()) == ([], [])
    loaded = fresh.state_dict()
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize(
    "overrides",
    [
        dict(use_spatial_transformer=False, context_dim=None, num_classes=3),  # ADM AttentionBlocks, class labels
        dict(use_spatial_transformer=False, context_dim=None, num_heads=2, num_heads_upsample=1, legacy=True),
        dict(use_linear_in_transformer=True, transformer_depth=2, use_scale_shift_norm=True, resblock_updown=True),
    ],
)
def test_inflating_other_image_unet_variants(overrides):
    image = _trained_image_unet(**overrides)
    cfg = image_unet_config(image)
    rebuilt = UNetModel(**cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in image.state_dict().items()}
    video = VideoUNetModel.from_image_unet(image, structure_channels=0).eval()
    x, t, ctx, _ = _inputs(frames=2)
    ctx = None if image.context_dim is None else ctx
    kw = {"y": torch.tensor([0, 2])} if image.num_classes else {}
    with torch.no_grad():
        err = (video(x, t, ctx, **kw) - _framewise(image, x, t, ctx, **kw)).abs().max()
    assert err < 1e-5


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    video = video_unet_from_preset("tiny").eval()
    x, t, ctx, s = _inputs()
    ok = dict(structure=s, structure_level=1)
    cases = [
        ((x[:, :, 0], t, ctx), ok, "must be a video"),
        ((x[:, :3], t, ctx), dict(structure=s[:, :, :, :, :], structure_level=1), "3 channels.*4 latent"),
        (
            (torch.randn(B, 4, 9, HW, HW), t, ctx),
            dict(structure=torch.zeros(B, 1, 9, HW, HW), structure_level=1),
            "9 frames exceed.*max_frames=8",
        ),
        ((x, t, ctx), dict(structure_level=1), "structure-conditioned"),
        ((x, t, ctx), dict(structure=s[:, :, :2], structure_level=1), "structure must have shape"),
        ((x, t, ctx), dict(structure=s), "pass structure_level"),
        ((x, t, ctx), dict(structure=s, structure_level=6), r"structure_level.*index 6 is outside \[0, 6\)"),
        ((x, t, ctx), dict(structure=s, structure_level=torch.tensor([0, -1])), "index -1 is outside"),
        ((x, t, ctx), dict(structure=s, structure_level=0.5), "must be integer"),
        ((x, t, ctx), dict(structure=s, structure_level=torch.tensor([1, 2, 3])), r"scalar or shape \(2,\)"),
        ((x, t, ctx), dict(ok, image_mode=torch.tensor(True)), "Python bool"),
        ((x, t, ctx[0]), ok, "context"),
        ((x, t, None), ok, "pass context"),
        (
            (torch.randn(B, 4, T, 5, 5), t, ctx),
            dict(structure=torch.zeros(B, 1, T, 5, 5), structure_level=1),
            "not divisible",
        ),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            video(*args, **kwargs)
    # image mode has no frame position table to run out of
    long = torch.randn(1, 4, 9, HW, HW)
    with torch.no_grad():
        out = video(long, t[:1], ctx[:1], structure=torch.zeros(1, 1, 9, HW, HW), structure_level=0, image_mode=True)
    assert out.shape == long.shape
    unstructured = video_unet_from_preset("tiny", structure_channels=0)
    with pytest.raises(ValueError, match="no structure conditioning"):
        unstructured(x, t, ctx, structure=s, structure_level=1)
    for bad, match in (
        (dict(structure_channels=-1), "structure_channels"),
        (dict(max_frames=0), "max_frames"),
        (dict(max_structure_level=-2), "max_structure_level"),
        (dict(temporal_conv_layers=0), "num_layers"),
    ):
        with pytest.raises(ValueError, match=match):
            video_unet_from_preset("tiny", **bad)
    with pytest.raises(ValueError, match="UNetModel"):
        VideoUNetModel.from_image_unet(torch.nn.Linear(2, 2))


def test_toy_preset_inflates_ldms_fmnist_unet_and_runs_its_longest_clip():
    torch.manual_seed(0)
    image = randomize_parameters(unet_from_preset("fmnist_tiny")).eval()
    video = VideoUNetModel.from_image_unet(image, max_frames=16).eval()
    assert image_unet_config(image) == image_unet_config(video)  # the video model rebuilds as its image model
    ref = video_unet_from_preset("fmnist_toy")
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in video.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 1, 384, generator=g)
    s = torch.zeros(1, 1, 16, 8, 8)
    with torch.no_grad():
        out = video(x, torch.tensor([500]), ctx, structure=s, structure_level=5)
        ref_out = _framewise(image, x[:, :, :3], torch.tensor([500]), ctx)
    assert out.shape == x.shape
    assert (out[:, :, :3] - ref_out).abs().max() < 1e-5
