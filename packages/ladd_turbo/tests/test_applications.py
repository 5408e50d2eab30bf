"""The LADD paper's applications (Sec. 5.2) at tiny scale: an sd3_flow inpainting model (masked latent + mask
concatenated to the input) and an instruction-editing model (source latent concatenated) distilled with the same
recipe. Checked: the concat conditioners (shapes, what is dropped for guidance, the channel check), synthetic data made
from a dataset of real items (conditions stored, resumable, labels kept), the student and discriminator seeing the
image condition, gradients through the frozen teacher, a few Trainer steps, and few-step sampling with images."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import default_collate

from gencore.data import FashionMNIST, InstructionEdits, MaskedImages, apply_edit
from gencore.latents import LatentCacheDataset
from gencore.testing import randomize_parameters
from ladd_turbo.lit import LADDModule
from ladd_turbo.synth import synthesize
from sd3_flow.conditioning import EditingConditioner, InpaintingConditioner, SD3TextConditioner
from sd3_flow.lit import RectifiedFlowModule
from sd3_flow.models.mmdit import mmdit_from_preset

KINDS = {"inpaint": (InpaintingConditioner, 3), "edit": (EditingConditioner, 2)}  # pixel space: 1 + condition


def tiny_mmdit(in_channels):
    return mmdit_from_preset(
        "tiny",
        sample_size=8,
        patch_size=2,
        in_channels=in_channels,
        out_channels=1,
        pos_embed_max_size=8,
        joint_attention_dim=384,
        pooled_projection_dim=384,
    )


@pytest.fixture(scope="module")
def text():
    return SD3TextConditioner(minilm_max_length=8)


def make_teacher(kind, text):
    cls, cin = KINDS[kind]
    net = randomize_parameters(tiny_mmdit(cin), seed=3, std=0.05)
    return RectifiedFlowModule(net, None, cls(text), image_channels=1, image_size=8, sample={"num_steps": 3}).eval()


def dataset(kind, n=12):
    base = FashionMNIST(split="test", image_size=8, limit=n)
    return MaskedImages(base, seed=1) if kind == "inpaint" else InstructionEdits(base, seed=1)


def real_batch(kind, teacher, n=4):
    """A LADD batch as the synthetic data hold it: x0 plus the teacher's stored conditions."""
    items = default_collate([dataset(kind)[i] for i in range(n)])
    cond = teacher.cond_stage_model.encode(items, n)
    return {"latent": torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)), **cond}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_concat_conditioners(kind, text):
    teacher = make_teacher(kind, text)
    items = default_collate([dataset(kind)[i] for i in range(4)])
    cond = teacher.cond_stage_model(items, drop=1.0)  # every caption dropped, the image condition kept
    assert cond["c_concat"].shape == (4, 2 if kind == "inpaint" else 1, 8, 8)
    assert torch.equal(cond["c_concat"], teacher.cond_stage_model.encode(items)["c_concat"])
    uncond = teacher.cond_stage_model.unconditional(4)
    assert set(uncond) == {"context", "pooled"} and torch.equal(cond["pooled"], uncond["pooled"])
    if kind == "inpaint":  # [masked image, mask]: the hole is zeroed, the mask is the item's
        torch.testing.assert_close(cond["c_concat"][:, :1], items["image"] * (1 - items["mask"]))
        assert torch.equal(cond["c_concat"][:, 1:], items["mask"])
    else:  # the source image itself (pixel space), and the target is the exact edit
        torch.testing.assert_close(cond["c_concat"], items["source"])
        torch.testing.assert_close(items["image"][0], apply_edit(items["caption"][0], items["source"][0]))
    with pytest.raises(ValueError, match=r"in_channels=\d, out_channels=1\), got in_channels=1"):
        RectifiedFlowModule(tiny_mmdit(1), None, KINDS[kind][0](text), image_channels=1, image_size=8)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_synthetic_data_from_a_dataset_keep_the_image_condition(kind, text, tmp_path):
    teacher = make_teacher(kind, text)
    ds = dataset(kind)
    out = synthesize(teacher, None, tmp_path / "s", dataset=ds, num_samples=10, num_steps=2, batch_size=3, shard_size=4)
    cache = LatentCacheDataset(out)
    assert len(cache) == 10 and cache.extra["c_concat"].shape[0] == 10
    item = cache[5]
    assert item["caption"] == ds[5]["caption"] and item["label"] == ds[5]["label"]
    expected = teacher.cond_stage_model.encode(default_collate([ds[5]]))["c_concat"][0]
    torch.testing.assert_close(item["c_concat"], expected)
    first = cache.latents.clone()
    (out / "index.json").unlink()
    (out / "latents-00001.safetensors").unlink()
    synthesize(teacher, None, out, dataset=ds, num_samples=10, num_steps=2, batch_size=3, shard_size=4)
    assert torch.equal(LatentCacheDataset(out).latents, first)  # resumed: the same data
    with pytest.raises(ValueError, match="needs images: pass a dataset"):
        synthesize(teacher, ["a photo of a bag"], tmp_path / "t")
    with pytest.raises(ValueError, match="num_samples must be in 1..12"):
        synthesize(teacher, None, tmp_path / "u", dataset=ds, num_samples=13)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_student_and_the_discriminator_see_the_image_condition(kind, text):
    teacher = make_teacher(kind, text)
    torch.manual_seed(0)
    m = LADDModule(teacher, discriminator={"layers": [0, 1], "head_channels": 16, "time_embed_dim": 32})
    batch = real_batch(kind, teacher)
    cond = m.condition(batch)
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500.0)
    torch.testing.assert_close(m.velocity(x, t, **cond), teacher.velocity(x, t, **cond))  # student = teacher at init
    other = {**cond, "c_concat": torch.randn_like(cond["c_concat"])}
    assert not torch.allclose(m.velocity(x, t, **cond), m.velocity(x, t, **other))
    z, th = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5)
    assert not torch.allclose(m.discriminate(z, th, cond), m.discriminate(z, th, other))
    loss, _, _ = m.generator_step(batch, 0)
    loss.backward()
    assert m.student.pos_embed.proj.weight.grad[:, 1:].abs().sum() > 0  # the condition channels learn too
    assert all(p.grad is None for p in m.teacher.parameters())


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # the frozen teacher, by design
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")  # train only
def test_distilling_an_application_trains_and_samples_in_few_steps(kind, text):
    teacher = make_teacher(kind, text)
    torch.manual_seed(0)
    m = LADDModule(
        teacher,
        discriminator={"layers": [0, 1], "head_channels": 16, "time_embed_dim": 32},
        learning_rate=1e-3,
        discriminator_learning_rate=2e-3,
    )
    batch = real_batch(kind, teacher, 8)
    data = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    before = {k: v.clone() for k, v in m.student.state_dict().items()}
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(m, torch.utils.data.DataLoader(data, batch_size=4))
    assert any(not torch.equal(before[k], v) for k, v in m.student.state_dict().items())
    images = FashionMNIST(split="test", image_size=8, limit=3).tensors()[0]
    masks = torch.zeros(3, 1, 8, 8)
    masks[..., 2:6, 2:6] = 1
    request = {"images": images, "masks": masks} if kind == "inpaint" else {"images": images}
    captions = ["a photo of a bag"] * 3 if kind == "inpaint" else ["invert the colors"] * 3
    out = m.generate(3, captions=captions, num_steps=2, **request)
    assert out["images"].shape == (3, 1, 8, 8) and torch.isfinite(out["images"]).all()
    if kind == "inpaint":
        torch.testing.assert_close(out["sources"], images * (1 - masks))
    else:
        torch.testing.assert_close(out["targets"], -images)
    default = m.generate(2, labels=[7, 9], num_steps=1)  # no images: Fashion-MNIST test images of those classes
    assert default["labels"] == [7, 9] and default["sources"].shape == (2, 1, 8, 8)
