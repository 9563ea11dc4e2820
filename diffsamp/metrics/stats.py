"""Feature statistics: streaming float64 mean/covariance and the stats ``.npz`` file.

A stats file holds ``mu`` (d,) and ``sigma`` (d, d) under the same names as pytorch-fid's, so files
are interchangeable, plus ``meta``: a JSON string recording how the features were made (extractor,
resize, quantization, image size, padding, number of images, source), and optionally ``features``
(N, d) float32, which KID needs.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffsamp.io import save_npz

STATS_FORMAT = "diffsamp-fid-stats/1"
# Preprocessing keys that must agree between the two sides of a comparison (when both record them).
CHECKED_KEYS = ("extractor", "resize", "quantize", "size", "padding")


class StreamingMoments:
    """Running mean and covariance of feature rows, accumulated in float64.

    Keeps n, Σ(x − c) and Σ(x − c)(x − c)ᵀ with the shift c = the first batch's mean (which keeps the
    subtraction in ``cov`` well conditioned), so memory is O(d²) however many rows are seen.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: Tensor | None = None
        self._sum: Tensor | None = None
        self._outer: Tensor | None = None

    def update(self, feats: Tensor | np.ndarray) -> None:
        """Add a (B, d) batch of rows."""
        x = torch.as_tensor(feats).detach()
        if x.ndim != 2:
            raise ValueError(f"expected a (batch, dims) array of features, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        x = x.to(torch.float64)
        if self._shift is None:
            self._shift = x.mean(0)
            d = x.shape[1]
            self._sum = x.new_zeros(d)
            self._outer = x.new_zeros(d, d)
        elif x.shape[1] != self._shift.shape[0]:
            raise ValueError(f"feature dimension changed from {self._shift.shape[0]} to {x.shape[1]}")
        xc = x.to(self._shift.device) - self._shift
        self._sum += xc.sum(0)
        self._outer.addmm_(xc.T, xc)
        self.n += x.shape[0]

    def merged_over_ranks(self) -> "StreamingMoments":
        """The moments of every rank's rows together (``diffsamp.dist``; itself in a single process).

        Each rank re-centres its float64 sums on one common shift (the first non-empty rank's), then n, Σ(x − c)
        and Σ(x − c)(x − c)ᵀ are summed over ranks: equal to one process over all rows up to float64 rounding."""
        from diffsamp import dist

        if dist.world_size() == 1:
            return self
        shifts = dist.gather_objects(None if self._shift is None else self._shift.cpu())
        common = next((c for c in shifts if c is not None), None)
        if common is None:
            return self
        d = common.shape[0]
        n, s, outer = self.n, torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        if self._shift is not None:  # Σ(x−c) = Σ(x−a) + n δ; Σ(x−c)(x−c)ᵀ = Σ(x−a)(x−a)ᵀ + δ Σ(x−a)ᵀ + Σ(x−a) δᵀ + n δδᵀ
            delta = self._shift.cpu() - common
            s0, o0 = self._sum.cpu(), self._outer.cpu()
            s = s0 + n * delta
            outer = o0 + torch.outer(delta, s0) + torch.outer(s0, delta) + n * torch.outer(delta, delta)
        total = dist.all_reduce_sum(torch.cat([torch.tensor([float(n)], dtype=torch.float64), s, outer.flatten()]))
        merged = StreamingMoments()
        merged.n = int(round(float(total[0])))
        merged._shift, merged._sum, merged._outer = common, total[1 : d + 1], total[d + 1 :].view(d, d)
        return merged

    @property
    def mean(self) -> np.ndarray:
        """Sample mean (d,), float64."""
        if self.n == 0:
            raise ValueError("no features were accumulated")
        return (self._shift + self._sum / self.n).cpu().numpy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (d, d), float64 (the ``np.cov(x, rowvar=False)`` convention)."""
        if self.n < 2:
            raise ValueError(f"need at least 2 images to estimate a covariance, got {self.n}")
        s = self._sum
        return ((self._outer - torch.outer(s, s) / self.n) / (self.n - 1)).cpu().numpy()


@dataclass
class FIDStats:
    """Gaussian statistics of a set of features (FID, Heusel et al. 2017), with provenance."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None

    @property
    def num_images(self) -> int | None:
        n = self.meta.get("num_images")
        if n is None and self.features is not None:
            n = len(self.features)
        return None if n is None else int(n)

    @property
    def dims(self) -> int:
        return int(self.mu.shape[0])

    def describe(self) -> str:
        """One line: number of images, size, padding, source."""
        m = self.meta
        parts = [f"{self.num_images if self.num_images is not None else '?'} images"]
        if m.get("size"):
            parts.append("×".join(str(s) for s in m["size"]))
        if m.get("padding") is not None:
            parts.append(f"padding {m['padding']}")
        if not m:
            parts.append("no metadata")
        return ", ".join(parts)


def save_stats(stats: FIDStats, path: str | os.PathLike, *, include_features: bool = True) -> Path:
    """Write ``stats`` to ``path`` (.npz) through a temporary file and a rename (never half-written)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "mu": np.asarray(stats.mu, dtype=np.float64),
        "sigma": np.asarray(stats.sigma, dtype=np.float64),
        "meta": np.array(json.dumps({"format": STATS_FORMAT, **stats.meta}, sort_keys=True)),
    }
    if include_features and stats.features is not None:
        arrays["features"] = np.asarray(stats.features, dtype=np.float32)
    return save_npz(path, **arrays)


def load_stats(path: str | os.PathLike) -> FIDStats:
    """Read a stats ``.npz`` written by ``save_stats`` or by pytorch-fid (``mu``/``sigma`` only)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such stats file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz stats file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            files = set(f.files)
            if not {"mu", "sigma"} <= files:
                raise ValueError(f"{path}: not a stats file (it has {sorted(files)}; need 'mu' and 'sigma')")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            meta = json.loads(str(f["meta"])) if "meta" in files else {}
            features = f["features"] if "features" in files else None
    except (zipfile.BadZipFile, OSError, EOFError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable .npz stats file ({exc})") from exc
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (d,) and (d, d)")
    meta.pop("format", None)
    return FIDStats(mu, sigma, meta, features)


def make_meta(
    *,
    extractor: str,
    resize: str,
    num_images: int,
    size: tuple[int, int],
    channels: int,
    padding: int | None = None,
    source: str = "",
) -> dict[str, Any]:
    """The provenance recorded beside ``mu``/``sigma``."""
    return {
        "extractor": extractor,
        "resize": resize,
        "quantize": "uint8",
        "num_images": int(num_images),
        "size": [int(size[0]), int(size[1])],
        "channels": int(channels),
        "padding": None if padding is None else int(padding),
        "source": source,
    }


def preprocessing_mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences in the preprocessing two stats record (keys absent on a side are skipped)."""
    out = []
    for key in CHECKED_KEYS:
        va, vb = a.get(key), b.get(key)
        if va is not None and vb is not None and va != vb:
            out.append(f"{key}: {_fmt(va)} vs {_fmt(vb)}")
    return out


def _fmt(v: Any) -> str:
    return "×".join(map(str, v)) if isinstance(v, list) else str(v)
