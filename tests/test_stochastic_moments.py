"""Stochastic samplers reproduce the 2-D mixture's mean and covariance within a stated band.

Band per entry: 4 standard errors of the estimate (mean: √(Var/N); covariance entry (i,j):
√((Σ_ii Σ_jj + Σ_ij²)/N), the Gaussian approximation) plus a discretisation allowance of 0.03.
"""

import pytest
import torch

import diffsamp
from diffsamp.models.analytic import GaussianMixtureDenoiser

N = 20000


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixtureDenoiser(
        [[-1.5, 0.3], [1.0, 1.0], [0.5, -1.2]], [0.4, 0.6, 0.3], [0.3, 0.4, 0.3], sigma_min=0.01, sigma_max=40.0
    )


@pytest.mark.parametrize(
    "name,knobs,steps",
    [
        ("ddpm", {}, 200),
        ("ddpm", {"variance": "beta"}, 200),
        ("ddim", {"eta": 1.0}, 200),
        ("euler_maruyama", {}, 400),
        ("euler_maruyama", {"gamma": 0.5}, 200),
        ("pc", {"snr": 0.1}, 200),
    ],
)
def test_moments(mixture, name, knobs, steps):
    g = torch.Generator().manual_seed(123)
    grid = diffsamp.get_schedule("karras", model=mixture).grid(steps)
    x = torch.randn(N, 2, generator=g, dtype=torch.float64) * float(grid.sigmas[0])
    out = diffsamp.get_sampler(name)(mixture, x, grid, generator=g, **knobs)
    mean, cov = mixture.mean(), mixture.covariance()
    est_mean, est_cov = out.mean(0), torch.cov(out.T)
    se_mean = (torch.diag(cov) / N).sqrt()
    se_cov = ((torch.outer(torch.diag(cov), torch.diag(cov)) + cov**2) / N).sqrt()
    assert ((est_mean - mean).abs() < 4 * se_mean + 0.03).all(), f"{name}: mean {est_mean} vs {mean}"
    assert ((est_cov - cov).abs() < 4 * se_cov + 0.03).all(), f"{name}: cov {est_cov} vs {cov}"


def test_band_is_tight_enough_to_fail(mixture):
    """A sampler that drops the noise entirely (η=0 started from the same noise) must stay inside the band
    (it is an exact-marginal ODE), but a biased one (γ-family drift without noise) must fall outside."""
    g = torch.Generator().manual_seed(5)
    grid = diffsamp.get_schedule("karras", model=mixture).grid(200)
    x = torch.randn(N, 2, generator=g, dtype=torch.float64) * float(grid.sigmas[0])
    # Reverse-SDE drift (factor 2) without its noise: collapses the spread, so the covariance is wrong.
    from diffsamp.samplers._util import sigma_batch, to_d

    y = x
    for s, s_next in grid.intervals():
        den = mixture(y, sigma_batch(y, s))
        y = den if s_next == 0 else y + 2 * (s_next - s) * to_d(y, s, den)
    cov = mixture.covariance()
    se_cov = ((torch.outer(torch.diag(cov), torch.diag(cov)) + cov**2) / N).sqrt()
    assert not ((torch.cov(y.T) - cov).abs() < 4 * se_cov + 0.03).all()
