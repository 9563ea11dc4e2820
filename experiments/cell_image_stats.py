"""What the images of a few-step bench cell look like, beside their distance to the converged ODE.

FID and the RMS error to the converged probability-flow ODE can disagree: a sampler nearer the ODE's end point
in L2 can score a worse FID when its error is of a kind the Inception features weigh heavily (here: dimmer,
speckled strokes). For each row (planned exactly as `diffsamp bench` plans its cell: grid, AFS, shipped
predictor) this samples the same seeds and prints, against the bench's reference row (heun, 18 steps to 0 =
35 NFE, EDM), the RMS to it, the mean |x + 1| on its background (pixels < −0.9 there), the mean value on its
strokes, the pixel std and the vertical-gradient energy E[(x[i+1, j] − x[i, j])²] (sharpness). It writes the
reference's and the rows' image grids side by side (one PNG, left to right: the reference, then the rows as listed).

    python experiments/cell_image_stats.py --model mnist-ddpm --nfe 7 --rows dpm2,amed,amed:tu,ddim --out stats7.png
"""

from __future__ import annotations

import argparse

import torch

import diffsamp
from diffsamp.metrics import plan_cell, reference_plan
from diffsamp.models import load, sample_shape


def tile(x: torch.Tensor, ncol: int = 8, pad: int = 2) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] as one uint8 (C, H', W') grid, ``ncol`` per row, black padding."""
    u = diffsamp.to_uint8(x)
    n, c, h, w = u.shape
    rows = -(-n // ncol)
    out = torch.zeros((c, rows * (h + pad) + pad, ncol * (w + pad) + pad), dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        out[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = u[i]
    return out


def image_stats(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """The statistics of the module doc for images ``x`` against reference images ``ref`` (same seeds)."""
    bg = ref < -0.9
    return {
        "rms": float((x - ref).pow(2).mean().sqrt()),
        "background |x+1|": float((x[bg] + 1).abs().mean()),
        "stroke mean": float(x[~bg].mean()),
        "std": float(x.std()),
        "gradient energy": float((x[..., 1:, :] - x[..., :-1, :]).pow(2).mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--nfe", type=int, default=7)
    ap.add_argument("--rows", default="dpm2,amed,ddim", help="bench rows, e.g. dpm2,amed,amed:tu,ddim")
    ap.add_argument("--schedule", action="append", default=[], help="ROW=SCHEDULE, as `diffsamp bench --schedule`")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--out", default=None, help="PNG of the reference's and the rows' grids side by side")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load(args.model)
    shape = sample_shape(model)
    seeds = list(range(args.num))
    bad = [s for s in args.schedule if "=" not in s]
    if bad:
        ap.error(f"--schedule takes ROW=SCHEDULE, got {bad[0]!r}")
    schedules = dict(s.split("=", 1) for s in args.schedule)
    rp = reference_plan(model)
    ref = diffsamp.generate(model, shape, sampler=rp.method, grid=rp.grid, seeds=seeds, **rp.knobs).images
    stats_ref = image_stats(ref, ref)
    print(f"# {args.model}, {args.num} images (seeds 0–{args.num - 1}), NFE {args.nfe}; "
          f"reference: {rp.method}, {rp.setting}")
    print("| row | setting | " + " | ".join(stats_ref) + " |")
    print("|---|---|" + "---|" * len(stats_ref))
    values = " | ".join(f"{v:.4f}" for v in stats_ref.values())
    print(f"| reference ({rp.method} {rp.nfe} NFE) | {rp.setting} | {values} |")
    grids = [ref]
    for row in args.rows.split(","):
        plan = plan_cell(model, args.model, row, args.nfe, schedules=schedules)
        x = diffsamp.generate(model, shape, sampler=plan.method, grid=plan.grid, seeds=seeds, **plan.knobs).images
        print(f"| {row} | {plan.setting} | " + " | ".join(f"{v:.4f}" for v in image_stats(x, ref).values()) + " |")
        grids.append(x)
    if args.out:
        tiles = [tile(x, 8) for x in grids]
        gap = torch.full((tiles[0].shape[0], tiles[0].shape[1], 8), 255, dtype=torch.uint8)
        sheet = torch.cat([t if i == 0 else torch.cat([gap, t], dim=2) for i, t in enumerate(tiles)], dim=2)
        diffsamp.save_images(sheet, args.out, text={"rows": args.rows, "nfe": str(args.nfe), "model": args.model,
                                           "seeds": f"0-{args.num - 1}"})
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
