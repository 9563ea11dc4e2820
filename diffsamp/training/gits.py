"""GITS: a time schedule found by dynamic programming over a fine teacher grid (Chen et al. 2024, "On the Trajectory
Regularity of ODE-based Diffusion Sampling", ICML; §4, Alg. 1). No gradients: seconds after the teacher has run.

1. A teacher (Heun by default) integrates ``trajectories`` draws from σ_max to 0 on a fine grid σ_0 > … > σ_M = 0,
   keeping every point x_i and the slope d_i = (x_i − D(x_i, σ_i))/σ_i there.
2. The cost of jumping from fine point i to j > i is the mean over the draws of the L2 norm of one Euler (DDIM) step's
   error there, C[i, j] = ‖x_i + (σ_j − σ_i) d_i − x_j‖₂ (the paper's local truncation error, teacher-forced).
3. Dynamic programming picks the K-step path 0 = i_0 < i_1 < … < i_K = M of least total cost: the schedule
   σ_{i_0} > … > σ_{i_K} = 0, K intervals, the last one the denoising step to 0 (one evaluation), run with any
   one-evaluation sampler (the paper pairs it with iPNDM).

The result is a plain list of σ's (and timesteps for a discrete-time model), written as ``schedule.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffsamp import dist
from diffsamp.io import write_text
from diffsamp.models.base import Denoiser, learned_solver_schedule, prior_scale
from diffsamp.models.conditioning import trajectory_model
from diffsamp.samplers import Grid, get_sampler, get_schedule
from diffsamp.samplers._util import StepInfo
from diffsamp.samplers.schedule_file import SCHEDULE_FORMAT, export_schedule, read_schedule  # noqa: F401 (re-exported)
from diffsamp.training.cards import hardware



@dataclass(frozen=True)
class GitsOptions:
    """What the search runs: K steps chosen among ``fine_steps`` intervals of ``schedule`` ending at 0, the teacher
    solver on that fine grid, and the draws (seeds ``seed`` … ``seed + trajectories − 1``)."""

    steps: int
    fine_steps: int = 100
    schedule: str | None = None  # None: time_uniform, or a flow's own rf grid (learned_solver_schedule)
    teacher: str = "heun"
    trajectories: int = 256
    batch: int = 64
    seed: int = 0
    # a class-conditional model: classes cycled over the trajectories, guided at this scale (teacher and schedule)
    classes: list[int] | None = None
    guidance: float = 1.0

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if self.fine_steps < self.steps:
            raise ValueError(f"the fine grid ({self.fine_steps} intervals) must have at least the {self.steps} steps "
                             "to choose")
        if self.trajectories < 1 or self.batch < 1:
            raise ValueError("trajectories and batch must be positive")
        spec = get_sampler(self.teacher)
        if spec.kind != "ode" or spec.expected_nfe(Grid(torch.tensor([2.0, 1.0, 0.0]))) is None:
            raise ValueError(f"the teacher must be a deterministic ODE solver with fixed steps, not {self.teacher!r}")


def teacher_trajectory(model: Denoiser, x: Tensor, fine: Grid, teacher: str) -> tuple[list[Tensor], list[Tensor]]:
    """The teacher's points x_0 … x_M on ``fine`` (ending at 0) and its slopes d_0 … d_{M−1} (one per point above 0)."""
    points, slopes = [x], []

    def record(info: StepInfo) -> None:
        slopes.append((points[-1] - info.denoised) / info.sigma)
        points.append(info.x)

    with torch.no_grad():
        get_sampler(teacher)(model, x, fine, callback=record)
    return points, slopes


def cost_matrix(model: Denoiser, sample_shape: tuple[int, ...], fine: Grid, opts: GitsOptions) -> Tensor:
    """C[i, j] (i < j ≤ M): the mean over the draws of ‖x_i + (σ_j − σ_i) d_i − x_j‖₂, an Euler step's error from the
    teacher's point i to its point j (GITS Eq. 7); +∞ elsewhere. Under torchrun the draws are split over the ranks."""
    sig = fine.sigmas.tolist()
    m = len(fine)
    total = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    scale = prior_scale(model.prior, sig[0])
    mine = dist.shard_indices(opts.trajectories, opts.batch)
    for b in range(0, len(mine), opts.batch):
        rows = mine[b : b + opts.batch]
        seeds = [opts.seed + k for k in rows]
        z = torch.stack([torch.randn(sample_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        x0 = z.to(model.device, model.dtype) * scale
        bound = trajectory_model(model, opts.classes, opts.guidance, rows)
        points, slopes = teacher_trajectory(bound, x0, fine, opts.teacher)
        xs = torch.stack([p.double().flatten(1) for p in points])  # (M + 1, B, D)
        for i in range(m):
            d = slopes[i].double().flatten(1)
            steps = torch.tensor(sig[i + 1 :], dtype=torch.float64, device=xs.device) - sig[i]  # σ_j − σ_i, j > i
            pred = xs[i][None] + steps[:, None, None] * d[None]  # (M − i, B, D)
            total[i, i + 1 :] += (pred - xs[i + 1 :]).norm(dim=2).sum(dim=1).cpu()
    total = dist.all_reduce_sum(total) / opts.trajectories
    upper = torch.triu(torch.ones_like(total, dtype=torch.bool), diagonal=1)
    return torch.where(upper, total, torch.full_like(total, float("inf")))


def dp_path(cost: Tensor | np.ndarray, steps: int) -> list[int]:
    """The path 0 = i_0 < … < i_K = M of ``steps`` jumps with the least total ``cost`` (GITS Alg. 1: V[j, k] =
    min over i > j of C[j, i] + V[i, k − 1], V[j, 1] = C[j, M]); ties go to the earliest jump."""
    c = np.asarray(cost, dtype=np.float64)
    m = c.shape[0] - 1
    if not 1 <= steps <= m:
        raise ValueError(f"cannot choose {steps} steps among {m} intervals")
    value = np.full((m + 1, steps + 1), np.inf)
    nxt = np.full((m + 1, steps + 1), -1, dtype=np.int64)
    value[m, 0] = 0.0
    for k in range(1, steps + 1):
        for j in range(m - 1, -1, -1):
            cand = c[j, j + 1 :] + value[j + 1 :, k - 1]
            best = int(np.argmin(cand))
            value[j, k], nxt[j, k] = cand[best], j + 1 + best
    if not np.isfinite(value[0, steps]):
        raise ValueError(f"no finite path of {steps} steps through the cost matrix")
    path, j = [0], 0
    for k in range(steps, 0, -1):
        j = int(nxt[j, k])
        path.append(j)
    return path


def search_schedule(model: Denoiser, sample_shape: tuple[int, ...], opts: GitsOptions) -> tuple[Grid, dict[str, Any]]:
    """The GITS schedule of ``opts.steps`` intervals for ``model`` and a record of how it was found."""
    opts.check()
    opts = replace(opts, schedule=opts.schedule or learned_solver_schedule(model, "time_uniform"))
    t0 = time.perf_counter()
    fine = get_schedule(opts.schedule, model=model).grid(opts.fine_steps, final_zero=True)
    cost = cost_matrix(model, tuple(sample_shape), fine, opts)
    path = dp_path(cost, opts.steps)
    grid = Grid(fine.sigmas[path])
    record = {"method": "gits", "options": asdict(opts), "fine_sigmas": fine.sigmas.tolist(), "path": path,
              "cost": float(sum(cost[a, b] for a, b in zip(path[:-1], path[1:]))),
              "seconds": round(time.perf_counter() - t0, 2), "processes": dist.world_size(),
              "hardware": hardware(torch.device(model.device))}
    return grid, record


def timesteps_of(model: Denoiser, grid: Grid) -> list[float] | None:
    """For a discrete-time model, the (fractional) training timestep of each σ > 0 of ``grid`` (by interpolating its
    σ table in log σ, as diffusers' ``sigma_to_t``); None for a continuous-time model."""
    table = getattr(model, "timestep_sigmas", None)
    if table is None:
        return None
    log_table = torch.log(torch.as_tensor(table, dtype=torch.float64))
    steps = torch.arange(len(log_table), dtype=torch.float64)
    out = []
    for s in grid.sigmas.tolist():
        if s <= 0:
            continue
        out.append(float(np.interp(np.log(s), log_table.numpy(), steps.numpy())))
    return out


def write_schedule(path: str | os.PathLike, model: Denoiser, model_name: str, grid: Grid, record: dict[str, Any]) -> Path:
    """``schedule.json``: the σ's (and timesteps of a discrete-time model) with how they were found (rank 0 writes)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "schedule.json"
    doc = {"format": SCHEDULE_FORMAT, "model": model_name, "sigmas": grid.sigmas.tolist(),
           "timesteps": timesteps_of(model, grid), "steps": len(grid), **record}
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(doc, indent=2) + "\n")
    return path
