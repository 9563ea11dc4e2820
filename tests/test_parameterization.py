"""Every conversion round-trips in float64, and the formulas match their definitions."""

import torch

from diffsamp.models import parameterization as P


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(64, 3, generator=g, dtype=torch.float64)
    sigma = torch.exp(torch.empty(64, 1, dtype=torch.float64).uniform_(-5, 5, generator=g))
    return x0, eps, sigma, x0 + sigma * eps


def test_eps_x0_round_trip():
    x0, eps, sigma, xbar = _data()
    assert torch.allclose(P.x0_from_eps(xbar, eps, sigma), x0, atol=1e-12 * 150)
    assert torch.allclose(P.eps_from_x0(xbar, x0, sigma), eps, rtol=1e-9, atol=1e-9)


def test_v_prediction_matches_definition_and_round_trips():
    x0, eps, sigma, xbar = _data(1)
    a, b = 1 / torch.sqrt(1 + sigma**2), sigma / torch.sqrt(1 + sigma**2)  # √ᾱ, √(1−ᾱ)
    v_def = a * eps - b * x0
    assert torch.allclose(P.v_from_x0(xbar, x0, sigma), v_def, rtol=1e-9, atol=1e-9)
    assert torch.allclose(P.x0_from_v(xbar, v_def, sigma), x0, rtol=1e-9, atol=1e-9)


def test_rf_velocity_matches_straight_path_and_round_trips():
    x0, eps, sigma, xbar = _data(2)
    t = P.rf_t_from_sigma(sigma)
    x_t = (1 - t) * x0 + t * eps  # the straight path, t=0 data, t=1 noise
    assert torch.allclose(xbar / (1 + sigma), x_t, rtol=1e-12, atol=1e-12)
    v = eps - x0
    assert torch.allclose(P.velocity_from_x0(xbar, x0, sigma), v, rtol=1e-9, atol=1e-9)
    assert torch.allclose(P.x0_from_velocity(xbar, v, sigma), x0, rtol=1e-9, atol=1e-9)
    assert torch.allclose(P.rf_sigma_from_t(t), sigma, rtol=1e-12)


def test_vp_sde_sigma_t_round_trip():
    t = torch.linspace(1e-3, 1, 101, dtype=torch.float64)
    assert torch.allclose(P.vp_sde_t(P.vp_sde_sigma(t)), t, rtol=1e-12, atol=1e-12)
    # Score-SDE Eq. 11 (VP, β ∈ [0.1, 20]): σ(1) = 152.2 and σ(1e-3) = 0.0105
    assert abs(float(P.vp_sde_sigma(torch.tensor(1.0, dtype=torch.float64))) - 152.2) < 0.1


def test_ddpm_timestep_sigma_round_trip_and_linear_schedule_values():
    ac = P.ddpm_alphas_cumprod()
    sig = ((1 - ac) / ac).sqrt()
    assert abs(float(sig[-1]) - 157.4) < 0.1 and abs(float(sig[0]) - 0.0100) < 1e-4  # Ho et al. 2020 §4
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    back = P.ddpm_timestep_from_sigma(P.sigma_from_ddpm_timestep(t, ac), ac)
    assert torch.allclose(back, t, atol=1e-9)
    exact = P.ddpm_timestep_from_sigma(sig[[0, 10, 999]], ac)
    assert exact.tolist() == [0.0, 10.0, 999.0]
    assert P.ddpm_timestep_from_sigma(sig[[3]] * 1.01, ac, quantize=True).tolist() == [3.0]


def test_ddpm_timesteps_cpu_fast_path_equals_the_tensor_path():
    """The model-held lookup: numpy on the CPU, tensor ops where σ needs a gradient (or lives on a GPU) — equal,
    exact integers on the table's σ's, ends clamped, quantized to the nearest step."""
    ac = P.ddpm_alphas_cumprod().double()
    table = P.DdpmTimesteps(ac)
    sig = ((1 - ac) / ac).sqrt()
    g = torch.Generator().manual_seed(0)
    probe = torch.cat([torch.exp(torch.empty(500, dtype=torch.float64).uniform_(-6, 6, generator=g)), sig,
                       torch.tensor([0.0, 1e-9, 1e9], dtype=torch.float64)])
    for quantize in (False, True):
        fast = table(probe, quantize=quantize)
        graph = table(probe.clone().requires_grad_(), quantize=quantize).detach()
        assert torch.allclose(fast, graph, rtol=0, atol=1e-9)
        assert fast[500:1500].tolist() == list(range(1000))
        assert fast[-3:].tolist() == [0.0, 0.0, 999.0]
    t = table(probe[:500])
    lo = t.floor().long().clamp(max=998)
    inside = (probe[:500] > sig[0]) & (probe[:500] < sig[-1])
    want = lo + (probe[:500].log() - sig[lo].log()) / (sig[lo + 1].log() - sig[lo].log())  # the interpolation itself
    assert torch.allclose(t[inside], want[inside], atol=1e-9)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):  # any σ dtype a network runs in
        low = probe[:500].to(dtype)
        assert table(low).dtype == torch.float64
        torch.testing.assert_close(table(low), table(low.clone().requires_grad_(True)).detach(), rtol=0, atol=1e-9)
