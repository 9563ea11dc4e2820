"""FID and KID of images: in memory, in a folder, or a reference data set (with a statistics cache).

Pipeline, identical for every source: images are quantized to uint8 (as saving them to PNG would),
resized to 299×299 with TensorFlow 1's bilinear resize, grayscale is repeated to 3 channels, and the
2048-d pool3 features of Inception-v3 "2015-12-05" are accumulated into a float64 mean and covariance
(``diffsamp.metrics``). FID is the Fréchet distance between the two Gaussians (Heusel et al. 2017);
KID is the unbiased polynomial-kernel MMD² over subsets (Bińkowski et al. 2018), which needs the
features themselves.

Both sides of a comparison must be preprocessed alike. Each statistics object records its image size
and padding; ``fid_from_stats`` refuses to compare statistics whose recorded preprocessing differs.
MNIST-like references are compared at 32×32, the 28×28 digits padded with 2 background pixels per side,
as the models are trained.

    >>> ref = reference_stats("mnist", "test", num=2000)                  # cached after the first call
    >>> fid = compute_fid(samples_in_minus1_1, ref, padding=2)             # no PNG round trip
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffsamp import dist
from diffsamp.data import load_dataset_uint8, pad_images, to_uint8
from diffsamp.images import iter_image_folder, scan_image_folder
from diffsamp.metrics.distances import frechet_distance, kernel_inception_distance
from diffsamp.metrics.inception import FeatureExtractor, WeightsNotFoundError, cache_dir, load_extractor
from diffsamp.metrics.stats import (
    FIDStats,
    StreamingMoments,
    load_stats,
    make_meta,
    preprocessing_mismatches,
    save_stats,
)

__all__ = [
    "FIDStats",
    "IncompatibleStatsError",
    "WeightsNotFoundError",
    "compute_fid",
    "compute_stats",
    "fid_from_stats",
    "folder_stats",
    "frechet_distance",
    "kernel_inception_distance",
    "kid_from_stats",
    "load_extractor",
    "load_stats",
    "reference_stats",
    "save_stats",
]

Images = Union[Tensor, Iterable[Tensor]]
DEFAULT_BATCH_SIZE = 50
FEATURES_UP_TO = 10_000  # keep raw features (for KID) in saved/cached statistics up to this many images
_CACHE_VERSION = "1"


class IncompatibleStatsError(ValueError):
    """The two statistics were computed with different preprocessing (size, padding, extractor…)."""


def _batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    chunks = [images] if isinstance(images, Tensor) else images
    for chunk in chunks:
        if not isinstance(chunk, Tensor) or chunk.ndim != 4:
            shape = tuple(chunk.shape) if isinstance(chunk, Tensor) else type(chunk).__name__
            raise ValueError(f"expected (N, C, H, W) image tensors, got {shape}")
        for i in range(0, chunk.shape[0], batch_size):
            yield chunk[i : i + batch_size]


def _quantize(batch: Tensor) -> Tensor:
    if batch.dtype == torch.uint8:
        return batch
    if batch.is_floating_point():
        return to_uint8(batch)  # float images are in the models' [-1, 1] data space
    raise TypeError(f"expected uint8 images or float images in [-1, 1], got {batch.dtype}")


def compute_stats(
    images: Images,
    *,
    extractor: FeatureExtractor | None = None,
    inception: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    keep_features: bool = False,
    padding: int | None = None,
    source: str = "in-memory",
    total: int | None = None,
    progress: bool = True,
    shard_block: int = 0,
) -> FIDStats:
    """Feature statistics (μ, Σ; Heusel et al. 2017) of images given as one tensor or an iterable of batches.

    Images are uint8 (N, C, H, W) or float in [-1, 1] (quantized first), C ∈ {1, 3}, all one size.
    Features are taken ``batch_size`` at a time and streamed into float64 moments, so an iterable of
    batches (e.g. straight from a sampler) is never held in memory; ``keep_features`` also returns
    them (float32, needed for KID). ``padding`` (background pixels added on each side) is recorded
    for the compatibility check; None means unknown. ``shard_block`` k > 0: under torchrun the images are this
    rank's ``diffsamp.dist.shard(…, block=k)`` of the set, and the statistics (and features, in the set's order)
    are those of the whole set on every rank; ``total`` then counts the whole set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    extractor = extractor or load_extractor(inception, device)
    if total is None and isinstance(images, Tensor):
        total = images.shape[0]
    moments, kept = StreamingMoments(), []
    shape: tuple[int, int, int] | None = None
    sharded = shard_block > 0 and dist.world_size() > 1
    if sharded and total is not None:
        total = len(dist.shard_indices(total, shard_block))  # this rank's bar counts its own share
    with tqdm(total=total, unit="img", desc="FID features", disable=not (progress and dist.is_main()),
              leave=False) as bar:
        for batch in _batches(images, batch_size):
            if shape is None:
                shape = tuple(batch.shape[1:])
            elif tuple(batch.shape[2:]) != shape[1:]:
                raise ValueError(f"image size changed from {shape[1:]} to {tuple(batch.shape[2:])} between batches")
            feats = extractor(_quantize(batch))
            moments.update(feats)
            if keep_features:
                kept.append(feats.cpu().numpy())
            bar.update(batch.shape[0])
    if sharded:
        moments = moments.merged_over_ranks()
        shapes = {s for s in dist.gather_objects(shape) if s is not None}
        if len(shapes) > 1:
            raise ValueError(f"the ranks' images differ in shape: {sorted(shapes)}")
        shape = next(iter(shapes), None)
    if moments.n < 2:
        raise ValueError(f"FID needs at least 2 images, got {moments.n}")
    if sharded and keep_features:
        rows = torch.from_numpy(np.concatenate(kept)) if kept else torch.zeros(0, len(moments.mean))
        kept = [dist.gather_shards(rows.float(), moments.n, shard_block).numpy()]
    assert shape is not None
    meta = make_meta(
        extractor=extractor.name, resize=extractor.resize, num_images=moments.n, size=shape[1:],
        channels=shape[0], padding=padding, source=source,
    )
    features = np.concatenate(kept) if keep_features else None
    return FIDStats(moments.mean, moments.cov, meta, features)


def ensure_compatible(a: FIDStats, b: FIDStats) -> None:
    """Raise ``IncompatibleStatsError`` when ``a`` and ``b`` record different preprocessing."""
    diffs = preprocessing_mismatches(a.meta, b.meta)
    if diffs:
        raise IncompatibleStatsError(
            "the two sides were preprocessed differently, so their FID is not meaningful: " + "; ".join(diffs)
            + ". Compute both at the same size and padding (e.g. MNIST references padded to 32×32 for models"
            " trained on padded digits)."
        )


def fid_from_stats(a: FIDStats, b: FIDStats, *, check: bool = True) -> float:
    """FID between two statistics (Heusel et al. 2017); ``check`` refuses mismatched preprocessing."""
    if check:
        ensure_compatible(a, b)
    for side, s in (("first", a), ("second", b)):
        if s.num_images is not None and s.num_images < 2:
            raise ValueError(f"the {side} statistics come from {s.num_images} image(s); FID needs at least 2")
    counts = [s.num_images for s in (a, b) if s.num_images is not None]
    if counts and min(counts) < a.dims:
        warnings.warn(
            f"FID from {min(counts)} images with {a.dims}-dimensional features: the covariance is singular and "
            f"the estimate is biased upward; use at least {a.dims} images per side (published FIDs use 10k–50k) "
            "and compare FIDs only at the same N", UserWarning, stacklevel=2)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def kid_from_stats(
    a: FIDStats, b: FIDStats, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0, check: bool = True
) -> tuple[float, float]:
    """KID mean and std (Bińkowski et al. 2018) between two statistics that both carry their features."""
    if a.features is None or b.features is None:
        raise ValueError("KID needs the features of both sides (images, or stats saved with their features)")
    if check:
        ensure_compatible(a, b)
    return kernel_inception_distance(a.features, b.features, num_subsets=num_subsets, subset_size=subset_size, seed=seed)


def compute_fid(
    images: Images,
    ref: FIDStats | str | os.PathLike,
    *,
    padding: int | None = None,
    check: bool = True,
    **kwargs,
) -> float:
    """FID of in-memory images (uint8, or float in [-1, 1]) against reference statistics or a stats file.

    ``kwargs`` go to ``compute_stats`` (extractor/inception, device, batch_size, total, progress).
    """
    ref_stats = ref if isinstance(ref, FIDStats) else load_stats(ref)
    stats = compute_stats(images, padding=padding, **kwargs)
    return fid_from_stats(stats, ref_stats, check=check)


def folder_stats(
    folder: str | os.PathLike,
    *,
    limit: int | None = None,
    padding: int | None = None,
    keep_features: bool = False,
    **kwargs,
) -> FIDStats:
    """Statistics of the images in ``folder`` (the first ``limit`` by name); every header is checked first.
    Under torchrun each rank reads its batches of files and the statistics are merged (``compute_stats``)."""
    files, _ = scan_image_folder(folder, limit)  # fails fast on a bad folder, before the slow network
    batch = kwargs.get("batch_size", DEFAULT_BATCH_SIZE)
    return compute_stats(
        iter_image_folder(folder, batch_size=batch, limit=limit, select=dist.shard_indices(len(files), batch)),
        total=len(files), padding=padding, keep_features=keep_features, source=str(folder), shard_block=batch,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------
# Reference data sets, cached


def _padding_of(before: tuple[int, int], after: tuple[int, int]) -> int | list[int]:
    (h, w), (ph, pw) = before, after
    top, left = (ph - h) // 2, (pw - w) // 2
    pads = [top, ph - h - top, left, pw - w - left]
    return top if len(set(pads)) == 1 else pads


def _cache_tag(extractor: FeatureExtractor) -> str:
    return hashlib.sha1(f"{_CACHE_VERSION}|{extractor.name}|{extractor.resize}|uint8".encode()).hexdigest()[:8]


def _load_cached(path: Path) -> FIDStats | None:
    """A cached statistics file, or None (with a warning, the file removed) when it is unreadable."""
    try:
        return load_stats(path)
    except ValueError as exc:
        warnings.warn(f"cached reference statistics {path} are unreadable ({exc}); computing them again",
                      UserWarning, stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def _from_cached_superset(folder: Path, stem: str, tag: str, n: int) -> FIDStats | None:
    """Statistics of the first ``n`` images, from a cached file of more images that kept its features."""
    best: tuple[int, Path] | None = None
    for p in folder.glob(f"{stem}-n*-{tag}.npz"):
        m = re.fullmatch(rf"{re.escape(stem)}-n(\d+)-{tag}\.npz", p.name)
        if m and int(m.group(1)) >= n and (best is None or int(m.group(1)) < best[0]):
            best = (int(m.group(1)), p)
    if best is None:
        return None
    stats = _load_cached(best[1])
    if stats is None or stats.features is None or len(stats.features) < n:
        return None
    moments = StreamingMoments()
    moments.update(stats.features[:n])
    meta = {**stats.meta, "num_images": n, "source": re.sub(r"\[:\d+\]$", f"[:{n}]", stats.meta.get("source", ""))}
    return FIDStats(moments.mean, moments.cov, meta, stats.features[:n].copy())


def reference_stats(
    dataset: str,
    split: str = "train",
    *,
    num: int | None = None,
    data_dir: str | os.PathLike | None = None,
    pad_to: int | None = 32,
    cache: bool = True,
    keep_features: bool | None = None,
    extractor: FeatureExtractor | None = None,
    inception: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> FIDStats:
    """Statistics of the first ``num`` images of a data set split (``diffsamp.data``), padded to ``pad_to``.

    Cached under ``cache_dir()/fid-stats`` keyed by data set, split, N, padding and feature pipeline, so
    each is computed once; a cached larger N that kept its features serves any smaller N (the first N
    images are the same). Features are kept when N ≤ 10 000 unless ``keep_features`` says otherwise.
    """
    if num is not None and num < 2:
        raise ValueError(f"num must be at least 2, got {num}")
    if Path(dataset).expanduser().is_dir():
        raise ValueError(f"{dataset} is a folder: use folder_stats for folders of images")
    x = load_dataset_uint8(dataset, split, data_dir, pad_to=None, limit=num)
    before = tuple(x.shape[-2:])
    if pad_to is not None:
        x = pad_images(x, pad_to)
    padding = _padding_of(before, tuple(x.shape[-2:]))
    n = x.shape[0]
    keep = n <= FEATURES_UP_TO if keep_features is None else keep_features
    name = re.sub(r"[^a-z0-9]+", "-", dataset.strip().lower()).strip("-")
    source = f"{name}:{split}[:{n}]"

    folder = cache_dir() / "fid-stats"
    extractor = extractor or load_extractor(inception, device)
    tag = _cache_tag(extractor)
    stem = f"{name}-{split}-pad{pad_to if pad_to is not None else 'none'}"
    path = folder / f"{stem}-n{n}-{tag}.npz"
    if cache:
        found = _load_cached(path) if path.is_file() else None
        if found is None:
            found = _from_cached_superset(folder, stem, tag, n)
        usable = found is not None and (found.features is not None or not keep)
        if all(dist.gather_objects(usable)):  # under torchrun the ranks take the same branch (or all recompute)
            return found
    stats = compute_stats(  # under torchrun each rank takes its batches of images, the statistics are merged
        x[dist.shard_indices(n, batch_size)], extractor=extractor, batch_size=batch_size, keep_features=keep,
        padding=padding, source=source, progress=progress, total=n, shard_block=batch_size,
    )
    if cache and dist.is_main():
        save_stats(stats, path)
    dist.barrier()  # the file is complete before any rank looks for it again
    return stats
