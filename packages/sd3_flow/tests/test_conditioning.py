"""sd3_flow.conditioning: the SD3 text layout (CLIP on channels, T5 on the sequence), per-encoder dropout through
gencore's dropout masks on the features' device, the unconditional condition, generation requests, the encoders."""

import pytest
import torch
from torch import nn

from gencore.conditioning import Conditioner
from gencore.data.fashion_mnist import caption_for
from gencore.diffusion import dropout_masks
from gencore.testing import no_host_sync, tiny_clip
from sd3_flow.conditioning import SD3TextConditioner


class FakeEncoder(nn.Module):
    """Stands in for a big encoder: deterministic features of the given widths, on the module's device."""

    def __init__(self, width: int, pooled: int, length: int, value: float):
        super().__init__()
        self.hidden_size, self.pooled_size, self.length, self.value = width, pooled, length, value
        self.register_buffer("anchor", torch.zeros(()), persistent=False)

    def forward(self, texts):
        b, device = len(texts), self.anchor.device
        return {
            "tokens": torch.full((b, self.length, self.hidden_size), self.value, device=device),
            "pooled": torch.full((b, self.pooled_size), self.value, device=device),
        }


def sd3_three(**kw) -> SD3TextConditioner:
    return SD3TextConditioner(
        clip_l=FakeEncoder(768, 768, 77, 1.0),
        clip_g=FakeEncoder(1280, 1280, 77, 2.0),
        t5=FakeEncoder(4096, 4096, 256, 3.0),
        joint_attention_dim=4096,
        **kw,
    )


def sd3_small(**kw) -> SD3TextConditioner:
    """The SD3 layout at small widths: CLIP-L 3 + CLIP-G 5 channels (pooled 3 + 5), T5 8 wide, 4 + 6 tokens."""
    return SD3TextConditioner(
        clip_l=FakeEncoder(3, 3, 4, 1.0),
        clip_g=FakeEncoder(5, 5, 4, 2.0),
        t5=FakeEncoder(8, 8, 6, 3.0),
        joint_attention_dim=8,
        **kw,
    )


def test_sd3_layout_channels_then_sequence():
    cond = sd3_three()
    assert isinstance(cond, Conditioner) and cond.guidable and cond.produces == ("context", "pooled")
    out = cond.encode({"caption": ["a cat", "a dog"]})
    assert out["context"].shape == (2, 77 + 256, 4096) and out["pooled"].shape == (2, 2048)
    ctx = out["context"][0]
    assert torch.all(ctx[:77, :768] == 1) and torch.all(ctx[:77, 768:2048] == 2) and torch.all(ctx[:77, 2048:] == 0)
    assert torch.all(ctx[77:] == 3)
    assert torch.all(out["pooled"][0, :768] == 1) and torch.all(out["pooled"][0, 768:] == 2)
    assert cond.encode({"caption": ["a", "b", "c"]}, 1)["context"].shape[0] == 1  # the first n
    # an encoder dropped for one sample: its tokens (and pooled part) zeroed there only
    dropped = {"t5": torch.tensor([True, False])}
    both = cond.combine(cond.encode_parts(["a", "b"]), dropped)["context"]
    assert torch.all(both[0, 77:] == 0) and torch.all(both[1, 77:] == 3) and torch.all(both[0, :77, :768] == 1)
    unc = cond.unconditional(3)
    assert unc["context"].shape == (3, 333, 4096) and torch.all(unc["context"] == 0) and torch.all(unc["pooled"] == 0)
    without_t5 = SD3TextConditioner(
        clip_l=FakeEncoder(768, 768, 77, 1.0), clip_g=FakeEncoder(1280, 1280, 77, 2.0), joint_attention_dim=4096
    )
    assert without_t5.encode_text(["x"])["context"].shape == (1, 77, 4096)


def test_each_encoder_is_dropped_on_its_own():
    """SD3 drops every text encoder independently (~46.3 % each): per-sample zeroed features, independent masks."""
    cond = sd3_small(caption_key="text")
    n = 4000
    batch = {"text": ["a prompt"] * n}
    out = cond(batch, drop=0.463, generator=torch.Generator().manual_seed(0))
    assert out["context"].shape == (n, 4 + 6, 8) and out["pooled"].shape == (n, 8)
    clip_l_off = out["context"][:, 0, 0] == 0
    clip_g_off = out["context"][:, 0, 3] == 0
    t5_off = out["context"][:, 4, 0] == 0
    for off in (clip_l_off, clip_g_off, t5_off):
        assert off.float().mean().item() == pytest.approx(0.463, abs=0.03)
    assert (clip_l_off & t5_off).float().mean().item() == pytest.approx(0.463**2, abs=0.03)  # independent
    assert torch.equal(out["pooled"][:, 0] == 0, clip_l_off) and torch.equal(out["pooled"][:, 3] == 0, clip_g_off)
    # per-encoder probabilities; encoders left out are never dropped
    out = cond(batch, drop={"t5": 1.0}, generator=torch.Generator().manual_seed(1))
    assert torch.all(out["context"][:, 4:] == 0) and torch.all(out["context"][:, :4, :3] == 1)
    # every encoder dropped = the unconditional condition; no dropout = encode
    torch.testing.assert_close(cond(batch, 2, drop=1.0), cond.unconditional(2))
    assert torch.equal(cond(batch, 2)["context"], cond.encode(batch, 2)["context"])
    # the same generator, the same masks
    a = cond(batch, 64, drop=0.5, generator=torch.Generator().manual_seed(2))
    b = cond(batch, 64, drop=0.5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a["context"], b["context"])


def test_dropout_masks_are_drawn_on_the_features_device_without_host_sync(monkeypatch):
    import sd3_flow.conditioning as conditioning

    drawn = []

    def spy(*args, **kwargs):
        masks = dropout_masks(*args, **kwargs)
        drawn.append({name: m.device.type for name, m in masks.items()})
        return masks

    monkeypatch.setattr(conditioning, "dropout_masks", spy)
    cond = sd3_small().to("meta")  # features on another device than the CPU: the masks are drawn there, not copied
    out = cond({"caption": ["a", "b"]}, drop=0.3)
    assert drawn == [{"clip_l": "meta", "clip_g": "meta", "t5": "meta"}]
    assert out["context"].device.type == "meta" and out["pooled"].device.type == "meta"
    cpu = sd3_small()
    with no_host_sync():  # on the CPU, what would wait on an accelerator is refused
        out = cpu({"caption": ["a", "b", "c"]}, drop={"clip_l": 0.5, "t5": 0.2})
    assert out["context"].shape == (3, 10, 8)


def test_generation_requests():
    cond = sd3_small()
    batch, outputs = cond.generation_batch(2, captions=["a bag", "a coat"])
    assert batch == {"caption": ["a bag", "a coat"]} and outputs == {"captions": ["a bag", "a coat"]}
    batch, outputs = cond.generation_batch(3, labels=[7, 0, 9])
    assert batch["caption"] == [caption_for(7), caption_for(0), caption_for(9)] == outputs["captions"]
    assert outputs["labels"].tolist() == [7, 0, 9]
    torch.manual_seed(5)
    _, outputs = cond.generation_batch(4)  # random classes
    assert len(outputs["captions"]) == 4 and all(0 <= c < 10 for c in outputs["labels"].tolist())
    with pytest.raises(ValueError, match="3 samples need 3 captions, got 2"):
        cond.generation_batch(3, captions=["a", "b"])
    with pytest.raises(ValueError, match="does not take prompts"):
        cond.generation_batch(1, prompts=["a"])


def test_bind_checks_the_network_widths():
    class Net(nn.Module):
        def __init__(self, joint: int, pooled: int):
            super().__init__()
            self.joint_attention_dim, self.pooled_projection_dim = joint, pooled

    cond = sd3_three()
    cond.bind(model=Net(4096, 2048), latent_shape=(16, 8, 8))
    with pytest.raises(ValueError, match="text features are 4096 wide, the transformer's joint_attention_dim is 64"):
        cond.bind(model=Net(64, 2048))
    with pytest.raises(ValueError, match="pooled text is 2048 wide, the transformer expects 48"):
        cond.bind(model=Net(4096, 48))


def test_offline_default_and_real_clip_folders(tmp_path):
    mini = SD3TextConditioner()
    out = mini({"caption": ["a photo of a sneaker"]})
    assert mini.names == ("minilm",) and out["context"].shape == (1, 16, 384) and out["pooled"].shape == (1, 384)
    assert mini.joint_attention_dim == 384 and mini.pooled_dim == 384
    from gencore.text import save_text_features

    captions = ["", "a photo of a sneaker", "a photo of a bag"]
    feats = save_text_features(mini.encoders["minilm"], captions, tmp_path / "minilm16.safetensors")
    pre = SD3TextConditioner(minilm=str(feats))  # the same features without the encoder's weights
    ref, got = mini.encode_text(captions[::-1]), pre.encode_text(captions[::-1])
    assert torch.equal(ref["context"], got["context"]) and torch.equal(ref["pooled"], got["pooled"])
    with pytest.raises(ValueError, match="max_length=8 asked, file has 16"):
        SD3TextConditioner(minilm=str(feats), minilm_max_length=8)
    clip_dir = tiny_clip(tmp_path / "clip", hidden_size=32, projection_dim=16)
    both = SD3TextConditioner(clip_l=clip_dir, clip_g=clip_dir, joint_attention_dim=128)
    out = both.encode_text(["a bag", "a coat"])
    assert out["context"].shape == (2, 77, 128) and out["pooled"].shape == (2, 32) and both.pooled_dim == 32
    assert torch.all(out["context"][..., 64:] == 0)  # 32 + 32 CLIP channels, zero-padded to 128


def test_bad_configurations():
    with pytest.raises(ValueError, match="T5 width 512 must equal joint_attention_dim 4096"):
        SD3TextConditioner(
            clip_l=FakeEncoder(768, 768, 77, 1.0), t5=FakeEncoder(512, 512, 8, 1.0), joint_attention_dim=4096
        )
    with pytest.raises(ValueError, match="wider than joint_attention_dim"):
        SD3TextConditioner(clip_l=FakeEncoder(768, 768, 77, 1.0), joint_attention_dim=512)
    mini = SD3TextConditioner()
    with pytest.raises(ValueError, match="single string"):
        mini.encode_text("a cat")
    with pytest.raises(ValueError, match=r"a text-conditional model needs batch\['caption'\]"):
        mini({"image": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"p_drop_text\['minilm'\] must be a probability in \[0, 1\], got 1.5"):
        mini({"caption": ["a"]}, drop={"minilm": 1.5})
    with pytest.raises(ValueError, match=r"text dropout for \['t5'\]: not among the encoders \['minilm'\]"):
        mini({"caption": ["a"]}, drop={"t5": 0.5})
    with pytest.raises(ValueError, match="p_drop_text must be a probability"):
        mini({"caption": ["a"]}, drop=-0.1)
