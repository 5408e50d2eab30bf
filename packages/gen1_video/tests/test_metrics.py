"""Frame consistency and prompt / content consistency with pluggable encoders (a tiny random CLIP, the in-project conv
encoder, a plain callable)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from gen1_video.content import CLIPContentEncoder, ConvContentEncoder
from gen1_video.metrics import frame_consistency, frame_embeddings, prompt_consistency, structure_fidelity
from gen1_video.structure import SobelEdges
from gencore.testing import tiny_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return CLIPContentEncoder(tiny_clip(tmp_path_factory.mktemp("tiny_clip_metrics")))


def _photo(name: str, size: int = 40) -> torch.Tensor:
    image = cv2.resize(getattr(skdata, name)(), (size, size), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


def _clip_of(*frames: torch.Tensor) -> torch.Tensor:
    return torch.stack(frames, dim=1)  # (3, T, H, W)


def test_identical_frames_are_perfectly_consistent_and_different_ones_are_not(clip):
    a, b, c = _photo("astronaut"), _photo("coffee"), _photo("chelsea")
    still = _clip_of(a, a, a, a)
    cuts = _clip_of(a, b, c, a)
    mean, scores = frame_consistency(torch.stack([still, cuts]), clip)
    assert scores.shape == (2,)
    assert abs(float(scores[0]) - 1.0) < 1e-6
    assert float(scores[1]) < 0.999 and abs(mean - float(scores.mean())) < 1e-7
    # by hand: consecutive cosines of the cut clip
    e = clip.embed_images(torch.stack([a, b, c, a]))
    by_hand = torch.nn.functional.cosine_similarity(e[1:], e[:-1], dim=-1).mean()
    assert torch.allclose(scores[1], by_hand, atol=1e-6)
    # a slowly changing clip scores higher than hard cuts (brightness ramp of one photo)
    ramp = _clip_of(*(a * (1 - 0.05 * i) for i in range(4)))
    assert frame_consistency(ramp[None], clip)[0] > float(scores[1])


def test_prompt_and_content_consistency(clip):
    a, b = _photo("astronaut"), _photo("coffee")
    videos = torch.stack([_clip_of(a, a, b), _clip_of(b, b, b)])
    # content consistency against a content image's embedding
    ref = clip.embed_images(torch.stack([a, b]))
    _, scores = prompt_consistency(videos, ref, clip)
    assert abs(float(scores[1]) - 1.0) < 1e-6  # every frame is the content image
    e = clip.embed_images(torch.stack([a, a, b]))
    assert torch.allclose(scores[0], torch.nn.functional.cosine_similarity(e, ref[0:1]).mean(), atol=1e-6)
    # prompts through the text tower
    mean, by_text = prompt_consistency(videos, ["an astronaut", "a cup of coffee"], clip)
    t = clip.embed_texts(["an astronaut", "a cup of coffee"])
    e_all = frame_embeddings(videos, clip)  # (2, 3, D)
    want = torch.nn.functional.cosine_similarity(e_all, t[:, None], dim=-1).mean(dim=1)
    assert torch.allclose(by_text, want, atol=1e-6) and abs(mean - float(want.mean())) < 1e-6
    assert (by_text.abs() <= 1).all()
    # one reference for all clips
    assert torch.allclose(prompt_consistency(videos, ref[0], clip)[1][0], scores[0])


def test_encoders_are_pluggable_and_bad_input_is_refused(clip):
    torch.manual_seed(0)
    a, b = _photo("astronaut"), _photo("coffee")
    videos = torch.stack([_clip_of(a, a), _clip_of(a, b)])
    conv = ConvContentEncoder(context_dim=8, channels=(8, 16), image_size=16).eval()
    scores = frame_consistency(videos, conv)[1]
    assert abs(float(scores[0]) - 1.0) < 1e-6 and float(scores[1]) < 1.0
    mean_colour = lambda x: x.mean(dim=(2, 3))
    assert frame_consistency(videos, mean_colour, batch_size=1)[1].shape == (2,)
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_consistency(videos[:, :, :1], clip)
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        frame_consistency(videos[:, :, 0], clip)
    with pytest.raises(ValueError, match="embed_texts"):
        prompt_consistency(videos, ["x", "y"], conv)
    with pytest.raises(ValueError, match="2 clips need 2 prompts"):
        prompt_consistency(videos, ["x"], clip)
    with pytest.raises(ValueError, match="one string"):
        prompt_consistency(videos, "x", clip)
    with pytest.raises(ValueError, match="reference embeddings"):
        prompt_consistency(videos, torch.zeros(2, 3), clip)
    with pytest.raises(ValueError, match=r"\(N, D\) embeddings"):
        frame_consistency(videos, lambda x: x)


def test_structure_fidelity_is_a_correlation_of_structure_maps():
    a, b, c = _photo("astronaut"), _photo("coffee"), _photo("chelsea")
    clips = torch.stack([_clip_of(a, b), _clip_of(c, a)])  # (2, 3, 2, H, W)
    edges = SobelEdges()
    _, scores = structure_fidelity(clips, clips, edges, size=8)
    torch.testing.assert_close(scores, torch.ones(2))
    # the same layout at another brightness and contrast: still (nearly) the same structure
    mean_shift, _ = structure_fidelity((0.5 * clips + 0.2).clamp(-1, 1), clips, edges, size=8)
    assert mean_shift > 0.95
    # other photos' layouts correlate far less; by hand: Pearson of the 8x8 area-pooled Sobel maps
    other = torch.stack([_clip_of(b, c), _clip_of(a, b)])
    mean_other, scores_other = structure_fidelity(other, clips, edges, size=8)
    assert mean_other < 0.6
    ma = torch.nn.functional.adaptive_avg_pool2d(edges(b[None]), 8).flatten()
    mb = torch.nn.functional.adaptive_avg_pool2d(edges(a[None]), 8).flatten()
    r = torch.corrcoef(torch.stack([ma, mb]))[0, 1]
    ma2 = torch.nn.functional.adaptive_avg_pool2d(edges(c[None]), 8).flatten()
    mb2 = torch.nn.functional.adaptive_avg_pool2d(edges(b[None]), 8).flatten()
    r2 = torch.corrcoef(torch.stack([ma2, mb2]))[0, 1]
    assert abs(float(scores_other[0]) - float((r + r2) / 2)) < 1e-5
    # a constant frame has no layout: correlation 0, not NaN
    flat = torch.zeros_like(clips)
    assert structure_fidelity(flat, clips, edges)[0] == 0.0
    with pytest.raises(ValueError, match="reference clips must match"):
        structure_fidelity(clips, clips[:1], edges)
