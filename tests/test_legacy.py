"""Exports written before the "one pattern" refactor (tests/fixtures/legacy_v0, made at commit 2545e1d by its
make_fixtures.py) still load with today's code and reproduce, bit for bit up to float tolerance, what that code
sampled / reconstructed for the same seeds: taming (VQGAN, class transformer), ldm (KL autoencoder; class, text and
inpainting diffusion over it), sd3_flow (rectified flow, eps/linear)."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gencore import run

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_v0"
FIRST_STAGE = {"taming_transformer_class": "taming_vqgan", "ldm_class": "ldm_autoencoder"}
FIRST_STAGE |= {"ldm_text": "ldm_autoencoder", "ldm_inpaint": "ldm_autoencoder"}


def load(name: str, tmp_path: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The export (its first stage placeholder pointed at the fixture's first stage), and its reference outputs."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    if name in FIRST_STAGE:
        cfg = folder / "config.yaml"
        cfg.write_text(cfg.read_text().replace("@FIRST_STAGE@", str(FIXTURES / FIRST_STAGE[name])))
    return run.load_module(folder), load_file(str(folder / "reference.safetensors"))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-3)


def test_taming(tmp_path):
    vq, ref = load("taming_vqgan", tmp_path)
    close(vq.reconstruct(ref["inputs"]), ref["reconstructions"])
    tr, ref = load("taming_transformer_class", tmp_path)
    torch.manual_seed(0)
    close(tr.generate(4, labels=ref["labels"].long().tolist(), top_k=16)["images"], ref["images"])


def test_ldm_autoencoder_and_class_model(tmp_path):
    ae, ref = load("ldm_autoencoder", tmp_path)
    close(ae(ref["inputs"], sample_posterior=False)[0], ref["reconstructions"])
    m, ref = load("ldm_class", tmp_path)
    close(m.scale_factor, ref["scale_factor"])
    for sampler in ("ddim", "plms"):
        torch.manual_seed(0)
        out = m.generate(4, labels=[0, 1, 2, 3], sampler=sampler, num_steps=5, guidance_scale=2.0)["images"]
        close(out, ref[f"{sampler}_images"])
    torch.manual_seed(0)
    close(m.generate(2, labels=[4, 5], num_steps=5, eta=1.0)["images"], ref["ddim_eta1_images"])


def test_ldm_text_and_inpainting(tmp_path):
    m, ref = load("ldm_text", tmp_path)
    torch.manual_seed(0)
    out = m.generate(2, captions=["a photo of a bag", "a photo of a sneaker"], num_steps=5, guidance_scale=2.0)
    close(out["images"], ref["images"])
    m, ref = load("ldm_inpaint", tmp_path)
    torch.manual_seed(0)
    close(m.inpaint(ref["inputs"], ref["masks"], num_steps=5), ref["images"])


@pytest.mark.parametrize(("name", "samplers"), [("sd3_rf", ("euler", "heun")), ("sd3_eps", ("ddim",))])
def test_sd3_flow(tmp_path, name, samplers):
    m, ref = load(name, tmp_path)
    close(m.latent_scale, ref["latent_scale"])
    close(m.latent_shift, ref["latent_shift"])
    for sampler in samplers:
        torch.manual_seed(0)
        out = m.generate(4, labels=[0, 1, 2, 3], sampler=sampler, num_steps=5, guidance_scale=2.0)["images"]
        close(out, ref[f"{sampler}_images"])
