"""The speed options a sampling command shares: ``--compile`` (``torch.compile`` of the network) and ``--cuda-graphs``
(the network call replayed from CUDA graphs), both from ``diffsamp.models.fast``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import click

from diffsamp.models.base import Denoiser


def fast_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--compile`` and ``--cuda-graphs`` (keyword arguments ``compile`` and ``cuda_graphs``)."""
    options = [
        click.option("--compile", "compile", is_flag=True,
                     help="Run the network through torch.compile (each new batch size compiles first: about a "
                          "minute on the CPU even for a small UNet, minutes for a large one)."),
        click.option("--cuda-graphs", is_flag=True,
                     help="Replay the network call from CUDA graphs, one per batch shape (CUDA devices only; "
                          "skipped with a warning elsewhere)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def apply_fast(model: Denoiser, compile: bool, cuda_graphs: bool, device: str) -> Denoiser:  # noqa: A002
    """``model`` with ``--compile`` and ``--cuda-graphs`` applied (``compile_denoiser``, then
    ``cuda_graph_denoiser`` around the compiled network). A network torch.compile cannot handle here is a one-line
    error; ``--cuda-graphs`` on a device other than CUDA is skipped with a one-line warning."""
    import torch

    from diffsamp.models.fast import compile_denoiser, cuda_graph_denoiser

    if compile:
        try:
            model = compile_denoiser(model)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--compile") from None
    if cuda_graphs:
        if torch.device(device).type != "cuda":
            warnings.warn(f"--cuda-graphs skipped: CUDA graphs need a CUDA device, not {device}", UserWarning,
                          stacklevel=2)
            return model
        try:
            model = cuda_graph_denoiser(model)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--cuda-graphs") from None
    return model
