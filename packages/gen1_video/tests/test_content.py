"""Content encoders (a tiny random CLIP from a local folder, the in-project conv encoder) and the one random frame per
clip whose embedding is the training content."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from gen1_video.content import CLIPContentEncoder, ConvContentEncoder, random_frame_index, select_frames
from gencore.io import MissingWeightsError
from gencore.testing import assert_grads_reach_all_parameters, tiny_clip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _photos(size: int = 48) -> torch.Tensor:
    import cv2

    imgs = [
        cv2.resize(getattr(skdata, n)(), (size, size), interpolation=cv2.INTER_AREA) for n in ("astronaut", "coffee")
    ]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------- frame selection


def test_random_frame_index_is_uniform_within_range_and_seeded():
    n, frames = 8000, 8
    idx = random_frame_index(n, frames, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.long and idx.shape == (n,)
    assert int(idx.min()) == 0 and int(idx.max()) == frames - 1
    counts = torch.bincount(idx, minlength=frames).float()
    chi2 = float(((counts - n / frames) ** 2 / (n / frames)).sum())
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001
    again = random_frame_index(n, frames, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    assert not torch.equal(idx, random_frame_index(n, frames, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="num_frames >= 1"):
        random_frame_index(2, 0)


def test_select_frames_picks_one_frame_per_clip():
    video = torch.arange(2 * 3 * 5 * 2 * 2, dtype=torch.float32).reshape(2, 3, 5, 2, 2)
    out = select_frames(video, torch.tensor([4, 1]))
    assert out.shape == (2, 3, 2, 2)
    assert torch.equal(out[0], video[0, :, 4]) and torch.equal(out[1], video[1, :, 1])
    with pytest.raises(ValueError, match=r"index must be \(2,\) integers"):
        select_frames(video, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        select_frames(video[:, :, 0], torch.tensor([0, 1]))


# -------------------------------------------------------------------------------------------------------- CLIP


def test_clip_content_matches_clip_image_features_through_its_processor(clip_folder):
    from transformers import CLIPImageProcessor

    enc = CLIPContentEncoder(clip_folder)
    images = _photos()
    ctx = enc(images)
    assert ctx.shape == (2, 1, 16) and enc.context_dim == 16 and enc.num_tokens == 1
    assert torch.allclose(ctx.norm(dim=-1), torch.ones(2, 1), atol=1e-5)
    # the reference pipeline: transformers' own image processor on uint8 pixels, then the projected pooled output
    proc = CLIPImageProcessor.from_pretrained(clip_folder)
    uint8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = proc(images=list(uint8), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = enc.model.visual_projection(enc.model.vision_model(pixel_values=pixels).pooler_output)
    cos = torch.nn.functional.cosine_similarity(ctx[:, 0], ref, dim=-1)
    assert (cos > 0.99).all(), cos  # same crop, scale and normalisation (resampling filters differ slightly)
    assert torch.nn.functional.cosine_similarity(ctx[0, 0], ctx[1, 0], dim=0) < 0.999


def test_clip_text_content_lives_in_the_image_embedding_space(clip_folder):
    enc = CLIPContentEncoder(clip_folder, normalize=False)
    text = enc.encode_text(["a photo of a cat", "a photo of a cat", "stock prices"])
    assert text.shape == (3, 1, 16)
    assert torch.equal(text[0], text[1]) and not torch.allclose(text[0], text[2])
    tok = enc.tokenizer(["stock prices"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = enc.model.text_projection(enc.model.text_model(**tok).pooler_output)
    assert torch.allclose(text[2], ref, atol=1e-5)
    assert enc.embed_images(_photos()).shape[-1] == text.shape[-1]
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    null = enc.unconditional(3)
    assert null.shape == (3, 1, 16) and null.abs().max() == 0
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode_text("one string")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        enc(torch.zeros(2, 1, 32, 32))


def test_clip_without_weights_says_what_is_missing(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"clip-vit-large-patch14.*config\.json does not exist"):
        CLIPContentEncoder(tmp_path)


# ------------------------------------------------------------------------------------------- in-project encoder


def test_conv_content_encoder_shapes_gradients_and_pooled_layout():
    torch.manual_seed(0)
    enc = ConvContentEncoder(context_dim=16, num_tokens=2, channels=(8, 16), image_size=16)
    images = _photos(40)
    ctx = enc(images)
    assert ctx.shape == (2, 2, 16) and enc.embed_images(images).shape == (2, 16)
    assert (ctx[0] - ctx[1]).abs().max() > 1e-3
    assert_grads_reach_all_parameters(enc, enc(images).square().mean() + enc(images).sum(dim=(1, 2)).var())
    # global pooling: a layout-free summary (the same image flipped left-right gives the same embedding up to the
    # network's own asymmetry, much closer than another photo)
    with torch.no_grad():
        e, e_flip = enc.embed_images(images), enc.embed_images(images.flip(-1))
    assert (e[0] - e_flip[0]).norm() < (e[0] - e[1]).norm()
    assert enc.unconditional(4).shape == (4, 2, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        ConvContentEncoder(context_dim=16, channels=(12,))
    with pytest.raises(ValueError, match="image_size"):
        ConvContentEncoder(context_dim=16, channels=(8, 8, 8), image_size=4)
