"""Library entry points that the command line calls."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsamp.models.base import CountingDenoiser, Denoiser, default_schedule, prior_scale
from diffsamp.samplers import Grid, get_sampler, get_schedule
from diffsamp.samplers._util import StepInfo


@dataclass(frozen=True)
class GenerateResult:
    """Samples (N, C, H, W) in the model's data space, the measured NFE per image and the wall time."""

    images: Tensor
    seeds: list[int]
    nfe: int
    seconds: float
    grid: Grid


def generate(
    model: Denoiser,
    shape: Sequence[int],
    *,
    sampler: str = "heun",
    schedule: str | None = None,
    steps: int = 18,
    seeds: Sequence[int] = (0,),
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    schedule_params: Mapping[str, Any] | None = None,
    final_zero: bool = True,
    grid: Grid | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    **knobs: Any,
) -> GenerateResult:
    """Draw one image per seed with a registered sampler on a grid from a registered schedule.

    Each seed gets its own CPU ``torch.Generator`` for the initial noise and every injected noise, so
    image i is the same whatever the batch size or device (DESIGN principle 4). The initial state at
    σ_0 follows the model's prior (``prior_scale``). Runs under ``torch.inference_mode()`` and returns
    the NFE measured by a ``CountingDenoiser`` (per image: one batched call counts once).
    ``shape`` is one sample's shape, e.g. (1, 32, 32). ``schedule`` None: ``default_schedule(model)`` (``rf``
    for rectified flows, ``karras`` otherwise).
    """
    spec = get_sampler(sampler)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a sample's (C, H, W) with positive sizes, got {shape}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given: pass at least one, e.g. seeds=[0]")
    if grid is None:
        sched = get_schedule(schedule or default_schedule(model), model=model, **dict(schedule_params or {}))
        grid = sched.grid(steps, final_zero=final_zero)
        if spec.expected_nfe(grid, **knobs) is None:  # adaptive (rk45): only σ_max and σ_min matter, not steps
            grid = sched.grid(1, final_zero=False)
            if final_zero:
                grid = Grid(torch.cat([grid.sigmas, grid.sigmas.new_zeros(1)]))
    if len(grid) < spec.min_steps:
        raise ValueError(f"sampler {sampler!r} needs at least {spec.min_steps} steps, got {len(grid)}")
    batch_size = batch_size or len(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is None:
        device = _model_device(model)
    device = torch.device(device)
    dtype = _model_dtype(model)

    counter = CountingDenoiser(model, check=True)
    sigma0 = float(grid.sigmas[0])
    scale = prior_scale(model.prior, sigma0)
    outs: list[Tensor] = []
    nfe_per_batch: list[int] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(seeds), batch_size):
            chunk = seeds[b : b + batch_size]
            gens = [torch.Generator().manual_seed(s) for s in chunk]
            z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device=device, dtype=dtype)
            before = counter.calls
            x = spec(counter, z * scale, grid, generator=gens, callback=callback, **knobs)
            nfe_per_batch.append(counter.calls - before)
            outs.append(x.float().cpu())
            if progress is not None:
                progress(min(b + batch_size, len(seeds)), len(seeds))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return GenerateResult(torch.cat(outs), seeds, max(nfe_per_batch), seconds, grid)


def _model_device(model: Any) -> torch.device:
    params = _parameters(model)
    return params[0].device if params else torch.device("cpu")


def _model_dtype(model: Any) -> torch.dtype:
    params = _parameters(model)
    return params[0].dtype if params and params[0].is_floating_point() else torch.float32


def _parameters(model: Any) -> list[Tensor]:
    net = getattr(model, "network", None)
    if isinstance(net, torch.nn.Module):
        return list(net.parameters())
    return []
