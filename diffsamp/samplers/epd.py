"""EPD-Solver: Ensemble of Parallel Directions (Zhu et al., ICCV 2025, "Distilling Parallel Gradients for Fast
ODE Solvers of Diffusion Models", arXiv:2507.14797, Eq. 7–9), and AdaSDE, its stochastic variant (NeurIPS 2025:
a learned noise injection γ per step before the EPD step, as EDM's churn, Karras et al. 2022 Alg. 2).

Per interval [σ, σ'] a learned, sample-independent table gives K intermediate points r_k (s_k = σ'^r_k σ^(1−r_k),
the geometric interpolation of AMED), simplex weights λ_k (a softmax), direction scales c_k and time scales a_k:

  x_k = x + (s_k − σ) ε̂(x, σ),     x' = x + (σ' − σ) Σ_k λ_k c_k ε̂(x_k, a_k s_k)

The K evaluations at the intermediate points are independent: they run as **one network call** on K stacked
copies of the batch, so an interval costs 2 sequential evaluations (1 with AFS, the analytical first ε̂ of AMED
§3.4) and 1 + K network passes. With K = 1, λ = 1 it is the sample-independent AMED-Solver (AMED Eq. 9; with
r = ½, c = a = 1, DPM-Solver-2's midpoint step). A step to σ' = 0 is x' = D(x, σ) (one evaluation, no table).

AdaSDE first raises the noise level, σ̂ = (1 + γ_i)σ and x̂ = x + √(σ̂² − σ²)·z (z from each image's own
generator), then takes the EPD step from (x̂, σ̂) to σ'; γ_i ∈ [γ_min, γ_max] is learned per step (0 on the
first), the rest of the table as EPD's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diffsamp.models.base import Denoiser
from diffsamp.samplers._util import Generator, StepInfo, append_dims, final_denoise_step, randn_like
from diffsamp.samplers.amed import StepStart, _amed_nfe, _bounded, check_grid, step_start
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.registry import Learned, Planning, register_sampler

Callback = Callable[[StepInfo], None] | None
EPD = tuple[Tensor, Tensor, Tensor, Tensor]  # r, c, a, λ: each (K,)


def initial_r(num_points: int) -> Tensor:
    """The untrained points: r_k = k/(K+1), k = 1…K, spread evenly in log σ over the interval (r = ½ for K = 1)."""
    r = torch.arange(1, num_points + 1, dtype=torch.float64) / (num_points + 1)
    return torch.log(r / (1 - r)).float()


class EpdTable(nn.Module):
    """The EPD parameters of every interval (EPD Eq. 9): logits (steps, K, 4) of r (sigmoid), c and a (bounded to
    [1 − scale, 1 + scale], AMED Eq. 11's heads) and λ (softmax over the K points). No features: it works on any
    model. Untrained: r_k = k/(K+1), c = a = 1, λ_k = 1/K."""

    feature_dim: int | None = None

    def __init__(self, num_steps: int, num_points: int = 2, *, scale_dir: float = 0.01, scale_time: float = 0.0) -> None:
        super().__init__()
        if num_steps < 1 or num_points < 1:
            raise ValueError(f"an EPD table needs ≥ 1 step and ≥ 1 point, got {num_steps} steps, {num_points} points")
        self.num_steps, self.num_points = int(num_steps), int(num_points)
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        logits = torch.zeros(self.num_steps, self.num_points, 4)
        logits[:, :, 0] = initial_r(self.num_points)
        self.logits = nn.Parameter(logits)

    def forward(self, step: int) -> EPD:
        """(r, c, a, λ) of interval ``step``, each (K,)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"this EPD table has {self.num_steps} steps, asked for step {step}")
        lg = self.logits[step]
        return (torch.sigmoid(lg[:, 0]), _bounded(lg[:, 1], self.scale_dir), _bounded(lg[:, 2], self.scale_time),
                torch.softmax(lg[:, 3], dim=0))


def point_directions(model: Denoiser, start: StepStart, s: float, s_next: float, r: Tensor, a: Tensor) -> Tensor:
    """ε̂(x_k, a_k s_k) at the points r (K,) of [σ, σ'], x_k = x + (s_k − σ) ε̂(x, σ): (K, B, …), from one network
    call on K stacked copies of the batch (EPD Eq. 7)."""
    x, d = start.x, start.d
    r, a = r.to(device=x.device, dtype=x.dtype), a.to(device=x.device, dtype=x.dtype)
    k, b = r.shape[0], x.shape[0]
    s_mid = s_next**r * s ** (1 - r)  # (K,)
    xs = x.unsqueeze(0) + append_dims(s_mid - s, x.ndim + 1) * d.unsqueeze(0)  # (K, B, …)
    denoised = model(xs.reshape(k * b, *x.shape[1:]), (a * s_mid).repeat_interleave(b)).reshape(xs.shape)
    return (xs - denoised) / append_dims(s_mid, x.ndim + 1)


def combine(start: StepStart, s: float, s_next: float, c: Tensor, lam: Tensor, d_mid: Tensor) -> Tensor:
    """x' = x + (σ' − σ) Σ_k λ_k c_k ε̂_k (EPD Eq. 9)."""
    x = start.x
    w = lam.to(device=x.device, dtype=x.dtype) * c.to(device=x.device, dtype=x.dtype)
    return x + (s_next - s) * (append_dims(w, x.ndim + 1) * d_mid).sum(0)


def epd_step(model: Denoiser, start: StepStart, i: int, s: float, s_next: float, table: EpdTable) -> Tensor:
    """One interval σ → σ' (EPD Eq. 7–9): the K intermediate points in one network call."""
    if s_next == 0.0:
        return start.denoised
    r, c, a, lam = table(i)
    return combine(start, s, s_next, c, lam, point_directions(model, start, s, s_next, r, a))


def epd_network_passes(grid: Grid, num_points: int, afs: bool) -> int:
    """Network passes per image of ``epd`` on ``grid``: 1 + K per interval, less the AFS step's first, and 1
    for a last step to σ = 0."""
    full = len(grid) - int(grid.ends_at_zero)
    return full * (1 + num_points) - int(afs) + int(grid.ends_at_zero)


class AdaSdeTable(EpdTable):
    """The EPD table plus one noise coefficient per step (AdaSDE): γ_i = γ_min + (γ_max − γ_min)·sigmoid(g_i),
    0 on the first step (the prior's noise is fresh). The authors' CIFAR-10 setting is γ ∈ [2e-4, 0.01]."""

    def __init__(self, num_steps: int, num_points: int = 2, *, scale_dir: float = 0.01, scale_time: float = 0.0,
                 gamma_max: float = 0.01, gamma_min: float = 2e-4) -> None:
        super().__init__(num_steps, num_points, scale_dir=scale_dir, scale_time=scale_time)
        if not 0 <= gamma_min <= gamma_max:
            raise ValueError(f"AdaSDE needs 0 ≤ γ_min ≤ γ_max, got {gamma_min}, {gamma_max}")
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.gamma_logits = nn.Parameter(torch.zeros(self.num_steps))

    def gamma(self, step: int) -> Tensor:
        """γ of interval ``step`` (a 0-d tensor; exactly 0 on the first)."""
        if step == 0:
            return self.gamma_logits.new_zeros(())
        return self.gamma_min + (self.gamma_max - self.gamma_min) * torch.sigmoid(self.gamma_logits[step])


def inject_noise(x: Tensor, s: float, gamma: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """(x̂, σ̂): σ̂ = (1 + γ)σ, x̂ = x + √(σ̂² − σ²)·noise (EDM Alg. 2 lines 4–6; AdaSDE's injection)."""
    s_hat = (1 + gamma.to(x.dtype)) * s
    return x + (s_hat**2 - s**2).clamp_min(0).sqrt() * noise, s_hat


def _check_table(predictor: Any, kind: type, sampler: str, label: str, grid: Grid) -> None:
    """A ValueError unless ``predictor`` is a ``kind`` table trained for ``grid``."""
    if not isinstance(predictor, kind):
        raise ValueError(f"{sampler} needs a trained {label} table: --predictor NAME_OR_PATH (`diffsamp train solver "
                         f"--method {sampler}`), or {kind.__name__}(steps, K) from Python")
    check_grid(predictor, grid)


@register_sampler("epd", kind="ode", nfe=_amed_nfe, planning=Planning(
    "time_uniform", learned=Learned("epd", ("heun", 3), table=True, final_step="zero")))
def epd(
    model: Denoiser, x: Tensor, grid: Grid, *, generator: Generator = None, callback: Callback = None,
    predictor: EpdTable | None = None, afs: bool = False, final_denoise: bool = False,
) -> Tensor:
    """EPD-Solver: x' = x + (σ' − σ) Σ_k λ_k c_k ε̂(x_k, a_k s_k), K points in one call (Zhu et al. 2025, Eq. 9)."""
    _check_table(predictor, EpdTable, "epd", "EPD", grid)
    for i, (s, s_next) in enumerate(grid.intervals()):
        start = step_start(model, x, s, afs=afs and i == 0, predictor=predictor)
        x = epd_step(model, start, i, s, s_next, predictor)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, start.denoised))
    return final_denoise_step(model, x, grid, final_denoise)


@register_sampler("adasde", kind="sde", nfe=_amed_nfe, planning=Planning(
    "time_uniform", learned=Learned("adasde", ("heun", 3), table=True, final_step="zero")))
def adasde(
    model: Denoiser, x: Tensor, grid: Grid, *, generator: Generator = None, callback: Callback = None,
    predictor: AdaSdeTable | None = None, afs: bool = False, final_denoise: bool = False,
) -> Tensor:
    """AdaSDE: σ̂ = (1 + γ_i)σ, x̂ = x + √(σ̂² − σ²)z, then the EPD step from (x̂, σ̂) (AdaSDE; EPD Eq. 9)."""
    _check_table(predictor, AdaSdeTable, "adasde", "AdaSDE", grid)
    for i, (s, s_next) in enumerate(grid.intervals()):
        if s_next == 0.0:
            start = step_start(model, x, s, afs=False, predictor=predictor)
            x = start.denoised
        else:
            gamma = predictor.gamma(i).detach()
            if float(gamma) > 0:
                x, s_hat_t = inject_noise(x, s, gamma, randn_like(x, generator))
                s = float(s_hat_t)
            start = step_start(model, x, s, afs=afs and i == 0, predictor=predictor)
            x = epd_step(model, start, i, s, s_next, predictor)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, start.denoised))
    return final_denoise_step(model, x, grid, final_denoise)
