"""``diffsamp train solver``: learned few-step solvers, one command for every method (GITS schedules here; AMED
predictors and EPD tables through ``diffsamp train amed``'s trainer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from diffsamp.cli._common import load_or_fail, main, resolve_device, writable_folder
from diffsamp.cli._seeds import parse_class_list
from diffsamp.cli.train import train

METHODS = ("gits", "steps", "amed", "epd", "adasde")


@train.command("solver", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--method", type=click.Choice(METHODS), default="gits", show_default=True,
              help="gits: the K-step schedule of least Euler error along teacher trajectories, by dynamic "
                   "programming (Chen et al. 2024); steps: the σ's of --base trained through the solve to the "
                   "teacher's samples (LD3, Tong et al. 2025); amed: an AMED predictor (Zhou et al. 2024); epd: an EPD table "
                   "(Zhu et al. 2025); adasde: an EPD table with a learned noise injection per step (AdaSDE, 2025). "
                   "amed, epd and adasde take every option of `diffsamp train amed` (--points, --static, --resume, "
                   "…).")
@click.option("--model", "model_name", required=True, help="Zoo name, local model/run directory or Hub id.")
@click.option("--nfe", required=True, type=click.IntRange(min=1), help="amed, epd: the solver's NFE. gits: steps of the schedule (its NFE with a "
              "one-evaluation sampler such as ddim, ipndm or dpmpp2m), the last one the denoising step to σ = 0.")
@click.option("--out", required=True, type=click.Path(file_okay=False), callback=writable_folder,
              help="Folder for schedule.json.")
@click.option("--fine-steps", default=100, show_default=True, type=click.IntRange(min=2),
              help="gits, steps: intervals of the teacher's fine grid (gits chooses the schedule among its points).")
@click.option("--base", default="dpmpp2m", show_default=True,
              type=click.Choice(["ddim", "euler", "dpmpp2m", "dpmpp3m", "euler_ancestral"]),
              help="steps: the solver the σ's are learned for (euler_ancestral: η = 1, a fixed draw of noise per "
                   "trajectory and step; best with --loss fd, which scores the samples' distribution).")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1), help="steps: passes over the pool.")
@click.option("--slack", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="steps: LD3's soft loss, the start may move within slack·‖x_T‖ (0: the plain L2).")
@click.option("--loss", "loss_kind", type=click.Choice(["l2", "features", "fd"]), default="l2", show_default=True,
              help="steps: squared L2 to the teacher's samples; features: LPIPS-style distance to them in the MNIST "
                   "classifier's activations; fd: no teacher, the Fréchet distance of a batch of samples to --fd-data "
                   "in that classifier's features (MNIST-shaped models).")
@click.option("--fd-data", default="mnist:train", show_default=True,
              help="steps --loss fd: DATASET:SPLIT whose images the samples are fitted to.")
@click.option("--sigma-grad", type=click.Choice(["on", "off"]), default="on", show_default=True,
              help="steps: the network's σ input in the gradient (off: through the solver's coefficients only).")
@click.option("--schedule", default=None, help="gits: the fine grid's schedule, steps: the initial one (default "
              "time_uniform); amed/epd: the student's (default: the method's). A rectified flow's default is rf.")
@click.option("--teacher", default=None, help="The teacher's ODE solver (default: heun).")
@click.option("--trajectories", default=None, type=click.IntRange(min=1),
              help="Teacher trajectories (default: 256 for gits, 10 000 for amed/epd).")
@click.option("--batch", default=None, type=click.IntRange(min=1), help="Default: 64 for gits, 128 for amed/epd.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--classes", default=None, help="Class-conditional models: classes cycled over the trajectories, e.g. 0-9.")
@click.option("--cfg", "cfg_scale", default=1.0, show_default=True, type=float,
              help="With --classes: the guidance scale the teacher and student run at (recorded with the result).")
@click.option("--device", default="auto", show_default=True)
@click.pass_context
def solver_cmd(ctx: click.Context, method: str, model_name: str, nfe: int, out: str, fine_steps: int, base: str,
               epochs: int, slack: float, loss_kind: str, fd_data: str, sigma_grad: str, schedule: str | None, teacher: str | None, trajectories: int | None,
               batch: int | None, seed: int, classes: str | None, cfg_scale: float, device: str) -> None:
    """Learn a few-step solver for a model: a schedule (gits: plain σ's, and timesteps, in OUT/schedule.json) or
    a predictor (amed, epd, adasde: OUT/predictor.json, used with `diffsamp sample --predictor OUT`).

    \b
    Examples:
      diffsamp train solver --method gits --model mnist-ddpm --nfe 5 --out runs/gits5
      diffsamp sample --model mnist-ddpm --sampler ipndm --sigmas runs/gits5 --out grid.png
      diffsamp train solver --method epd --model mnist-ddpm --nfe 5 --points 2 --out runs/epd5
      diffsamp sample --model mnist-ddpm --sampler epd --predictor runs/epd5 --out grid.png
    """
    for name in ("base", "epochs", "slack", "loss_kind", "fd_data", "sigma_grad"):
        if method != "steps" and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            flag = "loss" if name == "loss_kind" else name.replace("_", "-")
            raise click.UsageError(f"--{flag} is for --method steps")
    if method in ("amed", "epd", "adasde"):
        from diffsamp.cli.amed import train_amed_cmd

        if ctx.get_parameter_source("fine_steps") is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(f"--fine-steps is GITS's; --method {method} takes --teacher-m")
        args = ["--model", model_name, "--nfe", str(nfe), "--out", out, "--seed", str(seed), "--device", device]
        if method != "amed":
            args += ["--sampler", method]
        for flag, value in (("--schedule", schedule), ("--teacher", teacher), ("--trajectories", trajectories),
                            ("--batch", batch)):
            if value is not None:
                args += [flag, str(value)]
        if classes is not None:
            args += ["--classes", classes, "--cfg", str(cfg_scale)]
        ctx.invoke(train_amed_cmd, **_parsed(train_amed_cmd, [*args, *ctx.args]))
        return
    class_list = parse_class_list(classes)
    if class_list is None and cfg_scale != 1.0:
        raise click.UsageError("--cfg guides a class-conditional model: give --classes too")
    if ctx.args:
        raise click.UsageError(f"--method {method} takes no {ctx.args[0]}")
    if method == "steps":
        _learn_steps(model_name, nfe, out, fine_steps, base, epochs, slack, loss_kind, fd_data, sigma_grad, schedule,
                     teacher, trajectories, batch, seed, device, class_list, cfg_scale)
        return
    teacher = teacher or "heun"
    trajectories, batch = trajectories or 256, batch or 64
    from diffsamp.training.gits import GitsOptions, search_schedule

    opts = GitsOptions(steps=nfe, fine_steps=fine_steps, schedule=schedule, teacher=teacher,
                       trajectories=trajectories, batch=batch, seed=seed, classes=class_list, guidance=cfg_scale)
    grid, record, path = _find_schedule(opts, search_schedule, model_name, device, out)
    sigmas = ", ".join(f"{s:.4g}" for s in grid.sigmas.tolist())
    click.echo(f"{method} schedule of {nfe} steps for {model_name} ({trajectories} teacher trajectories on "
               f"{fine_steps} {record['options']['schedule']} steps, {record['seconds']:.0f} s): σ = [{sigmas}] -> {path}")


def _learn_steps(model_name: str, nfe: int, out: str, fine_steps: int, base: str, epochs: int, slack: float,
                 loss_kind: str, fd_data: str, sigma_grad: str, schedule: str | None, teacher: str | None, trajectories: int | None, batch: int | None, seed: int,
                 device: str, classes: list[int] | None = None, guidance: float = 1.0) -> None:
    """``--method steps``: LD3-style learned σ's, written as a schedule file like GITS's."""
    from diffsamp.training.steps import StepsOptions, train_steps

    opts = StepsOptions(steps=nfe, base=base, schedule=schedule, teacher=teacher or "heun",
                        teacher_steps=fine_steps, trajectories=trajectories or (256 if loss_kind == "fd" else 100),
                        batch=batch or (128 if loss_kind == "fd" else 25), epochs=epochs, slack=slack, seed=seed,
                        loss=loss_kind, fd_data=fd_data, classes=classes, guidance=guidance,
                        network_sigma_grad=sigma_grad == "on")
    grid, record, path = _find_schedule(opts, train_steps, model_name, device, out)
    sigmas = ", ".join(f"{s:.4g}" for s in grid.sigmas.tolist())
    pool = record["pool_loss"]
    pool_of = f"{opts.trajectories} trajectories, FD to {opts.fd_data}" if loss_kind == "fd" else \
        f"{opts.trajectories} teacher trajectories, {loss_kind} loss"
    click.echo(f"steps for {base}, {nfe} intervals, {model_name} ({pool_of}, "
               f"{epochs} epochs, pool loss {pool[0]:.4g} → {min(pool):.4g} kept from epoch {record['kept_epoch']}, "
               f"{record['seconds']:.0f} s): σ = [{sigmas}] -> {path}")


def _find_schedule(opts: Any, find: Callable[..., tuple[Any, dict]], model_name: str, device: str,
                   out: str) -> tuple[Any, dict, Any]:
    """Check ``opts`` (a usage error names the option), load the model, ``find(model, shape, opts)`` a schedule
    and write it to ``out``: (grid, record, path)."""
    from diffsamp.training.gits import write_schedule

    try:
        opts.check()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    model = load_or_fail(model_name, device=resolve_device(device))
    try:
        grid, record = find(model, tuple(model.sample_shape), opts)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return grid, record, write_schedule(out, model, model_name, grid, record)


def _parsed(command: click.Command, args: list[str]) -> dict:
    """``args`` parsed by ``command``'s own options (its checks and defaults): keyword arguments for ctx.invoke."""
    with command.make_context(f"diffsamp train {command.name}", list(args)) as sub:
        return dict(sub.params)


@main.group("solver")
def solver_group() -> None:
    """Learned schedules (found by `diffsamp train solver`): export them for other tools.

    \b
    Example:
      diffsamp solver export runs/gits5 --format diffusers
    """


@solver_group.command("export")
@click.argument("schedule", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["diffusers", "comfyui", "json"]), default="diffusers",
              show_default=True, help="diffusers: JSON with sigmas (and integer timesteps of a discrete-time model); "
                                      "comfyui: comma-separated σ's; json: {\"sigmas\": [...]}.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write here instead of printing.")
def export_cmd(schedule: str, fmt: str, out: str | None) -> None:
    """Print (or write) a schedule file's σ's in the form diffusers or ComfyUI take.

    \b
    Examples:
      diffsamp solver export runs/gits5 --format diffusers --out gits5-diffusers.json
      diffsamp solver export runs/gits5/schedule.json --format comfyui
    """
    from diffsamp.io import write_text
    from diffsamp.samplers.schedule_file import export_schedule, read_schedule

    try:
        _, doc = read_schedule(schedule)
        text = export_schedule(doc, fmt)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if out is None:
        click.echo(text, nl=False)
    else:
        write_text(out, text)
        click.echo(f"{fmt} schedule -> {out}")
