"""Shared pieces of the speed benchmarks: the small random UNet, a median timer, and a network-time meter."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


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
    return statistics.median(times)


class NetworkMeter:
    """Counts the calls of ``module`` and adds up the wall time spent inside them (forward hooks).

    Whatever loop drives the network (ours or diffusers'), ``seconds`` is the time of the network's own
    forwards in that very run, so ``wall / seconds`` is the loop's overhead ratio, measured under the same
    machine load as the loop itself.
    """

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.seconds = 0.0
        self._t0 = 0.0
        self._handles = [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after),
        ]

    def _before(self, *_: object) -> None:
        self._t0 = time.perf_counter()

    def _after(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def timed_runs(fn: Callable[[], object], meter: NetworkMeter, repeats: int) -> list[tuple[float, float, int]]:
    """``repeats`` runs of ``fn`` (after one warm-up): (wall s, network s, network calls) of each."""
    fn()
    out = []
    for _ in range(repeats):
        meter.reset()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0, meter.seconds, meter.calls))
    return out
