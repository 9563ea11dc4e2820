"""Brownian-tree noise for the SDE solvers: one Brownian motion W(σ) per sample, queried over any [σ', σ].

The DPM-Solver++ SDE samplers (Lu et al. 2022, DPM-Solver++ §5, Eq. 9–10 and their k-diffusion form) add at each
step the increment of one Brownian path, normalised: n = W(σ, σ')/√|σ − σ'| ~ N(0, I). Drawing these increments
from a fixed path (torchsde's ``BrownianInterval`` with a halfway tree, as k-diffusion's
``BrownianTreeNoiseSampler`` and diffusers' ``DPMSolverSDEScheduler`` do) rather than fresh Gaussians makes the
noise over [σ_b, σ_a] the sum of the noise over any refinement of it: W(σ_a, σ_b) = W(σ_a, σ_c) + W(σ_c, σ_b).
So a finer grid samples the same path, and a sample's noise does not depend on how the grid was cut.

With one ``torch.Generator`` per sample (CONTRIBUTING.md, randomness is an argument) each sample gets its own tree,
seeded by one draw from its own generator: image i does not depend on the batch. With one generator (or None, the
global RNG) one seed is drawn and one tree covers the whole batch (k-diffusion's and diffusers' default).
Trees live on the generator's device and the noise is then moved, so a CPU generator gives the same noise on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from diffsamp.samplers._util import Generator, randn_like

SEED_HIGH = 2**63 - 1  # seeds are drawn in [0, 2⁶³ − 1), as k-diffusion draws its default seed


def draw_seed(generator: torch.Generator | None) -> int:
    """One tree seed from ``generator`` (None: the global RNG)."""
    if generator is None:
        return int(torch.randint(0, SEED_HIGH, ()).item())
    return int(torch.randint(0, SEED_HIGH, (), generator=generator, device=generator.device).item())


def tree_seeds(generator: Generator, batch: int) -> int | list[int]:
    """The seed(s) ``BrownianNoise`` draws: one int for None or one generator, one per sample for a list."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw_seed(generator)
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}: pass one per sample")
    return [draw_seed(g) for g in gens]


class BrownianNoise:
    """Normalised Brownian increments n(σ, σ') = W(σ, σ')/√|σ − σ'|, from one tree per sample (or one in all).

    ``sigma_min``/``sigma_max`` bound the queries (the smallest positive and the largest σ of the grid). ``seed``:
    an int (one tree shaped like the whole batch) or one int per sample (a tree per sample, shaped like one
    sample); default: drawn from ``generator`` by ``tree_seeds``. The trees are torchsde ``BrownianInterval``s
    with k-diffusion's and diffusers' settings (tol 1e-6, pool 24, halfway tree), and the sign convention of
    k-diffusion's ``BatchedBrownianTree`` (W over a decreasing interval is −W over the increasing one), so the
    same seed gives diffusers' ``DPMSolverSDEScheduler`` noise (``noise_sampler_seed``).
    """

    def __init__(
        self,
        x: Tensor,
        sigma_min: float,
        sigma_max: float,
        *,
        generator: Generator = None,
        seed: int | Sequence[int] | None = None,
    ) -> None:
        import torchsde

        if not 0 <= sigma_min < sigma_max:
            raise ValueError(f"a Brownian tree needs 0 ≤ sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if seed is None:
            seed = tree_seeds(generator, x.shape[0])
        self.batched = not isinstance(seed, int)
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {x.shape[0]}")
        if isinstance(generator, torch.Generator):
            device = generator.device
        elif generator is not None and len(list(generator)):
            device = list(generator)[0].device
        else:
            device = x.device
        self.device = x.device
        shape = tuple(x.shape[1:]) if self.batched else tuple(x.shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.trees = [
            torchsde.BrownianInterval(
                t0=self.sigma_min, t1=self.sigma_max, size=shape, dtype=x.dtype, device=device, entropy=s,
                tol=1e-6, pool_size=24, halfway_tree=True,
            )
            for s in seeds
        ]

    def increment(self, sigma: float, sigma_next: float) -> Tensor:
        """W(σ_next) − W(σ), unnormalised (sign: −W over [σ_next, σ] when σ > σ_next)."""
        lo, hi, sign = (sigma, sigma_next, 1.0) if sigma < sigma_next else (sigma_next, sigma, -1.0)
        tree = self.trees[0]  # torchsde may round its ends by an ulp: clamp the queries to them
        lo, hi = max(float(lo), getattr(tree, "_start", self.sigma_min)), min(float(hi), getattr(tree, "_end", self.sigma_max))
        w = torch.stack([tree(lo, hi) for tree in self.trees]) if self.batched else self.trees[0](lo, hi)
        return (w * sign).to(self.device)

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        """n(σ, σ') = W(σ, σ')/√|σ' − σ| ~ N(0, I)."""
        return self.increment(sigma, sigma_next) / abs(float(sigma_next) - float(sigma)) ** 0.5


class GaussianNoise:
    """Independent N(0, I) draws per call from ``generator`` (``randn_like``): the noise of diffusers'
    ``DPMSolverMultistepScheduler`` SDE variants, which take their generator. Same law as ``BrownianNoise`` on a
    fixed grid; no refinement consistency."""

    def __init__(self, x: Tensor, generator: Generator) -> None:
        self.x, self.generator = x, generator

    def __call__(self, sigma: float, sigma_next: float) -> Tensor:
        return randn_like(self.x, self.generator)


NoiseKind = Literal["brownian", "gaussian"]


def grid_noise(x: Tensor, sigmas: Sequence[float], generator: Generator, kind: NoiseKind = "brownian"
               ) -> BrownianNoise | GaussianNoise:
    """The noise of an SDE solver on a grid: ``brownian``, a ``BrownianNoise`` over [smallest positive σ, largest
    σ] (k-diffusion's range), or ``gaussian``, fresh draws from the generator."""
    if kind == "gaussian":
        return GaussianNoise(x, generator)
    if kind != "brownian":
        raise ValueError(f"noise must be 'brownian' or 'gaussian', got {kind!r}")
    positive = [s for s in sigmas if s > 0]
    lo, hi = min(positive), max(positive)
    return BrownianNoise(x, lo if lo < hi else 0.0, hi, generator=generator)  # one positive σ: never queried
