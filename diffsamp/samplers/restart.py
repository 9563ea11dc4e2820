"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", Alg. 1).

Heun steps on the probability-flow ODE along the grid; once the grid reaches the σ nearest ``restart_min``, the
state is sent back up to the grid σ nearest ``restart_max`` by the forward process (fresh noise of variance
σ_max² − σ_min², Restart's "restart forward") and integrated down again on a Karras sub-grid of
``restart_steps`` points, ``restart_times`` times; then the grid goes on. The schedule of steps is ComfyUI's
``sample_restart`` for a given restart interval (its auto setting replaces the base grid; here the grid is data).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from diffsamp.models.base import Denoiser
from diffsamp.samplers._util import (
    Generator,
    StepInfo,
    final_denoise_step,
    final_nfe,
    randn_like,
    sigma_batch,
    to_d,
)
from diffsamp.samplers.grid import Grid, get_schedule
from diffsamp.samplers.registry import KnobRange, register_sampler


def restart_steps_of(grid: Grid, restart_min: float, restart_max: float, restart_steps: int,
                     restart_times: int) -> list[tuple[float, float]]:
    """Every (σ, σ') Heun step restart sampling takes on ``grid``, restarts included (a step whose σ exceeds
    the previous step's σ' is preceded by the restart's forward noise)."""
    sig = grid.sigmas.tolist()
    steps = list(zip(sig[:-1], sig[1:]))
    lo = min(range(len(sig)), key=lambda i: abs(sig[i] - restart_min))
    hi = min(range(len(sig)), key=lambda i: abs(sig[i] - restart_max))
    if restart_times < 1 or not hi < lo or sig[lo] <= 0:
        return steps
    sub = get_schedule("karras", sigma_min=sig[lo], sigma_max=sig[hi]).grid(restart_steps).sigmas[:-1].tolist()
    restart = list(zip(sub[:-1], sub[1:]))
    return steps[:lo] + restart * restart_times + steps[lo:]


def _nfe(grid: Grid, knobs: Mapping[str, Any]) -> int:
    steps = restart_steps_of(grid, knobs["restart_min"], knobs["restart_max"], knobs["restart_steps"],
                             knobs["restart_times"])
    return sum(1 if s_next == 0 else 2 for _, s_next in steps) + final_nfe(grid, knobs)


@register_sampler("restart", kind="sde", nfe=_nfe, ranges={
    "restart_min": KnobRange(0, lo_open=True), "restart_max": KnobRange(0, lo_open=True),
    "restart_steps": KnobRange(2, why="the restart sub-grid's points, both ends included"),
    "restart_times": KnobRange(0), "s_noise": KnobRange(0)})
def restart(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callable[[StepInfo], None] | None = None,
    restart_min: float = 0.1,
    restart_max: float = 2.0,
    restart_steps: int = 10,
    restart_times: int = 1,
    s_noise: float = 1.0,
    final_denoise: bool = False,
) -> Tensor:
    """Restart sampling (Xu et al. 2023, Alg. 1): Heun ODE steps with returns over [restart_min, restart_max].

    ``restart_times`` times, the state goes from the grid σ nearest ``restart_min`` back to the one nearest
    ``restart_max`` (forward noise), then ``restart_steps``−1 Heun steps on a Karras sub-grid (ρ = 7) bring it
    down again. ``restart_times`` = 0 is ``heun``."""
    last = None
    for i, (s, s_next) in enumerate(restart_steps_of(grid, restart_min, restart_max, restart_steps, restart_times)):
        if last is not None and s > last:  # the restart's forward process: from σ = last up to s
            x = x + randn_like(x, generator) * (s_noise * math.sqrt(s**2 - last**2))
        denoised = model(x, sigma_batch(x, s))
        d = to_d(x, s, denoised)
        if s_next == 0:
            x = x + (s_next - s) * d
        else:
            x_2 = x + (s_next - s) * d
            d_2 = to_d(x_2, s_next, model(x_2, sigma_batch(x, s_next)))
            x = x + (s_next - s) * (d + d_2) / 2
        last = s_next
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)

