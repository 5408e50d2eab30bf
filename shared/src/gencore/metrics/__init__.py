"""Metrics: the in-project Fashion-MNIST feature network (FID-FMNIST, KID, precision/recall, class accuracy) and
torchmetrics FID / LPIPS, and CLIP score, with pretrained weights from local paths."""

from gencore.metrics.fmnist_net import FMNISTClassifierModule, FMNISTFeatureNet, FMNISTPerceptual, load_feature_net
from gencore.metrics.generative import (
    class_accuracy,
    classify_fmnist,
    fid_fmnist,
    fmnist_features,
    fmnist_report,
    frechet_distance,
    kid_fmnist,
    precision_recall,
    precision_recall_fmnist,
    psnr,
)
from gencore.metrics.pretrained import CLIPScorer, MissingWeightsError, clip_score, inception_fid, lpips_metric

__all__ = [
    "CLIPScorer",
    "FMNISTClassifierModule",
    "FMNISTFeatureNet",
    "FMNISTPerceptual",
    "MissingWeightsError",
    "class_accuracy",
    "classify_fmnist",
    "clip_score",
    "fid_fmnist",
    "fmnist_features",
    "fmnist_report",
    "frechet_distance",
    "inception_fid",
    "kid_fmnist",
    "load_feature_net",
    "lpips_metric",
    "precision_recall",
    "precision_recall_fmnist",
    "psnr",
]
