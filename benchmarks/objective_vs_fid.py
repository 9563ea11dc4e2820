"""Does a training objective order samplers as FID does? For each deterministic row of a bench table at one NFE, the
row's sampler is re-run on its own grid from held-out seeds, and its final samples are compared with a converged
ODE teacher's from the same noise: squared L2, and the LPIPS-style distance in the MNIST classifier's activations
(``diffsamp.metrics.classifier.perceptual_distance``; never the FID network's); and, a distribution-level measure,
the Fréchet distance in the classifier's 64-d fc1 features between ``--num-fd`` samples and as many test images;
and low-level statistics of the same samples against those images, quantised to uint8 as FID sees them: the
1-D Wasserstein distance between pixel-value distributions, the fraction of pure-black pixels (the background) and
the mean |Laplacian| (high-frequency energy), each as |sample − data|; and a classifier two-sample test (Lopez-Paz &
Oquab, ICLR 2017): the held-out accuracy of a small CNN critic trained to tell the row's samples from the test images
(0.5: indistinguishable; mean of 3 random 80/20 splits). Prints each row's FID (from its cell)
beside every measure, and each measure's Spearman rank correlation with FID. ``--cache DIR`` keeps the samples.

    python benchmarks/objective_vs_fid.py --bench benchmarks/results/bench_mnist-ddpm_n2000_samplers --nfe 5
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr, wasserstein_distance

import diffsamp
from diffsamp.data.datasets import load_dataset_uint8
from diffsamp.metrics.classifier import embed, load_classifier, perceptual_distance
from diffsamp.images import to_uint8
from diffsamp.metrics.distances import frechet_distance
from diffsamp.models import load
from diffsamp.samplers import Grid, get_sampler
from diffsamp.samplers.amed_files import load_predictor


def _stats(classifier: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the classifier's fc1 features (float64)."""
    feats = embed(classifier, images).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def _cached(cache: Path | None, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, kept in ``cache/key.pt`` when a cache is given."""
    path = cache / f"{key}.pt" if cache is not None else None
    if path is not None and path.is_file():
        return torch.load(path)
    out = make()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
    return out


def _low_level(images: torch.Tensor) -> dict[str, Any]:
    """uint8 images' pixel values (a subsample), fraction of pure-black pixels and mean |Laplacian|."""
    x = images.float()
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:])
    return {"pixels": x.flatten()[:: 7].numpy(), "black": float((images == 0).float().mean()),
            "laplacian": float(lap.abs().mean())}


def _critic_accuracy(fake: torch.Tensor, real: torch.Tensor, splits: int = 3, epochs: int = 15) -> float:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): held-out accuracy of a 3-layer CNN trained to separate
    uint8 ``fake`` from ``real`` (equal counts), averaged over ``splits`` random 80/20 splits (seeds 0, 1, …)."""
    from torch import nn
    from torch.nn import functional as F

    n = min(len(fake), len(real))
    x = torch.cat([real[:n], fake[:n]]).float() / 127.5 - 1
    y = torch.cat([torch.ones(n), torch.zeros(n)])
    accs = []
    for seed in range(splits):
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(2 * n, generator=g)
        cut = int(0.8 * 2 * n)
        train, test = perm[:cut], perm[cut:]
        torch.manual_seed(seed)
        critic = nn.Sequential(nn.Conv2d(x.shape[1], 16, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(16, 32, 3, 2, 1),
                               nn.LeakyReLU(0.2), nn.Conv2d(32, 64, 3, 2, 1), nn.LeakyReLU(0.2),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))
        opt = torch.optim.Adam(critic.parameters(), 1e-3)
        for _ in range(epochs):
            order = train[torch.randperm(len(train), generator=g)]
            for b in range(0, len(order), 64):
                i = order[b : b + 64]
                loss = F.binary_cross_entropy_with_logits(critic(x[i]).squeeze(1), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            accs.append(float(((critic(x[test]).squeeze(1) > 0).float() == y[test]).float().mean()))
    return sum(accs) / len(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", type=Path, required=True, help="A bench directory (its cells/ are read).")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--num", type=int, default=64, help="Held-out samples per row.")
    parser.add_argument("--seed", type=int, default=100_000, help="First held-out seed (bench cells use 0…N−1).")
    parser.add_argument("--num-fd", type=int, default=500, help="Samples per row for the classifier-feature FD.")
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="Also write the table here.")
    parser.add_argument("--cache", type=Path, default=None, help="Keep each row's samples (and the teacher's) here.")
    parser.add_argument("--grid", type=Path, default=None,
                        help="Also write a PNG: 12 samples per row (same seeds), rows by FID, the teacher's last.")
    args = parser.parse_args()
    config = json.loads((args.bench / "config.json").read_text())
    model = load(config["model"])
    cells = [{**json.loads(p.read_text()), "_file": p.name}
             for p in sorted((args.bench / "cells").glob(f"*-nfe{args.nfe}-*.json"))]
    rows = [c for c in cells if diffsamp.get_sampler(c["sampler"].split(":")[0]).kind == "ode"]
    if len(rows) < 3:
        sys.exit(f"fewer than 3 deterministic rows at NFE {args.nfe} in {args.bench}/cells")
    shape = tuple(model.sample_shape)
    seeds = range(args.seed, args.seed + args.num)
    n = max(args.num, args.num_fd)
    teacher = _cached(args.cache, f"teacher-heun{args.teacher_steps}-{args.seed}-{args.num}", lambda: diffsamp.generate(
        model, shape, sampler="heun", schedule="time_uniform", steps=args.teacher_steps, seeds=seeds,
        batch_size=args.num).images)
    classifier = load_classifier()
    data = load_dataset_uint8("mnist", "test")[: args.num_fd]
    with torch.no_grad():
        data_mu, data_cov = _stats(classifier, data)
    data_low = _low_level(data)
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
        key = f"{Path(cell.get('_file', cell['sampler'])).stem}-{args.seed}-{n}"
        images = _cached(args.cache, key, lambda: diffsamp.generate(
            model, shape, sampler=name, grid=grid, seeds=range(args.seed, args.seed + n), batch_size=250,
            **knobs).images)
        critic = _critic_accuracy(to_uint8(images), data)
        with torch.no_grad():
            low = _low_level(to_uint8(images))
            measures = {
                "L2 to teacher": float((images[: args.num] - teacher).pow(2).sum((1, 2, 3)).mean()),
                "classifier-feature distance to teacher": float(
                    perceptual_distance(classifier, images[: args.num], teacher).mean()),
                "classifier-feature FD to data": frechet_distance(*_stats(classifier, images), data_mu, data_cov),
                "pixel-value W1 to data": float(wasserstein_distance(low["pixels"], data_low["pixels"])),
                "black-pixel fraction gap": abs(low["black"] - data_low["black"]),
                "|Laplacian| gap": abs(low["laplacian"] - data_low["laplacian"]),
                "critic accuracy (two-sample test)": critic,
            }
        table.append((cell["sampler"], cell["fid"], measures, images[:12]))
    fid = [r[1] for r in table]
    names = list(table[0][2])
    lines = [f"{config['model']}, NFE {args.nfe}: final samples of {args.num} held-out seeds ({args.seed}…) against "
             f"heun on {args.teacher_steps} time_uniform steps, and {n} against as many test images; FID from the "
             f"bench cells (N = {rows[0]['num']})", "",
             "| row | FID | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | " + " | ".join(f"{r[2][k]:.4g}" for k in names) + " |"
              for r in sorted(table, key=lambda r: r[1])]
    lines += ["", "Spearman ρ with FID (" + f"{len(table)} rows): " + ", ".join(
        f"{k} {spearmanr(fid, [r[2][k] for r in table])[0]:.2f}" for k in names)]
    if args.grid:
        ordered = sorted(table, key=lambda r: r[1])
        diffsamp.save_images(torch.cat([r[3] for r in ordered] + [teacher[:12]]), args.grid, nrow=12)
        lines += ["", f"{args.grid.name}: rows top to bottom " + ", ".join(f"{r[0]} ({r[1]:.1f})" for r in ordered)
                  + ", the teacher"]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
