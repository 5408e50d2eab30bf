"""The paper's probing study (Sec. 4.4): do the transformer's hidden layers encode the source's depth, although the
geometry-free model never received depth?

For each layer l (0 = the input embeddings, then every block's output), a linear probe reads the hidden state at
each source-view cell's position of the sequence and predicts that cell's normalised disparity (the mean of
``(1/z) / max(1/z)`` over the cell's pixels: the true depth where the data has it, else the model's own scaled
estimate). The probe is ridge regression in closed form, fitted on ``num_train`` pairs and scored (R², the share of
the disparity variance it explains) on ``num_test`` other pairs. The same probe on an untrained transformer of the same
shape (:func:`depth_probe` ``control``) is the baseline: what the inputs and random features give by themselves.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cell_disparity", "depth_probe", "fit_ridge", "probe_features", "r2_score"]


def cell_disparity(batch: dict[str, Any], module: Any) -> Tensor:
    """(B, h·w) mean normalised disparity per token cell of the view the prefix's grid holds (``module.probe_view``:
    the source; for expl_img the target, into which the source was warped): the true depth when the batch has it,
    else (source only) the model's own scaled estimate."""
    view = getattr(module, "probe_view", "src")
    if f"{view}_depth" in batch:
        disp = 1.0 / batch[f"{view}_depth"].float().clamp(min=1e-6)
        disp = disp / disp.flatten(1).amax(1)[:, None, None]
    elif view == "src":
        disp = module.conditioning(batch, check=True)["disparity"]
    else:
        raise ValueError(f"the depth probe of this model needs the batch's {view}_depth (the data's true depth)")
    return F.adaptive_avg_pool2d(disp[:, None], module.grid).flatten(1)


@torch.no_grad()
def probe_features(module: Any, dataset: Any, indices: list[int], batch_size: int) -> tuple[list[Tensor], Tensor]:
    """Per layer (N·h·w, n_embd) hidden states at the source cells' positions, and the (N·h·w,) targets."""
    from geofree.tasks import pairs

    sl = module.source_positions()
    feats: list[list[Tensor]] = []
    targets = []
    for start in range(0, len(indices), batch_size):
        batch = pairs(dataset, indices[start : start + batch_size], module.device)
        states = module.hidden_states(batch)
        if not feats:
            feats = [[] for _ in states]
        for layer, s in enumerate(states):
            feats[layer].append(s[:, sl].reshape(-1, s.shape[-1]).float().cpu())
        targets.append(cell_disparity(batch, module).reshape(-1).float().cpu())
    return [torch.cat(f) for f in feats], torch.cat(targets)


def fit_ridge(x: Tensor, y: Tensor, ridge: float = 1e-3) -> Tensor:
    """Ridge regression with an intercept, closed form on standardised features: weights (d + 1,) (last: bias)."""
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = torch.cat(((x - mu) / sd, torch.ones(len(x), 1)), dim=1).double()
    reg = ridge * len(x) * torch.eye(z.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0  # the intercept is not shrunk
    w = torch.linalg.solve(z.T @ z + reg, z.T @ y.double())
    return torch.cat((w[:-1] / sd.double(), (w[-1] - (w[:-1] * mu.double() / sd.double()).sum())[None])).float()


def _predict(w: Tensor, x: Tensor) -> Tensor:
    return x @ w[:-1] + w[-1]


def r2_score(pred: Tensor, y: Tensor) -> float:
    """1 - SS_res / SS_tot (1: perfect; 0: no better than the mean)."""
    return float(1.0 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp(min=1e-12))


def depth_probe(
    module: Any,
    dataset: Any,
    *,
    num_train: int = 400,
    num_test: int = 100,
    batch_size: int = 50,
    ridge: float = 1e-3,
    control: bool = True,
) -> dict[str, float]:
    """R² of the linear depth probe per layer (``layer<l>``) on held-out pairs, and on an untrained transformer of the
    same shape (``control/layer<l>``)."""
    if num_train < 2 or num_test < 1 or num_train + num_test > len(dataset):
        raise ValueError(
            f"the probe needs num_train >= 2 and num_test >= 1 pairs, together at most the data's {len(dataset)}, "
            f"got {num_train} + {num_test}"
        )
    train_idx = list(range(num_train))
    test_idx = list(range(num_train, num_train + num_test))
    models = {"": module}
    if control:
        untrained = copy.deepcopy(module)
        torch.manual_seed(0)
        untrained.transformer.apply(untrained.transformer._init_weights)  # minGPT's init (pos_emb keeps its values)
        torch.nn.init.zeros_(untrained.transformer.pos_emb)
        for name in ("transformer", "emb_stage_model", "merge_conv"):
            for sub in getattr(untrained, name).modules() if hasattr(untrained, name) else ():
                if isinstance(sub, torch.nn.Conv2d) or (name != "transformer" and isinstance(sub, torch.nn.Linear)):
                    sub.reset_parameters()
        models["control/"] = untrained
    out: dict[str, float] = {}
    for prefix, m in models.items():
        xs, y = probe_features(m, dataset, train_idx, batch_size)
        xt, yt = probe_features(m, dataset, test_idx, batch_size)
        for layer, (x_tr, x_te) in enumerate(zip(xs, xt)):
            w = fit_ridge(x_tr, y, ridge)
            out[f"{prefix}layer{layer}"] = r2_score(_predict(w, x_te), yt)
    return out
