"""ODE samplers converge at their theoretical order on closed-form oracles (CONTRIBUTING.md, Testing).

Global order, measured as the slope of log(max error) vs log(steps) on a karras grid ending at σ_min:
euler 1; heun, dpm2, dpmpp2m 2. The multistep methods dpmpp3m and ipndm start with a 1st-order step,
whose O(h²) local error caps their *global* order at 2; their higher order is checked separately through
the local error of one step fed with exact history (order p ⇒ local error O(h^{p+1})).
References: the exact Gaussian PF-ODE solution; rk45 at rtol = atol = 1e-12 for the mixtures.
"""

import math

import numpy as np
import pytest
import torch

from diffsamp.samplers import get_sampler, get_schedule
from diffsamp.samplers.ode import _dpmpp_rule, adams_bashforth

GLOBAL_ORDER = {"euler": 1, "heun": 2, "dpm2": 2, "dpmpp2m": 2, "dpmpp3m": 2, "ipndm": 2}
STEPS = [32, 64, 128]
_RK45_REFS: dict = {}


def _slope(model, x0, ref, name):
    sched = get_schedule("karras", model=model)
    knobs = {"lower_order_final": False} if name.startswith("dpmpp") else {}
    errs = []
    for n in STEPS:
        y = get_sampler(name)(model, x0, sched.grid(n, final_zero=False), **knobs)
        errs.append((y - ref).abs().max().item())
    assert all(math.isfinite(e) for e in errs)
    assert errs[-1] < errs[0], f"{name} did not converge: {errs}"
    return -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]


def _start(model, seed=1):
    return torch.randn(16, model.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 20.0


@pytest.mark.parametrize("name", sorted(GLOBAL_ORDER))
def test_order_on_gaussian_exact_solution(name, gaussian):
    x0 = _start(gaussian)
    ref = gaussian.ode_solution(x0, 20.0, 0.02)
    slope = _slope(gaussian, x0, ref, name)
    assert GLOBAL_ORDER[name] - 0.3 < slope < GLOBAL_ORDER[name] + 0.6, f"{name}: slope {slope:.2f}"


@pytest.mark.parametrize("fixture", ["mixture2d", "mixture64d"])
@pytest.mark.parametrize("name", sorted(GLOBAL_ORDER))
def test_order_on_mixtures_against_tight_rk45(name, fixture, request):
    model = request.getfixturevalue(fixture)
    x0 = _start(model)
    if fixture not in _RK45_REFS:  # the tight reference is computed once per mixture
        grid = get_schedule("karras", model=model).grid(1, final_zero=False)
        _RK45_REFS[fixture] = get_sampler("rk45")(model, x0, grid, rtol=1e-12, atol=1e-12)
    ref = _RK45_REFS[fixture]
    slope = _slope(model, x0, ref, name)
    assert GLOBAL_ORDER[name] - 0.3 < slope < GLOBAL_ORDER[name] + 0.7, f"{name}: slope {slope:.2f}"


def test_rk45_matches_exact_gaussian_solution(gaussian):
    x0 = _start(gaussian)
    grid = get_schedule("karras", model=gaussian).grid(1, final_zero=False)
    out = get_sampler("rk45")(gaussian, x0, grid, rtol=1e-10, atol=1e-10)
    assert torch.allclose(out, gaussian.ode_solution(x0, 20.0, 0.02), atol=1e-7)


def _local_error_slope(step_fn, hs):
    errs = [step_fn(h) for h in hs]
    return -np.polyfit(np.log(1 / np.array(hs)), np.log(errs), 1)[0]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpmpp_step_local_order_with_exact_history(order, gaussian):
    """One DPM-Solver++ step of order p on a λ-uniform grid with exact history: local error O(h^{p+1})."""
    x_start = _start(gaussian)
    sol = lambda s: gaussian.ode_solution(x_start, 20.0, s)  # noqa: E731
    den = lambda x, s: gaussian(x, torch.full((len(x),), s, dtype=torch.float64))  # noqa: E731
    s = 1.0

    def err(h):
        sig = [s * math.exp(2 * h), s * math.exp(h), s, s * math.exp(-h)]
        hist = [(sig[1], sol(sig[1]), den(sol(sig[1]), sig[1])), (sig[0], sol(sig[0]), den(sol(sig[0]), sig[0]))]
        rule = _dpmpp_rule(order, False, 100)
        x = sol(s)
        out = rule(x, den(x, s), s, sig[3], hist[: order - 1], 100)
        return (out - sol(sig[3])).abs().max().item()

    slope = _local_error_slope(err, [0.2, 0.1, 0.05, 0.025])
    assert order + 1 - 0.3 < slope < order + 1 + 0.5, f"order {order}: local slope {slope:.2f}"


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_adams_bashforth_local_order_on_uniform_grid(order, gaussian):
    """iPNDM's AB-k step on a uniform σ grid with exact history: local error O(h^{k+1})."""
    x_start = _start(gaussian)
    sol = lambda s: gaussian.ode_solution(x_start, 20.0, s)  # noqa: E731

    def d(s):
        x = sol(s)
        return (x - gaussian(x, torch.full((len(x),), s, dtype=torch.float64))) / s

    s = 2.0

    def err(h):
        ds = [d(s + j * h) for j in range(order)]
        out = sol(s) + (-h) * adams_bashforth(ds)
        return (out - sol(s - h)).abs().max().item()

    slope = _local_error_slope(err, [0.2, 0.1, 0.05, 0.025])
    assert order + 1 - 0.3 < slope < order + 1 + 0.5, f"AB{order}: local slope {slope:.2f}"
