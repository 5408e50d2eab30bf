import json

import pytest
import torch
import torch.nn.functional as F

from gencore import io
from gencore.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST
from gencore.metrics import (
    MissingWeightsError,
    class_accuracy,
    clip_score,
    fid_fmnist,
    fmnist_features,
    fmnist_report,
    frechet_distance,
    inception_fid,
    kid_fmnist,
    load_feature_net,
    lpips_metric,
    precision_recall,
    precision_recall_fmnist,
)
from gencore.metrics.fmnist_net import CARD_PATH, WEIGHTS_PATH, FMNISTFeatureNet
from gencore.metrics.train_features import test_accuracy as measure_accuracy

needs_fmnist = pytest.mark.skipif(
    not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (make data)",
)


@pytest.fixture(scope="module")
def train_images():
    images, labels = FashionMNIST(split="train", limit=1000).tensors()
    return images, labels


def test_shipped_weights_are_small_and_documented():
    assert WEIGHTS_PATH.stat().st_size < 4 * 2**20
    card = json.loads(CARD_PATH.read_text())
    assert card["test_accuracy"] >= 0.92 and "gencore-train-fmnist-features" in card["command"]
    net = load_feature_net()
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    assert net.num_features == card["config"]["feature_dim"]


@needs_fmnist
def test_feature_net_reaches_92_percent_on_the_real_test_set():
    acc = measure_accuracy(load_feature_net().net)
    assert acc >= 0.92
    assert acc == pytest.approx(json.loads(CARD_PATH.read_text())["test_accuracy"], abs=1e-3)


def test_feature_net_input_handling():
    net = FMNISTFeatureNet(width=4, feature_dim=8).eval()
    x28 = torch.rand(2, 1, 28, 28) * 2 - 1
    x32 = F.pad(x28, (2, 2, 2, 2), value=-1.0)
    torch.testing.assert_close(net.features(x32), net.features(x28))  # 32 = 28 padded by 2: exact
    torch.testing.assert_close(net.features(x28.expand(-1, 3, -1, -1)), net.features(x28))  # RGB of a gray image
    assert net(torch.rand(2, 1, 64, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"\(B, 1\|3, H, W\)"):
        net(torch.rand(2, 2, 28, 28))


def test_frechet_distance_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([9.0, 1.0]))
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    expected = (1 + 4) + ((1 - 3) ** 2 + (2 - 1) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    a = torch.randn(5, 5, dtype=torch.float64)
    s = a @ a.T + torch.eye(5, dtype=torch.float64)
    assert frechet_distance(mu1.new_zeros(5), s, mu1.new_zeros(5), s) == pytest.approx(0.0, abs=1e-8)


@needs_fmnist
def test_fid_fmnist_orders_real_blurred_and_noise(train_images):
    images, _ = train_images
    real = fid_fmnist(images)
    blurred = fid_fmnist(F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False))
    noise = fid_fmnist(torch.rand(1000, 1, 28, 28) * 2 - 1)
    assert real < 3.0 < blurred < noise and noise > 30
    # torchmetrics' result equals the closed form on the same features
    from gencore.metrics.generative import _reference_features

    fake, ref = fmnist_features(images), _reference_features("test", None)  # the cached 10,000 test features
    closed = frechet_distance(fake.mean(0), torch.cov(fake.T), ref.mean(0), torch.cov(ref.T))
    assert real == pytest.approx(closed, rel=1e-3)
    with pytest.raises(ValueError, match=r"\(N, 1\|3, H, W\)"):
        fid_fmnist(torch.rand(10, 28, 28))


@needs_fmnist
def test_kid_and_precision_recall_on_real_and_bad_samples(train_images):
    images, _ = train_images
    kid_real, _ = kid_fmnist(images[:300], subsets=10, subset_size=200)
    kid_noise, _ = kid_fmnist(torch.rand(300, 1, 28, 28) * 2 - 1, subsets=10, subset_size=200)
    assert abs(kid_real) < 0.01 < kid_noise
    p, r = precision_recall_fmnist(images[:500])
    assert p > 0.6 and r > 0.6
    # one class only: precise (every sample looks real) but poor recall (most of the data is missed)
    boots = FashionMNIST(split="train", classes=[9], limit=500).tensors()[0]
    p1, r1 = precision_recall_fmnist(boots)
    assert p1 > 0.6 and r1 < 0.3


def test_precision_recall_closed_forms():
    torch.manual_seed(0)
    real = torch.randn(300, 4)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    half = real[real[:, 0] > 0].clone()  # one half-space of the data: all precise, the other half missed
    p, r = precision_recall(real, half)
    missed = real[:, 0] < -1.0  # real points far from every sample
    assert p == 1.0 and r < 1.0 - 0.5 * missed.float().mean().item()
    with pytest.raises(ValueError, match="need more than k=3"):
        precision_recall(real[:3], real[:3])


@needs_fmnist
def test_class_accuracy_and_report(train_images):
    images, labels = train_images
    assert class_accuracy(images, labels) > 0.9
    assert class_accuracy(images, (labels + 1) % 10) < 0.05
    with pytest.raises(ValueError, match="labels must be"):
        class_accuracy(images, labels[:10])
    report = fmnist_report(images[:200], labels[:200])
    assert set(report) == {"n", "fid", "kid", "kid_std", "precision", "recall", "class_accuracy"}
    assert report["n"] == 200 and report["class_accuracy"] > 0.9
    with pytest.raises(ValueError, match="unknown metrics"):
        fmnist_report(images, metrics=["is"])


def test_pretrained_wrappers_say_which_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth"):
        inception_fid()
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        lpips_metric("vgg")
    with pytest.raises(MissingWeightsError, match="my/vgg.pth does not exist"):
        lpips_metric("vgg", weights_path="my/vgg.pth")
    with pytest.raises(MissingWeightsError, match="config.json does not exist"):
        clip_score(tmp_path / "clip")
    with pytest.raises(ValueError, match="net_type must be one of"):
        lpips_metric("resnet")


def test_lpips_uses_local_backbone_weights_and_refuses_unsafe_files(tmp_path):
    from torchvision.models import squeezenet1_1

    weights = tmp_path / "squeeze.pth"
    torch.save(squeezenet1_1(weights=None).state_dict(), weights)
    metric = lpips_metric("squeeze", weights_path=weights, normalize=False)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert metric(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert metric(x, torch.flip(x, dims=[-1])).item() > 0
    import os

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    bad = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Evil()}, bad)
    with pytest.raises(io.UnsafeCheckpointError):
        lpips_metric("squeeze", weights_path=bad)


@pytest.mark.slow
def test_inception_fid_with_local_weights(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    # build the torch-fidelity Inception skeleton without its download, and save random weights in its format
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    skeleton = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    monkeypatch.undo()
    path = tmp_path / "inception.pth"
    torch.save(skeleton.state_dict(), path)
    fid = inception_fid(weights_path=path, feature=64)
    real = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert torch.isfinite(fid.compute())


def test_clip_score_runs_a_local_model(tmp_path):
    from gencore.testing import tiny_clip

    tiny_clip(tmp_path)
    metric = clip_score(tmp_path)
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    texts = ["a photo of a sneaker", "a photo of a bag"]
    score = metric(images, texts)
    assert torch.isfinite(score) and 0 <= score.item() <= 100
    # the formula: 100 * max(cos(image embedding, text embedding), 0), from the model's own projections
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(tmp_path), CLIPProcessor.from_pretrained(tmp_path)
    inputs = proc(text=texts, images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    torch.testing.assert_close(metric.scores(images, texts), 100 * cos.clamp_min(0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        metric(images, texts[:1])


@needs_fmnist
def test_classify_fmnist_names_what_images_look_like(train_images):
    from gencore.metrics import classify_fmnist

    images, labels = train_images
    preds = classify_fmnist(images[:300], batch_size=128)  # batches that do not divide the count
    assert preds.shape == (300,) and preds.dtype == torch.long
    assert (preds == labels[:300]).double().mean() > 0.9


@needs_fmnist
def test_reference_features_are_cached_on_disk_and_rebuilt_when_bad(tmp_path, monkeypatch):
    """FID's 10,000 reference features are computed once per machine ($GENLAB_CACHE); a corrupt or stale cache file
    is recomputed, and the numbers are the same either way."""
    from gencore.metrics import generative

    monkeypatch.setenv("GENLAB_CACHE", str(tmp_path / "cache"))
    assert generative.cache_dir() == tmp_path / "cache"
    generative._reference_features.cache_clear()
    fresh = generative._reference_features("test", None)
    files = list((tmp_path / "cache").glob("fmnist_reference_test_*.safetensors"))
    assert len(files) == 1 and fresh.shape == (10_000, 128) and fresh.dtype == torch.float64
    generative._reference_features.cache_clear()
    assert torch.equal(generative._reference_features("test", None), fresh)  # read back from the file
    files[0].write_bytes(b"not a safetensors file")
    generative._reference_features.cache_clear()
    assert torch.equal(generative._reference_features("test", None), fresh)  # recomputed, rewritten
    assert files[0].stat().st_size > 1_000_000
    generative._reference_features.cache_clear()
