"""The ``diffsamp`` command line: a click group whose subcommands live one topic per module.

Commands only parse and validate; the work is done by library functions (``diffsamp.api`` and friends).
"""

from __future__ import annotations

import click

from diffsamp import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="diffsamp")
def main() -> None:
    """diffsamp: sample from diffusion and flow models in one σ-space convention.

    \b
    Examples:
      diffsamp samplers                      # every registered sampler, one line each
      diffsamp schedules                     # every σ schedule
      diffsamp sample --model mnist-ddpm --sampler heun --steps 18 --seeds 0-63 --out grid.png
      diffsamp fid calc samples/ stats.npz
    """


def _register() -> None:
    # Each module adds its commands to `main`; imported here so `diffsamp --help` lists them all.
    from diffsamp.cli import registry_cmds  # noqa: F401

    for optional in ("sampling", "fid", "train", "rf", "nll"):
        try:
            __import__(f"diffsamp.cli.{optional}")
        except ModuleNotFoundError as exc:  # a topic module not written yet
            if exc.name != f"diffsamp.cli.{optional}":
                raise


_register()
