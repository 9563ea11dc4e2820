"""Reverse-SDE samplers in σ-space (EDM form: f = 0, g² = 2σ; EDM Eq. 6; Score-SDE Eq. 6).

euler_maruyama: the marginal-preserving family of Song et al. 2021 / post 六 with stochasticity
γ ∈ [0, 1]: x' = x + (1 + γ²)(σ' − σ)ε̂ + γ√(2σ(σ − σ'))·z; γ = 0 is the PF-ODE (Euler), γ = 1 the
reverse SDE. pc: predictor–corrector (Score-SDE Alg. 1/4): at each σ_i, M Langevin corrector steps
x ← x + ε_L·s + √(2ε_L)·z with s = (D − x)/σ² and ε_L = 2(r‖z‖/‖s‖)², then one predictor step.
Every step to σ = 0 is the Tweedie denoise x = D (no noise is injected into the final sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from diffsamp.models.base import Denoiser
from diffsamp.samplers._util import (
    Generator,
    StepInfo,
    append_dims,
    final_denoise_step,
    final_nfe,
    randn_like,
    sigma_batch,
    to_d,
)
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.registry import KnobRange, register_sampler

Callback = Callable[[StepInfo], None] | None
# A reverse-SDE Euler step is unstable once σ shrinks by about half per step (pure noise on mnist-ddpm at 10
# karras steps): the smallest σ_{i+1}/σ_i these samplers are registered as stable at.
SDE_MIN_SIGMA_RATIO = 0.5


def _em_step(x: Tensor, denoised: Tensor, s: float, s_next: float, gamma: float, generator: Generator) -> Tensor:
    """One Euler–Maruyama step of the γ-family (Score-SDE Eq. 6, 13; EDM Eq. 6); x = D on the step to σ = 0."""
    if s_next == 0.0:
        return denoised
    x = x + (1 + gamma**2) * (s_next - s) * to_d(x, s, denoised)
    if gamma > 0:
        x = x + gamma * math.sqrt(2 * s * (s - s_next)) * randn_like(x, generator)
    return x


@register_sampler(
    "euler_maruyama", kind="sde", nfe=lambda grid, knobs: len(grid) + final_nfe(grid, knobs),
    min_sigma_ratio=SDE_MIN_SIGMA_RATIO, ranges={"gamma": KnobRange(0, 1)},
)
def euler_maruyama(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    gamma: float = 1.0,
    final_denoise: bool = False,
) -> Tensor:
    """Euler–Maruyama on the reverse SDE; γ ∈ [0, 1] spans PF-ODE → full SDE (Score-SDE Eq. 6, 13)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        x = _em_step(x, denoised, s, s_next, gamma, generator)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)


def langevin_correct(
    model: Denoiser,
    x: Tensor,
    sigma: float,
    *,
    snr: float,
    steps: int,
    generator: Generator,
    norm: Literal["sample", "batch"] = "batch",
) -> Tensor:
    """Langevin corrector at fixed σ (Song et al. 2021, Score-SDE Alg. 4 in σ-space, α = 1).

    ``norm="batch"`` (default) averages ‖z‖ and ‖s‖ over the batch as the Score-SDE code does: stable,
    but a sample then depends on its batch-mates. ``"sample"`` uses each sample's own norms: batch-size
    invariant, fine for images (norms concentrate in high dimension), unstable in very low dimension.
    """
    for _ in range(steps):
        score = (model(x, sigma_batch(x, sigma)) - x) / sigma**2
        z = randn_like(x, generator)
        z_norm = z.reshape(len(z), -1).norm(dim=1)
        s_norm = score.reshape(len(score), -1).norm(dim=1)
        if norm == "batch":
            z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
        step = append_dims(2 * (snr * z_norm / s_norm.clamp_min(torch.finfo(x.dtype).tiny)) ** 2, x.ndim)
        x = x + step * score + torch.sqrt(2 * step) * z
    return x


@register_sampler(
    "pc",
    kind="sde",
    nfe=lambda grid, knobs: len(grid) * (1 + int(knobs["corrector_steps"])) + final_nfe(grid, knobs),
    min_sigma_ratio=SDE_MIN_SIGMA_RATIO,
    ranges={"snr": KnobRange(0, 1, lo_open=True, why="the Langevin step grows as snr²; Song et al. use 0.01 to 0.17"),
            "corrector_steps": KnobRange(0), "gamma": KnobRange(0, 1)},
)
def pc(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    snr: float = 0.16,
    corrector_steps: int = 1,
    gamma: float = 1.0,
    norm: Literal["sample", "batch"] = "batch",
    final_denoise: bool = False,
) -> Tensor:
    """Predictor–corrector (Song et al. 2021 Alg. 1): Langevin corrector then Euler–Maruyama predictor.

    At each σ_i: ``corrector_steps`` Langevin steps with signal-to-noise ratio ``snr``, then one predictor
    step with stochasticity ``gamma`` (1 = reverse diffusion). NFE = len(grid)·(corrector_steps + 1).
    """
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be ≥ 0, got {corrector_steps}")
    if snr <= 0:
        raise ValueError(f"snr must be positive, got {snr}")
    if norm not in ("sample", "batch"):
        raise ValueError(f"norm must be 'sample' or 'batch', got {norm!r}")
    for i, (s, s_next) in enumerate(grid.intervals()):
        x = langevin_correct(model, x, s, snr=snr, steps=corrector_steps, generator=generator, norm=norm)
        denoised = model(x, sigma_batch(x, s))
        x = _em_step(x, denoised, s, s_next, gamma, generator)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)
