"""Pure conversions between model outputs and the σ-space denoiser, and between σ and native times.

State conventions (CONTRIBUTING.md; EDM Eq. 4): the sampler state is x̄ = x0 + σ·ε. A network is called on its
native state x = a(σ)·x̄ at its native time t(σ):
  VP / DDPM:  a = 1/√(1+σ²), ᾱ = 1/(1+σ²)         (x = √ᾱ x0 + √(1−ᾱ) ε)
  RF (ours):  t = σ/(1+σ), a = 1 − t               (x_t = (1−t) x0 + t ε, t=0 data, t=1 noise)
Outputs: ε-prediction, x0-prediction, v-prediction v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022), and the
rectified-flow velocity v = dx_t/dt = ε − x0 (noise minus data, Liu et al. 2023 with t reversed).
All functions are elementwise and exact in float64; σ broadcasts (pass σ already shaped for x).
"""

from __future__ import annotations


import numpy as np
import torch
from torch import Tensor

# --- ε / x0 -----------------------------------------------------------------------------------------


def x0_from_eps(xbar: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """D = x̄ − σ ε (Karras et al. 2022, EDM Table 1: c_skip = 1, c_out = −σ), one fused pass over the tensors."""
    return torch.addcmul(xbar, sigma, eps, value=-1)


def eps_from_x0(xbar: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ = (x̄ − D)/σ (Karras et al. 2022, EDM Eq. 3)."""
    return (xbar - x0) / sigma


# --- VP scaling and v-prediction --------------------------------------------------------------------


def vp_scale(sigma: Tensor) -> Tensor:
    """a(σ) = √ᾱ = 1/√(1+σ²): x_VP = a·x̄ (EDM Table 1, VP: c_in = 1/√(σ²+1))."""
    return torch.as_tensor(sigma).square().add_(1).rsqrt_()  # in place on the new tensor: one allocation


def x0_from_v(xbar: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x0 = √ᾱ x_t − √(1−ᾱ) v with x_t = √ᾱ x̄ (v-prediction, Salimans & Ho 2022, §4)."""
    a = vp_scale(sigma)
    return a * (a * xbar) - (sigma * a) * v


def v_from_x0(xbar: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """v = √ᾱ ε − √(1−ᾱ) x0, the inverse of ``x0_from_v``."""
    a = vp_scale(sigma)
    return a * eps_from_x0(xbar, x0, sigma) - (sigma * a) * x0


# --- rectified flow ---------------------------------------------------------------------------------

# σ = ∞ (t = 1) is not representable: rectified-flow time runs from just inside it, t_max = 1 − 10⁻³, and
# stops at t_min = 10⁻³ when not at 0 (the ε of the RF paper's code, Liu et al. 2023). The one definition.
T_MAX = 1.0 - 1e-3
T_MIN = 1e-3


def rf_t_from_sigma(sigma: Tensor) -> Tensor:
    """t = σ/(1+σ) (RF with t=0 data, t=1 noise; CONTRIBUTING.md, Conventions)."""
    return sigma / (1 + sigma)


def rf_sigma_from_t(t: Tensor) -> Tensor:
    """σ = t/(1−t), the inverse of ``rf_t_from_sigma``."""
    return t / (1 - t)


def x0_from_velocity(xbar: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x̂0 = x_t − t v with x_t = (1−t) x̄ = x̄/(1+σ), v = ε − x0 (RF Alg. 1, time reversed)."""
    t = rf_t_from_sigma(sigma)
    return xbar / (1 + sigma) - t * v


def velocity_from_x0(xbar: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """v = ε̂ − x̂0, the inverse of ``x0_from_velocity``."""
    return eps_from_x0(xbar, x0, sigma) - x0


# --- σ ↔ native time --------------------------------------------------------------------------------


def vp_sde_sigma(t: Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> Tensor:
    """σ(t) = √(exp(½β_d t² + β_min t) − 1) for the VP-SDE (Song et al. 2021, Score-SDE Eq. 11)."""
    beta_d = beta_max - beta_min
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sde_t(sigma: Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> Tensor:
    """t(σ) = (√(β_min² + 2β_d log(1+σ²)) − β_min)/β_d, the inverse of ``vp_sde_sigma`` (EDM vp_sigma_inv)."""
    beta_d = beta_max - beta_min
    return (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)) - beta_min) / beta_d


NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


def ddpm_alphas_cumprod(
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    num_steps: int = NUM_TRAIN_TIMESTEPS,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """ᾱ_t = ∏(1 − β_s) for DDPM's linear β schedule (Ho et al. 2020 §4), the one definition.

    Computed in ``dtype``: float64 for exact analysis; float32 is what diffusers' DDPMScheduler computes
    (``scheduler_kwargs`` models train and sample on that table, widened to float64).
    """
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=dtype)
    return torch.cumprod(1 - betas, dim=0)


def ddpm_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) for each discrete DDPM timestep t (Ho et al. 2020, Eq. 4), float64."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - ac) / ac).sqrt()


class DdpmTimesteps:
    """σ → continuous DDPM timestep for one ᾱ table: linear interpolation of log σ_t over t (k-diffusion style).

    σ_t = √((1−ᾱ_t)/ᾱ_t) increases with t; σ outside the table is clamped to its ends, and σ's within 1e-6 of a
    table value map to that exact integer. With ``quantize`` the nearest integer timestep is returned. The
    interpolation tables are built once per device, so a network call pays only a few small tensor ops.
    """

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.log_sigmas = torch.log(((1 - ac) / ac).sqrt())
        self._log_np, self._steps_np = self.log_sigmas.numpy(), np.arange(len(ac), dtype=np.float64)
        self._ends = (float(self.log_sigmas[0]), float(self.log_sigmas[-1]))
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            log = self.log_sigmas.to(device=device, dtype=torch.float64 if device.type != "mps" else torch.float32)
            self._tables[device] = (log, 1 / (log[1:] - log[:-1]))
        return self._tables[device]

    def __call__(self, sigma: Tensor, *, quantize: bool = False) -> Tensor:
        if sigma.device.type == "cpu" and not sigma.requires_grad:  # a few µs in numpy, not a dozen tensor ops
            s = sigma.detach()
            s = (s if s.dtype in (torch.float32, torch.float64) else s.to(torch.float64)).numpy().astype(np.float64)
            t = np.interp(np.log(np.maximum(s, 1e-300)), self._log_np, self._steps_np)  # σ = 0 → the first step
            near = np.rint(t)
            return torch.from_numpy(near if quantize else np.where(np.abs(t - near) <= 1e-6, near, t))
        log, inv_width = self._on(sigma.device)
        log_s = sigma.to(log.dtype).log().clamp(*self._ends)
        lo = (torch.searchsorted(log, log_s) - 1).clamp(0, len(log) - 2)
        t = lo + (log_s - log[lo]) * inv_width[lo]
        near = t.round()
        if quantize:
            return near
        return torch.where((t - near).abs() <= 1e-6, near, t)  # exact table values map to exact integers


def ddpm_timestep_from_sigma(sigma: Tensor, alphas_cumprod: Tensor, *, quantize: bool = False) -> Tensor:
    """Continuous DDPM timestep for σ by linear interpolation of log σ_t over t (k-diffusion style); see
    ``DdpmTimesteps``, which a model keeps to avoid rebuilding the table every call."""
    return DdpmTimesteps(alphas_cumprod)(sigma, quantize=quantize)


def sigma_from_ddpm_timestep(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """σ(t) for a (possibly fractional) DDPM timestep, interpolating log σ_t: inverse of the above."""
    log_table = torch.log(((1 - alphas_cumprod) / alphas_cumprod).sqrt()).to(torch.float64)
    t = t.to(torch.float64).clamp(0, len(log_table) - 1)
    lo = t.floor().long().clamp(max=len(log_table) - 2)
    w = t - lo
    return torch.exp(log_table[lo] * (1 - w) + log_table[lo + 1] * w)


def rf_model_time(t: Tensor, scale: float = 999.0) -> Tensor:
    """The time a rectified-flow network is fed: ``scale``·t (the RF code feeds 999·t)."""
    return t * scale


