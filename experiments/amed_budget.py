"""FID of one AMED predictor against its training budget: the snapshots a `diffsamp train amed --snapshots` run
kept, then the finished predictor, each scored as a cell of an existing `diffsamp bench` directory (same model,
reference, N, seeds and cache, so the finished predictor's cell is the bench's own when it is the shipped one).

    python experiments/amed_budget.py --bench benchmarks/results/bench_mnist-ddpm --run runs/mnist-ddpm-amed-nfe5 \
        --final mnist-ddpm/amed-nfe5 --sampler amed --nfe 5 --inception $DIFFSAMP_INCEPTION --data-dir $DIFFSAMP_DATA

Writes ``budget_<sampler>-nfe<N>.md`` and ``fid_vs_trajectories_<sampler>-nfe<N>.png`` into the bench directory.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from diffsamp import load_predictor
from diffsamp.metrics import cache_parts, load_extractor, plan_cell, resolve_reference, run_cell
from diffsamp.models import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", required=True, help="a diffsamp bench directory (its config.json gives model, ref, N)")
    ap.add_argument("--run", required=True, help="the training run directory (its snapshots/ are scored)")
    ap.add_argument("--final", required=True, help="the finished predictor: shipped name or path")
    ap.add_argument("--sampler", default="amed")
    ap.add_argument("--nfe", type=int, default=5)
    ap.add_argument("--inception", default=None)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    bench_dir = Path(args.bench)
    cfg = json.loads((bench_dir / "config.json").read_text())
    model_name, num, reference = cfg["model"], cfg["num"], cfg["reference"]
    model = load(model_name)
    extractor = load_extractor(args.inception, "cpu")
    shape = tuple(model.sample_shape)
    ref = resolve_reference(reference, num=num, image_size=shape[-1], extractor=extractor, data_dir=args.data_dir,
                            progress=False)
    parts = cache_parts(model_name, reference, cfg["clip"], shape)

    snaps = Path(args.run, "snapshots").glob("trajectories-*.json")  # written by train_amed(snapshots=...)
    points = sorted((int(p.stem.removeprefix("trajectories-")), str(p)) for p in snaps)
    final = load_predictor(args.final).config.get("training", {})
    points.append((int(final.get("trajectories_done") or final["trajectories"]), args.final))
    key = f"{args.sampler}:{args.nfe}"
    rows = []
    for traj, path in points:
        plan = plan_cell(model, model_name, args.sampler, args.nfe, predictors={key: path})
        cell = run_cell(model, plan, reference=ref, extractor=extractor, num=num, batch_size=250, clip=cfg["clip"],
                        cache_dir=bench_dir / "cells", cache_parts=parts)
        print(f"{traj:>6} trajectories: FID {cell.fid:.2f} (KID×10³ {1e3 * cell.kid:.1f})", flush=True)
        rows.append((traj, cell.fid, cell.kid, path))
    name = f"{args.sampler.replace('+', '-')}-nfe{args.nfe}"
    lines = [f"{model_name}, {args.sampler} at {args.nfe} NFE: FID (KID×10³) of N = {num} samples vs {reference} "
             f"against the training budget (`{args.run}`)\n", "| trajectories | FID | KID×10³ | predictor |",
             "|---|---|---|---|"]
    lines += [f"| {t} | {f:.2f} | {1e3 * k:.1f} | {p} |" for t, f, k, p in rows]
    (bench_dir / f"budget_{name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training trajectories")
    ax.set_ylabel("FID")
    ax.set_title(f"{model_name}, {args.sampler} {args.nfe} NFE, N = {num}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = bench_dir / f"fid_vs_trajectories_{name}.png"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
