"""Stochastic DPM-Solver++ samplers (Lu et al. 2022, DPM-Solver++ §5 and App. B; k-diffusion's SDE forms).

With λ = −log σ and h = λ(σ') − λ(σ), the exact solution of the reverse SDE with stochasticity η (η = 0: the
PF-ODE, η = 1: the reverse-time SDE of EDM Eq. 6) in data prediction, to first order, is
  x' = (σ'/σ)·e^{−ηh}·x + (1 − e^{−(1+η)h})·D + σ'·√(1 − e^{−2ηh})·n,
the SDE-DPM-Solver++1 step (DPM-Solver++ Eq. 9 in σ-space); the multistep forms add the finite-difference
corrections of DPM-Solver++(2M) (midpoint or heun) and (3M) with φ's taken at (1+η)h. n is a normalised Brownian
increment from one tree per sample (``brownian.BrownianNoise``), or with ``noise="gaussian"`` a fresh draw from the
generator (diffusers' ``DPMSolverMultistepScheduler``). Every step to σ = 0 is x = D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

from diffsamp.models.base import Denoiser
from diffsamp.samplers._util import Generator, StepInfo, final_denoise_step, one_stage_nfe, sigma_batch, two_stage_nfe
from diffsamp.samplers.ancestral_k import ETA_RANGE, S_NOISE_RANGE, ancestral_step
from diffsamp.samplers.brownian import NoiseKind, grid_noise
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.registry import KnobRange, register_sampler

Callback = Callable[[StepInfo], None] | None


class _LazyNoise:
    """The grid's noise source, built on first use (a deterministic run, η = 0 or s_noise = 0, builds no tree)."""

    def __init__(self, x: Tensor, sigmas: Sequence[float], generator: Generator, kind: NoiseKind) -> None:
        if kind not in ("brownian", "gaussian"):
            raise ValueError(f"noise must be 'brownian' or 'gaussian', got {kind!r}")
        self.args, self.source = (x, sigmas, generator, kind), None

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        if self.source is None:
            self.source = grid_noise(*self.args)
        return self.source(sigma, sigma_next)


def _to_down(x: Tensor, denoised: Tensor, s: float, down: float) -> Tensor:
    """DPM-Solver++(1) from σ to σ_down: (σ_down/σ)x − expm1(log σ_down − log σ)·D (D itself at σ_down = 0)."""
    if down == 0.0:
        return denoised
    return (down / s) * x - math.expm1(math.log(down) - math.log(s)) * denoised


@register_sampler(
    "dpmpp_sde", kind="sde", nfe=two_stage_nfe,
    ranges={"eta": ETA_RANGE, "s_noise": S_NOISE_RANGE, "r": KnobRange(0, 1, lo_open=True)},
)
def dpmpp_sde(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    noise: Literal["brownian", "gaussian"] = "brownian",
    final_denoise: bool = False,
) -> Tensor:
    """Stochastic singlestep DPM-Solver++(2S) ("DPM++ SDE"; k-diffusion ``sample_dpmpp_sde``; DPM-Solver++ Alg. 1).

    Per step, s at λ(σ) + r·h: an ancestral DPM-Solver++(1) step to s (``ancestral_step(σ, σ_s, η)``, noise
    n(σ, σ_s)), D_s there, then one from σ to σ' with D̃ = (1 − 1/(2r))D + D_s/(2r) and noise n(σ, σ').
    Noise from a per-sample Brownian tree (diffusers' ``DPMSolverSDEScheduler``), ``noise="gaussian"``: fresh
    draws. η = 0 is deterministic DPM-Solver++(2S). NFE = 2 per step, 1 on the step to σ = 0.
    """
    sigmas = grid.sigmas.tolist()
    noise_at = _LazyNoise(x, sigmas, generator, noise)
    fac = 1 / (2 * r)
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        if s_next == 0.0:
            x = denoised
        else:
            h = math.log(s) - math.log(s_next)
            s_mid = math.exp(math.log(s) - r * h)
            down, up = ancestral_step(s, s_mid, eta)
            x_mid = _to_down(x, denoised, s, down)
            if up > 0 and s_noise > 0:
                x_mid = x_mid + (s_noise * up) * noise_at(s, s_mid)
            denoised_mid = model(x_mid, sigma_batch(x, s_mid))
            down, up = ancestral_step(s, s_next, eta)
            x = _to_down(x, (1 - fac) * denoised + fac * denoised_mid, s, down)
            if up > 0 and s_noise > 0:
                x = x + (s_noise * up) * noise_at(s, s_next)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)


def _sde_noise_scale(s_next: float, h: float, eta: float, s_noise: float) -> float:
    """σ'·√(1 − e^{−2ηh})·s_noise, the noise of one SDE-DPM-Solver++ step (DPM-Solver++ Eq. 9)."""
    return s_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise


@register_sampler(
    "dpmpp_2m_sde", kind="sde", nfe=one_stage_nfe, ranges={"eta": ETA_RANGE, "s_noise": S_NOISE_RANGE},
)
def dpmpp_2m_sde(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: Literal["midpoint", "heun"] = "midpoint",
    noise: Literal["brownian", "gaussian"] = "brownian",
    final_denoise: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) SDE ("DPM++ 2M SDE"; k-diffusion ``sample_dpmpp_2m_sde``; DPM-Solver++ §5, Eq. 9).

    x' = (σ'/σ)e^{−ηh}x + (1 − e^{−(1+η)h})D + c·(D − D_prev)/r_h + σ'√(1 − e^{−2ηh})·s_noise·n, r_h = h_prev/h,
    c = ½(1 − e^{−(1+η)h}) (``midpoint``) or (1 − e^{−(1+η)h})/(−(1+η)h) + 1 (``heun``); the first step is
    first order. η = 0 is DPM-Solver++(2M) (``dpmpp2m``); η = 1 with ``noise="gaussian"`` is diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` on grids that end at 0. NFE = len(grid).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise_at = _LazyNoise(x, grid.sigmas.tolist(), generator, noise)
    old_denoised, h_last = None, None
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        h = None
        if s_next == 0.0:
            x_new = denoised
        else:
            h = math.log(s) - math.log(s_next)
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x_new = (s_next / s) * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x_new = x_new + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x_new = x_new + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                x_new = x_new + _sde_noise_scale(s_next, h, eta, s_noise) * noise_at(s, s_next)
        x = x_new
        old_denoised, h_last = denoised, h
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)


@register_sampler(
    "dpmpp_3m_sde", kind="sde", nfe=one_stage_nfe, ranges={"eta": ETA_RANGE, "s_noise": S_NOISE_RANGE},
)
def dpmpp_3m_sde(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise: Literal["brownian", "gaussian"] = "brownian",
    final_denoise: bool = False,
) -> Tensor:
    """DPM-Solver++(3M) SDE ("DPM++ 3M SDE"; k-diffusion ``sample_dpmpp_3m_sde``; DPM-Solver++ Alg. 2, §5).

    With ĥ = (1+η)h: x' = e^{−ĥ}x + (1 − e^{−ĥ})D + φ₂·D₁ − φ₃·D₂ + σ'√(1 − e^{−2ηh})·s_noise·n, where
    φ₂ = (e^{−ĥ} − 1)/ĥ + 1, φ₃ = φ₂/ĥ − ½ and D₁, D₂ the first and second divided differences of the last three
    D's in λ (DPM-Solver++ Alg. 2's 3rd-order terms); the second step is 2nd order with φ₂·(D − D_prev)/r_h (the
    form of ``dpmpp_2m_sde`` heun), the first is first order. η = 0 is deterministic DPM-Solver++(3M) as k-diffusion
    and ComfyUI run it. NFE = len(grid).
    """
    noise_at = _LazyNoise(x, grid.sigmas.tolist(), generator, noise)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        h = None
        if s_next == 0.0:
            x = denoised
        else:
            h = math.log(s) - math.log(s_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta > 0 and s_noise > 0:
                x = x + _sde_noise_scale(s_next, h, eta, s_noise) * noise_at(s, s_next)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)
