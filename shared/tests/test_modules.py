import pytest
import torch
import torch.nn.functional as F

from gencore.modules import upsample_nearest_2x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 128, 16, 16)])
def test_upsample_nearest_2x_is_bit_identical_to_interpolate(shape, channels_last):
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = upsample_nearest_2x(x)
    assert out.shape == (shape[0], shape[1], 2 * shape[2], 2 * shape[3])
    assert torch.equal(out, F.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_upsample_nearest_2x_passes_gradients_and_rejects_other_ranks():
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    upsample_nearest_2x(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 4.0))  # each input pixel feeds a 2x2 block
    with pytest.raises(ValueError, match="x must be"):
        upsample_nearest_2x(torch.randn(2, 3, 4))
