"""σ schedules (continuous, u ∈ [0, 1] → σ with u = 0 at σ_max) and grids (their discretisations).

A ``Grid`` is data: a 1-D, strictly decreasing float64 tensor of σ's whose last entry may be 0;
``len(grid)`` is the number of intervals. Samplers never build grids (CONTRIBUTING.md, Conventions).
Formulas: karras = EDM/AMED polynomial (EDM Eq. 5), logsnr and time_uniform (AMED §4.1; EDM Table 1, VP),
ddpm = the model's discrete timesteps with diffusers' spacings (DDIM §4.2, App. D.2), rf (RF §5: uniform in t).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from diffsamp.models.base import Denoiser
from diffsamp.models.diffusers_unet import alphas_cumprod_of
from diffsamp.models.parameterization import T_MAX, T_MIN, ddpm_sigmas


@dataclass(frozen=True)
class Grid:
    """Decreasing σ's σ_0 > σ_1 > … > σ_K ≥ 0 (float64); ``len`` = K intervals."""

    sigmas: Tensor

    def __post_init__(self) -> None:
        s = torch.as_tensor(self.sigmas, dtype=torch.float64).detach().cpu()
        object.__setattr__(self, "sigmas", s)
        if s.ndim != 1 or s.numel() < 2:
            raise ValueError(f"a grid needs a 1-D tensor of at least 2 σ's, got shape {tuple(s.shape)}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"grid σ's must be finite, got {s.tolist()}")
        if bool((s < 0).any()):
            raise ValueError(f"grid σ's must be non-negative, got {s.tolist()}")
        if not bool((s[1:] < s[:-1]).all()):
            raise ValueError(f"grid σ's must be strictly decreasing, got {s.tolist()}")

    def __len__(self) -> int:
        return self.sigmas.numel() - 1

    def intervals(self) -> Iterator[tuple[float, float]]:
        """(σ_i, σ_{i+1}) as Python floats, i = 0 … K−1."""
        vals = self.sigmas.tolist()
        return iter(zip(vals[:-1], vals[1:]))

    @property
    def ends_at_zero(self) -> bool:
        return float(self.sigmas[-1]) == 0.0

    def __repr__(self) -> str:
        return f"Grid({len(self)} intervals, σ: {float(self.sigmas[0]):.4g} → {float(self.sigmas[-1]):.4g})"


class Schedule:
    """A continuous schedule u ∈ [0, 1] → σ (u = 0 is σ_max); ``grid`` discretises it.

    ``grid(n, final_zero=True)`` puts n points at u = k/(n−1) and appends σ = 0 (EDM: n intervals);
    ``grid(n, final_zero=False)`` puts n+1 points at u = k/n (AMED: n intervals ending at σ_min), so a
    refined grid ``grid(n*(m+1), final_zero=False).sigmas[::m+1]`` equals ``grid(n, final_zero=False)``.
    """

    def sigma(self, u: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def grid(self, n: int, *, final_zero: bool = True) -> Grid:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of steps must be a positive integer, got {n!r}")
        if final_zero:
            u = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
            return Grid(torch.cat([self.sigma(u), torch.zeros(1, dtype=torch.float64)]))
        return Grid(self.sigma(torch.linspace(0, 1, n + 1, dtype=torch.float64)))


def _check_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


@dataclass(frozen=True)
class KarrasSchedule(Schedule):
    """EDM polynomial schedule σ(u) = (σ_max^{1/ρ} + u(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022)."""

    sigma_min: float
    sigma_max: float
    rho: float = 7.0

    def __post_init__(self) -> None:
        _check_range(self.sigma_min, self.sigma_max)
        if self.rho <= 0:
            raise ValueError(f"rho must be positive, got {self.rho}")

    def sigma(self, u: Tensor) -> Tensor:
        a, b = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (a + u * (b - a)) ** self.rho


@dataclass(frozen=True)
class LogSNRSchedule(Schedule):
    """Uniform in λ = −log σ (half log-SNR): the ρ → ∞ limit of the polynomial schedule (AMED §3.3)."""

    sigma_min: float
    sigma_max: float

    def __post_init__(self) -> None:
        _check_range(self.sigma_min, self.sigma_max)

    def sigma(self, u: Tensor) -> Tensor:
        return torch.exp(math.log(self.sigma_max) + u * (math.log(self.sigma_min) - math.log(self.sigma_max)))


@dataclass(frozen=True)
class TimeUniformSchedule(Schedule):
    """Uniform in VP-SDE time (EDM ``disc='vp'``, AMED ``time_uniform``; EDM Table 1, VP), ρ=1 by default."""

    sigma_min: float
    sigma_max: float
    rho: float = 1.0
    eps_s: float = 1e-3

    def __post_init__(self) -> None:
        _check_range(self.sigma_min, self.sigma_max)

    def sigma(self, u: Tensor) -> Tensor:
        e = self.eps_s
        beta_d = 2 * (math.log(self.sigma_min**2 + 1) / e - math.log(self.sigma_max**2 + 1)) / (e - 1)
        beta_min = math.log(self.sigma_max**2 + 1) - 0.5 * beta_d
        tau = (1 + u * (e ** (1 / self.rho) - 1)) ** self.rho
        return torch.sqrt(torch.expm1(0.5 * beta_d * tau**2 + beta_min * tau))


@dataclass(frozen=True)
class DDPMSchedule(Schedule):
    """The model's own discrete timesteps, chosen as diffusers does (``timestep_spacing``).

    linspace: round(linspace(0, T−1, n)); leading: (0, c, 2c, …)·, c = T//n, + steps_offset;
    trailing: round(arange(T, 0, −T/n)) − 1. Then σ = σ(t) and, with final_zero, the step to x0 (σ=0).
    The continuous form interpolates log σ over t = (T−1)(1−u).
    """

    alphas_cumprod: Tensor = field(repr=False)
    spacing: Literal["linspace", "leading", "trailing"] = "leading"
    steps_offset: int = 0

    def __post_init__(self) -> None:
        if self.spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"unknown spacing {self.spacing!r}; expected linspace, leading or trailing")

    @property
    def table(self) -> Tensor:
        return ddpm_sigmas(self.alphas_cumprod)

    def timesteps(self, n: int) -> np.ndarray:
        """The n timesteps (descending) diffusers would use for ``num_inference_steps=n``."""
        T = len(self.alphas_cumprod)
        if not 1 <= n <= T:
            raise ValueError(f"the ddpm schedule takes 1 to {T} steps, got {n}")
        if self.spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1]
        elif self.spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1] + self.steps_offset
        else:
            ts = np.round(np.arange(T, 0, -T / n)) - 1
        return ts.astype(np.int64).copy()

    def sigma(self, u: Tensor) -> Tensor:
        log_table = self.table.log()
        t = (len(log_table) - 1) * (1 - u)
        lo = t.floor().long().clamp(0, len(log_table) - 1)
        hi = (lo + 1).clamp(max=len(log_table) - 1)
        w = t - lo
        return torch.exp(log_table[lo] * (1 - w) + log_table[hi] * w)

    def grid(self, n: int, *, final_zero: bool = True) -> Grid:
        sig = self.table[torch.from_numpy(self.timesteps(n))]
        if final_zero:
            sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
        elif n == 1:
            raise ValueError("a ddpm grid of 1 step needs final_zero=True")
        return Grid(sig)


@dataclass(frozen=True)
class RFSchedule(Schedule):
    """Uniform in rectified-flow time t (t = 0 data, t = 1 noise): σ = t/(1 − t) (CONTRIBUTING.md, Conventions).

    σ = ∞ at t = 1 is not representable; the grid starts just inside at ``t_max`` (1 − 10⁻³, as the RF
    code does) where the state is x_t = z, i.e. x̄ = (1 + σ_max)·z (``prior_scale('rf', σ)``). With the
    final zero the n steps are equal in t down to t = 0; without it the grid ends at ``t_min``.
    """

    t_max: float = T_MAX
    t_min: float = T_MIN

    def __post_init__(self) -> None:
        if not 0 < self.t_min < self.t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={self.t_min}, t_max={self.t_max}")

    def sigma(self, u: Tensor) -> Tensor:
        t = self.t_max + u * (self.t_min - self.t_max)
        return t / (1 - t)

    def grid(self, n: int, *, final_zero: bool = True) -> Grid:
        """``final_zero``: n equal steps in t from t_max to 0, t_k = t_max·(1 − k/n) — the RF paper's Euler
        grid (constant step 1/N) started just inside σ = ∞, with no wasted t_min → 0 step. Without the final
        zero: n + 1 points uniform in t from t_max to t_min, as for every other schedule."""
        if final_zero and isinstance(n, int) and n >= 1:
            t = self.t_max * (1 - torch.arange(n + 1, dtype=torch.float64) / n)
            return Grid(t / (1 - t))
        return super().grid(n, final_zero=final_zero)


@dataclass(frozen=True)
class PolyExponentialSchedule(Schedule):
    """k-diffusion ``get_sigmas_polyexponential``: log σ = (1 − u)^ρ (log σ_max − log σ_min) + log σ_min; ρ = 1 is
    ``exponential`` (= logsnr)."""

    sigma_min: float
    sigma_max: float
    rho: float = 1.0

    def __post_init__(self) -> None:
        _check_range(self.sigma_min, self.sigma_max)
        if not self.rho > 0:
            raise ValueError(f"rho must be positive, got {self.rho}")

    def sigma(self, u: Tensor) -> Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.exp((1 - u) ** self.rho * (hi - lo) + lo)


@dataclass(frozen=True)
class BetaSchedule(Schedule):
    """Beta sampling (Lee et al. 2024, "Improving the Training of Rectified Flows"/"Beta Sampling is All You Need",
    arXiv:2407.12173; diffusers ``use_beta_sigmas``): σ(u) = σ_min + F⁻¹(1 − u; α, β)(σ_max − σ_min), F the Beta CDF,
    α = β = 0.6. (ComfyUI's ``beta`` applies the same quantiles to the model's discrete timesteps instead.)"""

    sigma_min: float
    sigma_max: float
    alpha: float = 0.6
    beta: float = 0.6

    def __post_init__(self) -> None:
        _check_range(self.sigma_min, self.sigma_max)
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"alpha and beta must be positive, got {self.alpha}, {self.beta}")

    def sigma(self, u: Tensor) -> Tensor:
        from scipy.stats import beta as beta_dist

        ppf = torch.from_numpy(beta_dist.ppf((1 - u).numpy(), self.alpha, self.beta))
        return self.sigma_min + ppf.to(torch.float64) * (self.sigma_max - self.sigma_min)


@dataclass(frozen=True)
class KLOptimalSchedule(Schedule):
    """KL-optimal schedule (Sabour, Fidler & Kreis 2024, "Align Your Steps", arXiv:2404.14507, Thm. 3.1; ComfyUI
    ``kl_optimal``): uniform in arctan σ, σ(u) = tan((1 − u)·atan σ_max + u·atan σ_min)."""

    sigma_min: float
    sigma_max: float

    def __post_init__(self) -> None:
        _check_range(self.sigma_min, self.sigma_max)

    def sigma(self, u: Tensor) -> Tensor:
        return torch.tan((1 - u) * math.atan(self.sigma_max) + u * math.atan(self.sigma_min))


class _ListSchedule(Schedule):
    """A schedule defined by its n-step σ list ending at 0 (ComfyUI's ``*_scheduler`` functions): ``points(n)``.
    ``grid(n, final_zero=False)`` is the (n + 1)-step list without its final 0 (n intervals, ending above 0)."""

    def points(self, n: int) -> list[float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def grid(self, n: int, *, final_zero: bool = True) -> Grid:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"the number of steps must be a positive integer, got {n!r}")
        pts = self.points(n) if final_zero else self.points(n + 1)[:-1]
        return Grid(torch.tensor(pts, dtype=torch.float64))


@dataclass(frozen=True)
class ComfyTableSchedule(_ListSchedule):
    """ComfyUI's schedules on a model's discrete σ table (comfy/samplers.py), σ_t = √((1 − ᾱ_t)/ᾱ_t), t = 0 … T−1:

    normal: T−1 … 0 in n equal steps (log σ interpolated between timesteps), then 0 (``normal_scheduler``);
    sgm_uniform: the same over n + 1 points without the last (SGM/SD-XL "trailing"; ``normal_scheduler(sgm=True)``);
    simple: σ_table[−(1 + ⌊k·T/n⌋)], k = 0 … n−1, then 0 (``simple_scheduler``);
    ddim_uniform: every ⌊T/n⌋-th σ from t = 1 up, reversed, then 0 (``ddim_scheduler``; it can give n + 1 steps).
    """

    alphas_cumprod: Tensor = field(repr=False)
    kind: Literal["normal", "sgm_uniform", "simple", "ddim_uniform"] = "normal"

    @property
    def table(self) -> Tensor:
        return ddpm_sigmas(self.alphas_cumprod)

    def _at(self, t: Tensor) -> Tensor:
        log_table = self.table.log()
        t = t.clamp(0, len(log_table) - 1)
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - t.floor()
        return torch.exp((1 - w) * log_table[lo] + w * log_table[hi])

    def sigma(self, u: Tensor) -> Tensor:
        return self._at((len(self.table) - 1) * (1 - u))

    def points(self, n: int) -> list[float]:
        table, T = self.table, len(self.alphas_cumprod)
        if self.kind == "normal":
            ts = torch.linspace(T - 1, 0, n, dtype=torch.float64) if n > 1 else torch.full((1,), T - 1.0, dtype=torch.float64)
            return self._at(ts).tolist() + [0.0]
        if self.kind == "sgm_uniform":
            return self._at(torch.linspace(T - 1, 0, n + 1, dtype=torch.float64)[:-1]).tolist() + [0.0]
        if self.kind == "simple":
            ss = T / n
            return [float(table[-(1 + int(k * ss))]) for k in range(n)] + [0.0]
        ss, sig, x = max(T // n, 1), [0.0], 1
        while x < T:
            sig.append(float(table[x]))
            x += ss
        return sig[::-1]


@dataclass(frozen=True)
class LinearQuadraticSchedule(_ListSchedule):
    """ComfyUI ``linear_quadratic`` (from Mochi, genmo 2024): the first ⌊n/2⌋ steps fall linearly to
    ``threshold_noise``·σ_max, the rest quadratically to 0; σ_k = (1 − f_k)·σ_max."""

    sigma_max: float
    threshold_noise: float = 0.025

    def points(self, n: int) -> list[float]:
        if n == 1:
            sched = [1.0, 0.0]
        else:
            lin = n // 2
            linear = [i * self.threshold_noise / lin for i in range(lin)]
            diff = lin - self.threshold_noise * n
            quad_steps = n - lin
            quad_coef = diff / (lin * quad_steps**2)
            lin_coef = self.threshold_noise / lin - 2 * diff / (quad_steps**2)
            const = quad_coef * lin**2
            quadratic = [quad_coef * i**2 + lin_coef * i + const for i in range(lin, n)]
            sched = [1.0 - v for v in linear + quadratic + [1.0]]
        return [v * self.sigma_max for v in sched]

    def sigma(self, u: Tensor) -> Tensor:
        raise ValueError("linear_quadratic is defined by its step list only; use .grid(n)")


@dataclass(frozen=True)
class _ScheduleEntry:
    factory: Callable[..., Schedule]
    description: str
    from_model: tuple[str, ...]


_SCHEDULES: dict[str, _ScheduleEntry] = {
    "karras": _ScheduleEntry(KarrasSchedule, "EDM polynomial in σ^(1/ρ), ρ=7 (Karras et al. 2022)", ("sigma_min", "sigma_max")),
    "logsnr": _ScheduleEntry(LogSNRSchedule, "uniform in log σ (DPM-Solver, AMED logSNR)", ("sigma_min", "sigma_max")),
    "time_uniform": _ScheduleEntry(TimeUniformSchedule, "uniform in VP-SDE time, ρ=1 (EDM disc='vp', AMED)", ("sigma_min", "sigma_max")),
    "ddpm": _ScheduleEntry(DDPMSchedule, "the model's discrete DDPM timesteps; spacing linspace/leading/trailing", ("alphas_cumprod",)),
    "rf": _ScheduleEntry(RFSchedule, "uniform in rectified-flow time t ∈ (0, 1), σ = t/(1−t)", ()),
    "exponential": _ScheduleEntry(LogSNRSchedule, "= logsnr (k-diffusion get_sigmas_exponential)", ("sigma_min", "sigma_max")),
    "polyexponential": _ScheduleEntry(PolyExponentialSchedule, "log σ ∝ (1−u)^ρ, ρ=1 (k-diffusion get_sigmas_polyexponential)", ("sigma_min", "sigma_max")),
    "normal": _ScheduleEntry(lambda **k: ComfyTableSchedule(kind="normal", **k), "uniform in the model's timesteps, then 0 (ComfyUI normal)", ("alphas_cumprod",)),
    "sgm_uniform": _ScheduleEntry(lambda **k: ComfyTableSchedule(kind="sgm_uniform", **k), "uniform in timesteps over n+1 points, last dropped (ComfyUI sgm_uniform)", ("alphas_cumprod",)),
    "simple": _ScheduleEntry(lambda **k: ComfyTableSchedule(kind="simple", **k), "every T/n-th σ of the model's table (ComfyUI simple)", ("alphas_cumprod",)),
    "ddim_uniform": _ScheduleEntry(lambda **k: ComfyTableSchedule(kind="ddim_uniform", **k), "every ⌊T/n⌋-th timestep from 1 (ComfyUI ddim_uniform)", ("alphas_cumprod",)),
    "beta": _ScheduleEntry(BetaSchedule, "Beta(0.6, 0.6) quantiles in σ (Lee et al. 2024; diffusers use_beta_sigmas)", ("sigma_min", "sigma_max")),
    "linear_quadratic": _ScheduleEntry(LinearQuadraticSchedule, "linear then quadratic to 0, threshold 0.025 (ComfyUI, Mochi)", ("sigma_max",)),
    "kl_optimal": _ScheduleEntry(KLOptimalSchedule, "uniform in arctan σ (Sabour et al. 2024, AYS Thm. 3.1; ComfyUI)", ("sigma_min", "sigma_max")),
}


def schedule_parameters(name: str) -> list[str]:
    """The parameters schedule ``name`` takes (its fields), e.g. sigma_min, sigma_max, rho."""
    import dataclasses
    import inspect

    factory = _entry(name).factory
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory)]
    return [p for p in inspect.signature(ComfyTableSchedule).parameters if p != "kind"]


# what a schedule may take from a model: the σ range every model declares, the ᾱ table of the DDPM family
_MODEL_VALUES: dict[str, Callable[[Denoiser], Any]] = {
    "sigma_min": lambda m: m.sigma_min,
    "sigma_max": lambda m: m.sigma_max,
    "alphas_cumprod": alphas_cumprod_of,
}


def available_schedules() -> list[str]:
    """Names of every registered schedule, sorted."""
    return sorted(_SCHEDULES)


def schedule_description(name: str) -> str:
    """One-line description of a registered schedule."""
    return _entry(name).description


def _entry(name: str) -> _ScheduleEntry:
    try:
        return _SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; available: {', '.join(available_schedules())}") from None


def get_schedule(name: str, *, model: Denoiser | None = None, **params: Any) -> Schedule:
    """Build schedule ``name``; σ range / ᾱ table default to ``model``'s declared ones.

    Example: ``get_schedule("karras", sigma_min=0.002, sigma_max=80).grid(18)`` (EDM's 18 steps).
    """
    entry = _entry(name)
    kwargs = dict(params)
    for key in entry.from_model:
        if key not in kwargs:
            value = _MODEL_VALUES[key](model) if model is not None else None
            if value is None:
                raise ValueError(f"schedule {name!r} needs {key}: pass it or a model that declares it")
            kwargs[key] = value
    try:
        return entry.factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad parameters for schedule {name!r}: {exc}") from None
