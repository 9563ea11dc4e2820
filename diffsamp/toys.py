"""2-D toy couplings for rectified flow, and distances between point clouds.

A toy is a pair (source, target) of 2-D distributions; a rectified flow moves source (t = 1) to target
(t = 0). Names (``diffsamp train rf --dataset toy:NAME``):

  moons          N(0, I) → two moons
  gauss8         N(0, I) → 8 Gaussians on a circle of radius 4
  gauss6-moons   6 Gaussians on a circle of radius 3.5 → two moons
  mix2           two Gaussians → two Gaussians (a two-mixture coupling in the spirit of the RF paper's
                 figures: source at (−4, ±3), target at (4, ±3); the independent coupling's straight lines
                 cross, so 1-RF paths bend and reflow straightens them)

Every sampler takes a ``torch.Generator`` so draws are reproducible. Distances: sliced Wasserstein-2 and
the (biased, V-statistic) RBF-kernel MMD².
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Sampler = Callable[[int, torch.Generator], Tensor]


def normal(n: int, g: torch.Generator) -> Tensor:
    return torch.randn(n, 2, generator=g)


def moons(n: int, g: torch.Generator, noise: float = 0.08) -> Tensor:
    """Two interleaved half circles, centred and scaled to roughly unit variance."""
    upper = torch.rand(n, generator=g) < 0.5
    a = torch.rand(n, generator=g) * math.pi
    x = torch.where(upper, torch.cos(a), 1 - torch.cos(a))
    y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.0
    return pts + noise * 2.0 * torch.randn(n, 2, generator=g)


def ring_of_gaussians(k: int, radius: float, std: float) -> Sampler:
    def sample(n: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, k, (n,), generator=g)
        ang = 2 * math.pi * idx.float() / k
        centres = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        return centres + std * torch.randn(n, 2, generator=g)

    return sample


def two_gaussians(x: float, y: float, std: float) -> Sampler:
    def sample(n: int, g: torch.Generator) -> Tensor:
        sign = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
        centres = torch.stack([torch.full((n,), x), sign * y], dim=1)
        return centres + std * torch.randn(n, 2, generator=g)

    return sample


@dataclass(frozen=True)
class Toy:
    name: str
    source_name: str
    source: Sampler
    target: Sampler
    description: str


_SOURCES: dict[str, Sampler] = {
    "normal": normal,
    "gauss6": ring_of_gaussians(6, 3.5, 0.3),
    "mix2-left": two_gaussians(-4.0, 3.0, 0.5),
}

TOYS: dict[str, Toy] = {
    "moons": Toy("moons", "normal", normal, moons, "N(0, I) → two moons"),
    "gauss8": Toy("gauss8", "normal", normal, ring_of_gaussians(8, 4.0, 0.25), "N(0, I) → 8 Gaussians on a circle"),
    "gauss6-moons": Toy("gauss6-moons", "gauss6", _SOURCES["gauss6"], moons, "6 Gaussians → two moons"),
    "mix2": Toy("mix2", "mix2-left", _SOURCES["mix2-left"], two_gaussians(4.0, 3.0, 0.5),
                "two Gaussians at (−4, ±3) → two Gaussians at (4, ±3)"),
}


def get_toy(name: str) -> Toy:
    key = name.removeprefix("toy:")
    try:
        return TOYS[key]
    except KeyError:
        raise ValueError(f"unknown toy {name!r}; available: {', '.join('toy:' + k for k in sorted(TOYS))}") from None


def source_sampler(name: str) -> Sampler:
    """The sampler of a source distribution named in a model's config ("normal", "gauss6", …)."""
    try:
        return _SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown source distribution {name!r}; known: {', '.join(sorted(_SOURCES))}") from None


class ToyBatches:
    """Endless fresh (source, target) batches of a toy as (B, 2, 2) tensors [:, 0] = target x0, [:, 1] = source.

    Independent draws (the 1-RF coupling). Restorable: the generator state is the whole state.
    """

    def __init__(self, toy: Toy | str, batch_size: int, *, seed: int = 0, device: str | torch.device = "cpu") -> None:
        self.toy = get_toy(toy) if isinstance(toy, str) else toy
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> Tensor:
        x0 = self.toy.target(self.batch_size, self.generator)
        x1 = self.toy.source(self.batch_size, self.generator)
        return torch.stack([x0, x1], dim=1).to(self.device)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


# ------------------------------------------------------------------------------------------- distances
def sliced_wasserstein(a: Tensor, b: Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance: sqrt of the mean over random directions of W2² of the 1-D projections
    (equal sample sizes: sorted projections are matched)."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, d) clouds of the same size, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa = (a.double() @ dirs).sort(dim=0).values
    pb = (b.double() @ dirs).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mmd_rbf(a: Tensor, b: Tensor, *, bandwidths: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)) -> float:
    """Biased MMD² with a sum of RBF kernels exp(−‖x − y‖²/(2h²)) over ``bandwidths``."""
    a, b = a.double(), b.double()

    def k(x: Tensor, y: Tensor) -> Tensor:
        d2 = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean())


# ------------------------------------------------------------------------------------------- experiment
@dataclass
class ToyRun:
    """What ``rectify_toy`` produced: the models, their figures and the run directories."""

    models: dict
    metrics: dict
    seconds: dict
    target: Tensor
    source: Tensor


def rectify_toy(
    name: str,
    workdir,
    *,
    train_steps: int = 600,
    reflow_steps: int = 600,
    distill_steps: int = 300,
    num_pairs: int = 4000,
    pair_euler_steps: int = 64,
    batch_size: int = 256,
    hidden: int = 128,
    depth: int = 3,
    lr: float = 2e-3,
    num_eval: int = 2000,
    seed: int = 0,
) -> ToyRun:
    """The whole RF recipe on a 2-D toy, with the commands' library functions: 1-RF on independent pairs,
    reflow pairs from its ODE (Euler), 2-RF fine-tuned from it, then one-step distillation of 2-RF.

    Metrics per model: straightness (Euler 100 steps) and the sliced Wasserstein-2 distance / MMD² of its
    one-step (and 100-step) Euler samples to fresh target draws.
    """
    import time
    from pathlib import Path

    from diffsamp.models.rectified_flow import load_rf, straightness
    from diffsamp.training.loop import TrainConfig
    from diffsamp.training.pairs import draw_noise, generate_pairs, integrate
    from diffsamp.training.rectified_flow import RFTrainOptions, train_distill, train_reflow, train_rf

    toy = get_toy(name)
    work = Path(workdir)

    def cfg(steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, lr=lr, warmup_steps=min(50, steps // 4), ema_decay=0.99, ckpt_every=0,
                           log_every=max(1, steps // 4), seed=seed)

    def opts(init=None) -> RFTrainOptions:
        return RFTrainOptions(dataset=f"toy:{toy.name}", batch_size=batch_size, mlp_hidden=hidden, mlp_depth=depth,
                              init=init, num_grid=0)

    seconds: dict = {}
    t = time.perf_counter()
    train_rf(work / "rf1", opts(), cfg(train_steps), progress=False)
    seconds["1-RF"] = time.perf_counter() - t
    rf1 = load_rf(work / "rf1")
    t = time.perf_counter()
    generate_pairs(rf1, work / "pairs1", num=num_pairs, shape=(2,), sampler="euler", schedule="rf",
                   steps=pair_euler_steps, model_name="rf1", rectification=1, source=toy.source_name,
                   shard_size=num_pairs, batch_size=num_pairs, seed=seed + 10_000, progress=False)
    seconds["pairs"] = time.perf_counter() - t
    t = time.perf_counter()
    train_reflow(work / "rf2", work / "pairs1", opts(str(work / "rf1")), cfg(reflow_steps), progress=False)
    seconds["2-RF"] = time.perf_counter() - t
    rf2 = load_rf(work / "rf2")
    generate_pairs(rf2, work / "pairs2", num=num_pairs, shape=(2,), sampler="euler", schedule="rf",
                   steps=pair_euler_steps, model_name="rf2", rectification=2, source=toy.source_name,
                   shard_size=num_pairs, batch_size=num_pairs, seed=seed + 20_000, progress=False)
    t = time.perf_counter()
    train_distill(work / "distill", work / "pairs2", opts(str(work / "rf2")), cfg(distill_steps), progress=False)
    seconds["2-RF+distill"] = time.perf_counter() - t
    models = {"1-RF": rf1, "2-RF": rf2, "2-RF+distill": load_rf(work / "distill")}

    g = torch.Generator().manual_seed(seed + 99)
    target = toy.target(num_eval, g)
    z = draw_noise(toy.source_name, (2,), 0, num_eval, seed + 30_000)
    metrics: dict = {}
    for label, m in models.items():
        one, _ = integrate(m, z, sampler="euler", schedule="rf", steps=1)
        many, _ = integrate(m, z, sampler="euler", schedule="rf", steps=100)
        s = straightness(m, z[:500], steps=100)
        metrics[label] = {
            "straightness": s["S"], "straightness_err": s["S_err"], "relative_straightness": s["relative"],
            "sw_1step": sliced_wasserstein(one, target), "mmd_1step": mmd_rbf(one, target),
            "sw_100step": sliced_wasserstein(many, target), "mmd_100step": mmd_rbf(many, target),
        }
    metrics["data floor"] = {"sw": sliced_wasserstein(toy.target(num_eval, g), target),
                             "mmd": mmd_rbf(toy.target(num_eval, g), target)}
    return ToyRun(models, metrics, seconds, target, z)
