"""net2net.bias: the attributes' closed forms, the dataset classifier on the real union, the report's numbers (shift
= (P − S) / (T − S), the share recognised as the target) and its figure. CPU, seeded."""

from __future__ import annotations

import math

import pytest
import torch

from net2net.bias import ATTRIBUTES, DatasetClassifier, attributes, bias_table, plot_report
from net2net.data import MEMBERS, load_member

NAMES = ("a", "b", "c")


def _const(value: float, n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.full((n, 1, size, size), float(value))


def _real_union(split: str, n: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded random images of each member's split, and their member ids."""
    xs, ys = [], []
    for i, name in enumerate(MEMBERS):
        x, _ = load_member(name, split, image_size=size)
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(i))[:n]
        xs.append(x[pick])
        ys.append(torch.full((len(pick),), i))
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------------------------------------------- attributes


@pytest.mark.parametrize("value", [-1.0, -0.5, 0.0, 0.5, 1.0])
def test_attributes_of_constant_images(value):
    a = attributes(_const(value, n=3))
    assert set(a) == set(ATTRIBUTES) and all(v.shape == (3,) for v in a.values())
    g = (value + 1) / 2
    torch.testing.assert_close(a["brightness"], torch.full((3,), g))
    torch.testing.assert_close(a["contrast"], torch.zeros(3))
    torch.testing.assert_close(a["ink"], torch.full((3,), 1.0 if g > 0.5 else 0.0))  # mid-gray is not ink
    # the central half of a 16x16 frame is 8x8 = a quarter of the intensity; an all-black image has none
    torch.testing.assert_close(a["centre_mass"], torch.full((3,), 0.25 if g > 0 else 0.0))


def test_attributes_of_a_half_white_and_a_centred_square_image():
    half = torch.full((1, 1, 16, 16), -1.0)
    half[..., :8] = 1.0  # the left half white
    square = torch.full((1, 1, 16, 16), -1.0)
    square[..., 4:12, 4:12] = 1.0  # exactly the central half of the frame
    a = attributes(torch.cat([half, square]))
    torch.testing.assert_close(a["brightness"], torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(a["contrast"], torch.tensor([0.5, math.sqrt(0.25 * 0.75)]))  # population std of 0/1
    torch.testing.assert_close(a["ink"], torch.tensor([0.5, 0.25]))
    # half: 8 rows x 4 columns of the white 16 x 8 lie in the centre; square: all of it
    torch.testing.assert_close(a["centre_mass"], torch.tensor([0.25, 1.0]))


def test_attributes_average_the_colour_channels_and_check_shapes():
    rgb = torch.stack([torch.full((16, 16), v) for v in (-1.0, 0.0, 1.0)])[None]  # channel mean 0 -> gray 0.5
    torch.testing.assert_close(attributes(rgb)["brightness"], torch.tensor([0.5]))
    for bad in (torch.zeros(2, 16, 16), torch.zeros(2, 2, 16, 16), "images"):
        with pytest.raises(ValueError, match="images must be"):
            attributes(bad)


# ---------------------------------------------------------------------------------------------------- classifier


def test_dataset_classifier_tells_the_real_datasets_apart():
    x, y = _real_union("train", 60)
    clf = DatasetClassifier(MEMBERS, seed=0)
    with pytest.raises(RuntimeError, match="fit it first"):
        clf.predict(x[:2])
    assert clf.fit(x, y) is clf
    assert clf.train_accuracy is not None and clf.train_accuracy >= 0.95
    pred = clf.predict(x)
    assert pred.shape == (len(x),) and pred.dtype == torch.long
    assert clf.accuracy(x, y) == pytest.approx(clf.train_accuracy)
    xv, yv = _real_union("val", 20)
    assert clf.accuracy(xv, yv) > 0.75  # held-out images too (chance: 1/3)
    # other sizes and channel counts are resized / averaged to the classifier's 16 x 16 gray features
    x32, y32 = _real_union("val", 10, size=32)
    assert clf.accuracy(x32.expand(-1, 3, -1, -1), y32) > 0.7


def test_dataset_classifier_needs_every_dataset():
    x, y = _real_union("train", 5)
    keep = y != 1
    with pytest.raises(ValueError, match="digits"):
        DatasetClassifier(MEMBERS).fit(x[keep], y[keep])


# ---------------------------------------------------------------------------------------------------- the table


def test_bias_table_shift_is_the_share_of_the_gap_closed():
    real = {0: _const(-0.5), 1: _const(0.5), 2: _const(1.0)}  # brightness 0.25, 0.75, 1.0
    projected = {(0, 1): _const(0.0), (1, 0): _const(-0.5), (0, 0): _const(-0.5)}  # 0.5, 0.25, 0.25
    report = bias_table(NAMES, real, projected, fmnist_classes=False)
    assert report["datasets"] == list(NAMES)
    assert report["real"]["a"]["brightness"] == 0.25 and report["real"]["b"]["brightness"] == 0.75
    pairs = {(p["source"], p["target"]): p for p in report["pairs"]}
    assert set(pairs) == {("a", "b"), ("b", "a"), ("a", "a")}
    ab = pairs[("a", "b")]
    assert ab["n"] == 4 and ab["attributes"]["brightness"] == 0.5
    assert ab["shift"]["brightness"] == 0.5  # (0.5 − 0.25) / (0.75 − 0.25), exactly
    assert ab["shift"]["ink"] == 0.0  # source and projection: no ink, target: all ink
    assert ab["shift"]["contrast"] is None and ab["shift"]["centre_mass"] is None  # no gap to close
    assert pairs[("b", "a")]["shift"]["brightness"] == 1.0  # all the way to the target
    assert all(v is None for v in pairs[("a", "a")]["shift"].values())  # source = target: no gap
    assert "recognised_as_target" not in ab and "dataset_share" not in ab["attributes"]
    assert "fmnist_classes" not in ab["attributes"]


class _PixelClassifier:
    """A stand-in dataset classifier: the class is written in the top-left pixel (-1 -> 0, 0 -> 1, 1 -> 2)."""

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return (images[:, 0, 0, 0] + 1).round().long()


def test_bias_table_recognised_as_target_and_fmnist_classes():
    def marked(labels):
        x = _const(-0.2, n=len(labels))
        x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32) - 1
        return x

    real = {0: marked([0, 0]), 1: marked([1, 1, 1]), 2: marked([2, 2])}
    projected = {(0, 1): marked([1, 1, 1, 0]), (2, 0): marked([2, 2])}
    report = bias_table(NAMES, real, projected, classifier=_PixelClassifier())
    pairs = {(p["source"], p["target"]): p for p in report["pairs"]}
    assert pairs[("a", "b")]["recognised_as_target"] == 0.75
    assert pairs[("a", "b")]["attributes"]["dataset_share"] == {"a": 0.25, "b": 0.75, "c": 0.0}
    assert pairs[("c", "a")]["recognised_as_target"] == 0.0
    assert report["real"]["b"]["dataset_share"]["b"] == 1.0
    hist = pairs[("a", "b")]["attributes"]["fmnist_classes"]  # gencore's frozen Fashion-MNIST classifier
    assert len(hist) == 10 and sum(hist) == pytest.approx(1.0) and min(hist) >= 0


def test_plot_report_writes_a_png(tmp_path):
    real = {0: _const(-0.5), 1: _const(0.5), 2: _const(1.0)}
    projected = {(s, t): _const(-0.5 + 0.25 * t) for s in range(3) for t in range(3)}
    report = bias_table(NAMES, real, projected, classifier=_PixelClassifier())
    out = plot_report(report, tmp_path / "sub" / "bias.png")
    assert out == tmp_path / "sub" / "bias.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # a report without classifier numbers (no recognised_as_target, no fmnist histograms) plots as well
    bare = bias_table(NAMES, real, {(0, 1): _const(0.0)}, fmnist_classes=False)
    assert plot_report(bare, tmp_path / "bare.png").read_bytes()[:4] == b"\x89PNG"
