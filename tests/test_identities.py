"""Exact identities between samplers (CONTRIBUTING.md, Testing; AMED Table 1, DDIM Eq. 12)."""

import math

import pytest
import torch

import diffsamp
from diffsamp.models.parameterization import ddpm_alphas_cumprod
from diffsamp.samplers.grid import DDPMSchedule


def _x(model, grid, seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.dim, generator=g, dtype=torch.float64) * float(grid.sigmas[0])


@pytest.mark.parametrize("final_zero", [True, False])
def test_ddim_eta0_equals_euler(mixture2d, final_zero):
    grid = diffsamp.get_schedule("karras", model=mixture2d).grid(12, final_zero=final_zero)
    x = _x(mixture2d, grid)
    a = diffsamp.get_sampler("ddim")(mixture2d, x, grid)
    b = diffsamp.get_sampler("euler")(mixture2d, x, grid)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_dpm2_r1_equals_heun_on_grid_ending_above_zero(mixture2d):
    grid = diffsamp.get_schedule("logsnr", model=mixture2d).grid(9, final_zero=False)
    x = _x(mixture2d, grid)
    a = diffsamp.get_sampler("dpm2")(mixture2d, x, grid, r=1.0)
    b = diffsamp.get_sampler("heun")(mixture2d, x, grid)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_euler_maruyama_gamma0_equals_euler(mixture2d):
    grid = diffsamp.get_schedule("karras", model=mixture2d).grid(10)
    x = _x(mixture2d, grid)
    a = diffsamp.get_sampler("euler_maruyama")(mixture2d, x, grid, gamma=0.0)
    b = diffsamp.get_sampler("euler")(mixture2d, x, grid)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_sigma_space_ddpm_equals_native_ddpm_update(mixture2d, variance):
    """DDPM Algorithm 2 in native x_t with ε_θ and both variance choices == our σ-space ``ddpm``."""
    ac = ddpm_alphas_cumprod()  # linear β 1e-4 … 0.02, T = 1000
    T = len(ac)
    betas = 1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])

    def eps_model(x_t, t):  # the mixture's exact ε-prediction in native VP coordinates
        sigma = math.sqrt((1 - float(ac[t])) / float(ac[t]))
        xbar = x_t / math.sqrt(float(ac[t]))
        den = mixture2d(xbar, torch.full((len(x_t),), sigma, dtype=torch.float64))
        return (xbar - den) / sigma

    g = torch.Generator().manual_seed(7)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    x = z.clone()
    for t in range(T - 1, -1, -1):  # paper's t = T … 1 is index T−1 … 0
        alpha_t = 1 - float(betas[t])
        mean = (x - float(betas[t]) / math.sqrt(1 - float(ac[t])) * eps_model(x, t)) / math.sqrt(alpha_t)
        if t > 0:
            var = float(betas[t]) if variance == "beta" else (1 - float(ac[t - 1])) / (1 - float(ac[t])) * float(betas[t])
            x = mean + math.sqrt(var) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        else:
            x = mean
    native = x

    grid = DDPMSchedule(ac).grid(T)
    g = torch.Generator().manual_seed(7)
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    ours = diffsamp.get_sampler("ddpm")(mixture2d, z * math.sqrt(1 + float(grid.sigmas[0]) ** 2), grid, generator=g, variance=variance)
    assert torch.allclose(ours, native, rtol=1e-9, atol=1e-9)
