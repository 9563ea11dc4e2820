"""Where an AMED step should evaluate: the one-step error against r, and the r a trained predictor chose.

For each interval [σ_i, σ_{i+1}] of a grid, the AMED-Solver step (Zhou et al. 2024, AMED Eq. 9; AFS on the first) starts from a
converged point of the probability-flow ODE at σ_i (dpm2 with 40 log-uniform sub-steps per interval, the
teacher forcing of training) and is compared with the converged point at σ_{i+1}, for r on a grid and c = 1.
The minimum per row is what training should approach; with ``--predictor`` the learned per-step r (mean ± std
over the images) is printed beside it, so an under-trained predictor shows as a learned r far from the minimum.
``--scan-c R1,R2,…`` prints the same error against the direction scale c at those per-step r instead.

    python experiments/amed_one_step.py --model mnist-ddpm --schedule karras --steps 3 --predictor mnist-ddpm/amed-nfe5
"""

from __future__ import annotations

import argparse
import math

import torch

import diffsamp
from diffsamp import FixedPredictor, load_predictor
from diffsamp.models import load, prior_scale, sample_shape
from diffsamp.samplers import StepState, amed_step, step_start

RS = (0.02, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.98)
CS = (0.8, 0.9, 0.95, 0.98, 0.99, 1.0, 1.01, 1.02, 1.05)


def converged_points(model: diffsamp.Denoiser, z: torch.Tensor, sigmas: list[float], substeps: int = 40) -> list:
    """The ODE solution at each σ of the grid (dpm2 on ``substeps`` log-uniform sub-steps per interval)."""
    points, x = [z], z
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        sub = torch.tensor([math.exp(math.log(a) + (math.log(b) - math.log(a)) * k / substeps)
                            for k in range(substeps + 1)], dtype=torch.float64)
        x = diffsamp.get_sampler("dpm2")(model, x, diffsamp.Grid(sub))
        points.append(x)
    return points


def learned_r(predictor: torch.nn.Module, model: diffsamp.Denoiser, z: torch.Tensor, grid: diffsamp.Grid) -> list:
    """(mean, std) of the r the predictor outputs at each step of its own sampling run from ``z``."""
    seen: list[torch.Tensor] = []
    hook = predictor.register_forward_hook(lambda m, i, o: seen.append(o[0].reshape(-1)))
    try:
        diffsamp.get_sampler("amed")(model, z, grid, predictor=predictor, afs=bool(predictor.config["afs"]))
    finally:
        hook.remove()
    return [(float(r.mean()), float(r.std()) if r.numel() > 1 else 0.0) for r in seen]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--schedule", default="karras")
    ap.add_argument("--steps", type=int, default=3, help="grid intervals (NFE 2·steps − 1 with AFS)")
    ap.add_argument("--num", type=int, default=8)
    ap.add_argument("--predictor", default=None, help="an amed predictor on this grid: its learned r per step")
    ap.add_argument("--scan-c", default=None, help="per-step r (comma-separated): scan c at them instead of r")
    args = ap.parse_args()
    model = load(args.model)
    grid = diffsamp.get_schedule(args.schedule, model=model).grid(args.steps, final_zero=False)
    sig = grid.sigmas.tolist()
    z = torch.randn((args.num, *sample_shape(model)), generator=torch.Generator().manual_seed(10_000))
    z = z * prior_scale(model.prior, sig[0])
    with torch.inference_mode():
        ref = converged_points(model, z, sig)
        learned = None
        if args.predictor:
            pred = load_predictor(args.predictor)
            if not torch.allclose(pred.grid_sigmas, grid.sigmas, rtol=1e-6, atol=0):
                raise SystemExit(f"error: {args.predictor} was trained on another grid ({pred.grid_sigmas.tolist()})")
            learned = learned_r(pred, model, z, grid)
        r_at = [float(v) for v in args.scan_c.split(",")] if args.scan_c else None
        if r_at is not None and len(r_at) != len(grid):
            raise SystemExit(f"error: --scan-c needs {len(grid)} values of r, one per step")
        what, values = ("c", CS) if r_at else ("r", RS)
        fixed = "r as given" if r_at else "c = 1"
        print(f"# {args.model}, {args.schedule} grid of {args.steps} steps ({', '.join(f'{s:.4g}' for s in sig)}), "
              f"{args.num} images: RMS error of one AMED step ({fixed}, AFS on the first) from the converged point")
        head = " | ".join(f"{what}={v}" for v in values)
        print(f"| interval | {head} | best {what} |" + (" learned r |" if learned else ""))
        print("|---|" + "---|" * (len(values) + 1 + bool(learned)))
        for i, (a, b) in enumerate(zip(sig[:-1], sig[1:])):
            errs = []
            for v in values:
                p = FixedPredictor(r_at[i], v) if r_at else FixedPredictor(v, 1.0)
                start = step_start(model, ref[i], a, afs=i == 0, predictor=p)
                out = amed_step("amed", model, start, i, a, b, p, StepState())
                errs.append((out - ref[i + 1]).pow(2).mean().sqrt().item())
            best = values[min(range(len(values)), key=errs.__getitem__)]
            label = f"{a:.3g} → {b:.3g}" + (f" (r {r_at[i]})" if r_at else "")
            row = f"| {label} | " + " | ".join(f"{e:.4f}" for e in errs) + f" | {best} |"
            if learned:
                row += f" {learned[i][0]:.3f} ± {learned[i][1]:.3f} |"
            print(row)


if __name__ == "__main__":
    main()
