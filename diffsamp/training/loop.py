"""The shared training loop: AdamW + EMA + gradient clipping + bf16 autocast on GPU, resumable checkpoints.

Every trainer in diffsamp (DDPM, rectified flow, reflow, distillation) is a model plus a loss
``loss_fn(model, batch, generator) -> scalar tensor`` plus a batch source; this module runs the rest.

Checkpoints (``<run_dir>/checkpoint.safetensors``) are one safetensors file written atomically (a temporary
file, then ``os.replace``), so a kill at any moment leaves either the old or the new checkpoint, never half
of one. It holds, as tensors, the model, the EMA model, the optimizer's state and every random state
(torch CPU, CUDA, the loss's noise generator, the data-order generator and its current permutation,
numpy's Mersenne Twister); and, as JSON in the file's metadata, the step, the training config, the
optimizer's hyper-parameters, Python's ``random`` state and the data position. No pickled code.

``resume=True`` restores all of it, so the resumed run computes bit for bit what the uninterrupted run
would have (on the same device and software). Ctrl-C or SIGTERM stop the loop at the next step boundary
and write a checkpoint first, so an interruption loses at most the step in flight; a hard kill (SIGKILL,
power loss) loses the work since the last periodic checkpoint (``ckpt_every``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffsamp import dist
from diffsamp.io import write_text
from diffsamp.training.checkpoint import (
    CHECKPOINT,
    BatchSource,
    load_checkpoint_into,
    save_checkpoint,
)

LOG = "log.jsonl"

LossFn = Callable[[nn.Module, Tensor, torch.Generator], Tensor]


@dataclass
class TrainConfig:
    """Hyper-parameters of the loop itself (what is trained, and on what, belongs to the caller)."""

    steps: int = 10_000
    lr: float = 2e-4
    warmup_steps: int = 500
    decay_steps: int = 0  # linear decay to 0 over the last K steps (0: constant after warm-up)
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ckpt_every: int = 1000
    sample_every: int = 0
    log_every: int = 50
    seed: int = 0
    max_minutes: float | None = None
    mixed_precision: str = "auto"  # "auto": bf16 autocast on CUDA, none on CPU; "bf16"; "no"
    # learning-rate multipliers by parameter-name prefix, e.g. {"class_embedding.": 50.0} for a new, zero-initialised
    # embedding in a warm-started network (the rest already trained); {}: one group, every parameter at ``lr``
    lr_scales: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # the caller's own settings, stored with checkpoints

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


@dataclass
class TrainResult:
    """How a call of ``train_loop`` ended."""

    step: int
    finished: bool  # reached config.steps (False: stopped by time budget or a signal)
    last_loss: float | None
    seconds: float
    interrupted: bool = False


class EMA:
    """Exponential moving average of a model's parameters (buffers are copied).

    decay_t = min(decay, (1 + t) / (10 + t)): the average is not dominated by the random initialisation
    early in training. ``shadow`` is a full copy of the model, ready to evaluate or save.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        ema_p = [p for p in self.shadow.parameters()]
        src_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.shadow.buffers(), model.buffers()):
            b_ema.copy_(b)


def set_seed(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up, stable, decay: linear warm-up over ``warmup_steps``, constant, then (``decay_steps`` > 0)
    linear decay to zero over the last ``decay_steps`` of ``steps``.

    A function of the step alone, so a resumed run (even one given a larger ``--steps``) follows it exactly.
    """
    scale = 1.0
    if cfg.warmup_steps > 0:
        scale = min(scale, (step + 1) / cfg.warmup_steps)
    if cfg.decay_steps > 0:
        scale = min(scale, max(0.0, (cfg.steps - step) / cfg.decay_steps))
    return cfg.lr * scale


# ----------------------------------------------------------------------------------------------- loop
def param_groups(model: nn.Module, lr_scales: dict[str, float]) -> list[dict[str, Any]] | Any:
    """The optimizer's parameter groups: every parameter at the base rate, except those whose name starts with a
    prefix of ``lr_scales`` (``lr_scale`` times it). No scales: ``model.parameters()`` as is."""
    if not lr_scales:
        return model.parameters()
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        scale = next((v for k, v in lr_scales.items() if name.startswith(k)), 1.0)
        groups.setdefault(scale, []).append(p)
    unused = [k for k in lr_scales if not any(n.startswith(k) for n, _ in model.named_parameters())]
    if unused:
        raise ValueError(f"lr_scales: no parameter is named {unused[0]!r}…")
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def _on_device(batch: Tensor | tuple[Tensor, ...], device: torch.device) -> Tensor | tuple[Tensor, ...]:
    """A batch (a tensor, or a tuple such as images and labels) on ``device``."""
    if isinstance(batch, tuple):
        return tuple(_on_device(b, device) for b in batch)  # type: ignore[return-value]
    return batch if batch.device == device else batch.to(device, non_blocking=True)


class _StopFlag:
    """First Ctrl-C / SIGTERM asks the loop to stop at the next step boundary; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not in the main thread: signals stay with their default handlers
            self._old.clear()
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _autocast(device: torch.device, mode: str):
    if mode not in ("auto", "bf16", "no"):
        raise ValueError(f"mixed_precision must be 'auto', 'bf16' or 'no', got {mode!r}")
    use = (mode == "bf16") or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


def train_loop(
    model: nn.Module,
    loss_fn: LossFn,
    batches: BatchSource,
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    sample_fn: Callable[[nn.Module, int, Path], None] | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> tuple[TrainResult, EMA]:
    """Train ``model`` in place on ``batches`` until ``config.steps`` (or the time budget, or a signal).

    ``sample_fn(ema_model, step, run_dir)`` is called every ``config.sample_every`` steps and at the end.
    ``stop_after`` stops (with a checkpoint) after that many steps of this call, as an interruption would:
    the tests use it to simulate a killed run. Returns the result and the EMA (``ema.shadow`` is the model
    to ship).
    """
    with training_run(run_dir, resume=resume) as run:
        return _run_loop(
            model, loss_fn, batches, config, run, torch.device(device),
            sample_fn=sample_fn, progress=progress, stop_after=stop_after,
        )


@dataclass
class TrainingRun:
    """One training run's directory, as ``training_run`` hands it to a trainer: where its checkpoint goes, whether
    it resumes one, the stop request a signal leaves (``stop.requested``), and its ``log.jsonl``."""

    run_dir: Path
    checkpoint: Path
    resuming: bool
    stop: "_StopFlag"

    def log(self, record: dict) -> None:
        """Append one record to ``log.jsonl`` (rank 0)."""
        _log_line(self.run_dir, record)


@contextmanager
def training_run(run_dir: str | os.PathLike, *, resume: bool) -> Iterator[TrainingRun]:
    """What every trainer's run shares (the DDPM/flow loop and the learned-solver trainer alike): the run directory,
    created and locked for the run's whole life (two trainings never share one); the resume decision (a checkpoint
    without ``resume`` is an error, ``resume`` without one starts afresh and says so); Ctrl-C / SIGTERM turned into
    a stop request the trainer honours at its next step boundary, after writing a checkpoint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    lock = _lock_run_dir(run_dir) if dist.is_main() else None  # one process owns the run directory
    try:
        if ckpt_path.is_file() and not resume:
            raise FileExistsError(f"{ckpt_path} exists: pass --resume (resume=True) to continue it, or use a new --out")
        if resume and not ckpt_path.is_file() and dist.is_main():
            print(f"no checkpoint in {run_dir}: starting from scratch", file=sys.stderr)
        with _StopFlag() as stop:
            yield TrainingRun(run_dir, ckpt_path, resume and ckpt_path.is_file(), stop)
    finally:
        if lock is not None:
            lock.close()


def _lock_run_dir(run_dir: Path):
    """An exclusive lock on ``run_dir/lock`` for the whole run: two trainings can never share a run
    directory (their checkpoints would overwrite each other). The OS drops it when the process dies."""
    f = open(run_dir / "lock", "a+")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, no protection
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RuntimeError(f"{run_dir} is in use by another training process; use another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _run_loop(
    model: nn.Module,
    loss_fn: LossFn,
    batches: BatchSource,
    config: TrainConfig,
    run: TrainingRun,
    device: torch.device,
    *,
    sample_fn: Callable[[nn.Module, int, Path], None] | None,
    progress: bool,
    stop_after: int | None,
) -> tuple[TrainResult, EMA]:
    set_seed(config.seed)
    model.to(device).train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ema = EMA(model, config.ema_decay)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(model, config.lr_scales),
        lr=lr_at(0, config),
        betas=tuple(config.adam_betas),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        fused=fused or None,
    )
    loss_gen = torch.Generator(device=device).manual_seed(config.seed + 1)

    run_dir, ckpt_path = run.run_dir, run.checkpoint
    step = 0
    elapsed_before = 0.0
    if run.resuming:
        state = load_checkpoint_into(
            ckpt_path, model=model, ema=ema.shadow, optimizer=optimizer, loss_gen=loss_gen, batches=batches
        )
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_seconds", 0.0))
        run.log({"event": "resume", "step": step, "processes": dist.world_size()})
    if step == 0 and dist.is_main():
        write_text(run_dir / "train_config.json", json.dumps(config.to_json(), indent=2))
    forward = _sharded_forward(model, device)  # the model itself in one process; under torchrun DDP on a share

    def checkpoint() -> None:
        if not dist.is_main():  # every rank holds the same state; rank 0 writes it (atomically)
            return
        save_checkpoint(
            ckpt_path,
            step=step,
            model=model,
            ema=ema.shadow,
            optimizer=optimizer,
            loss_gen=loss_gen,
            batches=batches,
            config=config.to_json(),
            elapsed=elapsed_before + (time.perf_counter() - t_start),
        )

    bar = None
    if progress and dist.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=step, dynamic_ncols=True, desc="train", smoothing=0.05)
    t_start = time.perf_counter()
    deadline = t_start + 60.0 * config.max_minutes if config.max_minutes else math.inf
    window_loss = torch.zeros((), device=device)
    window_n = 0
    window_t = time.perf_counter()
    window_imgs = 0
    last_loss: float | None = None
    steps_this_call = 0
    stop_reason: str | None = None
    stop = run.stop
    while step < config.steps:
        batch = _on_device(batches.next(), device)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, config) * g.get("lr_scale", 1.0)
        with _autocast(device, config.mixed_precision):
            loss = loss_fn(forward, batch, loss_gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip and config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(model, step)
        step += 1
        steps_this_call += 1
        window_loss += loss.detach().float()
        window_n += 1
        window_imgs += (batch[0] if isinstance(batch, tuple) else batch).shape[0]

        if step % config.log_every == 0 or step == config.steps:
            last_loss = float(window_loss) / window_n
            now = time.perf_counter()
            ips = window_imgs / max(now - window_t, 1e-9)
            _log_line(run_dir, {
                "step": step, "loss": last_loss, "lr": lr_at(step - 1, config), "img_per_s": round(ips, 1),
                "elapsed_s": round(elapsed_before + now - t_start, 2),
            })
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.0f}", refresh=False)
            elif dist.is_main():
                print(f"step {step}: loss {last_loss:.4f}, {ips:.0f} img/s, "
                      f"{elapsed_before + now - t_start:.0f} s", flush=True)
            window_loss.zero_()
            window_n, window_imgs, window_t = 0, 0, now
        if bar is not None:
            bar.update(1)
        if (config.sample_every and step % config.sample_every == 0 and sample_fn is not None
                and step < config.steps and dist.is_main()):
            _safe_sample(sample_fn, ema.shadow, step, run_dir)
        if stop.requested:
            stop_reason = stop.requested
        elif stop_after is not None and steps_this_call >= stop_after:
            stop_reason = "stop_after"
        elif time.perf_counter() >= deadline:
            stop_reason = "time budget"
        stop_reason = agreed_stop(stop_reason)
        if stop_reason or (config.ckpt_every and step % config.ckpt_every == 0) or step == config.steps:
            checkpoint()
        if stop_reason:
            break
    if bar is not None:
        bar.close()
    if window_n:
        last_loss = float(window_loss) / window_n
    seconds = time.perf_counter() - t_start
    finished = step >= config.steps
    if stop_reason and dist.is_main():
        print(f"stopped at step {step} ({stop_reason}); checkpoint written to {ckpt_path}", file=sys.stderr)
        _log_line(run_dir, {"event": "stop", "step": step, "reason": stop_reason})
    if (finished or stop_reason == "time budget") and sample_fn is not None and dist.is_main():
        _safe_sample(sample_fn, ema.shadow, step, run_dir)
    result = TrainResult(
        step=step,
        finished=finished,
        last_loss=last_loss,
        seconds=elapsed_before + seconds,
        interrupted=stop_reason in ("SIGINT", "SIGTERM"),
    )
    return result, ema


_STOP_REASONS = ("SIGINT", "SIGTERM", "stop_after", "time budget")


def agreed_stop(reason: str | None) -> str | None:
    """Under torchrun every rank stops at the same step: the first reason (in ``_STOP_REASONS`` order) any rank
    has, so a signal or a time budget seen by one rank is honoured by all. ``reason`` itself in one process."""
    if dist.world_size() == 1:
        return reason
    flags = torch.zeros(len(_STOP_REASONS), dtype=torch.float64)
    if reason is not None:
        flags[_STOP_REASONS.index(reason)] = 1
    seen = dist.all_reduce_sum(flags)
    return next((r for r, f in zip(_STOP_REASONS, seen.tolist()) if f > 0), None)


class _ShardedForward(nn.Module):
    """The network under DistributedDataParallel, each rank evaluating its contiguous share of the global batch.

    ``forward`` takes the whole global batch (every rank draws the same batch, times and noise from the same
    generators, so the loss is the one-process loss), runs the DDP network on this rank's rows and all-gathers
    the outputs. Every rank then computes the same loss; the backward keeps this rank's rows of its gradient,
    scaled by the world size, and DDP's mean over ranks makes the one-process gradient of the global batch.
    """

    def __init__(self, ddp: nn.Module, world: int, rank: int) -> None:
        super().__init__()
        self.ddp, self.world, self.rank = ddp, world, rank

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0]
        b = x.shape[0]
        if b % self.world:
            raise ValueError(f"the global batch of {b} does not split over {self.world} processes; "
                             f"use a --batch-size divisible by {self.world}")
        lo, hi = self.rank * b // self.world, (self.rank + 1) * b // self.world

        def part(v: Any) -> Any:
            return v[lo:hi] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == b else v

        out = self.ddp(*[part(a) for a in args], **{k: part(v) for k, v in kwargs.items()})
        if isinstance(out, Tensor):
            return _GatherRows.apply(out, self.world)
        return type(out)(sample=_GatherRows.apply(out.sample, self.world))  # diffusers' UNet2DOutput and kin


class _GatherRows(torch.autograd.Function):
    """All-gather of equal row blocks; backward: this rank's block of the (rank-identical) gradient × world."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, world: int) -> Tensor:  # type: ignore[override]
        ctx.world, ctx.rows = world, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        r = dist.rank()
        return grad[r * ctx.rows : (r + 1) * ctx.rows] * ctx.world, None


def _sharded_forward(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in one process; under torchrun a ``_ShardedForward`` around ``DistributedDataParallel(model)``."""
    if dist.world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else dist.local_rank()] if device.type == "cuda" else None
    return _ShardedForward(DistributedDataParallel(model, device_ids=ids), dist.world_size(), dist.rank())


def _safe_sample(sample_fn: Callable[[nn.Module, int, Path], None], model: nn.Module, step: int, run_dir: Path) -> None:
    """Sample grids are a convenience: a failure there is reported, never fatal to the training run."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            sample_fn(model, step, run_dir)
    except Exception as exc:  # noqa: BLE001 - deliberately broad, see docstring
        print(f"warning: sample grid at step {step} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        model.train(was_training)


def _log_line(run_dir: Path, record: dict) -> None:
    if not dist.is_main():
        return
    with open(run_dir / LOG, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    """The run's ``log.jsonl`` records (step, loss, lr, img_per_s, elapsed_s; and resume/stop events)."""
    p = Path(run_dir) / LOG
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
