"""``diffsamp samplers`` and ``diffsamp schedules``: what is registered, one line each."""

from __future__ import annotations

import click

from diffsamp.cli import main
from diffsamp.samplers import available_samplers, available_schedules, get_sampler, schedule_description


@main.command("samplers")
def samplers_cmd() -> None:
    """List every registered sampler with its kind and a one-line description.

    \b
    Example:
      diffsamp samplers
    """
    names = available_samplers()
    width = max(len(n) for n in names)
    for name in names:
        spec = get_sampler(name)
        alias = f" (= {spec.alias_of} {dict(spec.defaults)})" if spec.alias_of else ""
        knobs = f"  [knobs: {', '.join(spec.knobs)}]" if spec.knobs else ""
        click.echo(f"{name:<{width}}  {spec.kind:<3}  {spec.description}{alias}{knobs}")


@main.command("schedules")
def schedules_cmd() -> None:
    """List every registered σ schedule with a one-line description.

    \b
    Example:
      diffsamp schedules
    """
    names = available_schedules()
    width = max(len(n) for n in names)
    for name in names:
        click.echo(f"{name:<{width}}  {schedule_description(name)}")
