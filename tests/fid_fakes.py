"""Tiny stand-ins for the FID network (fast, no weights) and fake idx data, shared by the FID tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from diffsamp.metrics.inception import FeatureExtractor


class TinyPool3(torch.nn.Module):
    """Same contract as the pool3 file: float (N, 3, 299, 299) scaled to [-1, 1) → (N, dims) features."""

    def __init__(self, dims: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, dims, kernel_size=23, stride=23)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean((2, 3)) + 0.1 * self.conv(x).std((2, 3))


class TinyNVlabs(torch.nn.Module):
    """Same contract as NVlabs' file: images in [0, 255]; ``return_features=True`` gives the features."""

    def __init__(self, core: TinyPool3) -> None:
        super().__init__()
        self.core = core

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = self.core((img.to(torch.float32) - 128.0) / 128.0)
        return feats if return_features else feats.sum(1, keepdim=True)


def tiny_extractor(dims: int = 8) -> FeatureExtractor:
    return FeatureExtractor(TinyPool3(dims).eval(), "pool3", "cpu", name="tiny-test-net", dims=dims)


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())
