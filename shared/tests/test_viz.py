"""gencore.viz: grids and labelled side-by-side panels."""

import numpy as np
import pytest
import torch
from PIL import Image

from gencore.viz import save_gif, save_grid, save_panels


def test_save_panels_places_each_grid_under_its_caption(tmp_path):
    a = -torch.ones(6, 1, 8, 8)  # black
    b = torch.ones(6, 3, 8, 8)  # white, RGB
    path = save_panels([("left", a), ("right", b)], tmp_path / "p.png", nrow=3, column_labels=list("xyz"), scale=2)
    img = np.asarray(Image.open(path).convert("L"))
    grid_w = (3 * 10 + 2) * 2  # 3 cells of 8 + 2 px padding, one more padding, x2
    assert img.shape[1] == 2 * grid_w + 16 + 16
    top = img.shape[0] - 8 - (2 * 10 + 2) * 2  # the grids sit at the bottom, above an 8 px margin
    left_cell = img[top + 4 : top + 18, 8 + 4 : 8 + 18]
    right_cell = img[top + 4 : top + 18, 8 + grid_w + 16 + 4 : 8 + grid_w + 16 + 18]
    assert left_cell.max() == 0 and right_cell.min() == 255
    assert img[: top - 2].min() < 128  # captions drawn above the grids
    with pytest.raises(ValueError, match="no panels"):
        save_panels([], tmp_path / "q.png", nrow=3)


def test_save_grid_round_trip(tmp_path):
    x = torch.linspace(-1, 1, 4 * 8 * 8).view(4, 1, 8, 8)
    img = np.asarray(Image.open(save_grid(x, tmp_path / "g.png", nrow=2)).convert("L"))
    assert img.shape == (2 * 10 + 2, 2 * 10 + 2)
    assert img[2, 2] == 0 and img[-3, -3] == 255


def test_save_gif_plays_the_frames_side_by_side(tmp_path):
    from PIL import Image, ImageSequence

    t = torch.linspace(-1, 1, 5)
    clips = torch.stack([t.reshape(1, 5, 1, 1).expand(1, 5, 4, 6), -t.reshape(1, 5, 1, 1).expand(1, 5, 4, 6)])
    path = save_gif(clips, tmp_path / "a.gif", fps=10, scale=2)  # (2, 1, 5, 4, 6): two clips, 5 frames
    with Image.open(path) as im:
        frames = [f.convert("L").copy() for f in ImageSequence.Iterator(im)]
        assert im.info["duration"] == 100 and im.info.get("loop") == 0
    assert len(frames) == 5 and frames[0].size == (2 * (2 + 2 * (6 + 2)), 2 * (2 + 4 + 2))  # padded grid, x2
    for k, f in enumerate(frames):
        arr = np.asarray(f)
        left, right = arr[arr.shape[0] // 2, 2 * 2 + 2], arr[arr.shape[0] // 2, -(2 * 2 + 2) - 1]
        expect = round((float(t[k]) + 1) * 127.5)
        assert abs(int(left) - expect) <= 2 and abs(int(right) - (255 - expect)) <= 2
    with pytest.raises(ValueError, match="clips"):
        save_gif(clips[0], tmp_path / "b.gif")
