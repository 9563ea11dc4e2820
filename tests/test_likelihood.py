"""Likelihood oracles (DDPM variational bound, ODE likelihood) on closed-form Gaussian and mixture models.

For data N(μ, s²I) and the exact denoiser, the expected bound is closed form: with σ_k the chain's noise
levels, E‖x0 − x̂0‖² = d·s²σ²/(s² + σ²) per step, so E[ELBO] = L_T + Σ_k ½(…) + decoder can be computed
independently of the library; it is ≥ the entropy ½d·log(2πe s²) and, with σ_k² = β_k, tends to it like 1/T.
(With σ_k² = β̃_k it does not: near t = 1 the linear schedule's steps are never small relative to σ², where
the exact reverse variance of smooth data is β_k, so that gap stays ≈ 0.5 nats/dim.)
"""

from __future__ import annotations

import math

import pytest
import torch

from diffsamp.models.base import DenoiserBase

from diffsamp.metrics.likelihood import (
    chain_coefficients,
    chain_timesteps,
    discretized_gaussian_log_likelihood,
    elbo,
    gaussian_kl,
    model_alphas_cumprod,
    ode_nll,
)
from diffsamp.models.analytic import GaussianDenoiser, GaussianMixtureDenoiser

MU = [0.5, -1.0]
S = 0.7


def vp_table(T: int) -> torch.Tensor:
    """ᾱ_t = exp(−(0.1u + 9.95u²)), u = t/T: DDPM's linear β schedule in its T → ∞ form (any T)."""
    u = torch.arange(1, T + 1, dtype=torch.float64) / T
    return torch.exp(-(0.1 * u + 9.95 * u**2))


def expected_gaussian_bound(table: torch.Tensor, variance: str, d: int, steps: int | None = None) -> float:
    """E over x0 ~ N(μ, s²) and the chain of the bound (nats), written out independently of the library."""
    ts = chain_timesteps(table, steps)  # which τ's: the library's choice; everything after is written out here
    a = table[ts - 1]
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    beta = 1 - a / a_prev
    bt = (1 - a_prev) * beta / (1 - a)
    var = beta.clone() if variance == "beta" else torch.cat([bt[1:2], bt[1:]])
    sig2 = (1 - a) / a
    mse = S**2 * sig2 / (S**2 + sig2)
    c0sq = a_prev * beta**2 / (1 - a) ** 2
    kl = 0.5 * (bt / var - 1 - torch.log(bt / var) + c0sq * mse / var)[1:].sum()
    dec = 0.5 * (math.log(2 * math.pi * float(var[0])) + float(mse[0] / var[0]))
    aT = float(a[-1])
    mu2 = sum(m * m for m in MU) / len(MU)
    prior = 0.5 * ((1 - aT) + aT * (S**2 + mu2) - 1 - math.log(1 - aT))
    return d * (float(kl) + dec + prior)


def gaussian_entropy(d: int) -> float:
    return 0.5 * d * math.log(2 * math.pi * math.e * S**2)


@pytest.fixture(scope="module")
def gauss_data():
    g = GaussianDenoiser(MU, S, sigma_min=0.002, sigma_max=80.0)
    x0 = g.sample(600, torch.Generator().manual_seed(1))
    nll = -(-0.5 * ((x0 - g.mu) ** 2).sum(1) / S**2 - 0.5 * len(MU) * math.log(2 * math.pi * S**2))
    return g, x0, nll


# ------------------------------------------------------------------------------------------ the pieces
def test_discretised_decoder_integrates_to_one_over_the_256_bins():
    values = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]
    means = torch.tensor([-1.3, -1.0, -0.31, 0.0, 0.5, 1.0, 1.2], dtype=torch.float64)
    for std in (1e-4, 3e-3, 0.05, 0.5, 3.0):
        logp = discretized_gaussian_log_likelihood(values.expand(256, len(means)), means.expand(256, len(means)), std)
        assert bool(torch.isfinite(logp).all() | (logp == -math.inf).all())
        total = torch.logsumexp(logp, dim=0).exp()
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-9, rtol=0)
    # the central bin of a narrow Gaussian holds (almost) all its mass; the edge bins reach to ∓∞
    assert float(discretized_gaussian_log_likelihood(torch.tensor([0.0]), torch.tensor([0.0]), 1e-4)) > -1e-12
    assert float(discretized_gaussian_log_likelihood(torch.tensor([-1.0]), torch.tensor([-5.0]), 0.1)) > -1e-12


def test_kl_of_the_exact_posterior_is_zero_and_positive_for_beta(gauss_data):
    """A 'model' whose x̂0 is the true x0 has p(x_{t−1} | x_t) = q(x_{t−1} | x_t, x0) with σ² = β̃: every KL is 0."""
    _, x0, _ = gauss_data
    x0 = x0[:16]

    class Oracle(DenoiserBase):
        prior, sigma_min, sigma_max, feature_module = "vp", 0.01, 100.0, None
        alphas_cumprod = vp_table(50)

        def __call__(self, x, sigma):
            return x0.to(x.dtype)

    post = elbo(Oracle(), x0, alphas_cumprod=Oracle.alphas_cumprod, variance="posterior", batch_size=16)
    assert float(post.kl_nats.abs().max()) < 1e-10
    assert bool((post.per_step_bpd[1:].abs() < 1e-12).all())
    beta = elbo(Oracle(), x0, alphas_cumprod=Oracle.alphas_cumprod, variance="beta", batch_size=16)
    c = chain_coefficients(Oracle.alphas_cumprod, chain_timesteps(Oracle.alphas_cumprod))
    r = (c.beta_tilde / c.beta)[1:]
    torch.testing.assert_close(beta.kl_nats, torch.full((16,), float(2 * 0.5 * (r - 1 - r.log()).sum()),
                                                        dtype=torch.float64))
    assert float(gaussian_kl(torch.tensor(0.3), 0.2, torch.tensor(0.3), 0.2)) == 0.0


@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_decoder_of_a_perfect_denoiser_is_the_central_bin(variance):
    """x̂0 = x0: L_0 = −log P(|N(0, s²)| < half a bin) per value, s² = β̃_2 (Ho et al.'s clipped β̃_1) or β_1."""
    table = vp_table(50)
    images = torch.full((3, 1, 2, 2), 128, dtype=torch.uint8)
    x0 = images.double() / 127.5 - 1

    class Oracle(DenoiserBase):
        prior, sigma_min, sigma_max, feature_module = "vp", 0.01, 100.0, None
        alphas_cumprod = table

        def __call__(self, x, sigma):
            return x0[: x.shape[0]].to(x.dtype)

    beta1 = 1 - float(table[0])
    beta2 = 1 - float(table[1] / table[0])
    var = beta1 * beta2 / (1 - float(table[1])) if variance == "posterior" else beta1
    half = 1 / 255
    expected = -4 * math.log(math.erf(half / math.sqrt(2 * var)))
    res = elbo(Oracle(), images, alphas_cumprod=table, variance=variance, batch_size=3)
    torch.testing.assert_close(res.decoder_nats, torch.full((3,), expected, dtype=torch.float64))


def test_strided_chain_keeps_both_ends_and_the_full_chain_is_ddpm():
    ac = vp_table(1000)
    ts = chain_timesteps(ac, 10)
    assert ts[0] == 1 and ts[-1] == 1000 and len(ts) == 10 and bool((ts[1:] > ts[:-1]).all())
    c = chain_coefficients(ac, chain_timesteps(ac))
    betas = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
    torch.testing.assert_close(c.beta, betas)
    torch.testing.assert_close(c.beta_tilde[1:], (1 - ac[:-1]) / (1 - ac[1:]) * betas[1:])


# ------------------------------------------------------------------------------------------ ELBO oracles
@pytest.mark.parametrize("T", [10, 1000])
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_elbo_matches_the_closed_form_bound_and_bounds_the_nll(gauss_data, T, variance):
    g, x0, nll = gauss_data
    res = elbo(g, x0, alphas_cumprod=vp_table(T), variance=variance, batch_size=600)
    gap = res.nats - nll
    se = float(gap.std() / math.sqrt(len(gap)))
    expected = expected_gaussian_bound(vp_table(T), variance, len(MU)) - gaussian_entropy(len(MU))
    # the sample entropy differs from the true one: compare like with like (the gap, paired per image)
    assert abs(float(gap.mean()) - expected) < 4 * se + 0.02
    assert float(gap.mean()) > -3 * se  # the bound is above the NLL


def test_elbo_tends_to_the_nll_as_steps_grow():
    gaps = [expected_gaussian_bound(vp_table(T), "beta", 2) - gaussian_entropy(2) for T in (10, 100, 1000, 10000)]
    assert all(g > 0 for g in gaps)
    assert all(b < 0.4 * a for a, b in zip(gaps, gaps[1:]))  # ~ 1/T
    assert gaps[-1] < 1e-4


def test_importance_sampled_elbo_is_unbiased(gauss_data):
    g, x0, _ = gauss_data
    ac = vp_table(200)
    exact = elbo(g, x0, alphas_cumprod=ac, variance="beta", batch_size=600)
    est = elbo(g, x0, alphas_cumprod=ac, variance="beta", t_samples=8, batch_size=600, seed=7)
    assert est.method == "importance" and est.nfe == 9
    diff = est.nats - exact.nats
    se = float(diff.std() / math.sqrt(len(diff)))
    assert abs(float(diff.mean())) < 4 * se
    torch.testing.assert_close(est.prior_nats, exact.prior_nats)


def test_strided_bound_is_looser(gauss_data):
    g, x0, _ = gauss_data
    ac = vp_table(1000)
    full = elbo(g, x0[:200], alphas_cumprod=ac, variance="beta", batch_size=200, t_samples=20)
    short = elbo(g, x0[:200], alphas_cumprod=ac, variance="beta", steps=5, batch_size=200)
    assert len(short.timesteps) == 5 and short.nfe == 5
    expected_short = expected_gaussian_bound(ac, "beta", 2, steps=5)
    assert abs(float(short.nats.mean()) - expected_short) < 4 * float(short.nats.std() / math.sqrt(200)) + 0.05
    assert float(short.nats.mean()) > float(full.nats.mean()) + 0.1


def test_elbo_is_batch_size_free_and_uses_the_unclipped_network(one_thread):
    from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
    from diffsamp.models.parameterization import ddpm_alphas_cumprod
    from tests.conftest import tiny_unet

    unet = tiny_unet(8)
    ac = ddpm_alphas_cumprod(num_steps=20)
    clipped = DiffusersUNetDenoiser(unet, ac, clip_sample=1.0)
    plain = DiffusersUNetDenoiser(unet, ac)
    images = torch.randint(0, 256, (5, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a = elbo(clipped, images, batch_size=5)
    b = elbo(plain, images, batch_size=2)
    torch.testing.assert_close(a.nats, b.nats, rtol=1e-6, atol=1e-6)
    assert clipped.clip_sample == 1.0  # the caller's model is left as it was
    torch.testing.assert_close(model_alphas_cumprod(plain), ac)
    with pytest.raises(ValueError, match="no discrete DDPM"):
        elbo(GaussianDenoiser(MU, S), torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------ ODE oracles
def _gauss_logp(x: torch.Tensor, sigma_min: float) -> torch.Tensor:
    var = S**2 + sigma_min**2
    mu = torch.tensor(MU, dtype=torch.float64)
    return -0.5 * ((x - mu) ** 2).sum(1) / var - 0.5 * len(MU) * math.log(2 * math.pi * var)


@pytest.mark.parametrize("prior,sigma_max", [("ve", 80.0), ("vp", 80.0), ("rf", 999.0)])
def test_ode_likelihood_of_the_gaussian(gauss_data, prior, sigma_max):
    """The same density whichever prior (and so whichever O(1) state y = x̄/s(σ)) the model declares."""
    _, x0, _ = gauss_data
    g = GaussianDenoiser(MU, S, sigma_min=0.002, sigma_max=sigma_max)
    g.prior = prior
    res = ode_nll(g, x0[:200], probes=1, batch_size=200)
    err = res.nats + _gauss_logp(x0[:200], g.sigma_min)
    assert abs(float(err.mean())) < 0.01 and float(err.abs().max()) < 0.1  # the Gaussian's Jacobian is c·I
    assert res.nfe > 10 and res.dims == 2


def test_ode_likelihood_of_the_mixture_within_its_error():
    m = GaussianMixtureDenoiser([[-1.5, 0.3], [1.0, 1.0], [0.5, -1.2]], [0.4, 0.6, 0.3], [0.3, 0.4, 0.3],
                                sigma_min=0.002, sigma_max=80.0)
    x = m.sample(300, torch.Generator().manual_seed(2))
    var = m.stds**2 + m.sigma_min**2
    logp = torch.logsumexp(torch.log(m.weights) - 0.5 * torch.cdist(x, m.means) ** 2 / var
                           - math.log(2 * math.pi) - torch.log(var), dim=1)
    hutch = ode_nll(m, x, probes=1, batch_size=300)
    err = hutch.nats + logp
    se = float(err.std() / math.sqrt(len(err)))
    assert se > 1e-3  # Hutchinson's noise is there
    assert abs(float(err.mean())) < 4 * se
    exact = ode_nll(m, x[:100], probes=None, batch_size=100)
    assert float((exact.nats + logp[:100]).abs().max()) < 0.02


def test_ode_on_8bit_data_dequantises_and_adds_the_bin_log_det():
    """uint8 data: x + u, u uniform over the 2/255 bin; NLL_8bit = −log p(x + u) − d·log(2/255).

    The Gaussian is narrow (s = 0.006, under a bin width), so dequantisation shows: E_u of −log p(x + u)
    exceeds −log p(x) by d·w²/(24 var)."""
    mean = [0.1, -0.2, 0.3, 0.0]
    g = GaussianDenoiser(mean, 0.006, sigma_min=0.002, sigma_max=80.0)
    x = g.sample(1024, torch.Generator().manual_seed(3))
    y = ((x + 1) * 127.5).round().to(torch.uint8).reshape(1024, 1, 2, 2)
    res = ode_nll(g, y, batch_size=1024)
    centre = y.reshape(1024, 4).double() / 127.5 - 1
    var, w = 0.006**2 + 0.002**2, 2 / 255
    sq = ((centre - torch.tensor(mean, dtype=torch.float64)) ** 2).sum(1) + 4 * w**2 / 12
    expected = 0.5 * sq / var + 2 * math.log(2 * math.pi * var) - 4 * math.log(w)
    diff = res.nats - expected
    se = float(diff.std() / math.sqrt(len(diff)))
    assert abs(float(diff.mean())) < 4 * se + 0.01
    assert 4 * w**2 / 24 / var > 8 * se  # the dequantisation term is resolved
    bpd, bpd_se = res.bits_per_dim()
    assert bpd == pytest.approx(float(expected.mean()) / (4 * math.log(2)), abs=0.05) and bpd_se > 0


def test_ode_rejects_bad_arguments(gauss_data):
    g, x0, _ = gauss_data
    with pytest.raises(ValueError, match="probes"):
        ode_nll(g, x0[:2], probes=0)
    with pytest.raises(ValueError, match="sigma_min"):
        ode_nll(g, x0[:2], sigma_min=100.0)


def test_the_prior_term_against_the_closed_form_kl_on_a_chain_that_ends_at_a_large_alpha_bar(gauss_data):
    """L_T = KL(N(√ᾱ_T x0, (1 − ᾱ_T) I) ‖ N(0, I)) = ½ Σ_dims [ᾱ_T x0² + (1 − ᾱ_T) − 1 − log(1 − ᾱ_T)] per image
    (Ho et al. 2020, Eq. 5). The chain stops at ᾱ_T = 0.25, so L_T is a large part of the bound, not ~1e-5."""
    g, x0, nll = gauss_data
    table = torch.exp(torch.linspace(-0.01, math.log(0.25), 40, dtype=torch.float64))
    res = elbo(g, x0[:300], alphas_cumprod=table, variance="beta", batch_size=300)
    aT = 0.25
    prior = 0.5 * (aT * x0[:300] ** 2 + (1 - aT) - 1 - math.log(1 - aT)).sum(1)
    torch.testing.assert_close(res.prior_nats, prior, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.nats, res.prior_nats + res.kl_nats + res.decoder_nats, rtol=1e-12, atol=1e-12)
    assert float(prior.mean()) > 0.1 * float(res.nats.mean())
    gap = res.nats - nll[:300]
    expected = expected_gaussian_bound(table, "beta", len(MU)) - gaussian_entropy(len(MU))
    assert abs(float(gap.mean()) - expected) < 4 * float(gap.std() / math.sqrt(300)) + 0.01
    assert res.parts_bpd()["prior"] == pytest.approx(float(prior.mean()) / (2 * math.log(2)), rel=1e-12)


def test_bits_per_dim_and_its_standard_error_are_written_out(gauss_data):
    """bits/dim = mean_i nats_i/(d ln 2); its standard error = sample std (n − 1) / √n, over any dims."""
    g, x0, _ = gauss_data
    res = elbo(g, x0[:50], alphas_cumprod=vp_table(20), variance="beta", batch_size=50)
    for dims in (None, 7):
        b = res.nats / ((dims or 2) * math.log(2))
        se = math.sqrt(float(((b - b.mean()) ** 2).sum()) / 49) / math.sqrt(50)
        assert res.bits_per_dim(dims) == pytest.approx((float(b.mean()), se), rel=1e-12)
