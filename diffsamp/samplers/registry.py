"""The sampler registry: every sampler registered by name with its kind and expected NFE (DESIGN §7)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from diffsamp.samplers.grid import Grid

SamplerFn = Callable[..., Tensor]
NfeRule = Callable[[Grid, Mapping[str, Any]], int | None]

_SAMPLERS: dict[str, "SamplerSpec"] = {}


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    ``nfe(grid, knobs)`` is the expected number of network evaluations (None when adaptive, as for
    ``rk45``); tests assert it against a CountingDenoiser. ``defaults`` are knobs bound by an alias
    (``ddim`` = ``ancestral`` with eta=0). ``min_steps`` is the fewest grid intervals the method accepts.
    """

    name: str
    fn: SamplerFn
    kind: Literal["ode", "sde"]
    nfe: NfeRule
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    min_steps: int = 1
    alias_of: str | None = None

    def __call__(self, model: Any, x: Tensor, grid: Grid, **kwargs: Any) -> Tensor:
        if len(grid) < self.min_steps:
            raise ValueError(
                f"sampler {self.name!r} needs at least {self.min_steps} steps, got a grid of {len(grid)}"
            )
        unknown = set(kwargs) - set(self.knobs) - {"generator", "callback"}
        if unknown:
            raise ValueError(
                f"sampler {self.name!r} has no knob {', '.join(sorted(unknown))}; "
                f"its knobs: {', '.join(self.knobs) or 'none'}"
            )
        return self.fn(model, x, grid, **{**self.defaults, **kwargs})

    @property
    def knobs(self) -> list[str]:
        """The keyword-only tuning parameters of the sampler (besides generator and callback)."""
        params = inspect.signature(self.fn).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("generator", "callback")]

    def expected_nfe(self, grid: Grid, **knobs: Any) -> int | None:
        """The declared NFE for ``grid`` and ``knobs`` (None: adaptive)."""
        return self.nfe(grid, {**self.defaults, **knobs})


def register_sampler(
    name: str,
    *,
    kind: Literal["ode", "sde"],
    nfe: NfeRule,
    min_steps: int = 1,
    **defaults: Any,
) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator: register ``fn`` under ``name``; the first docstring line is its description."""

    def deco(fn: SamplerFn) -> SamplerFn:
        if name in _SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered")
        if not fn.__doc__:
            raise ValueError(f"sampler {name!r} needs a docstring citing what it implements")
        desc = fn.__doc__.strip().splitlines()[0]
        _SAMPLERS[name] = SamplerSpec(name, fn, kind, nfe, desc, dict(defaults), min_steps)
        return fn

    return deco


def register_alias(
    alias: str, target: str, *, description: str, kind: Literal["ode", "sde"] | None = None, **defaults: Any
) -> None:
    """Register ``alias`` as ``target`` with some knobs bound (e.g. ``ddim`` = ancestral, eta=0)."""
    if alias in _SAMPLERS:
        raise ValueError(f"sampler {alias!r} is already registered")
    base = get_sampler(target)
    _SAMPLERS[alias] = SamplerSpec(
        alias,
        base.fn,
        kind or base.kind,
        base.nfe,
        description,
        {**base.defaults, **defaults},
        base.min_steps,
        alias_of=target,
    )


def get_sampler(name: str) -> SamplerSpec:
    """The spec registered as ``name``; an unknown name lists the valid ones."""
    try:
        return _SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(sorted(_SAMPLERS))}") from None


def available_samplers() -> list[str]:
    """Names of every registered sampler, sorted."""
    return sorted(_SAMPLERS)
