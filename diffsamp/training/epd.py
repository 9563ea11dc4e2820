"""One student interval of EPD's distillation (Zhu et al. 2025, EPD §3.3: per-step squared L2 to the teacher's
point) and of AdaSDE's (the same, after its noise injection), with r's gradient taken as ``train amed`` takes it on
a discrete-time network (``timestep_half_width``). The training loop itself is
``diffsamp.training.amed.train_amed`` (teacher trajectories, checkpoints, resume)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffsamp.models.base import Denoiser
from diffsamp.samplers.amed import StepStart, step_start
from diffsamp.samplers.epd import AdaSdeTable, EpdTable, combine, epd_step, inject_noise, point_directions


def timestep_half_width(timestep_sigmas: Tensor, s_mid: Tensor, s: float, s_next: float) -> Tensor:
    """Per point, the change of r that moves s = σ'^r σ^(1−r) by π timesteps of the table (where it is).

    A network trained on integer timesteps wiggles with period ≈ 2π of them between the integers; a central
    difference of half-width π cancels that sinusoid (sin(t+π) − sin(t−π) = 0) and keeps the trend."""
    log_table = timestep_sigmas.to(torch.float64).log()
    log_s = s_mid.detach().to(torch.float64).log().clamp(log_table[0], log_table[-1])
    hi = torch.searchsorted(log_table, log_s).clamp(1, len(log_table) - 1)
    per_step = log_table[hi] - log_table[hi - 1]  # d log σ / dt there
    return (math.pi * per_step / abs(math.log(s_next / s))).to(s_mid.dtype)


def epd_student_step(
    model: Denoiser, start: StepStart, i: int, s: float, s_next: float, table: EpdTable, target: Tensor, *,
    smoothed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(surrogate to differentiate, squared-L2 loss to the teacher point per trajectory, x_next) of interval ``i``.

    ``smoothed=False``: the surrogate is the loss (autograd through the network, σ input included).
    ``smoothed=True`` (discrete-time networks): c and λ keep their exact gradients; ∂L/∂r_k is the central
    difference of the loss over r_k ± π timesteps, the other points held, all 3K points (r, r + h, r − h) in one
    network call; a gets none (it acts only through the network's σ input)."""
    batch = target.shape[0]
    if not smoothed:
        x_next = epd_step(model, start, i, s, s_next, table)
        loss = (x_next - target).pow(2).sum() / batch
        return loss, loss, x_next
    r, c, a, lam = table(i)
    rd, ad, k = r.detach(), a.detach(), r.shape[0]
    s_mid = s_next**rd * s ** (1 - rd)
    half = timestep_half_width(model.timestep_sigmas, s_mid, s, s_next)
    r_hi, r_lo = (rd + half).clamp(max=1.0), (rd - half).clamp(min=0.0)
    if start.x.requires_grad:  # AdaSDE: x̂ carries γ's gradient, through the network's input
        d_mid = point_directions(model, start, s, s_next, rd, ad)
        with torch.no_grad():
            d_probe = point_directions(model, start, s, s_next, torch.cat([r_hi, r_lo]), torch.cat([ad, ad]))
    else:
        with torch.no_grad():
            d_all = point_directions(model, start, s, s_next, torch.cat([rd, r_hi, r_lo]), torch.cat([ad, ad, ad]))
        d_mid, d_probe = d_all[:k], d_all[k:]
    d_hi, d_lo = d_probe[:k], d_probe[k:]
    x_next = combine(start, s, s_next, c, lam, d_mid)
    loss = (x_next - target).pow(2).sum() / batch
    with torch.no_grad():
        base = x_next.detach()
        w = lam.detach().to(base.dtype) * c.detach().to(base.dtype)
        grads = []
        for j in range(k):
            per = [(base + (s_next - s) * w[j] * (d_probe[j] - d_mid[j]) - target).pow(2).sum() / batch
                   for d_probe in (d_hi, d_lo)]
            grads.append((per[0] - per[1]) / (r_hi[j] - r_lo[j]).clamp_min(1e-12))
        g = torch.stack(grads).to(r.dtype)
    return loss + (g * r).sum(), loss, x_next


def adasde_student_step(
    model: Denoiser, x: Tensor, i: int, s: float, s_next: float, table: AdaSdeTable, target: Tensor,
    noise: Tensor, *, afs: bool, smoothed: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """AdaSDE's interval ``i`` from the teacher's point ``x``: the noise injection x̂ = x + √(σ̂² − σ²)·noise at
    σ̂ = (1 + γ)σ, then EPD's step from (x̂, σ̂) (``epd_student_step``). γ's gradient flows through x̂ (the
    injected noise, into the network's input); σ̂ enters the arithmetic and the network's σ input as a constant,
    as a time scale's does on a discrete-time network."""
    x_hat, s_hat = inject_noise(x, s, table.gamma(i), noise)
    s_val = float(s_hat.detach())
    start = step_start(model, x_hat, s_val, afs=afs, predictor=table)
    return epd_student_step(model, start, i, s_val, s_next, table, target, smoothed=smoothed)
