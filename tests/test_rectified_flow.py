"""Rectified flow: the σ-space adapter, the RF paper's Euler update, losses, save/load, straightness."""

from __future__ import annotations

import json

import pytest
import torch

from diffsamp import generate, get_sampler, get_schedule
from diffsamp.models.analytic import GaussianMixtureDenoiser
from diffsamp.models.base import default_schedule, prior_scale
from diffsamp.models.parameterization import velocity_from_x0
from diffsamp.metrics.straightness import straightness
from diffsamp.models.networks import MLPVelocity
from diffsamp.models.rectified_flow import T_MAX, RFDenoiser, euler_rf_native, load_rf, save_rf
from diffsamp.models.zoo import load as load_model
from diffsamp.training.rectified_flow import RFLoss


def _mlp_model(seed: int = 0, dtype=torch.float64) -> RFDenoiser:
    torch.manual_seed(seed)
    return RFDenoiser(MLPVelocity(2, 32, 2).to(dtype).eval(), time_scale=1.0)


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_euler_on_rf_schedule_is_the_papers_euler(n):
    """euler on the rf grid == x_{t−Δ} = x_t − Δ·v(x_t, t) from x_{t_max} = z (RF paper §5.3, time reversed)."""
    model = _mlp_model()
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = get_schedule("rf").grid(n)
    x_sigma = get_sampler("euler")(model, z * prior_scale("rf", float(grid.sigmas[0])), grid)
    x_native = euler_rf_native(model, z, n)
    assert torch.allclose(x_sigma, x_native, rtol=0, atol=1e-12)
    # the rf grid is n equal steps in t from t_max to 0
    t = grid.sigmas / (1 + grid.sigmas)
    assert torch.allclose(t, T_MAX * (1 - torch.arange(n + 1, dtype=torch.float64) / n), atol=1e-15)


def test_euler_differs_from_a_wrong_sign_update():
    """The identity above is not vacuous: the paper's update with v_paper = +v (sign slip) gives other samples."""
    model = _mlp_model()
    z = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = get_schedule("rf").grid(4)
    x_sigma = get_sampler("euler")(model, z * prior_scale("rf", float(grid.sigmas[0])), grid)
    x, dt = z, T_MAX / 4
    for k in range(4):
        x = x + dt * model.velocity(x, torch.full((16,), T_MAX * (1 - k / 4), dtype=torch.float64))
    assert (x - x_sigma).abs().max() > 1e-3


def test_velocity_and_denoiser_are_consistent():
    """D(x̄, σ) = x_t − t·v and the velocity recovered from D is the network's output."""
    model = _mlp_model(3)
    g = torch.Generator().manual_seed(0)
    xbar = torch.randn(32, 2, dtype=torch.float64, generator=g) * 3
    sigma = torch.exp(torch.randn(32, dtype=torch.float64, generator=g) * 2)
    t = sigma / (1 + sigma)
    x_t = xbar / (1 + sigma[:, None])
    v = model.velocity(x_t, t)
    d = model(xbar, sigma)
    assert torch.allclose(d, x_t - t[:, None] * v, atol=1e-12)
    assert torch.allclose(velocity_from_x0(xbar, d, sigma[:, None]), v, atol=1e-9)


def test_exact_velocity_gives_the_exact_denoiser():
    """For x0 ~ N(μ, s²I), ε ~ N(0, I) the exact RF velocity makes D the exact posterior mean (CONTRIBUTING.md)."""
    mu, s = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.7

    class ExactVelocity(torch.nn.Module):
        def forward(self, x, t):
            t = t[:, None]
            a, b = 1 - t, t  # x_t = a x0 + b ε
            var = a * a * s * s + b * b
            x0_hat = mu + a * s * s * (x - a * mu) / var
            eps_hat = b * (x - a * mu) / var
            return eps_hat - x0_hat

    model = RFDenoiser(ExactVelocity(), time_scale=1.0)
    xbar = torch.randn(8, 2, dtype=torch.float64) * 2
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 20.0, 100.0], dtype=torch.float64)
    exact = (s * s * xbar + sigma[:, None] ** 2 * mu) / (s * s + sigma[:, None] ** 2)
    assert torch.allclose(model(xbar, sigma), exact, atol=1e-10)


def test_every_ode_sampler_runs_on_a_flow():
    model = _mlp_model(dtype=torch.float32)
    for name in ("euler", "heun", "dpm2", "dpmpp2m", "ipndm", "rk45"):
        res = generate(model, (2,), sampler=name, schedule="rf", steps=6, seeds=range(4))
        assert res.images.shape == (4, 2) and torch.isfinite(res.images).all()


def test_a_flow_samples_on_the_rf_grid_unless_told_otherwise():
    """generate() with no schedule: uniform RF time for a flow (the paper's Euler), karras for a diffusion model."""
    model = _mlp_model(dtype=torch.float64)
    default = generate(model, (2,), sampler="euler", steps=4, seeds=range(3))
    rf = generate(model, (2,), sampler="euler", schedule="rf", steps=4, seeds=range(3))
    karras = generate(model, (2,), sampler="euler", schedule="karras", steps=4, seeds=range(3))
    assert torch.equal(default.sigma_grid.sigmas, rf.sigma_grid.sigmas) and torch.equal(default.images, rf.images)
    assert not torch.allclose(default.sigma_grid.sigmas, karras.sigma_grid.sigmas)
    t = default.sigma_grid.sigmas[:-1] / (1 + default.sigma_grid.sigmas[:-1])
    assert torch.allclose(t, T_MAX * torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    gmm = GaussianMixtureDenoiser(means=[[0.0, 0.0]], stds=[1.0], weights=[1.0])
    assert default_schedule(gmm) == "karras" and default_schedule(model) == "rf"


def test_rk45_integrates_to_sigma_min_whatever_the_steps():
    """generate() gives an adaptive sampler the schedule's end points [σ_max, σ_min, 0]: on the rf schedule
    (whose n-step grid ends t_max/n → 0) steps=1 must not collapse rk45 into one Euler step."""
    model = _mlp_model(dtype=torch.float64)
    one = generate(model, (2,), sampler="rk45", schedule="rf", steps=1, seeds=range(8), rtol=1e-9, atol=1e-9)
    many = generate(model, (2,), sampler="rk45", schedule="rf", steps=50, seeds=range(8), rtol=1e-9, atol=1e-9)
    t = one.sigma_grid.sigmas / (1 + one.sigma_grid.sigmas)
    assert torch.allclose(t, torch.tensor([T_MAX, 1e-3, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(one.images, many.images, atol=1e-12) and one.nfe > 6
    euler1 = generate(model, (2,), sampler="euler", schedule="rf", steps=1, seeds=range(8))
    fine = generate(model, (2,), sampler="euler", schedule="rf", steps=2000, seeds=range(8))
    assert (one.images - euler1.images).abs().max() > 1e-3  # the test can fail
    assert torch.allclose(one.images, fine.images, atol=5e-3)  # and rk45 is the ODE's solution


class _GaussianDataVelocity(torch.nn.Module):
    """The exact RF velocity E[ε − x0 | x_t] for x0 ~ N(μ, s²I), ε ~ N(0, I) (x_t = (1 − t)x0 + tε)."""

    mu, s = torch.tensor([0.5, -1.0], dtype=torch.float64), 0.7

    def forward(self, x, t):
        t = t[:, None].to(x.dtype)
        a, b = 1 - t, t
        var = a * a * self.s**2 + b * b
        return b * (x - a * self.mu) / var - (self.mu + a * self.s**2 * (x - a * self.mu) / var)


@pytest.mark.parametrize("time", ["rf", "sigma"])
def test_rk45_in_either_time_variable_follows_the_exact_flow(time):
    """For Gaussian data the flow's ODE keeps standardized coordinates: x_t = (1 − t)μ + √((1 − t)²s² + t²)·ε.
    rk45 stepping in σ or in RF time t must land on it; for a flow the default is t (fewer NFE, same answer)."""
    from diffsamp.models.base import CountingDenoiser
    from diffsamp.samplers.grid import Grid

    model = RFDenoiser(_GaussianDataVelocity(), time_scale=1.0)
    eps = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = Grid(torch.tensor([model.sigma_max, model.sigma_min], dtype=torch.float64))
    t_end = model.t_min
    mu, s = _GaussianDataVelocity.mu, _GaussianDataVelocity.s
    exact_xt = (1 - t_end) * mu + ((1 - t_end) ** 2 * s * s + t_end**2) ** 0.5 * eps
    x_start = (1 - model.t_max) * mu + ((1 - model.t_max) ** 2 * s * s + model.t_max**2) ** 0.5 * eps
    start = x_start * (1 + model.sigma_max)  # x̄ = x_t (1 + σ)
    counted = CountingDenoiser(model)
    out = get_sampler("rk45")(counted, start, grid, rtol=1e-8, atol=1e-8, time=time)
    assert torch.allclose(out / (1 + model.sigma_min), exact_xt, atol=1e-5)
    if time == "rf":
        default = CountingDenoiser(model)
        assert torch.equal(get_sampler("rk45")(default, start, grid, rtol=1e-8, atol=1e-8), out)
        assert default.calls == counted.calls
    with pytest.raises(ValueError, match="rk45 time"):
        get_sampler("rk45")(model, start, grid, time="log")


def test_rf_loss_matches_its_formula():
    torch.manual_seed(0)
    net = MLPVelocity(2, 16, 1)
    x0 = torch.randn(64, 2)
    loss = RFLoss(time_scale=1.0)(net, x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    x1 = torch.randn(x0.shape, generator=g)
    t = torch.rand(64, generator=g)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    assert torch.allclose(loss, ((net(x_t, t) - (x1 - x0)) ** 2).mean())


def test_distill_loss_is_the_one_step_l2():
    """K = 1: loss · t_max² = ‖(z − t_max·v(z, t_max)) − x‖² mean, the one-step output's L2 error."""
    torch.manual_seed(0)
    net = MLPVelocity(2, 16, 1)
    x, z = torch.randn(64, 2), torch.randn(64, 2)
    loss = RFLoss(time_scale=1.0, paired=True, distill_steps=1)(net, torch.stack([x, z], 1), torch.Generator())
    one_step = z - T_MAX * net(z, torch.full((64,), T_MAX))
    assert torch.allclose(loss * T_MAX**2, ((one_step - x) ** 2).mean(), rtol=1e-5)
    # and the σ-space euler sampler produces exactly that one-step output
    model = RFDenoiser(net.eval(), time_scale=1.0)
    grid = get_schedule("rf").grid(1)
    with torch.no_grad():
        out = get_sampler("euler")(model, z * prior_scale("rf", float(grid.sigmas[0])), grid)
    assert torch.allclose(out, one_step.detach(), atol=1e-4)


def test_logit_normal_t_sampling_concentrates_in_the_middle():
    loss = RFLoss(time_scale=1.0, t_sampling="logit-normal")
    t = loss.sample_t(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert 0 < float(t.min()) and float(t.max()) < 1
    assert abs(float(t.mean()) - 0.5) < 0.01
    assert float(((t > 0.25) & (t < 0.75)).float().mean()) > 0.6  # uniform: 0.5
    with pytest.raises(ValueError, match="t_sampling"):
        RFLoss(time_scale=1.0, t_sampling="cosine")


def test_save_load_round_trip(tmp_path):
    model = _mlp_model(dtype=torch.float32)
    model.info = {"rectification": 2}
    save_rf(model, tmp_path / "m.safetensors")
    cfg = json.loads((tmp_path / "m.json").read_text())
    assert cfg["format"] == "diffsamp-rectified-flow" and cfg["network"]["kind"] == "mlp"
    back = load_rf(tmp_path / "m.json")
    assert back.info["rectification"] == 2 and back.prior == "rf"
    x, s = torch.randn(5, 2), torch.full((5,), 3.0)
    assert torch.allclose(back(x, s), model(x, s), atol=1e-6)
    assert isinstance(load_model(str(tmp_path / "m.safetensors")), RFDenoiser)
    (tmp_path / "m.safetensors").write_bytes(b"garbage")
    with pytest.raises(Exception):
        load_rf(tmp_path / "m.json")
    with pytest.raises(ValueError, match="unknown model"):
        load_model(str(tmp_path / "nope"))


def test_unet_flow_round_trip_and_shape(tmp_path):
    from tests.conftest import tiny_unet

    model = RFDenoiser(tiny_unet(8), time_scale=999.0)
    assert model.sample_shape == (1, 8, 8)
    save_rf(model, tmp_path / "u.safetensors", dtype=torch.float16)
    back = load_rf(tmp_path / "u.safetensors")
    res = generate(back, (1, 8, 8), sampler="euler", schedule="rf", steps=2, seeds=[0, 1])
    assert res.images.shape == (2, 1, 8, 8) and torch.isfinite(res.images).all() and res.nfe == 2


def test_straightness_is_zero_for_a_straight_flow_and_positive_for_a_curved_one():
    class Const(torch.nn.Module):  # v = c: every path is a straight line
        def forward(self, x, t):
            return torch.ones_like(x) * torch.tensor([1.0, -2.0])

    straight = straightness(RFDenoiser(Const(), time_scale=1.0), torch.randn(200, 2), steps=20)
    assert straight["S"] < 1e-10 and straight["relative"] < 1e-10

    class Rotating(torch.nn.Module):  # direction turns with t: curved paths
        def forward(self, x, t):
            return torch.stack([torch.cos(3 * t), torch.sin(3 * t)], 1)

    curved = straightness(RFDenoiser(Rotating(), time_scale=1.0), torch.randn(200, 2), steps=200)
    # exact: ∫ ‖v(t) − v̄‖² dt over [0, t0] for a unit vector turning at rate 3
    t = torch.linspace(0, T_MAX, 20001, dtype=torch.float64)
    v = torch.stack([torch.cos(3 * t), torch.sin(3 * t)], 1)
    exact = float(((v - v.mean(0)) ** 2).sum(1).mean())
    assert curved["S"] == pytest.approx(exact, rel=0.02)
    assert curved["S_err"] < 1e-6  # the same path for every sample: no Monte-Carlo spread
