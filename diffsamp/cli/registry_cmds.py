"""``diffsamp samplers [NAME]`` and ``diffsamp schedules``: what is registered, one line each."""

from __future__ import annotations

import click

from diffsamp.cli._common import main
from diffsamp.samplers import available_samplers, available_schedules, get_sampler, schedule_description
from diffsamp.samplers.registry import describe_knobs


@main.command("samplers")
@click.argument("name", required=False, type=click.Choice(available_samplers()))
def samplers_cmd(name: str | None) -> None:
    """List every registered sampler with its kind and a one-line description; with NAME, that sampler's
    knobs with their types and defaults (set them with --knob NAME=VALUE).

    \b
    Examples:
      diffsamp samplers
      diffsamp samplers dpm2
    """
    if name is not None:
        spec = get_sampler(name)
        alias = f" (= {spec.alias_of} {dict(spec.defaults)})" if spec.alias_of else ""
        click.echo(f"{name}  {spec.kind}  {spec.description}{alias}")
        for knob, (tp, default) in spec.knob_specs().items():
            rng = spec.ranges.get(knob)
            click.echo(f"  {describe_knobs({knob: (tp, default)})}" + (f"  ({rng.describe(integer=tp is int)})" if rng is not None else ""))
        if not spec.knobs:
            click.echo("  (no knobs)")
        if spec.min_sigma_ratio is not None:
            click.echo(f"  note: unstable when σ_next/σ < {spec.min_sigma_ratio} in a step (e.g. 10 karras steps give "
                       "pure noise on mnist-ddpm): use more steps or an ODE sampler such as heun or dpmpp2m; "
                       "sample warns when the grid is too coarse")
        return
    names = available_samplers()
    width = max(len(n) for n in names)
    for n in names:
        spec = get_sampler(n)
        alias = f" (= {spec.alias_of} {dict(spec.defaults)})" if spec.alias_of else ""
        knobs = f"  [knobs: {', '.join(spec.knobs)}]" if spec.knobs else ""
        click.echo(f"{n:<{width}}  {spec.kind:<3}  {spec.description}{alias}{knobs}")


@main.command("schedules")
def schedules_cmd() -> None:
    """List every registered σ schedule with a one-line description.

    \b
    Example:
      diffsamp schedules
    """
    names = available_schedules()
    width = max(len(n) for n in names)
    for n in names:
        click.echo(f"{n:<{width}}  {schedule_description(n)}")
