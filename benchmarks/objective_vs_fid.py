"""Does a training objective order samplers as FID does? For each deterministic row of a bench table at one NFE, the
row's sampler is re-run on its own grid from held-out seeds, and its final samples are compared with a converged
ODE teacher's from the same noise: squared L2, and the LPIPS-style distance in the MNIST classifier's activations
(``diffsamp.metrics.classifier.perceptual_distance``; never the FID network's); and, a distribution-level measure,
the Fréchet distance in the classifier's 64-d fc1 features between ``--num-fd`` samples and as many test images.
Prints each row's FID (from its cell) beside the three, and each one's Spearman rank correlation with FID.

    python benchmarks/objective_vs_fid.py --bench benchmarks/results/bench_mnist-ddpm_n2000_samplers --nfe 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

import diffsamp
from diffsamp.data.datasets import load_dataset_uint8
from diffsamp.metrics.classifier import embed, load_classifier, perceptual_distance
from diffsamp.metrics.distances import frechet_distance
from diffsamp.models import load
from diffsamp.samplers import Grid, get_sampler
from diffsamp.samplers.amed_files import load_predictor


def _stats(classifier: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the classifier's fc1 features (float64)."""
    feats = embed(classifier, images).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, required=True, help="A bench directory (its cells/ are read).")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--num", type=int, default=64, help="Held-out samples per row.")
    parser.add_argument("--seed", type=int, default=100_000, help="First held-out seed (bench cells use 0…N−1).")
    parser.add_argument("--num-fd", type=int, default=500, help="Samples per row for the classifier-feature FD.")
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="Also write the table here.")
    args = parser.parse_args()
    config = json.loads((args.bench / "config.json").read_text())
    model = load(config["model"])
    cells = [json.loads(p.read_text()) for p in sorted((args.bench / "cells").glob(f"*-nfe{args.nfe}-*.json"))]
    rows = [c for c in cells if diffsamp.get_sampler(c["sampler"].split(":")[0]).kind == "ode"]
    if len(rows) < 3:
        sys.exit(f"fewer than 3 deterministic rows at NFE {args.nfe} in {args.bench}/cells")
    shape = tuple(model.sample_shape)
    seeds = range(args.seed, args.seed + args.num)
    n = max(args.num, args.num_fd)
    teacher = diffsamp.generate(model, shape, sampler="heun", schedule="time_uniform", steps=args.teacher_steps,
                                seeds=seeds, batch_size=args.num).images
    classifier = load_classifier()
    data = load_dataset_uint8("mnist", "test")[: args.num_fd]
    with torch.no_grad():
        data_mu, data_cov = _stats(classifier, data)
    table = []
    for cell in rows:
        name = cell["sampler"].split(":")[0]
        knobs = {}
        for item in filter(None, (cell.get("extra") or {}).get("knobs", "").split(",")):
            key, value = item.strip().split("=")
            knobs[key] = get_sampler(name).parse_knob(key, value)
        if cell.get("predictor"):
            if not Path(cell["predictor"]).exists():
                print(f"skipped {cell['sampler']}: its predictor {cell['predictor']} is not here", file=sys.stderr)
                continue
            knobs["predictor"] = load_predictor(cell["predictor"])
        grid = Grid(torch.tensor(cell["grid"], dtype=torch.float64))
        images = diffsamp.generate(model, shape, sampler=name, grid=grid, seeds=range(args.seed, args.seed + n),
                                   batch_size=250, **knobs).images
        with torch.no_grad():
            l2 = float((images[: args.num] - teacher).pow(2).sum((1, 2, 3)).mean())
            feat = float(perceptual_distance(classifier, images[: args.num], teacher).mean())
            fd = frechet_distance(*_stats(classifier, images), data_mu, data_cov)
        table.append((cell["sampler"], cell["fid"], l2, feat, fd))
    fid = [r[1] for r in table]
    lines = [f"{config['model']}, NFE {args.nfe}: final samples of {args.num} held-out seeds ({args.seed}…) against "
             f"heun on {args.teacher_steps} time_uniform steps; FID from the bench cells (N = {rows[0]['num']})", "",
             "| row | FID | L2 to teacher | classifier-feature distance to teacher | classifier-feature FD to data |",
             "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.4f} | {r[4]:.3f} |" for r in sorted(table, key=lambda r: r[1])]
    lines += ["", f"Spearman ρ with FID: L2 {spearmanr(fid, [r[2] for r in table])[0]:.2f}, "
                  f"classifier-feature distance {spearmanr(fid, [r[3] for r in table])[0]:.2f}, classifier-feature FD "
                  f"{spearmanr(fid, [r[4] for r in table])[0]:.2f} ({len(table)} rows; FD on {args.num_fd} samples)"]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
