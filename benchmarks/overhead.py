"""Sampler overhead: wall time of each sampler / (NFE × bare network forward), small UNet on CPU.

Target ≤ 1.05: the sampler (σ-space conversions, timestep interpolation, the update rule, noise) adds
≤ 5 % to the network's own cost. Two ratios per sampler, medians over ``--repeats`` runs:

- ``wall / (NFE × bare)``: the bare forward ``unet(x, t).sample`` is timed at the same batch size right
  before that sampler's runs (so slow drifts of the machine's speed hit both sides alike);
- ``wall / net``: the network's own forward time inside the same run (forward hooks), which is immune to
  drift and to other load on the machine; its excess over 1 is exactly what the sampler adds.

    python benchmarks/overhead.py [--batch 64,256] [--steps 6] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import diffsamp  # noqa: E402
from _unet import NetworkMeter, bench_unet, median_time, timed_runs  # noqa: E402
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser  # noqa: E402
from diffsamp.models.parameterization import ddpm_alphas_cumprod  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="64,256")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samplers", default=None, help="comma-separated subset (default: every registered ODE/SDE sampler but rk45)")
    args = parser.parse_args()
    unet = bench_unet()
    den = DiffusersUNetDenoiser(unet, ddpm_alphas_cumprod())
    names = args.samplers.split(",") if args.samplers else [
        n for n in diffsamp.available_samplers() if n not in ("rk45", "ancestral", "dpmpp")  # dpmpp = dpmpp2m
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, UNet params "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M, {args.steps} karras steps, "
          f"median of {args.repeats} runs")
    grid = diffsamp.get_schedule("karras", model=den).grid(args.steps)
    for batch in [int(b) for b in args.batch.split(",")]:
        x = torch.randn(batch, 1, 32, 32)
        t = torch.full((batch,), 500.0)
        print(f"\n### batch {batch}")
        print("| sampler | NFE declared | network calls | bare forward (ms) | wall (s) | wall / (NFE × bare) | wall / net |")
        print("|---|---|---|---|---|---|---|")
        for name in names:
            spec = diffsamp.get_sampler(name)
            gen = torch.Generator().manual_seed(0)
            x0 = torch.randn(batch, 1, 32, 32, generator=gen) * grid.sigmas[0].item()
            nfe = spec.expected_nfe(grid)
            with torch.inference_mode():
                bare = median_time(lambda: unet(x, t).sample, repeats=3)
                meter = NetworkMeter(unet)
                runs = timed_runs(lambda: spec(den, x0, grid, generator=gen), meter, args.repeats)
                meter.close()
            wall = statistics.median(r[0] for r in runs)
            vs_bare = statistics.median(r[0] / (nfe * bare) for r in runs)
            vs_net = statistics.median(r[0] / r[1] for r in runs)
            calls = {r[2] for r in runs}
            print(f"| {name} | {nfe} | {'/'.join(map(str, sorted(calls)))} | {bare * 1e3:.1f} | {wall:.3f} | "
                  f"{vs_bare:.3f} | {vs_net:.3f} |")


if __name__ == "__main__":
    main()
