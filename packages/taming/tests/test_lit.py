import pytest
import torch
import torch.nn.functional as F

from gencore.conditioning import NoConditioner
from gencore.training import GANModule
from taming.conditioning import ClassConditioner, SOSConditioner, SpatialConditioner
from taming.lit import Net2NetTransformer, VQGANModule
from taming.losses import VQLPIPSWithDiscriminator
from taming.models.mingpt import GPT
from taming.models.quantize import codebook_usage
from taming.models.vqgan import build_vqmodel


def tiny_vq(**kw):
    torch.manual_seed(0)
    return build_vqmodel("tiny", **kw)  # 16x16 gray -> 8x8 codes, 64 entries


def tiny_gpt(vocab=64, block=64):
    torch.manual_seed(1)
    return GPT(vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)


def batch(n=4, size=16):
    g = torch.Generator().manual_seed(2)
    return {"image": torch.rand(n, 1, size, size, generator=g) * 2 - 1, "label": torch.arange(n) % 3}


@pytest.mark.filterwarnings("ignore:.*self.trainer. reference is not registered")  # a bare module, no Trainer
def test_net2net_loss_is_cross_entropy_over_image_tokens():
    m = Net2NetTransformer(tiny_gpt(), tiny_vq(), SOSConditioner(5))
    b = batch()
    z, grid = m.encode_to_z(b["image"])
    assert grid == (8, 8) and z.shape == (4, 64)
    c = m.encode_to_c(b, 4)
    assert c.tolist() == [[5]] * 4
    logits, target = m(z, c)
    # logits[:, i] predicts z_i from [c, z_<i]: compare with running the GPT by hand
    full, _ = m.transformer(torch.cat((c, z), 1)[:, :-1])
    torch.testing.assert_close(logits, full)
    assert torch.equal(target, z)
    loss = m._step(b, "val")
    assert loss.item() == pytest.approx(F.cross_entropy(full.reshape(-1, 64), z.reshape(-1)).item(), rel=1e-6)


def test_class_and_spatial_conditioning_tokens():
    cls = Net2NetTransformer(tiny_gpt(vocab=70), tiny_vq(), ClassConditioner(6, offset=64))
    b = batch()
    assert cls.encode_to_c(b, 4).tolist() == [[64], [65], [66], [64]]
    out = cls.generate(3, labels=[0, 5, 2], top_k=8)
    assert out["images"].shape == (3, 1, 16, 16) and out["labels"].tolist() == [0, 5, 2]
    spatial = Net2NetTransformer(
        tiny_gpt(block=127), tiny_vq(), SpatialConditioner(tiny_vq(n_embed=32), condition="edges")
    )
    c = spatial.encode_to_c(b, 4)
    assert c.shape == (4, 64) and int(c.max()) < 32
    logs = spatial.log_images(b, n=2)
    assert set(logs) == {"inputs", "reconstructions", "samples", "samples_half", "conditioning"}
    assert all(v.shape == (2, 1, 16, 16) for v in logs.values())
    # conditioning from the data itself: edge maps of the images
    assert set(logs["conditioning"].unique().tolist()) <= {-1.0, 1.0}


def test_frozen_stages_and_optimizer_cover_only_the_transformer():
    m = Net2NetTransformer(tiny_gpt(block=127), tiny_vq(), SpatialConditioner(tiny_vq()))
    m.train()
    assert not m.first_stage_model.training and not m.cond_stage_model.training
    assert all(not p.requires_grad for p in m.first_stage_model.parameters())
    m.trainer = None
    opt = torch.optim.AdamW(m.transformer.optimizer_groups(0.01))
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in m.transformer.parameters())
    from gencore.io import frozen_prefixes

    assert set(frozen_prefixes(m)) >= {"first_stage_model.", "cond_stage_model."}
    # the official state layout of the conditioning VQGAN
    assert "cond_stage_model.encoder.conv_in.weight" in m.state_dict()
    assert "cond_stage_model.quantize.embedding.weight" in m.state_dict()


def test_pkeep_corrupts_only_in_training():
    m = Net2NetTransformer(tiny_gpt(), tiny_vq(), pkeep=0.5)
    b = batch()
    z, _ = m.encode_to_z(b["image"])
    c = m.encode_to_c(b, 4)
    m.eval()
    a, _ = m(z, c)
    b2, _ = m(z, c)
    assert torch.equal(a, b2)
    m.train()
    torch.manual_seed(0)
    t1, target = m(z, c)
    assert torch.equal(target, z) and not torch.allclose(t1, a)  # inputs corrupted, targets are the clean codes


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="vocab_size 40 is smaller.*image codes need 64"):
        Net2NetTransformer(tiny_gpt(vocab=40), tiny_vq())
    with pytest.raises(ValueError, match="conditioning tokens need 74"):
        Net2NetTransformer(tiny_gpt(vocab=70), tiny_vq(), ClassConditioner(10, offset=64))
    with pytest.raises(ValueError, match="conditioning tokens need 65"):
        Net2NetTransformer(tiny_gpt(vocab=64), tiny_vq(), SOSConditioner(64))
    with pytest.raises(ValueError, match="pkeep"):
        Net2NetTransformer(tiny_gpt(), tiny_vq(), pkeep=0.0)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        Net2NetTransformer(tiny_gpt(), tiny_vq(), learning_rate=0.0)
    with pytest.raises(ValueError, match="cond_stage must be"):
        Net2NetTransformer(tiny_gpt(), tiny_vq(), cond_stage="depth")
    with pytest.raises(ValueError, match="a conditioner that produces tokens"):
        Net2NetTransformer(tiny_gpt(), tiny_vq(), NoConditioner())
    m = Net2NetTransformer(tiny_gpt(), tiny_vq(), ClassConditioner(3))
    with pytest.raises(ValueError, match="needs batch\\['label'\\]"):
        m.encode_to_c({"image": torch.zeros(1, 1, 16, 16)}, 1)
    with pytest.raises(ValueError, match="not divisible by the first stage's factor 2"):
        m.latent_grid(15)


def test_vqgan_module_manual_optimisation_steps_both_players():
    model = tiny_vq()
    loss = VQLPIPSWithDiscriminator(disc_start=0, disc_in_channels=1, disc_ndf=8, disc_num_layers=2, perceptual="none")
    m = VQGANModule(model, loss, learning_rate=1e-3, scale_lr=False, usage_every=1)
    opts = [torch.optim.Adam(model.parameters(), 1e-3), torch.optim.Adam(loss.discriminator.parameters(), 1e-3)]
    m.optimizers = lambda: opts
    m.manual_backward = lambda t: t.backward()
    logged = {}
    m.log = lambda k, v, **kw: logged.__setitem__(k, v)
    m.log_dict = lambda d, **kw: logged.update(d)
    before_g = model.decoder.conv_out.weight.detach().clone()
    before_d = loss.discriminator.main[0].weight.detach().clone()
    m.training_step(batch(), 0)
    assert not torch.equal(before_g, model.decoder.conv_out.weight)
    assert not torch.equal(before_d, loss.discriminator.main[0].weight)
    assert {"train/aeloss", "train/disc_loss", "train/d_weight", "train/perplexity", "train/dead_codes"} <= set(logged)
    assert 1 <= logged["train/perplexity"] <= 64
    assert isinstance(m, GANModule) and m.generator_loss_name == "train/aeloss"
    assert {id(p) for p in m.generator_parameters()} == {id(p) for p in model.parameters()}
    assert {id(p) for p in m.discriminator_parameters()} == {id(p) for p in loss.discriminator.parameters()}


def test_codebook_usage_window_counts_on_the_device_like_codebook_usage():
    loss = VQLPIPSWithDiscriminator(disc_start=0, disc_in_channels=1, disc_ndf=8, disc_num_layers=2, perceptual="none")
    m = VQGANModule(tiny_vq(), loss, scale_lr=False, usage_every=2)
    logged = {}
    m.log_dict = lambda d, **kw: logged.update(d)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 8, (4, 8, 8), generator=g), torch.randint(0, 64, (4, 8, 8), generator=g)
    m._track_usage(a)
    assert logged == {} and m._usage.sum() == a.numel()  # the window is not full yet
    m._track_usage(b)
    ref = codebook_usage(torch.cat([a, b]), 64)
    assert logged["train/perplexity"].item() == pytest.approx(ref["perplexity"], rel=1e-5)
    assert logged["train/codebook_used"].item() == pytest.approx(ref["used_fraction"])
    assert logged["train/dead_codes"].item() == ref["dead_codes"]
    assert m._usage.sum() == 0 and m._usage_batches == 0  # a new window
    with pytest.raises(ValueError, match="usage_every must be >= 1"):
        VQGANModule(tiny_vq(), loss, usage_every=0)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        VQGANModule(tiny_vq(), loss, learning_rate=0.0)


def test_vqgan_module_condition_input_and_gumbel_schedule():
    model = build_vqmodel(
        "tiny",
        gumbel=True,
        n_embed=16,
        embed_dim=16,
        temperature_schedule=dict(warm_up_steps=0, max_decay_steps=10, lr_start=0.9, lr_max=0.9, lr_min=0.1),
    )
    loss = VQLPIPSWithDiscriminator(
        disc_start=100, disc_in_channels=1, disc_ndf=8, disc_num_layers=2, perceptual="none"
    )
    m = VQGANModule(model, loss, scale_lr=False, condition="edges")
    x = m.get_input(batch())
    assert set(x.unique().tolist()) <= {-1.0, 1.0}  # trains on edge maps
    opts = [torch.optim.Adam(model.parameters()), torch.optim.Adam(loss.discriminator.parameters())]
    m.optimizers = lambda: opts
    m.manual_backward = lambda t: t.backward()
    m.log = m.log_dict = lambda *a, **k: None
    m.training_step(batch(), 0)
    assert model.temperature == pytest.approx(0.9)


@pytest.mark.parametrize("cond", ["sos", "class", "spatial"])
def test_generate_beyond_the_training_window_slides(cond):
    vq = tiny_vq()  # trained at 16x16 -> an 8x8 window of codes
    conditioner = {
        "sos": SOSConditioner(),
        "class": ClassConditioner(10, offset=64),
        "spatial": SpatialConditioner(tiny_vq(n_embed=32), condition="edges"),
    }[cond]
    m = Net2NetTransformer(tiny_gpt(vocab=74, block=128), vq, conditioner)
    kw = {"cond_images": -torch.ones(2, 1, 24, 24)} if cond == "spatial" else {}
    out = m.generate(2, labels=[1, 2] if cond == "class" else None, image_size=24, top_k=8, **kw)
    assert out["images"].shape == (2, 1, 24, 24)  # a 12x12 grid from an 8x8 window
    assert m.generate(
        2,
        labels=[1, 2] if cond == "class" else None,
        top_k=8,
        **({"cond_images": -torch.ones(2, 1, 16, 16)} if cond == "spatial" else {}),
    )["images"].shape == (2, 1, 16, 16)
