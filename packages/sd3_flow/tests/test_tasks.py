"""sd3_flow.tasks without a model: what an sd3-sample config asks for (prompts, a prompt file, labels, num_samples),
the files written beside the grid, and the configs' names (``num_steps``, not ``steps``)."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gencore.cli import compose
from sd3_flow import tasks
from sd3_flow.cli import CONFIGS


def request(*overrides: str):
    return tasks.sample_request(compose(CONFIGS, "sample", ["checkpoint=/tmp/unused", *overrides]))


def test_sample_request_prompts_labels_and_num_samples(tmp_path):
    n, kw = request()  # the ten Fashion-MNIST classes; the model's own sampler / shift
    assert n == 10 and kw == {"labels": list(range(10)), "num_steps": 28, "guidance_scale": 1.0}
    n, kw = request("labels=[3,1]", "num_per_prompt=3")  # cycled by gencore.run.generate: 3 1 3 1 3 1
    assert n == 6 and kw["labels"] == [3, 1]
    n, kw = request("prompts=[a bag,a coat]", "num_per_prompt=2", "sample.num_steps=4", "sample.sampler=heun")
    assert n == 4 and kw["captions"] == ["a bag", "a bag", "a coat", "a coat"]
    assert kw["num_steps"] == 4 and kw["sampler"] == "heun" and "labels" not in kw
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na photo of a bag\n\na photo of a coat\n")
    n, kw = request(f"prompts_file={prompts}", "prompts=[ignored]")  # the file wins
    assert n == 2 and kw["captions"] == ["a photo of a bag", "a photo of a coat"]
    n, kw = request(f"prompts_file={prompts}", "num_samples=5")  # cycled to 5
    assert n == 5 and kw["captions"] == ["a photo of a bag", "a photo of a coat"]
    n, _ = request("num_samples=3")
    assert n == 3


def test_sample_request_bad_values():
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        request("num_samples=0")
    with pytest.raises(ValueError, match="num_per_prompt must be >= 1"):
        request("num_per_prompt=0")
    with pytest.raises(ValueError, match="labels is empty"):
        request("labels=[]")
    with pytest.raises(ValueError, match="prompts must be a list of strings"):
        request("prompts=a bag")
    old = OmegaConf.create({"checkpoint": "x", "sample": {"steps": 4}})
    with pytest.raises(ValueError, match=r"sample.steps is now sample.num_steps"):
        tasks.sample_request(old)


def test_write_images(tmp_path):
    out = {"images": torch.linspace(-1, 1, 3 * 8 * 8).view(3, 1, 8, 8), "captions": ["a", "b", "c"]}
    tasks.write_images(out, tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert (tmp_path / "w" / "prompts.txt").read_text() == "a\nb\nc\n"
    from PIL import Image

    first = np.asarray(Image.open(tmp_path / "w" / "00000.png"))
    assert first.shape == (8, 8) and first.dtype == np.uint8


def test_configs_use_num_steps():
    assert list(compose(CONFIGS, "eval", ["checkpoint=/tmp/unused"]).num_steps) == [5, 10, 25]
    sample = compose(CONFIGS, "sample", ["checkpoint=/tmp/unused"])
    assert "steps" not in sample.sample and sample.sample.num_steps == 28 and sample.num_samples is None
    with pytest.raises(ValueError, match="steps is now num_steps"):
        tasks.evaluate({"checkpoint": "/nonexistent", "steps": [5], "num_samples": 1})
