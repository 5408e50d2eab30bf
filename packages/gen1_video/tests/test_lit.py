"""The Gen-1 training module on real clips with a tiny model: the loss falls, joint image / video steps, temporal-only
training, starting from an image LDM, and guided editing / sampling."""

from __future__ import annotations

import pytest
import torch

from gen1_video.content import ConvContentEncoder
from gen1_video.data import Clips
from gen1_video.lit import Gen1VideoDiffusion, is_image_step
from gen1_video.models.video_unet import TEMPORAL_PREFIXES, video_unet_from_preset
from gencore.data.video import OPENCV_SAMPLES
from gencore.io import CheckpointKeyError, export

TREE = OPENCV_SAMPLES / "tree.avi"
pytestmark = pytest.mark.skipif(not TREE.is_file(), reason="opencv-doc sample videos missing (make data)")


def _module(**kw) -> Gen1VideoDiffusion:
    torch.manual_seed(0)
    unet = video_unet_from_preset("tiny", in_channels=3, out_channels=3)
    content = ConvContentEncoder(context_dim=16, channels=(8, 16), image_size=8)
    args = dict(image_channels=3, image_size=8, num_frames=4, learning_rate=2e-3, sample={"num_steps": 4})
    return Gen1VideoDiffusion(unet, content=content, **{**args, **kw})


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    ds = Clips([TREE], num_frames=4, stride=2, size=8, cache=True, max_clips_per_video=4)
    return torch.stack([ds[i]["video"] for i in range(4)])  # (4, 3, 4, 8, 8) real clips


def _fixed_loss(m: Gen1VideoDiffusion, videos: torch.Tensor) -> float:
    with torch.no_grad():
        return float(m._loss(videos, "val", generator=torch.Generator().manual_seed(0)))


def test_loss_is_finite_and_falls_on_real_clips(clips):
    m = _module()
    opt = m.configure_optimizers()
    before = _fixed_loss(m, clips)
    for _ in range(12):
        loss = m._loss(clips, "train")
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _fixed_loss(m, clips)
    assert after < 0.9 * before, (before, after)


def test_image_steps_are_spread_by_the_ratio():
    assert [is_image_step(s, 0.5) for s in range(6)] == [False, True] * 3
    assert sum(is_image_step(s, 0.25) for s in range(100)) == 25
    assert not any(is_image_step(s, 0.0) for s in range(10))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step called without a Trainer
def test_joint_steps_use_image_mode_for_images(clips):
    m = _module(image_ratio=0.5)
    images = clips[:, :, 0][:, None]  # (B, K=1, C, H, W): frames as images
    batch = {"video": clips, "image": images}
    temporal = m.unet.temporal_parameters()
    # step 0: a video step, through every temporal layer
    loss = m.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in temporal)
    m.zero_grad(set_to_none=True)
    # step 1 (global_step is Lightning's counter; set by hand here): an image step in image mode, no temporal gradient
    m.trainer = None
    type(m).global_step = property(lambda self: 1)
    try:
        loss = m.training_step(batch, 1)
    finally:
        del type(m).global_step
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in temporal)
    assert any(p.grad is not None for n, p in m.unet.named_parameters() if n.startswith("input_blocks"))
    with pytest.raises(ValueError, match="needs image batches"):
        m.check_datamodule(type("DM", (), {"image_size": 8, "channels": 3, "images_per_clip": 0})())


def test_temporal_only_training_leaves_spatial_weights_unchanged(clips):
    m = _module(train_only_temporal=True, temporal_learning_rate=5e-3)
    with torch.no_grad():  # a trained image model's output layer (ldm zero-initialises it: no gradient inside at init)
        m.unet.out[-1].weight.normal_(std=0.05)
    opt = m.configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == [5e-3]  # only the temporal group
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not n.startswith("unet.temporal_")}
    temporal = {n: p.detach().clone() for n, p in m.named_parameters() if n.startswith("unet.temporal_")}
    assert any(n.startswith("content.") for n in frozen) and temporal
    for _ in range(3):
        loss = m._loss(clips, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(m.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert any(not torch.equal(params[n], v) for n, v in temporal.items())
    full = _module(temporal_learning_rate=1e-4).configure_optimizers()
    assert sorted(g["lr"] for g in full.param_groups) == [1e-4, 2e-3]


def test_starts_from_an_image_ldm(tmp_path):
    from ldm.lit import LatentDiffusion
    from ldm.models.unet import unet_from_preset

    cfg = {
        "module": {
            "_target_": "ldm.lit.LatentDiffusion",
            "unet": {
                "_target_": "ldm.models.unet.unet_from_preset",
                "name": "tiny",
                "in_channels": 3,
                "out_channels": 3,
            },
            "image_channels": 3,
            "image_size": 8,
        }
    }
    torch.manual_seed(1)
    image = LatentDiffusion(unet_from_preset("tiny", in_channels=3, out_channels=3), image_channels=3, image_size=8)
    export(image, cfg, tmp_path / "image_ldm")
    m = _module(init_from=str(tmp_path / "image_ldm"))
    m.setup("fit")
    ours = m.unet.state_dict()
    for k, v in image.model.diffusion_model.state_dict().items():
        if k == "input_blocks.0.0.weight":
            torch.testing.assert_close(ours[k][:, :3], v)  # + zero structure channels
            assert ours[k][:, 3:].abs().sum() == 0
        else:
            torch.testing.assert_close(ours[k], v)
    assert all(not k.startswith(TEMPORAL_PREFIXES) for k in image.model.diffusion_model.state_dict())
    # structure_init_std: the structure channels start random (std as asked), everything else as loaded
    drawn = _module(init_from=str(tmp_path / "image_ldm"), structure_init_std=0.1)
    drawn.setup("fit")
    w = drawn.unet.input_blocks[0][0].weight.detach()
    torch.testing.assert_close(w[:, :3], ours["input_blocks.0.0.weight"][:, :3])
    assert 0.07 < float(w[:, 3:].std()) < 0.13
    with pytest.raises(ValueError, match="structure_init_std"):
        _module(structure_init_std=-1.0)
    wider = Gen1VideoDiffusion(
        video_unet_from_preset("tiny", in_channels=3, out_channels=3, model_channels=64),
        content=ConvContentEncoder(context_dim=16, channels=(8, 16), image_size=8),
        image_channels=3,
        image_size=8,
        num_frames=4,
        init_from=str(tmp_path / "image_ldm"),
    )
    with pytest.raises(CheckpointKeyError, match="init_from="):
        wider.setup("fit")


def test_edit_and_generate(clips):
    m = _module().eval()
    ctx = m.encode_content(clips[:, :, 0])
    g = lambda: torch.Generator().manual_seed(3)
    out = m.edit(clips[:2], ctx[:2], generator=g(), structure_level=2, temporal_scale=1.5, guidance_scale=2.0)
    assert out.shape == (2, 3, 4, 8, 8) and torch.isfinite(out).all() and out.abs().max() <= 1
    again = m.edit(clips[:2], ctx[:2], generator=g(), structure_level=2, temporal_scale=1.5, guidance_scale=2.0)
    torch.testing.assert_close(out, again)  # seeded
    # a freshly inflated model equals its image model: frame-by-frame sampling gives the same clip
    fbf = m.edit(clips[:2], ctx[:2], generator=g(), structure_level=2, frame_by_frame=True, guidance_scale=2.0)
    video = m.edit(clips[:2], ctx[:2], generator=g(), structure_level=2, guidance_scale=2.0)
    torch.testing.assert_close(fbf, video, atol=1e-5, rtol=0)
    partial = m.edit(clips[:2], ctx[:2], generator=g(), strength=0.3)
    assert (partial - clips[:2]).abs().mean() < (out - clips[:2]).abs().mean()  # less noise: closer to the input
    with pytest.raises(ValueError, match=r"t_s=6 is outside \[0, 5\]"):
        m.edit(clips[:1], ctx[:1], structure_level=6)
    with pytest.raises(ValueError, match="strength"):
        m.edit(clips[:1], ctx[:1], strength=0.0)
    res = m.generate(2, videos=clips, generator=g())
    assert res["images"].shape == (2, 3, 4, 8, 8) and res["sources"].shape == (2, 3, 4, 8, 8)
    torch.testing.assert_close(res["content"], clips[:2, :, 2].roll(-1, 0))


def test_source_clips_take_the_videos_in_turn(tmp_path):
    from gen1_video.data import read_video, write_video

    m = _module()
    other = tmp_path / "vtest_start.mp4"  # a short second video: the first 40 frames of vtest.avi
    write_video(read_video(OPENCV_SAMPLES / "vtest.avi", 40, size=16)[0], other, fps=10)
    out = m.source_clips(5, [TREE, other])
    assert out.shape == (5, 3, 4, 8, 8)
    own = {p.name: torch.stack([c["video"] for c in Clips([p], num_frames=4, stride=1, size=8)]) for p in (TREE, other)}

    def video_of(clip: torch.Tensor) -> str:
        return next(name for name, clips in own.items() if any(torch.equal(clip, c) for c in clips))

    assert [video_of(c) for c in out] == ["tree.avi", "vtest_start.mp4"] * 2 + ["tree.avi"]
    assert not torch.equal(out[0], out[2]) and not torch.equal(out[1], out[3])  # spread within each video


def test_content_augmentation_moves_the_content_frame(clips):
    frames = clips[:, :, 0]  # (4, 3, 8, 8) real frames
    tiny = _module(content_augment=1e-6)  # no zoom or shift: each frame as it is, or mirrored
    out = tiny.augment_content(frames, generator=torch.Generator().manual_seed(0))
    for x, y in zip(frames, out):
        assert min((y - x).abs().max(), (y - x.flip(-1)).abs().max()) < 1e-4
    m = _module(content_augment=0.3)
    a = m.augment_content(frames, generator=torch.Generator().manual_seed(1))
    b = m.augment_content(frames, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == frames.shape
    assert all(min((y - x).abs().max(), (y - x.flip(-1)).abs().max()) > 0.05 for x, y in zip(frames, a))
    assert a.min() >= frames.min() - 1e-5 and a.max() <= frames.max() + 1e-5  # resampled, reflected borders
    with pytest.raises(ValueError, match="content_augment"):
        _module(content_augment=1.0)
