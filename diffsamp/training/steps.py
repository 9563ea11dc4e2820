"""Learned time steps (after LD3: Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025).

The K σ's of a one-evaluation solver (DDIM/DPM-Solver++ of order 1–3, in σ-space) are trained by backpropagation
through the whole K-step solve to the teacher's final sample:

* parameterisation (LD3 §3.2, in log σ): K logits, the softmax of which are the fractions of log σ_max − log σ_min
  each interval takes; σ_0 = σ_max, σ_1 … σ_{K−1} their cumulative sums, and a last denoising step to σ = 0. The
  σ's stay ordered and inside the model's range whatever the logits; the logits start at the ``schedule``'s grid.
* loss: squared L2 between the student's and the teacher's final samples (``loss="l2"``), or an LPIPS-style distance
  in an independent classifier's activations (``loss="features"``, the MNIST CNN's; LD3 uses LPIPS on pixel-space
  models), over a fixed pool of teacher trajectories (LD3 trains on ~100), epochs over the pool; or, beyond LD3,
  ``loss="fd"``: no teacher, the Fréchet distance between each batch of final samples and a data set's images in
  that classifier's fc1 features (a distribution-level objective; never the FID network's features); Adam on the
  logits; after each epoch the pool's loss at the current σ's is measured, and the best grid, the initial one
  included, is kept (never worse than where it started);
* LD3's soft (slack) variant: each trajectory's student starts from x_T + δ, and δ takes a gradient step on the same
  loss after each update, projected onto ‖δ‖ ≤ slack·‖x_T‖ (LD3 Eq. 9: the student need only reach the teacher's
  output from some nearby noise). slack = 0 is the plain (hard) loss.

The network's σ input is in the gradient (``network_sigma_grad``; off, the gradient flows through the solver's
coefficients and states only).
The result is a plain ``schedule.json`` (``diffsamp sample --sigmas``, ``diffsamp solver export``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from diffsamp import dist
from diffsamp.models.base import Denoiser, learned_solver_schedule, prior_scale
from diffsamp.models.conditioning import trajectory_model
from diffsamp.samplers import Grid, get_sampler, get_schedule
from diffsamp.samplers.ode import dpmpp_update
from diffsamp.training.cards import hardware

BASES = {"ddim": 1, "euler": 1, "dpmpp2m": 2, "dpmpp3m": 3, "euler_ancestral": 1}  # the solver → its order
ANCESTRAL = ("euler_ancestral",)  # stochastic bases: trained with fixed noise per trajectory and step
LOSSES = ("l2", "features", "fd")
FD_DIM = 64  # the MNIST classifier's fc1 width, the space the fd loss measures in

Distance = Callable[[Tensor, Tensor], Tensor]


def _classifier(loss: str, sample_shape: tuple[int, ...], device: torch.device) -> Any:
    from diffsamp.metrics.classifier import load_classifier

    if sample_shape[0] != 1 or max(sample_shape[1:]) > 32:
        raise ValueError(f"loss {loss!r} uses the MNIST classifier (1-channel images up to 32×32); this model "
                         f"samples {tuple(sample_shape)}: use loss 'l2'")
    return load_classifier(device=device).requires_grad_(False)


def final_distance(loss: str, sample_shape: tuple[int, ...], device: torch.device) -> Distance:
    """Per-sample distance (N,) between a student's and the teacher's final samples: squared L2, or ``features``,
    the LPIPS-style distance in the MNIST classifier's activations (1-channel images up to 32×32 only)."""
    if loss == "l2":
        return lambda out, target: (out - target).pow(2).reshape(out.shape[0], -1).sum(1)
    if loss != "features":
        raise ValueError(f"{loss!r} is not a per-sample distance")
    from diffsamp.metrics.classifier import perceptual_distance

    classifier = _classifier(loss, sample_shape, device)
    return lambda out, target: perceptual_distance(classifier, out, target)


def reference_fd(opts: "StepsOptions", sample_shape: tuple[int, ...], device: torch.device) -> Callable[[Tensor], Tensor]:
    """The ``fd`` loss: the Fréchet distance between a batch of final samples and ``opts.fd_data``'s first
    ``opts.fd_images`` images in the MNIST classifier's fc1 features (an independent network, never FID's);
    differentiable in the samples. No teacher: the σ's are fitted to the data's distribution directly."""
    from diffsamp.data.datasets import load_dataset_uint8
    from diffsamp.metrics.classifier import embed
    from diffsamp.metrics.distances import FrechetToReference

    classifier = _classifier("fd", sample_shape, device)
    name, _, split = opts.fd_data.partition(":")
    data = load_dataset_uint8(name, split or "train", limit=opts.fd_images)
    feats = embed(classifier, data).double()
    reference = FrechetToReference(feats.mean(0), torch.cov(feats.T))
    return lambda out: reference(classifier.embedding(out))


@dataclass(frozen=True)
class StepsOptions:
    """K = ``steps`` intervals (the last to 0) for ``base``, initialised at ``schedule``; the teacher on
    ``teacher_steps`` intervals of that schedule; a pool of ``trajectories`` draws trained for ``epochs``."""

    steps: int = 5
    base: str = "dpmpp2m"
    schedule: str | None = None  # None: time_uniform, or a flow's own rf grid (learned_solver_schedule)
    teacher: str = "heun"
    teacher_steps: int = 100
    trajectories: int = 100
    batch: int = 25
    epochs: int = 20
    lr: float = 0.02
    slack: float = 0.0
    slack_lr: float = 0.5
    seed: int = 0
    # the network's σ input in the gradient. On mnist-ddpm (a discrete-time network, whose output wiggles between
    # integer timesteps) it still trained better than without: pool loss 60.7 → 42.2 against → 44.0, and stable
    # after its best epoch where the other rose again (32 trajectories, 6 epochs, lr 0.05)
    network_sigma_grad: bool = True
    loss: str = "l2"
    fd_data: str = "mnist:train"
    fd_images: int = 10_000
    # a class-conditional model: classes cycled over the pool's trajectories, guided at this scale (teacher, student)
    classes: list[int] | None = None
    guidance: float = 1.0

    def check(self) -> None:
        """A ValueError naming the first option out of range."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.base not in BASES:
            raise ValueError(f"learned steps are for {', '.join(BASES)}, got base {self.base!r}")
        if self.steps < 2:
            raise ValueError(f"learned steps need at least 2 intervals (one learned σ), got {self.steps}")
        for name in ("trajectories", "batch", "epochs", "teacher_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.slack < 0 or self.lr <= 0:
            raise ValueError("slack must be ≥ 0 and lr > 0")
        if self.loss == "fd" and self.slack > 0:
            raise ValueError("the fd loss compares distributions, not trajectories: it takes no slack")
        if self.loss == "fd" and min(self.batch, self.trajectories) < 2 * FD_DIM:
            raise ValueError(f"the fd loss estimates a {FD_DIM}-d covariance per batch: use a batch (and trajectories) "
                             f"of at least {2 * FD_DIM}, got {self.batch}")


class LearnedSteps(nn.Module):
    """σ_0 = σ_max > σ_1 > … > σ_{K−1} ≥ σ_min, then 0: log σ_i = log σ_max − F_i·(log σ_max − log σ_min) with
    F = cumsum(softmax(logits)) (LD3 §3.2's monotone parameterisation, in log σ)."""

    def __init__(self, sigma_max: float, sigma_min: float, init: Tensor) -> None:
        super().__init__()
        self.sigma_max = float(sigma_max)
        self.log_max, self.log_min = math.log(sigma_max), math.log(sigma_min)
        inner = init[1:-1].to(torch.float64)  # σ_1 … σ_{K−1} of an initial grid ending at 0
        if inner.numel() < 1 or not bool((inner < sigma_max).all() and (inner >= sigma_min * (1 - 1e-9)).all()):
            raise ValueError("the initial grid's inner σ's must lie in [σ_min, σ_max)")
        frac = ((self.log_max - inner.log()) / (self.log_max - self.log_min)).clamp(max=1.0)
        inc = torch.diff(torch.cat([frac.new_zeros(1), frac, frac.new_ones(1)])).clamp_min(1e-6)  # σ_{K−1} = σ_min:
        self.logits = nn.Parameter((inc / inc.sum()).log())  # a last share of 1e-6 (σ_{K−1} ≈ σ_min·e^{…·1e-6})

    def forward(self) -> Tensor:
        """The grid's σ's, (K + 1,) float64, the last 0; differentiable in the logits."""
        frac = torch.cumsum(torch.softmax(self.logits, dim=0), dim=0)[:-1]
        inner = torch.exp(self.log_max - frac * (self.log_max - self.log_min))
        top = inner.new_full((1,), self.sigma_max)
        return torch.cat([top, inner, inner.new_zeros(1)])


def student_solve(model: Denoiser, x: Tensor, sigmas: Tensor, order: int, *, network_sigma_grad: bool,
                  noise: Tensor | None = None) -> Tensor:
    """DPM-Solver++ of ``order`` (1: DDIM) on ``sigmas`` (ending at 0), differentiable in the σ's and in x; the same
    update ``dpmpp_update`` the registered samplers use, so it equals ``diffsamp``'s ``ddim``/``dpmpp2m``/
    ``dpmpp3m`` on that grid (tested). With ``noise`` (N, K − 1, …: a standard normal draw per sample and step
    before the step to 0) it is Euler ancestral at η = 1 instead (EDM; DDIM Eq. 16 in σ-space): x' = D +
    (σ_down/σ)(x − D) + σ_up·z with σ_down = σ'²/σ, σ_up = σ'·√(1 − σ'²/σ²), the registered ``euler_ancestral``
    given the same draws (tested)."""
    total = sigmas.numel() - 1
    if noise is not None:
        if order != 1 or noise.shape[:2] != (x.shape[0], total - 1):
            raise ValueError(f"Euler ancestral takes first order and noise of shape ({x.shape[0]}, {total - 1}, …)")
        for i in range(total):
            s, s_next = sigmas[i], sigmas[i + 1]
            net_s = (s if network_sigma_grad else s.detach()).to(x.dtype).expand(x.shape[0])
            denoised = model(x, net_s)
            if i == total - 1:
                return denoised
            ratio = (s_next / s).to(x.dtype)
            up = s_next.to(x.dtype) * (1 - ratio**2).clamp_min(0).sqrt()
            x = denoised + ratio**2 * (x - denoised) + up * noise[:, i]
        return x
    history: list[tuple[Any, Tensor, Tensor]] = []
    for i in range(total):
        s, s_next = sigmas[i], sigmas[i + 1]
        net_s = (s if network_sigma_grad else s.detach()).to(x.dtype).expand(x.shape[0])
        denoised = model(x, net_s)
        if i == total - 1:  # the step to σ = 0
            return denoised
        s_, s_next_ = s.to(x.dtype), s_next.to(x.dtype)
        hist = [(h_s.to(x.dtype), h_x, h_d) for h_s, h_x, h_d in history]
        x_new = dpmpp_update(x, denoised, s_, s_next_, hist, total - i, max_order=order, total=total)
        history = ([(s, x, denoised)] + history)[: order - 1]
        x = x_new
    return x


def _my_rows(lo: int, hi: int, world: int) -> slice:
    """This rank's contiguous part of the batch of trajectories lo…hi−1 (all of it in one process)."""
    cuts = [lo + (hi - lo) * k // world for k in range(world + 1)]
    r = dist.rank()
    return slice(cuts[r], cuts[r + 1])


def train_steps(model: Denoiser, sample_shape: tuple[int, ...], opts: StepsOptions,
                progress: Any = None) -> tuple[Grid, dict[str, Any]]:
    """Learn ``opts.steps`` σ's for ``opts.base`` on ``model``; returns the grid and a record of the run."""
    opts.check()
    opts = replace(opts, schedule=opts.schedule or learned_solver_schedule(model, "time_uniform"))
    t0 = time.perf_counter()
    sched = get_schedule(opts.schedule, model=model)
    init = sched.grid(opts.steps, final_zero=True).sigmas
    sigma_max, sigma_min = float(init[0]), float(model.sigma_min)
    steps = LearnedSteps(sigma_max, sigma_min, init)
    fine = sched.grid(opts.teacher_steps, final_zero=True)
    gen = torch.Generator().manual_seed(opts.seed)
    device, dtype = torch.device(model.device), torch.float32
    z = torch.randn((opts.trajectories, *sample_shape), generator=gen).to(device, dtype)
    z = z * prior_scale(model.prior, sigma_max)
    noise = None  # a stochastic base's draws, fixed per trajectory and step (drawn after z, from the same seed)
    if opts.base in ANCESTRAL:
        noise = torch.randn((opts.trajectories, opts.steps - 1, *sample_shape), generator=gen).to(device, dtype)
    # under torchrun each rank takes a contiguous part of every batch (rows[b]); the losses below are sums over a
    # rank's rows divided by the whole batch's size, so gradients summed over ranks are the one-process gradients
    world = dist.world_size()
    if world > 1 and opts.loss == "fd":
        raise ValueError("--loss fd scores each batch's samples together: run it in one process, not under torchrun")
    batches = range(0, opts.trajectories, opts.batch)
    rows = {b: _my_rows(b, min(b + opts.batch, opts.trajectories), world) for b in batches}
    bound = {b: trajectory_model(model, opts.classes, opts.guidance, range(rows[b].start, rows[b].stop))
             for b in batches}  # each batch's model: bound to its trajectories' classes, guided
    # the objective, checked for this model before the teacher runs: a batch's loss and the pool's value
    if opts.loss == "fd":
        fd = reference_fd(opts, sample_shape, device)
        target = None

        def batch_loss(out: Tensor, r: slice, n: int) -> Tensor:
            return fd(out)

        def pool_value(outs: list[Tensor]) -> float:
            return float(fd(torch.cat(outs)))
    else:
        distance = final_distance(opts.loss, sample_shape, device)
        with torch.no_grad():
            target = torch.zeros_like(z)
            for b in batches:
                target[rows[b]] = get_sampler(opts.teacher)(bound[b], z[rows[b]], fine)

        def batch_loss(out: Tensor, r: slice, n: int) -> Tensor:
            return distance(out, target[r]).sum() / n

        def pool_value(outs: list[Tensor]) -> float:
            mine = torch.cat(outs)
            local = distance(mine, torch.cat([target[rows[b]] for b in batches])).double().sum()
            return float(dist.all_reduce_sum(local)) / opts.trajectories
    delta = torch.zeros_like(z)
    optimizer = torch.optim.Adam(steps.parameters(), lr=opts.lr)
    order = BASES[opts.base]
    grad_net = opts.network_sigma_grad

    def pool_loss() -> float:
        """The pool's loss at the current σ's, from the noise itself (no slack): what picks the kept grid."""
        with torch.no_grad():
            sig = steps()
            return pool_value([student_solve(bound[b], z[rows[b]], sig, order, network_sigma_grad=False,
                                             noise=None if noise is None else noise[rows[b]]) for b in batches])

    best = (pool_loss(), 0, steps().detach().clone())  # epoch 0: the initial grid
    evaluated = [best[0]]
    losses: list[float] = []
    for epoch in range(opts.epochs):
        epoch_loss = torch.zeros((), dtype=torch.float64)
        for b in batches:
            r, n = rows[b], min(b + opts.batch, opts.trajectories) - b
            d = delta[r].clone().requires_grad_(opts.slack > 0)
            optimizer.zero_grad(set_to_none=True)
            if r.stop > r.start:
                out = student_solve(bound[b], z[r] + d, steps(), order, network_sigma_grad=grad_net,
                                    noise=None if noise is None else noise[r])
                loss = batch_loss(out, r, n)
                loss.backward()
                epoch_loss += float(loss.detach()) * n  # this rank's share of the batch's summed loss
            if world > 1:  # the sum over ranks of per-rank sums / n: the whole batch's mean gradient
                dist.average_gradients(list(steps.parameters()))
                for prm in steps.parameters():
                    if prm.grad is not None:
                        prm.grad.mul_(world)
            optimizer.step()
            if opts.slack > 0 and r.stop > r.start:  # LD3's slack: the start moves toward noise the student maps onto the target
                with torch.no_grad():
                    moved = d - opts.slack_lr * d.grad
                    radius = opts.slack * z[r].reshape(len(d), -1).norm(dim=1)
                    norm = moved.reshape(len(d), -1).norm(dim=1).clamp_min(1e-12)
                    delta[r] = moved * (radius / norm).clamp(max=1.0).view(-1, *[1] * (d.ndim - 1))
        losses.append(float(dist.all_reduce_sum(epoch_loss)) / opts.trajectories)
        evaluated.append(pool_loss())
        if evaluated[-1] < best[0]:
            best = (evaluated[-1], epoch + 1, steps().detach().clone())
        if progress is not None:
            progress(epoch + 1, opts.epochs, losses[-1])
    grid = Grid(best[2].to(torch.float64))  # never worse than the initial grid on the pool
    record = {"method": "steps", "options": asdict(opts), "init": init.tolist(),
              "loss_per_epoch": [round(v, 6) for v in losses], "pool_loss": [round(v, 6) for v in evaluated],
              "kept_epoch": best[1], "seconds": round(time.perf_counter() - t0, 1), "network_sigma_gradient": grad_net,
              "hardware": hardware(device), "processes": world}
    return grid, record
