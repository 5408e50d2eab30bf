"""ImageBART as a LightningModule on a tiny config over the shipped (remapped) Fashion-MNIST VQGAN: vocabularies and
lengths handed to the stage networks, frozen stages, training on real images, sampling / masked editing and the
errors a user can hit."""

from __future__ import annotations

import pytest
import torch

from gencore.testing import assert_no_host_sync, sync_test_devices
from imagebart.editing import named_mask, token_keep_mask
from imagebart.models.xtransformer import ResidualScaledXTransformer
from taming.first_stage import load_first_stage
from taming.models.mingpt import GPT

VQGAN = "pkg://taming/checkpoints/vqgan_fmnist"
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@pytest.fixture(scope="module")
def model(build_imagebart):
    """T = 3 (two encoder-decoder stages, the GPT for t = 3), training stage 2 only."""
    return build_imagebart(train_stages=[2])


@pytest.fixture(scope="module")
def batch(fmnist):
    images, labels = fmnist
    return {"image": images[:32], "label": labels[:32]}


def _labels(n: int) -> torch.Tensor:
    return (torch.arange(n) % 10)[:, None]  # class c is input token c


# ------------------------------------------------------------------------------------------------- structure
def test_vocabularies_and_lengths_of_the_stage_networks(model, used):
    k = len(used)
    assert model.num_codes == k and model.first_stage_model.vocab_size == k
    assert model.input_vocab_size == max(k, 10, 4)  # codes, classes and stage ids share the input vocabulary
    assert model.grid == (8, 8) and model.seq_len == 64 and model.num_steps == 3
    for t in (1, 2):
        net = model.transformers[t - 1]
        assert isinstance(net, ResidualScaledXTransformer)
        assert net.encoder.num_tokens == model.input_vocab_size and net.encoder.max_seq_len == 1 + 1 + 64
        assert net.decoder.num_tokens == k and net.decoder.max_seq_len == 64
        assert (net.scale_pos, net.n_scales, net.xt_start, net.xt_end) == (0, 3, 2, 66)
        assert net.alphas_set and torch.equal(net.scale_alphas, model.schedule.alphas)
    gpt = model.transformers[2]
    assert isinstance(gpt, GPT)
    assert gpt.tok_emb.weight.shape[0] == model.input_vocab_size and gpt.head.out_features == k
    assert gpt.block_size == 66 and gpt.n_unmasked == 2


def test_train_stages_freeze_the_others(model):
    assert model.train_stages == [2]
    trained, frozen = model.transformers[1], [model.transformers[0], model.transformers[2], model.first_stage_model]
    assert all(p.requires_grad for p in trained.parameters())
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    opt = model.configure_optimizers()["optimizer"]
    held = [p for group in opt.param_groups for p in group["params"]]
    assert len(held) == len(list(trained.parameters()))
    assert {id(p) for p in held} == {id(p) for p in trained.parameters()}
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert all(group["weight_decay"] == 0.01 for group in opt.param_groups)  # the official AdamW on everything


def test_the_gpt_stage_uses_the_mingpt_decay_split(build_imagebart):
    m = build_imagebart(train_stages=[3])
    opt = m.configure_optimizers()["optimizer"]
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in m.transformers[2].parameters()}
    assert sorted(group["weight_decay"] for group in opt.param_groups) == [0.0, 0.01]


def test_bad_train_stages(build_imagebart):
    for bad in ([0], [4], [1, 1], []):
        with pytest.raises(ValueError, match=r"train_stages must be distinct stages in \[1, T=3\]"):
            build_imagebart(train_stages=bad)


# --------------------------------------------------------------------------------------------------- training
def test_stage_logits_and_a_finite_loss(model, batch):
    x0 = model.encode_to_tokens(batch["image"][:4])
    assert x0.shape == (4, 64) and int(x0.max()) < model.num_codes
    cond = _labels(4)
    for t in (1, 2, 3):
        prev, xt = model.schedule.q_pair(x0, t, model.num_codes)
        assert model.stage_logits(t, xt, prev, cond).shape == (4, 64, model.num_codes)
    loss = model.stage_losses(batch, "train")
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    trained = model.transformers[1]
    assert all(p.grad is not None for n, p in trained.named_parameters() if not n.startswith("encoder.to_logits"))
    assert all(p.grad is None for p in model.transformers[0].parameters())
    model.zero_grad(set_to_none=True)


def test_a_few_adamw_steps_decrease_the_loss(build_imagebart, batch):
    m = build_imagebart(seed=1)  # every stage trained, the batch dealt round-robin
    assert m.train_stages == [1, 2, 3]
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]

    def loss_at(seed: int = 123) -> float:
        torch.manual_seed(seed)  # the same forward-process draws every time
        with torch.no_grad():
            return float(m.stage_losses(batch, "train"))

    before = loss_at()
    m.train()
    for _ in range(30):
        loss = m.stage_losses(batch, "train")
        assert torch.isfinite(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    after = loss_at()
    assert after < 0.7 * before, (before, after)  # about halves in 30 steps


def test_a_small_batch_cannot_feed_every_stage(build_imagebart, batch):
    with pytest.raises(ValueError, match="a batch of 2 cannot feed the 3 trained stages"):
        build_imagebart().stage_losses({"image": batch["image"][:2], "label": batch["label"][:2]}, "train")


@pytest.mark.parametrize("device", sync_test_devices())
def test_training_step_does_not_sync(build_imagebart, device):
    from gencore.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(image_size=32, limit_train=64, limit_val=8, batch_size=8, num_workers=0)
    assert_no_host_sync(build_imagebart(), dm, steps=2, warmup=1, device=device)


# ------------------------------------------------------------------------------------------------------- errors
def test_num_codes_must_match_the_remapped_vqgan(build_imagebart, used):
    k = len(used)
    with pytest.raises(ValueError, match=r"num_codes=\d+ .* gives 512 token ids: .*remap=") as err:
        build_imagebart(first_stage=load_first_stage(VQGAN), num_codes=k)
    assert "no remap" in str(err.value)
    with pytest.raises(ValueError, match=f"its remap lists {k} codes"):
        build_imagebart(num_codes=k + 1)
    assert build_imagebart(num_codes=k).num_codes == k


def test_the_schedule_must_end_in_pure_noise(build_imagebart):
    with pytest.raises(ValueError, match="x_T must be pure noise"):
        build_imagebart(alphacum=[0.6, 0.3, 0.1])
    with pytest.raises(ValueError, match="x_T must be pure noise"):
        build_imagebart(redraw_prob=0.5)
    assert build_imagebart(alphacum=[0.6, 0.3, 0.0]).schedule.final_noise


def test_bad_alpha_and_conditioner(build_imagebart):
    from taming.conditioning import ClassConditioner

    with pytest.raises(ValueError, match=r"alpha must be one value or T=3 values"):
        build_imagebart(alpha=[0.0, 1.0])
    with pytest.raises(ValueError, match=r"alpha values must be in \[0, 1\]"):
        build_imagebart(alpha=1.5)
    from imagebart.lit import ImageBART

    m = build_imagebart()
    with pytest.raises(ValueError, match="conditioner offset 0"):
        ImageBART(
            m.first_stage_model,
            type(m.transformers[0]),
            GPT,
            ClassConditioner(10, offset=30),
            num_steps=3,
            alpha=0.0,
        )


def test_class_ids_out_of_range_are_refused(model, batch):
    with pytest.raises(ValueError, match=r"label 10 outside \[0, 10\)"):
        model.generate(1, labels=[10])
    with pytest.raises(ValueError, match="needs class tokens"):
        model.sample_tokens(2)
    bad = {"image": batch["image"][:4], "label": torch.tensor([1, 2, 10, 3])}
    with pytest.raises(ValueError, match="labels"):
        model.stage_losses(bad, "train")


def test_images_of_the_wrong_size_are_refused(model):
    with pytest.raises(ValueError, match="16x16 do not match the model's 32x32"):
        model.encode_to_tokens(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown sampling option"):
        model.generate(2, labels=[0, 1], steps=3)


# ---------------------------------------------------------------------------------------------------- sampling
def test_greedy_sampling_follows_the_teacher_forced_logits(model, batch):
    # each stage's sampler and its training logits agree on offsets: the greedy draw is the argmax of the
    # teacher-forced logits of the drawn sequence, for the encoder-decoder stages and the GPT
    x0 = model.encode_to_tokens(batch["image"][:3])
    cond = _labels(3)
    for t in (1, 2, 3):
        xt = model.schedule.q_sample(x0, t, model.num_codes, torch.Generator().manual_seed(t))
        for use_cache in (True, False):
            drawn = model.sample_stage(t, xt, cond, top_k=1, use_cache=use_cache)
            with torch.no_grad():
                logits = model.stage_logits(t, xt, drawn, cond)
            assert torch.equal(drawn, logits.argmax(-1)), (t, use_cache)


def test_sample_tokens_is_reproducible(model):
    cond = _labels(3)

    def draw(seed: int, **kw) -> torch.Tensor:
        return model.sample_tokens(3, cond, generator=torch.Generator().manual_seed(seed), **kw)

    a = draw(0)
    assert a.shape == (3, 64) and a.dtype == torch.long and int(a.max()) < model.num_codes
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(1))
    assert torch.equal(a, draw(0, use_cache=False))  # the cached decoder draws what the official loop draws


@pytest.mark.parametrize("chains", [1, 2])
def test_masked_editing_never_changes_the_kept_tokens(model, batch, chains):
    n = 4
    clean = model.encode_to_tokens(batch["image"][:n])
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(n, 64, generator=g) < 0.5
    x0, chain = model.sample_tokens(
        n, _labels(n), clean=clean, keep=keep, chains=chains, generator=g, return_chain=True
    )
    assert len(chain) == 4
    for x in chain:  # x_T (the kept tokens plus noise), x_2, x_1, x_0
        assert torch.equal(x[keep], clean[keep])
    changed = float((x0[~keep] != clean[~keep]).float().mean())
    assert changed > 0.5, changed  # an untrained model resamples the hole nearly uniformly over K codes


def test_masked_editing_validates(model, batch):
    clean = model.encode_to_tokens(batch["image"][:2])
    keep = torch.ones(2, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs both"):
        model.sample_tokens(2, _labels(2), clean=clean)
    with pytest.raises(ValueError, match=r"must be \(n=2, L=64\)"):
        model.sample_tokens(2, _labels(2), clean=clean[:, :32], keep=keep[:, :32])


def test_inpaint_on_images(model, batch):
    images, labels = batch["image"][:2], batch["label"][:2]
    keep = named_mask("upper", 32)
    out = model.inpaint(images, keep, labels)
    assert out["images"].shape == (2, 1, 32, 32)
    assert float(out["images"].min()) >= -1 and float(out["images"].max()) <= 1
    expected = token_keep_mask(keep, (8, 8)).expand(2, -1)
    assert torch.equal(out["keep"], expected)
    assert bool((out["sources"][:, :, :16] == 0).all()) and torch.equal(out["sources"][:, :, 16:], images[:, :, 16:])
    # a mask on the token grid and one per image work too
    per_image = torch.stack((named_mask("left", 32), named_mask("right", 32)))[:, None]
    got = model.inpaint(images, per_image, labels)["keep"]
    assert torch.equal(got, token_keep_mask(per_image, (8, 8)))
    assert got[0].view(8, 8)[:, :4].sum() == 0 and got[1].view(8, 8)[:, 4:].sum() == 0
    assert model.inpaint(images, torch.ones(8, 8).tril(), labels)["keep"].shape == (2, 64)


def test_inpaint_refuses_bad_masks(model, batch):
    images, labels = batch["image"][:2], batch["label"][:2]
    for size in (30, 16):
        with pytest.raises(ValueError, match=f"mask of size {size}x{size} .* image size 32x32"):
            model.inpaint(images, torch.ones(size, size), labels)
    with pytest.raises(ValueError, match="covers the whole image"):
        model.inpaint(images, torch.zeros(32, 32), labels)
    with pytest.raises(ValueError, match="3 masks for 2 images"):
        model.inpaint(images, torch.ones(3, 32, 32), labels)
    with pytest.raises(ValueError, match=r"label 10 outside \[0, 10\)"):
        model.inpaint(images, named_mask("upper", 32), [3, 10])


def test_generate(model):
    out = model.generate(4, labels=[1, 2, 3, 4])
    assert out["images"].shape == (4, 1, 32, 32)
    assert float(out["images"].min()) >= -1 and float(out["images"].max()) <= 1
    assert out["labels"].tolist() == [1, 2, 3, 4]
    assert model.generate(3)["labels"].shape == (3,)  # random classes when none are asked for
    assert model.evaluation_request() == {"labels": list(range(10))}


def test_per_stage_runs_combine_into_one_model(build_imagebart):
    base, other = build_imagebart(seed=0), build_imagebart(seed=1)
    before = {k: v.clone() for k, v in base.transformers[0].state_dict().items()}
    base.take_stages(other, [2, 3])
    for t in (2, 3):
        for (k, a), b in zip(
            base.transformers[t - 1].state_dict().items(), other.transformers[t - 1].state_dict().values()
        ):
            assert torch.equal(a, b), (t, k)
    for k, v in base.transformers[0].state_dict().items():
        assert torch.equal(v, before[k]), k  # stage 1 untouched
    with pytest.raises(ValueError, match="stage 4 is outside"):
        base.take_stages(other, [4])
    with pytest.raises(ValueError, match="the models differ"):
        base.take_stages(build_imagebart(num_steps=2, alpha=[0.0, 1.0]), [1])


def test_editing_with_a_class_model_needs_the_labels(model, batch):
    with pytest.raises(ValueError, match="pass labels"):
        model.inpaint(batch["image"][:2], named_mask("upper", 32))


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"temperature": 0}, r"temperature must be > 0, got 0"),
        ({"temperature": [1, 1, -1]}, r"temperature must be > 0, got -1"),
        ({"top_k": 0}, r"top_k must be an integer >= 1 \(values >= K=\d+ mean no filtering\)"),
        ({"chains": [1, 0, 1]}, r"chains must be an integer >= 1"),
        ({"top_k": [5, 5]}, r"top_k must be one value or T=3 values"),
    ],
)
def test_bad_sampling_options_are_refused(model, option, message):
    with pytest.raises(ValueError, match=message):
        model.generate(2, labels=[1, 2], **option)
