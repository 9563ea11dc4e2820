"""More deterministic multistep PF-ODE solvers in σ-space (x̄ = x0 + σε, dx̄/dσ = ε̂ = (x̄ − D)/σ, EDM Eq. 1, 3).

unipc: UniPC (Zhao et al. 2023, arXiv:2302.04867, Alg. 1–3: UniP-p predictor, UniC corrector, B(h) = h (bh1)
or e^h − 1 (bh2)), in data prediction as diffusers' ``UniPCMultistepScheduler`` (predict_x0=True).
deis: DEIS tAB (Zhang & Chen 2023, DEIS Eq. 14–15): ε̂ interpolated by a Lagrange polynomial in log σ over the
last 1–3 points and integrated exactly in σ, as diffusers' ``DEISMultistepScheduler`` (algorithm_type="deis").
lms: variable-step linear multistep on dx̄/dσ (k-diffusion ``sample_lms``, diffusers ``LMSDiscreteScheduler``):
coefficients = integrals over [σ_i, σ_{i+1}] of the Lagrange basis polynomials in σ through the last 1–4 σ's.
res_multistep: ComfyUI's RES multistep (comfy/k_diffusion/sampling.py ``res_multistep`` at η = 0), the 2nd-order
multistep exponential integrator of Zhang et al. 2023, "Improved order analysis and design of exponential integrator
for diffusion models sampling" (RES, arXiv:2308.02157, §4).

Orders ramp up 1, 2, … while history builds (every method needs p − 1 past points). Diffusers' lower-order final
steps are kept where diffusers has them (unipc always; deis below 15 steps). A step to σ = 0 is x = D for unipc and
res_multistep (their rule's exact limit at order 1, and what diffusers/ComfyUI compute there); deis and lms integrate
their interpolant down to σ = 0, which is finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
from torch import Tensor

from diffsamp.models.base import Denoiser
from diffsamp.samplers._util import Generator, StepInfo, final_denoise_step, one_stage_nfe, sigma_batch, to_d
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.registry import KnobRange, register_sampler

Callback = Callable[[StepInfo], None] | None


# --- UniPC ------------------------------------------------------------------------------------------------------


def unipc_update(
    x: Tensor, s: float, s_next: float, m0: Tensor, older: Sequence[tuple[float, Tensor]], order: int,
    variant: Literal["bh1", "bh2"], m_next: Tensor | None = None,
) -> Tensor:
    """One UniPC update from σ = ``s`` (state ``x``, data prediction ``m0``) to ``s_next`` (UniPC Alg. 2–3).

    ``older``: the earlier (σ_j, D_j), newest first, at least ``order − 1`` of them. Predictor (``m_next`` None):
    UniP-``order``. Corrector (``m_next`` = D at the predicted point): UniC after a predictor of ``order``, using
    ``order − 1`` earlier points and the new one. With λ = −log σ, h = λ' − λ, r_k = (λ_k − λ)/h and
    D1_k = (D_k − m0)/r_k: x' = (σ'/σ) x − (e^{−h} − 1)·m0 − B(h) Σ ρ_k D1_k, where ρ solves R ρ = b with
    R_ik = r_k^{i−1}, b_i = i!·φ_{i+1}(−h)·(−h)^i… / B(h) (UniPC Eq. 9; diffusers' recursion), ρ = ½ for UniP-2 and UniC-1.
    """
    hh = math.log(s_next / s)  # −h
    rks = [(math.log(s) - math.log(sk)) / -hh for sk, _ in older[: order - 1]]  # (λ_k − λ)/h, negative
    d1s = [(mk - m0) / rk for rk, (_, mk) in zip(rks, older)]
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    corrector = m_next is not None
    n_coef = order if corrector else order - 1
    rks_all = rks + [1.0]
    h_phi_k, fact, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    x_new = (s_next / s) * x - h_phi_1 * m0
    if n_coef == 0:
        return x_new
    if corrector and order == 1:
        rhos = [0.5]
    elif not corrector and order == 2:
        rhos = [0.5]
    else:
        r_mat = np.array([[rk ** (i - 1) for rk in rks_all[: n_coef]] for i in range(1, n_coef + 1)])
        rhos = np.linalg.solve(r_mat, np.array(b[:n_coef])).tolist()
    res = sum(rho * d for rho, d in zip(rhos, d1s))
    if corrector:
        res = res + rhos[-1] * (m_next - m0)
    return x_new - b_h * res


@register_sampler("unipc", kind="ode", nfe=one_stage_nfe, ranges={"order": KnobRange(1, 3)})
def unipc(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    order: int = 2,
    variant: Literal["bh1", "bh2"] = "bh2",
    use_corrector: bool = True,
    lower_order_final: bool = True,
    final_denoise: bool = False,
) -> Tensor:
    """UniPC multistep, UniP-p predictor + UniC corrector, bh1/bh2 (Zhao et al. 2023, UniPC Alg. 1–3).

    As diffusers' ``UniPCMultistepScheduler`` (solver_order = ``order``, solver_type = ``variant``,
    predict_x0=True): the corrector reuses the evaluation at the predicted point, so NFE = steps; it refines
    every step but the last (``use_corrector=False`` is UniP alone, diffusers' disable_corrector on every step).
    Orders ramp up while history builds and, with ``lower_order_final``, down over the last steps
    (order ≤ steps left, on any grid, as diffusers does). UniPC-p converges at order p + 1 with the corrector.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be bh1 or bh2, got {variant!r}")
    hist: list[tuple[float, Tensor]] = []  # (σ_j, D_j) of past points, newest first
    prev: tuple[Tensor, float, int] | None = None  # (x at the last point, its σ, the order of its predictor)
    total = len(grid)
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        if use_corrector and prev is not None:
            x_last, s_last, p_last = prev
            x = unipc_update(x_last, s_last, s, hist[0][1], hist[1:], p_last, variant, m_next=denoised)
        p = min(order, i + 1)
        if lower_order_final:
            p = min(p, total - i)
        if s_next == 0.0:
            x_new = denoised
        else:
            x_new = unipc_update(x, s, s_next, denoised, hist, p, variant)
        prev = (x, s, p)
        hist = ([(s, denoised)] + hist)[:order]
        if callback is not None:
            callback(StepInfo(i, s, s_next, x_new, denoised))
        x = x_new
    return final_denoise_step(model, x, grid, final_denoise)


# --- DEIS tAB (log σ) ----------------------------------------------------------------------------------------------


def _lagrange_integral(nodes: Sequence[float], j: int, a: float, b: float) -> float:
    """∫_a^b ℓ_j(τ) dτ for the Lagrange basis polynomial ℓ_j through ``nodes`` (exact, numpy polynomials)."""
    poly = np.polynomial.Polynomial([1.0])
    for k, t in enumerate(nodes):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-t, 1.0]) / (nodes[j] - t)
    integ = poly.integ()
    return float(integ(b) - integ(a))


def _deis_ind(t: float, nodes_log: Sequence[float], j: int) -> float:
    """∫ ℓ_j(log τ) dτ evaluated at τ = t (antiderivative, 0 at t = 0): ℓ_j a polynomial in log τ.

    With u = log τ, ∫ P(u) e^u du = e^u Σ_k (−1)^k P^{(k)}(u) (DEIS Eq. 15; diffusers' ind_fn written out).
    """
    if t == 0.0:
        return 0.0
    poly = np.polynomial.Polynomial([1.0])
    for k, c in enumerate(nodes_log):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-c, 1.0]) / (nodes_log[j] - c)
    u, acc, sign, p = math.log(t), 0.0, 1.0, poly
    for _ in range(len(nodes_log)):
        acc += sign * p(u)
        p, sign = p.deriv(), -sign
    return t * acc


def deis_coefficients(sigmas: Sequence[float], s_next: float) -> list[float]:
    """DEIS tAB coefficients c_j, x' = x + Σ c_j ε̂_j, for ε̂ at ``sigmas`` (newest first): ∫_σ^σ' of the Lagrange
    basis in log σ through ``sigmas`` (DEIS Eq. 14; diffusers' DEISMultistepScheduler, algorithm_type="deis")."""
    logs = [math.log(v) for v in sigmas]
    return [_deis_ind(s_next, logs, j) - _deis_ind(sigmas[0], logs, j) for j in range(len(sigmas))]


@register_sampler("deis", kind="ode", nfe=one_stage_nfe, ranges={"order": KnobRange(1, 3)})
def deis(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    order: int = 3,
    lower_order_final: bool = True,
    final_denoise: bool = False,
) -> Tensor:
    """DEIS tAB multistep, order 1–3: ε̂ extrapolated by a Lagrange polynomial in log σ (Zhang & Chen 2023, DEIS Eq. 14).

    As diffusers' ``DEISMultistepScheduler`` (solver_order = ``order``, algorithm_type "deis", log-ρ): order 1 is
    Euler (= DDIM); orders ramp up while history builds and, with ``lower_order_final`` on grids of < 15 steps,
    the last two steps are of order 1 and ≤ 2. The step to σ = 0 integrates the interpolant to 0 (finite).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"deis order must be 1, 2 or 3, got {order}")
    hist: list[tuple[float, Tensor]] = []  # (σ_j, ε̂_j), newest first
    total = len(grid)
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        hist = ([(s, to_d(x, s, denoised))] + hist)[:order]
        p = min(order, i + 1)
        if lower_order_final and total < 15:
            p = min(p, total - i)
        coeffs = deis_coefficients([sj for sj, _ in hist[:p]], s_next)
        x_new = x + sum(c * d for c, (_, d) in zip(coeffs, hist))
        if callback is not None:
            callback(StepInfo(i, s, s_next, x_new, denoised))
        x = x_new
    return final_denoise_step(model, x, grid, final_denoise)


# --- LMS -------------------------------------------------------------------------------------------------------------


def lms_coefficients(sigmas: Sequence[float], s_next: float) -> list[float]:
    """∫_σ^σ' ℓ_j(τ) dτ for the Lagrange basis in σ through ``sigmas`` (newest first; k-diffusion
    ``linear_multistep_coeff``, computed exactly rather than by quadrature)."""
    return [_lagrange_integral(sigmas, j, sigmas[0], s_next) for j in range(len(sigmas))]


@register_sampler("lms", kind="ode", nfe=one_stage_nfe, ranges={"order": KnobRange(1, 4)})
def lms(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    order: int = 4,
    final_denoise: bool = False,
) -> Tensor:
    """Linear multistep on dx̄/dσ = ε̂, order 1–4, variable step (k-diffusion ``sample_lms``; diffusers' LMSDiscreteScheduler).

    x' = x + Σ_j c_j ε̂_j, c_j = ∫_σ^σ' ℓ_j(τ) dτ with ℓ_j the Lagrange basis in σ through the last ``order`` σ's
    (variable-step Adams–Bashforth); orders ramp up 1 … ``order``, with no lower-order final steps.
    """
    if order not in (1, 2, 3, 4):
        raise ValueError(f"lms order must be 1 to 4, got {order}")
    hist: list[tuple[float, Tensor]] = []
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        hist = ([(s, to_d(x, s, denoised))] + hist)[:order]
        coeffs = lms_coefficients([sj for sj, _ in hist], s_next)
        x_new = x + sum(c * d for c, (_, d) in zip(coeffs, hist))
        if callback is not None:
            callback(StepInfo(i, s, s_next, x_new, denoised))
        x = x_new
    return final_denoise_step(model, x, grid, final_denoise)


# --- RES multistep ---------------------------------------------------------------------------------------------------


@register_sampler("res_multistep", kind="ode", nfe=one_stage_nfe)
def res_multistep(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callback = None,
    final_denoise: bool = False,
) -> Tensor:
    """RES multistep, 2nd-order multistep exponential integrator (Zhang et al. 2023, RES §4; ComfyUI ``res_multistep``).

    ComfyUI's comfy/k_diffusion/sampling.py ``res_multistep`` at η = 0 (``sample_res_multistep``): with λ = −log σ,
    h = λ' − λ, c₂ = (λ_prev − λ)/h, φ₁(t) = (eᵗ − 1)/t, φ₂(t) = (φ₁(t) − 1)/t:
    x' = e^{−h} x + h [(φ₁(−h) − φ₂(−h)/c₂) D + (φ₂(−h)/c₂) D_prev]. First step and the step to σ = 0: Euler.
    """
    prev: tuple[float, Tensor] | None = None
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        if s_next == 0.0 or prev is None:
            x_new = denoised + (s_next / s) * (x - denoised)
        else:
            h = math.log(s) - math.log(s_next)
            c2 = (math.log(s) - math.log(prev[0])) / h
            phi1 = -math.expm1(-h) / h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x_new = math.exp(-h) * x + h * (b1 * denoised + b2 * prev[1])
        prev = (s, denoised)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x_new, denoised))
        x = x_new
    return final_denoise_step(model, x, grid, final_denoise)
