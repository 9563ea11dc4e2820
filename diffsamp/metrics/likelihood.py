"""Likelihoods of a denoiser: the DDPM variational bound (a hierarchical VAE) and the exact ODE likelihood.

**ELBO** (Ho et al. 2020, Eq. 5–7, §3.2). On a chain of timesteps τ_1 < … < τ_K (the model's own
T steps, or a strided sub-sequence: the VAE with fewer layers), with ᾱ_k := ᾱ_{τ_k}, ᾱ_0 := 1,

    −log p(x0) ≤ L_T + Σ_{k=2..K} L_{k−1} + L_0,
    L_T     = KL(q(x_K | x0) ‖ N(0, I)),                       q(x_K | x0) = N(√ᾱ_K x0, (1 − ᾱ_K) I)
    L_{k−1} = E_q KL(q(x_{k−1} | x_k, x0) ‖ p(x_{k−1} | x_k)),
    L_0     = −E_q log p(x0 | x_1)                              (the discretised Gaussian decoder, 8-bit data).

On the strided chain the one-step coefficients are derived from the sub-sequence: α_k = ᾱ_k/ᾱ_{k−1},
β_k = 1 − α_k, posterior q(x_{k−1} | x_k, x0) = N(μ̃, β̃_k I) with μ̃ = c0·x0 + cx·x_k,
c0 = √ᾱ_{k−1} β_k/(1 − ᾱ_k), cx = √α_k (1 − ᾱ_{k−1})/(1 − ᾱ_k), β̃_k = (1 − ᾱ_{k−1}) β_k/(1 − ᾱ_k) (DDPM Eq. 6–7).
The model's p(x_{k−1} | x_k) = N(μ̃(x̂0, x_k), σ_k² I) plugs x̂0 = D(x̄_k, σ_k) into the posterior mean
(ε-prediction, DDPM Eq. 11), so μ̃ − μ_θ = c0 (x0 − x̂0) and

    L_{k−1} = ½ Σ_dims [ β̃_k/σ_k² − 1 − log(β̃_k/σ_k²) + c0² (x0 − x̂0)²/σ_k² ]

for either variance choice σ_k² = β̃_k ("posterior", DDPM's fixed_small) or σ_k² = β_k ("beta", fixed_large).
The decoder's variance at k = 1 is β_1 ("beta") or, for "posterior" where β̃_1 = 0, β̃ of the second step, as
Ho et al.'s code clips it; its mean is x̂0(x_1). The bound is computed with the network **unclipped**
(x̂0 clipping off: clipping is a sampling heuristic, not part of the model's p(x_{k−1} | x_k)).
The expectation over x_k is one draw per (image, k). The sum over k is exact (every k) or estimated by
importance-sampled k with a standard error.

**ODE likelihood** (Song et al. 2021, Score-SDE §4.3 and App. D). The probability-flow ODE in σ-space,
dx̄/dσ = (x̄ − D(x̄, σ))/σ (EDM Eq. 1, 3), is integrated from σ_min up to σ_max in ℓ = log σ on the state
y = x̄/s(σ) that stays O(1) (s = √(1+σ²) for VP models, 1 + σ for rectified flows, 1 for VE), with

    log p_{σmin}(x̄) = log N(x̄(σmax); 0, prior_scale(σmax)² I) + ∫_{σmin}^{σmax} (d − tr ∂D/∂x̄) dσ/σ

and tr ∂D/∂x̄ by Hutchinson's estimator vᵀ(∂D/∂x̄)v with Rademacher v fixed along the path (or exactly,
for low-dimensional toys), RK45 by scipy's ``solve_ivp``. 8-bit data are dequantised uniformly over the bin of
width 2/255 centred on each pixel value (the decoder's bins), so the estimate bounds the same discrete 8-bit
NLL the ELBO bounds: NLL_8bit = −log p(x) − d·log(2/255) (the log-det of the affine map [0, 255] → [−1, 1]).

Bits/dim divides nats by d·ln 2, d = the number of values the model sees (32×32 = 1024 for MNIST padded by
the data loader); ``bits_per_dim(dims=784)`` reports the same total per 28×28 pixel, which bounds the NLL of
the unpadded image because the padding is deterministic.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from diffsamp.models.base import Denoiser, clipping_off, prior_scale
from diffsamp.models.diffusers_unet import alphas_cumprod_of
from diffsamp.models.parameterization import ddpm_sigmas
from diffsamp.samplers.grid import DDPMSchedule

Variance = Literal["posterior", "beta"]
Progress = Callable[[int, int], None] | None
LN2 = math.log(2.0)
NOISE_CHUNK = 64  # steps of one image whose noise is drawn at once (fixed, so results do not depend on batching)


# ------------------------------------------------------------------------------------------ the ᾱ table
def model_alphas_cumprod(model: Any) -> Tensor:
    """The discrete DDPM ᾱ_t table (t = 1 … T) a model was trained on, float64 — the one place it is read."""
    table = alphas_cumprod_of(model)
    if table is None:
        raise ValueError(
            f"{type(model).__name__} has no discrete DDPM ᾱ table (alphas_cumprod): the variational bound is "
            "defined for DDPM models; use the ODE likelihood (method 'ode') for this model"
        )
    return torch.as_tensor(table, dtype=torch.float64).cpu()


def _unclipped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs ``fn(model, …)`` with the model's own x̂0 clipping off (``clipping_off``: any wrappers, restored after)."""

    @functools.wraps(fn)
    def run(model: Denoiser, *args: Any, **kwargs: Any) -> Any:
        with clipping_off(model):
            return fn(model, *args, **kwargs)

    return run


def chain_timesteps(alphas_cumprod: Tensor, steps: int | None = None) -> Tensor:
    """1-based τ_1 < … < τ_K: all T steps, or K strided ones with diffusers' 'linspace' spacing
    (1 + round(linspace(0, T−1, K)), which keeps both t = 1 and t = T)."""
    T = len(alphas_cumprod)
    if steps is None or steps == T:
        return torch.arange(1, T + 1)
    ts = DDPMSchedule(alphas_cumprod, spacing="linspace").timesteps(steps)[::-1].copy() + 1
    return torch.from_numpy(ts)


@dataclass(frozen=True)
class ChainCoefficients:
    """Per-step coefficients of a (possibly strided) DDPM chain, index k = 0 … K−1 for τ_1 … τ_K (float64)."""

    timesteps: Tensor     # τ_k, 1-based
    abar: Tensor          # ᾱ_{τ_k}
    abar_prev: Tensor     # ᾱ_{τ_{k−1}} (1 for k = 1)
    beta: Tensor          # β_k = 1 − ᾱ_k/ᾱ_{k−1}
    beta_tilde: Tensor    # β̃_k = (1 − ᾱ_{k−1}) β_k/(1 − ᾱ_k)
    c0: Tensor            # posterior-mean coefficient of x0
    sigma: Tensor         # σ-space noise level √((1 − ᾱ_k)/ᾱ_k)

    def variance(self, choice: Variance) -> Tensor:
        """σ_k² of p(x_{k−1} | x_k); at k = 1 the 'posterior' choice uses β̃ of the second step (Ho et al.)."""
        if choice == "beta":
            return self.beta.clone()
        if choice != "posterior":
            raise ValueError(f"variance must be 'posterior' or 'beta', got {choice!r}")
        v = self.beta_tilde.clone()
        v[0] = self.beta_tilde[1] if len(v) > 1 else self.beta[0]
        return v


def chain_coefficients(alphas_cumprod: Tensor, timesteps: Tensor) -> ChainCoefficients:
    """DDPM Eq. 6–7 on the sub-sequence ᾱ_{τ_1}, …, ᾱ_{τ_K} (ᾱ_{τ_0} = 1)."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    t = torch.as_tensor(timesteps, dtype=torch.long)
    abar = ac[t - 1]
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    beta = 1 - abar / prev
    beta_tilde = (1 - prev) * beta / (1 - abar)
    c0 = prev.sqrt() * beta / (1 - abar)
    return ChainCoefficients(t, abar, prev, beta, beta_tilde, c0, ddpm_sigmas(abar))


# ------------------------------------------------------------------------------------------ closed forms
def gaussian_kl(mean1: Tensor, var1: Tensor | float, mean2: Tensor, var2: Tensor | float) -> Tensor:
    """Elementwise KL(N(mean1, var1) ‖ N(mean2, var2)) in nats."""
    var1 = torch.as_tensor(var1, dtype=mean1.dtype, device=mean1.device)
    var2 = torch.as_tensor(var2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (var1 / var2 - 1 - torch.log(var1 / var2) + (mean1 - mean2) ** 2 / var2)


def _log_ndtr_diff(a: Tensor, b: Tensor) -> Tensor:
    """log(Φ(b) − Φ(a)) for a < b, accurate in both tails (uses the mirror image where a > 0)."""
    flip = a > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    lhi, llo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return lhi + torch.log1p(-torch.exp((llo - lhi).clamp(max=0.0)))


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, std: Tensor | float, *, bin_width: float = 2 / 255, lo: float = -1.0, hi: float = 1.0
) -> Tensor:
    """log P(bin of x) for N(mean, std²) integrated over the bin of width ``bin_width`` centred on x, with
    the first and last bins extended to ∓∞ (DDPM §3.3, Eq. 13). Elementwise, nats; sums to 1 over the bins."""
    x, mean = x.to(torch.float64), mean.to(torch.float64)
    std = torch.as_tensor(std, dtype=torch.float64, device=x.device)
    half = bin_width / 2
    a = (x - half - mean) / std
    b = (x + half - mean) / std
    a = torch.where(x <= lo + half / 2, torch.full_like(a, -math.inf), a)
    b = torch.where(x >= hi - half / 2, torch.full_like(b, math.inf), b)
    inner = _log_ndtr_diff(torch.where(torch.isinf(a), torch.full_like(a, -1e300), a),
                           torch.where(torch.isinf(b), torch.full_like(b, 1e300), b))
    left = torch.special.log_ndtr(b)        # lowest bin: Φ(b)
    right = torch.special.log_ndtr(-a)      # highest bin: 1 − Φ(a)
    return torch.where(torch.isinf(a), left, torch.where(torch.isinf(b), right, inner))


def gaussian_log_density(x: Tensor, mean: Tensor, var: Tensor | float) -> Tensor:
    """Elementwise log N(x; mean, var) in nats (the continuous decoder, for real-valued test data)."""
    var = torch.as_tensor(var, dtype=torch.float64, device=x.device)
    return -0.5 * (torch.log(2 * math.pi * var) + (x.to(torch.float64) - mean.to(torch.float64)) ** 2 / var)


# ------------------------------------------------------------------------------------------ data scaling
def _as_model_data(images: Tensor, data_range: tuple[float, float]) -> tuple[Tensor, bool, float]:
    """(x in the model's data space as float64, discrete?, bin width). uint8 → lo + y·(hi − lo)/255."""
    lo, hi = data_range
    if images.dtype == torch.uint8:
        w = (hi - lo) / 255
        return lo + images.to(torch.float64) * w, True, w
    return images.to(torch.float64), False, 0.0


def _model_dtype(model: Any) -> torch.dtype:
    """The network's dtype; float64 for closed-form models (no network)."""
    return model.dtype if isinstance(model.network, torch.nn.Module) else torch.float64


def _model_device(model: Any) -> torch.device:
    return model.device


def _bpd(nats: Tensor, dims: int) -> tuple[float, float]:
    v = nats.to(torch.float64) / (dims * LN2)
    se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


# ------------------------------------------------------------------------------------------ ELBO
@dataclass
class ELBOResult:
    """The variational bound per image (nats) and its pieces; bits/dim with the standard error over images.

    ``per_step`` rows (for CSV/plots): for each chain step k (τ_k, σ_k) the mean over images of the term
    attached to it — k = 1 is the decoder L_0, k ≥ 2 the KL L_{k−1} — in bits/dim, with the number of
    evaluations behind it (all images when exact; the importance-sampled hits otherwise). ``prior`` is L_T.
    """

    nats: Tensor              # (N,) the bound, per image
    prior_nats: Tensor        # (N,) L_T
    decoder_nats: Tensor      # (N,) L_0
    kl_nats: Tensor           # (N,) Σ L_{k−1} (exact or importance-sampled estimate)
    dims: int
    timesteps: Tensor
    sigmas: Tensor
    per_step_bpd: Tensor      # (K,) mean term per step in bits/dim (NaN where never evaluated)
    per_step_count: Tensor    # (K,)
    variance: Variance
    method: Literal["exact", "importance"]
    t_samples: int | None
    nfe: int                  # network evaluations per image
    seconds: float
    discrete: bool
    nats_in_mask: Tensor | None = None
    mask_dims: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def bits_per_dim(self, dims: int | None = None) -> tuple[float, float]:
        """(mean, standard error) of the bound in bits per dim (``dims`` default: the model's)."""
        return _bpd(self.nats, dims or self.dims)

    def parts_bpd(self) -> dict[str, float]:
        """Mean L_T, Σ L_{t−1}, L_0 in bits/dim (over the model's dims)."""
        d = self.dims * LN2
        return {"prior": float(self.prior_nats.mean() / d), "kl": float(self.kl_nats.mean() / d),
                "decoder": float(self.decoder_nats.mean() / d)}


def importance_proposal(coef: ChainCoefficients, data_var: float = 1.0, uniform_mix: float = 0.5) -> Tensor:
    """p(k) over the KL steps k = 2 … K: ∝ ½ΔSNR_k · MSE*_k mixed with uniform.

    With σ² = β̃ the KL is ½(SNR_{k−1} − SNR_k)‖x0 − x̂0‖² (Kingma et al. 2021, VDM Eq. 13 in discrete
    form); MSE*_k = v σ_k²/(v + σ_k²) is the error of the best denoiser of N(0, v) data — a stand-in for the
    model's error that makes p free to compute. The uniform part keeps every step's probability ≥
    ``uniform_mix``/(K − 1), so the estimate stays unbiased with a bounded weight.
    """
    snr = 1 / coef.sigma**2
    snr_prev = torch.cat([torch.full((1,), math.inf, dtype=torch.float64), snr[:-1]])
    w = (snr_prev - snr)[1:] * data_var * coef.sigma[1:] ** 2 / (data_var + coef.sigma[1:] ** 2)
    p = w / w.sum()
    n = len(p)
    return (1 - uniform_mix) * p + uniform_mix / n


@_unclipped
def elbo(
    model: Denoiser,
    images: Tensor,
    *,
    steps: int | None = None,
    variance: Variance = "posterior",
    t_samples: int | None = None,
    proposal: Tensor | None = None,
    alphas_cumprod: Tensor | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    mask: Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: Progress = None,
    image_seeds: Sequence[int] | None = None,
) -> ELBOResult:
    """The DDPM variational bound (Ho et al. 2020, Eq. 5) of each image, for the model's T-step chain
    (``steps`` None) or a strided K-step chain (``steps`` = K; see ``chain_timesteps``).

    ``images``: uint8 (N, C, H, W) in [0, 255] → the discretised decoder on 8-bit data (bits/dim of the
    discrete data), or float in the model's data space → the continuous Gaussian decoder (a density bound).
    ``t_samples``: None → every KL term of every image (K network calls per image); M → M steps per image
    drawn from ``proposal`` (default ``importance_proposal``) and weighted by 1/(M·p), unbiased, with the
    prior and decoder terms exact (M + 1 calls per image). ``alphas_cumprod`` overrides the model's table.
    ``mask`` (a sample-shaped bool tensor) also sums every term over the masked values only
    (``nats_in_mask``, e.g. the 28×28 interior of padded MNIST). Image i's noise comes from seed + i
    (``image_seeds[i]`` when given: a shard of a larger set), so its terms do not depend on the batch size.
    Runs without gradients.
    """
    start = time.perf_counter()
    ac = model_alphas_cumprod(model) if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    if steps is not None and not 1 <= steps <= len(ac):
        raise ValueError(f"steps must be between 1 and T = {len(ac)}, got {steps}")
    coef = chain_coefficients(ac, chain_timesteps(ac, steps))
    K = len(coef.timesteps)
    var = coef.variance(variance)
    net = model  # x̂0 clipping is off here (@_unclipped)
    x_all, discrete, bin_w = _as_model_data(images, data_range)
    N = x_all.shape[0]
    dims = int(x_all[0].numel())
    device, dtype = _model_device(model), _model_dtype(model)
    m = None if mask is None else torch.as_tensor(mask, dtype=torch.float64).expand_as(x_all[0]).to(device)
    exact = t_samples is None or (K > 1 and t_samples >= K - 1) or K == 1
    if not exact and (t_samples is None or t_samples < 1):
        raise ValueError(f"t_samples must be a positive integer or None, got {t_samples}")
    p = None
    if not exact:
        p = importance_proposal(coef) if proposal is None else torch.as_tensor(proposal, dtype=torch.float64)
        if p.shape != (K - 1,) or bool((p <= 0).any()):
            raise ValueError(f"proposal must be {K - 1} positive probabilities over the KL steps k = 2 … K")
        p = p / p.sum()

    lo, hi = data_range
    sums = {k: torch.zeros(N, dtype=torch.float64) for k in ("prior", "dec", "kl", "mask")}
    step_sum = torch.zeros(K, dtype=torch.float64)
    step_cnt = torch.zeros(K, dtype=torch.float64)

    def reduce(per_value: Tensor) -> tuple[Tensor, Tensor]:
        flat = per_value.reshape(per_value.shape[0], -1)
        inside = (per_value * m).reshape(per_value.shape[0], -1).sum(1) if m is not None else torch.zeros(len(flat))
        return flat.sum(1).cpu(), inside.cpu()

    def denoise(x0: Tensor, ks: Tensor, eps: Tensor) -> Tensor:
        sig = coef.sigma[ks].to(device)
        xbar = x0 + sig.reshape((-1,) + (1,) * (x0.ndim - 1)) * eps
        return net(xbar.to(dtype), sig.to(dtype)).to(torch.float64)

    def terms(x0: Tensor, ks: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """Per-value nats of the step terms for (image, k) pairs: decoder at k = 0, KL otherwise."""
        x0_hat = denoise(x0, ks, eps)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        v = var[ks].to(device).reshape(shape)
        bt = coef.beta_tilde[ks].to(device).reshape(shape)
        c0 = coef.c0[ks].to(device).reshape(shape)
        kl = 0.5 * (bt / v - 1 - torch.log(torch.where(bt > 0, bt / v, torch.ones_like(bt)))
                    + c0**2 * (x0 - x0_hat) ** 2 / v)
        if discrete:
            dec = -discretized_gaussian_log_likelihood(x0, x0_hat, v.sqrt(), bin_width=bin_w, lo=lo, hi=hi)
        else:
            dec = -gaussian_log_density(x0, x0_hat, v)
        is_dec = (ks == 0).to(device).reshape(shape)
        return torch.where(is_dec, dec, kl), is_dec

    gens = [torch.Generator().manual_seed(s) for s in _image_seeds(seed, N, image_seeds)]
    sample_shape = tuple(x_all.shape[1:])
    nfe = 0
    with torch.inference_mode():
        for b in range(0, N, batch_size):
            idx = list(range(b, min(b + batch_size, N)))
            x0 = x_all[idx].to(device)
            a_T = float(coef.abar[-1])
            prior = gaussian_kl(math.sqrt(a_T) * x0, 1 - a_T, torch.zeros_like(x0), 1.0)
            tot, ins = reduce(prior)
            sums["prior"][idx] += tot
            sums["mask"][idx] += ins
            if exact:
                for k in range(K):
                    if k % NOISE_CHUNK == 0:  # image i's noise for the next steps in one draw (batch-size free)
                        n_k = min(NOISE_CHUNK, K - k)
                        chunk = torch.stack([torch.randn((n_k,) + sample_shape, generator=gens[i], dtype=torch.float64)
                                             for i in idx], dim=1)
                    eps = chunk[k % NOISE_CHUNK]
                    ks = torch.full((len(idx),), k, dtype=torch.long)
                    per, _ = terms(x0, ks, eps.to(device))
                    tot, ins = reduce(per)
                    sums["dec" if k == 0 else "kl"][idx] += tot
                    sums["mask"][idx] += ins
                    step_sum[k] += tot.sum()
                    step_cnt[k] += len(idx)
                nfe = K
            else:
                assert p is not None and t_samples is not None
                # decoder (exact) + M importance-sampled KL steps per image, flattened into chunks of batch_size
                pairs_img, pairs_k, pairs_w = [], [], []
                for i in idx:
                    draws = torch.multinomial(p, t_samples, replacement=True, generator=gens[i]) + 1
                    pairs_img += [i] * (t_samples + 1)
                    pairs_k += [0] + draws.tolist()
                    pairs_w += [1.0] + (1.0 / (t_samples * p[draws - 1])).tolist()
                eps_all = {i: torch.randn((t_samples + 1,) + sample_shape, generator=gens[i], dtype=torch.float64)
                           for i in idx}
                eps_flat = torch.cat([eps_all[i] for i in idx])
                pi, pk, pw = torch.tensor(pairs_img), torch.tensor(pairs_k), torch.tensor(pairs_w, dtype=torch.float64)
                for c in range(0, len(pi), batch_size):
                    sl = slice(c, c + batch_size)
                    per, _ = terms(x_all[pi[sl]].to(device), pk[sl], eps_flat[sl].to(device))
                    tot, ins = reduce(per)
                    is_dec = pk[sl] == 0
                    sums["dec"].index_add_(0, pi[sl][is_dec], tot[is_dec])
                    sums["kl"].index_add_(0, pi[sl][~is_dec], (tot * pw[sl])[~is_dec])
                    sums["mask"].index_add_(0, pi[sl], ins * pw[sl])
                    step_sum.index_add_(0, pk[sl], tot)
                    step_cnt.index_add_(0, pk[sl], torch.ones(len(tot), dtype=torch.float64))
                nfe = t_samples + 1
            if progress is not None:
                progress(idx[-1] + 1, N)
    per_step = torch.where(step_cnt > 0, step_sum / step_cnt.clamp_min(1) / (dims * LN2),
                           torch.full_like(step_sum, math.nan))
    total = sums["prior"] + sums["dec"] + sums["kl"]
    mask_dims = int(m.sum()) if m is not None else None
    return ELBOResult(
        nats=total, prior_nats=sums["prior"], decoder_nats=sums["dec"], kl_nats=sums["kl"], dims=dims,
        timesteps=coef.timesteps, sigmas=coef.sigma, per_step_bpd=per_step, per_step_count=step_cnt,
        variance=variance, method="exact" if exact else "importance", t_samples=None if exact else t_samples,
        nfe=nfe, seconds=time.perf_counter() - start, discrete=discrete,
        nats_in_mask=sums["mask"] if m is not None else None, mask_dims=mask_dims,
    )


# ------------------------------------------------------------------------------------------ ODE likelihood
def _native_scale(prior: str, sigma: float) -> tuple[float, float]:
    """(s(σ), σ·s'(σ)/s(σ)) of the state y = x̄/s that stays O(1) along the ODE."""
    if prior == "vp":
        return math.sqrt(1 + sigma**2), sigma**2 / (1 + sigma**2)
    if prior == "rf":
        return 1 + sigma, sigma / (1 + sigma)
    if prior == "ve":
        return 1.0, 0.0
    raise ValueError(f"unknown prior {prior!r}")


@dataclass
class ODEResult:
    """−log p per image (nats; 8-bit scale for uint8 data) through the probability-flow ODE."""

    nats: Tensor              # (N,)
    prior_nats: Tensor        # (N,) −log prior(x̄(σ_max))
    divergence_nats: Tensor   # (N,) ∫ (d − tr ∂D/∂x̄) dlog σ
    dims: int
    probes: int | None        # Hutchinson probes (None: exact trace)
    nfe: float                # mean function evaluations per batch (each is a forward + backward per probe)
    seconds: float
    discrete: bool
    sigma_min: float
    sigma_max: float
    rtol: float
    atol: float
    curve_sigmas: Tensor      # σ's where the accumulated divergence was recorded
    curve_bpd: Tensor         # mean over images of ∫_{σmin}^{σ} (…) in bits/dim
    info: dict[str, Any] = field(default_factory=dict)

    def bits_per_dim(self, dims: int | None = None) -> tuple[float, float]:
        """(mean, standard error over images) in bits per dim; the error includes the dequantisation and
        Hutchinson noise, since each image has its own draws."""
        return _bpd(self.nats, dims or self.dims)


def ode_nll(
    model: Denoiser,
    images: Tensor,
    *,
    probes: int | None = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    seed: int = 0,
    batch_size: int = 64,
    curve_points: int = 33,
    progress: Progress = None,
    image_seeds: Sequence[int] | None = None,
) -> ODEResult:
    """−log p(x) of each image under the model's probability-flow ODE (Score-SDE §4.3, App. D).

    ``images``: uint8 (N, C, H, W) → uniformly dequantised over the bins of width (hi − lo)/255 centred on the
    model's data values, result on the 8-bit scale (NLL_8bit = −log p(x) − d log bin_width); float → the
    density of x itself in the model's space. ``probes``: Rademacher vectors per image for Hutchinson's trace,
    fixed along the path (None: the exact trace, d backward passes, for toys). σ range: the model's own
    (the density is that of the ODE's pushforward of the prior at σ_min). Image i draws its dequantisation
    and probes from seed + i (``image_seeds[i]`` when given). Adaptive RK45 (scipy) with ``rtol``/``atol`` on the O(1) state, batched: the
    step size is shared by the batch. Works on any denoiser; the prior is ``prior_scale(model.prior, σ_max)``.
    The figure depends on where the ODE is truncated (Kim et al. 2022, "Soft Truncation"): p_{σmin} is the data
    blurred at σ_min, which costs bits when σ_min is wide compared with a bin, while far below the σ's a model
    was trained on its density turns spiky and uniform dequantisation lands between the spikes.
    """
    from scipy.integrate import solve_ivp

    start = time.perf_counter()
    s_min = float(model.sigma_min if sigma_min is None else sigma_min)
    s_max = float(model.sigma_max if sigma_max is None else sigma_max)
    if not 0 < s_min < s_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {s_min}, {s_max}")
    if probes is not None and probes < 1:
        raise ValueError(f"probes must be a positive integer or None (exact trace), got {probes}")
    prior = model.prior
    x_all, discrete, bin_w = _as_model_data(images, data_range)
    N = x_all.shape[0]
    shape = tuple(x_all.shape[1:])
    d = int(x_all[0].numel())
    device, dtype = _model_device(model), _model_dtype(model)
    l_min, l_max = math.log(s_min), math.log(s_max)
    l_eval = np.linspace(l_min, l_max, curve_points)
    out_nats = torch.zeros(N, dtype=torch.float64)
    out_prior = torch.zeros(N, dtype=torch.float64)
    out_div = torch.zeros(N, dtype=torch.float64)
    curve = np.zeros(curve_points)
    nfes: list[int] = []
    seeds = _image_seeds(seed, N, image_seeds)

    for b in range(0, N, batch_size):
        idx = list(range(b, min(b + batch_size, N)))
        B = len(idx)
        gens = [torch.Generator().manual_seed(seeds[i]) for i in idx]
        x0 = x_all[idx]
        if discrete:
            u = torch.stack([torch.rand(shape, generator=g, dtype=torch.float64) for g in gens])
            x0 = x0 + (u - 0.5) * bin_w
        if probes is not None:
            v = torch.stack([torch.randint(0, 2, (probes,) + shape, generator=g).to(torch.float64) * 2 - 1
                             for g in gens]).transpose(0, 1).to(device=device, dtype=dtype)  # (P, B, ...)
        calls = [0]

        def rhs(ell: float, z: np.ndarray) -> np.ndarray:
            sig = math.exp(ell)
            s, ds = _native_scale(prior, sig)
            y = torch.from_numpy(z[: B * d]).reshape((B,) + shape)
            with torch.inference_mode(False), torch.enable_grad():
                xbar = (s * y).to(device=device, dtype=dtype).requires_grad_(True)
                den = model(xbar, torch.full((B,), sig, device=device, dtype=dtype))
                if probes is None:
                    tr = torch.zeros(B, dtype=torch.float64, device=device)
                    flat = den.reshape(B, -1)
                    for j in range(d):
                        (g,) = torch.autograd.grad(flat[:, j].sum(), xbar, retain_graph=j < d - 1)
                        tr += g.reshape(B, -1)[:, j].to(torch.float64)
                else:
                    tr = torch.zeros(B, dtype=torch.float64, device=device)
                    for p_i in range(probes):
                        (g,) = torch.autograd.grad(den, xbar, grad_outputs=v[p_i], retain_graph=p_i < probes - 1)
                        tr += (g * v[p_i]).reshape(B, -1).sum(1).to(torch.float64)
                    tr /= probes
            calls[0] += 1
            den64 = den.detach().to(torch.float64).cpu()
            dy = (s * y - den64) / s - ds * y
            ddiv = d - tr.detach().cpu() - d * ds
            return np.concatenate([dy.reshape(-1).numpy(), ddiv.numpy()])

        s0, _ = _native_scale(prior, s_min)
        z0 = np.concatenate([(x0 / s0).reshape(-1).numpy(), np.zeros(B)])
        sol = solve_ivp(rhs, (l_min, l_max), z0, method="RK45", rtol=rtol, atol=atol, t_eval=l_eval)
        if not sol.success:
            raise RuntimeError(f"RK45 failed on the likelihood ODE: {sol.message}")
        nfes.append(calls[0])
        zT = sol.y[:, -1]
        s1, _ = _native_scale(prior, s_max)
        y_T = torch.from_numpy(zT[: B * d].copy()).reshape(B, -1)
        div_y = torch.from_numpy(zT[B * d :].copy())
        xbar_T = s1 * y_T
        ps = prior_scale(prior, s_max)
        log_prior_x = -0.5 * (xbar_T**2).sum(1) / ps**2 - 0.5 * d * math.log(2 * math.pi * ps**2)
        # log p_y(y_T) = log p_x̄(x̄_T) + d log s1; log p_y(y_0) = that + ∫div_y; log p_x̄(x̄_0) = − d log s0
        log_p = log_prior_x + d * math.log(s1) + div_y - d * math.log(s0)
        nll = -log_p
        if discrete:
            nll = nll - d * math.log(bin_w)
        out_nats[idx] = nll
        out_prior[idx] = -log_prior_x
        # the divergence of x̄ itself: ∫(d − tr) dℓ = ∫div_y dℓ + d log(s1/s0)
        out_div[idx] = div_y + d * math.log(s1 / s0)
        sc = np.array([_native_scale(prior, math.exp(e))[0] for e in l_eval])
        curve += (sol.y[B * d :, :].sum(0) + B * d * np.log(sc / s0)) / (d * LN2)
        if progress is not None:
            progress(idx[-1] + 1, N)
    return ODEResult(
        nats=out_nats, prior_nats=out_prior, divergence_nats=out_div, dims=d, probes=probes,
        nfe=float(np.mean(nfes)), seconds=time.perf_counter() - start, discrete=discrete,
        sigma_min=s_min, sigma_max=s_max, rtol=rtol, atol=atol,
        curve_sigmas=torch.from_numpy(np.exp(l_eval)), curve_bpd=torch.from_numpy(curve / N),
        info={"batches": len(nfes)},
    )


def _image_seeds(seed: int, n: int, image_seeds: Sequence[int] | None) -> list[int]:
    if image_seeds is None:
        return [seed + i for i in range(n)]
    if len(image_seeds) != n:
        raise ValueError(f"{len(image_seeds)} image seeds for {n} images")
    return [int(s) for s in image_seeds]


def merge_over_ranks(result: ELBOResult | ODEResult, total: int, block: int) -> ELBOResult | ODEResult:
    """Under torchrun: the result over every rank's ``diffsamp.dist.shard(…, block)`` of the images (each computed
    with ``image_seeds`` = seed + its indices), per-image values back in image order; itself in a single process."""
    from diffsamp import dist

    if dist.world_size() == 1:
        return result
    per_image = {f: dist.gather_shards(getattr(result, f), total, block) for f in
                 ("nats", "prior_nats", "decoder_nats", "kl_nats", "nats_in_mask", "divergence_nats")
                 if getattr(result, f, None) is not None}
    seconds = max(dist.gather_objects(result.seconds))
    if isinstance(result, ELBOResult):
        count = dist.all_reduce_sum(result.per_step_count)
        weighted = dist.all_reduce_sum(torch.nan_to_num(result.per_step_bpd) * result.per_step_count)
        per_step = torch.where(count > 0, weighted / count.clamp_min(1), torch.full_like(weighted, math.nan))
        return replace(result, **per_image, per_step_bpd=per_step, per_step_count=count, seconds=seconds)
    n = len(result.nats)
    curve = dist.all_reduce_sum(result.curve_bpd * n) / total
    batches = result.info.get("batches", 1)
    nfe_sum, batch_sum = dist.all_reduce_sum(torch.tensor([result.nfe * batches, float(batches)], dtype=torch.float64))
    return replace(result, **per_image, curve_bpd=curve, nfe=float(nfe_sum / batch_sum), seconds=seconds,
                   info={**result.info, "batches": int(batch_sum)})


def per_step_rows(result: ELBOResult) -> list[dict[str, Any]]:
    """Rows (k, t, sigma, term, count, bits_per_dim) for a CSV of the bound's per-step terms, then L_T."""
    rows: list[dict[str, Any]] = []
    for k in range(len(result.timesteps)):
        rows.append({"k": k + 1, "t": int(result.timesteps[k]), "sigma": float(result.sigmas[k]),
                     "term": "L_0" if k == 0 else f"L_{k}", "count": int(result.per_step_count[k]),
                     "bits_per_dim": float(result.per_step_bpd[k])})
    rows.append({"k": len(result.timesteps) + 1, "t": int(result.timesteps[-1]), "sigma": float(result.sigmas[-1]),
                 "term": "L_T", "count": len(result.nats),
                 "bits_per_dim": float(result.prior_nats.mean() / (result.dims * LN2))})
    return rows


__all__: Sequence[str] = [
    "ChainCoefficients", "ELBOResult", "ODEResult", "chain_coefficients", "chain_timesteps",
    "discretized_gaussian_log_likelihood", "elbo", "gaussian_kl", "gaussian_log_density", "importance_proposal",
    "model_alphas_cumprod", "ode_nll", "per_step_rows",
]
