"""Small helpers shared by every sampler: broadcasting, the ε̂ direction, seeded noise, step records, the
optional final denoising step, and ``capture`` (a module's output through a forward hook)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from diffsamp.models.base import Denoiser
from diffsamp.samplers.grid import Grid

Generator = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports to ``callback`` after interval ``i`` (σ → σ_next)."""

    i: int
    sigma: float
    sigma_next: float
    x: Tensor
    denoised: Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against a (B, ...) tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def to_d(x: Tensor, sigma: float | Tensor, denoised: Tensor) -> Tensor:
    """ε̂ = (x − D)/σ, the PF-ODE direction dx/dσ in σ-space (EDM Eq. 1, 3; AMED Eq. 6)."""
    if isinstance(sigma, Tensor):
        sigma = append_dims(sigma, x.ndim)
    return (x - denoised) / sigma


def sigma_batch(x: Tensor, sigma: float) -> Tensor:
    """σ as a (B,) tensor on x's device and dtype, as the Denoiser protocol takes it."""
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """Standard normal noise shaped like ``x`` (CONTRIBUTING.md: randomness is an argument).

    ``generator`` is None (global RNG), one ``torch.Generator`` (one draw for the whole batch), or one
    generator per sample: then sample i's noise does not depend on the batch size. Noise is drawn on the
    generator's device and then moved, so a CPU generator gives the same noise on CPU and GPU.
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {x.shape[0]}: pass one per sample")
    return randn_per_sample(gens, x.shape[1:], dtype=x.dtype).to(x.device)


def randn_per_sample(gens: Sequence[torch.Generator], shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> Tensor:
    """(len(gens), *shape) standard normal draws, row i from ``gens[i]`` alone (each row's values are what
    ``torch.randn(shape, generator=gens[i])`` gives), on the generators' device; written in place, row by row."""
    out = torch.empty((len(gens), *shape), dtype=dtype, device=gens[0].device if gens else None)
    for row, g in zip(out, gens):
        row.normal_(generator=g)
    return out


def final_nfe(grid: Grid, knobs: Mapping[str, Any]) -> int:
    """The extra evaluation of the ``final_denoise`` knob: 1 when it is on and the grid ends above 0."""
    return int(bool(knobs.get("final_denoise")) and not grid.ends_at_zero)


def one_stage_nfe(grid: Grid, knobs: Mapping[str, Any]) -> int:
    """NFE of a sampler with one evaluation per interval (plus ``final_denoise``)."""
    return len(grid) + final_nfe(grid, knobs)


def two_stage_nfe(grid: Grid, knobs: Mapping[str, Any]) -> int:
    """NFE of a two-stage sampler: two evaluations per interval, one on the step to σ = 0 (plus ``final_denoise``)."""
    return 2 * len(grid) - int(grid.ends_at_zero) + final_nfe(grid, knobs)


def final_denoise_step(model: Denoiser, x: Tensor, grid: Grid, enabled: bool) -> Tensor:
    """Tweedie's x̂0 = D(x, σ_K) after a grid that ends above 0 (Song et al. 2021, Score-SDE App. G)."""
    if enabled and not grid.ends_at_zero:
        return model(x, sigma_batch(x, float(grid.sigmas[-1])))
    return x


@dataclass
class Captured:
    """The output of the last forward pass of a hooked module (``None`` until the module runs)."""

    output: Tensor | None = field(default=None)


@contextmanager
def capture(module: nn.Module) -> Iterator[Captured]:
    """Record ``module``'s forward output (detached) while the block runs; the hook is always removed.

    AMED reads the UNet bottleneck this way (Zhou et al. 2024, AMED §3.4, Fig. 6): the feature of the most recent
    network call. A tuple output (some diffusers blocks) keeps its first element.
    """
    box = Captured()

    def hook(_mod: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, (tuple, list)):
            out = out[0]
        box.output = out.detach() if isinstance(out, Tensor) else None

    handle = module.register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
