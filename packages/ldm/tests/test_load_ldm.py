"""An official LDM / SD v1 checkpoint (Lightning-1.x dict + yaml) loads into LatentDiffusion in one call."""

import pytest
import torch
from omegaconf import OmegaConf

from gencore.io import CheckpointKeyError
from gencore.testing import randomize_parameters, tiny_clip
from ldm.conditioning import ClassConditioner, SemanticConditioner, TextConditioner
from ldm.convert import load_ldm
from ldm.first_stage import KLCodec
from ldm.lit import LatentDiffusion
from ldm.models.autoencoder import AUTOENCODER_PRESETS, build_autoencoder
from ldm.models.unet import UNET_PRESETS, unet_from_preset

SCHEDULE_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def official_layout(module: LatentDiffusion, ema_offset: float | None = None) -> dict:
    """Our module's weights under the official LatentDiffusion names (what a released .ckpt holds)."""
    out = {}
    for k, v in module.state_dict().items():
        if k.startswith("first_stage_model.model."):
            out["first_stage_model." + k[len("first_stage_model.model.") :]] = v
        elif k.startswith("schedule."):
            out[k[len("schedule.") :]] = v
        elif k.startswith("cond_stage_model.encoder."):  # FrozenCLIPEmbedder is the cond_stage_model itself
            out["cond_stage_model." + k[len("cond_stage_model.encoder.") :]] = v
        elif k == "latent_norm.scale":
            out["scale_factor"] = v
        else:
            out[k] = v
    out["first_stage_model.loss.logvar"] = torch.zeros(())  # training-only entries of the first stage
    if ema_offset is not None:
        for name, p in module.model.named_parameters():
            out["model_ema." + name.replace(".", "")] = p.detach() + ema_offset
        out["model_ema.decay"], out["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(100)
    return out


def yaml_for(cond_stage: dict | str, *, unet: dict, conditioning_key="crossattn") -> dict:
    return {
        "model": {
            "base_learning_rate": 1e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.012,
                "timesteps": 1000,
                "image_size": 8,
                "channels": 4,
                "conditioning_key": conditioning_key,
                "scale_factor": 0.18215,
                "first_stage_key": "image",
                "cond_stage_key": "class_label",
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {**AUTOENCODER_PRESETS["tiny"], "lossconfig": {"target": "torch.nn.Identity"}},
                },
                "cond_stage_config": cond_stage,
            },
        }
    }


def build(conditioner, context: int) -> LatentDiffusion:
    torch.manual_seed(0)
    unet = unet_from_preset("tiny", context_dim=context)
    m = LatentDiffusion(
        unet,
        KLCodec(build_autoencoder("tiny")),
        conditioner,
        image_size=32,
        schedule={"linear_start": 0.00085, "linear_end": 0.012},
        scale_factor=0.18215,
    )
    randomize_parameters(m.model, seed=1, std=0.02)
    randomize_parameters(m.first_stage_model, seed=2, std=0.02)
    randomize_parameters(m.cond_stage_model, seed=3, std=0.02)
    return m.eval()


def test_class_conditional_checkpoint_with_ema(tmp_path):
    src = build(ClassConditioner(11, null_class=False), 16)
    state = official_layout(src, ema_offset=0.01)
    assert "scale_factor" in state and "cond_stage_model.embedding.weight" in state  # the official names
    torch.save({"state_dict": state, "global_step": 100}, tmp_path / "model.ckpt")
    cfg = yaml_for(
        {
            "target": "ldm.modules.encoders.modules.ClassEmbedder",
            "params": {"embed_dim": 16, "n_classes": 11, "key": "class_label"},
        },
        unet={**UNET_PRESETS["tiny"], "context_dim": 16},
    )
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    loaded = load_ldm(tmp_path / "model.ckpt", config=tmp_path / "config.yaml")
    x = torch.rand(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    c = src.conditions({"label": torch.tensor([3, 10])})
    torch.testing.assert_close(loaded.denoise(x, t, **c), src.denoise(x, t, **c))
    assert isinstance(loaded.cond_stage_model, ClassConditioner) and not loaded.cond_stage_model.null_class
    torch.testing.assert_close(loaded.cond_stage_model.embedding.weight, src.cond_stage_model.embedding.weight)
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode(img), src.encode(img))
    assert float(loaded.scale_factor) == pytest.approx(0.18215)
    ema = load_ldm(tmp_path / "model.ckpt", config=cfg, use_ema=True)
    w_raw = loaded.model.diffusion_model.time_embed[0].weight
    torch.testing.assert_close(ema.model.diffusion_model.time_embed[0].weight, w_raw + 0.01)
    # a broken checkpoint names the key
    state = official_layout(src)
    del state["cond_stage_model.embedding.weight"]
    torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointKeyError, match="embedding.weight"):
        load_ldm(tmp_path / "broken.ckpt", config=cfg)


def test_sd_style_text_checkpoint_needs_and_uses_a_local_clip(tmp_path):
    clip_dir = tiny_clip(tmp_path / "clip", hidden_size=32)
    src = build(TextConditioner(clip_dir, projection=False, max_length=77), 32)
    with torch.no_grad():  # the checkpoint's text weights differ from the folder's: they must win
        tm = src.cond_stage_model.encoder.transformer
        getattr(tm, "text_model", tm).final_layer_norm.weight.add_(0.5)
    state = official_layout(src)
    # the SD v1 names (transformers 4.x: CLIPTextModel.text_model.*), and a buffer older files carry
    state = {
        k.replace("cond_stage_model.transformer.", "cond_stage_model.transformer.text_model.")
        if ".text_model." not in k
        else k: v
        for k, v in state.items()
    }
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"state_dict": state}, tmp_path / "sd.ckpt")
    cfg = yaml_for(
        {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}, unet={**UNET_PRESETS["tiny"], "context_dim": 32}
    )
    with pytest.raises(ValueError, match="pass clip_path"):
        load_ldm(tmp_path / "sd.ckpt", config=cfg)
    loaded = load_ldm(tmp_path / "sd.ckpt", config=cfg, clip_path=clip_dir)
    prompts = {"caption": ["a photo of a bag", ""]}
    torch.testing.assert_close(loaded.conditions(prompts)["c_crossattn"], src.conditions(prompts)["c_crossattn"])
    assert isinstance(loaded.cond_stage_model, TextConditioner) and loaded.model.conditioning_key == "crossattn"


def test_schedule_mismatch_is_refused(tmp_path):
    src = build(ClassConditioner(11, null_class=False), 16)
    state = official_layout(src)
    state["alphas_cumprod"] = state["alphas_cumprod"] * 0.9
    torch.save({"state_dict": state}, tmp_path / "m.ckpt")
    cfg = yaml_for(
        {"target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {"embed_dim": 16, "n_classes": 11}},
        unet={**UNET_PRESETS["tiny"], "context_dim": 16},
    )
    with pytest.raises(ValueError, match="alphas_cumprod buffer differs"):
        load_ldm(tmp_path / "m.ckpt", config=cfg)


def test_semantic_synthesis_checkpoint(tmp_path):
    torch.manual_seed(0)
    unet_kw = {**UNET_PRESETS["tiny"], "in_channels": 7, "context_dim": None, "use_spatial_transformer": False}
    src = LatentDiffusion(
        unet_from_preset("tiny", **{k: v for k, v in unet_kw.items() if k != "image_size"}),
        KLCodec(build_autoencoder("tiny")),
        SemanticConditioner(n_stages=2, in_channels=5, out_channels=3),
        image_size=32,
        schedule={"linear_start": 0.00085, "linear_end": 0.012},
        scale_factor=0.18215,
    )
    randomize_parameters(src, seed=4, std=0.02)
    torch.save({"state_dict": official_layout(src.eval())}, tmp_path / "sem.ckpt")
    cfg = yaml_for(
        {
            "target": "ldm.modules.encoders.modules.SpatialRescaler",
            "params": {"n_stages": 2, "in_channels": 5, "out_channels": 3},
        },
        unet=unet_kw,
        conditioning_key="concat",
    )
    cfg["model"]["params"]["cond_stage_key"] = "segmentation"
    loaded = load_ldm(tmp_path / "sem.ckpt", config=cfg)
    assert isinstance(loaded.cond_stage_model, SemanticConditioner) and loaded.model.conditioning_key == "concat"
    torch.testing.assert_close(
        loaded.cond_stage_model.channel_mapper.weight, src.cond_stage_model.channel_mapper.weight
    )
    seg = torch.randint(0, 5, (2, 32, 32))
    batch = {"image": torch.zeros(2, 3, 32, 32), "segmentation": seg}
    x, t = torch.rand(2, 4, 8, 8), torch.tensor([5, 500])
    torch.testing.assert_close(
        loaded.denoise(x, t, **loaded.conditions(batch)), src.denoise(x, t, **src.conditions(batch))
    )
