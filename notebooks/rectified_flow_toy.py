"""Rectified flow on a 2-D toy: 1-RF vs 2-RF trajectories, straightness, one-step samples, distillation.

A plain script standing in for a notebook (run top to bottom; the tests run it with small sizes):

    python notebooks/rectified_flow_toy.py --out runs/toy --toy mix2
    python notebooks/rectified_flow_toy.py --out runs/toy --toy gauss6-moons --train-steps 2000

It trains a 1-rectified flow on independent (source, target) pairs, makes reflow pairs from its ODE,
fine-tunes the 2-rectified flow on them, distills the 2-RF into a one-step generator, prints a table
(straightness S with its Monte-Carlo error; sliced Wasserstein-2 and MMD² of 1-step and 100-step Euler
samples to the target, with the data floor) and writes ``trajectories.png`` and ``one_step.png``.
Time runs t = 1 (source) → t = 0 (target) as everywhere in diffsamp.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from diffsamp.samplers import get_schedule  # noqa: E402
from diffsamp.models.base import prior_scale  # noqa: E402
from diffsamp.samplers import get_sampler  # noqa: E402
from diffsamp.data.toys import TOYS  # noqa: E402
from diffsamp.training.toy_recipe import rectify_toy  # noqa: E402


def trajectories(model, z: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """(steps + 1, N, 2) Euler path points x_t in RF coordinates (x_t = x̄/(1 + σ))."""
    grid = get_schedule("rf").grid(steps)
    pts = [z.clone()]

    def keep(info):
        pts.append(info.x / (1 + info.sigma_next))

    with torch.inference_mode():
        get_sampler("euler")(model, z * prior_scale("rf", float(grid.sigmas[0])), grid, callback=keep)
    return torch.stack(pts)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--toy", default="mix2", choices=sorted(TOYS))
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--reflow-steps", type=int, default=1500)
    ap.add_argument("--distill-steps", type=int, default=800)
    ap.add_argument("--num-pairs", type=int, default=10000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--num-eval", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    start = time.perf_counter()
    run = rectify_toy(args.toy, out / "work", train_steps=args.train_steps, reflow_steps=args.reflow_steps,
                      distill_steps=args.distill_steps, num_pairs=args.num_pairs, hidden=args.hidden,
                      num_eval=args.num_eval, seed=args.seed)
    total = time.perf_counter() - start

    # --- the table -------------------------------------------------------------------------------------
    print(f"toy {args.toy}: {TOYS[args.toy].description}; {total:.0f} s in all on {torch.get_num_threads()} CPU thread(s)")
    print(f"{'model':<14} {'straightness S':>18} {'SW2 1-step':>11} {'MMD² 1-step':>12} {'SW2 100-step':>13} {'MMD² 100-step':>14}")
    for label in ("1-RF", "2-RF", "2-RF+distill"):
        m = run.metrics[label]
        print(f"{label:<14} {m['straightness']:>10.4f} ± {m['straightness_err']:<6.4f}"
              f" {m['sw_1step']:>11.3f} {m['mmd_1step']:>12.4f} {m['sw_100step']:>13.3f} {m['mmd_100step']:>14.4f}")
    floor = run.metrics["data floor"]
    print(f"{'data floor':<14} {'':>18} {floor['sw']:>11.3f} {floor['mmd']:>12.4f}")
    print("training seconds:", {k: round(v, 1) for k, v in run.seconds.items()})

    # --- trajectories: 1-RF vs 2-RF ---------------------------------------------------------------------
    z = run.source[:80]
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    for ax, label in zip(axes, ("1-RF", "2-RF")):
        path = trajectories(run.models[label], z)
        ax.scatter(run.target[:1000, 0], run.target[:1000, 1], s=2, c="tab:orange", alpha=0.25, label="target (t=0)")
        ax.scatter(run.source[:1000, 0], run.source[:1000, 1], s=2, c="tab:blue", alpha=0.25, label="source (t=1)")
        for i in range(z.shape[0]):
            ax.plot(path[:, i, 0], path[:, i, 1], lw=0.6, c="k", alpha=0.6)
        s = run.metrics[label]
        ax.set_title(f"{label}: S = {s['straightness']:.3g} ± {s['straightness_err']:.1g}")
        ax.legend(loc="lower right", markerscale=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "trajectories.png", dpi=110)
    plt.close(fig)

    # --- one-step samples -------------------------------------------------------------------------------
    from diffsamp.training.pairs import integrate

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), sharex=True, sharey=True)
    for ax, label in zip(axes, ("1-RF", "2-RF", "2-RF+distill")):
        x, _ = integrate(run.models[label], run.source, sampler="euler", schedule="rf", steps=1)
        ax.scatter(run.target[:, 0], run.target[:, 1], s=2, c="tab:orange", alpha=0.3, label="target")
        ax.scatter(x[:, 0], x[:, 1], s=2, c="k", alpha=0.4, label="one-step samples")
        m = run.metrics[label]
        ax.set_title(f"{label}, 1 Euler step: SW2 {m['sw_1step']:.2f}, MMD² {m['mmd_1step']:.3f}")
        ax.legend(loc="lower right", markerscale=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "one_step.png", dpi=110)
    plt.close(fig)

    result = {"toy": args.toy, "metrics": run.metrics, "seconds": run.seconds, "total_seconds": total}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'trajectories.png'}, {out / 'one_step.png'}, {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
