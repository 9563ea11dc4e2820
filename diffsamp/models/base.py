"""The one model interface of diffsamp: a σ-space denoiser D(x, σ) ≈ E[x0 | x], x = x0 + σ·ε.

Every foreign convention (DDPM ε/v/x0 prediction, VP-SDE time, rectified-flow velocity) is converted
to this form once, in ``diffsamp.models`` (SPEC §7.1, §7.3; EDM, Karras et al. 2022).
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

Prior = Literal["ve", "vp", "rf"]


@runtime_checkable
class Denoiser(Protocol):
    """x̂0 = D(x, σ) for x = x0 + σ·ε.  ``x``: (B, ...), ``sigma``: (B,).

    Attributes every denoiser declares (no guessing by ``hasattr``):
      sigma_min, sigma_max: the σ range the model was trained on.
      prior: how the initial state at σ_max is drawn: "ve" → σ·z, "vp" → √(1+σ²)·z, "rf" → (1+σ)·z.
      alphas_cumprod: the discrete DDPM ᾱ_t table for models trained on one (else None).
      feature_module: the bottleneck block whose output AMED reads (else None).
    """

    sigma_min: float
    sigma_max: float
    prior: Prior
    alphas_cumprod: Tensor | None
    feature_module: nn.Module | None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


def prior_scale(prior: Prior, sigma: float) -> float:
    """Standard deviation of the model's prior at σ in σ-space coordinates (SPEC §7.2, §7.4 'Start').

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


class _Wrapper:
    """Forwards the declared attributes of the wrapped denoiser."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner

    @property
    def sigma_min(self) -> float:
        return self.inner.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.inner.sigma_max

    @property
    def prior(self) -> Prior:
        return self.inner.prior

    @property
    def alphas_cumprod(self) -> Tensor | None:
        return self.inner.alphas_cumprod

    @property
    def feature_module(self) -> nn.Module | None:
        return self.inner.feature_module


class CountingDenoiser(_Wrapper):
    """Counts network evaluations (NFE): one call on a batch is one evaluation (DESIGN principle 5).

    With ``check=True`` it also rejects what would otherwise fail deep inside torch: a ``sigma`` that is
    not (B,), an output of another shape, and NaN/inf coming out of the model.
    """

    def __init__(self, inner: Denoiser, *, check: bool = False) -> None:
        super().__init__(inner)
        self.calls = 0
        self.check = check

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.check and (sigma.ndim != 1 or sigma.shape[0] != x.shape[0]):
            raise ValueError(
                f"sigma must have shape (B,) = ({x.shape[0]},) for x of shape {tuple(x.shape)}, "
                f"got {tuple(sigma.shape)}"
            )
        out = self.inner(x, sigma)
        self.calls += 1
        if self.check:
            if out.shape != x.shape:
                raise ValueError(f"the model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
            if not bool(torch.isfinite(out).all()):
                raise ValueError(
                    f"the model returned NaN/inf at evaluation {self.calls} "
                    f"(sigma={float(sigma.flatten()[0]):.4g}); try --dtype float32 or check the weights"
                )
        return out


class ClampDenoiser(_Wrapper):
    """x̂0 clipping as a wrapper (diffusers' ``clip_sample``), so it applies to every sampler alike."""

    def __init__(self, inner: Denoiser, lo: float = -1.0, hi: float = 1.0) -> None:
        super().__init__(inner)
        if not lo < hi:
            raise ValueError(f"ClampDenoiser needs lo < hi, got lo={lo}, hi={hi}")
        self.lo, self.hi = lo, hi

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.inner(x, sigma).clamp(self.lo, self.hi)


def default_schedule(model: Any) -> str:
    """The σ-grid a model is sampled on unless told otherwise: ``rf`` (uniform in RF time t, the RF paper's
    Euler grid) for rectified flows, ``karras`` (EDM's ρ = 7) for every other denoiser."""
    return "rf" if getattr(model, "prior", None) == "rf" else "karras"
