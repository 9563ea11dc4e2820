"""Reflow pairs: (noise, sample) couplings produced by integrating a model's ODE, stored in shards.

Layout of a pairs directory::

    PAIRS_DIR/meta.json                  shape, count, shard size, seed, the model and the sampler used
    PAIRS_DIR/shard-00000.safetensors    tensors noise (n, *shape), sample (n, *shape), index (n,)
    PAIRS_DIR/shard-00001.safetensors    ...

``noise`` is the model-independent draw z of the source distribution: for generative models z ~ N(0, I),
drawn for pair i with ``torch.Generator().manual_seed(seed + i)`` (so pair i does not depend on the shard
or batch size), and the ODE starts from x̄ = prior_scale(prior, σ_0)·z. A rectified flow trained on the pairs
therefore maps z → sample whatever model produced them (a flow, or a DDPM through its probability-flow ODE).
Toy sources (``diffsamp.data.toys``) are drawn per shard from ``manual_seed(seed + first index)``.

Each shard is written to a temporary name and renamed (``os.replace``), so a crash never leaves a
half-written file under a shard's name; its metadata carries a SHA-256 of its tensors, so a damaged file
is detected on reading. ``generate_pairs`` on an existing directory checks the settings match and skips
the shards already there: an interrupted run resumes without redoing them.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffsamp import dist
from diffsamp.io import read_json, save_safetensors, write_json
from diffsamp.api import integrate, make_grid
from diffsamp.data import BatchSampler
from diffsamp.data.toys import draw_noise
from diffsamp.models.base import Denoiser
from diffsamp.samplers import get_sampler

FORMAT = "diffsamp-reflow-pairs"
FORMAT_VERSION = 1
META = "meta.json"


class PairsError(ValueError):
    """A pairs directory that cannot be used: missing, corrupt, incomplete, or made with other settings."""


def shard_name(i: int) -> str:
    """The file name of shard ``i``."""
    return f"shard-{i:05d}.safetensors"


def _digest(noise: Tensor, sample: Tensor, index: Tensor) -> str:
    h = hashlib.sha256()
    for t in (noise, sample, index):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def write_shard(path: Path, noise: Tensor, sample: Tensor, index: Tensor, shard: int) -> None:
    """Write one shard atomically (temporary name, fsync, rename)."""
    noise, sample, index = noise.float().cpu().contiguous(), sample.float().cpu().contiguous(), index.long().cpu()
    meta = {"format": FORMAT, "shard": str(shard), "count": str(noise.shape[0]),
            "sha256": _digest(noise, sample, index)}
    save_safetensors({"noise": noise, "sample": sample, "index": index}, path, meta)


def read_shard(path: Path, shape: Sequence[int] | None = None, count: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(noise, sample, index) of a shard, verified against its checksum; ``PairsError`` if damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PairsError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); delete it and run "
                         "`diffsamp reflow pairs` again with the same options to regenerate it") from None
    if meta.get("format") != FORMAT or not {"noise", "sample", "index"} <= set(t):
        raise PairsError(f"{path} is not a reflow-pairs shard")
    noise, sample, index = t["noise"], t["sample"], t["index"]
    if _digest(noise, sample, index) != meta.get("sha256"):
        raise PairsError(f"{path} is corrupt (checksum mismatch); delete it and run `diffsamp reflow pairs` again "
                         "with the same options to regenerate it")
    if shape is not None and tuple(noise.shape[1:]) != tuple(shape):
        raise PairsError(f"{path} holds pairs of shape {tuple(noise.shape[1:])}, expected {tuple(shape)}")
    if count is not None and noise.shape[0] != count:
        raise PairsError(f"{path} holds {noise.shape[0]} pairs, expected {count}")
    return noise, sample, index


@dataclass(frozen=True)
class PairsPlan:
    """How ``num`` pairs split into shards of ``shard_size``."""

    shape: tuple[int, ...]
    num: int
    shard_size: int
    seed: int

    @property
    def num_shards(self) -> int:
        return -(-self.num // self.shard_size)

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min((i + 1) * self.shard_size, self.num)


def read_meta(pairs_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a pairs directory; ``PairsError`` if there is none or it is not one."""
    p = Path(pairs_dir) / META
    if not p.is_file():
        raise PairsError(f"{pairs_dir} is not a pairs directory (no {META}); make one with `diffsamp reflow pairs`")
    return read_json(p, fmt=FORMAT, what="a reflow-pairs description", error=PairsError)


_MATCH_KEYS = ("shape", "num", "shard_size", "seed", "model", "source", "sampler", "schedule", "steps", "knobs")


def integrate_on_schedule(
    model: Denoiser,
    z: Tensor,
    *,
    sampler: str,
    schedule: str,
    steps: int,
    knobs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, int]:
    """``integrate`` on ``make_grid``'s grid: run ``sampler`` from the source draws ``z`` on ``steps`` of
    ``schedule`` (adaptive samplers get the schedule's end points): (samples on CPU, NFE)."""
    grid = make_grid(model, sampler, schedule=schedule, steps=steps, knobs=knobs)
    return integrate(model, z, sampler=sampler, grid=grid, device=device, dtype=dtype, knobs=knobs)


def generate_pairs(
    model: Denoiser,
    out: str | os.PathLike,
    *,
    num: int,
    shape: Sequence[int],
    sampler: str = "euler",
    schedule: str = "rf",
    steps: int = 100,
    knobs: dict[str, Any] | None = None,
    model_name: str = "",
    rectification: int | None = None,
    dataset: str | None = None,
    source: str = "normal",
    shard_size: int = 5000,
    batch_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_minutes: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Integrate ``model`` from ``num`` fixed source draws and store (noise, sample) pairs in ``out``.

    ``rectification``: k of the model when it is a k-rectified flow (0 for a diffusion model's ODE); a flow
    trained on the pairs is then the (k+1)-rectified flow. Resumes: shards already complete in ``out`` are kept (a damaged one is regenerated, with a warning).
    Returns the meta dict, with ``complete`` and ``done`` (pairs on disk). ``max_minutes`` stops after the
    shard in flight once the time is up (the directory then resumes later). Under torchrun the missing shards are
    dealt round-robin over the ranks (pair i depends only on seed + i, so the files are those one process writes).
    """
    spec = get_sampler(sampler)
    if spec.kind != "ode":
        raise ValueError(f"reflow pairs need a deterministic ODE sampler; {sampler!r} is {spec.kind!r}. "
                         "Use e.g. euler, heun, dpmpp2m or rk45")
    if num < 1 or shard_size < 1 or batch_size < 1 or steps < 1:
        raise ValueError("num, shard_size, batch_size and steps must be positive")
    shape = tuple(int(s) for s in shape)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = PairsPlan(shape, int(num), int(shard_size), int(seed))
    meta: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "shape": list(shape), "num": plan.num,
        "shard_size": plan.shard_size, "seed": plan.seed, "model": model_name, "source": source,
        "prior": model.prior, "rectification": rectification, "dataset": dataset, "sampler": sampler, "schedule": schedule, "steps": int(steps),
        "knobs": dict(knobs or {}),
        "noise": ("z ~ N(0, I), pair i drawn with torch.Generator().manual_seed(seed + i); the ODE starts from "
                  "prior_scale(prior, sigma_0) * z" if source == "normal" else f"toy source {source!r}"),
    }
    meta_path = out / META
    if meta_path.is_file():
        old = read_meta(out)
        diff = [f"{k}: {old.get(k)!r} on disk vs {meta[k]!r} now" for k in _MATCH_KEYS if old.get(k) != meta[k]]
        if diff:
            raise PairsError(f"{out} already holds pairs made with other settings ({'; '.join(diff)}); "
                             "use a new --out or the same options to resume")
        meta = {**old, **{k: meta[k] for k in _MATCH_KEYS}, "dataset": old.get("dataset") or dataset}
    elif dist.is_main():
        write_json(meta_path, meta)

    todo: list[int] = []
    done = 0
    for i in range(plan.num_shards):
        lo, hi = plan.bounds(i)
        path = out / shard_name(i)
        if path.is_file():
            try:
                read_shard(path, shape, hi - lo)
                done += hi - lo
                continue
            except PairsError as exc:
                if dist.is_main():
                    print(f"warning: {exc}; regenerating it", file=sys.stderr)
        todo.append(i)
    dist.barrier()  # every rank has scanned the folder (and sees meta.json) before any rank writes a shard
    todo = dist.shard(todo)  # under torchrun: the missing shards dealt round-robin, each written by its rank

    already = done
    bar = None
    if progress and dist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.num, initial=done, unit="pair", desc="reflow pairs", dynamic_ncols=True)
    start = time.perf_counter()
    deadline = start + 60 * max_minutes if max_minutes else float("inf")
    nfe = meta.get("nfe")
    for i in todo:
        if time.perf_counter() >= deadline:
            if dist.is_main():
                print("time budget reached: the shards in flight are on disk; run again to resume", file=sys.stderr)
            break
        lo, hi = plan.bounds(i)
        z = draw_noise(source, shape, lo, hi, plan.seed)
        samples = []
        for b in range(0, hi - lo, batch_size):
            x, calls = integrate_on_schedule(model, z[b : b + batch_size], sampler=sampler, schedule=schedule,
                                             steps=steps, knobs=knobs, device=device)
            samples.append(x)
            nfe = max(int(nfe or 0), calls)
            if bar is not None:
                bar.update(x.shape[0])
        write_shard(out / shard_name(i), z, torch.cat(samples), torch.arange(lo, hi), i)
        done += hi - lo
    if bar is not None:
        bar.close()
    if dist.world_size() > 1:  # every shard is on disk once all ranks are here
        ranks = dist.gather_objects((done, nfe))
        done = sum(d for d, _ in ranks) - (dist.world_size() - 1) * already
        nfe = max((n for _, n in ranks if n is not None), default=None)
    if nfe is not None and meta.get("nfe") != nfe and dist.is_main():
        meta["nfe"] = nfe
        write_json(meta_path, {k: v for k, v in meta.items() if k not in ("complete", "done")})
    return {**meta, "done": done, "complete": done == plan.num, "seconds": time.perf_counter() - start}


@dataclass
class PairSet:
    """All pairs of a directory in memory: ``noise`` and ``sample`` of shape (N, *shape)."""

    noise: Tensor
    sample: Tensor
    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.noise.shape[1:])

    def __len__(self) -> int:
        return self.noise.shape[0]


def load_pairs(pairs_dir: str | os.PathLike, *, allow_partial: bool = False) -> PairSet:
    """Read and verify every shard of ``pairs_dir``. Incomplete directories are refused unless
    ``allow_partial`` (then the complete shards are used)."""
    pairs_dir = Path(pairs_dir)
    meta = read_meta(pairs_dir)
    shape = tuple(meta["shape"])
    plan = PairsPlan(shape, int(meta["num"]), int(meta["shard_size"]), int(meta["seed"]))
    noises, samples, missing = [], [], []
    for i in range(plan.num_shards):
        lo, hi = plan.bounds(i)
        path = pairs_dir / shard_name(i)
        if not path.is_file():
            missing.append(i)
            continue
        z, x, idx = read_shard(path, shape, hi - lo)
        if not torch.equal(idx, torch.arange(lo, hi)):
            raise PairsError(f"{path} holds pairs {int(idx[0])}…{int(idx[-1])}, expected {lo}…{hi - 1}")
        noises.append(z)
        samples.append(x)
    if missing and not allow_partial:
        raise PairsError(f"{pairs_dir} is incomplete: {len(missing)} of {plan.num_shards} shards missing "
                         f"(first: {shard_name(missing[0])}); finish it with `diffsamp reflow pairs` (same options) "
                         "or pass --allow-partial")
    if not noises:
        raise PairsError(f"{pairs_dir} holds no complete shard yet")
    return PairSet(torch.cat(noises), torch.cat(samples), meta)


def pair_batches(pairs: PairSet, batch_size: int, *, seed: int = 0, device: str | torch.device = "cpu") -> BatchSampler:
    """Endless shuffled batches of a ``PairSet`` as (B, 2, *shape): [:, 0] = sample (t = 0), [:, 1] = noise (t = 1)."""
    return BatchSampler(torch.stack([pairs.sample, pairs.noise], dim=1), batch_size, seed=seed, device=device)
