"""Quality of the zoo models: FID / KID of N samples against the test set, next to the data floor.

For each model: N samples (seeds S…S+N−1, ``--first-seed`` S, default 0) with ``--sampler`` on ``--steps``
intervals of ``--schedule`` (default karras; heun 18 = 35 NFE; x̂0 clipped as the model's scheduler config
says), scored in memory against the first N test images; the floor is FID/KID of train[:N] vs test[:N]
at the same N (FID is biased upward at small N; KID is not). Prints a table; ``--write-cards`` also
stores each row in the model's ``card.json`` under ``"fid"``.

    python benchmarks/zoo_fid.py --num 2000                              # ~15 min a model on 2 CPU cores
    python benchmarks/zoo_fid.py --models mnist-ddpm --num 10000 --device cuda --write-cards
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from diffsamp.io import write_text
from diffsamp.metrics.scoring import data_floor, score_model
from diffsamp.metrics.fid import load_extractor
from diffsamp.models.zoo import WEIGHTS_DIR, available_models, load, model_card, sample_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist-ddpm,fashion-mnist-ddpm")
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--schedule", default="karras")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="Seeds first-seed … first-seed+N−1 (an independent draw of samples against the same reference).")
    ap.add_argument("--no-clip", action="store_true", help="Sample the plain ODE (x̂0 not clipped to [-1, 1]).")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--inception", default=None)
    ap.add_argument("--write-cards", action="store_true")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()

    ext = load_extractor(args.inception, args.device)
    device = ext.device
    rows = []
    seeds = range(args.first_seed, args.first_seed + args.num)
    for name in args.models.split(","):
        card = model_card(name) if name in available_models() else {}
        dataset = card.get("dataset")
        if dataset is None:
            raise SystemExit(f"{name}: no card naming its data set")
        model = load(name, device=device, clip=False if args.no_clip else None)
        size = sample_shape(model)[-1]
        floor = data_floor(dataset, num=args.num, image_size=size, extractor=ext, data_dir=args.data_dir,
                           progress=args.progress)
        q = score_model(model, floor.test, seeds=seeds, sampler=args.sampler, schedule=args.schedule,
                        steps=args.steps,
                        batch_size=args.batch_size, device=device, extractor=ext, progress=args.progress)
        rows.append((name, q, floor))
        if args.write_cards:
            path = WEIGHTS_DIR / name / "card.json"
            card["fid"] = {
                "fid": round(q.fid, 3), "kid": round(q.kid, 6), "kid_std": round(q.kid_std, 6),
                "floor_fid": round(floor.fid, 3), "floor_kid": round(floor.kid, 6),
                "num": args.num, "seeds": f"{seeds.start}-{seeds.stop - 1}", "reference": f"{dataset} test[:{args.num}]",
                "floor": f"{dataset} train[:{args.num}] vs test[:{args.num}]",
                "sampler": f"{args.sampler}, {args.schedule}, {args.steps} steps", "nfe": q.nfe,
                "x0_clip": model.clip_sample,
                "extractor": ext.name, "device": str(device), "date": datetime.date.today().isoformat(),
            }
            write_text(path, json.dumps(card, indent=2) + "\n")

    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"N = {args.num} samples per model (seeds {seeds.start}–{seeds.stop - 1}), "
          f"{args.sampler} on {args.steps} {args.schedule} intervals"
          f"{', x̂0 not clipped' if args.no_clip else ''}; "
          f"reference = test[:N], floor = train[:N] vs test[:N]; {device.type}{threads}")
    print("| model | NFE | FID | floor FID | FID − floor | KID ×1e3 | floor KID ×1e3 | sampling (s) | features (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, q, floor in rows:
        print(f"| {name} | {q.nfe} | {q.fid:.2f} | {floor.fid:.2f} | {q.fid - floor.fid:+.2f} | "
              f"{q.kid * 1e3:.2f} ± {q.kid_std * 1e3:.2f} | {floor.kid * 1e3:.2f} ± {floor.kid_std * 1e3:.2f} | "
              f"{q.sampling_seconds:.0f} | {q.feature_seconds:.0f} |")


if __name__ == "__main__":
    main()
