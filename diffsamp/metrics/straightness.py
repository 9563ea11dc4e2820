"""The RF paper's straightness of a model's probability-flow ODE (Liu et al. 2023, Eq. 3), measured in RF time."""

from __future__ import annotations

import torch
from torch import Tensor

from diffsamp.api import integrate
from diffsamp.models.base import Denoiser, prior_scale
from diffsamp.models.parameterization import T_MAX
from diffsamp.samplers import Grid, StepInfo


def straightness(
    model: Denoiser, z: Tensor, *, steps: int = 100, batch_size: int = 1000, device: str | torch.device | None = None
) -> dict[str, float]:
    """The RF paper's straightness S(Z) = ∫₀¹ E‖(Z₁ − Z₀) − Ż_t‖² dt of a model's ODE, with its Monte-Carlo error.

    The path is simulated with Euler in RF time (uniform t from t₀ to 0; t₀ = t_max for flows, or the model's
    σ_max mapped to t = σ/(1 + σ) for any other denoiser — any model's probability-flow ODE written in RF
    coordinates x_t = x̄/(1 + σ) has velocity dx_t/dt = ε̂ − x̂0). Time is rescaled to unit length: with
    Δ = x_{t₀} − x_0 the straight displacement per unit time is Δ/t₀, the velocity is ż = v, and
    S_i = (1/N) Σ_k ‖Δ_i/t₀ − v(x_{t_k}, t_k)‖² (rectangle rule at the Euler nodes, where Σ_k v_k t₀/N = Δ
    exactly, so S_i is the spread of the velocity along path i). Reports S = mean_i S_i (sum over coordinates),
    its standard error, S per coordinate, and S relative to E‖Δ/t₀‖² (0 for straight paths).
    ``z``: source draws (N, *shape); the start is x̄ = prior_scale(prior, σ₀)·z.
    """
    sigma0 = float(model.sigma_max)
    t0 = min(T_MAX, sigma0 / (1 + sigma0))
    t = t0 * (1 - torch.arange(steps + 1, dtype=torch.float64) / steps)
    grid = Grid(t / (1 - t))  # uniform in t, ending at t = 0 (σ = 0)
    s0 = float(grid.sigmas[0])
    device = model.device if device is None else device
    per_sample, disp_norm = [], []
    for b in range(0, z.shape[0], batch_size):
        vs: list[Tensor] = []
        prev: list[Tensor] = []

        def record(info: StepInfo) -> None:  # v = ε̂ − x̂0 at the step's start x_t = x̄/(1 + σ)
            x = prev[-1]
            vs.append(((x - info.denoised) / info.sigma - info.denoised).flatten(1).double().cpu())
            prev.append(info.x)

        zb = z[b : b + batch_size]
        prev.append(zb.to(device=device, dtype=torch.float32) * prior_scale(model.prior, s0))  # as integrate starts
        x_start = prev[0] / (1 + s0)
        x_end, _ = integrate(model, zb, sampler="euler", grid=grid, device=device, dtype=torch.float32,
                             callback=record)  # σ = 0 at the end: x̄ = x_0
        disp = (x_start - x_end.to(x_start.device)).flatten(1).double().cpu() / t0
        dev = torch.stack([((disp - v) ** 2).sum(1) for v in vs], dim=0).mean(0)
        per_sample.append(dev)
        disp_norm.append((disp**2).sum(1))
    s_i = torch.cat(per_sample)
    d_i = torch.cat(disp_norm)
    n, dim = s_i.numel(), int(z[0].numel())
    mean, err = float(s_i.mean()), float(s_i.std(unbiased=True) / n**0.5) if n > 1 else float("nan")
    return {"S": mean, "S_err": err, "S_per_dim": mean / dim, "S_per_dim_err": err / dim,
            "relative": mean / float(d_i.mean()), "transport_cost": float(d_i.mean()) * t0 * t0,
            "num": n, "steps": steps, "t0": t0, "dim": dim}
