"""Distances between two sets of features: Fréchet distance (FID) and kernel MMD² (KID)."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import torch
from torch import Tensor


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, Eq. 6):

        d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

    (Σ1Σ2)^½ is ``scipy.linalg.sqrtm``; if it is not finite (a singular product) both covariances are
    offset by ``eps``·I and it is retried. Imaginary parts from round-off are dropped; a large one
    (> 1e-3 on the diagonal) raises, since it means the covariances are not valid covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or s1.shape != (d, d):
        raise ValueError(f"first statistics: mu {mu1.shape} and sigma {s1.shape} do not match")
    if mu2.ndim != 1 or s2.shape != (mu2.shape[0], mu2.shape[0]):
        raise ValueError(f"second statistics: mu {mu2.shape} and sigma {s2.shape} do not match")
    if mu2.shape[0] != d:
        raise ValueError(f"feature dimensions differ: {d} vs {mu2.shape[0]} (different feature extractors?)")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite entries (statistics of fewer than 2 images?)")

    with warnings.catch_warnings():  # scipy's "singular matrix" notice: fid_from_stats says why, in our words
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            warnings.warn(f"Σ1Σ2 is singular; adding {eps}·I to both covariances", RuntimeWarning, stacklevel=2)
            offset = np.eye(d) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        worst = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if worst > 1e-3:
            raise ValueError(
                f"sqrtm(Σ1Σ2) has an imaginary part of {worst:.3g} on its diagonal: the covariances are "
                "ill-conditioned or not positive semi-definite (too few images for the feature dimension?)"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


class FrechetToReference:
    """The Fréchet distance (Heusel et al. 2017, Eq. 6) between a batch of features and fixed reference statistics,
    differentiable in the batch, for training. With Σ2^½ precomputed, Tr((Σ1Σ2)^½) = Tr((Σ2^½ Σ1 Σ2^½)^½) = Σ √λ_i
    of a symmetric PSD matrix (``eigvalsh``); equal to ``frechet_distance`` on the same statistics (tested)."""

    def __init__(self, mu: Tensor, sigma: Tensor) -> None:
        mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"reference statistics: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} do not match")
        lam, vec = torch.linalg.eigh((sigma + sigma.T) / 2)
        self.mu, self.trace = mu, float(sigma.trace())
        self.sqrt_sigma = (vec * lam.clamp_min(0).sqrt()) @ vec.T

    def __call__(self, feats: Tensor) -> Tensor:
        """d² for the batch ``feats`` (N, D), N ≥ 2 (its mean and unbiased covariance), as a float64 scalar."""
        if feats.ndim != 2 or feats.shape[1] != self.mu.shape[0] or feats.shape[0] < 2:
            raise ValueError(f"features must be (N ≥ 2, {self.mu.shape[0]}), got {tuple(feats.shape)}")
        f = feats.to(torch.float64)
        mu = f.mean(0)
        centred = f - mu
        sigma = centred.T @ centred / (f.shape[0] - 1)
        inner = self.sqrt_sigma.to(f.device) @ sigma @ self.sqrt_sigma.to(f.device)
        eig = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(1e-12)
        return (mu - self.mu.to(f.device)).pow(2).sum() + sigma.trace() + self.trace - 2 * eig.sqrt().sum()


def _mmd2_unbiased(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> float:
    m = kxx.shape[0]
    sxx = kxx.sum() - kxx.diagonal().sum()
    syy = kyy.sum() - kyy.diagonal().sum()
    return float(sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(
    feats1: np.ndarray | torch.Tensor,
    feats2: np.ndarray | torch.Tensor,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    max_gram_rows: int = 6000,
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, Eq. 3–4): unbiased MMD² with the kernel k(x, y) = (xᵀy / d + 1)³.

    Averaged over ``num_subsets`` random pairs of subsets of ``min(subset_size, n1, n2)`` rows each,
    drawn without replacement by a NumPy generator seeded with ``seed``. Returns (mean, std) over the
    subsets (population std). Computed in float64; when both sets together have at most
    ``max_gram_rows`` rows the kernel matrix is computed once and the subsets index into it.
    """
    x = torch.as_tensor(np.asarray(feats1), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(feats2), dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"expected two (n, d) feature arrays, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    n1, n2, d = x.shape[0], y.shape[0], x.shape[1]
    m = min(subset_size, n1, n2)
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {n1} and {n2}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be positive, got {num_subsets}")
    rng = np.random.default_rng(seed)

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / d + 1.0) ** 3

    full = kernel(torch.cat([x, y]), torch.cat([x, y])) if n1 + n2 <= max_gram_rows else None
    mmds = []
    for _ in range(num_subsets):
        ix = torch.from_numpy(rng.choice(n1, m, replace=False))
        iy = torch.from_numpy(rng.choice(n2, m, replace=False))
        if full is not None:
            jy = iy + n1
            rows = full[ix]
            kxx, kxy, kyy = rows[:, ix], rows[:, jy], full[jy[:, None], jy]
        else:
            xs, ys = x[ix], y[iy]
            kxx, kyy, kxy = kernel(xs, xs), kernel(ys, ys), kernel(xs, ys)
        mmds.append(_mmd2_unbiased(kxx, kyy, kxy))
    arr = np.asarray(mmds)
    return float(arr.mean()), float(arr.std())
