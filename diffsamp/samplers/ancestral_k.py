"""Ancestral samplers as k-diffusion defines them: a deterministic step down to σ_down, then fresh noise σ_up·z.

For a step σ → σ' (Karras et al. 2022, EDM; k-diffusion's ``get_ancestral_step``):
  σ_up = min(σ', η·(σ'/σ)·√(σ² − σ'²)),  σ_down = √(σ'² − σ_up²),
so the marginal variance at σ' is kept: σ_down² + σ_up² = σ'². For η ≤ 1 this σ_up is DDIM's σ_t(η) in σ-space
(DDIM Eq. 16; ``ancestral.ancestral_coefficients``, whose helper it reuses) and euler_ancestral is exactly
``ancestral`` (DDPM/DDIM(η)); for VP models the ancestral step in σ-space is the same formula (x̄ = x_t/√ᾱ).
η = 0 gives σ_down = σ', σ_up = 0: the deterministic solver. Noise is ``s_noise``·σ_up·z, with z from
``randn_like`` (one generator, or one per sample: batch-size invariant); none is added on the step to σ = 0.
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
from diffsamp.samplers.ancestral import ancestral_coefficients
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.registry import KnobRange, register_sampler

Callback = Callable[[StepInfo], None] | None
ETA_RANGE = KnobRange(0, why="η = 0 is deterministic, 1 the DDPM posterior variance; above 1 σ_up is capped at σ'")
S_NOISE_RANGE = KnobRange(0, why="a scale of the injected noise (1: as the SDE says)")


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of k-diffusion's ``get_ancestral_step`` (EDM; DDIM Eq. 16 in σ-space, capped at σ')."""
    if not eta or sigma_next == 0.0:
        return sigma_next, 0.0
    _, up = ancestral_coefficients(sigma, sigma_next, eta)
    if up >= sigma_next:
        return 0.0, sigma_next
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


def _add_noise(x: Tensor, sigma_up: float, s_noise: float, generator: Generator) -> Tensor:
    if sigma_up > 0:
        return x + (s_noise * sigma_up) * randn_like(x, generator)
    return x


def _ancestral_two_stage_nfe(grid: Grid, knobs: Mapping[str, Any]) -> int:
    """Two evaluations per step, one where σ_down = 0 (the step to σ = 0, or η large enough to cap σ_up)."""
    eta = float(knobs["eta"])
    return sum(1 if ancestral_step(s, sn, eta)[0] == 0.0 else 2 for s, sn in grid.intervals()) + final_nfe(grid, knobs)


@register_sampler(
    "euler_ancestral", kind="sde", nfe=lambda grid, knobs: len(grid) + final_nfe(grid, knobs),
    ranges={"eta": ETA_RANGE, "s_noise": S_NOISE_RANGE},
)
def euler_ancestral(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    final_denoise: bool = False,
) -> Tensor:
    """Euler ancestral ("Euler a"; k-diffusion ``sample_euler_ancestral``; EDM, DDIM Eq. 16 in σ-space).

    x' = D + (σ_down/σ)(x − D) + s_noise·σ_up·z with (σ_down, σ_up) = ``ancestral_step(σ, σ', η)``; η = 0 is
    Euler (bit for bit), η ≤ 1 is ``ancestral`` (DDIM(η)). NFE = len(grid).
    """
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        down, up = ancestral_step(s, s_next, eta)
        x = denoised + (down / s) * (x - denoised)
        x = _add_noise(x, up, s_noise, generator)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)


@register_sampler("dpm2_ancestral", kind="sde", nfe=_ancestral_two_stage_nfe,
                  ranges={"eta": ETA_RANGE, "s_noise": S_NOISE_RANGE})
def dpm2_ancestral(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    final_denoise: bool = False,
) -> Tensor:
    """DPM-Solver-2 ancestral (k-diffusion ``sample_dpm_2_ancestral``; DPM-Solver Alg. 1, r = ½, in σ).

    Midpoint s = √(σ·σ_down) (the geometric mean, λ-midpoint): x_s = x + (s − σ)ε̂, x' = x + (σ_down − σ)ε̂(x_s, s),
    then + s_noise·σ_up·z. Where σ_down = 0 (the step to σ = 0) one Euler step to D, without noise.
    η = 0 is ``dpm2`` (r = ½) bit for bit. NFE = 2 per step, 1 where σ_down = 0.
    """
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        down, up = ancestral_step(s, s_next, eta)
        if down == 0.0:
            x = denoised
        else:
            d = to_d(x, s, denoised)
            s_mid = down**0.5 * s**0.5
            x_mid = x + (s_mid - s) * d
            d_mid = to_d(x_mid, s_mid, model(x_mid, sigma_batch(x, s_mid)))
            x = x + (down - s) * d_mid
            x = _add_noise(x, up, s_noise, generator)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)


@register_sampler("dpmpp_2s_ancestral", kind="sde", nfe=_ancestral_two_stage_nfe,
                  ranges={"eta": ETA_RANGE, "s_noise": S_NOISE_RANGE})
def dpmpp_2s_ancestral(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    final_denoise: bool = False,
) -> Tensor:
    """DPM-Solver++(2S) ancestral (k-diffusion ``sample_dpmpp_2s_ancestral``; DPM-Solver++ Alg. 1, r = ½).

    With λ = −log σ, h = λ(σ_down) − λ(σ), s = λ-midpoint: x_s = (σ_s/σ)x − expm1(−h/2)·D,
    x' = (σ_down/σ)x − expm1(−h)·D(x_s, σ_s), then + s_noise·σ_up·z; one step to D where σ_down = 0.
    η = 0 is the deterministic DPM-Solver++(2S) (= ``dpmpp_sde`` with η = 0). NFE = 2 per step, 1 where σ_down = 0.
    """
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        down, up = ancestral_step(s, s_next, eta)
        if down == 0.0:
            x = denoised
        else:
            h = math.log(s) - math.log(down)
            s_mid = math.exp(-(-math.log(s) + 0.5 * h))
            x_mid = (s_mid / s) * x - math.expm1(-0.5 * h) * denoised
            denoised_mid = model(x_mid, sigma_batch(x, s_mid))
            x = (down / s) * x - math.expm1(-h) * denoised_mid
        x = _add_noise(x, up, s_noise, generator)  # k-diffusion adds it even where η caps σ_up at σ'
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)
