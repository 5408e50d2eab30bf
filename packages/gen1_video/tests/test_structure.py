"""Structure estimators (OpenCV-parity Sobel, Canny, luminance, a tiny random DPT from a local folder), the registry,
and the t_s pyramid (cv2.pyrDown parity, smoothness monotone in t_s on real images, latent size, per-sample levels)."""

from __future__ import annotations

from itertools import pairwise

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from gen1_video.structure import (
    STRUCTURE_ESTIMATORS,
    CannyEdges,
    DPTDepth,
    Luminance,
    SobelEdges,
    blur_downsample,
    luminance,
    structure_condition,
    structure_estimator,
    structure_pyramid,
)
from gencore.io import MissingWeightsError


def _rgb(image: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1], optionally resized (cv2, area) to size x size."""
    if size is not None:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1


def _total_variation(x: torch.Tensor) -> float:
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def _laplacian_energy(x: torch.Tensor) -> float:
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).reshape(1, 1, 3, 3)
    return float(torch.nn.functional.conv2d(x, k).square().mean())


# ---------------------------------------------------------------------------------------------------- the pyramid


def test_blur_downsample_is_cv2_pyrdown():
    camera = skdata.camera()[:101, :150].astype(np.float32) / 127.5 - 1  # odd height: ceil(H / 2)
    ours = blur_downsample(torch.from_numpy(camera)[None, None])[0, 0].numpy()
    ref = cv2.pyrDown(camera)
    assert ours.shape == ref.shape == (51, 75)
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize(("name", "latent"), [("camera", 64), ("astronaut", 32)])
def test_smoothness_is_monotone_in_t_s_on_real_images(name, latent):
    image = getattr(skdata, name)()
    maps = torch.from_numpy(image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    maps = maps[None, None].float() / 127.5 - 1  # (1, 1, 512, 512)
    levels = [structure_pyramid(maps, t_s, latent, max_level=7) for t_s in range(8)]
    assert all(x.shape == (1, 1, latent, latent) for x in levels)
    tv = [_total_variation(x) for x in levels]
    lap = [_laplacian_energy(x) for x in levels]
    assert all(a >= b for a, b in pairwise(tv)), tv
    assert all(a >= b for a, b in pairwise(lap)), lap
    assert tv[-1] < 0.5 * tv[0]  # the coarsest level keeps only the layout
    # the layout survives: the coarsest level still correlates with the finest
    a, b = levels[0].flatten(), levels[-1].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.5


def test_structure_condition_per_sample_levels_equal_the_single_level_pyramid():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    levels = torch.tensor([0, 3, 5])
    out = structure_condition(maps, levels, (8, 8), max_level=5)
    for i, t_s in enumerate(levels.tolist()):
        ref = structure_pyramid(maps[i : i + 1], t_s, 8, max_level=5)
        assert torch.allclose(out[i : i + 1], ref, atol=1e-6)
    assert torch.equal(structure_condition(maps, 2, 8, max_level=5), structure_pyramid(maps, 2, 8, max_level=5))


def test_structure_condition_on_clips_uses_one_level_per_clip():
    g = torch.Generator().manual_seed(1)
    clips = torch.rand(2, 1, 3, 16, 16, generator=g) * 2 - 1  # (B, C, T, H, W)
    out = structure_condition(clips, torch.tensor([1, 4]), (4, 4), max_level=4)
    assert out.shape == (2, 1, 3, 4, 4)
    for b, t_s in ((0, 1), (1, 4)):
        for f in range(3):
            ref = structure_pyramid(clips[b : b + 1, :, f], t_s, 4, max_level=4)
            assert torch.allclose(out[b : b + 1, :, f], ref, atol=1e-6)


def test_t_s_out_of_range_and_bad_maps_raise():
    maps = torch.zeros(2, 1, 16, 16)
    for bad in (-1, 6):
        with pytest.raises(ValueError, match=rf"t_s={bad} is outside \[0, 5\]"):
            structure_pyramid(maps, bad, 8, max_level=5)
    with pytest.raises(ValueError, match=r"t_s: index 6 is outside \[0, 6\)"):
        structure_condition(maps, torch.tensor([0, 6]), 8, max_level=5)
    with pytest.raises(ValueError, match="one per map"):
        structure_condition(maps, torch.tensor([0.5, 1.0]), 8, max_level=5)
    with pytest.raises(ValueError, match="integer"):
        structure_pyramid(maps, 1.5, 8, max_level=5)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        structure_pyramid(maps[0], 1, 8, max_level=5)
    with pytest.raises(ValueError, match="size"):
        structure_pyramid(maps, 1, (8, 0), max_level=5)
    # the pyramid bottoms out at one pixel without failing
    assert structure_pyramid(maps + 0.25, 7, 4, max_level=7).allclose(torch.full((2, 1, 4, 4), 0.25))


# ---------------------------------------------------------------------------------------------------- estimators


def test_sobel_matches_opencv_on_a_real_photo():
    frames = _rgb(skdata.astronaut(), 96)
    ours = SobelEdges(blur_sigma=0.0)(frames)
    grey = cv2.cvtColor(((frames[0].permute(1, 2, 0).numpy() + 1) / 2).astype(np.float32), cv2.COLOR_RGB2GRAY)
    grey = grey * 2 - 1
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    mag = np.sqrt(gx**2 + gy**2)
    ref = (mag - mag.min()) / (mag.max() - mag.min()) * 2 - 1
    assert ours.shape == (1, 1, 96, 96)
    assert np.abs(ours[0, 0].numpy() - ref).max() < 1e-4


def test_estimators_map_frames_to_one_channel_in_range():
    frames = torch.cat([_rgb(skdata.astronaut(), 64), _rgb(skdata.chelsea(), 64), torch.zeros(1, 3, 64, 64)])
    for est in (SobelEdges(), CannyEdges(), Luminance()):
        out = est(frames)
        assert out.shape == (3, 1, 64, 64) and out.dtype == frames.dtype
        assert out.min() >= -1 and out.max() <= 1
        assert not any(p.requires_grad for p in est.parameters()) and not est.train().training
        assert (out[0] - out[1]).abs().max() > 0.5  # different photos, different maps
    edges = CannyEdges()(frames)
    assert set(edges.unique().tolist()) <= {-1.0, 1.0} and (edges[0] == 1).any() and (edges[2] == -1).all()
    assert torch.allclose(Luminance()(frames), luminance(frames))
    # a blank frame has no edges
    assert (SobelEdges()(frames)[2] == -1).all()


def test_registry_builds_by_name_and_refuses_unknown_names():
    assert isinstance(structure_estimator(), SobelEdges)
    assert isinstance(structure_estimator("canny", low=50, high=100), CannyEdges)
    assert set(STRUCTURE_ESTIMATORS) == {"sobel", "canny", "luminance", "dpt"}
    with pytest.raises(ValueError, match=r"unknown structure estimator 'midas'.*'canny'"):
        structure_estimator("midas")
    with pytest.raises(ValueError, match="Canny thresholds"):
        CannyEdges(low=200, high=100)
    with pytest.raises(ValueError, match=r"frames must be \(N, 3, H, W\)"):
        SobelEdges()(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="floating point"):
        Luminance()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory):
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = tmp_path_factory.mktemp("tiny_dpt")
    cfg = DPTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    torch.manual_seed(0)
    DPTForDepthEstimation(cfg).save_pretrained(folder)
    DPTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def test_dpt_depth_from_a_local_folder(tiny_dpt):
    est = structure_estimator("dpt", path=tiny_dpt)
    frames = torch.cat([_rgb(skdata.astronaut(), 48), _rgb(skdata.coffee(), 48)])[:, :, :40]  # not square
    depth = est(frames)
    assert depth.shape == (2, 1, 40, 48)
    assert torch.allclose(depth.amin(dim=(1, 2, 3)), torch.tensor(-1.0)) and torch.allclose(
        depth.amax(dim=(1, 2, 3)), torch.tensor(1.0)
    )
    # the same as running the model by hand on the square, normalised input
    x = torch.nn.functional.interpolate((frames + 1) / 2, size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        raw = est.model(pixel_values=(x.clamp(0, 1) - 0.5) / 0.5).predicted_depth[:, None]
    raw = torch.nn.functional.interpolate(raw, size=(40, 48), mode="bicubic", align_corners=False)
    lo, hi = raw.amin(dim=(2, 3), keepdim=True), raw.amax(dim=(2, 3), keepdim=True)
    assert torch.allclose(depth, (raw - lo) / (hi - lo) * 2 - 1, atol=1e-5)
    assert (depth[0] - depth[1]).abs().max() > 0.1
    assert not any(p.requires_grad for p in est.parameters())


def test_dpt_without_weights_says_what_is_missing(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"Intel/dpt-large.*config\.json does not exist"):
        DPTDepth(tmp_path / "nowhere")
