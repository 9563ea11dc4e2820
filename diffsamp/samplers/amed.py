"""AMED: the Approximate MEan-Direction solver and its plugins (Zhou, Chen, Wang & Chen, CVPR 2024, arXiv:2312.00094).

Per interval [σ, σ'] a small predictor g_φ reads the model's bottleneck feature from the evaluation at σ and
returns per-sample r ∈ (0, 1) (the intermediate time s = σ'^r σ^(1−r), a geometric interpolation), the
direction scale c and the time scale a (the network is evaluated at a·s; the divisor and step use s):

  amed       x_s = x + (s − σ)ε̂,               x' = x + c(σ' − σ) ε̂_s                      (AMED Eq. 9)
  euler+amed x_s = x + (s − σ)ε̂,               x' = x_s + c(σ' − s) ε̂_s                    (AMED §3.3)
  dpm2+amed  x_s = x + (s − σ)ε̂,               x' = x + c(σ' − σ)[ε̂_s/(2r) + (1 − 1/(2r))ε̂]
  ipndm+amed Adams–Bashforth on the refined grid σ → s → σ', c scaling the second sub-step
  dpmpp+amed DPM-Solver++ multistep on the refined grid, c scaling the second sub-step's direction

2 NFE per interval; AFS (``afs=True``, AMED §3.4) replaces the first evaluation by ε̂ ≈ x/√(1+σ²), saving one.
Grids end at σ_min as in the paper (a step to σ = 0, if any, is x = D). The predictor is a knob: an
``AmedPredictor`` (per-sample, features), a ``StaticPredictor`` (per-step constants, no features) or a
``FixedPredictor`` (given r, c, a — the identities with dpm2, heun and euler).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from diffsamp.models.base import Denoiser
from diffsamp.samplers._util import (
    Generator, StepInfo, append_dims, capture, final_denoise_step, final_nfe, sigma_batch, to_d,
)
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.ode import adams_bashforth, dpmpp_update
from diffsamp.samplers.registry import KnobRange, Learned, Planning, register_sampler

Callback = Callable[[StepInfo], None] | None
RCA = tuple[Tensor, Tensor, Tensor]


class Predictor(Protocol):
    """g_φ(h, i, σ, σ') → (r, c, a), each (B,) or (1,). ``feature_dim`` None: reads no features."""

    feature_dim: int | None

    def __call__(self, h: Tensor | None, step: int, sigma: float, sigma_next: float) -> RCA: ...


def _bounded(logit: Tensor, scale: float) -> Tensor:
    """sigmoid(logit)·2·scale + (1 − scale) ∈ [1 − scale, 1 + scale] (AMED Eq. 11 heads); 1 when scale = 0."""
    if scale <= 0:
        return torch.ones_like(logit)
    return torch.sigmoid(logit) * 2 * scale + (1 - scale)


class SigmaEmbedding(nn.Module):
    """Positional embedding of a scalar σ, [sin, cos] of σ·(10⁻⁴)^(k/(n/2−1)), then Linear + SiLU (AMED Fig. 6)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        half = channels // 2
        self.register_buffer("freqs", (1e-4) ** (torch.arange(half, dtype=torch.float32) / max(half - 1, 1)))
        self.linear = nn.Linear(channels, channels)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: float) -> Tensor:
        arg = float(sigma) * self.freqs
        return nn.functional.silu(self.linear(torch.cat([torch.sin(arg), torch.cos(arg)])))


class AmedPredictor(nn.Module):
    """The per-sample AMED predictor g_φ (AMED Fig. 6, Eq. 11; ≈ 9k parameters for 64 features).

    Pooled bottleneck feature h (B, F) → Linear(F, 128) → SiLU → Linear(128, 4); concatenated with the
    embeddings of σ and σ' (8 each); one Linear (+ a per-step offset with ``num_steps``) + sigmoid per head:
    r, and c / a when their scale is > 0. ``first_step_static``: step 0 is AFS's (no evaluation at σ_0, so no
    features and an r the same for every sample): its logits are parameters of their own, not the network's.
    """

    def __init__(
        self, feature_dim: int, *, scale_dir: float = 0.01, scale_time: float = 0.0, hidden: int = 128,
        bottleneck: int = 4, time_channels: int = 8, num_steps: int = 0, first_step_static: bool = False,
    ) -> None:
        super().__init__()
        self.feature_dim = int(feature_dim)
        # num_steps > 0: a learned logit offset per step (zero at the start), added to the heads' output. The
        # steps share every other weight, and Adam's moments with them: the step with the largest loss moves
        # those; an offset of its own lets each step still reach its own optimum.
        self.num_steps = int(num_steps)
        self.step_logits = nn.Parameter(torch.zeros(self.num_steps, 3)) if self.num_steps else None
        self.first_logits = nn.Parameter(torch.zeros(3)) if first_step_static else None
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        self.features = nn.Sequential(nn.Linear(feature_dim, hidden), nn.SiLU(), nn.Linear(hidden, bottleneck))
        for lin in (self.features[0], self.features[2]):
            nn.init.kaiming_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.time = SigmaEmbedding(time_channels)
        width = bottleneck + 2 * time_channels
        self.heads = nn.Linear(width, 3)  # logits of r, c, a

    def forward(self, h: Tensor | None, step: int, sigma: float, sigma_next: float) -> RCA:
        if h is None:
            raise ValueError("this AMED predictor reads the model's features; got none")
        h = h.reshape(h.shape[0], -1).to(self.heads.weight.dtype)
        if h.shape[1] != self.feature_dim:
            raise ValueError(f"the predictor was trained on {self.feature_dim} features, got {h.shape[1]}")
        if step == 0 and self.first_logits is not None:
            logits = self.first_logits.expand(h.shape[0], -1)
        else:
            t = torch.cat([self.time(sigma), self.time(sigma_next)]).expand(h.shape[0], -1)
            logits = self.heads(torch.cat([self.features(h), t], dim=1))
            if self.step_logits is not None:
                if not 0 <= step < self.num_steps:
                    raise ValueError(f"this AMED predictor has {self.num_steps} steps, asked for step {step}")
                logits = logits + self.step_logits[step]
        r = torch.sigmoid(logits[:, 0])
        return r, _bounded(logits[:, 1], self.scale_dir), _bounded(logits[:, 2], self.scale_time)


class StaticPredictor(nn.Module):
    """Sample-independent (r, c, a) per step, no features: usable on any model (EPD-style baseline).

    Starts at r = ½, c = a = 1 (the logits are 0): untrained, ``amed`` with it is DPM-Solver-2.
    """

    feature_dim: int | None = None

    def __init__(self, num_steps: int, *, scale_dir: float = 0.01, scale_time: float = 0.0) -> None:
        super().__init__()
        self.num_steps = int(num_steps)
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        self.logits = nn.Parameter(torch.zeros(self.num_steps, 3))

    def forward(self, h: Tensor | None, step: int, sigma: float, sigma_next: float) -> RCA:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"this static predictor has {self.num_steps} steps, asked for step {step}")
        lg = self.logits[step : step + 1]
        return torch.sigmoid(lg[:, 0]), _bounded(lg[:, 1], self.scale_dir), _bounded(lg[:, 2], self.scale_time)


@dataclass(frozen=True)
class FixedPredictor:
    """Constant r, c, a on every step (generalized DPM-Solver-2 with its r; the AMED identities, AMED Table 1)."""

    r: float = 0.5
    c: float = 1.0
    a: float = 1.0
    feature_dim: int | None = field(default=None, init=False)

    def __call__(self, h: Tensor | None, step: int, sigma: float, sigma_next: float) -> RCA:
        if not 0.0 <= self.r <= 1.0:
            raise ValueError(f"r must be in [0, 1], got {self.r}")
        t = torch.tensor
        return t([self.r], dtype=torch.float64), t([self.c], dtype=torch.float64), t([self.a], dtype=torch.float64)


def pool_features(out: Tensor) -> Tensor:
    """Channel-mean pooling of a (B, C, H, W) feature map to (B, H·W) (AMED §3.4); (B, F) passes through."""
    if out.ndim >= 3:
        out = out.mean(dim=1)
    return out.reshape(out.shape[0], -1)


def feature_dim(model: Denoiser, x: Tensor, sigma: float) -> int:
    """The size of the pooled feature the model gives at σ (one evaluation on ``x``)."""
    _, h = evaluate_with_features(model, x, sigma)
    return int(h.shape[1])


def evaluate_with_features(model: Denoiser, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
    """D(x, σ) and the pooled output of the model's declared ``feature_module`` during that call."""
    module = model.feature_module
    if module is None:
        raise ValueError(
            "this model declares no feature module for AMED's per-sample predictor; "
            "use a predictor trained with --static (no features)"
        )
    sig = sigma_batch(x, sigma) if not isinstance(sigma, Tensor) else sigma
    with capture(module) as box:
        denoised = model(x, sig)
    if box.output is None:
        raise ValueError("the model's feature module did not run during the evaluation")
    h = pool_features(box.output)
    if h.shape[0] == 2 * x.shape[0]:  # classifier-free guidance's doubled batch: the conditional half
        h = h[: x.shape[0]]
    return denoised, h


# ------------------------------------------------------------------------------------------ one step
@dataclass
class StepState:
    """What a multistep AMED method carries between intervals: past directions (ipndm) or (σ, x, D) (dpmpp)."""

    history: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class StepStart:
    """The evaluation at the start of an interval: x, D(x, σ), ε̂ and the feature h (None when not read)."""

    x: Tensor
    denoised: Tensor
    d: Tensor
    h: Tensor | None


def step_start(model: Denoiser, x: Tensor, sigma: float, *, afs: bool, predictor: Predictor) -> StepStart:
    """The first evaluation of an interval; with ``afs`` the analytical ε̂ = x/√(1+σ²) and h = 0 (AMED §3.4)."""
    dim = predictor.feature_dim
    if afs:
        d = x / math.sqrt(1 + sigma**2)
        h = None if dim is None else x.new_zeros(x.shape[0], dim)
        return StepStart(x, x - sigma * d, d, h)
    if dim is None:
        denoised, h = model(x, sigma_batch(x, sigma)), None
    else:
        denoised, h = evaluate_with_features(model, x, sigma)
    return StepStart(x, denoised, to_d(x, sigma, denoised), h)


def _rca(predictor: Predictor, start: StepStart, i: int, s: float, s_next: float) -> RCA:
    r, c, a = predictor(start.h, i, s, s_next)
    nd, dt = start.x.ndim, start.x.dtype
    return tuple(append_dims(v.to(device=start.x.device, dtype=dt), nd) for v in (r, c, a))  # type: ignore[return-value]


def _eval_at(model: Denoiser, x_s: Tensor, s_mid: Tensor, a: Tensor) -> Tensor:
    """ε̂_s = (x_s − D(x_s; a·s))/s: the time scale touches only the network's σ (AMED §3.4, time scaling)."""
    sig = (a * s_mid).reshape(-1).expand(x_s.shape[0]).contiguous()
    return (x_s - model(x_s, sig)) / s_mid


def amed_step(
    method: str, model: Denoiser, start: StepStart, i: int, s: float, s_next: float, predictor: Predictor,
    state: StepState, *, max_order: int = 4, order: int = 2, total: int = 0, threshold: bool = False,
) -> Tensor:
    """One interval σ → σ' of an AMED method (Eq. 9, §3.3): what the sampler loops and the trainer differentiates."""
    x, d = start.x, start.d
    if s_next == 0.0:
        return start.denoised
    r, c, a = _rca(predictor, start, i, s, s_next)
    s_mid = s_next**r * s ** (1 - r)
    if method in ("amed", "euler", "dpm2"):
        x_s = x + (s_mid - s) * d
        d_s = _eval_at(model, x_s, s_mid, a)
        if method == "amed":
            return x + c * (s_next - s) * d_s
        if method == "euler":
            return x_s + c * (s_next - s_mid) * d_s
        return x + c * (s_next - s) * (d_s / (2 * r) + (1 - 1 / (2 * r)) * d)
    if method == "ipndm":
        keep = max_order - 1
        x_s = x + (s_mid - s) * adams_bashforth(([d] + state.history)[:max_order])
        state.history = ([d] + state.history)[:keep]
        d_s = _eval_at(model, x_s, s_mid, a)
        x_next = x_s + c * (s_next - s_mid) * adams_bashforth(([d_s] + state.history)[:max_order])
        state.history = ([d_s] + state.history)[:keep]
        return x_next
    if method == "dpmpp":
        m0 = dynamic_threshold(start.denoised) if threshold else start.denoised
        left = total - 2 * i
        x_s = dpmpp_update(x, m0, s, s_mid, state.history, left, max_order=order, total=total)
        state.history = ([(s, x, m0)] + state.history)[: order - 1]
        sig = (a * s_mid).reshape(-1).expand(x.shape[0]).contiguous()
        m_s = model(x_s, sig)
        m_s = dynamic_threshold(m_s) if threshold else m_s
        x_plain = dpmpp_update(x_s, m_s, s_mid, s_next, state.history, left - 1, max_order=order, total=total)
        state.history = ([(s_mid, x_s, m_s)] + state.history)[: order - 1]
        base = (s_next / s_mid) * x_s  # the data-prediction step is base − Δ; c scales Δ (AMED §3.3)
        return base + c * (x_plain - base)
    raise ValueError(f"unknown AMED method {method!r}")


def dynamic_threshold(x0: Tensor, quantile: float = 0.995) -> Tensor:
    """Dynamic thresholding of x̂0 (Saharia et al. 2022, Imagen): s = max(q_p(|x̂0|), 1) per sample, clamp to ±s, ÷ s."""
    q = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), quantile, dim=1).to(x0.dtype)
    s = append_dims(torch.clamp(q, min=1.0), x0.ndim)
    return torch.maximum(torch.minimum(x0, s), -s) / s


# --------------------------------------------------------------------------------------- the samplers
def _amed_nfe(grid: Grid, knobs: Mapping[str, Any]) -> int:
    """2 NFE per interval, one fewer with AFS, one fewer when the last step goes to σ = 0 (x = D), +1 for
    ``final_denoise`` on a grid ending above 0."""
    return 2 * len(grid) - int(bool(knobs.get("afs"))) - int(grid.ends_at_zero) + final_nfe(grid, knobs)


def _run(
    method: str, model: Denoiser, x: Tensor, grid: Grid, predictor: Predictor | None, afs: bool,
    callback: Callback, final_denoise: bool, **rule: Any,
) -> Tensor:
    if predictor is None:
        raise ValueError(
            f"{method}+amed needs a predictor: --predictor NAME_OR_PATH (e.g. mnist-ddpm/amed-nfe5), "
            "or FixedPredictor(r, c) from Python"
        )
    check_grid(predictor, grid)
    state = StepState()
    total = 2 * len(grid)
    for i, (s, s_next) in enumerate(grid.intervals()):
        start = step_start(model, x, s, afs=afs and i == 0, predictor=predictor)
        x = amed_step(method, model, start, i, s, s_next, predictor, state, total=total, **rule)
        if callback is not None:
            callback(StepInfo(i, s, s_next, x, start.denoised))
    return final_denoise_step(model, x, grid, final_denoise)


def check_grid(predictor: Predictor, grid: Grid) -> None:
    """A predictor trained on one grid refuses another (its recorded σ's, or its number of steps)."""
    sigmas = getattr(predictor, "grid_sigmas", None)
    if sigmas is not None:
        mine = torch.as_tensor(sigmas, dtype=torch.float64)
        if mine.shape != grid.sigmas.shape or not torch.allclose(mine, grid.sigmas, rtol=1e-6, atol=0):
            raise ValueError(
                f"this predictor was trained on a grid of {mine.numel() - 1} steps "
                f"({', '.join(f'{v:.4g}' for v in mine.tolist())}); got {grid} — "
                "sample with the predictor's own --schedule and --nfe"
            )
    n = getattr(predictor, "num_steps", None)  # 0: a per-sample predictor without step offsets, any length
    if n and n not in (len(grid), len(grid) - int(grid.ends_at_zero)):  # a last step to 0 has no parameters
        raise ValueError(f"this predictor has {n} steps, the grid has {len(grid)}")


@register_sampler("amed", kind="ode", nfe=_amed_nfe,
                  planning=Planning("time_uniform", learned=Learned("amed", ("heun", 1))))
def amed(
    model: Denoiser, x: Tensor, grid: Grid, *, generator: Generator = None, callback: Callback = None,
    predictor: Predictor | None = None, afs: bool = False, final_denoise: bool = False,
) -> Tensor:
    """AMED-Solver: x' = x + c(σ' − σ) ε̂(x_s, a·s), s = σ'^r σ^(1−r) (Zhou et al. 2024, AMED Eq. 9)."""
    return _run("amed", model, x, grid, predictor, afs, callback, final_denoise)


@register_sampler("euler+amed", kind="ode", nfe=_amed_nfe, planning=Planning(learned=Learned("euler", ("euler", 2))))
def euler_amed(
    model: Denoiser, x: Tensor, grid: Grid, *, generator: Generator = None, callback: Callback = None,
    predictor: Predictor | None = None, afs: bool = False, final_denoise: bool = False,
) -> Tensor:
    """AMED-Plugin on Euler: Euler σ → s, then x' = x_s + c(σ' − s) ε̂_s (AMED §3.3)."""
    return _run("euler", model, x, grid, predictor, afs, callback, final_denoise)


@register_sampler("dpm2+amed", kind="ode", nfe=_amed_nfe, planning=Planning(learned=Learned("dpm2", ("dpm2", 1))))
def dpm2_amed(
    model: Denoiser, x: Tensor, grid: Grid, *, generator: Generator = None, callback: Callback = None,
    predictor: Predictor | None = None, afs: bool = False, final_denoise: bool = False,
) -> Tensor:
    """AMED-Plugin on generalized DPM-Solver-2 with learned r and c (AMED §3.3, Table 1; r = 1, c = 1 is Heun)."""
    return _run("dpm2", model, x, grid, predictor, afs, callback, final_denoise)


@register_sampler("ipndm+amed", kind="ode", nfe=_amed_nfe, ranges={"max_order": KnobRange(1, 4)},
                  planning=Planning(learned=Learned("ipndm", ("ipndm", 2), multistep=True)))
def ipndm_amed(
    model: Denoiser, x: Tensor, grid: Grid, *, generator: Generator = None, callback: Callback = None,
    predictor: Predictor | None = None, afs: bool = False, max_order: int = 4, final_denoise: bool = False,
) -> Tensor:
    """AMED-Plugin on iPNDM: Adams–Bashforth σ → s → σ', c on the second sub-step (AMED §3.3)."""
    if max_order not in (1, 2, 3, 4):
        raise ValueError(f"ipndm+amed max_order must be 1 to 4, got {max_order}")
    return _run("ipndm", model, x, grid, predictor, afs, callback, final_denoise, max_order=max_order)


@register_sampler("dpmpp+amed", kind="ode", nfe=_amed_nfe, ranges={"order": KnobRange(1, 3)},
                  planning=Planning("logsnr", learned=Learned("dpmpp", ("dpmpp", 2), multistep=True)))
def dpmpp_amed(
    model: Denoiser, x: Tensor, grid: Grid, *, generator: Generator = None, callback: Callback = None,
    predictor: Predictor | None = None, afs: bool = False, order: int = 2, threshold: bool = False,
    final_denoise: bool = False,
) -> Tensor:
    """AMED-Plugin on DPM-Solver++ (data prediction, order 2–3) with optional dynamic thresholding (AMED §3.3)."""
    if order not in (1, 2, 3):
        raise ValueError(f"dpmpp+amed order must be 1, 2 or 3, got {order}")
    return _run("dpmpp", model, x, grid, predictor, afs, callback, final_denoise, order=order, threshold=threshold)


def refined_grid(grid: Grid, s_mids: list[float]) -> Grid:
    """σ_0, s_0, σ_1, s_1, …: the grid a plugin with fixed intermediate points steps on (for identities)."""
    vals = grid.sigmas.tolist()
    out = [vals[0]]
    for s_mid, s_next in zip(s_mids, vals[1:]):
        out += [s_mid, s_next]
    return Grid(torch.tensor(out, dtype=torch.float64))
