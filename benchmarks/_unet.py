"""The small benchmark UNet (random weights): 1×32×32, the size class of the shipped MNIST models."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def bench_unet(channels: tuple[int, ...] = (32, 64, 64)):
    """A randomly initialised diffusers UNet2DModel for 1×32×32 images, in eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    n = len(channels)
    return UNet2DModel(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=8,
    ).eval()


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
