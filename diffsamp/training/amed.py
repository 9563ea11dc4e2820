"""Training an AMED predictor by distillation from a finer teacher trajectory (AMED Alg. 1, SPEC §6.7).

Each iteration draws fresh noise, runs the teacher on the refined grid (M points inserted per interval; its
points at the student's σ's are the targets), then steps the student interval by interval: squared-L2 to the
teacher point, one Adam step per interval, gradients through the network's evaluation at s (the network is
frozen). Single-step students restart every interval from the teacher's point (teacher forcing); multistep
students carry their own output and history. The run resumes from ``checkpoint.safetensors`` (written
atomically after every iteration, and at SIGINT/SIGTERM at an iteration boundary).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from diffsamp.models.base import Denoiser, prior_scale
from diffsamp.samplers import get_sampler, get_schedule
from diffsamp.samplers._util import StepInfo
from diffsamp.samplers.amed import (
    AmedPredictor,
    StaticPredictor,
    StepState,
    amed_step,
    feature_dim,
    step_start,
)
from diffsamp.samplers.amed_files import save_predictor
from diffsamp.samplers.grid import Grid
from diffsamp.io import read_state_file, save_state_file
from diffsamp.training.cards import hardware
from diffsamp.training.checkpoint import _optimizer_join, _optimizer_split
from diffsamp.training.loop import _StopFlag

CHECKPOINT = "checkpoint.safetensors"
PREDICTOR = "predictor"
SINGLE_STEP = {"amed": "amed", "euler+amed": "euler", "dpm2+amed": "dpm2"}
MULTISTEP = {"ipndm+amed": "ipndm", "dpmpp+amed": "dpmpp"}
# SPEC §6.7/§6.9: teacher solver, inserted points M and schedule the paper uses for each student
TEACHERS = {"amed": ("heun", 1), "dpm2+amed": ("dpm2", 1), "euler+amed": ("euler", 2),
            "ipndm+amed": ("ipndm", 2), "dpmpp+amed": ("dpmpp", 2)}
SCHEDULES = {"amed": "time_uniform", "dpmpp+amed": "logsnr"}
# the static predictor's parameters are the per-step logits themselves: Adam moves each by ≈ lr per step, so at
# the network's 5e-3 they stay near r = ½ for the whole run (measured, mnist-ddpm, 3 072 trajectories: r 0.45–0.49)
NETWORK_LR, STATIC_LR = 5e-3, 0.1


@dataclass
class AmedTrainOptions:
    """What is trained: the student (sampler, NFE, schedule), the teacher, the predictor and the optimizer."""

    sampler: str = "amed"
    nfe: int = 5
    schedule: str | None = None  # None: SCHEDULES (time_uniform for amed, logsnr for dpmpp+amed, else karras)
    schedule_params: dict[str, Any] = field(default_factory=dict)
    afs: bool | None = None  # None: AFS on odd NFE (the paper's 3/5/7/9)
    teacher: str | None = None  # None: TEACHERS
    teacher_m: int | None = None
    static: bool = False  # per-step (r, c, a), no features
    scale_dir: float = 0.01
    scale_time: float | None = None  # None: 0.2 for ipndm+amed (the paper's small-resolution plugin), else 0
    max_order: int = 4  # ipndm+amed
    order: int = 2  # dpmpp+amed
    trajectories: int = 10_000
    batch: int = 128
    lr: float | None = None  # None: STATIC_LR with --static, else 5e-3 (the paper's, for the ≈9k-weight network)
    seed: int = 0
    # gradient through the network's noise-level input at s; None: off for discrete-time networks (DDPM UNets,
    # whose output wiggles with period 2π timesteps between the integers they were trained on), on otherwise
    noise_level_grad: bool | None = None

    def resolved(self) -> "AmedTrainOptions":
        if self.sampler not in SINGLE_STEP and self.sampler not in MULTISTEP:
            raise ValueError(f"train amed needs an AMED sampler ({', '.join(sorted(TEACHERS))}), got {self.sampler!r}")
        afs = (self.nfe % 2 == 1) if self.afs is None else self.afs
        steps2 = self.nfe + int(afs)
        if steps2 % 2 or steps2 < 2:
            raise ValueError(f"NFE {self.nfe} with afs={afs} is not 2·steps − afs for any number of steps ≥ 1")
        teacher, m = TEACHERS[self.sampler]
        return AmedTrainOptions(**{
            **asdict(self), "afs": afs, "teacher": self.teacher or teacher,
            "teacher_m": m if self.teacher_m is None else self.teacher_m,
            "schedule": self.schedule or SCHEDULES.get(self.sampler, "karras"),
            "scale_time": (0.2 if self.sampler == "ipndm+amed" else 0.0) if self.scale_time is None else self.scale_time,
            "lr": (STATIC_LR if self.static else NETWORK_LR) if self.lr is None else self.lr,
        })

    @property
    def steps(self) -> int:
        """Grid intervals of the student: NFE = 2·steps − AFS (SPEC §6.10)."""
        return (self.nfe + int(bool(self.afs))) // 2


def student_grids(model: Denoiser, opts: AmedTrainOptions) -> tuple[Grid, Grid]:
    """The student's grid (steps intervals ending at σ_min) and the teacher's refined grid (M inserted per interval)."""
    sched = get_schedule(opts.schedule, model=model, **opts.schedule_params)
    assert opts.teacher_m is not None
    fine = sched.grid(opts.steps * (opts.teacher_m + 1), final_zero=False)
    coarse = sched.grid(opts.steps, final_zero=False)
    if not torch.allclose(fine.sigmas[:: opts.teacher_m + 1], coarse.sigmas, rtol=1e-9, atol=0):
        raise ValueError(f"schedule {opts.schedule!r} does not nest: its refined grid misses the student's σ's")
    return coarse, fine


def teacher_targets(model: Denoiser, x: Tensor, fine: Grid, opts: AmedTrainOptions) -> list[Tensor]:
    """The teacher's states at the student's σ's (every (M+1)-th point of the refined grid), σ_0 first."""
    every = (opts.teacher_m or 0) + 1
    points = [x]

    def record(info: StepInfo) -> None:
        if (info.i + 1) % every == 0:
            points.append(info.x)

    knobs: dict[str, Any] = {"max_order": opts.max_order} if opts.teacher == "ipndm" else {}
    if opts.teacher == "dpmpp":
        knobs = {"order": 3}
    with torch.no_grad():
        get_sampler(opts.teacher)(model, x, fine, callback=record, **knobs)
    return points


def _detach(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.detach()
    if isinstance(v, tuple):
        return tuple(_detach(e) for e in v)
    return v


def train_amed(
    model: Denoiser,
    sample_shape: tuple[int, ...],
    opts: AmedTrainOptions,
    out: str | os.PathLike,
    *,
    model_name: str,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    stop_after: int | None = None,
    extra: dict[str, Any] | None = None,
    snapshots: tuple[int, ...] = (),
) -> Path:
    """Train and save an AMED predictor for ``model`` into ``out`` (SPEC §6.7); returns the predictor JSON path.

    ``extra`` goes into the predictor's JSON as is (e.g. the model's x̂0 clipping).
    ``snapshots``: trajectory counts at which a copy of the predictor is kept in ``out/snapshots/`` (for an
    FID-vs-budget curve).
    ``stop_after`` stops (with a checkpoint) after that many iterations of this call, as an interruption would.
    """
    opts = opts.resolved()
    if opts.noise_level_grad is None:
        opts = replace(opts, noise_level_grad=not model.discrete_time)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    dtype = torch.float32
    coarse, fine = student_grids(model, opts)
    method = SINGLE_STEP.get(opts.sampler) or MULTISTEP[opts.sampler]
    sigma0 = float(coarse.sigmas[0])
    scale = prior_scale(model.prior, sigma0)

    probe = torch.randn((1, *sample_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype) * scale
    with torch.no_grad():
        fdim = None if opts.static else feature_dim(model, probe, sigma0)
    torch.manual_seed(opts.seed)
    predictor = (
        StaticPredictor(opts.steps, scale_dir=opts.scale_dir, scale_time=opts.scale_time or 0.0)
        if opts.static else AmedPredictor(fdim or 0, scale_dir=opts.scale_dir, scale_time=opts.scale_time or 0.0)
    ).to(device)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=opts.lr, betas=(0.9, 0.999), eps=1e-8)
    iterations = math.ceil(opts.trajectories / opts.batch)
    it, elapsed_before, losses = 0, 0.0, []
    ckpt = out / CHECKPOINT
    if resume and ckpt.is_file():
        it, elapsed_before, losses = _load_checkpoint(ckpt, predictor, optimizer, opts)
    elif ckpt.is_file() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue it, or use a new --out")

    def _card() -> dict[str, Any]:
        knobs = {"max_order": opts.max_order} if method == "ipndm" else ({"order": opts.order} if method == "dpmpp" else {})
        return {
            "model": model_name, "sampler": opts.sampler, "nfe": opts.nfe, "steps": opts.steps, "afs": opts.afs,
            "schedule": opts.schedule, "schedule_params": opts.schedule_params, "grid": coarse.sigmas.tolist(),
            "final_zero": False, "knobs": knobs, "sample_shape": list(sample_shape), **(extra or {}),
        }

    def _training(elapsed: float) -> dict[str, Any]:
        skip = ("sampler", "nfe", "schedule", "schedule_params", "afs")
        return {
            **{k: v for k, v in asdict(opts).items() if k not in skip},
            "iterations_done": it, "iterations": iterations, "trajectories_done": it * opts.batch,
            "finished": it >= iterations, "wall_seconds": round(elapsed, 1), "hardware": hardware(device),
            "torch": torch.__version__, "final_loss_per_step": losses[-1] if losses else None,
            "loss_per_iteration": [round(sum(v), 6) for v in losses],
        }

    t0 = time.perf_counter()
    ran = 0
    with _StopFlag() as stop:
        while it < iterations and stop.requested is None and (stop_after is None or ran < stop_after):
            gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + it)
            z = torch.randn((opts.batch, *sample_shape), generator=gen).to(device, dtype)
            targets = teacher_targets(model, z * scale, fine, opts)
            x, state, it_loss = targets[0], StepState(), []
            for i, (s, s_next) in enumerate(coarse.intervals()):
                with torch.no_grad():
                    start = step_start(model, x, s, afs=bool(opts.afs) and i == 0, predictor=predictor)
                x_next = amed_step(method, model, start, i, s, s_next, predictor, state,
                                   max_order=opts.max_order, order=opts.order, total=2 * len(coarse),
                                   noise_level_grad=bool(opts.noise_level_grad))
                loss = (x_next - targets[i + 1]).pow(2).sum() / opts.batch
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for p in predictor.parameters():
                    if p.grad is not None:
                        torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
                optimizer.step()
                it_loss.append(float(loss.detach()))
                state.history = [_detach(h) for h in state.history]
                x = targets[i + 1] if opts.sampler in SINGLE_STEP else x_next.detach()
            it += 1
            ran += 1
            losses.append(it_loss)
            elapsed = elapsed_before + time.perf_counter() - t0
            _save_checkpoint(ckpt, predictor, optimizer, opts, it, elapsed, losses)
            if it * opts.batch in snapshots:
                save_predictor(predictor, out / "snapshots" / f"trajectories-{it * opts.batch}",
                               {**_card(), "training": {"trajectories_done": it * opts.batch}})
            if progress is not None:
                progress(it, iterations, sum(it_loss))
    elapsed = elapsed_before + time.perf_counter() - t0
    card = {**_card(), "training": _training(elapsed)}
    return save_predictor(predictor, out / PREDICTOR, card)


def _save_checkpoint(path: Path, predictor: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     opts: AmedTrainOptions, it: int, elapsed: float, losses: list[list[float]]) -> None:
    tensors = {f"predictor.{k}": v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()}
    opt_t, opt_meta = _optimizer_split(optimizer)
    tensors.update(opt_t)
    state = {"iteration": it, "elapsed_seconds": elapsed, "options": asdict(opts), "optimizer": opt_meta, "losses": losses}
    save_state_file(path, tensors, {"kind": "amed", **state})


def _load_checkpoint(path: Path, predictor: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     opts: AmedTrainOptions) -> tuple[int, float, list[list[float]]]:
    tensors, state = read_state_file(path)
    if state.get("kind") != "amed":
        raise ValueError(f"{path} is not an AMED training checkpoint")
    mine = {k: v for k, v in asdict(opts).items() if k != "trajectories"}
    theirs = {"noise_level_grad": True,  # checkpoints from before the option always differentiated through it
              **{k: v for k, v in state["options"].items() if k != "trajectories"}}
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(f"{path} was trained with other settings ({', '.join(diff)}); use a new --out")
    n = len("predictor.")
    predictor.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith("predictor.")})
    optimizer.load_state_dict(_optimizer_join(tensors, state["optimizer"]))
    return int(state["iteration"]), float(state["elapsed_seconds"]), state["losses"]
