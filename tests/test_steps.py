"""Learned time steps (LD3-style): the parameterisation, the differentiable solve against the registered samplers,
training on the 2-D mixture's exact ODE, the slack's ball, and the CLI's schedule file."""

import json
import re

import pytest
import torch

import diffsamp
from diffsamp.models.analytic import GaussianMixtureDenoiser
from diffsamp.training.steps import LearnedSteps, StepsOptions, student_solve, train_steps
from tests.test_amed import MIX


def test_the_parameterisation_starts_at_the_initial_grid_and_stays_ordered(mixture2d):
    init = diffsamp.get_schedule("time_uniform", model=mixture2d).grid(6, final_zero=True).sigmas
    steps = LearnedSteps(float(init[0]), float(mixture2d.sigma_min), init)
    torch.testing.assert_close(steps().detach(), init, rtol=1e-4, atol=0)  # σ_{K−1} = σ_min keeps a 1e-6 share
    with torch.no_grad():
        steps.logits.copy_(torch.randn(6, generator=torch.Generator().manual_seed(0)) * 3)
    s = steps().detach()
    assert s[0] == init[0] and s[-1] == 0 and bool((torch.diff(s) < 0).all()) and s[-2] > mixture2d.sigma_min


@pytest.mark.parametrize("base,order", [("ddim", 1), ("dpmpp2m", 2), ("dpmpp3m", 3)])
def test_the_differentiable_solve_is_the_registered_sampler(mixture2d, base, order):
    grid = diffsamp.get_schedule("karras", model=mixture2d).grid(7, final_zero=True)
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 20
    want = diffsamp.get_sampler(base)(mixture2d, x, grid)
    sig = grid.sigmas.clone().requires_grad_(True)
    got = student_solve(mixture2d, x, sig, order, network_sigma_grad=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got.sum().backward()
    assert sig.grad is not None and bool(sig.grad[1:-1].abs().gt(0).all())  # every inner σ moves the result


def test_the_ancestral_solve_is_euler_ancestral_given_the_same_draws(mixture2d):
    grid = diffsamp.get_schedule("karras", model=mixture2d).grid(6, final_zero=True)
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 20
    want = diffsamp.get_sampler("euler_ancestral")(mixture2d, x, grid, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the sampler draws one batch of noise per step before the step to 0
    noise = torch.stack([torch.randn(16, 2, dtype=torch.float64, generator=g) for _ in range(5)], dim=1)
    sig = grid.sigmas.clone().requires_grad_(True)
    got = student_solve(mixture2d, x, sig, 1, network_sigma_grad=True, noise=noise)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert not torch.allclose(got, student_solve(mixture2d, x, grid.sigmas, 1, network_sigma_grad=True))
    got.sum().backward()
    assert bool(sig.grad[1:-1].abs().gt(0).all())


def test_ancestral_steps_train_on_their_own_draws():
    model = GaussianMixtureDenoiser(**MIX)
    opts = StepsOptions(steps=3, base="euler_ancestral", schedule="karras", teacher_steps=20, trajectories=16,
                        batch=8, epochs=3, lr=0.05)
    grid, record = train_steps(model, (2,), opts)
    assert record["options"]["base"] == "euler_ancestral" and len(grid) == 3 and grid.ends_at_zero
    # the initial pool loss is Euler ancestral's, on the draws after x_T from the seed, against the teacher
    from diffsamp.models.base import prior_scale

    init = diffsamp.get_schedule("karras", model=model).grid(3, final_zero=True)
    gen = torch.Generator().manual_seed(opts.seed)
    z = torch.randn(16, 2, generator=gen) * prior_scale(model.prior, float(init.sigmas[0]))
    noise = torch.randn(16, 2, 2, generator=gen)
    target = diffsamp.get_sampler("heun")(model, z, diffsamp.get_schedule("karras", model=model).grid(20, final_zero=True))
    out = student_solve(model, z, init.sigmas, 1, network_sigma_grad=False, noise=noise)
    want = (out - target).pow(2).sum(1).mean().item()
    assert record["pool_loss"][0] == pytest.approx(want, rel=1e-4)
    assert record["pool_loss"][0] != record["pool_loss"][-1]  # the σ's moved the stochastic solve's loss


def test_learned_steps_beat_their_initial_grid_and_keep_the_slack_in_its_ball(monkeypatch):
    model = GaussianMixtureDenoiser(**MIX)
    opts = StepsOptions(steps=4, base="dpmpp2m", schedule="karras", teacher_steps=80, trajectories=64, batch=32,
                        epochs=30, lr=0.05)
    grid, record = train_steps(model, (2,), opts)
    loss = record["loss_per_epoch"]
    init = diffsamp.Grid(torch.tensor(record["init"], dtype=torch.float64))
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7)) * float(grid.sigmas[0])
    ref = diffsamp.get_sampler("heun")(model, z, diffsamp.get_schedule("karras", model=model).grid(200))

    def rms(g):
        return (diffsamp.get_sampler("dpmpp2m")(model, z, g) - ref).pow(2).sum(1).mean().sqrt().item()

    # measured: 0.160 on the learned σ's [20, 1.35, 0.31, 0.02, 0] against 0.230 on karras's [20, 3.87, 0.45, 0.02,
    # 0] (held-out draws); training loss 0.043 → 0.023
    assert rms(grid) < 0.8 * rms(init), (rms(grid), rms(init))
    assert loss[-1] < 0.7 * loss[0] and len(grid) == 4 and grid.ends_at_zero
    assert record["pool_loss"][record["kept_epoch"]] == min(record["pool_loss"]) < record["pool_loss"][0]

    seen = []
    import diffsamp.training.steps as steps_mod

    real = steps_mod.student_solve

    def spy(model, x, sigmas, order, **kw):
        if x.requires_grad:  # the training solves (the pool's evaluations start from the noise itself)
            seen.append(x.detach().clone())
        return real(model, x, sigmas, order, **kw)

    monkeypatch.setattr(steps_mod, "student_solve", spy)
    slack = StepsOptions(steps=4, schedule="karras", teacher_steps=40, trajectories=32, batch=32, epochs=4,
                         slack=0.05, slack_lr=1e4)
    train_steps(model, (2,), slack)
    z0 = seen[0]  # epoch 0 starts at x_T itself
    for x in seen[1:]:
        moved = (x - z0).norm(dim=1) / z0.norm(dim=1)
        assert bool((moved <= 0.05 * (1 + 1e-5)).all()), moved.max()  # never past the ball (float32)
        assert moved.max() > 0.049  # a large step is projected onto its edge


def test_cli_steps_schedule_samples_and_exports(tiny_model_dir, tmp_path, one_thread):
    from click.testing import CliRunner

    from diffsamp.cli import main

    out = tmp_path / "steps3"
    res = CliRunner().invoke(main, ["train", "solver", "--method", "steps", "--model", str(tiny_model_dir), "--nfe",
                                    "3", "--trajectories", "4", "--batch", "2", "--epochs", "2", "--fine-steps", "8",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "schedule.json").read_text())
    assert doc["method"] == "steps" and len(doc["sigmas"]) == 4 and doc["sigmas"][-1] == 0
    assert doc["network_sigma_gradient"] is True
    assert len(doc["pool_loss"]) == 3 and doc["pool_loss"][doc["kept_epoch"]] == min(doc["pool_loss"])
    assert len(doc["timesteps"]) == 3
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir), "--sampler", "dpmpp2m", "--sigmas",
                                    str(out), "--seeds", "0-1", "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["train", "solver", "--method", "gits", "--model", str(tiny_model_dir), "--nfe",
                                    "3", "--slack", "0.1", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--slack is for --method steps" in res.output
    for flag in (["--loss", "fd"], ["--fd-data", "mnist:test"]):
        res = CliRunner().invoke(main, ["train", "solver", "--method", "epd", "--model", str(tiny_model_dir), "--nfe",
                                        "3", *flag, "--out", str(tmp_path / "x")])
        assert res.exit_code != 0 and f"{flag[0]} is for --method steps" in res.output, res.output


def test_bench_rows_on_a_schedule_file(tiny_model_dir, tmp_path, one_thread):
    """bench --schedule ROW=FILE: the row samples on the file's σ's, its cell at the NFE they give."""
    from diffsamp.metrics.bench import NoGridError, plan_cell
    from diffsamp.models import load
    from diffsamp.training.gits import write_schedule

    model = load(tiny_model_dir)
    grid = diffsamp.Grid(torch.tensor([80.0, 3.0, 0.5, 0.0], dtype=torch.float64))
    path = write_schedule(tmp_path / "s", model, str(tiny_model_dir), grid, {"method": "steps"})
    plan = plan_cell(model, str(tiny_model_dir), "dpmpp2m", 3, schedules={"dpmpp2m": str(tmp_path / "s")})
    assert torch.equal(plan.grid.sigmas, grid.sigmas) and plan.final_step == "zero"
    assert plan.setting == "steps schedule s, 3 steps, the last to 0"
    with pytest.raises(NoGridError, match="declares NFE 3, not 5"):
        plan_cell(model, str(tiny_model_dir), "dpmpp2m", 5, schedules={"dpmpp2m": str(path)})
    row = plan_cell(model, str(tiny_model_dir), "dpmpp2m:learned", 3, schedules={"dpmpp2m:learned": str(path)})
    assert row.sampler == "dpmpp2m:learned" and row.method == "dpmpp2m" and torch.equal(row.grid.sigmas, grid.sigmas)
    plain = plan_cell(model, str(tiny_model_dir), "dpmpp2m", 3, schedules={"dpmpp2m:learned": str(path)})
    assert plain.schedule == "logsnr" and plain.method == "dpmpp2m"  # the plain row keeps its own grid
    # ROW:N=FILE: one file per NFE for one row; an NFE without its file has no cell (not the default schedule)
    grid4 = diffsamp.Grid(torch.tensor([80.0, 9.0, 2.0, 0.3, 0.0], dtype=torch.float64))
    path4 = write_schedule(tmp_path / "s4", model, str(tiny_model_dir), grid4, {"method": "gits"})
    per_nfe = {"dpmpp2m:learned:3": str(path), "dpmpp2m:learned:4": str(path4)}
    for nfe, want_grid in ((3, grid), (4, grid4)):
        cell = plan_cell(model, str(tiny_model_dir), "dpmpp2m:learned", nfe, schedules=per_nfe)
        assert cell.nfe == nfe and torch.equal(cell.grid.sigmas, want_grid.sigmas)
    with pytest.raises(NoGridError, match="no schedule for NFE 5"):
        plan_cell(model, str(tiny_model_dir), "dpmpp2m:learned", 5, schedules=per_nfe)
    assert plan_cell(model, str(tiny_model_dir), "dpmpp2m", 4, schedules=per_nfe).schedule == "logsnr"
    res = diffsamp.generate(model, model.sample_shape, sampler=plan.method, schedule=plan.schedule, grid=plan.grid,
                            seeds=[0, 1], **plan.knobs)
    want = diffsamp.generate(model, model.sample_shape, sampler="dpmpp2m", grid=grid, seeds=[0, 1])
    assert res.nfe == 3 and torch.equal(res.images, want.images)


def test_a_grid_that_training_makes_worse_is_not_kept():
    """At a learning rate that throws the σ's about, the initial grid (epoch 0) is what comes back."""
    model = GaussianMixtureDenoiser(**MIX)
    opts = StepsOptions(steps=4, schedule="karras", teacher_steps=40, trajectories=32, batch=32, epochs=3, lr=5.0)
    grid, record = train_steps(model, (2,), opts)
    pool = record["pool_loss"]
    assert record["kept_epoch"] == 0 and min(pool[1:]) > pool[0], pool
    torch.testing.assert_close(grid.sigmas, torch.tensor(record["init"], dtype=torch.float64), rtol=1e-4, atol=0)


def test_the_features_loss_is_the_classifier_distance_and_refuses_other_shapes(monkeypatch):
    from diffsamp.metrics.classifier import load_classifier, perceptual_distance
    from diffsamp.training.steps import final_distance

    a, b = torch.rand(3, 1, 32, 32) * 2 - 1, torch.rand(3, 1, 32, 32) * 2 - 1
    dist = final_distance("features", (1, 32, 32), torch.device("cpu"))
    torch.testing.assert_close(dist(a, b), perceptual_distance(load_classifier(), a, b))
    torch.testing.assert_close(final_distance("l2", (1, 32, 32), torch.device("cpu"))(a, b),
                               (a - b).pow(2).sum((1, 2, 3)))
    with pytest.raises(ValueError, match="MNIST classifier"):
        final_distance("features", (3, 64, 64), torch.device("cpu"))
    with pytest.raises(ValueError, match="loss must be one of"):
        StepsOptions(loss="lpips").check()


def test_the_frechet_loss_equals_the_fid_formula_and_has_a_gradient():
    import numpy as np

    from diffsamp.metrics.distances import FrechetToReference, frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    b = torch.randn(500, 16, generator=g, dtype=torch.float64) * 1.3 + 0.2
    ref = FrechetToReference(b.mean(0), torch.cov(b.T))
    fa = a.clone().requires_grad_(True)
    d = ref(fa)
    want = frechet_distance(a.mean(0).numpy(), np.cov(a.numpy(), rowvar=False), b.mean(0).numpy(),
                            np.cov(b.numpy(), rowvar=False))
    assert abs(float(d) - want) < 1e-8 * want
    d.backward()
    assert bool(torch.isfinite(fa.grad).all()) and float(fa.grad.abs().sum()) > 0
    assert float(ref(b)) < 1e-6 * want  # the reference against itself
    with pytest.raises(ValueError, match="features must be"):
        ref(a[:1])


def test_the_fd_loss_fits_the_steps_to_data_without_a_teacher(tmp_path, monkeypatch):
    """``loss="fd"``: the σ's of a tiny UNet are trained on the Fréchet distance of its samples to a data set in the
    classifier's features; no teacher runs, the pool's FD picks the kept grid, and a slack or a small batch is refused."""
    import numpy as np

    import diffsamp.training.steps as steps_mod
    from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
    from diffsamp.models.parameterization import ddpm_alphas_cumprod
    from tests.conftest import tiny_unet, write_idx

    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz",
              np.random.default_rng(0).integers(0, 256, (200, 28, 28)))
    monkeypatch.setenv("DIFFSAMP_DATA", str(tmp_path))
    model = DiffusersUNetDenoiser(tiny_unet(), ddpm_alphas_cumprod())
    real = steps_mod.get_sampler
    monkeypatch.setattr(steps_mod, "get_sampler", lambda name: pytest.fail(f"the teacher {name} ran") if name == "heun"
                        else real(name))
    opts = StepsOptions(steps=3, base="ddim", loss="fd", trajectories=128, batch=128, epochs=1, fd_images=200, lr=0.1)
    grid, record = train_steps(model, (1, 8, 8), opts)
    pool = record["pool_loss"]
    assert len(pool) == 2 and all(v > 0 for v in pool) and len(grid) == 3 and grid.ends_at_zero
    assert pool[record["kept_epoch"]] == min(pool) and pool[0] != pool[1]  # the σ's moved; the better grid kept
    assert record["loss_per_epoch"] == [pytest.approx(pool[0])]  # one batch: its loss is the pool's at the start
    with pytest.raises(ValueError, match="no slack"):
        StepsOptions(loss="fd", slack=0.1, batch=128, trajectories=128).check()
    with pytest.raises(ValueError, match="at least 128"):
        StepsOptions(loss="fd", batch=25).check()


def test_learned_solvers_start_on_a_flows_own_grid(tiny_model_dir, tmp_path, one_thread):
    """Without --schedule, GITS's fine grid, the learned steps' initial grid and an EPD table's grid are the flow's
    own rf grid on a rectified flow (as the plain samplers' default there), and time_uniform on a diffusion model."""
    from diffsamp.models import load
    from diffsamp.samplers.amed_files import load_predictor
    from diffsamp.training.amed import AmedTrainOptions, train_amed
    from diffsamp.training.gits import GitsOptions, search_schedule

    flow, ddpm = load("mnist-rf"), load(tiny_model_dir)
    rf = diffsamp.get_schedule("rf", model=flow)
    _, rec = search_schedule(flow, flow.sample_shape, GitsOptions(steps=2, fine_steps=4, trajectories=1, batch=1))
    assert rec["options"]["schedule"] == "rf" and rec["fine_sigmas"] == rf.grid(4, final_zero=True).sigmas.tolist()
    _, rec = train_steps(flow, flow.sample_shape, StepsOptions(steps=2, teacher_steps=4, trajectories=1, batch=1,
                                                               epochs=1))
    assert rec["options"]["schedule"] == "rf" and rec["init"] == rf.grid(2, final_zero=True).sigmas.tolist()
    pred = load_predictor(train_amed(flow, flow.sample_shape, AmedTrainOptions(sampler="epd", nfe=5, trajectories=1,
                                                                               batch=1), tmp_path / "epd",
                                        model_name="mnist-rf"))
    assert pred.config["schedule"] == "rf"  # two learned intervals, [999, ≈1 (t = ½), σ_min], then the step to 0
    assert float(pred.grid_sigmas[1]) == pytest.approx(float(rf.grid(2).sigmas[1]), rel=0.01)  # time_uniform: 0.001
    assert len(pred.grid_sigmas) == 4 and pred.grid_sigmas[-1] == 0
    _, rec = search_schedule(ddpm, ddpm.sample_shape, GitsOptions(steps=2, fine_steps=4, trajectories=1, batch=1))
    assert rec["options"]["schedule"] == "time_uniform"


def test_a_shipped_schedule_is_found_by_name_and_listed():
    from click.testing import CliRunner

    from diffsamp.cli import main
    from diffsamp.samplers.schedule_file import SCHEDULES_DIR, is_schedule_file, read_schedule, shipped_schedules

    name = "mnist-ddpm/euler_ancestral-fd-nfe5"
    assert name in shipped_schedules() and is_schedule_file(name) and not is_schedule_file("mnist-ddpm/nope")
    grid, doc = read_schedule(name)
    want = json.loads((SCHEDULES_DIR / f"{name}.json").read_text())
    assert grid.sigmas.tolist() == want["sigmas"] and grid.ends_at_zero and len(grid) == 5
    assert doc["options"]["base"] == "euler_ancestral" and doc["fid"]["fid"] < doc["fid"]["start_fid"]  # won its cell
    with pytest.raises(FileNotFoundError, match="shipped: .*euler_ancestral-fd-nfe5"):
        read_schedule("mnist-ddpm/nope")
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0
    assert re.search(rf"{re.escape(name)} +steps for euler_ancestral, loss fd, NFE 5, from time_uniform", res.output)
