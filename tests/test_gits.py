"""GITS (Chen et al. 2024): the Euler-error cost matrix along teacher trajectories, the dynamic programme over it, the
schedule file and sampling on it."""

from __future__ import annotations

import itertools
import math
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import diffsamp
from diffsamp.cli import main
from diffsamp.samplers import Grid
from diffsamp.training.gits import GitsOptions, cost_matrix, dp_path, read_schedule, search_schedule, timesteps_of
from tests.conftest import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(cost: np.ndarray, steps: int) -> float:
    m = cost.shape[0] - 1
    best = np.inf
    for inner in itertools.combinations(range(1, m), steps - 1):
        path = (0, *inner, m)
        best = min(best, sum(cost[a, b] for a, b in zip(path[:-1], path[1:])))
    return best


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_the_dynamic_programme_finds_the_cheapest_path(steps):
    rng = np.random.default_rng(steps)
    m = 8
    cost = np.triu(rng.uniform(0.1, 3.0, (m + 1, m + 1)), 1) + np.tril(np.full((m + 1, m + 1), np.inf))
    path = dp_path(cost, steps)
    assert path[0] == 0 and path[-1] == m and len(path) == steps + 1 and path == sorted(set(path))
    assert sum(cost[a, b] for a, b in zip(path[:-1], path[1:])) == pytest.approx(brute_force(cost, steps), abs=1e-12)
    with pytest.raises(ValueError, match="cannot choose 9 steps among 8"):
        dp_path(cost, 9)


def test_the_cost_is_the_euler_error_from_teacher_point_i_to_point_j(mixture2d):
    """C[i, j] against an Euler step recomputed here from the teacher's own points (heun on the fine grid)."""
    opts = GitsOptions(steps=3, fine_steps=6, schedule="karras", trajectories=5, batch=2, seed=4)
    fine = diffsamp.get_schedule("karras", model=mixture2d).grid(6)
    cost = cost_matrix(mixture2d, (2,), fine, opts)
    z = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(4 + k)) for k in range(5)])
    xs = [z * float(fine.sigmas[0])]  # the model's float32, as the search runs it
    diffsamp.get_sampler("heun")(mixture2d, xs[0].clone(), fine, callback=lambda info: xs.append(info.x))
    s = fine.sigmas.tolist()
    for i, j in [(0, 1), (0, 6), (2, 5), (5, 6)]:
        d = ((xs[i] - mixture2d(xs[i], torch.full((5,), s[i]))) / s[i]).double()
        expect = (xs[i].double() + (s[j] - s[i]) * d - xs[j].double()).norm(dim=1).mean()
        assert float(cost[i, j]) == pytest.approx(float(expect), rel=1e-9)
    assert torch.isinf(cost[3, 3]) and torch.isinf(cost[4, 2])
    assert float(cost[5, 6]) == 0  # Heun's own last step to σ = 0 is an Euler step
    assert float(cost[4, 6]) > 0 and torch.all(cost[torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)] >= 0)


def test_a_schedule_is_part_of_the_fine_grid_ending_at_zero(mixture2d):
    opts = GitsOptions(steps=4, fine_steps=20, schedule="karras", trajectories=16, batch=8)
    grid, record = search_schedule(mixture2d, (2,), opts)
    fine = torch.tensor(record["fine_sigmas"], dtype=torch.float64)
    assert len(grid) == 4 and grid.sigmas[-1] == 0 and grid.sigmas[0] == fine[0]
    assert torch.equal(grid.sigmas, fine[record["path"]])
    assert timesteps_of(mixture2d, grid) is None  # a continuous-time model has σ's only


def test_train_solver_writes_a_schedule_that_sample_runs_on(tiny_model_dir, tmp_path):
    out = tmp_path / "gits"
    res = CliRunner().invoke(main, ["train", "solver", "--method", "gits", "--model", str(tiny_model_dir), "--nfe", "3",
                                    "--out", str(out), "--fine-steps", "8", "--trajectories", "4", "--batch", "2"])
    assert res.exit_code == 0, res.output
    grid, doc = read_schedule(out)
    assert doc["format"] == "diffsamp-schedule/1" and len(grid) == 3 and doc["steps"] == 3
    ts = doc["timesteps"]  # a DDPM: the training timestep of each σ > 0, decreasing, inside 0 … 999
    assert len(ts) == 3 and ts == sorted(ts, reverse=True) and 0 <= ts[-1] and ts[0] <= 999
    model = diffsamp.models.load(tiny_model_dir)
    assert np.allclose(np.interp(np.log(grid.sigmas[:-1].numpy()), np.log(model.timestep_sigmas.numpy()),
                                 np.arange(len(model.timestep_sigmas))), ts)
    png = tmp_path / "g.png"
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir), "--sampler", "ddim", "--sigmas", str(out),
                                    "--seeds", "0-1", "--out", str(png), "--quiet"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    meta = json.loads(Image.open(png).text["diffsamp"])
    assert meta["sigma_grid"] == grid.sigmas.tolist() and meta["sigmas_file"] == str(out) and meta["steps"] == 3
    same = diffsamp.generate(model, model.sample_shape, sampler="ddim", grid=Grid(grid.sigmas), seeds=[0, 1])
    ours = diffsamp.generate(model, model.sample_shape, sampler="ddim", seeds=[0, 1], steps=3)
    assert not torch.equal(same.images, ours.images)  # the file's grid, not the default one
    base = ["sample", "--model", str(tiny_model_dir), "--sigmas", str(out), "--seeds", "0", "--out", str(png)]
    assert_one_line_error(CliRunner().invoke(main, base + ["--steps", "4"]), 2, "--sigmas sets the grid", "--steps")
    assert_one_line_error(CliRunner().invoke(main, base + ["--rho", "5"]), 2, "--sigmas sets the grid", "--rho")
    (tmp_path / "bad.json").write_text("{}")
    base[4] = str(tmp_path / "bad.json")
    assert_one_line_error(CliRunner().invoke(main, base), 2, "not a diffsamp schedule file")


def _exported(model, sigmas) -> dict:
    from diffsamp.training.gits import export_schedule, timesteps_of

    grid = Grid(torch.tensor(sigmas, dtype=torch.float64))
    return json.loads(export_schedule({"sigmas": grid.sigmas.tolist(), "timesteps": timesteps_of(model, grid)},
                                      "diffusers"))


def test_an_exported_schedule_runs_in_diffusers_as_in_diffsamp():
    """diffusers' EulerDiscreteScheduler on the exported sigmas, and DPMSolverMultistepScheduler on the exported
    integer timesteps, reproduce diffsamp's euler / dpmpp2m on the same σ's (a tiny random UNet, float64)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
    from tests.conftest import tiny_unet

    unet = tiny_unet().double()
    euler = EulerDiscreteScheduler()
    model = DiffusersUNetDenoiser(unet, euler.alphas_cumprod)
    table = model.timestep_sigmas
    # a GITS-like schedule: fine-grid σ's between training timesteps, ending at 0
    doc = _exported(model, [float(table[-1]), 40.0, 6.5, 1.3, 0.21, 0.0])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    euler.set_timesteps(sigmas=doc["sigmas"])
    x = z * doc["sigmas"][0]
    with torch.no_grad():
        for t in euler.timesteps:
            x = euler.step(unet(euler.scale_model_input(x, t), t).sample, t, x).prev_sample
        ours = diffsamp.get_sampler("euler")(model, z * doc["sigmas"][0], Grid(torch.tensor(doc["sigmas"])))
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))

    dpm = DPMSolverMultistepScheduler()
    dpm.set_timesteps(timesteps=doc["timesteps"])
    x = z.clone()
    with torch.no_grad():
        for t in dpm.timesteps:
            x = dpm.step(unet(x, t).sample, t, x).prev_sample
        grid = Grid(torch.cat([table[torch.tensor(doc["timesteps"])].double(), torch.zeros(1, dtype=torch.float64)]))
        start = z * math.sqrt(1 + float(grid.sigmas[0]) ** 2)  # σ-space: x̄ = x / √ᾱ
        ours = diffsamp.get_sampler("dpmpp2m")(model, start, grid)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_solver_export_formats(tmp_path):
    from diffsamp.training.gits import SCHEDULE_FORMAT

    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"format": SCHEDULE_FORMAT, "sigmas": [80.0, 2.5, 0.0], "timesteps": None}))
    res = CliRunner().invoke(main, ["solver", "export", str(tmp_path), "--format", "comfyui"])
    assert res.exit_code == 0 and res.output == "80.0, 2.5, 0.0\n", res.output
    res = CliRunner().invoke(main, ["solver", "export", str(path), "--format", "diffusers", "--out", str(tmp_path / "d.json")])
    assert res.exit_code == 0 and json.loads((tmp_path / "d.json").read_text()) == {"sigmas": [80.0, 2.5, 0.0]}
    assert_one_line_error(CliRunner().invoke(main, ["solver", "export", str(tmp_path / "none")]), 1, "no schedule file")
