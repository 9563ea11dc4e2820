"""Scoring a model's samples in memory: sample → uint8 → Inception features → FID / KID, no PNG round trip.

Samples are generated a batch at a time and streamed straight into the float64 feature moments
(``diffsamp.metrics.fid.compute_stats``), so N = 50 000 never sits in memory. The reference is a statistics
object, a stats ``.npz`` (``diffsamp fid ref``), or a data set split written ``DATASET:SPLIT`` (e.g.
``mnist:test``), whose first N images are taken, padded to the model's image size, with cached statistics.

    >>> q = score_model(load("mnist-ddpm"), reference="mnist:test", num=2000, sampler="heun", steps=18)
    >>> q.fid, q.kid, q.nfe
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffsamp import dist
from diffsamp.api import generate
from diffsamp.metrics.fid import FIDStats, compute_stats, fid_from_stats, kid_from_stats, load_stats, reference_stats
from diffsamp.metrics.inception import FeatureExtractor, load_extractor
from diffsamp.models.base import Denoiser, default_schedule

KID_SUBSET_SIZE = 1000


@dataclass
class SampleQuality:
    """FID (Heusel et al. 2017) and KID ± std (Bińkowski et al. 2018) of ``num`` samples, with their cost."""

    fid: float
    kid: float | None
    kid_std: float | None
    num: int
    nfe: int
    sampling_seconds: float
    feature_seconds: float
    reference: str
    network_passes: int | None = None  # per image: NFE, or twice it under classifier-free guidance


def resolve_reference(
    reference: FIDStats | str | os.PathLike,
    *,
    num: int,
    image_size: int,
    extractor: FeatureExtractor,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> FIDStats:
    """Reference statistics from a stats object, a stats ``.npz`` file, or ``DATASET:SPLIT`` (first ``num``
    images, padded to ``image_size``; computed once and cached)."""
    if isinstance(reference, FIDStats):
        return reference
    text = str(reference)
    path = Path(text).expanduser()
    if path.suffix == ".npz" or path.is_file():
        if not path.is_file():
            raise ValueError(f"reference statistics file {path} does not exist (make one with `diffsamp fid ref`)")
        return load_stats(path)
    dataset, sep, split = text.partition(":")
    if not sep or not dataset or split not in ("train", "test"):
        raise ValueError(
            f"reference {text!r} is neither a stats .npz file nor DATASET:SPLIT such as mnist:test or cifar10:train"
        )
    return reference_stats(dataset, split, num=num, data_dir=data_dir, pad_to=image_size, extractor=extractor,
                           progress=progress)


@dataclass
class DataFloor:
    """The best FID/KID a perfect model could show at this N: the data set's train[:N] against test[:N]."""

    test: FIDStats  # the reference models are scored against
    fid: float
    kid: float
    kid_std: float


def data_floor(
    dataset: str,
    *,
    num: int,
    image_size: int,
    extractor: FeatureExtractor,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> DataFloor:
    """FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) of ``dataset`` train[:num] vs test[:num]
    (both padded to ``image_size``; statistics cached). FID is biased upward at small N, so a model's
    FID is read against this floor at the same N; KID is unbiased."""
    refs = {split: reference_stats(dataset, split, num=num, data_dir=data_dir, pad_to=image_size,
                                   extractor=extractor, progress=progress) for split in ("train", "test")}
    kid_mean, kid_std = kid_from_stats(refs["train"], refs["test"], subset_size=min(KID_SUBSET_SIZE, num))
    return DataFloor(refs["test"], fid_from_stats(refs["train"], refs["test"]), kid_mean, kid_std)


def score_images(
    images: Tensor | Iterable[Tensor],
    ref: FIDStats,
    *,
    extractor: FeatureExtractor,
    kid: bool = True,
    total: int | None = None,
    source: str = "in-memory",
    progress: bool = True,
    shard_block: int = 0,
) -> tuple[float, float | None, float | None]:
    """(FID, KID, KID std) of images in [-1, 1] (one tensor or an iterable of batches) against ``ref``.

    The images are recorded with the reference's padding; KID is None when ``ref`` has no features.
    ``shard_block``: the images are this rank's share under torchrun (``compute_stats``).
    """
    keep = kid and ref.features is not None
    stats = compute_stats(images, extractor=extractor, keep_features=keep, padding=ref.meta.get("padding"),
                          source=source, total=total, progress=progress, shard_block=shard_block)
    fid = fid_from_stats(stats, ref)
    if not keep:
        return fid, None, None
    n = min(KID_SUBSET_SIZE, stats.features.shape[0], ref.features.shape[0])
    kid_mean, kid_std = kid_from_stats(stats, ref, subset_size=n)
    return fid, kid_mean, kid_std


def _sample_batches(
    model: Denoiser, shape: Sequence[int], seeds: Sequence[int], batch_size: int, timer: dict[str, float],
    nfe: list[int], cond: Sequence[Any] | None = None, passes: list[int] | None = None, **generate_kw: Any,
) -> Iterator[Tensor]:
    passes = [] if passes is None else passes
    for b in range(0, len(seeds), batch_size):
        t = time.perf_counter()
        part = None if cond is None else cond[b : b + batch_size]
        res = generate(model, shape, seeds=seeds[b : b + batch_size], batch_size=batch_size, cond=part, **generate_kw)
        timer["sampling"] += time.perf_counter() - t
        nfe.append(res.nfe)
        passes.append(res.network_passes if res.network_passes is not None else res.nfe)
        yield res.images.clamp(-1, 1)


def score_model(
    model: Denoiser,
    reference: FIDStats | str | os.PathLike,
    *,
    num: int = 2000,
    seeds: Sequence[int] | None = None,
    shape: Sequence[int] | None = None,
    sampler: str = "heun",
    schedule: str | None = None,
    steps: int = 18,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    extractor: FeatureExtractor | None = None,
    inception: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    kid: bool = True,
    progress: bool = True,
    cond: Sequence[Any] | None = None,
    **knobs: Any,
) -> SampleQuality:
    """FID/KID of ``num`` samples of ``model`` (seeds 0…num−1, or ``seeds``) against ``reference``.

    The generated side records the reference's padding (a model trained on 28×28 digits padded to 32×32
    is compared with references padded alike). KID needs the reference's features: a ``DATASET:SPLIT``
    reference keeps them; a stats file may not, and then KID is None.
    """
    schedule = schedule or default_schedule(model)
    seeds = list(range(num)) if seeds is None else [int(s) for s in seeds]
    num = len(seeds)
    if num < 2:
        raise ValueError(f"FID needs at least 2 samples, got {num}")
    shape = tuple(shape) if shape is not None else tuple(model.sample_shape)
    extractor = extractor or load_extractor(inception, device)
    ref = resolve_reference(reference, num=num, image_size=shape[-1], extractor=extractor, data_dir=data_dir,
                            progress=progress)
    timer, nfe, passes = {"sampling": 0.0}, [], []
    if cond is not None and len(cond) != num:
        raise ValueError(f"{len(cond)} conditions for {num} seeds: give one condition per seed")
    batch_size = min(batch_size, num)
    mine = dist.shard_indices(num, batch_size)  # under torchrun: this rank's batches of seeds, as one process runs them
    batches = _sample_batches(model, shape, [seeds[i] for i in mine], batch_size, timer, nfe,
                              None if cond is None else [cond[i] for i in mine], passes, sampler=sampler,
                              schedule=schedule, steps=steps, device=device, **knobs)
    t = time.perf_counter()
    fid, kid_mean, kid_std = score_images(batches, ref, extractor=extractor, kid=kid, total=num,
                                          source=f"samples:{sampler}/{schedule}/{steps}", progress=progress,
                                          shard_block=batch_size)
    feature_seconds = time.perf_counter() - t - timer["sampling"]
    return SampleQuality(fid, kid_mean, kid_std, num, max(dist.gather_objects(max(nfe, default=0))),
                         timer["sampling"], feature_seconds, str(ref.meta.get("source", reference)),
                         max(dist.gather_objects(max(passes, default=0))))
