"""Distances between two point clouds of equal size (toy rectified flows against their target)."""

from __future__ import annotations

import torch
from torch import Tensor


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
