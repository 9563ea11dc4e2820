"""Training an AMED predictor by distillation from a finer teacher trajectory (Zhou et al. 2024, AMED Alg. 1).

Each iteration draws fresh noise, runs the teacher on the refined grid (M points inserted per interval; its
points at the student's σ's are the targets), then steps the student interval by interval: squared-L2 to the
teacher point, one Adam step per interval, gradients through the network's evaluation at s (the network is
frozen; for a discrete-time network r's gradient is a per-sample central difference over ±π timesteps, since
the exact one follows the network's wiggle between its integer timesteps: ``student_step``). Single-step
students restart every interval from the teacher's point (teacher forcing); multistep students carry their own
output and history. The per-sample network trains with Adam at β1 = 0 (NETWORK_BETA1); under AFS its first
step, which reads no features, has logits of its own (``first_step_static``). The run resumes from
``checkpoint.safetensors`` (written atomically after every iteration, and at SIGINT/SIGTERM at an iteration
boundary).
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

from diffsamp import dist
from diffsamp.models.base import Denoiser, learned_solver_schedule, prior_scale
from diffsamp.models.conditioning import trajectory_model
from diffsamp.samplers import available_samplers, get_sampler, get_schedule
from diffsamp.samplers.registry import learned_samplers
from diffsamp.samplers._util import StepInfo
from diffsamp.samplers.amed import (
    AmedPredictor,
    StaticPredictor,
    StepState,
    amed_step,
    feature_dim,
    step_start,
)
from diffsamp.samplers.amed_files import reset_to_base, save_predictor  # noqa: F401 (re-exported)
from diffsamp.samplers.epd import AdaSdeTable, EpdTable
from diffsamp.samplers.grid import Grid
from diffsamp.io import read_state_file, save_state_file
from diffsamp.training.cards import hardware
from diffsamp.training.checkpoint import _optimizer_join, _optimizer_split
from diffsamp.training.epd import adasde_student_step, epd_student_step, timestep_half_width
from diffsamp.training.loop import TrainingRun, agreed_stop, training_run

PREDICTOR = "predictor"
# each student's teacher, inserted points M, default schedule and final step are on its registration
# (``SamplerSpec.planning``: the AMED paper's for its samplers, §4.1; EPD's and AdaSDE's)
FINAL_STEPS = ("zero", "sigma_min")
# the static predictor's parameters are the per-step logits themselves: Adam moves each by ≈ lr per step, so at
# the network's 5e-3 they stay near r = ½ for the whole run (measured, mnist-ddpm, 3 072 trajectories: r 0.45–0.49)
NETWORK_LR, STATIC_LR = 5e-3, 0.1
# Adam's β1 for the per-sample network. Its ≈9k weights move together, so at lr 5e-3 the r logit of a step moves
# ≈ 0.5 per iteration, as much as the width of that step's optimum (mnist-ddpm, 3 NFE, time-uniform, last step:
# loss 28 at r = 0.11, 36 at 0.15 and 0.05); with momentum (0.9) r passes its optimum and is carried into the
# sigmoid's flat end (r → 0.001, loss 72, experiments/amed_step_dynamics.py); without it the step settles there.
NETWORK_BETA1, STATIC_BETA1 = 0.0, 0.9


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
    # how r's gradient is taken: "autograd" (exact), or "smoothed" (per-sample central difference over ±π
    # timesteps, see student_step); None: smoothed for discrete-time networks (model.timestep_sigmas), else autograd
    r_gradient: str | None = None
    step_offsets: bool = True  # per-sample predictor: a learned logit offset per step (AmedPredictor num_steps)
    # per-sample predictor under AFS: the first step (no features) gets logits of its own, trained as the static
    # predictor's (STATIC_LR, STATIC_BETA1), and does not move the shared network (AmedPredictor first_step_static)
    first_step_static: bool = True
    # Adam's β1 for the per-sample network (None: NETWORK_BETA1); the static predictor's logits keep 0.9
    beta1: float | None = None
    # a class-conditional model: trajectory j gets classes[j mod len] and the teacher and student run under
    # classifier-free guidance at this scale (the predictor reads the conditional half's features)
    classes: list[int] | None = None
    guidance: float = 1.0
    points: int = 2  # epd, adasde: K intermediate points per interval
    gamma_max: float = 0.01  # adasde: γ ∈ [2e-4, gamma_max] (the authors' CIFAR-10 setting)
    # how the student's grid ends: "sigma_min" (the AMED paper's grids) or "zero" (a last, parameter-free denoising
    # step from σ_min to 0, counted in the NFE); None: zero for epd, sigma_min for the AMED samplers
    final_step: str | None = None

    @property
    def learned_nfe(self) -> int:
        """The NFE of the learned intervals: the whole NFE, less the final step to σ = 0 where there is one."""
        return self.nfe - int(self.final_step == "zero")

    def resolved(self) -> "AmedTrainOptions":
        planning = get_sampler(self.sampler).planning if self.sampler in available_samplers() else None
        learned = planning.learned if planning is not None else None
        if learned is None:
            raise ValueError(f"train amed needs a learned sampler ({', '.join(learned_samplers())}), "
                             f"got {self.sampler!r}")
        final = self.final_step or learned.final_step
        if final not in FINAL_STEPS:
            raise ValueError(f"final step {final!r}: expected one of {', '.join(FINAL_STEPS)}")
        if self.points < 1:
            raise ValueError(f"an EPD table needs at least 1 point per interval, got {self.points}")
        learned_nfe = self.nfe - int(final == "zero")
        afs = (learned_nfe % 2 == 1) if self.afs is None else self.afs
        steps2 = learned_nfe + int(afs)
        if steps2 % 2 or steps2 < 2:
            end = " and a last step to σ = 0" if final == "zero" else ""
            raise ValueError(f"NFE {self.nfe} with afs={afs} is not 2·steps − afs{end} for any number of steps ≥ 1")
        teacher, m = learned.teacher
        static = self.static or learned.table  # EPD's and AdaSDE's tables are sample-independent
        return AmedTrainOptions(**{
            **asdict(self), "afs": afs, "teacher": self.teacher or teacher, "final_step": final, "static": static,
            "teacher_m": m if self.teacher_m is None else self.teacher_m,
            "schedule": self.schedule or planning.default_schedule or "karras",
            "scale_time": (0.2 if self.sampler == "ipndm+amed" else 0.0) if self.scale_time is None else self.scale_time,
            "lr": (STATIC_LR if static else NETWORK_LR) if self.lr is None else self.lr,
            "beta1": (STATIC_BETA1 if static else NETWORK_BETA1) if self.beta1 is None else self.beta1,
            "first_step_static": self.first_step_static and afs and not static,
        })

    @property
    def steps(self) -> int:
        """Learned intervals of the student: NFE = 2·steps − AFS (AMED §4.2; docs/amed.md), + 1 for a last step
        to σ = 0."""
        return (self.learned_nfe + int(bool(self.afs))) // 2


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


R_GRADIENTS = ("autograd", "smoothed")


class _Given(torch.nn.Module):
    """A predictor that returns given (r, c, a): how ``student_step`` runs one step at chosen parameters."""

    feature_dim = None

    def __init__(self, r: Tensor, c: Tensor, a: Tensor) -> None:
        super().__init__()
        self.rca = (r, c, a)

    def forward(self, h: Tensor | None, step: int, sigma: float, sigma_next: float) -> tuple[Tensor, Tensor, Tensor]:
        return self.rca


def student_step(
    method: str, model: Denoiser, start: Any, i: int, s: float, s_next: float, predictor: torch.nn.Module,
    state: StepState, target: Tensor, *, smoothed: bool, **rule: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """One student interval: (surrogate to differentiate, its squared-L2 loss to the teacher point, x_next).

    ``smoothed=False``: the surrogate is the loss (autograd through the network's evaluation at s, its σ input
    included). ``smoothed=True`` (discrete-time networks, whose output is not smooth in σ at the scale of a
    timestep, so that the exact ∂/∂r is dominated by that wiggle): ∂L_b/∂r_b per sample is the central
    difference of the loss over ±π timesteps (``timestep_half_width``; two more evaluations, without gradient),
    entered as Σ_b g_b·r_b; c keeps its exact gradient (it does not touch the network's input); a, which acts
    only through that input, gets none."""
    batch = target.shape[0]
    if not smoothed or s_next == 0.0:
        x_next = amed_step(method, model, start, i, s, s_next, predictor, state, **rule)
        loss = (x_next - target).pow(2).sum() / batch
        return loss, loss, x_next
    r, c, a = (v.reshape(-1).expand(batch) for v in predictor(start.h, i, s, s_next))
    history = list(state.history)
    x_next = amed_step(method, model, start, i, s, s_next, _Given(r.detach(), c, a.detach()), state, **rule)
    loss = (x_next - target).pow(2).sum() / batch
    rd = r.detach()
    half = timestep_half_width(model.timestep_sigmas, s_next**rd * s ** (1 - rd), s, s_next)
    r_hi, r_lo = (rd + half).clamp(max=1.0), (rd - half).clamp(min=0.0)
    with torch.no_grad():
        per_sample = []
        for r_at in (r_hi, r_lo):
            x_at = amed_step(method, model, start, i, s, s_next, _Given(r_at, c.detach(), a.detach()),
                             StepState(list(history)), **rule)
            per_sample.append((x_at - target).pow(2).reshape(batch, -1).sum(1))
        g = (per_sample[0] - per_sample[1]) / (r_hi - r_lo).clamp_min(1e-12)
    return loss + (g * r).sum() / batch, loss, x_next


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
    observe: Callable[[int, int, Tensor, float], None] | None = None,
    guard: bool = True,
) -> Path:
    """Train and save an AMED predictor for ``model`` into ``out`` (AMED Alg. 1); returns the predictor JSON path.

    ``extra`` goes into the predictor's JSON as is (e.g. the model's x̂0 clipping).
    ``snapshots``: trajectory counts at which a copy of the predictor is kept in ``out/snapshots/`` (for an
    FID-vs-budget curve).
    ``stop_after`` stops (with a checkpoint) after that many iterations of this call, as an interruption would.
    ``observe(iteration, step, r, loss)``, if given, sees each interval's per-sample r (before that interval's
    optimizer step) and its loss: how the predictor's steps move during training.
    ``guard``: once training is finished, the predictor is kept only if it ends closer to the teacher than the
    solver it starts from (``keep_the_better``); the verdict is in the card's ``guard``.
    """
    if opts.schedule is None:
        opts = replace(opts, schedule=learned_solver_schedule(model, opts.resolved().schedule))
    opts = opts.resolved()
    if opts.r_gradient is None:
        opts = replace(opts, r_gradient="autograd" if model.timestep_sigmas is None else "smoothed")
    if opts.r_gradient not in R_GRADIENTS:
        raise ValueError(f"r_gradient must be one of {', '.join(R_GRADIENTS)}, got {opts.r_gradient!r}")
    if opts.r_gradient == "smoothed" and model.timestep_sigmas is None:
        raise ValueError("r_gradient='smoothed' needs a discrete-time model (one with timestep_sigmas)")
    with training_run(out, resume=resume) as run:
        return _train(model, sample_shape, opts, run, model_name=model_name, device=torch.device(device),
                      progress=progress, stop_after=stop_after, extra=extra, snapshots=snapshots, observe=observe,
                      guard=guard)


def _train(model: Denoiser, sample_shape: tuple[int, ...], opts: AmedTrainOptions, run: TrainingRun, *,
           model_name: str, device: torch.device, progress: Callable[[int, int, float], None] | None,
           stop_after: int | None, extra: dict[str, Any] | None, snapshots: tuple[int, ...],
           observe: Callable[[int, int, Tensor, float], None] | None, guard: bool) -> Path:
    """``train_amed``'s body inside its ``training_run``."""
    out = run.run_dir
    dtype = torch.float32
    coarse, fine = student_grids(model, opts)
    learned = get_sampler(opts.sampler).planning.learned
    assert learned is not None
    method = learned.step
    sigma0 = float(coarse.sigmas[0])
    scale = prior_scale(model.prior, sigma0)

    def conditioned(first: int, n: int) -> Denoiser:
        """The model for trajectories first…first+n−1: bound to their classes, guided at the stated scale."""
        return trajectory_model(model, opts.classes, opts.guidance, range(first, first + n))

    probe = torch.randn((1, *sample_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype) * scale
    with torch.no_grad():
        fdim = None if opts.static else feature_dim(conditioned(0, 1), probe, sigma0)
    torch.manual_seed(opts.seed)
    predictor: torch.nn.Module
    if method == "epd":
        predictor = EpdTable(opts.steps, opts.points, scale_dir=opts.scale_dir, scale_time=opts.scale_time or 0.0)
    elif method == "adasde":
        predictor = AdaSdeTable(opts.steps, opts.points, scale_dir=opts.scale_dir,
                                scale_time=opts.scale_time or 0.0, gamma_max=opts.gamma_max)
    elif opts.static:
        predictor = StaticPredictor(opts.steps, scale_dir=opts.scale_dir, scale_time=opts.scale_time or 0.0)
    else:
        predictor = AmedPredictor(fdim or 0, scale_dir=opts.scale_dir, scale_time=opts.scale_time or 0.0,
                                  num_steps=opts.steps if opts.step_offsets else 0,
                                  first_step_static=opts.first_step_static)
    predictor = predictor.to(device)
    sampling_grid = Grid(torch.cat([coarse.sigmas, coarse.sigmas.new_zeros(1)])) if opts.final_step == "zero" \
        else coarse
    # the AFS step's own logits (first_step_static) train as the static predictor's
    named = dict(predictor.named_parameters())
    first = [named.pop("first_logits")] if "first_logits" in named else []
    groups = [{"params": list(named.values()), "betas": (opts.beta1, 0.999)}]
    if first:
        groups.append({"params": first, "lr": STATIC_LR, "betas": (STATIC_BETA1, 0.999)})
    optimizer = torch.optim.Adam(groups, lr=opts.lr, eps=1e-8)
    iterations = math.ceil(opts.trajectories / opts.batch)
    it, elapsed_before, losses = 0, 0.0, []
    ckpt = run.checkpoint
    if run.resuming:
        it, elapsed_before, losses = _load_checkpoint(ckpt, predictor, optimizer, opts)
        run.log({"event": "resume", "iteration": it, "processes": dist.world_size()})

    def _card() -> dict[str, Any]:
        knobs = {"max_order": opts.max_order} if method == "ipndm" else ({"order": opts.order} if method == "dpmpp" else {})
        return {
            "model": model_name, "sampler": opts.sampler, "nfe": opts.nfe, "steps": opts.steps, "afs": opts.afs,
            "schedule": opts.schedule, "schedule_params": opts.schedule_params,
            "grid": sampling_grid.sigmas.tolist(), "final_zero": sampling_grid.ends_at_zero, "knobs": knobs,
            "sample_shape": list(sample_shape),
            **({"classes": opts.classes, "guidance": opts.guidance} if opts.classes is not None else {}),
            **(extra or {}),
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

    world = dist.world_size()
    if opts.batch % world:
        raise ValueError(f"a batch of {opts.batch} trajectories does not split over {world} processes; "
                         f"use a --batch divisible by {world}")
    lo, hi = dist.rank() * opts.batch // world, (dist.rank() + 1) * opts.batch // world  # this rank's trajectories
    t0 = time.perf_counter()
    ran, stopping = 0, None
    while it < iterations and stopping is None:
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + it)
        z = torch.randn((opts.batch, *sample_shape), generator=gen)[lo:hi].to(device, dtype)
        bound = conditioned(it * opts.batch + lo, hi - lo)
        targets = teacher_targets(bound, z * scale, fine, opts)
        x, state, it_loss = targets[0], StepState(), []
        noise_gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + it + 500_009)  # adasde's injections
        for i, (s, s_next) in enumerate(coarse.intervals()):
            afs_here, smoothed = bool(opts.afs) and i == 0, opts.r_gradient == "smoothed"
            start = None
            if method == "adasde":  # the start is evaluated after the noise injection, with γ's gradient
                noise = torch.randn((opts.batch, *sample_shape), generator=noise_gen)[lo:hi].to(device, dtype)
                surrogate, loss, x_next = adasde_student_step(bound, x, i, s, s_next, predictor, targets[i + 1],
                                                              noise, afs=afs_here, smoothed=smoothed)
            else:
                with torch.no_grad():
                    start = step_start(bound, x, s, afs=afs_here, predictor=predictor)
            if method == "epd":
                surrogate, loss, x_next = epd_student_step(bound, start, i, s, s_next, predictor, targets[i + 1],
                                                           smoothed=smoothed)
            elif method != "adasde":
                surrogate, loss, x_next = student_step(
                    method, bound, start, i, s, s_next, predictor, state, targets[i + 1], smoothed=smoothed,
                    max_order=opts.max_order, order=opts.order, total=2 * len(coarse))
            if observe is not None:
                with torch.no_grad():
                    r_now = predictor(i)[0] if learned.table else predictor(start.h, i, s, s_next)[0]
                    observe(it, i, r_now.reshape(-1), float(loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            surrogate.backward()
            dist.average_gradients(list(predictor.parameters()))  # under torchrun: the whole batch's mean
            for p in predictor.parameters():
                if p.grad is not None:
                    torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
            optimizer.step()
            it_loss.append(float(dist.all_reduce_sum(loss.detach().double())) / world)
            state.history = [_detach(h) for h in state.history]
            x = x_next.detach() if learned.multistep else targets[i + 1]
        it += 1
        ran += 1
        losses.append(it_loss)
        elapsed = elapsed_before + time.perf_counter() - t0
        stopping = agreed_stop(run.stop.requested or ("stop_after" if stop_after is not None and ran >= stop_after
                                                  else None))
        if not dist.is_main():  # every rank holds the same predictor; rank 0 writes
            continue
        _save_checkpoint(ckpt, predictor, optimizer, opts, it, elapsed, losses)
        run.log({"iteration": it, "trajectories": it * opts.batch, "loss": round(sum(it_loss), 6),
                 "elapsed_s": round(elapsed, 2)})
        if it * opts.batch in snapshots:
            save_predictor(predictor, out / "snapshots" / f"trajectories-{it * opts.batch}",
                           {**_card(), "training": {"trajectories_done": it * opts.batch}})
        if progress is not None:
            progress(it, iterations, sum(it_loss))
    if stopping:
        run.log({"event": "stop", "iteration": it, "reason": stopping})
    elapsed = elapsed_before + time.perf_counter() - t0
    card = {**_card(), "training": {**_training(elapsed), "processes": world}}
    if it >= iterations and guard:
        card["guard"] = keep_the_better(predictor, opts, conditioned, sample_shape, scale, coarse, fine,
                                        device, dtype, lo, hi)
    path = (out / PREDICTOR).with_suffix(".json")  # what save_predictor returns
    if dist.is_main():
        path = save_predictor(predictor, out / PREDICTOR, card)
    dist.barrier()
    return path


GUARD_SEED = 999_983  # held-out trajectories: noise seeds no training iteration draws


def keep_the_better(predictor: torch.nn.Module, opts: AmedTrainOptions, conditioned: Callable[[int, int], Denoiser],
                    sample_shape: tuple[int, ...], scale: float, coarse: Grid, fine: Grid, device: torch.device,
                    dtype: torch.dtype, lo: int, hi: int) -> dict[str, Any]:
    """The learned solver against the plain solver it starts from (``reset_to_base``) on held-out trajectories:
    mean squared L2 of the final state (at the grid's last σ) to the teacher's. A trained predictor that is not
    better is replaced by the base, so a learned solver is never worse than its starting point on its own grid."""
    n = opts.batch
    z = torch.randn((n, *sample_shape), generator=torch.Generator().manual_seed(GUARD_SEED + opts.seed))[lo:hi]
    bound = conditioned(10**9, hi - lo)  # class labels of held-out trajectories: the cycle from an unused offset
    x0 = z.to(device, dtype) * scale
    target = teacher_targets(bound, x0, fine, opts)[-1]
    knobs: dict[str, Any] = {"afs": bool(opts.afs)}
    if opts.sampler == "ipndm+amed":
        knobs["max_order"] = opts.max_order
    if opts.sampler == "dpmpp+amed":
        knobs["order"] = opts.order
    run = get_sampler(opts.sampler)

    def l2() -> float:
        gens = [torch.Generator().manual_seed(GUARD_SEED + j) for j in range(lo, hi)]
        with torch.no_grad():
            x = run(bound, x0.clone(), coarse, predictor=predictor, generator=gens, **knobs)
        return float(dist.all_reduce_sum((x - target).pow(2).reshape(x.shape[0], -1).sum(1).sum().double())) / n

    trained_state = {k: v.clone() for k, v in predictor.state_dict().items()}
    trained = l2()
    reset_to_base(predictor)
    base = l2()
    kept = "trained"
    if not trained < base:
        kept = "base: the trained predictor ended farther from the teacher on held-out trajectories"
    else:
        predictor.load_state_dict(trained_state)
    return {"heldout_trajectories": n, "l2_trained": trained, "l2_base": base, "kept": kept}


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
    # what checkpoints from before these options did
    theirs = {"r_gradient": "autograd", "step_offsets": False, "first_step_static": False, "beta1": STATIC_BETA1,
              "classes": None, "guidance": 1.0, "points": 2, "final_step": "sigma_min", "gamma_max": 0.01,
              **{k: v for k, v in state["options"].items() if k != "trajectories"}}
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ValueError(f"{path} was trained with other settings ({', '.join(diff)}); use a new --out")
    n = len("predictor.")
    predictor.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith("predictor.")})
    optimizer.load_state_dict(_optimizer_join(tensors, state["optimizer"]))
    return int(state["iteration"]), float(state["elapsed_seconds"]), state["losses"]
