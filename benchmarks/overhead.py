"""Sampler overhead: wall time of each sampler / (NFE × bare network forward), small UNet on CPU.

Target ≤ 1.05: the sampler (σ-space conversions, timestep interpolation, the update rule, noise) adds
≤ 5 % to the network's own cost. Bare forward = ``unet(x, t).sample`` at the same batch size.

    python benchmarks/overhead.py [--batch 64,256] [--steps 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import diffsamp  # noqa: E402
from _unet import bench_unet, median_time  # noqa: E402
from diffsamp.models.base import CountingDenoiser  # noqa: E402
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser  # noqa: E402
from diffsamp.models.parameterization import ddpm_alphas_cumprod  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="64,256")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    unet = bench_unet()
    den = DiffusersUNetDenoiser(unet, ddpm_alphas_cumprod())
    names = [n for n in diffsamp.available_samplers() if n not in ("rk45", "ancestral")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, UNet params "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, {args.steps} karras steps")
    for batch in [int(b) for b in args.batch.split(",")]:
        x = torch.randn(batch, 1, 32, 32)
        t = torch.full((batch,), 500.0)
        with torch.inference_mode():
            bare = median_time(lambda: unet(x, t).sample, repeats=args.repeats)
        print(f"\n### batch {batch}: bare forward {bare * 1e3:.1f} ms")
        print("| sampler | NFE | wall (s) | wall / (NFE × forward) |")
        print("|---|---|---|---|")
        grid = diffsamp.get_schedule("karras", model=den).grid(args.steps)
        for name in names:
            spec = diffsamp.get_sampler(name)
            counter = CountingDenoiser(den)
            gen = torch.Generator().manual_seed(0)
            x0 = torch.randn(batch, 1, 32, 32, generator=gen) * grid.sigmas[0].item()

            def run():
                return spec(counter, x0, grid, generator=gen)

            with torch.inference_mode():
                wall = median_time(run, repeats=args.repeats, warmup=0)
            nfe = spec.expected_nfe(grid)
            print(f"| {name} | {nfe} | {wall:.3f} | {wall / (nfe * bare):.3f} |")


if __name__ == "__main__":
    main()
