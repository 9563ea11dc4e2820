"""Rectified flows on MNIST, as the RF paper's Table 1(a): FID / KID at 1, 2, 4, 8 Euler steps and adaptive RK45.

For each model (zoo names or run directories) and each setting: N samples (seeds 0…N−1) scored in memory
against test[:N], next to the data floor train[:N] vs test[:N] at the same N; and the model's straightness
S (``diffsamp rf straightness``: 100 Euler steps, ``--straightness-num`` paths) with its Monte-Carlo error.
Rectified flows run on the ``rf`` schedule (uniform t), other models (e.g. ``mnist-ddpm`` through its
probability-flow ODE) on ``karras``. RK45 integrates a whole batch as one ODE (scipy, rtol = atol =
``--rk45-tol``) and integrates t_max → t_min = 1e-3; its NFE is the largest over batches.

    python benchmarks/rf_fid.py --models mnist-rf,mnist-2rf,mnist-2rf-distill,mnist-ddpm-reflow --num 2000
    python benchmarks/rf_fid.py --models runs/rf1 --settings euler:1,euler:4 --num 500 --json rf1.json

With ``--json`` every finished cell (and straightness, and the floor) is stored at once, keyed by the model's
name, a hash of its weights, N and the setting; a rerun prints the table from the stored cells and computes
only the missing ones, so an interrupted table loses at most the cell in flight. ``--cached-only`` prints the
table from the stored cells alone (missing ones as —), e.g. after merging the per-model files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from diffsamp.io import write_text
from diffsamp.metrics.scoring import data_floor, score_model
from diffsamp.metrics.fid import load_extractor
from diffsamp.models.base import default_schedule
from diffsamp.metrics.straightness import straightness
from diffsamp.models import load as load_model
from diffsamp.models.zoo import model_path
from diffsamp.models.zoo import WEIGHTS_DIR, available_models, model_dataset, sample_shape


def parse_settings(text: str) -> list[tuple[str, int]]:
    """``euler:1,euler:4,rk45`` → [("euler", 1), ("euler", 4), ("rk45", 1)]."""
    out = []
    for item in text.split(","):
        sampler, _, steps = item.strip().partition(":")
        out.append((sampler, int(steps) if steps else 1))
    return out


def fingerprint(model) -> str:
    """A short hash of the network's weights: a cached cell is reused only for the very same weights."""
    h = hashlib.sha256()
    for key, value in sorted(model.network.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def floor_numbers(floor) -> dict:
    """The stored part of a data floor (``data_floor``'s result): FID, KID and KID's standard error."""
    return {"fid": floor.fid, "kid": floor.kid, "kid_std": floor.kid_std}


class Cache:
    """Finished cells kept in a JSON file, rewritten atomically after each one: an interrupted table resumes."""

    def __init__(self, path: str | None, fresh: bool) -> None:
        self.path = Path(path) if path else None
        self.data: dict = {"cells": {}}
        if self.path and self.path.is_file() and not fresh:
            self.data = json.loads(self.path.read_text())
            self.data.setdefault("cells", {})

    def get(self, key: str):
        return self.data["cells"].get(key)

    def put(self, key: str, value) -> None:
        self.data["cells"][key] = value
        if self.path:
            write_text(self.path, json.dumps(self.data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist-rf,mnist-2rf,mnist-2rf-distill")
    ap.add_argument("--settings", default="euler:1,euler:2,euler:4,euler:8,rk45")
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--dataset", default=None, help="Reference data set (default: the model's own).")
    ap.add_argument("--rk45-tol", type=float, default=1e-5)
    ap.add_argument("--straightness-num", type=int, default=1000, help="Paths for S (0: skip).")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--inception", default=None)
    ap.add_argument("--json", default=None,
                    help="Cell cache and results (JSON): finished cells are stored as they come and reused by a "
                         "later run with the same weights, N and settings.")
    ap.add_argument("--fresh", action="store_true", help="Ignore the cells already in --json.")
    ap.add_argument("--write-cards", action="store_true",
                    help="Store each shipped model's row (cells, floor, straightness) in its card (diffsamp/weights/NAME.json).")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--cached-only", action="store_true",
                    help="Print the table from the cells already in --json; compute nothing (missing cells: —).")
    args = ap.parse_args()
    if args.cached_only and not args.json:
        ap.error("--cached-only needs --json")

    ext = load_extractor(args.inception, args.device)
    device = ext.device
    settings = parse_settings(args.settings)
    cache = Cache(args.json, args.fresh)
    rows, floors, sizes = [], {}, {}
    for name in args.models.split(","):
        model = load_model(name, device=device)
        shape = sample_shape(model)
        weights = fingerprint(model)
        dataset = args.dataset or model_dataset(name, model)
        if dataset is None:
            raise SystemExit(f"{name}: its data set is not recorded; pass --dataset")
        schedule = default_schedule(model)
        row = {"model": name, "weights": weights, "dataset": dataset, "schedule": schedule, "cells": []}
        sizes[dataset] = shape[-1]
        for sampler, steps in settings:
            tol = f" tol={args.rk45_tol:g}" if sampler == "rk45" else ""
            key = f"{name} {weights} {dataset} {schedule} {sampler}:{steps} N={args.num}{tol}"
            cell = cache.get(key)
            if cell is None and args.cached_only:
                cell = {"sampler": sampler, "steps": steps, "missing": True}
            elif cell is None:
                if dataset not in floors:
                    floors[dataset] = data_floor(dataset, num=args.num, image_size=shape[-1], extractor=ext,
                                                 data_dir=args.data_dir, progress=args.progress)
                    cache.put(f"floor {dataset} N={args.num}", floor_numbers(floors[dataset]))
                knobs = {"rtol": args.rk45_tol, "atol": args.rk45_tol} if sampler == "rk45" else {}
                q = score_model(model, floors[dataset].test, num=args.num, sampler=sampler, schedule=schedule,
                                steps=steps, batch_size=args.batch_size, device=device, extractor=ext,
                                progress=args.progress, **knobs)
                cell = {"sampler": sampler, "steps": steps, "nfe": q.nfe, "fid": q.fid, "kid": q.kid,
                        "kid_std": q.kid_std, "sampling_s": q.sampling_seconds, "date": time.strftime("%Y-%m-%d")}
                cache.put(key, cell)
                print(f"{name} {sampler}:{steps} NFE {q.nfe} FID {q.fid:.2f} KID {q.kid * 1e3:.2f}e-3 "
                      f"({q.sampling_seconds:.0f} s sampling)", flush=True)
            row["cells"].append(cell)
        if args.straightness_num:
            key = f"{name} {weights} straightness num={args.straightness_num}"
            st = cache.get(key)
            if st is None and not args.cached_only:
                t = time.perf_counter()
                z = torch.randn((args.straightness_num, *shape), generator=torch.Generator().manual_seed(0))
                st = straightness(model, z, steps=100, batch_size=args.batch_size, device=device)
                st["seconds"] = time.perf_counter() - t
                cache.put(key, st)
            row["straightness"] = st
        rows.append(row)
    for dataset in {row["dataset"] for row in rows} - set(floors):
        key = f"floor {dataset} N={args.num}"
        floor = cache.get(key)
        if floor is None and args.cached_only:
            raise SystemExit(f"{args.json}: no stored floor for {dataset} at N={args.num}; run without --cached-only")
        if floor is None:
            f = data_floor(dataset, num=args.num, image_size=sizes[dataset], extractor=ext, data_dir=args.data_dir,
                           progress=args.progress)
            floor = floor_numbers(f)
        floors[dataset] = floor
    floors = {d: (f if isinstance(f, dict) else floor_numbers(f)) for d, f in floors.items()}
    for dataset, floor in floors.items():
        cache.put(f"floor {dataset} N={args.num}", floor)

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"\nN = {args.num} samples per cell vs test[:N]; floor = train[:N] vs test[:N]; "
          f"RK45 rtol = atol = {args.rk45_tol:g}; {device.type}{threads}")
    head = " | ".join(f"{s}:{k}" if s != "rk45" else "rk45" for s, k in settings)
    print(f"| model | {head} | straightness S/dim |")
    print("|---|" + "---|" * len(settings) + "---|")
    for row in rows:
        cells = " | ".join("—" if c.get("missing") else f"{c['fid']:.2f} / {c['kid'] * 1e3:.1f} ({c['nfe']})"
                           for c in row["cells"])
        st = row.get("straightness")
        s_txt = f"{st['S_per_dim']:.4f} ± {st['S_per_dim_err']:.4f}" if st else "—"
        print(f"| {row['model']} | {cells} | {s_txt} |")
    for dataset, floor in floors.items():
        print(f"| floor ({dataset}) | " + " | ".join(f"{floor['fid']:.2f} / {floor['kid'] * 1e3:.1f}" for _ in settings)
              + " | — |")
    print("cells: FID / KID×1e3 (NFE)")
    if args.write_cards:
        for row in rows:
            if any(c.get("missing") for c in row["cells"]):
                print(f"{row['model']}: cells missing, card not written")
            else:
                write_card(row, floors[row["dataset"]], args)


def write_card(row: dict, floor: dict, args: argparse.Namespace) -> None:
    """Record a shipped flow's measured quality in its config's ``card`` (other models are left alone)."""
    path = WEIGHTS_DIR / f"{row['model']}.json"
    if row["model"] not in available_models() or model_path(row["model"]).suffix != ".json":
        print(f"{row['model']}: not a shipped rectified flow, card not written")
        return
    config = json.loads(path.read_text())
    config.setdefault("card", {})["quality"] = {
        "benchmark": "benchmarks/rf_fid.py", "num": args.num, "reference": f"{row['dataset']}:test[:{args.num}]",
        "schedule": row["schedule"], "rk45_tol": args.rk45_tol, "weights_sha256_16": row["weights"],
        "cells": row["cells"], "floor": floor, "straightness": row.get("straightness"),
        "device": "cpu" if args.device in (None, "cpu") else args.device, "torch_threads": torch.get_num_threads(),
    }
    write_text(path, json.dumps(config, indent=2) + "\n")
    print(f"card written: {path}")


if __name__ == "__main__":
    main()
