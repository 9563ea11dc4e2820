"""Restart sampling (Xu et al. 2023): ComfyUI's step schedule written out independently, heun without restarts,
the right distribution on the Gaussian oracle, measured NFE, and batch invariance."""

from __future__ import annotations

import math

import pytest
import torch

import diffsamp
from diffsamp.models.base import CountingDenoiser
from diffsamp.samplers.restart import restart_steps_of


def karras(n: int, lo: float, hi: float, rho: float = 7.0) -> list[float]:
    """k-diffusion's get_sigmas_karras without its trailing 0 (EDM Eq. 5)."""
    ramp = [i / (n - 1) for i in range(n)]
    return [(hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for r in ramp]


def comfy_restart(model, x, sigmas, gens, restart_min, restart_max, restart_steps, restart_times):
    """ComfyUI's sample_restart loop for a given restart interval, written out."""
    sig = sigmas.tolist()
    lo = min(range(len(sig)), key=lambda i: abs(sig[i] - restart_min))
    hi = min(range(len(sig)), key=lambda i: abs(sig[i] - restart_max))
    step_list = []
    for i in range(len(sig) - 1):
        step_list.append((sig[i], sig[i + 1]))
        if i + 1 == lo and hi < lo:
            sub = karras(restart_steps, sig[lo], sig[hi])
            step_list.extend(list(zip(sub[:-1], sub[1:])) * restart_times)
    last = None
    for old, new in step_list:
        if last is not None and last < old:
            noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in gens])
            x = x + noise * (old**2 - last**2) ** 0.5
        s_in = torch.full((x.shape[0],), old, dtype=x.dtype)
        den = model(x, s_in)
        d = (x - den) / old
        if new == 0:
            x = x + d * (new - old)
        else:
            x2 = x + d * (new - old)
            d2 = (x2 - model(x2, torch.full((x.shape[0],), new, dtype=x.dtype))) / new
            x = x + (d + d2) / 2 * (new - old)
        last = new
    return x


@pytest.mark.parametrize("knobs", [dict(restart_min=0.1, restart_max=2.0, restart_steps=10, restart_times=1),
                                   dict(restart_min=0.3, restart_max=5.0, restart_steps=4, restart_times=3)])
def test_matches_comfyuis_restart_loop(mixture2d, knobs):
    grid = diffsamp.make_grid(mixture2d, "heun", steps=24)
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = z * grid.sigmas[0].item()
    ours = diffsamp.get_sampler("restart")(mixture2d, x0, grid, generator=[torch.Generator().manual_seed(s) for s in range(6)],
                                           **knobs)
    ref = comfy_restart(mixture2d, x0, grid.sigmas, [torch.Generator().manual_seed(s) for s in range(6)], **knobs)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    plain = diffsamp.get_sampler("heun")(mixture2d, x0, grid)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the restarts did something


def test_without_restarts_it_is_heun(mixture2d):
    grid = diffsamp.make_grid(mixture2d, "heun", steps=12)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * grid.sigmas[0].item()
    heun = diffsamp.get_sampler("heun")(mixture2d, x0, grid)
    for knobs in (dict(restart_times=0), dict(restart_min=5.0, restart_max=1.0)):  # none, or an empty interval
        torch.testing.assert_close(diffsamp.get_sampler("restart")(mixture2d, x0, grid, **knobs), heun, rtol=0, atol=0)


def test_restarts_keep_the_distribution(gaussian):
    """On the Gaussian oracle the exact reverse process ends at N(μ, s²): restarts (forward noise + ODE) keep it."""
    res = diffsamp.generate(gaussian, (4,), sampler="restart", steps=30, seeds=range(3000), restart_times=2,
                            restart_steps=6, restart_min=0.2, restart_max=3.0)
    x = res.images.double()
    mean = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    se = 0.7 / math.sqrt(x.shape[0])
    assert (x.mean(0) - mean).abs().max() < 4 * se + 0.01
    assert (x.std(0) - 0.7).abs().max() < 4 * 0.7 / math.sqrt(2 * x.shape[0]) + 0.01


def test_nfe_is_declared_and_batches_do_not_matter(mixture2d):
    knobs = dict(restart_min=0.1, restart_max=2.0, restart_steps=7, restart_times=2)
    grid = diffsamp.make_grid(mixture2d, "restart", steps=20)
    steps = restart_steps_of(grid, **knobs)
    assert len(steps) == 20 + 2 * 6
    counter = CountingDenoiser(mixture2d)
    diffsamp.get_sampler("restart")(counter, torch.zeros(2, 2, dtype=torch.float64) + 3, grid,
                                    generator=[torch.Generator().manual_seed(s) for s in range(2)], **knobs)
    assert counter.calls == diffsamp.get_sampler("restart").expected_nfe(grid, **knobs) == 2 * len(steps) - 1
    whole = diffsamp.generate(mixture2d, (2,), sampler="restart", steps=20, seeds=range(8), **knobs).images
    single = diffsamp.generate(mixture2d, (2,), sampler="restart", steps=20, seeds=range(8), batch_size=1, **knobs).images
    assert torch.equal(whole, single)
