"""Many processes under ``torchrun`` (``torch.distributed``): ranks, seed shards, float64 reductions, gathers.

Launched as ``torchrun --nproc_per_node N -m diffsamp …`` (gloo on CPU, NCCL on GPUs; multi-node through torchrun's
rendezvous), the command line calls ``init()`` once; without torchrun the world has one rank and every function
here is the identity, so the same code runs unchanged. Work is split by *seed*, in whole batches: rank r takes
batches r, r + W, … (``shard``), and because image i depends only on seed i (CONTRIBUTING.md) and each batch is
the one a single process would run, the union of the shards is bit for bit what one process computes.
``gather_shards`` puts per-item results back in the original order.

    >>> from diffsamp import dist
    >>> mine = dist.shard(seeds, block=batch_size)            # this rank's seeds
    >>> everything = dist.gather_shards(my_results, len(seeds), block=batch_size)
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
    "average_gradients",
    "barrier",
    "gather_objects",
    "gather_shards",
    "init",
    "is_main",
    "local_rank",
    "rank",
    "shard",
    "shard_indices",
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
    if torch.cuda.is_available():  # each rank's current CUDA device is its own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    tdist.init_process_group(backend=backend, timeout=TIMEOUT)


def shutdown() -> None:
    """Leave the process group (at the end of a command; the command group has waited for every rank first)."""
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


def shard_indices(total: int, block: int = 1, of_rank: int | None = None, world: int | None = None) -> list[int]:
    """The positions 0…total−1 a rank takes: blocks of ``block`` consecutive positions dealt round-robin, block k
    to rank k mod W. With ``block`` = the batch size every batch holds the items it holds in one process, so
    batch-size-dependent float32 kernels give bit-identical results."""
    if block < 1:
        raise ValueError(f"block must be positive, got {block}")
    r = rank() if of_rank is None else of_rank
    step = (world_size() if world is None else world) * block
    return [i for k in range(r * block, total, step) for i in range(k, min(k + block, total))]


def shard(items: Sequence[T], block: int = 1) -> list[T]:
    """This rank's share of ``items`` (``shard_indices``); all of them in a single process."""
    return [items[i] for i in shard_indices(len(items), block)]


def _lost_peer(what: str, exc: BaseException) -> RankFailedError:
    first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return RankFailedError(f"rank {rank()}: another process of this job stopped during {what} ({first}); "
                           "rerun with --resume / --skip-existing to finish the work")


def _guard(what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, a collective; a peer lost meanwhile becomes a one-line ``RankFailedError``."""
    try:
        return fn(*args)
    except RuntimeError as exc:  # gloo/NCCL report a dead peer as a DistBackendError (a RuntimeError)
        if isinstance(exc, tdist.DistError) or any(w in str(exc) for w in ("Connection", "closed", "timed out")):
            raise _lost_peer(what, exc) from exc
        raise  # a programming error inside the collective keeps its own message
    except OSError as exc:
        raise _lost_peer(what, exc) from exc


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


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks (a missing gradient counts as zero), as
    DistributedDataParallel does, for small models trained outside it."""
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    mean = all_reduce_sum(flat) / world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = mean[offset : offset + n].view_as(p).clone()
        offset += n


def gather_objects(obj: T) -> list[T]:
    """``obj`` from every rank, in rank order (picklable objects; CPU tensors travel as they are)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    _guard("a gather", tdist.all_gather_object, out, obj)
    return out


def gather_shards(mine: Sequence[T] | Tensor, total: int, block: int = 1) -> list[T] | Tensor:
    """Undo ``shard(…, block)``: each rank's per-item results (a list, or a tensor whose rows are the items) → all
    ``total`` items in their original order, on every rank."""
    parts = gather_objects(mine.cpu() if isinstance(mine, Tensor) else list(mine))
    if len(parts) == 1:
        return parts[0]
    where = [shard_indices(total, block, r) for r in range(len(parts))]
    if isinstance(mine, Tensor):  # a rank without items may hold an empty tensor of any shape
        full = next((p for p, idx in zip(parts, where) if idx), parts[0])
        out = full.new_empty((total, *full.shape[1:]))
        for idx, p in zip(where, parts):
            if idx:
                out[idx] = p
        return out
    merged: list[Any] = [None] * total
    for idx, p in zip(where, parts):
        for i, v in zip(idx, p):
            merged[i] = v
    return merged
