"""Every checkpoint shipped inside a package (``packages/*/src/<pkg>/checkpoints/<name>/``) loads through its
``pkg://`` path with nothing else on disk, says how it was made, stays small, and still does its job: a generative
model samples one batch that the Fashion-MNIST classifier reads as the classes asked for (well above the 0.1 of
chance), an autoencoder reconstructs test images, a video editor follows its input clips' layout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gencore import run
from gencore.data.fashion_mnist import DEFAULT_ROOT

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.parent for p in ROOT.glob("packages/*/src/*/checkpoints/*/config.yaml"))
MAX_BYTES = 6 * 2**20
# reconstruction PSNR a first stage must beat on 16 test images (its MADE_BY.md has the 1,000-image figure)
# hole PSNR (dB) the shipped inpainting model must beat the mean-colour fill by on 32 held-out photos
SHIPPED_INPAINT_MARGIN = 1.0
# the union autoencoder's reconstruction PSNR per dataset (16 held-out images; MADE_BY.md: 500-image figures), and the
# share of held-out latents whose likeliest dataset under the cINN is their own (chance: 1/3)
NET2NET_MIN_PSNR = {"fashion_mnist": 20.0, "digits": 26.0, "lfw": 21.0}
NET2NET_MIN_PICKED = 0.7
# the shipped shapebias CNN names the shape of held-out cue-conflict stimuli (chance: 0.1; MADE_BY.md: the
# 1,600-stimulus figure), and its last stage holds more shape than texture dimensions
SHAPEBIAS_MIN_ACCURACY = 0.5
MIN_PSNR = {"vqgan_fmnist": 14.0, "vqgan_scenes": 15.0, "depth_vqgan_scenes": 24.0}  # brief VQGANs: 15.5, 17.0, 27.0 dB

pytestmark = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST missing (make data)"
)


def pkg_path(folder: Path) -> str:
    package = folder.parents[1].name
    return f"pkg://{package}/checkpoints/{folder.name}"


def test_packages_ship_checkpoints():
    names = {pkg_path(f) for f in SHIPPED}
    assert "pkg://ladd_turbo/checkpoints/fmnist_turbo" in names, names
    assert {f.parents[1].name for f in SHIPPED} >= {
        "taming",
        "ldm",
        "sd3_flow",
        "ladd_turbo",
        "gen1_video",
        "imagebart",
        "geofree",
        "twostream_inpaint",
        "net2net",
        "shapebias",
    }


def check_net2net(module) -> None:
    """The autoencoder reconstructs held-out images of every dataset of the union; the cINN's likelihood tells the
    datasets apart (argmax_y p(z | y) well above the 1/3 of chance), its round trip is exact, and it samples."""
    from gencore.metrics import psnr
    from net2net.data import MEMBERS, load_member
    from net2net.models.flow import bits_per_dim

    if not hasattr(module, "flow"):
        for name in MEMBERS:
            x = load_member(name, "val", image_size=32)[0][:16]
            rec = module.log_images({"image": x}, 16)["reconstructions"].clamp(-1, 1)
            assert psnr(rec, x).mean() > NET2NET_MIN_PSNR[name], name
        return
    picked = []
    with torch.no_grad():
        for i, name in enumerate(module.dataset_names):
            z = module.encode(load_member(name, "val", image_size=module.image_size)[0][:16])
            c = module.one_hot([i] * len(z))
            assert (module.flow.reverse(module.flow(z, c)[0], c) - z).abs().max() < 1e-4
            nll = torch.stack([bits_per_dim(*module.flow(z, module.one_hot([j] * len(z)))) for j in range(3)], 1)
            picked.append((nll.argmin(1) == i).float())
        out = module.generate(6, labels=[0, 1, 2, 0, 1, 2])
    assert torch.cat(picked).mean() > NET2NET_MIN_PICKED
    assert out["images"].shape == (6, 1, 32, 32) and torch.isfinite(out["images"]).all()


def check_shapebias(module) -> None:
    """The shape classifier reads held-out cue-conflict stimuli right far above chance, its answers do not follow
    the texture, and the dimension estimate of its last stage finds more shape than texture."""
    from shapebias.dims import collect_pair_features, dim_est
    from shapebias.tasks import decisions, pair_loader

    ds = module.stimuli("test")
    picked = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:160].tolist()
    scores = decisions(module, ds, picked, 80)
    assert scores["accuracy"] > SHAPEBIAS_MIN_ACCURACY and scores["shape_bias"] > 0.8, scores
    loader = pair_loader(ds, num_pairs=160, sampling="uniform", batch_size=80, seed=0)
    feats = collect_pair_features(module.extractor(), loader, ["5"])
    est = dim_est(feats.a["5"], feats.b["5"], feats.factors)
    assert est["shape"] > est["texture"], est
    out = module.generate(4)
    assert out["images"].shape == (4, 3, ds.image_size, ds.image_size) and len(out["captions"]) == 4


@pytest.mark.parametrize("folder", SHIPPED, ids=[pkg_path(f) for f in SHIPPED])
@pytest.mark.filterwarnings("ignore:decord reads wrong frames:RuntimeWarning")  # the Megamind samples: read by OpenCV
def test_shipped_checkpoint_loads_and_works(folder):
    made_by = (folder / "MADE_BY.md").read_text()
    assert "commit" in made_by and "-train" in made_by  # the command and the commit that made it
    assert (folder / "model.safetensors").stat().st_size <= MAX_BYTES
    module_node = OmegaConf.to_yaml(OmegaConf.load(folder / "config.yaml").module)
    assert "runs/" not in module_node and str(ROOT) not in module_node  # no path to a local run
    module = run.load_module(pkg_path(folder))
    torch.manual_seed(0)
    if hasattr(module, "edit"):  # a video editor (gen1_video): edits follow their input's layout
        from gen1_video.metrics import map_correlation, structure_maps

        out = module.generate(4, num_steps=20, generator=torch.Generator().manual_seed(0))
        edited, sources = out["images"], out["sources"]
        assert edited.shape == sources.shape == (4, 1, module.num_frames, 32, 32) and torch.isfinite(edited).all()
        ours, theirs = (
            structure_maps(x.expand(-1, 3, -1, -1, -1), module.structure, size=module.latent_size)
            for x in (edited, sources)
        )
        follows, _ = map_correlation(ours, theirs)
        other, _ = map_correlation(ours, theirs.roll(-1, dims=0))  # the content clips' layout
        assert follows > other + 0.1  # the input's layout, not the content clip's
    elif hasattr(module, "sample_views"):  # view synthesis (geofree): samples, and the source matters
        from torch.utils.data import default_collate

        from geofree.data.synthetic import SyntheticScenes
        from geofree.tasks import token_nll

        ds = SyntheticScenes(32, size=module.image_size, seed=1_000_003)
        batch = default_collate([ds[i] for i in range(32)])
        views = module.sample_views({k: v[:8] for k, v in batch.items()}, generator=torch.Generator().manual_seed(0))
        assert views.shape == batch["dst_img"][:8].shape and torch.isfinite(views).all()
        # the target tokens are likelier given their own source than another pair's (paired, same cameras): the
        # shipped toy has begun to use its conditioning (0.034 +- 0.005 nats per token on these pairs)
        other = {k: v.roll(1, 0) if k.startswith("src_") else v for k, v in batch.items()}
        with torch.no_grad():
            gap = (token_nll(module, batch) - token_nll(module, other)).mean()
        assert gap < -0.015, gap
    elif folder.parents[1].name == "geofree":  # its first stages: reconstructions of the synthetic rooms' frames
        from gencore.metrics import psnr
        from geofree.data.synthetic import SyntheticScenes

        kind = "depth" if module.model.encoder.in_channels == 1 else "frames"
        ds = SyntheticScenes(4, kind=kind, seed=1_000_003)
        x = torch.stack([ds[i]["image"] for i in range(16)])
        rec = module.log_images({"image": x}, 16)["reconstructions"]
        assert psnr(rec.clamp(-1, 1), x).mean() > MIN_PSNR.get(folder.name, 20.0)
    elif folder.parents[1].name == "twostream_inpaint":  # guided inpainting: held-out photos' holes from keyframes
        from torch.utils.data import default_collate

        from twostream_inpaint.data import KeyframeImages
        from twostream_inpaint.lit import hole_psnr

        ds = KeyframeImages(split="val", size=module.image_size, fresh=False, length=32, seed=1)
        b = default_collate([ds[i] for i in range(32)])
        with torch.no_grad():
            pred = module.inpaint(b["image"], b["mask"], b["srcs"], b["srcs_masks"])
        x, m = b["image"], b["mask"]
        assert pred.shape == x.shape and torch.isfinite(pred).all()
        mean = (x * (1 - m)).flatten(2).sum(2) / (1 - m).flatten(2).sum(2)
        ours = hole_psnr(m * pred + (1 - m) * x, x, m).mean()
        flat = hole_psnr(m * mean[..., None, None] + (1 - m) * x, x, m).mean()  # the known pixels' mean colour
        assert ours > flat + SHIPPED_INPAINT_MARGIN, (ours, flat)
    elif folder.parents[1].name == "net2net":  # the union autoencoder, and the cINN over its latents
        check_net2net(module)
    elif folder.parents[1].name == "shapebias":  # a shape classifier: its answers and its dimensions
        check_shapebias(module)
    elif hasattr(module, "generate"):
        from gencore.metrics import class_accuracy

        out = run.generate(module, 20, batch_size=20, labels=list(range(10)))
        assert out["images"].shape == (20, 1, 32, 32) and torch.isfinite(out["images"]).all()
        assert class_accuracy(out["images"], out["labels"]) >= 0.5
    else:
        from gencore.data import FashionMNIST
        from gencore.metrics import psnr

        x = FashionMNIST(split="test", image_size=32, limit=16).tensors()[0]
        rec = module.log_images({"image": x}, 16)["reconstructions"]  # a first stage: its reconstructions
        assert psnr(rec.clamp(-1, 1), x).mean() > MIN_PSNR.get(folder.name, 20.0)


def test_ladd_sample_runs_from_the_shipped_student(tmp_path):
    exe = Path(sys.executable).parent / "ladd-sample"
    proc = subprocess.run(
        [str(exe), "checkpoint=pkg://ladd_turbo/checkpoints/fmnist_turbo", "num_samples=4", f"out_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "grid.png").is_file() and len(list(tmp_path.glob("0000*.png"))) == 4
