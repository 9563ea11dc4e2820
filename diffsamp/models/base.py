"""The one model interface of diffsamp: a σ-space denoiser D(x, σ) ≈ E[x0 | x], x = x0 + σ·ε.

Every foreign convention (DDPM ε/v/x0 prediction, VP-SDE time, rectified-flow velocity) is converted
to this form once, in ``diffsamp.models`` (Karras et al. 2022, EDM Eq. 3–4; CONTRIBUTING.md). ``Denoiser`` lists
everything code outside ``diffsamp.models`` may read from a model; ``DenoiserBase`` gives the defaults and
``Wrapper`` forwards all of it, so Counting, Clamp and Autocast wrappers are models like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from diffsamp.models.parameterization import rf_sigma_from_t, rf_t_from_sigma, velocity_from_x0

Prior = Literal["ve", "vp", "rf"]


@runtime_checkable
class Denoiser(Protocol):
    """x̂0 = D(x, σ) for x = x0 + σ·ε.  ``x``: (B, ...), ``sigma``: (B,).

    Attributes every denoiser declares (no guessing by ``getattr``/``hasattr``):
      sigma_min, sigma_max: the σ range the model was trained on.
      prior: how the initial state at σ_max is drawn: "ve" → σ·z, "vp" → √(1+σ²)·z, "rf" → (1+σ)·z.
      source: the distribution z is drawn from: "normal" (N(0, I)) or a toy source (``diffsamp.data.toys``).
      sample_shape: one sample's shape, (C, H, W) or (d,).
      device, dtype: where and in which precision the model takes its input.
      feature_module: the module whose output AMED reads (the UNet bottleneck; else None).
      clip_sample: the range the model clamps its own x̂0 to (diffusers' ``clip_sample``), or None.
      timestep_sigmas: the σ of each integer timestep a discrete-time network was trained on (a DDPM table,
        increasing), or None for continuous σ. Fed the fractional timestep of another σ such a network answers,
        but not smoothly: its output wiggles with a period of ≈ 2π timesteps (the fastest sinusoid of its embedding).
      info: what the model's files record about it (data set, training, card); {} if nothing.
      network: the trained ``nn.Module`` behind the model, or None (closed-form models).
      conditioning: what the model takes as a condition (``diffsamp.models.conditioning``: class labels with K
        classes, …), or None for an unconditional model. A conditional model also implements
        ``bind(cond) -> Denoiser``, the model with one encoded condition per batch row fixed.
      codec: a latent model's autoencoder (``encode(images) -> latents``, ``decode(latents) -> images`` in
        [-1, 1]; the VAE with its scaling factor), or None for a pixel-space model. A latent model is sampled in
        latent space: ``sample_shape`` is the latent's.
    """

    sigma_min: float
    sigma_max: float
    prior: Prior
    source: str
    sample_shape: tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    feature_module: nn.Module | None
    clip_sample: float | None
    timestep_sigmas: Tensor | None
    info: dict[str, Any]
    network: nn.Module | None
    conditioning: Any
    codec: Any

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


class DenoiserBase:
    """Defaults of the protocol for a model family: device and dtype follow ``network``'s first parameter
    (CPU float32 without one); no features, no self-clamping, continuous time, no info, N(0, I) source."""

    sigma_min: float
    sigma_max: float
    prior: Prior = "ve"
    source: str = "normal"
    network: nn.Module | None = None
    feature_module: nn.Module | None = None
    clip_sample: float | None = None
    timestep_sigmas: Tensor | None = None
    conditioning: Any = None
    codec: Any = None

    @property
    def info(self) -> dict[str, Any]:
        return self.__dict__.setdefault("_info", {})

    @info.setter
    def info(self, value: dict[str, Any]) -> None:
        self.__dict__["_info"] = dict(value)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        raise ValueError(f"cannot tell the sample shape of {type(self).__name__}; pass the shape explicitly")

    def _first_param(self) -> Tensor | None:
        if isinstance(self.network, nn.Module):
            for p in self.network.parameters():
                return p
        return None

    @property
    def device(self) -> torch.device:
        p = self._first_param()
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = self._first_param()
        return p.dtype if p is not None and p.is_floating_point() else torch.float32

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class TimeCoordinates:
    """A prior's own ODE coordinates (CONTRIBUTING.md, Conventions): its time ``t(σ)`` and ``sigma(t)``, its state
    ``to_state(x̄, σ)`` and back, and the velocity dx/dt from (x̄, D, σ)."""

    t: Callable[[Any], Any]
    sigma: Callable[[Any], Any]
    to_state: Callable[[Tensor, Any], Tensor]
    from_state: Callable[[Tensor, Any], Tensor]
    velocity: Callable[[Tensor, Tensor, Any], Tensor]


# RF: t = σ/(1 + σ), x_t = x̄/(1 + σ), dx_t/dt = ε̂ − x̂0 (smooth in t where σ spans six decades)
PRIOR_TIMES: dict[str, TimeCoordinates] = {
    "rf": TimeCoordinates(rf_t_from_sigma, rf_sigma_from_t, lambda x, s: x / (1 + s), lambda x, s: x * (1 + s),
                          velocity_from_x0),
}


def prior_scale(prior: Prior, sigma: float) -> float:
    """Standard deviation of the model's prior at σ in σ-space coordinates (CONTRIBUTING.md, Conventions).

    VE/EDM: x̄ = σ z.  VP: x_T ~ N(0, I) and x̄ = x/√ᾱ = √(1+σ²) z.  RF: x_t ≈ z at t≈1 and
    x̄ = x_t/(1-t) = (1+σ) z.
    """
    if prior == "ve":
        return float(sigma)
    if prior == "vp":
        return float((1.0 + sigma**2) ** 0.5)
    if prior == "rf":
        return float(1.0 + sigma)
    raise ValueError(f"unknown prior {prior!r}; expected one of 've', 'vp', 'rf'")


class Wrapper:
    """A denoiser around another one: forwards every declared attribute of ``inner`` (and the call).

    Subclasses change ``__call__``; ``unwrap()`` is the innermost model (its family's own attributes).
    """

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.inner(x, sigma)

    def unwrap(self) -> Denoiser:
        return unwrap(self.inner)

    sigma_min = property(lambda self: self.inner.sigma_min)
    sigma_max = property(lambda self: self.inner.sigma_max)
    prior = property(lambda self: self.inner.prior)
    source = property(lambda self: self.inner.source)
    sample_shape = property(lambda self: self.inner.sample_shape)
    device = property(lambda self: self.inner.device)
    dtype = property(lambda self: self.inner.dtype)
    feature_module = property(lambda self: self.inner.feature_module)
    clip_sample = property(lambda self: self.inner.clip_sample)
    timestep_sigmas = property(lambda self: self.inner.timestep_sigmas)
    info = property(lambda self: self.inner.info)
    network = property(lambda self: self.inner.network)
    conditioning = property(lambda self: getattr(self.inner, "conditioning", None))
    codec = property(lambda self: getattr(self.inner, "codec", None))


def unwrap(model: Denoiser) -> Denoiser:
    """The innermost model under any ``Wrapper``s."""
    while isinstance(model, Wrapper):
        model = model.inner
    return model


@contextmanager
def clipping_off(model: Denoiser) -> Iterator[Denoiser]:
    """``model`` with its own x̂0 clipping (``clip_sample``) off for the duration of the block.

    The setting lives on the innermost model (every ``Wrapper`` forwards it), so that is where it is switched
    off and restored afterwards, whatever the wrappers around it: the caller's wrappers keep working (a
    ``CountingDenoiser`` still counts). A ``ClampDenoiser`` wrapped around the model on purpose stays.
    """
    inner = unwrap(model)
    saved = inner.clip_sample
    if saved is None:
        yield model
        return
    inner.clip_sample = None  # type: ignore[misc]
    try:
        yield model
    finally:
        inner.clip_sample = saved  # type: ignore[misc]


def all_finite(out: Tensor) -> bool:
    """Whether ``out`` holds no NaN/inf: a sum (NaN and inf survive it) checked on the host, confirmed
    elementwise only when the sum is not finite — several times cheaper than ``isfinite(out).all()``."""
    total = out.sum() if out.dtype in (torch.float32, torch.float64) else out.sum(dtype=torch.float32)
    return math.isfinite(total) or bool(torch.isfinite(out).all())


class CountingDenoiser(Wrapper):
    """Counts network evaluations (NFE): one call on a batch is one evaluation (CONTRIBUTING.md: NFE is measured).

    With ``check=True`` it also rejects what would otherwise fail deep inside torch: a ``sigma`` that is
    not (B,), an output of another shape, and NaN/inf coming out of the model. On a GPU the NaN/inf check is
    deferred (``defer``): the first bad evaluation is recorded on the device, without the host synchronisation
    that reading a flag every step costs, and ``raise_deferred()`` reports it once sampling is over.
    """

    def __init__(self, inner: Denoiser, *, check: bool = False, defer: bool | None = None) -> None:
        super().__init__(inner)
        self.calls = 0
        self.rows = 0  # batch rows evaluated: calls × B, more where a call stacks several points (EPD)
        self.check = check
        self.defer = defer  # None: on CUDA outputs
        self._sums: list[Tensor] = []  # deferred: each pending evaluation's float32 sum, kept on the device
        self._sums_from = 0  # the 1-based index of the evaluation whose sum is _sums[0]

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.check and (sigma.ndim != 1 or sigma.shape[0] != x.shape[0]):
            raise ValueError(
                f"sigma must have shape (B,) = ({x.shape[0]},) for x of shape {tuple(x.shape)}, "
                f"got {tuple(sigma.shape)}"
            )
        out = self.inner(x, sigma)
        self.calls += 1
        self.rows += x.shape[0]
        if self.check:
            if out.shape != x.shape:
                raise ValueError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
            if self.defer if self.defer is not None else out.is_cuda:  # one reduction, no host sync
                if not self._sums:
                    self._sums_from = self.calls
                self._sums.append(out.sum(dtype=torch.float32))
            elif not all_finite(out):
                raise ValueError(
                    f"the model returned NaN/inf at evaluation {self.calls} "
                    f"(sigma={float(sigma.flatten()[0]):.4g}); try --dtype float32 or check the weights"
                )
        return out

    def raise_deferred(self) -> None:
        """The deferred NaN/inf check's verdict (one host synchronisation): a ValueError naming the evaluation.

        NaN and ±inf survive a sum, so the first evaluation whose sum is not finite is the first bad one (an
        output whose finite values overflow a float32 sum, |Σ| > 3.4e38, is reported too)."""
        if not self._sums:
            return
        sums, first = torch.stack(self._sums), self._sums_from
        self._sums = []
        bad = torch.nonzero(~torch.isfinite(sums)).flatten()
        if len(bad):
            at = first + int(bad[0])
            raise ValueError(f"the model returned NaN/inf at evaluation {at}; try --dtype float32 or check the weights")


class ClampDenoiser(Wrapper):
    """x̂0 clipping as a wrapper (diffusers' ``clip_sample``), so it applies to every sampler alike."""

    def __init__(self, inner: Denoiser, lo: float = -1.0, hi: float = 1.0) -> None:
        super().__init__(inner)
        if not lo < hi:
            raise ValueError(f"ClampDenoiser needs lo < hi, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.inner(x, sigma).clamp(self.lo, self.hi)


class AutocastDenoiser(Wrapper):
    """Runs any denoiser under bf16 autocast on CUDA (for fast pair generation); output in the input dtype."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            out = self.inner(x, sigma)
        return out.to(x.dtype)


def default_schedule(model: Denoiser) -> str:
    """The σ-grid a model is sampled on unless told otherwise: ``rf`` (uniform in RF time t, the RF paper's
    Euler grid) for rectified flows, ``karras`` (EDM's ρ = 7) for every other denoiser."""
    return "rf" if model.prior == "rf" else "karras"


def learned_solver_schedule(model: Denoiser, method_default: str) -> str:
    """The grid a learned solver (AMED, EPD, AdaSDE, GITS's fine grid, learned steps) starts from when none is given:
    the method's own (``time_uniform`` for AMED/EPD, AMED §4.1) on diffusion models, and on rectified flows the
    flow's own ``rf`` grid (uniform in RF time t), as ``default_schedule`` gives the plain samplers there."""
    return "rf" if model.prior == "rf" else method_default


def default_sampler(model: Denoiser) -> str:
    """The sampler a model is sampled with unless told otherwise: ``euler`` for rectified flows (the RF
    paper's sampler; their straight paths are what Euler integrates exactly, and Heun's second evaluation at
    few steps speckles the digits of ``mnist-rf``), ``heun`` (EDM's 2nd-order method) for every other model."""
    return "euler" if model.prior == "rf" else "heun"
