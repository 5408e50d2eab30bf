"""Masked editing helpers: named and drawn masks, the pixel -> token mask, the hole PSNR, and the autoregressive
baseline (the shipped taming class transformer) with its kept tokens forced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from imagebart.editing import MASKS, ar_inpaint, hole_psnr, masked_view, named_mask, read_mask, token_keep_mask


def test_named_masks():
    up = named_mask("upper", 32)
    assert up.shape == (32, 32) and bool((up[:16] == 0).all()) and bool((up[16:] == 1).all())
    low = named_mask("lower", 32)
    assert bool((low[:16] == 1).all()) and bool((low[16:] == 0).all())
    assert torch.equal(named_mask("left", 32), up.T) and torch.equal(named_mask("right", 32), low.T)
    center = named_mask("center", 32)
    assert bool((center[8:24, 8:24] == 0).all()) and float(center.sum()) == 32 * 32 - 16 * 16
    assert set(MASKS) == {"upper", "lower", "left", "right", "center"}
    with pytest.raises(ValueError, match="unknown mask 'top': use one of upper, lower, left, right, center"):
        named_mask("top", 32)


def test_a_token_is_kept_only_if_its_whole_cell_is():
    keep = torch.ones(32, 32)
    keep[13, 22] = 0  # one hole pixel in cell (3, 5) of the 8x8 grid (4x4 pixels per cell)
    tokens = token_keep_mask(keep, (8, 8))
    assert tokens.shape == (1, 64) and tokens.dtype == torch.bool
    assert (~tokens).nonzero()[:, 1].tolist() == [3 * 8 + 5]
    # the same for (B, H, W) and (B, 1, H, W) masks; one mask per image
    batch = torch.stack((keep, named_mask("upper", 32)))
    per_image = token_keep_mask(batch[:, None], (8, 8))
    assert torch.equal(per_image, token_keep_mask(batch, (8, 8)))
    assert torch.equal(per_image[0], tokens[0])
    assert per_image[1].view(8, 8)[:4].sum() == 0 and bool(per_image[1].view(8, 8)[4:].all())
    # a mask on the token grid is taken as it is
    grid = torch.rand(2, 8, 8) > 0.5
    assert torch.equal(token_keep_mask(grid.float(), (8, 8)), grid.flatten(1))
    # with the image size known, that size (or the grid) is the only one accepted
    assert torch.equal(token_keep_mask(keep, (8, 8), (32, 32)), tokens)


def test_token_keep_mask_refuses_bad_masks():
    with pytest.raises(ValueError, match="one channel"):
        token_keep_mask(torch.ones(1, 3, 32, 32), (8, 8))
    with pytest.raises(ValueError, match="must be"):
        token_keep_mask(torch.ones(32), (8, 8))
    with pytest.raises(ValueError, match="must be a tensor"):
        token_keep_mask(np.ones((32, 32)), (8, 8))
    with pytest.raises(ValueError, match="mask of size 30x30 matches neither"):
        token_keep_mask(torch.ones(30, 30), (8, 8))
    with pytest.raises(ValueError, match="mask of size 16x16 matches neither the image size 32x32 nor the 8x8"):
        token_keep_mask(torch.ones(16, 16), (8, 8), (32, 32))


def _write_png(path, array: np.ndarray) -> None:
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def test_read_mask_white_is_the_hole(tmp_path):
    arr = np.zeros((32, 32), dtype=np.uint8)
    arr[:10] = 255  # white: resample
    arr[20:, :5] = 100  # dark grey: kept
    _write_png(tmp_path / "hole.png", arr)
    keep = read_mask(tmp_path / "hole.png", (32, 32))
    assert keep.shape == (32, 32) and keep.dtype == torch.float32
    assert bool((keep[:10] == 0).all()) and bool((keep[10:] == 1).all())
    # an RGB mask is read as grey
    Image.fromarray(np.stack([arr] * 3, -1), mode="RGB").save(tmp_path / "rgb.png")
    assert torch.equal(read_mask(tmp_path / "rgb.png", (32, 32)), keep)


def test_read_mask_errors(tmp_path):
    _write_png(tmp_path / "small.png", np.zeros((30, 30)))
    with pytest.raises(ValueError, match="is 30x30 but the image is 32x32"):
        read_mask(tmp_path / "small.png", (32, 32))
    with pytest.raises(FileNotFoundError, match="mask image not found: .*nonsense.png"):
        read_mask(tmp_path / "nonsense.png", (32, 32))


def test_masked_view_and_hole_psnr():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 32, 32, generator=g) * 2 - 1
    keep = token_keep_mask(named_mask("upper", 32), (8, 8)).expand(2, -1)
    shown = masked_view(images, keep, (8, 8))
    assert bool((shown[:, :, :16] == 0).all()) and torch.equal(shown[:, :, 16:], images[:, :, 16:])
    # PSNR over the hole only: 0.2 off in the hole is 10 log10(4 / 0.04) = 20 dB, whatever the kept part does
    edits = images.clone()
    edits[:, :, :16] += 0.2
    edits[:, :, 16:] = 0.0
    assert hole_psnr(edits, images, keep, (8, 8)) == pytest.approx(20.0, abs=1e-3)
    assert hole_psnr(images, images, keep, (8, 8)) > 90


@pytest.fixture(scope="module")
def taming_class():
    from gencore.run import load_module

    return load_module("pkg://taming/checkpoints/transformer_fmnist_class").eval()


def test_ar_inpaint_keeps_the_kept_tokens(taming_class, fmnist, monkeypatch):
    images, labels = fmnist[0][:2], fmnist[1][:2]
    keep = named_mask("upper", 32)
    out = ar_inpaint(taming_class, images, keep, labels, generator=torch.Generator().manual_seed(0))
    assert out["images"].shape == (2, 1, 32, 32)
    assert float(out["images"].min()) >= -1 and float(out["images"].max()) <= 1
    assert torch.equal(out["keep"], token_keep_mask(keep, (8, 8)).expand(2, -1))
    assert bool((out["sources"][:, :, :16] == 0).all())
    # the drawn tokens themselves (decoding skipped): kept ones exactly the image's, the hole resampled
    monkeypatch.setattr(taming_class, "decode_to_img", lambda tokens, grid: tokens)
    z, _ = taming_class.encode_to_z(images)
    kept = out["keep"]
    drawn = []
    for seed in (0, 1):
        tokens = ar_inpaint(taming_class, images, keep, labels, generator=torch.Generator().manual_seed(seed))["images"]
        assert tokens.shape == (2, 64) and int(tokens.max()) < taming_class.first_stage_model.vocab_size
        assert torch.equal(tokens[kept], z[kept])
        drawn.append(tokens)
    assert not torch.equal(drawn[0][~kept], drawn[1][~kept])  # the hole is sampled
    with pytest.raises(ValueError, match="mask of size 16x16 matches neither the image size 32x32"):
        ar_inpaint(taming_class, images, torch.ones(16, 16), labels)


def test_ar_inpaint_with_an_unconditional_baseline_ignores_the_labels(fmnist):
    from taming.conditioning import SOSConditioner
    from taming.first_stage import load_first_stage
    from taming.lit import Net2NetTransformer
    from taming.models.mingpt import GPT

    torch.manual_seed(0)
    vq = load_first_stage("pkg://taming/checkpoints/vqgan_fmnist")
    model = Net2NetTransformer(GPT(vocab_size=512, block_size=64, n_layer=1, n_head=2, n_embd=32), vq, SOSConditioner())
    out = ar_inpaint(model.eval(), fmnist[0][:2], named_mask("left", 32), fmnist[1][:2])
    assert out["images"].shape == (2, 1, 32, 32) and out["keep"].view(2, 8, 8)[:, :, :4].sum() == 0


def test_mask_specs_and_a_mask_that_keeps_everything(tmp_path):
    from imagebart.editing import expand_masks, mask_from_spec

    assert torch.equal(mask_from_spec("upper", 32), named_mask("upper", 32))
    with pytest.raises(ValueError, match=r"unknown mask: 'diagonal'; use one of upper, lower"):
        mask_from_spec("diagonal", 32)
    with pytest.raises(ValueError, match=r"mask image not found: 'hole\.png'"):
        mask_from_spec("hole.png", 32)
    with pytest.raises(ValueError, match="keeps the whole image: nothing to resample"):
        expand_masks(torch.ones(32, 32), 2, (8, 8))
