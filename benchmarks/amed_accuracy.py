"""Solver accuracy at few NFE: RMS distance of each bench cell's end point to a converged ODE solution.

Each sampler runs on the grid ``diffsamp bench`` gives it (same planner: AFS for odd-NFE two-stage methods,
predictors' own grids for learned samplers); the reference is dpm2 on 200 karras steps from σ_max to σ_min
(checked against heun on 120 steps: the printed 'reference error'). Cheap (a few dozen images), so it runs
where FID at N = 2000 is too slow; FID is the quality measure, this is the accuracy one.

    python benchmarks/amed_accuracy.py --model mnist-ddpm --nfe 3,5,7,9 --num 32 \
        --samplers ddim,heun,dpm2,dpmpp3m,ipndm,amed,ipndm+amed --predictor amed:5=runs/amed5
"""

from __future__ import annotations

import argparse

import torch

import diffsamp
from diffsamp.metrics.bench import plan_cell
from diffsamp.models.base import prior_scale
from diffsamp.models.zoo import load, sample_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--samplers", default="ddim,heun,dpm2,dpmpp3m,ipndm,amed,ipndm+amed")
    ap.add_argument("--nfe", default="3,5,7,9")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--predictor", action="append", default=[], help="[SAMPLER:]NFE=PATH")
    ap.add_argument("--schedule", action="append", default=[], help="SAMPLER=SCHEDULE (as diffsamp bench)")
    ap.add_argument("--knob", action="append", default=[], help="ROW:NAME=VALUE (as diffsamp bench)")
    ap.add_argument("--no-clip", action="store_true", help="x̂0 not clipped (default: the model's scheduler config)")
    args = ap.parse_args()
    model = load(args.model, clip=False if args.no_clip else None)
    shape = sample_shape(model)
    preds = dict(p.split("=", 1) for p in args.predictor)
    schedules = dict(p.split("=", 1) for p in args.schedule)
    knobs: dict[str, dict[str, str]] = {}
    for item in args.knob:
        key, _, val = item.partition("=")
        row, _, name = key.rpartition(":")
        knobs.setdefault(row, {})[name] = val
    sched = diffsamp.get_schedule("karras", model=model)
    s0 = float(sched.grid(1, final_zero=False).sigmas[0])
    z = torch.randn((args.num, *shape), generator=torch.Generator().manual_seed(10_000)) * prior_scale(model.prior, s0)
    with torch.inference_mode():
        ref = diffsamp.get_sampler("dpm2")(model, z, sched.grid(200, final_zero=False))
        check = diffsamp.get_sampler("heun")(model, z, sched.grid(120, final_zero=False))
        print(f"# {args.model}, {args.num} images, x̂0 clipping {'off' if args.no_clip else 'as configured'}; "
              f"reference error (dpm2 200 vs heun 120 steps): RMS {(ref - check).pow(2).mean().sqrt():.4f}")
        nfes = [int(v) for v in args.nfe.split(",")]
        print("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " | setting |")
        print("|---|" + "---|" * len(nfes) + "---|")
        for name in args.samplers.split(","):
            row, setting = [], ""
            for n in nfes:
                try:
                    plan = plan_cell(model, args.model, name, n, predictors=preds, schedules=schedules, knobs=knobs)
                except ValueError as exc:
                    row.append("—")
                    setting = setting or str(exc)[:40]
                    continue
                counter = diffsamp.CountingDenoiser(model)
                out = diffsamp.get_sampler(plan.method)(counter, z, plan.grid, **plan.knobs)
                assert counter.calls == n, (name, n, counter.calls)
                row.append(f"{(out - ref).pow(2).mean().sqrt():.4f}")
                setting = plan.setting
            print(f"| {name} | " + " | ".join(row) + f" | {setting} |")


if __name__ == "__main__":
    main()
