"""``diffsamp samplers [NAME]`` and ``diffsamp schedules``: what is registered, one line each."""

from __future__ import annotations

import click

from diffsamp.cli._common import SamplerName, main
from diffsamp.samplers import available_samplers, available_schedules, get_sampler, sampler_aliases, schedule_description
from diffsamp.samplers.registry import describe_knobs


DPMPP3M_GAP = "up to 0.57 in a pixel, RMS 0.060, images in [-1, 1], 64 seeds"  # measured, see the dpmpp docstring


@main.command("samplers")
@click.argument("name", required=False, type=SamplerName())
def samplers_cmd(name: str | None) -> None:
    """List every registered sampler with its kind, a one-line description and the names other toolkits give it
    (k-diffusion, ComfyUI, diffusers: aliases, usable wherever a name is); with NAME (or an alias), that
    sampler's knobs with their types and defaults (set them with --knob NAME=VALUE).

    \b
    Examples:
      diffsamp samplers
      diffsamp samplers dpm2
      diffsamp samplers uni_pc_bh2
    """
    aliases: dict[str, list[str]] = {}
    for alias, target in sampler_aliases().items():
        aliases.setdefault(target, []).append(alias)
    if name is not None:
        spec = get_sampler(name)
        alias = f" (= {spec.alias_of} {dict(spec.defaults)})" if spec.alias_of else ""
        click.echo(f"{name}  {spec.kind}  {spec.description}{alias}")
        if spec.fn.__name__ == "dpmpp" and spec.knob_values().get("order") == 3:
            click.echo("  note: below 15 steps it follows diffusers (lower-order final steps, the 2M rule at the second "
                       "step) and so differs from k-diffusion's/ComfyUI's 3M (on mnist-ddpm at 10 karras steps by "
                       f"{DPMPP3M_GAP}); --knob variant=k-diffusion gives theirs")
        if aliases.get(name):
            click.echo(f"  also known as: {', '.join(aliases[name])}")
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
        aka = f"  [aliases: {', '.join(aliases[n])}]" if aliases.get(n) else ""
        click.echo(f"{n:<{width}}  {spec.kind:<3}  {spec.description}{alias}{knobs}{aka}")


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
