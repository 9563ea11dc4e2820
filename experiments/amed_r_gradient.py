"""The gradient AMED training follows for r on a discrete-time network: exact autograd against the smoothed one.

One student step of ``amed`` (AFS on the first), teacher-forced from the teacher's point at σ_i, against the
teacher's point at σ_{i+1} (dpm2, M = 3, as ``train amed``), for r held the same for every image: the loss on a
fine grid of r (a DDPM UNet fed the fractional timestep of s wiggles with a period of ≈ 2π timesteps), then at
coarser r the loss, the exact ∂L/∂r and the smoothed one (per-sample central difference over ±π timesteps,
``diffsamp.training.student_step``). A useful gradient has the sign of the loss's trend.

    python experiments/amed_r_gradient.py --model mnist-ddpm --nfe 3 --step 0 --num 32
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffsamp import FixedPredictor
from diffsamp.models import load, prior_scale, sample_shape
from diffsamp.samplers import StepState, step_start
from diffsamp.training import AmedTrainOptions, student_grids, student_step, teacher_targets


class _SameR(torch.nn.Module):
    """r (one trainable value per image, all equal), c = a = 1."""

    feature_dim = None

    def __init__(self, r: float, num: int) -> None:
        super().__init__()
        self.r = torch.nn.Parameter(torch.full((num,), r))

    def forward(self, h, step, sigma, sigma_next):
        return self.r, torch.ones_like(self.r), torch.ones_like(self.r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--nfe", type=int, default=3)
    ap.add_argument("--schedule", default="time_uniform")
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--fine", default="0.25,0.27,11", help="START,STOP,COUNT of the fine r grid")
    ap.add_argument("--coarse", default="0.05,0.1,0.15,0.2,0.25,0.3,0.4")
    args = ap.parse_args()
    model = load(args.model)
    opts = AmedTrainOptions(nfe=args.nfe, schedule=args.schedule, teacher="dpm2", teacher_m=3).resolved()
    coarse, fine = student_grids(model, opts)
    i = args.step
    s, s_next = float(coarse.sigmas[i]), float(coarse.sigmas[i + 1])
    z = torch.randn((args.num, *sample_shape(model)), generator=torch.Generator().manual_seed(123))
    targets = teacher_targets(model, z * prior_scale(model.prior, float(coarse.sigmas[0])), fine, opts)
    afs = bool(opts.afs) and i == 0
    print(f"# {args.model}, {args.schedule} grid of {opts.steps} steps, step {i} ({s:.4g} → {s_next:.4g}), "
          f"{args.num} images; loss = Σ squared error / image")
    a, b, n = args.fine.split(",")
    cells = []
    for r in np.linspace(float(a), float(b), int(n)):
        p = FixedPredictor(float(r), 1.0)
        with torch.no_grad():
            start = step_start(model, targets[i], s, afs=afs, predictor=p)
            sur, loss, _ = student_step("amed", model, start, i, s, s_next, p, StepState(), targets[i + 1],
                                        smoothed=False)
        t = float(model.timestep(torch.tensor([s_next**r * s ** (1 - r)], dtype=torch.float64))) \
            if model.timestep_sigmas is not None else float("nan")
        cells.append(f"r={r:.3f} (t={t:.1f}): {float(loss):.1f}")
    print("# fine r: " + "; ".join(cells))
    print("| r | loss | exact ∂L/∂r | smoothed ∂L/∂r |")
    print("|---|---|---|---|")
    for r in (float(v) for v in args.coarse.split(",")):
        row = []
        for smoothed in (False, True):
            p = _SameR(r, args.num)
            with torch.no_grad():
                start = step_start(model, targets[i], s, afs=afs, predictor=p)
            sur, loss, _ = student_step("amed", model, start, i, s, s_next, p, StepState(), targets[i + 1],
                                        smoothed=smoothed)
            sur.backward()
            row.append(float(p.r.grad.sum()))
        print(f"| {r} | {float(loss):.1f} | {row[0]:+.0f} | {row[1]:+.0f} |", flush=True)


if __name__ == "__main__":
    main()
