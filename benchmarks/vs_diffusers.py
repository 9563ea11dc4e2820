"""Our ddim / ddpm / dpmpp2m vs diffusers' scheduler loops on the same UNet, same timesteps, same noise.

Prints, per sampler: network calls of each loop (the NFE, counted), median wall times, their ratio
(ours / diffusers; target ≤ 1.0), each loop's overhead over its own network time (forward hooks) and
the max abs difference of the outputs. The two loops are timed alternately, so load on the machine hits
both alike. Both run on the same random small UNet (CPU, float32) under inference_mode; diffusers' loop
is ``for t in scheduler.timesteps: x = scheduler.step(unet(x, t).sample, t, x).prev_sample``.

    python benchmarks/vs_diffusers.py [--batch 64] [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import diffsamp  # noqa: E402
from _unet import NetworkMeter, bench_unet  # noqa: E402
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser  # noqa: E402
from diffsamp.samplers import Grid  # noqa: E402


def main() -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    unet = bench_unet()
    n, b = args.steps, args.batch
    cases = [
        ("ddim", DDIMScheduler(clip_sample=False)),
        ("ddpm", DDPMScheduler(clip_sample=False)),
        ("dpmpp2m", DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)),
    ]
    print(f"batch {b}, {n} steps, UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M params, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating runs")
    print("| sampler | NFE diffusers / ours | diffusers (s) | diffsamp (s) | ratio | overhead diffusers / ours | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    meter = NetworkMeter(unet)
    for name, sched in cases:
        den = DiffusersUNetDenoiser(unet, sched.alphas_cumprod, sched.config.prediction_type)
        sched.set_timesteps(n)
        if name == "dpmpp2m":
            grid = Grid(sched.sigmas.to(torch.float64))
        else:
            grid = diffsamp.get_schedule("ddpm", model=den, spacing=sched.config.timestep_spacing).grid(n)

        def ref_loop():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(b, 1, 32, 32, generator=g) * sched.init_noise_sigma
            sched.set_timesteps(n)
            for t in sched.timesteps:
                x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x, generator=g).prev_sample
            return x

        def our_loop():
            g = torch.Generator().manual_seed(0)
            z = torch.randn(b, 1, 32, 32, generator=g)
            return diffsamp.get_sampler(name)(den, z * math.sqrt(1 + grid.sigmas[0].item() ** 2), grid, generator=g)

        runs: dict[str, list[tuple[float, float, int]]] = {"ref": [], "ours": []}
        with torch.inference_mode():
            ref, ours = ref_loop(), our_loop()  # warm-up, and the outputs compared
            for _ in range(args.repeats):
                for key, fn in (("ref", ref_loop), ("ours", our_loop)):
                    meter.reset()
                    t0 = time.perf_counter()
                    fn()
                    runs[key].append((time.perf_counter() - t0, meter.seconds, meter.calls))
        wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        over = {k: statistics.median(r[0] / r[1] for r in v) for k, v in runs.items()}
        ratio = statistics.median(o[0] / r[0] for o, r in zip(runs["ours"], runs["ref"]))
        diff = (ours - ref).abs().max().item()
        print(f"| {name} | {runs['ref'][0][2]} / {runs['ours'][0][2]} | {wall['ref']:.3f} | {wall['ours']:.3f} | "
              f"{ratio:.3f} | {over['ref']:.3f} / {over['ours']:.3f} | {diff:.2e} |")
    meter.close()


if __name__ == "__main__":
    main()
