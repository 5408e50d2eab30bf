"""ladd_turbo on a tiny pixel-space sd3_flow teacher: the objective's pieces against closed forms, the discriminator on
the frozen teacher's features at two aspect ratios, gradients through the teacher in the student step and none into
the student in the discriminator step, few-step sampling grids, the synthetic data (resumable), bad input."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from gencore.latents import LatentCacheDataset
from gencore.testing import randomize_parameters
from ladd_turbo.discriminator import TeacherFeatureDiscriminator, evenly_spaced_layers
from ladd_turbo.lit import LADDModule
from ladd_turbo.losses import (
    approximate_r1,
    discriminator_loss,
    generator_loss,
    renoise,
    renoise_timesteps,
    sample_student_sigmas,
    student_sigmas,
)
from ladd_turbo.sampling import few_step_sigmas
from ladd_turbo.synth import read_prompts, synthesize
from sd3_flow.conditioning import SD3TextConditioner
from sd3_flow.lit import RectifiedFlowModule
from sd3_flow.models.mmdit import mmdit_from_preset

PROMPTS = ["a photo of a sneaker", "a photo of a bag", "a photo of a dress"]


def tiny_mmdit(**overrides):
    kw = dict(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        out_channels=1,
        pos_embed_max_size=8,
        joint_attention_dim=384,
        pooled_projection_dim=384,
    )
    return mmdit_from_preset("tiny", **{**kw, **overrides})


@pytest.fixture(scope="module")
def text():
    return SD3TextConditioner(minilm_max_length=8)


@pytest.fixture
def teacher(text):
    torch.manual_seed(0)
    net = randomize_parameters(tiny_mmdit(), seed=3, std=0.05)
    return RectifiedFlowModule(net, None, text, image_channels=1, image_size=8, sample={"num_steps": 4}).eval()


def batch_of(teacher, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    cond = teacher.cond_stage_model.encode_text(captions)
    return {"latent": torch.randn(n, 1, 8, 8, generator=g), "caption": captions, **cond}


# ------------------------------------------------------------------------------------------- objective pieces


def test_adversarial_losses_closed_forms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    assert discriminator_loss(real, fake, "hinge") == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3)
    assert generator_loss(fake, "hinge") == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    sp = torch.nn.functional.softplus
    assert discriminator_loss(real, fake, "non_saturating") == pytest.approx(
        float(sp(-real).mean() + sp(fake).mean()), rel=1e-6
    )
    assert generator_loss(fake, "non_saturating") == pytest.approx(float(sp(-fake).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="unknown adversarial loss 'wgan'"):
        generator_loss(fake, "wgan")


def test_renoising_is_logit_normal_and_rescaled():
    g = torch.Generator().manual_seed(0)
    t = renoise_timesteps(200_000, mean=1.0, std=1.0, generator=g)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(1.0, abs=0.01) and logit.std().item() == pytest.approx(1.0, abs=0.01)
    t = renoise_timesteps(10_000, mean=0.0, std=1.0, min_t=0.2, max_t=0.6, generator=g)
    assert 0.2 <= t.min().item() and t.max().item() <= 0.6 and t.mean().item() == pytest.approx(0.4, abs=0.01)
    with pytest.raises(ValueError, match="std > 0"):
        renoise_timesteps(4, std=0.0)
    x0, eps = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert torch.allclose(renoise(x0, torch.tensor([0.25, 1.0]), eps)[:, 0, 0, 0], torch.tensor([0.75, 0.0]))


def test_student_schedule_is_the_turbo_recipe_and_favours_t1():
    assert student_sigmas(4, 3.0) == pytest.approx([1.0, 0.857692, 0.602150, 0.0089286], abs=1e-6)
    draws = sample_student_sigmas(20_000, [1.0, 0.5], [0.9, 0.1], generator=torch.Generator().manual_seed(0))
    assert (draws == 1.0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    with pytest.raises(ValueError, match="2 weights for 3 timesteps"):
        sample_student_sigmas(4, [1.0, 0.5, 0.2], [1.0, 1.0])


def test_few_step_grids_visit_only_trained_levels():
    s = student_sigmas(4, 3.0)
    assert few_step_sigmas(s, 4) == [*s, 0.0]
    assert few_step_sigmas(s, 2) == [s[0], s[2], 0.0]
    assert few_step_sigmas(s, 1) == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"num_steps must be an integer in 1..4"):
        few_step_sigmas(s, 5)


def test_approximate_r1_vanishes_for_a_constant_discriminator():
    real = torch.randn(8, 1, 4, 4)
    assert approximate_r1(lambda z: torch.zeros(len(z), 2), real).item() == 0.0
    weak = approximate_r1(lambda z: 0.1 * z.flatten(1).sum(1, keepdim=True), real)
    strong = approximate_r1(lambda z: 10.0 * z.flatten(1).sum(1, keepdim=True), real)
    assert 0 < weak.item() < strong.item()


# ------------------------------------------------------------------------------------------- discriminator


def test_discriminator_heads_run_at_two_aspect_ratios(teacher):
    d = TeacherFeatureDiscriminator(teacher.transformer, [0, 1], head_channels=16, time_embed_dim=32)
    assert evenly_spaced_layers(24, 4) == [5, 11, 17, 23]
    cond = teacher.cond_stage_model.encode_text(PROMPTS[:2])
    for h, w in ((8, 8), (4, 8)):
        logits = d(teacher.transformer, torch.randn(2, 1, h, w), torch.tensor([0.3, 0.9]), **cond)
        assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert not any(k.startswith("teacher") for k in d.state_dict())  # only heads are the discriminator's weights
    with pytest.raises(ValueError, match="block indices in 0..1 of the teacher"):
        TeacherFeatureDiscriminator(teacher.transformer, [2])


# ------------------------------------------------------------------------------------------- the recipe


def ladd(teacher, **kw):
    torch.manual_seed(0)
    kw.setdefault("discriminator", {"layers": [0, 1], "head_channels": 16, "time_embed_dim": 32})
    return LADDModule(teacher, learning_rate=1e-3, discriminator_learning_rate=2e-3, **kw)


def test_student_starts_as_the_teacher_and_gradients_flow_through_the_frozen_teacher(teacher):
    m = ladd(teacher, distillation_weight=0.5)
    for (k, a), b in zip(m.student.state_dict().items(), teacher.transformer.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert m.student is not teacher.transformer
    loss, logs, state = m.generator_step(batch_of(teacher), 0)
    loss.backward()
    assert "train/distill" in logs
    unused = ("transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.norm_added_q")  # SD3's last block
    for name, p in m.student.named_parameters():  # drops its text queries (context_pre_only)
        if not name.startswith(unused):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    m.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in m.student.state_dict().items()}
    d_loss, _ = m.discriminator_step(batch_of(teacher), state, 0)
    d_loss.backward()
    assert all(p.grad is None for p in m.student.parameters())  # the discriminator step leaves the student alone
    assert all(p.grad is not None for p in m.discriminator.parameters())
    assert all(torch.equal(before[k], v) for k, v in m.student.state_dict().items())


def test_same_renoise_shares_t_and_noise(teacher):
    m = ladd(teacher, same_renoise=True)
    seen = []
    m.discriminate = lambda z, t, cond: seen.append((z, t)) or torch.zeros(len(z), 2)
    x0 = batch_of(teacher)["latent"]
    m.discriminator_step(batch_of(teacher), (x0.clone(), batch_of(teacher)), 0)
    (z_real, t_real), (z_fake, t_fake) = seen
    assert torch.equal(t_real, t_fake) and torch.equal(z_real, z_fake)  # same x0, same t_hat, same noise


@pytest.mark.filterwarnings("ignore:Found .* module\\(s\\) in eval mode")  # the frozen teacher, by design
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")  # train only
def test_a_few_training_steps_keep_the_teacher_and_train_both_players(teacher, tmp_path):
    m = ladd(teacher, generator_every=2, r1_weight=0.1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in m.student.state_dict().items()}
    data = [{k: v[i] for k, v in batch_of(teacher, 8).items()} for i in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = L.Trainer(max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(m, loader)
    assert trainer.global_step == 8
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in m.student.state_dict().items())
    out = m.generate(3, captions=PROMPTS, num_steps=2)
    assert out["images"].shape == (3, 1, 8, 8) and out["captions"] == PROMPTS
    with pytest.raises(ValueError, match="unguided"):
        m.generate(1, captions=PROMPTS[:1], guidance_scale=4.0)


def test_a_student_of_another_architecture_is_refused(teacher):
    with pytest.raises(ValueError, match="does not match the teacher's architecture.*shapes differ"):
        LADDModule(teacher, tiny_mmdit(num_attention_heads=2, caption_projection_dim=16))
    with pytest.raises(ValueError, match="teacher keys missing"):
        LADDModule(teacher, tiny_mmdit(num_layers=1))
    with pytest.raises(ValueError, match="sd3_flow RectifiedFlowModule"):
        LADDModule(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------- synthetic data


def test_synthetic_data_are_resumable_and_carry_text_features(teacher, tmp_path):
    out = synthesize(teacher, PROMPTS, tmp_path / "s", num_per_prompt=3, num_steps=2, batch_size=2, shard_size=4)
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 9 and len(index["shards"]) == 3
    ds = LatentCacheDataset(out)
    item = ds[4]
    assert item["latent"].shape == (1, 8, 8) and item["caption"] == PROMPTS[1]
    assert item["context"].shape == (8, 384) and item["pooled"].shape == (384,)
    expected = teacher.cond_stage_model.encode_text([PROMPTS[1]])["pooled"][0]
    assert torch.allclose(item["pooled"], expected, atol=1e-5)
    # a killed run: one shard and the index missing; the rerun writes only that shard, the same as before
    first = ds.latents.clone()
    (out / "index.json").unlink()
    (out / index["shards"][1]).unlink()
    mtime = (out / index["shards"][0]).stat().st_mtime_ns
    synthesize(teacher, PROMPTS, out, num_per_prompt=3, num_steps=2, batch_size=2, shard_size=4)
    assert (out / index["shards"][0]).stat().st_mtime_ns == mtime
    assert torch.equal(LatentCacheDataset(out).latents, first)
    # other settings: not resumable into the same folder, remade
    synthesize(teacher, PROMPTS, out, num_per_prompt=3, num_steps=2, batch_size=2, shard_size=4, guidance_scale=1.0)
    assert not torch.equal(LatentCacheDataset(out).latents, first)


def test_prompt_files_and_bad_synthesis_input(tmp_path, teacher):
    (tmp_path / "p.txt").write_text("# comment\na photo of a bag\n\n a photo of a coat \n")
    assert read_prompts(tmp_path / "p.txt") == ["a photo of a bag", "a photo of a coat"]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="prompt list is empty"):
        synthesize(teacher, [], tmp_path / "s")
    with pytest.raises(ValueError, match="num_samples counts the items of a source= dataset"):
        synthesize(teacher, PROMPTS, tmp_path / "s", num_samples=3)
    with pytest.raises(ValueError, match=r"source= \(a dataset of images\) is for inpainting / editing teachers"):
        synthesize(teacher, None, tmp_path / "s", dataset=torch.utils.data.TensorDataset(torch.zeros(2)))
