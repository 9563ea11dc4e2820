"""2-D toy couplings for rectified flow, and the source draws z of pairs and paths (``draw_noise``).

A toy is a pair (source, target) of 2-D distributions; a rectified flow moves source (t = 1) to target
(t = 0). Names (``diffsamp train rf --dataset toy:NAME``):

  moons          N(0, I) → two moons
  gauss8         N(0, I) → 8 Gaussians on a circle of radius 4
  gauss6-moons   6 Gaussians on a circle of radius 3.5 → two moons
  mix2           two Gaussians → two Gaussians (a two-mixture coupling in the spirit of the RF paper's
                 figures: source at (−4, ±3), target at (4, ±3); the independent coupling's straight lines
                 cross, so 1-RF paths bend and reflow straightens them)

Every sampler takes a ``torch.Generator`` so draws are reproducible. Distances between point clouds are in
``diffsamp.metrics.toy_distances``; the whole rectify-a-toy recipe in ``diffsamp.training.toy_recipe``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Sampler = Callable[[int, torch.Generator], Tensor]


def normal(n: int, g: torch.Generator) -> Tensor:
    """N(0, I) in 2-D."""
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
    """``k`` equal Gaussians of std ``std`` evenly spaced on a circle of ``radius``."""
    def sample(n: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(0, k, (n,), generator=g)
        ang = 2 * math.pi * idx.float() / k
        centres = radius * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
        return centres + std * torch.randn(n, 2, generator=g)

    return sample


def two_gaussians(x: float, y: float, std: float) -> Sampler:
    """Two equal Gaussians of std ``std`` at (x, ±y)."""
    def sample(n: int, g: torch.Generator) -> Tensor:
        sign = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
        centres = torch.stack([torch.full((n,), x), sign * y], dim=1)
        return centres + std * torch.randn(n, 2, generator=g)

    return sample


@dataclass(frozen=True)
class Toy:
    """A named (source, target) coupling of 2-D distributions."""

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
    """The toy ``name`` (with or without the ``toy:`` prefix); an unknown name lists the valid ones."""
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


def draw_noise(source: str, shape: tuple[int, ...], lo: int, hi: int, seed: int) -> Tensor:
    """The source draws z of pairs (or paths) lo … hi−1: for "normal", draw i is
    ``randn(shape, generator=manual_seed(seed + i))`` (independent of batching); a toy source is drawn in one
    go from ``manual_seed(seed + lo)``."""
    if source == "normal":
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(lo, hi)])
    return source_sampler(source)(hi - lo, torch.Generator().manual_seed(seed + lo)).reshape(hi - lo, *shape)
