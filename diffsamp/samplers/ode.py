"""Probability-flow ODE solvers in σ-space: dx/dσ = ε̂(x, σ) = (x − D(x, σ))/σ (EDM Eq. 1, 3).

Single-step: euler (= DDIM η=0), heun (EDM Alg. 1; with s_churn > 0 both are EDM's stochastic Alg. 2), dpm2 (generalized DPM-Solver-2, knob r).
Multistep (one shared loop, ``_multistep``): dpmpp (aliases dpmpp2m / dpmpp3m) (DPM-Solver++ in data prediction,
Lu et al. 2022, DPM-Solver++ Alg. 2), ipndm (Adams–Bashforth on ε̂, order ≤ 4, Zhang & Chen 2023).
Adaptive: rk45 (scipy ``solve_ivp`` on the PF-ODE, Song et al. 2021 §4.3).
Every step to σ = 0 is the exact limit of its rule there: x = D (one evaluation, no second stage).
Knob ``final_denoise``: on grids that end above 0, finish with the Tweedie step x = D(x, σ_K) (+1 NFE).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from diffsamp.models.base import PRIOR_TIMES, Denoiser
from diffsamp.samplers._util import (
    Generator,
    StepInfo,
    final_denoise_step,
    one_stage_nfe,
    randn_like,
    sigma_batch,
    to_d,
    two_stage_nfe,
)
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.registry import KnobRange, Planning, register_alias, register_sampler

Callback = Callable[[StepInfo], None] | None


_CHURN_RANGES = {"s_churn": KnobRange(0, why="EDM's S_churn; γ = min(S_churn/N, √2 − 1)"), "s_tmin": KnobRange(0),
                 "s_tmax": KnobRange(0, infinite_ok=True), "s_noise": KnobRange(0)}


def churn(
    x: Tensor, s: float, steps: int, generator: Generator, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float
) -> tuple[Tensor, float]:
    """EDM's stochastic step (Karras et al. 2022, EDM Alg. 2, lines 4–6): with γ = min(S_churn/N, √2 − 1) for σ in
    [S_tmin, S_tmax] (else 0), σ̂ = (1 + γ)σ and x̂ = x + √(σ̂² − σ²)·S_noise·z; γ = 0 returns (x, σ) untouched."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
    if gamma <= 0:
        return x, s
    s_hat = s * (gamma + 1)
    return x + (s_noise * math.sqrt(s_hat**2 - s**2)) * randn_like(x, generator), s_hat


@register_sampler("euler", kind="ode", nfe=one_stage_nfe, ranges=_CHURN_RANGES)
def euler(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    final_denoise: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler on the PF-ODE, x' = D + (σ'/σ)(x − D) (EDM Euler = DDIM η=0 = DPM-Solver-1; DDIM Eq. 12–14).

    ``s_churn`` > 0: EDM's stochastic sampler with Euler steps (EDM Alg. 2; k-diffusion ``sample_euler``), each step
    from σ̂ = (1 + γ)σ after adding noise (``churn``); stochastic then, though registered as an ODE solver.
    """
    for i, (s, s_next) in enumerate(grid.intervals()):
        x, s_hat = churn(x, s, len(grid), generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_batch(x, s_hat))
        x = denoised + (s_next / s_hat) * (x - denoised)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)


@register_sampler("heun", kind="ode", nfe=two_stage_nfe, ranges=_CHURN_RANGES, planning=Planning(two_stage_r=1.0))
def heun(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    final_denoise: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, EDM Alg. 1, deterministic); Euler on the step to σ=0.

    ``s_churn`` > 0: EDM's stochastic sampler (EDM Alg. 2; k-diffusion ``sample_heun``): noise raises σ to
    σ̂ = (1 + γ)σ (``churn``), then the Heun step from σ̂ to σ'. Same NFE.
    """
    for i, (s, s_next) in enumerate(grid.intervals()):
        x, s_hat = churn(x, s, len(grid), generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = model(x, sigma_batch(x, s_hat))
        d = to_d(x, s_hat, denoised)
        x_pred = x + (s_next - s_hat) * d
        if s_next > 0:
            d_next = to_d(x_pred, s_next, model(x_pred, sigma_batch(x, s_next)))
            x_pred = x + (s_next - s_hat) * (d + d_next) / 2
        x = x_pred
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)


@register_sampler("dpm2", kind="ode", nfe=two_stage_nfe, ranges={"r": KnobRange(0, 1, lo_open=True)},
                  planning=Planning(two_stage_r=0.5))
def dpm2(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    r: float = 0.5,
    final_denoise: bool = False,
) -> Tensor:
    """Generalized DPM-Solver-2 (AMED Table 1; DPM-Solver-2): s = σ'^r σ^(1−r); r=½ DPM-Solver-2, r=1 Heun.

    x_s = x + (s − σ)ε̂;  x' = x + (σ' − σ)[ε̂_s/(2r) + (1 − 1/(2r)) ε̂]. Euler on the step to σ = 0.
    """
    if not 0.0 < r <= 1.0:
        raise ValueError(f"dpm2 needs r in (0, 1], got {r}")
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        d = to_d(x, s, denoised)
        if s_next == 0.0:
            x = denoised
        else:
            s_mid = s_next**r * s ** (1 - r)
            x_mid = x + (s_mid - s) * d
            d_mid = to_d(x_mid, s_mid, model(x_mid, sigma_batch(x, s_mid)))
            x = x + (s_next - s) * (d_mid / (2 * r) + (1 - 1 / (2 * r)) * d)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return final_denoise_step(model, x, grid, final_denoise)


# --- multistep methods: one loop, one rule per method ----------------------------------------------

History = list[tuple[float, Tensor, Tensor]]  # past (σ_j, x_j, D_j), newest first
MultistepRule = Callable[[Tensor, Tensor, float, float, History, int], Tensor]


def _multistep(
    model: Denoiser, x: Tensor, grid: Grid, rule: MultistepRule, history_len: int, callback: Callback
) -> Tensor:
    """Run ``rule(x, D, σ, σ', history, steps_left)`` over the grid; the step to σ = 0 is x = D."""
    history: History = []
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        x_new = denoised if s_next == 0.0 else rule(x, denoised, s, s_next, history, len(grid) - i)
        history = ([(s, x, denoised)] + history)[:history_len]
        if callback is not None:
            callback(StepInfo(i, s, s_next, x_new, denoised))
        x = x_new
    return x


def _log(v: float | Tensor) -> float | Tensor:
    return torch.log(v) if isinstance(v, Tensor) else math.log(v)


def _expm1(v: float | Tensor) -> float | Tensor:
    return torch.expm1(v) if isinstance(v, Tensor) else math.expm1(v)


def dpmpp_update(
    x: Tensor, m0: Tensor, s: float | Tensor, s_next: float | Tensor, hist: History, left: int, *,
    max_order: int, total: int, lower_order_final: bool = True, phi2_second_step: bool = False,
) -> Tensor:
    """One DPM-Solver++ multistep update in σ (λ = −log σ), orders 1–3 (Lu et al. 2022, DPM-Solver++ Alg. 2).

    ``hist`` holds past (σ_j, x_j, D_j), newest first; σ's may be per-sample tensors (the AMED plugin's s).
    ``phi2_second_step``: a 2nd-order step of a 3rd-order run adds φ₂·D1 (φ₂ = (e^{−h} − 1)/h + 1), as k-diffusion's
    ``sample_dpmpp_3m_sde`` does, instead of the 2M rule's ½(e^{−h} − 1)·D1.
    """
    order = min(max_order, len(hist) + 1)
    if lower_order_final and total < 15:
        order = min(order, left)
    lam = -_log(s)
    h = -_log(s_next) - lam
    phi1 = _expm1(-h)
    if order == 1:
        return (s_next / s) * x - phi1 * m0
    s1, _, m1 = hist[0]
    r0 = (lam + _log(s1)) / h
    d1_0 = (m0 - m1) / r0
    if order == 2:
        if phi2_second_step and max_order == 3:
            return (s_next / s) * x - phi1 * m0 + (phi1 / h + 1) * d1_0
        return (s_next / s) * x - phi1 * (m0 + 0.5 * d1_0)
    s2, _, m2 = hist[1]
    r1 = (_log(s2) - _log(s1)) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    return (s_next / s) * x - (phi1 * m0 - phi2 * d1 + phi3 * d2)


def _dpmpp_rule(max_order: int, lower_order_final: bool, total: int, phi2_second_step: bool = False) -> MultistepRule:
    """``dpmpp_update`` as a rule of the shared multistep loop."""

    def rule(x: Tensor, m0: Tensor, s: float, s_next: float, hist: History, left: int) -> Tensor:
        return dpmpp_update(
            x, m0, s, s_next, hist, left, max_order=max_order, total=total, lower_order_final=lower_order_final,
            phi2_second_step=phi2_second_step,
        )

    return rule


@register_sampler("dpmpp", kind="ode", nfe=one_stage_nfe, ranges={"order": KnobRange(1, 3)},
                  planning=Planning("logsnr"))  # AMED §4.1: DPM-Solver++ on logSNR-uniform steps
def dpmpp(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    order: int = 2,
    lower_order_final: bool = True,
    variant: Literal["diffusers", "k-diffusion"] = "diffusers",
    final_denoise: bool = False,
) -> Tensor:
    """DPM-Solver++ multistep in data prediction, order 1–3 (Lu et al. 2022, DPM-Solver++ Alg. 2).

    Orders ramp up 1, 2, …, ``order`` while history builds; with ``lower_order_final`` on grids of
    < 15 steps they ramp down over the last steps (as diffusers does). ``variant="diffusers"`` (default) is
    diffusers' DPMSolverMultistepScheduler: below 15 steps the last steps are of lower order, and a 3M run's second
    step is the paper's 2M step, so dpmpp3m differs from k-diffusion's/ComfyUI's 3M there (on mnist-ddpm at 10 karras
    steps by up to 0.57 in a pixel, RMS 0.060, at 10 logsnr steps 0.18, RMS 0.006; images in [−1, 1], 64 seeds). ``variant="k-diffusion"`` is k-diffusion's
    ``sample_dpmpp_2m`` / ``sample_dpmpp_3m_sde`` at η = 0 (ComfyUI's dpmpp_2m / dpmpp_3m_sde with eta=0): no
    lower-order final steps whatever ``lower_order_final`` says, and a 3M run's second step adds φ₂·D1.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"dpmpp order must be 1, 2 or 3, got {order}")
    if variant not in ("diffusers", "k-diffusion"):
        raise ValueError(f"dpmpp variant must be diffusers or k-diffusion, got {variant!r}")
    kd = variant == "k-diffusion"
    rule = _dpmpp_rule(order, lower_order_final and not kd, len(grid), phi2_second_step=kd)
    x = _multistep(model, x, grid, rule, order - 1, callback)
    return final_denoise_step(model, x, grid, final_denoise)


register_alias("dpmpp2m", "dpmpp", description="DPM-Solver++(2M), multistep 2nd order (Lu et al. 2022)", order=2)
register_alias("dpmpp3m", "dpmpp", description="DPM-Solver++(3M), multistep 3rd order (Lu et al. 2022); below 15 steps as diffusers, not k-diffusion (knob variant)", order=3)


_AB_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def adams_bashforth(ds: list[Tensor]) -> Tensor:
    """Fixed-coefficient Adams–Bashforth combination of ε̂'s, newest first (iPNDM, Zhang & Chen 2023)."""
    coeffs = _AB_COEFFS[len(ds)]
    out = coeffs[0] * ds[0]
    for c, d in zip(coeffs[1:], ds[1:]):
        out = out + c * d
    return out


@register_sampler("ipndm", kind="ode", nfe=one_stage_nfe, ranges={"max_order": KnobRange(1, 4)})
def ipndm(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    max_order: int = 4,
    final_denoise: bool = False,
) -> Tensor:
    """Improved PNDM: Adams–Bashforth on ε̂, orders ramping 1 → max_order ≤ 4 (Zhang & Chen 2023, DEIS)."""
    if max_order not in _AB_COEFFS:
        raise ValueError(f"ipndm max_order must be 1 to 4, got {max_order}")

    def rule(x: Tensor, m0: Tensor, s: float, s_next: float, hist: History, left: int) -> Tensor:
        ds = [to_d(x, s, m0)] + [to_d(xj, sj, mj) for sj, xj, mj in hist]
        return x + (s_next - s) * adams_bashforth(ds)

    x = _multistep(model, x, grid, rule, max_order - 1, callback)
    return final_denoise_step(model, x, grid, final_denoise)


@register_sampler("rk45", kind="ode", nfe=lambda grid, knobs: None, ranges={
    "rtol": KnobRange(1e-13, 1, hi_open=True, why="a relative tolerance; scipy's solve_ivp goes no lower than 2.2e-14"),
    "atol": KnobRange(0, lo_open=True, why="an absolute tolerance")})
def rk45(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    time: str | None = None,
) -> Tensor:
    """Adaptive Dormand–Prince RK45 (scipy ``solve_ivp``) on the PF-ODE (Score-SDE §4.3, RF §5.3).

    Integrates from σ_0 to the last positive σ of the grid (intermediate grid points are not used) and,
    if the grid ends at 0, takes the final step x = D (one more NFE). NFE is adaptive: count it.
    ``generate`` hands it the schedule's end points [σ_max, σ_min, 0], so its ``steps`` do not matter.
    ``time``: the variable the solver steps in — ``"sigma"`` (x̄ over σ, dx̄/dσ = ε̂) or ``"rf"`` (the RF
    paper's x_t = x̄/(1 + σ) over t = σ/(1 + σ), dx_t/dt = ε̂ − x̂0, CONTRIBUTING.md). Default: ``"rf"`` for
    rectified flows (prior ``rf``), whose σ runs over six decades (999 → 0.001) but whose velocity is smooth
    in t — on ``mnist-rf`` at rtol = atol = 1e-3 (a batch of 250, final denoising step included), 63 NFE in t
    against 225 in σ, end points within RMS 0.033 — and ``"sigma"`` for every other model.
    """
    if time is None:  # the model's own time when its prior declares one (rectified flows: "rf")
        time = model.prior if model.prior in PRIOR_TIMES else "sigma"
    if time != "sigma" and time not in PRIOR_TIMES:
        raise ValueError(f"rk45 time must be one of {', '.join(['sigma', *PRIOR_TIMES])}, got {time!r}")
    sigmas = grid.sigmas.tolist()
    s_end = sigmas[-2] if grid.ends_at_zero else sigmas[-1]
    shape, dtype, device = x.shape, x.dtype, x.device
    coords = PRIOR_TIMES.get(time)

    def state(y: np.ndarray) -> Tensor:
        return torch.from_numpy(y).reshape(shape).to(device=device, dtype=dtype)

    if coords is None:
        def rhs(s: float, y: np.ndarray) -> np.ndarray:
            xs = state(y)
            d = to_d(xs, s, model(xs, sigma_batch(xs, s)))
            return d.reshape(-1).to(torch.float64).cpu().numpy()

        span, y0 = (sigmas[0], s_end), x.reshape(-1).to(torch.float64).cpu().numpy()
    else:
        def rhs(t: float, y: np.ndarray) -> np.ndarray:
            s = coords.sigma(t)
            xbar = coords.from_state(state(y), s)
            v = coords.velocity(xbar, model(xbar, sigma_batch(xbar, s)), s)
            return v.reshape(-1).to(torch.float64).cpu().numpy()

        span = (coords.t(sigmas[0]), coords.t(s_end))
        y0 = coords.to_state(x, sigmas[0]).reshape(-1).to(torch.float64).cpu().numpy()
    sol = solve_ivp(rhs, span, y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"rk45 failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape).to(device=device, dtype=dtype)
    if coords is not None:
        x = coords.from_state(x, s_end)
    if grid.ends_at_zero:
        denoised = model(x, sigma_batch(x, s_end))
        if callback is not None:
            callback(StepInfo(0, sigmas[0], 0.0, denoised, denoised))
        return denoised
    if callback is not None:
        callback(StepInfo(0, sigmas[0], s_end, x, x))
    return x
