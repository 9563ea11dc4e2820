"""Conditions as per-sample data bound to the model, and classifier-free guidance as a denoiser wrapper.

A conditional model declares what it takes in ``conditioning`` (a ``ClassConditioning``, …; None for an
unconditional model) and implements ``bind(cond) -> Denoiser``: the model with one encoded condition per
batch row fixed, a plain D(x, σ) that every sampler runs unchanged (CONTRIBUTING.md, Conventions). The
sampling core encodes the user's conditions once (``encode_conditions``), slices them with each batch of
seeds and binds them (``bind``, through any wrappers), so an image depends only on its seed and condition.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6, in x̂0 form, which is the same combination as in ε
form): D = D_u + w·(D_c − D_u), both halves in one network call on the doubled batch (``Guided``), with the
guidance interval of Kynkäänniemi et al. 2024 (w applied only for σ in [σ_lo, σ_hi], the conditional model
alone elsewhere) and the rescale of Lin et al. 2024 (Alg. 2, on the guided ε̂ = (x − D)/σ).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffsamp.models.base import Denoiser, Wrapper


@dataclass(frozen=True)
class ClassConditioning:
    """Class labels 0…K−1; ``null_class`` is the label of the unconditional model that guidance needs (the
    label-dropout class of Ho & Salimans 2022), None where the model was trained without one."""

    num_classes: int
    null_class: int | None = None
    kind: ClassVar[str] = "class"

    def describe(self) -> str:
        null = f", unconditional = class {self.null_class}" if self.null_class is not None else ", no unconditional class"
        return f"class labels 0–{self.num_classes - 1}{null}"

    def encode(self, values: Sequence[Any] | Tensor) -> Tensor:
        """The labels as a (N,) int64 tensor; a ValueError names the first that is not a class of this model."""
        out = []
        for v in (values.tolist() if isinstance(values, Tensor) else values):
            if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
                raise ValueError(f"class labels must be integers, got {v!r}")
            if not 0 <= int(v) < self.num_classes:
                raise ValueError(f"class {int(v)} is not one of this model's classes 0–{self.num_classes - 1}")
            out.append(int(v))
        return torch.tensor(out, dtype=torch.int64)

    def unconditional(self, n: int, negative: Any = None) -> Tensor:
        """``n`` null labels (the unconditional half of guidance), or ``n`` copies of class ``negative``."""
        if negative is not None:
            return self.encode([negative] * n)
        if self.null_class is None:
            raise ValueError("this class-conditional model was trained without an unconditional (null) class, "
                             "so classifier-free guidance cannot be applied to it; use a guidance scale of 1")
        return torch.full((n,), self.null_class, dtype=torch.int64)


@dataclass(frozen=True)
class TextConditioning:
    """Text prompts, encoded by the model's own text encoder(s) into what its network takes (``encode_prompts``:
    a list of N prompts → a tensor, or a dict of tensors, with N rows); the unconditional half of guidance is
    the empty prompt or the negative prompt."""

    encode_prompts: Any  # Callable[[list[str]], Tensor | dict[str, Tensor]]
    kind: ClassVar[str] = "text"

    def describe(self) -> str:
        return "text prompts"

    def encode(self, values: Sequence[Any]) -> Tensor | dict[str, Tensor]:
        if not all(isinstance(v, str) for v in values):
            bad = next(v for v in values if not isinstance(v, str))
            raise ValueError(f"this model takes text prompts, got {bad!r}")
        return self.encode_prompts(list(values))

    def unconditional(self, n: int, negative: Any = None) -> Tensor | dict[str, Tensor]:
        """``n`` encodings of the negative prompt (default: the empty prompt)."""
        return self.encode([negative if negative is not None else ""] * n)


Conditioning = ClassConditioning | TextConditioning
Encoded = Tensor | dict[str, Tensor]  # one row per sample


def take(cond: Encoded, rows: slice) -> Encoded:
    """Rows ``rows`` of encoded conditions (a tensor, or each tensor of a dict)."""
    return {k: v[rows] for k, v in cond.items()} if isinstance(cond, dict) else cond[rows]


def concat(a: Encoded, b: Encoded) -> Encoded:
    """Encoded conditions ``a`` then ``b`` (the doubled batch of guidance)."""
    return {k: torch.cat([a[k], b[k]]) for k in a} if isinstance(a, dict) else torch.cat([a, b])


def rows(cond: Encoded) -> int:
    """How many samples ``cond`` encodes."""
    return next(iter(cond.values())).shape[0] if isinstance(cond, dict) else cond.shape[0]


def tile(cond: Encoded, times: int) -> Encoded:
    """``cond`` repeated ``times`` times, block after block: the conditions of ``times`` stacked copies of a batch
    (a sampler that evaluates several points of one step in one network call, e.g. EPD)."""
    if times == 1:
        return cond
    return {k: v.repeat(times, *([1] * (v.ndim - 1))) for k, v in cond.items()} if isinstance(cond, dict) \
        else cond.repeat(times, *([1] * (cond.ndim - 1)))


def stacked_copies(x: Tensor, cond: Encoded) -> int:
    """How many stacked copies of the bound batch ``x`` holds (1 for the batch itself); a ValueError otherwise."""
    n = rows(cond)
    if x.shape[0] % n:
        raise ValueError(f"a batch of {x.shape[0]} rows for {n} bound conditions: expected a multiple of {n}")
    return x.shape[0] // n


def conditioning_of(model: Denoiser) -> Conditioning | None:
    """What ``model`` takes as a condition (through any wrappers), None if it is unconditional."""
    return getattr(model, "conditioning", None)


def encode_conditions(model: Denoiser, cond: Sequence[Any] | Tensor | None, n: int) -> Encoded | None:
    """``cond`` (one condition per seed) checked against what ``model`` takes and encoded; None for an
    unconditional model. A ValueError in one line for a condition of the wrong kind or count, before any
    network call."""
    kind = conditioning_of(model)
    if kind is None:
        if cond is not None:
            raise ValueError("this model is unconditional: it takes no condition (class label, prompt)")
        return None
    if cond is None:
        hint = 'cond=["a cat"] / --prompt "a cat"' if kind.kind == "text" else "cond=[3] / --class 3"
        raise ValueError(f"this model is conditional ({kind.describe()}): give one condition per seed, e.g. {hint}")
    if isinstance(cond, (str, bytes)) or not isinstance(cond, (Sequence, Tensor)):
        cond = [cond] * n
    if len(cond) != n:
        raise ValueError(f"{len(cond)} conditions for {n} seeds: give one condition per seed")
    return kind.encode(cond)


def bind(model: Denoiser, cond: Encoded) -> Denoiser:
    """``model`` with the encoded conditions ``cond`` (one per batch row) fixed: a plain D(x, σ). Wrappers
    around a conditional model are kept, around the bound innermost one."""
    if isinstance(model, Wrapper):
        outer = copy.copy(model)
        outer.inner = bind(model.inner, cond)
        return outer
    if conditioning_of(model) is None:
        raise ValueError(f"{type(model).__name__} is unconditional: it takes no condition")
    return model.bind(cond)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings: ``scale`` w (1: the conditional model alone; 0: the unconditional),
    ``interval`` (σ_lo, σ_hi) where w applies (Kynkäänniemi et al. 2024; None: everywhere), ``rescale`` φ
    (Lin et al. 2024, Alg. 2; 0: off) and ``negative``, the condition of the unconditional half (a negative
    prompt, or a class; None: the empty prompt or the null class)."""

    scale: float = 1.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    negative: Any = None

    def __post_init__(self) -> None:
        if not torch.isfinite(torch.tensor(float(self.scale))):
            raise ValueError(f"the guidance scale must be finite, got {self.scale}")
        if self.interval is not None:
            lo, hi = self.interval
            if not 0 <= lo < hi:
                raise ValueError(f"the guidance interval must be 0 <= σ_lo < σ_hi, got {self.interval}")
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"the guidance rescale must be in [0, 1], got {self.rescale}")

    @property
    def active(self) -> bool:
        """Whether the unconditional half is ever evaluated."""
        return self.scale != 1.0

    def record(self) -> dict[str, Any]:
        return {"scale": self.scale, "interval": list(self.interval) if self.interval else None,
                "rescale": self.rescale, "negative": self.negative}


class Guided(Wrapper):
    """Classifier-free guidance around a conditional model for one batch of conditions: a plain D(x, σ).

    Where w applies, one network call on the doubled batch [x; x] with conditions [c; u] gives D_c and D_u;
    D = D_u + w·(D_c − D_u); with rescale φ, ε̂ = (x − D)/σ is rescaled to the spread of the conditional ε̂_c
    per sample and mixed, ε̂' = φ·ε̂·std(ε̂_c)/std(ε̂) + (1 − φ)·ε̂ (Lin et al. 2024, Alg. 2). Elsewhere (σ
    outside the interval, or w = 1) the conditional model alone, in one pass of the plain batch.
    ``passes`` counts network passes per image (2 for a guided call, 1 otherwise; a call on k stacked copies of
    the batch counts k times as many).
    """

    def __init__(self, inner: Denoiser, cond: Encoded, uncond: Encoded, guidance: Guidance) -> None:
        super().__init__(inner)
        self.guidance = guidance
        self.cond, self.uncond = cond, uncond
        self.conditional = bind(inner, cond)
        self.both = bind(inner, concat(cond, uncond)) if guidance.active else None
        self._stacked: dict[int, Denoiser] = {}
        self.passes = 0  # network rows evaluated, per row of the bound batch

    conditioning = property(lambda self: None)  # bound: a plain D(x, σ)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        g = self.guidance
        inside = None  # no interval: guided everywhere, with no host sync on the σ's
        if g.interval is not None:
            inside = (sigma >= g.interval[0]) & (sigma <= g.interval[1])
        copies = stacked_copies(x, self.cond)
        if self.both is None or (inside is not None and not bool(inside.any())):
            self.passes += copies
            return self.conditional(x, sigma)
        self.passes += 2 * copies
        both = self.both
        if copies > 1:  # [x; x] of stacked copies: conditions [c; …; c; u; …; u]
            if copies not in self._stacked:
                self._stacked[copies] = bind(self.inner, concat(tile(self.cond, copies), tile(self.uncond, copies)))
            both = self._stacked[copies]
        d_c, d_u = both(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2)
        d = (d_c - d_u).mul_(g.scale).add_(d_u)  # D_u + w·(D_c − D_u), one temporary
        if g.rescale > 0:
            d = _rescaled(x, d, d_c, sigma, g.rescale)
        if inside is not None:
            d = torch.where(inside.view(-1, *([1] * (x.ndim - 1))), d, d_c)
        return d


def _rescaled(x: Tensor, d: Tensor, d_c: Tensor, sigma: Tensor, phi: float) -> Tensor:
    """Lin et al. 2024, Alg. 2 in ε̂ = (x − D)/σ: the guided ε̂ scaled to the conditional one's per-sample std."""
    s = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    eps, eps_c = (x - d) / s, (x - d_c) / s
    dims = tuple(range(1, x.ndim))
    std, std_c = eps.std(dim=dims, keepdim=True), eps_c.std(dim=dims, keepdim=True)
    eps = phi * eps * (std_c / std) + (1 - phi) * eps
    return x - s * eps


def trained_guidance(record: Mapping[str, Any]) -> float | None:
    """The guidance scale a learned solver was trained under, from its predictor config (``guidance``) or schedule
    file (``options``: ``classes`` and ``guidance``); None when it was trained without classes."""
    opts = record.get("options")
    opts = opts if isinstance(opts, Mapping) else record
    if opts.get("classes") is None:
        return None
    return float(opts.get("guidance", 1.0))


def guidance_mismatch(record: Mapping[str, Any], scale: float, what: str) -> str | None:
    """A one-line warning when ``what`` (a learned predictor or schedule, trained along guided teacher trajectories)
    runs at another classifier-free guidance scale than it was trained at (Ho & Salimans 2022): the trajectories it
    was fitted to change with w. None when the scales agree or it was trained without classes."""
    trained = trained_guidance(record)
    if trained is None or trained == scale:
        return None
    return f"{what} was trained under guidance w = {trained:g}; sampling at w = {scale:g}"


def trajectory_model(model: Denoiser, classes: Sequence[int] | None, guidance: float,
                     indices: Sequence[int]) -> Denoiser:
    """The plain D(x, σ) a solver trainer runs for the trajectories ``indices``: ``model`` itself when ``classes`` is
    None (a conditional model then fails in one line), else bound to ``classes[i mod len]`` for trajectory i and
    guided at scale ``guidance`` (classifier-free guidance, Ho & Salimans 2022; w = 1 is the conditional model)."""
    n = len(indices)
    if classes is None:
        if guidance != 1.0:
            raise ValueError("guidance needs a class-conditional model and its classes")
        encode_conditions(model, None, n)
        return model
    labels = [classes[i % len(classes)] for i in indices]
    return condition_model(model, encode_conditions(model, labels, n), Guidance(guidance))


def condition_model(model: Denoiser, cond: Encoded | None, guidance: Guidance | None) -> Denoiser:
    """The plain D(x, σ) the samplers run for one batch: ``model`` itself (unconditional), bound to ``cond``,
    or guided (``Guided``) when ``guidance`` has a scale other than 1."""
    if cond is None:
        if guidance is not None and guidance.active:
            raise ValueError("guidance needs a conditional model and a condition per seed")
        return model
    kind = conditioning_of(model)
    assert kind is not None
    if guidance is None or not guidance.active:
        return bind(model, cond)
    return Guided(model, cond, kind.unconditional(rows(cond), guidance.negative), guidance)
