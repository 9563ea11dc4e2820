"""What every command shares: the click group, device resolution, integer lists, ``--knob NAME=VALUE`` and
loading a model with a one-line error."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click

from diffsamp._version import __version__
from diffsamp.models.base import Denoiser


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="diffsamp")
def main() -> None:
    """diffsamp: sample from diffusion and flow models in one σ-space convention.

    \b
    Examples:
      diffsamp samplers                      # every registered sampler, one line each
      diffsamp samplers dpm2                 # one sampler's knobs, with types and defaults
      diffsamp schedules                     # every σ schedule
      diffsamp sample --model mnist-ddpm --sampler heun --steps 18 --seeds 0-63 --out grid.png
      diffsamp fid calc samples/ stats.npz
    """


def resolve_device(device: str) -> str:
    """``auto`` → cuda when available, else cpu; a CUDA device on a machine without one is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")
    return device


def parse_int_list(value: str | None) -> tuple[int, ...] | None:
    """``32,64,128`` → (32, 64, 128); ``none`` or empty → (); None stays None (the default)."""
    if value is None:
        return None
    value = value.strip()
    if value.lower() in ("", "none"):
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 32,64,128, got {value!r}") from None


def parse_channels(value: str) -> tuple[int, ...]:
    """``--channels 32,64,128``: UNet channels per resolution level, at least one."""
    channels = parse_int_list(value)
    if not channels:
        raise click.BadParameter("at least one level", param_hint="--channels")
    return channels


def pop_options(cls: type, kw: dict[str, Any], **given: Any) -> Any:
    """A ``cls`` dataclass from the command's keyword arguments named like its fields (popped from ``kw``),
    with ``channels``/``attention_levels`` parsed as integer lists and ``given`` set as is."""
    names = {f.name for f in dataclasses.fields(cls)} - set(given)
    values = {k: kw.pop(k) for k in list(kw) if k in names}
    if "channels" in values:
        values["channels"] = parse_channels(values["channels"])
    if "attention_levels" in values:
        values["attention_levels"] = parse_int_list(values["attention_levels"])
    return cls(**values, **given)


def knob_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--knob NAME=VALUE`` (repeatable): a sampler knob, typed from the sampler's signature."""
    return click.option(
        "--knob", "knobs", multiple=True, metavar="NAME=VALUE",
        help="Set a sampler knob (repeatable), e.g. --knob r=0.3; `diffsamp samplers NAME` lists them.",
    )(f)


def parse_knobs(sampler: str, items: tuple[str, ...]) -> dict[str, Any]:
    """``("r=0.3", "final_denoise=true")`` → typed knobs of ``sampler``; a one-line usage error otherwise."""
    from diffsamp.samplers import get_sampler
    from diffsamp.samplers.registry import describe_knobs

    spec = get_sampler(sampler)
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise click.BadParameter(
                f"expected NAME=VALUE, got {item!r}; knobs of {sampler}: {describe_knobs(spec.knob_specs()) or 'none'}",
                param_hint="--knob")
        try:
            out[name] = spec.parse_knob(name, text.strip())
        except ValueError as exc:
            listed = "its knobs:" in str(exc)
            raise click.BadParameter(str(exc) if listed else f"{exc}; knobs of {sampler}: "
                                     f"{describe_knobs(spec.knob_specs()) or 'none'}", param_hint="--knob") from None
    return out


def load_or_fail(name: str, **kwargs: Any) -> Denoiser:
    """``diffsamp.models.load`` with its errors as one-line click errors."""
    from diffsamp.models import load

    try:
        return load(name, **kwargs)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None
