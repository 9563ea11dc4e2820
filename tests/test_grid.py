"""Schedules match hand-computed karras/logsnr/time_uniform grids, grids validate, ddpm spacings match diffusers."""

import pytest
import torch

from diffsamp.samplers import Grid, get_schedule
from diffsamp.samplers.grid import DDPMSchedule


@pytest.mark.parametrize(
    "name,params,n,expected",
    [
        ("karras", {}, 3, [80, 9.723, 0.4700, 0.002]),
        ("logsnr", {}, 3, [80, 2.339, 0.06840, 0.002]),
        ("time_uniform", {}, 3, [80, 6.950, 1.287, 0.002]),
        ("karras", {}, 5, [80, 24.41, 5.839, 0.9654, 0.08509, 0.002]),
    ],
)
def test_worked_examples(name, params, n, expected):
    grid = get_schedule(name, sigma_min=0.002, sigma_max=80.0, **params).grid(n, final_zero=False)
    assert len(grid) == n
    assert torch.allclose(grid.sigmas, torch.tensor(expected, dtype=torch.float64), rtol=5e-4)


def test_final_zero_layout_and_refinement():
    sched = get_schedule("karras", sigma_min=0.002, sigma_max=80.0)
    g = sched.grid(18)
    assert len(g) == 18 and g.ends_at_zero and float(g.sigmas[0]) == pytest.approx(80.0)
    assert float(g.sigmas[-2]) == pytest.approx(0.002)
    coarse, fine = sched.grid(4, final_zero=False), sched.grid(12, final_zero=False)
    assert torch.allclose(fine.sigmas[::3], coarse.sigmas, rtol=1e-12)


def test_rf_schedule_is_uniform_in_t():
    g = get_schedule("rf").grid(4, final_zero=False)
    t = g.sigmas / (1 + g.sigmas)
    assert torch.allclose(t, torch.linspace(0.999, 0.001, 5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize(
    "sigmas,msg",
    [
        ([1.0, 2.0], "strictly decreasing"),
        ([1.0, 1.0, 0.0], "strictly decreasing"),
        ([1.0], "at least 2"),
        ([1.0, -0.5], "non-negative"),
        ([float("nan"), 0.0], "finite"),
    ],
)
def test_bad_grids_are_rejected(sigmas, msg):
    with pytest.raises(ValueError, match=msg):
        Grid(torch.tensor(sigmas))


def test_unknown_schedule_lists_valid_ones_and_missing_params_are_named():
    with pytest.raises(ValueError, match="available: .*ddpm, .*karras"):
        get_schedule("cosine")
    with pytest.raises(ValueError, match="needs sigma_min"):
        get_schedule("karras")
    with pytest.raises(ValueError, match="positive integer"):
        get_schedule("karras", sigma_min=0.1, sigma_max=1.0).grid(0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 10, 50, 1000])
def test_ddpm_timesteps_match_diffusers(spacing, n):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(timestep_spacing=spacing)
    ref.set_timesteps(n)
    sched = DDPMSchedule(ref.alphas_cumprod, spacing=spacing)
    assert sched.timesteps(n).tolist() == ref.timesteps.tolist()
    grid = sched.grid(n)
    assert len(grid) == n and grid.ends_at_zero
