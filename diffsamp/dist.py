"""Many processes under ``torchrun`` (``torch.distributed``): ranks, seed shards, float64 reductions, gathers.

Launched as ``torchrun --nproc_per_node N -m diffsamp …`` (gloo on CPU, NCCL on GPUs; multi-node through torchrun's
rendezvous), the command line calls ``init()`` once; without torchrun the world has one rank and every function
here is the identity, so the same code runs unchanged. Work is split by *seed*: rank r takes ``items[r::W]``
(``shard``), and because image i depends only on seed i (CONTRIBUTING.md) the union of the shards is what one
process computes. ``gather_shards`` puts per-item results back in the original order.

    >>> from diffsamp import dist
    >>> mine = dist.shard(seeds)            # this rank's seeds
    >>> everything = dist.gather_shards(my_results, len(seeds))
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import Tensor

T = TypeVar("T")

__all__ = [
    "RankFailedError",
    "all_reduce_sum",
    "barrier",
    "gather_objects",
    "gather_shards",
    "init",
    "is_main",
    "local_rank",
    "rank",
    "shard",
    "shutdown",
    "world_size",
]

# A peer that died leaves a collective waiting; gloo notices a closed socket at once, this bounds the rest.
TIMEOUT = datetime.timedelta(minutes=float(os.environ.get("DIFFSAMP_DIST_TIMEOUT_MIN", "30")))


class RankFailedError(RuntimeError):
    """Another process of the job failed or was killed while this one waited for it."""


def launched() -> bool:
    """True under ``torchrun`` (or any launcher that sets ``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group when launched by torchrun (idempotent; nothing to do in a single process).
    The backend is gloo for CPU tensors and NCCL for CUDA ones (``cpu:gloo,cuda:nccl`` where CUDA exists)."""
    if not launched() or tdist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    tdist.init_process_group(backend=backend, timeout=TIMEOUT)


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return tdist.get_world_size() if tdist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    return tdist.get_rank() if tdist.is_initialized() else 0


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0")) if tdist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the one that prints, shows progress and writes shared files."""
    return rank() == 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every W-th one from position ``rank`` (balanced to within one item)."""
    return list(items[rank() :: world_size()])


def _guard(what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (RuntimeError, OSError) as exc:  # gloo/NCCL report a dead peer as a RuntimeError (DistBackendError)
        first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise RankFailedError(f"rank {rank()}: another process of this job stopped during {what} ({first}); "
                              "rerun with --resume / --skip-existing to finish the work") from exc


def barrier() -> None:
    """Wait until every rank is here."""
    if world_size() > 1:
        _guard("a barrier", tdist.barrier)


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks (a new tensor on ``t``'s device; float64 stays float64)."""
    if world_size() == 1:
        return t.clone()
    out = t.detach().clone()
    _guard("a sum over ranks", tdist.all_reduce, out)  # gloo for CPU tensors, NCCL for CUDA ones
    return out


def gather_objects(obj: T) -> list[T]:
    """``obj`` from every rank, in rank order (picklable objects; CPU tensors travel as they are)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    _guard("a gather", tdist.all_gather_object, out, obj)
    return out


def gather_shards(mine: Sequence[T] | Tensor, total: int) -> list[T] | Tensor:
    """Undo ``shard``: each rank's per-item results (a list, or a tensor whose rows are the items) → all ``total``
    items in their original order, on every rank."""
    parts = gather_objects(mine.cpu() if isinstance(mine, Tensor) else list(mine))
    if len(parts) == 1:
        return parts[0]
    w = len(parts)
    if isinstance(mine, Tensor):
        out = mine.new_empty((total, *mine.shape[1:]), device="cpu")
        for r, p in enumerate(parts):
            out[r::w] = p
        return out
    merged: list[Any] = [None] * total
    for r, p in enumerate(parts):
        merged[r::w] = p
    return merged
