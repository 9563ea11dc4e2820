"""How each step's r moves while an AMED predictor trains: per iteration, per step, mean r (min–max) and loss.

The run is ``train amed`` itself (``train_amed(..., observe=...)``: r as the predictor gives it at that
interval, before that interval's optimizer step). Read with ``amed_r_gradient.py --step K``, which gives the
same step's teacher-forced loss at fixed r: where its optimum is, and the sign of the gradient around it.

    python experiments/amed_step_dynamics.py --model mnist-ddpm --nfe 3 --trajectories 1536
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict

import torch
from torch import Tensor

from diffsamp.models import load, sample_shape
from diffsamp.training import AmedTrainOptions, train_amed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--sampler", default="amed")
    ap.add_argument("--nfe", type=int, default=3)
    ap.add_argument("--schedule", default="time_uniform")
    ap.add_argument("--trajectories", type=int, default=1536)
    ap.add_argument("--static", action="store_true")
    ap.add_argument("--beta1", type=float, default=None, help="Adam's β1 (default: train amed's)")
    ap.add_argument("--no-first-step-static", action="store_true", help="the AFS step through the shared network")
    ap.add_argument("--out", default=None, help="keep the trained predictor in this run directory")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load(args.model)
    opts = AmedTrainOptions(sampler=args.sampler, nfe=args.nfe, schedule=args.schedule, teacher="dpm2",
                            teacher_m=3, static=args.static, trajectories=args.trajectories, beta1=args.beta1,
                            first_step_static=not args.no_first_step_static)
    rows: dict[int, dict[int, str]] = defaultdict(dict)

    def observe(it: int, step: int, r: Tensor, loss: float) -> None:
        rows[it][step] = f"{float(r.mean()):.3f} ({float(r.min()):.3f}–{float(r.max()):.3f}) | {loss:.1f}"

    with tempfile.TemporaryDirectory() as tmp:
        path = train_amed(model, sample_shape(model), opts, args.out or tmp, model_name=args.model,
                          observe=observe, extra={"clip": None})  # as `train amed` records its default clipping
        seconds = json.loads(path.read_text())["training"]["wall_seconds"]
    steps = max(len(v) for v in rows.values())
    kind = "static" if args.static else "per-sample"
    res = opts.resolved()
    print(f"# {args.model}, {args.sampler} {kind}, NFE {args.nfe}, {args.schedule}, teacher dpm2 M = 3, "
          f"batch {opts.batch}, lr {res.lr}, Adam β1 {res.beta1}, first step static {res.first_step_static}, "
          f"{args.trajectories} trajectories ({seconds:.0f} s)")
    print("| iteration | " + " | ".join(f"step {k}: r mean (min–max) | loss" for k in range(steps)) + " |")
    print("|---" * (1 + 2 * steps) + "|")
    for it in sorted(rows):
        print(f"| {it} | " + " | ".join(rows[it].get(k, "— | —") for k in range(steps)) + " |")


if __name__ == "__main__":
    main()
