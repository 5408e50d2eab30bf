"""shapebias: the features the dimension estimate needs for every stage, from one pass that stops after the deepest
requested stage, vs the official procedure, which builds the network with one ``stage`` argument per run
(``dim_estimation/models/resnet.py``: the forward returns the pooled feature of that stage) and reruns the whole
dataset once per stage; same weights, same process, identical features (checked below).

Rows:

- ``ResNet50 at 224 px`` (random weights), 16 pairs (32 images): stages 1..5. Ours: batches of 32 through
  :class:`shapebias.encoders.FeatureExtractor`; official: batches of 4 (``config.py``'s default ``batch_size``) per
  stage, five passes;
- ``ResNet50 at 513 px``, the paper's resolution, 4 pairs (8 images), stages 1..5;
- ``toy SmallResNet at 64 px`` (the package's toy network), 256 pairs, stages 1..5.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python bench/bench_shapebias_dims.py`` (a CPU run takes about two minutes).
"""

from __future__ import annotations

import torch
import torchvision
from _harness import append_results, count_flops, matmul_rate, row, timeit

from shapebias.encoders import extractor_for
from shapebias.models.cnn import small_resnet

STAGES = ("1", "2", "3", "4", "5")


def official_stage_forward(model: torch.nn.Module, x: torch.Tensor, stage: str) -> torch.Tensor:
    """The official modified ResNet forward for one ``stage``: conv1 .. the stage's block, global average pool."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for k, layer in enumerate((model.layer1, model.layer2, model.layer3, model.layer4), start=2):
        if stage == str(k - 1):
            break
        x = layer(x)
    return torch.flatten(model.avgpool(x), 1)


def bench(name: str, model: torch.nn.Module, images: torch.Tensor, batch: int, ref_batch: int, rate: float):
    model.eval()
    fx = extractor_for(model)
    out: dict[str, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def ours() -> None:
        parts = [fx(images[i : i + batch], stages=STAGES) for i in range(0, len(images), batch)]
        out["ours"] = {s: torch.cat([p[s] for p in parts]) for s in STAGES}

    @torch.no_grad()
    def official() -> None:
        feats = {}
        for s in STAGES:  # one run of the script per stage
            feats[s] = torch.cat(
                [official_stage_forward(model, images[i : i + ref_batch], s) for i in range(0, len(images), ref_batch)]
            )
        out["ref"] = feats

    flops = count_flops(ours)
    flops_ref = count_flops(official)
    t_ours, t_ref = timeit(ours, warmup=1, runs=3), timeit(official, warmup=1, runs=3)
    diff = max((out["ours"][s] - out["ref"][s]).abs().max().item() for s in STAGES)
    n = len(images)
    r = row(
        f"{name}: pooled features of stages 1-5 for {n // 2} pairs ({n} images): one pass in batches of {batch} vs "
        f"the official one run per stage in batches of {ref_batch}",
        t_ours,
        t_ref,
        flops,
        rate,
    )
    note = (
        f"{name}: {n / t_ours['median']:.1f} vs {n / t_ref['median']:.1f} images/s "
        f"({t_ref['median'] / t_ours['median']:.2f}x); GFLOP {flops / 1e9:.2f} vs {flops_ref / 1e9:.2f}; max "
        f"|difference| {diff:.1e}"
    )
    return r, note


def main() -> None:
    torch.manual_seed(0)
    rate = matmul_rate()
    rows, notes = [], []
    resnet50 = torchvision.models.resnet50(weights=None)
    for name, size, n in (("ResNet50 at 224 px", 224, 32), ("ResNet50 at 513 px", 513, 8)):
        r, note = bench(name, resnet50, torch.rand(n, 3, size, size) * 2 - 1, 32, 4, rate)
        rows.append(r)
        notes.append(note)
    r, note = bench("toy SmallResNet at 64 px", small_resnet("toy"), torch.rand(512, 3, 64, 64) * 2 - 1, 128, 4, rate)
    rows.append(r)
    notes.append(note)
    note = "; ".join(notes) + f". fp32 matmul rate measured in this run: {rate / 1e9:.0f} GFLOP/s."
    append_results("shapebias: per-stage features for the dimension estimate", rows, note=note)


if __name__ == "__main__":
    main()
