import pytest
import torch

from gencore.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST
from taming.conditioning import ClassProvider, SOSProvider, condition_transform, edge_map, low_resolution


def test_sos_and_class_tokens():
    assert SOSProvider(3).encode(2).tolist() == [[3], [3]]
    cp = ClassProvider(10, offset=512)
    assert cp.encode(torch.tensor([0, 9])).tolist() == [[512], [521]] and cp.vocab_end == 522
    with pytest.raises(ValueError, match="label 10 outside"):
        cp.encode(torch.tensor([10]))
    with pytest.raises(ValueError, match="labels must be"):
        cp.encode(torch.zeros(2, 2))


def test_edge_map_finds_the_outline():
    x = -torch.ones(1, 1, 16, 16)
    x[..., 4:12, 4:12] = 1.0  # a bright square
    e = edge_map(x)
    assert set(e.unique().tolist()) == {-1.0, 1.0}
    assert e[0, 0, 8, 3] == 1 and e[0, 0, 8, 8] == -1 and e[0, 0, 0, 0] == -1  # border on, inside / outside off


@pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_conditions_on_real_images():
    x, _ = FashionMNIST(split="test", image_size=32, limit=8).tensors()
    e = edge_map(x)
    share = (e > 0).float().mean().item()
    assert e.shape == x.shape and 0.05 < share < 0.5  # outlines, not everything or nothing
    lr = low_resolution(x, 4)
    assert lr.shape == x.shape and torch.equal(lr[..., ::4, ::4], lr[..., 3::4, 3::4])  # 4x4 blocks
    assert torch.allclose(lr.mean(), x.mean(), atol=1e-6)
    with pytest.raises(ValueError, match="not divisible by factor 3"):
        low_resolution(x, 3)
    assert condition_transform(None)(x) is x
    with pytest.raises(ValueError, match="unknown condition 'depth'"):
        condition_transform("depth")
