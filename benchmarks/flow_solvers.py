"""How accurately each ODE solver integrates a trained model, against a tight adaptive RK45 reference.

For one model (default ``mnist-rf``): the same N noises integrated by RK45 (rtol = atol = ``--ref-tol``) and by
each ``sampler/schedule/steps`` setting; prints the measured NFE and the RMS and max distance of the end
points to the reference (data range [-1, 1]). It answers "which solver, on which grid, to make reflow pairs
with": on a flow's ``rf`` grid (uniform t) the first interval is one huge step in σ (σ 999 → 11 at 12
steps), so a trapezoid in σ (Heun) weighs the end slope over half of it, while Euler and DPM-Solver++ —
exact when x̂0 is constant over a step — are not hurt.

    python benchmarks/flow_solvers.py --model mnist-rf --num 16
    python benchmarks/flow_solvers.py --model mnist-ddpm --settings heun/karras/10,dpmpp2m/karras/20
"""

from __future__ import annotations

import argparse
import time


from diffsamp import generate
from diffsamp.models import load as load_model
from diffsamp.models.zoo import sample_shape

DEFAULT = ("euler/rf/32,euler/rf/100,heun/rf/12,heun/karras/12,heun/karras/18,dpmpp2m/rf/10,dpmpp2m/rf/20,"
           "dpmpp2m/karras/20,ipndm/rf/20,ipndm/karras/20")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-rf")
    ap.add_argument("--settings", default=DEFAULT, help="sampler/schedule/steps, comma-separated.")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--ref-tol", type=float, default=1e-5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    model = load_model(args.model, device=args.device)
    shape, seeds = sample_shape(model), range(args.num)
    t = time.perf_counter()
    ref = generate(model, shape, sampler="rk45", seeds=seeds, device=args.device, rtol=args.ref_tol, atol=args.ref_tol)
    print(f"{args.model}: reference rk45 rtol = atol = {args.ref_tol:g}, NFE {ref.nfe}, {time.perf_counter() - t:.0f} s;"
          f" N = {args.num}, {args.device}")
    print("| sampler | schedule | steps | NFE | RMS to reference | max |")
    print("|---|---|---|---|---|---|")
    for item in args.settings.split(","):
        sampler, schedule, steps = item.strip().split("/")
        out = generate(model, shape, sampler=sampler, schedule=schedule, steps=int(steps), seeds=seeds,
                       device=args.device)
        diff = out.images - ref.images
        print(f"| {sampler} | {schedule} | {steps} | {out.nfe} | {float(diff.pow(2).mean().sqrt()):.4f} | "
              f"{float(diff.abs().max()):.3f} |", flush=True)


if __name__ == "__main__":
    main()
