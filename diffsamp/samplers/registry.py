"""The sampler registry: every sampler registered by name with its kind and expected NFE (CONTRIBUTING.md)."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from diffsamp.samplers.grid import Grid

SamplerFn = Callable[..., Tensor]
NfeRule = Callable[[Grid, Mapping[str, Any]], int | None]

_SAMPLERS: dict[str, "SamplerSpec"] = {}
# names other toolkits use (k-diffusion, ComfyUI, diffusers): name → (target, description, kind, bound knobs);
# resolved at lookup, so a target registered by a module imported later still resolves
_NAMES: dict[str, tuple[str, str, str | None, dict[str, Any]]] = {}
_RESOLVED: dict[str, "SamplerSpec"] = {}


class KnobValueError(ValueError):
    """A knob's value is not finite or outside its declared ``KnobRange``."""


@dataclass(frozen=True)
class KnobRange:
    """The values a numeric knob accepts: ``lo``/``hi`` bounds (None: unbounded), each closed unless ``*_open``.
    Every float knob must be finite besides; declared per knob at registration (``register_sampler(ranges=…)``)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""  # shown with the refusal, e.g. what the bound protects
    infinite_ok: bool = False  # +inf is a meaningful value (an open-ended σ window such as EDM's s_tmax)

    def __contains__(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __str__(self) -> str:
        return self.describe(integer=False)

    def describe(self, *, integer: bool) -> str:
        """``in (0, 1]``, ``> 0``, or for an integer knob with closed bounds ``1 to 4``."""
        if integer and self.lo is not None and self.hi is not None and not (self.lo_open or self.hi_open):
            return f"{self.lo:g} to {self.hi:g}"
        if self.hi is None:
            return f"{'>' if self.lo_open else '≥'} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '≤'} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


@dataclass(frozen=True)
class Learned:
    """How a learned sampler is distilled (``diffsamp train amed|solver``): its step rule, its teacher and the
    points the teacher inserts per interval (AMED §4.1), whether the student carries its own state between
    intervals (multistep) or restarts from the teacher's point, whether what it learns is a sample-independent
    table of K points (EPD, AdaSDE) rather than AMED's predictor, and how its grids end by default."""

    step: str
    teacher: tuple[str, int]
    multistep: bool = False
    table: bool = False
    final_step: Literal["zero", "sigma_min"] = "sigma_min"


@dataclass(frozen=True)
class Planning:
    """What planning a cell (``diffsamp bench``) or a training run needs from a sampler: its default schedule (None:
    the model's own), the fixed r of a two-stage method in the generalized DPM-Solver-2 (heun 1, dpm2 ½; AMED
    Table 1: at odd NFE its first step is AFS's) and, for a learned sampler, ``Learned``."""

    default_schedule: str | None = None
    two_stage_r: float | None = None
    learned: Learned | None = None


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler.

    ``nfe(grid, knobs)`` is the expected number of network evaluations (None when adaptive, as for
    ``rk45``), given every knob's value; tests assert it against a CountingDenoiser. Knob defaults are
    written once, in the function's signature; ``defaults`` are the knobs an alias binds (``ddim`` =
    ``ancestral`` with eta=0). ``min_steps`` is the fewest grid intervals the method accepts.
    ``min_sigma_ratio``: the smallest σ_{i+1}/σ_i per step the method is stable at (None: any); callers warn
    below it (``diffsamp.api.setting_warnings``) and ``diffsamp samplers NAME`` states it.
    """

    name: str
    fn: SamplerFn
    kind: Literal["ode", "sde"]
    nfe: NfeRule
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    min_steps: int = 1
    alias_of: str | None = None
    min_sigma_ratio: float | None = None
    ranges: Mapping[str, KnobRange] = field(default_factory=dict)
    planning: Planning = field(default_factory=Planning)

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
        self.check_knobs(**{k: v for k, v in kwargs.items() if k not in ("generator", "callback")})
        return self.fn(model, x, grid, **{**self.defaults, **kwargs})

    def check_knobs(self, **knobs: Any) -> None:
        """A ValueError naming the first knob whose value is not finite or outside its declared range."""
        types_ = {k: t for k, (t, _) in self.knob_specs().items()} if self.ranges else {}
        for name, value in knobs.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            what = f"sampler {self.name!r}: {name}"
            rng = self.ranges.get(name)
            if not math.isfinite(value) and not (rng is not None and rng.infinite_ok and value == math.inf):
                raise KnobValueError(f"{what} must be a finite number, got {value}")
            if rng is not None and value not in rng:
                raise KnobValueError(f"{what} must be {rng.describe(integer=types_.get(name) is int)}, got {value:g}" + (f" ({rng.why})" if rng.why else ""))

    @property
    def knobs(self) -> list[str]:
        """The keyword-only tuning parameters of the sampler (besides generator and callback)."""
        return list(self.knob_specs())

    def knob_specs(self) -> dict[str, tuple[Any, Any]]:
        """Knob name → (type from the signature, default: the alias's binding, else the signature's)."""
        return {name: (tp, self.defaults.get(name, default)) for name, tp, default in _signature_knobs(self.fn)}

    def knob_values(self, **knobs: Any) -> dict[str, Any]:
        """Every knob's value: ``knobs`` over the alias's bindings over the signature's defaults."""
        return {**{k: d for k, (_, d) in self.knob_specs().items()}, **knobs}

    def expected_nfe(self, grid: Grid, **knobs: Any) -> int | None:
        """The declared NFE for ``grid`` and ``knobs`` (None: adaptive)."""
        return self.nfe(grid, self.knob_values(**knobs))

    def parse_knob(self, name: str, text: str) -> Any:
        """``text`` converted to knob ``name``'s type (bool, int, float, str, a Literal's choices, or None for
        an optional knob given "none"); a ValueError naming the valid knobs or values otherwise."""
        specs = self.knob_specs()
        if name not in specs:
            raise ValueError(f"sampler {self.name!r} has no knob {name!r}; its knobs: {describe_knobs(specs) or 'none'}")
        value = _convert(text, specs[name][0], f"knob {name!r} of sampler {self.name!r}")
        self.check_knobs(**{name: value})
        return value


@functools.cache
def _signature_knobs(fn: SamplerFn) -> tuple[tuple[str, Any, Any], ...]:
    """(name, type, default) of each keyword-only knob in ``fn``'s signature, read once per function
    (resolving the annotations costs milliseconds; every sampler call checks its knobs)."""
    hints = typing.get_type_hints(fn)
    return tuple((p.name, hints.get(p.name, Any), p.default) for p in inspect.signature(fn).parameters.values()
                 if p.kind is p.KEYWORD_ONLY and p.name not in ("generator", "callback"))


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def describe_knobs(specs: Mapping[str, tuple[Any, Any]]) -> str:
    """``name: type = default`` for each knob, comma-separated."""
    return ", ".join(f"{k}: {_type_name(t)} = {d!r}" for k, (t, d) in specs.items())


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(text: str, tp: Any, what: str) -> Any:
    """Convert ``text`` to the annotation ``tp`` (see ``SamplerSpec.parse_knob``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() == "none":
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return _convert(text, a, what)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{what}: cannot read {text!r}")
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ValueError(f"{what} must be one of {', '.join(map(str, args))}, got {text!r}")
    if tp is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ValueError(f"{what} is a bool (true/false), got {text!r}")
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{what} is {tp.__name__}, got {text!r}") from None
    raise ValueError(f"{what} has type {_type_name(tp)}, which cannot be given as text")


def register_sampler(
    name: str,
    *,
    kind: Literal["ode", "sde"],
    nfe: NfeRule,
    min_steps: int = 1,
    min_sigma_ratio: float | None = None,
    ranges: Mapping[str, KnobRange] | None = None,
    planning: Planning | None = None,
) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator: register ``fn`` under ``name``; the first docstring line is its description, its signature's
    keyword-only parameters (besides generator and callback) are its knobs, with their defaults. ``ranges``:
    the values each numeric knob accepts (``KnobRange``), checked when a knob is parsed or passed; float knobs
    must be finite in any case. ``planning``: what bench and the trainers need to plan it (``Planning``)."""

    def deco(fn: SamplerFn) -> SamplerFn:
        if name in _SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered")
        if not fn.__doc__:
            raise ValueError(f"sampler {name!r} needs a docstring citing what it implements")
        desc = fn.__doc__.strip().splitlines()[0]
        unknown = set(ranges or {}) - {
            p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
        if unknown:
            raise ValueError(f"sampler {name!r} declares ranges for unknown knobs {sorted(unknown)}")
        _SAMPLERS[name] = SamplerSpec(name, fn, kind, nfe, desc, {}, min_steps, min_sigma_ratio=min_sigma_ratio,
                                      ranges=dict(ranges or {}), planning=planning or Planning())
        return fn

    return deco


def register_alias(
    alias: str, target: str, *, description: str, kind: Literal["ode", "sde"] | None = None, lazy: bool = False,
    **defaults: Any,
) -> None:
    """Register ``alias`` as ``target`` with some knobs bound (e.g. ``ddim`` = ancestral, eta=0).

    ``lazy``: a name another toolkit uses (k-diffusion's ``dpmpp_2m``, ComfyUI's ``uni_pc_bh2``, diffusers'
    ``UniPCMultistepScheduler``). It is resolved when first looked up, so its target may be registered later
    (by a module imported after this one); it works wherever a name does (``get_sampler``, ``generate``,
    ``--sampler``) but is listed beside its target (``sampler_aliases``), not by ``available_samplers``.
    """
    if alias in _SAMPLERS or alias in _NAMES:
        raise ValueError(f"sampler {alias!r} is already registered")
    if lazy:
        _NAMES[alias] = (target, description, kind, dict(defaults))
        return
    base = get_sampler(target)
    _SAMPLERS[alias] = _alias_spec(alias, base, target, description, kind, defaults)


def _alias_spec(alias: str, base: SamplerSpec, target: str, description: str, kind: str | None,
                defaults: Mapping[str, Any]) -> SamplerSpec:
    return SamplerSpec(
        alias,
        base.fn,
        kind or base.kind,  # type: ignore[arg-type]
        base.nfe,
        description,
        {**base.defaults, **defaults},
        base.min_steps,
        alias_of=target,
        min_sigma_ratio=base.min_sigma_ratio,
        ranges=base.ranges,
        planning=base.planning,
    )


def _resolve(name: str) -> SamplerSpec | None:
    """The spec of a registered sampler or of a lazy name whose target is registered (None otherwise)."""
    if name in _SAMPLERS:
        return _SAMPLERS[name]
    if name in _RESOLVED:
        return _RESOLVED[name]
    if name not in _NAMES:
        return None
    target, description, kind, defaults = _NAMES[name]
    base = _resolve(target)
    if base is None:
        return None
    _RESOLVED[name] = spec = _alias_spec(name, base, target, description, kind, defaults)
    return spec


def suggest_samplers(name: str, n: int = 3) -> list[str]:
    """The registered names and aliases closest to ``name`` (difflib, case-insensitive), best first."""
    names = available_samplers() + sorted(sampler_aliases())
    lower = {k.lower(): k for k in reversed(names)}
    exact = [lower[name.lower()]] if name.lower() in lower else []
    close = difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)
    return list(dict.fromkeys(exact + [lower[c] for c in close]))[:n]


def get_sampler(name: str) -> SamplerSpec:
    """The spec registered as ``name`` (or a lazy alias of one); an unknown name suggests the closest ones and
    lists the valid ones."""
    spec = _resolve(name)
    if spec is not None:
        return spec
    if name in _NAMES:
        raise ValueError(f"sampler {name!r} names {_NAMES[name][0]!r}, which is not registered")
    close = suggest_samplers(name)
    hint = f"; did you mean {' or '.join(close)}? " if close else "; "
    raise ValueError(f"unknown sampler {name!r}{hint}available: {', '.join(available_samplers())} "
                     "(and their aliases: `diffsamp samplers`)")


def learned_samplers() -> list[str]:
    """The registered samplers that sample with a trained predictor or table (``Planning.learned``), sorted."""
    return [n for n in available_samplers() if _SAMPLERS[n].planning.learned is not None]


def available_samplers() -> list[str]:
    """Names of every registered sampler, sorted (lazy aliases are in ``sampler_aliases``)."""
    return sorted(_SAMPLERS)


def sampler_aliases() -> dict[str, str]:
    """Every lazy alias whose target is registered → that target, sorted by alias."""
    return {a: _NAMES[a][0] for a in sorted(_NAMES) if _resolve(a) is not None}
