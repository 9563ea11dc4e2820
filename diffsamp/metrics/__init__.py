"""Metrics: the FID feature network, feature statistics, Fréchet distance and KID (``inception``, ``resize``,
``stats``, ``distances``), FID/KID of images, folders and data sets (``fid``), scoring a model's samples
against a reference (``scoring``), the straightness of a model's ODE (``straightness``), distances between
toy point clouds (``toy_distances``) and the MNIST classifier that measures class adherence (``classifier``)."""

from diffsamp.metrics.bench import cache_parts, plan_cell, reference_plan, run_cell
from diffsamp.metrics.distances import frechet_distance, kernel_inception_distance
from diffsamp.metrics.inception import (
    FeatureExtractor,
    WeightsNotFoundError,
    cache_dir,
    download_weights,
    find_weights,
    load_extractor,
)
from diffsamp.metrics.resize import resize_tf1_bilinear, tf1_bilinear_matrix
from diffsamp.metrics.scoring import resolve_reference
from diffsamp.metrics.stats import FIDStats, StreamingMoments, load_stats, preprocessing_mismatches, save_stats

__all__ = [
    "FIDStats",
    "FeatureExtractor",
    "StreamingMoments",
    "WeightsNotFoundError",
    "cache_dir",
    "cache_parts",
    "download_weights",
    "find_weights",
    "frechet_distance",
    "kernel_inception_distance",
    "load_extractor",
    "load_stats",
    "plan_cell",
    "preprocessing_mismatches",
    "reference_plan",
    "resize_tf1_bilinear",
    "resolve_reference",
    "run_cell",
    "save_stats",
    "tf1_bilinear_matrix",
]
