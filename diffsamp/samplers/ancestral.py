"""DDPM ancestral sampling and DDIM(η) as one σ-space step (DDPM Alg. 2; DDIM Eq. 12, 16).

With ε̂ = (x̄ − D)/σ, one step σ → σ' is x̄' = D + √(σ'² − ς²)·ε̂ + ς·z, where
  ς = η·(σ'/σ)·√(σ² − σ'²)   (DDIM's σ_t(η) rescaled to σ-space; η = 1 is DDPM with β̃_t), or
  ς = √((1+σ'²)(σ² − σ'²)/(1+σ²)) with mean D + (σ'²/σ)·ε̂   (DDPM with σ_t² = β_t, 'beta' variance).
No noise is added on the step to σ = 0 (DDPM Algorithm 2 sets z = 0 at t = 1). This is the DDPM reverse
process read as a hierarchical VAE decoder: each step samples the Gaussian p(x_{t−1} | x_t) whose mean is
the posterior mean q(x_{t−1} | x_t, x̂0) (Ho et al. 2020, Eq. 6–7, §3.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from torch import Tensor

from diffsamp.models.base import Denoiser
from diffsamp.samplers._util import Generator, StepInfo, randn_like, sigma_batch
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.registry import KnobRange, register_alias, register_sampler


def ancestral_coefficients(
    sigma: float, sigma_next: float, eta: float, variance: Literal["posterior", "beta"] = "posterior"
) -> tuple[float, float]:
    """(c_eps, ς): the step is x̄' = D + c_eps·ε̂ + ς·z (DDIM Eq. 12 and 16 in σ-space)."""
    if sigma_next == 0.0:
        return 0.0, 0.0
    if variance == "beta":
        noise = math.sqrt((1 + sigma_next**2) * (sigma**2 - sigma_next**2) / (1 + sigma**2))
        return sigma_next**2 / sigma, noise
    if variance != "posterior":
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    noise = eta * (sigma_next / sigma) * math.sqrt(sigma**2 - sigma_next**2)
    return math.sqrt(max(sigma_next**2 - noise**2, 0.0)), noise


@register_sampler("ancestral", kind="sde", nfe=lambda grid, knobs: len(grid), ranges={"eta": KnobRange(0, 1)})
def ancestral(
    model: Denoiser,
    x: Tensor,
    grid: Grid,
    *,
    generator: Generator = None,
    callback: Callable[[StepInfo], None] | None = None,
    eta: float = 1.0,
    variance: Literal["posterior", "beta"] = "posterior",
) -> Tensor:
    """DDIM(η) / DDPM ancestral in σ-space (Ho et al. 2020 Alg. 2; Song et al. 2021 DDIM Eq. 12, 16).

    η = 0 is deterministic DDIM (= Euler), η = 1 with variance="posterior" is DDPM with β̃_t;
    variance="beta" is DDPM with σ_t² = β_t (DDIM's σ̂). NFE = len(grid).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    for i, (s, s_next) in enumerate(grid.intervals()):
        denoised = model(x, sigma_batch(x, s))
        c_eps, noise = ancestral_coefficients(s, s_next, eta, variance)
        x = (x - denoised).mul_(c_eps / s).add_(denoised)  # D + (c_eps/σ)·(x̄ − D), one allocation; no FMA
        if noise > 0:
            x = x + noise * randn_like(x, generator)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, denoised))
    return x


register_alias("ddpm", "ancestral", description="DDPM ancestral sampling (η=1; knob variance=posterior|beta)", eta=1.0)
register_alias("ddim", "ancestral", description="DDIM (η=0 deterministic; knob eta ∈ [0,1])", kind="ode", eta=0.0)
