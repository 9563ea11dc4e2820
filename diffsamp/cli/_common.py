"""What every command shares: the click group, device resolution, integer lists, ``--knob NAME=VALUE`` and
loading a model with a one-line error."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import click

from diffsamp._version import __version__
from diffsamp.models.base import Denoiser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    import sys

    from tqdm import tqdm

    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # each warning once per command (the small-N FID warning, not once per bench cell)
        seen = ctx.meta.setdefault("diffsamp.warned", set())
        if str(message) in seen:
            return
        seen.add(str(message))
    tqdm.write(f"warning: {message}", file=sys.stderr)  # above a live progress bar, not into its line


class _Group(click.Group):
    """The command group; under torchrun a peer that failed is this process's one-line error, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        import torch.distributed

        from diffsamp import dist

        try:
            result = super().invoke(ctx)
            if ctx.parent is None:  # every rank finished (rank 0's last writes too) before any leaves the group
                dist.barrier()
            return result
        except dist.RankFailedError as exc:
            raise click.ClickException(str(exc)) from None
        except torch.distributed.DistError as exc:  # a collective inside torch (DDP's all-reduce) lost its peer
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise click.ClickException(f"rank {dist.rank()}: another process of this job stopped ({first}); "
                                       "rerun with --resume / --skip-existing to finish the work") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="diffsamp")
@click.pass_context
def main(ctx: click.Context) -> None:
    """diffsamp: sample from diffusion and flow models in one σ-space convention.

    \b
    Examples:
      diffsamp samplers                      # every registered sampler, one line each
      diffsamp samplers dpm2                 # one sampler's knobs, with types and defaults
      diffsamp schedules                     # every σ schedule
      diffsamp sample --model mnist-ddpm --sampler heun --steps 18 --seeds 0-63 --out grid.png
      diffsamp fid calc samples/ stats.npz
    """
    ctx.with_resource(warnings.catch_warnings())  # restored when the command ends
    warnings.showwarning = _one_line_warning  # a warning is one line on stderr, as errors are
    _join_torchrun(ctx)


def _silence_progress_bars() -> None:
    """Every tqdm bar of this process is disabled, whatever its caller passes (ranks other than 0)."""
    import tqdm.std

    init = tqdm.std.tqdm.__init__

    def disabled(self, *args: Any, **kwargs: Any) -> None:  # noqa: ANN001
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = disabled


def _join_torchrun(ctx: click.Context) -> None:
    """Under torchrun: join the process group for the command; only rank 0 prints, warns and shows progress."""
    import contextlib
    import os

    from diffsamp import dist

    if not dist.launched():
        return
    dist.init()
    ctx.call_on_close(dist.shutdown)
    if not dist.is_main():
        _silence_progress_bars()
        warnings.simplefilter("ignore")
        devnull = ctx.with_resource(open(os.devnull, "w"))
        ctx.with_resource(contextlib.redirect_stdout(devnull))


DTYPES = ("float32", "bfloat16", "float16")


def network_dtype(name: str) -> Any:
    """``--dtype`` → the torch dtype to load the network in (None for float32: as stored)."""
    import torch

    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_device(device: str) -> str:
    """``device`` if this machine has it: cpu, cuda, cuda:N or mps; a ValueError naming the problem otherwise."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"CUDA is not available on this machine, so --device {device} cannot be used; "
                             "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def resolve_device(device: str | None, hint: str = "--device") -> str:
    """``auto`` (or None) → cuda when available, else cpu (under torchrun ``cuda`` is the local rank's GPU); a device
    this machine lacks is a usage error."""
    import torch

    from diffsamp import dist

    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist.world_size() > 1:  # under torchrun: the local rank's GPU
        device = f"cuda:{dist.local_rank()}"
    try:
        return check_device(device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def nonnegative(value: float, digits: int) -> str:
    """A distance for printing: a round-off negative (FID, or KID's unbiased estimate of an equal pair) shows
    as 0, with the exact value beside it (the API returns it as is)."""
    if value >= 0:
        return f"{value:.{digits}f}"
    return f"{0:.{digits}f} (round-off: {value:.2g})"


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
    from diffsamp.samplers.registry import KnobValueError, describe_knobs

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
        except KnobValueError as exc:  # a value out of range: the knob is named, its range said
            raise click.BadParameter(str(exc), param_hint="--knob") from None
        except ValueError as exc:
            listed = "its knobs:" in str(exc)
            raise click.BadParameter(str(exc) if listed else f"{exc}; knobs of {sampler}: "
                                     f"{describe_knobs(spec.knob_specs()) or 'none'}", param_hint="--knob") from None
    return out


def check_writable(path: str, hint: str, *, folder: bool) -> None:
    """Refuse, before any expensive work, a destination that cannot be written: the folder (``path`` itself, or
    its parent for a file) is created if missing and a probe file is written in it and removed, so a read-only
    file system, a missing permission or an impossible folder (``/proc/x``) is a one-line error naming it."""
    import errno
    import os
    import tempfile
    from pathlib import Path

    p = Path(path).expanduser()
    if not folder and p.is_dir():
        raise click.BadParameter(f"{p} is a folder; give a file name such as {p / 'grid.png'}", param_hint=hint)
    where = p if folder else p.parent
    first = where
    while not first.exists() and first != first.parent:
        first = first.parent
    if not first.is_dir():
        raise click.BadParameter(f"cannot write {p}: {first} is a file, not a folder", param_hint=hint)
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(f"cannot create the folder {where}: {os.strerror(exc.errno or errno.EIO)}",
                                 param_hint=hint) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffsamp-write-test.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise click.BadParameter(f"cannot write in the folder {where}: {os.strerror(exc.errno or errno.EIO)}",
                                 param_hint=hint) from None


def writable_folder(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback for a run/output folder option: ``check_writable`` as soon as the option is parsed."""
    if value is not None:
        check_writable(value, param.opts[0] if param.opts else str(param.name), folder=True)
    return value


def load_or_fail(name: str, **kwargs: Any) -> Denoiser:
    """``diffsamp.models.load`` with its errors as one-line click errors."""
    from diffsamp.models import load

    try:
        return load(name, **kwargs)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None


class SamplerName(click.ParamType):
    """A registered sampler or any of its aliases (k-diffusion, ComfyUI, diffusers names); an unknown name is a
    usage error suggesting the closest ones."""

    name = "sampler"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:  # noqa: ARG002
        return "NAME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from diffsamp.samplers import get_sampler

        try:
            get_sampler(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return value

