"""Closed-form denoisers: test oracles and toy demos (CONTRIBUTING.md, Testing).

For data ~ N(μ, s²I) the posterior mean is D(x, σ) = (s² x + σ² μ)/(s² + σ²), and the PF-ODE
dx/dσ = (x − D)/σ has the exact solution x(σ) = μ + (x(σ₀) − μ)·√((s² + σ²)/(s² + σ₀²)).
For an isotropic Gaussian mixture Σ π_k N(μ_k, s_k² I) the denoiser is the posterior-weighted sum of the
components' denoisers, with weights ∝ π_k N(x; μ_k, (s_k² + σ²) I).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffsamp.models.base import DenoiserBase, Prior


class GaussianMixtureDenoiser(DenoiserBase):
    """Exact denoiser of an isotropic Gaussian mixture in d dimensions (x of shape (B, d) or (B, ...))."""

    prior: Prior = "ve"

    def __init__(
        self,
        means: Sequence[Sequence[float]] | Tensor,
        stds: Sequence[float] | Tensor,
        weights: Sequence[float] | Tensor | None = None,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (K, d), got shape {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        if self.stds.shape != (k,) or bool((self.stds <= 0).any()):
            raise ValueError(f"stds must be {k} positive numbers, got {self.stds.tolist()}")
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w <= 0).any()):
            raise ValueError(f"weights must be {k} positive numbers, got {w.tolist()}")
        self.weights = w / w.sum()
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        # AMED's per-sample feature: the posterior component weights, read by a hook on this module.
        self.feature_module: nn.Module | None = nn.Identity()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(d,): one point of the mixture."""
        return (self.dim,)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f"this mixture is {self.dim}-dimensional, got x of shape {tuple(x.shape)}")
        s2 = sigma.to(torch.float64).reshape(-1, 1) ** 2                     # (B, 1)
        var = self.stds.to(flat.device) ** 2 + s2                            # (B, K)
        mu = self.means.to(flat.device)
        sq = torch.cdist(flat, mu) ** 2                                      # (B, K)
        logp = torch.log(self.weights.to(flat.device)) - 0.5 * sq / var - 0.5 * self.dim * torch.log(var)
        post = torch.softmax(logp, dim=1)                                    # (B, K)
        if self.feature_module is not None:
            post = self.feature_module(post)
        comp_s2 = (self.stds.to(flat.device) ** 2)
        # per-component denoiser: (s_k² x + σ² μ_k)/(s_k² + σ²)
        coef_x = (post * comp_s2 / var).sum(1, keepdim=True)                 # (B, 1)
        coef_mu = post * s2 / var                                            # (B, K)
        out = coef_x * flat + coef_mu @ mu
        return out.reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact draws from the data distribution, float64 (n, d)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.stds[comp, None] * z

    def mean(self) -> Tensor:
        """E[x0] = Σ π_k μ_k."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x0] = Σ π_k (s_k² I + μ_k μ_kᵀ) − E[x0]E[x0]ᵀ."""
        m = self.mean()
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + torch.eye(self.dim, dtype=torch.float64) * (self.weights @ self.stds**2)
        return second - torch.outer(m, m)


class GaussianDenoiser(GaussianMixtureDenoiser):
    """Exact denoiser of N(μ, s² I), with the exact probability-flow ODE solution."""

    def __init__(self, mean: Sequence[float] | Tensor, std: float, **kwargs: float) -> None:
        super().__init__(torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1), [std], [1.0], **kwargs)
        self.mu = self.means[0]
        self.std = float(std)
        self.feature_module = None  # one component: no per-sample feature to read

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s2 = self.std**2
        sig2 = sigma.to(torch.float64).reshape((-1,) + (1,) * (x.ndim - 1)) ** 2
        mu = self.mu.reshape((1,) + tuple(x.shape[1:])) if self.mu.numel() == math.prod(x.shape[1:]) else None
        if mu is None:
            raise ValueError(f"this Gaussian is {self.dim}-dimensional, got x of shape {tuple(x.shape)}")
        return ((s2 * x.to(torch.float64) + sig2 * mu.to(x.device)) / (s2 + sig2)).to(x.dtype)

    def ode_solution(self, x_start: Tensor, sigma_start: float, sigma_end: float) -> Tensor:
        """Exact PF-ODE transport from σ_start to σ_end: μ + (x − μ)·√((s² + σ_e²)/(s² + σ_s²))."""
        mu = self.mu.reshape((1,) + tuple(x_start.shape[1:])).to(x_start.device)
        ratio = math.sqrt((self.std**2 + sigma_end**2) / (self.std**2 + sigma_start**2))
        return (mu + (x_start.to(torch.float64) - mu) * ratio).to(x_start.dtype)
