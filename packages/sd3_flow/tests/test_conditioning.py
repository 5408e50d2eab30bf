import pytest
import torch
from torch import nn

from gencore.testing import tiny_clip
from sd3_flow.conditioning import SD3TextConditioner


class FakeEncoder(nn.Module):
    """Stands in for a big encoder: deterministic features of the given widths."""

    def __init__(self, width: int, pooled: int, length: int, value: float):
        super().__init__()
        self.hidden_size, self.pooled_size, self.length, self.value = width, pooled, length, value

    def forward(self, texts):
        b = len(texts)
        return {
            "tokens": torch.full((b, self.length, self.hidden_size), self.value),
            "pooled": torch.full((b, self.pooled_size), self.value),
        }


def test_sd3_layout_channels_then_sequence():
    cond = SD3TextConditioner(
        clip_l=FakeEncoder(768, 768, 77, 1.0),
        clip_g=FakeEncoder(1280, 1280, 77, 2.0),
        t5=FakeEncoder(4096, 4096, 256, 3.0),
        joint_attention_dim=4096,
    )
    out = cond(["a cat", "a dog"])
    assert out["context"].shape == (2, 77 + 256, 4096) and out["pooled"].shape == (2, 2048)
    ctx = out["context"][0]
    assert torch.all(ctx[:77, :768] == 1) and torch.all(ctx[:77, 768:2048] == 2) and torch.all(ctx[:77, 2048:] == 0)
    assert torch.all(ctx[77:] == 3)
    assert torch.all(out["pooled"][0, :768] == 1) and torch.all(out["pooled"][0, 768:] == 2)
    # independent dropout: T5 dropped for the first prompt only
    keep = {
        "clip_l": torch.tensor([True, True]),
        "clip_g": torch.tensor([True, True]),
        "t5": torch.tensor([False, True]),
    }
    dropped = cond(["a", "b"], keep)["context"]
    assert torch.all(dropped[0, 77:] == 0) and torch.all(dropped[1, 77:] == 3) and torch.all(dropped[0, :77, :768] == 1)
    masks = cond.random_keep(10000, {"t5": 0.463, "clip_l": 0.0}, generator=torch.Generator().manual_seed(0))
    assert masks["clip_l"].all() and abs(1 - masks["t5"].float().mean().item() - 0.463) < 0.02
    unc = cond.unconditional(3)
    assert unc["context"].shape == (3, 333, 4096) and torch.all(unc["context"] == 0) and torch.all(unc["pooled"] == 0)
    without_t5 = SD3TextConditioner(
        clip_l=FakeEncoder(768, 768, 77, 1.0), clip_g=FakeEncoder(1280, 1280, 77, 2.0), joint_attention_dim=4096
    )
    assert without_t5(["x"])["context"].shape == (1, 77, 4096)


def test_offline_default_and_real_clip_folders(tmp_path):
    mini = SD3TextConditioner()
    out = mini(["a photo of a sneaker"])
    assert mini.names == ("minilm",) and out["context"].shape == (1, 16, 384) and out["pooled"].shape == (1, 384)
    assert mini.joint_attention_dim == 384 and mini.pooled_dim == 384
    from gencore.text import save_text_features

    captions = ["", "a photo of a sneaker", "a photo of a bag"]
    feats = save_text_features(mini.encoders["minilm"], captions, tmp_path / "minilm16.safetensors")
    pre = SD3TextConditioner(minilm=str(feats))  # the same features without the encoder's weights
    ref, got = mini(captions[::-1]), pre(captions[::-1])
    assert torch.equal(ref["context"], got["context"]) and torch.equal(ref["pooled"], got["pooled"])
    with pytest.raises(ValueError, match="max_length=8 asked, file has 16"):
        SD3TextConditioner(minilm=str(feats), minilm_max_length=8)
    clip_dir = tiny_clip(tmp_path / "clip", hidden_size=32, projection_dim=16)
    both = SD3TextConditioner(clip_l=clip_dir, clip_g=clip_dir, joint_attention_dim=128)
    out = both(["a bag", "a coat"])
    assert out["context"].shape == (2, 77, 128) and out["pooled"].shape == (2, 32) and both.pooled_dim == 32
    assert torch.all(out["context"][..., 64:] == 0)  # 32 + 32 CLIP channels, zero-padded to 128


def test_bad_configurations():
    with pytest.raises(ValueError, match="T5 width 512 must equal joint_attention_dim 4096"):
        SD3TextConditioner(
            clip_l=FakeEncoder(768, 768, 77, 1.0), t5=FakeEncoder(512, 512, 8, 1.0), joint_attention_dim=4096
        )
    with pytest.raises(ValueError, match="wider than joint_attention_dim"):
        SD3TextConditioner(clip_l=FakeEncoder(768, 768, 77, 1.0), joint_attention_dim=512)
    with pytest.raises(ValueError, match="single string"):
        SD3TextConditioner()("a cat")
