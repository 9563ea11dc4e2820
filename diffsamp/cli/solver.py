"""``diffsamp train solver``: learned few-step schedules (GITS; AMED predictors stay with ``diffsamp train amed``)."""

from __future__ import annotations

import click

from diffsamp.cli._common import load_or_fail, main, resolve_device, writable_folder
from diffsamp.cli.train import train

METHODS = ("gits",)


@train.command("solver")
@click.option("--method", type=click.Choice(METHODS), default="gits", show_default=True,
              help="gits: the K-step schedule of least Euler error along teacher trajectories, by dynamic "
                   "programming (Chen et al. 2024). AMED predictors: `diffsamp train amed`.")
@click.option("--model", "model_name", required=True, help="Zoo name, local model/run directory or Hub id.")
@click.option("--nfe", required=True, type=click.IntRange(min=1), help="Steps of the schedule (its NFE with a "
              "one-evaluation sampler such as ddim, ipndm or dpmpp2m), the last one the denoising step to σ = 0.")
@click.option("--out", required=True, type=click.Path(file_okay=False), callback=writable_folder,
              help="Folder for schedule.json.")
@click.option("--fine-steps", default=100, show_default=True, type=click.IntRange(min=2),
              help="Intervals of the teacher's fine grid, among whose points the schedule is chosen.")
@click.option("--schedule", default="time_uniform", show_default=True, help="The fine grid's schedule.")
@click.option("--teacher", default="heun", show_default=True, help="The teacher's ODE solver on the fine grid.")
@click.option("--trajectories", default=256, show_default=True, type=click.IntRange(min=1),
              help="Teacher trajectories (seeds SEED…SEED+N−1) the costs are averaged over.")
@click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--device", default="auto", show_default=True)
def solver_cmd(method: str, model_name: str, nfe: int, out: str, fine_steps: int, schedule: str, teacher: str,
               trajectories: int, batch: int, seed: int, device: str) -> None:
    """Find a few-step schedule for a model and write it as plain σ's (and timesteps) to OUT/schedule.json.

    \b
    Examples:
      diffsamp train solver --method gits --model mnist-ddpm --nfe 5 --out runs/gits5
      diffsamp sample --model mnist-ddpm --sampler ipndm --sigmas runs/gits5 --out grid.png
    """
    from diffsamp.training.gits import GitsOptions, search_schedule, write_schedule

    opts = GitsOptions(steps=nfe, fine_steps=fine_steps, schedule=schedule, teacher=teacher,
                       trajectories=trajectories, batch=batch, seed=seed)
    try:
        opts.check()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    device = resolve_device(device)
    model = load_or_fail(model_name, device=device)
    try:
        grid, record = search_schedule(model, tuple(model.sample_shape), opts)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    path = write_schedule(out, model, model_name, grid, record)
    sigmas = ", ".join(f"{s:.4g}" for s in grid.sigmas.tolist())
    click.echo(f"{method} schedule of {nfe} steps for {model_name} ({trajectories} teacher trajectories on "
               f"{fine_steps} {schedule} steps, {record['seconds']:.0f} s): σ = [{sigmas}] -> {path}")


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
    from diffsamp.training.gits import export_schedule, read_schedule

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
