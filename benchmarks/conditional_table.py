"""Guidance table of a class-conditional model: FID, KID and class adherence against the guidance scale w.

For each w in ``--cfg``: N class-balanced samples (seed i gets class i mod K, K the model's classes) with
``--sampler`` on ``--steps`` intervals, classifier-free guidance at scale w (w = 0: the unconditional model,
w = 1: the conditional model alone). Each cell is scored in memory by ``diffsamp.metrics.scoring.score_model``
(FID/KID, Inception pool3) against ``--ref`` (default the full MNIST test set), and its class adherence
measured by the independent MNIST classifier (``diffsamp.metrics.classifier``, the shipped ``mnist-cnn``
unless ``--classifier``): the fraction of samples it assigns to the requested class, overall and per class.
The data floor is the FID/KID of the data set's train[:N] against the same reference.

Writes into ``--out``: ``cells/w<W>-<key>.json`` per finished w (a rerun with the same settings reads it
back, so an interrupted table resumes and a crash loses at most the cell in progress), ``grid_w<W>.png`` per
w (row c = the first samples asked for class c; settings in the PNG's text chunks), ``table.md``,
``table.csv`` and ``config.json``.

    python benchmarks/conditional_table.py                                  # runs/mnist-cond, N = 2000
    python benchmarks/conditional_table.py --model runs/mnist-cond --num 200 --cfg 1,3 --out /tmp/t
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from diffsamp.images import save_png, image_grid, to_uint8
from diffsamp.io import write_text
from diffsamp.metrics.classifier import DEFAULT_WEIGHTS, load_classifier, predict
from diffsamp.metrics.fid import fid_from_stats, kid_from_stats, reference_stats
from diffsamp.metrics.inception import load_extractor
from diffsamp.metrics.scoring import KID_SUBSET_SIZE, resolve_reference, score_model
from diffsamp.models import load
from diffsamp.models.base import default_schedule

DEFAULT_OUT = "benchmarks/results/conditional_mnist"
DEFAULT_CFG = "0,1,1.5,2,3,4"


def file_digest(path: str | os.PathLike) -> str:
    """The first 16 hex digits of the SHA-256 of a file, or of what ``load`` reads from a model folder: its
    weight and config files (sorted by path) and the ``conditioning`` entry of its card. The rest of the card is
    documentation, so adding results to it keeps the cells valid."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:  # an exported model (a run folder's training checkpoint is not part of the model)
        roots = [path / d for d in ("unet", "scheduler", "transformer", "vae") if (path / d).is_dir()] or [path]
        files = sorted(p for r in roots for p in r.rglob("*") if p.is_file() and p.name != "card.json"
                       and p.suffix in (".safetensors", ".bin", ".pt", ".json"))
        files += [p for p in (path / "model_index.json",) if p.is_file() and path not in roots]
        card = path / "card.json"
        if card.is_file():
            h.update(json.dumps(json.loads(card.read_text()).get("conditioning"), sort_keys=True).encode())
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def w_label(w: float) -> str:
    """A file-name-safe label of a guidance scale: 1.5 → ``1.5``, 2 → ``2``."""
    return f"{w:g}"


def balanced_classes(num: int, num_classes: int) -> list[int]:
    """Seed i gets class i mod ``num_classes``."""
    return [i % num_classes for i in range(num)]


def class_rows(images: torch.Tensor, classes: Sequence[int], num_classes: int, cols: int) -> torch.Tensor:
    """The first ``cols`` images of each class, class 0 first: a (num_classes·cols, C, H, W) batch for a grid
    whose row c holds class c."""
    labels = torch.as_tensor(list(classes))
    picks = [torch.nonzero(labels == c).flatten()[:cols] for c in range(num_classes)]
    return torch.cat([images[p] for p in picks])


def compute_cell(
    model: Any, w: float, *, settings: dict[str, Any], reference: Any, extractor: Any, classifier: torch.nn.Module,
    out: Path, num_classes: int, grid_cols: int, batch_size: int, progress: bool, device: str | None = None,
) -> dict[str, Any]:
    """Sample, score and classify one guidance scale; write its grid; return the cell's record."""
    num = settings["num"]
    classes = balanced_classes(num, num_classes)
    kept: list[torch.Tensor] = []

    def keep(seeds: list[int], images: torch.Tensor) -> None:
        kept.append(to_uint8(images.clamp(-1, 1)).cpu())

    q = score_model(model, reference, num=num, sampler=settings["sampler"], schedule=settings["schedule"],
                    steps=settings["steps"], batch_size=batch_size, extractor=extractor, progress=progress,
                    device=device, cond=classes, guidance=w, on_batch=keep)
    images = torch.cat(kept)
    t = time.perf_counter()
    pred = predict(classifier, images)
    labels = torch.tensor(classes)
    hit = pred == labels
    adherence = hit.double().mean().item()
    per_class = {c: hit[labels == c].double().mean().item() for c in range(num_classes) if (labels == c).any()}
    classify_seconds = time.perf_counter() - t
    cols = min(grid_cols, num // num_classes) or 1
    grid_path = out / f"grid_w{w_label(w)}.png"
    text = {"diffsamp": json.dumps({**settings, "w": w, "grid": f"row c = the first {cols} seeds of class c "
                                    f"(seeds c, c+{num_classes}, …)"})}
    save_png(image_grid(class_rows(images, classes, num_classes, cols), nrow=cols), grid_path, text=text)
    return {
        "w": w, "fid": q.fid, "kid": q.kid, "kid_std": q.kid_std, "adherence": adherence,
        "adherence_per_class": {str(c): a for c, a in per_class.items()}, "nfe": q.nfe,
        "sampling_seconds": round(q.sampling_seconds, 2), "feature_seconds": round(q.feature_seconds, 2),
        "classify_seconds": round(classify_seconds, 2), "grid": grid_path.name, "grid_cols": cols,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), **settings,
    }


def data_floor_vs(reference: Any, dataset: str, num: int, *, image_size: int, extractor: Any,
                  data_dir: str | None, progress: bool) -> dict[str, float]:
    """FID/KID of ``dataset`` train[:num] against the reference statistics: what a perfect model shows."""
    train = reference_stats(dataset, "train", num=num, data_dir=data_dir, pad_to=image_size, extractor=extractor,
                            progress=progress)
    out = {"fid": fid_from_stats(train, reference), "kid": None, "kid_std": None}
    if train.features is not None and reference.features is not None:
        n = min(KID_SUBSET_SIZE, train.features.shape[0], reference.features.shape[0])
        out["kid"], out["kid_std"] = kid_from_stats(train, reference, subset_size=n)
    return out


def format_markdown(cells: Sequence[dict[str, Any]], floor: dict[str, Any] | None, head: str,
                    num_classes: int) -> str:
    """One row per w: FID, KID×10³, adherence, NFE, sampling seconds, grid; then adherence per class."""
    lines = [head, "", "| w | FID | KID×10³ | class adherence | NFE | sampling s | grid |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in cells:
        kid = f"{1e3 * c['kid']:.2f} ± {1e3 * c['kid_std']:.2f}" if c["kid"] is not None else "—"
        lines.append(f"| {w_label(c['w'])} | {c['fid']:.2f} | {kid} | {100 * c['adherence']:.2f} % | {c['nfe']} "
                     f"| {c['sampling_seconds']:.0f} | [{c['grid']}]({c['grid']}) |")
    if floor is not None:
        kid = f"{1e3 * floor['kid']:.2f} ± {1e3 * floor['kid_std']:.2f}" if floor["kid"] is not None else "—"
        lines.append(f"| data floor (train[:N] vs reference) | {floor['fid']:.2f} | {kid} | — | — | — | — |")
    lines += ["", "Class adherence per class (%):", "",
              "| w | " + " | ".join(str(k) for k in range(num_classes)) + " |",
              "| ---: |" + " ---: |" * num_classes]
    for c in cells:
        per = c["adherence_per_class"]
        lines.append(f"| {w_label(c['w'])} | "
                     + " | ".join(f"{100 * per[str(k)]:.1f}" if str(k) in per else "—" for k in range(num_classes))
                     + " |")
    return "\n".join(lines) + "\n"


def format_csv(cells: Sequence[dict[str, Any]], floor: dict[str, Any] | None, num_classes: int) -> str:
    """The table as CSV, one row per w (and the floor), with the settings of each row."""
    keys = ["w", "fid", "kid", "kid_std", "adherence", *[f"adherence_{k}" for k in range(num_classes)], "nfe",
            "num", "sampler", "schedule", "steps", "reference", "model", "model_digest", "classifier",
            "sampling_seconds", "feature_seconds", "grid", "date"]
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    wr.writeheader()
    for c in cells:
        row = dict(c)
        row.update({f"adherence_{k}": c["adherence_per_class"].get(str(k), "") for k in range(num_classes)})
        wr.writerow(row)
    if floor is not None:
        wr.writerow({"w": "data floor", "fid": floor["fid"], "kid": floor["kid"], "kid_std": floor["kid_std"]})
    return buf.getvalue()


def run_table(
    model_path: str, *, cfg: Sequence[float], num: int, sampler: str, steps: int, schedule: str | None,
    reference: str, ref_num: int | None, out: str | os.PathLike, classifier_path: str | None,
    data_dir: str | None, inception: str | None, device: str | None, batch_size: int, grid_cols: int,
    floor: bool = True, progress: bool = True, echo: Callable[[str], None] = print, command: str = "",
) -> tuple[list[dict[str, Any]], str]:
    """Compute (or read back) every cell, write the table files and return (cells, markdown)."""
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    model = load(model_path, device=device)
    conditioning = getattr(model, "conditioning", None)
    if conditioning is None or getattr(conditioning, "kind", None) != "class":
        raise SystemExit(f"{model_path} is not a class-conditional model (conditioning: {conditioning})")
    num_classes = conditioning.num_classes
    if num < num_classes:
        raise SystemExit(f"--num {num} is fewer than the model's {num_classes} classes")
    shape = tuple(model.sample_shape)
    clf_path = Path(classifier_path) if classifier_path else DEFAULT_WEIGHTS
    classifier = load_classifier(clf_path)
    clf_card = clf_path.with_suffix(".json")
    clf_acc = json.loads(clf_card.read_text()).get("test_accuracy") if clf_card.is_file() else None
    model_dir = Path(model_path)
    settings = {
        "model": model_path, "model_digest": file_digest(model_dir) if model_dir.exists() else model_path,
        "conditioning": conditioning.describe(), "num": num, "seeds": f"0-{num - 1}",
        "classes": f"seed i gets class i mod {num_classes}", "sampler": sampler,
        "schedule": schedule or default_schedule(model), "steps": steps, "shape": list(shape),
        "clip": "as the model's scheduler config", "reference": f"{reference}" + (f"[:{ref_num}]" if ref_num else ""),
        "classifier": str(clf_path.name), "classifier_digest": file_digest(clf_path),
        "classifier_test_accuracy": clf_acc,
    }
    key_parts = {k: settings[k] for k in ("model_digest", "num", "sampler", "schedule", "steps", "shape",
                                          "reference", "classifier_digest")}
    extractor = load_extractor(inception, device)
    key_parts["feature_net"] = getattr(extractor, "name", type(extractor).__name__)
    settings["feature_network"] = key_parts["feature_net"]
    runtime = {"device": str(device or "cpu"), "torch_threads": torch.get_num_threads(),
               "hardware": f"{platform.machine()}, {os.cpu_count()} logical cores", "torch": torch.__version__,
               "python": sys.version.split()[0], "command": command}

    ref_stats = resolve_reference(reference, num=ref_num or num, image_size=shape[-1], extractor=extractor,
                                  data_dir=data_dir, progress=progress)
    floor_row = None
    if floor and ":" in reference and not Path(reference).exists():
        floor_row = data_floor_vs(ref_stats, reference.split(":")[0], num, image_size=shape[-1], extractor=extractor,
                                  data_dir=data_dir, progress=progress)
    cells = []
    for w in cfg:
        digest = hashlib.sha256(json.dumps({**key_parts, "w": w}, sort_keys=True).encode()).hexdigest()[:12]
        path = out / "cells" / f"w{w_label(w)}-{digest}.json"
        if path.is_file():
            cell = json.loads(path.read_text())
            echo(f"w = {w_label(w)}: cached ({path.name})")
        else:
            echo(f"w = {w_label(w)}: sampling {num} images, {sampler} {steps} steps")
            cell = compute_cell(model, w, settings=settings, reference=ref_stats, extractor=extractor,
                                classifier=classifier, out=out, num_classes=num_classes, grid_cols=grid_cols,
                                batch_size=batch_size, progress=progress, device=device)
            cell["runtime"] = runtime
            write_text(path, json.dumps(cell, indent=2) + "\n")
        echo(f"w = {w_label(w)}: FID {cell['fid']:.2f}, adherence {100 * cell['adherence']:.2f} %")
        cells.append(cell)
    acc = f", test accuracy {100 * clf_acc:.2f} %" if clf_acc is not None else ""
    head = (f"{model_path} ({settings['conditioning']}): FID / KID of N = {num} class-balanced samples "
            f"(seed i gets class i mod {num_classes}), {sampler} {steps} steps ({settings['schedule']}), against "
            f"{settings['reference']} ({settings['feature_network']}); class adherence = fraction the classifier "
            f"{settings['classifier']}{acc} assigns to the requested class.")
    table = format_markdown(cells, floor_row, head, num_classes)
    write_text(out / "table.md", table)
    write_text(out / "table.csv", format_csv(cells, floor_row, num_classes))
    config = {**settings, "cfg": list(cfg), "floor": floor_row, "runtime": runtime,
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    return cells, table


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/mnist-cond", help="A class-conditional model (folder or zoo name).")
    ap.add_argument("--cfg", default=DEFAULT_CFG, help="Guidance scales w, comma-separated.")
    ap.add_argument("--num", type=int, default=2000, help="Samples per w (seeds 0…N−1).")
    ap.add_argument("--sampler", default="heun")
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--schedule", default=None, help="Default: the model's own (karras for diffusion models).")
    ap.add_argument("--ref", default="mnist:test", help="DATASET:SPLIT or a stats .npz.")
    ap.add_argument("--ref-num", type=int, default=None,
                    help="Reference images from DATASET:SPLIT (default: the whole split, 10 000 for mnist:test).")
    ap.add_argument("--classifier", default=None, help="Classifier weights (default: the shipped mnist-cnn).")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--grid-cols", type=int, default=10, help="Samples per class in each grid row.")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--no-floor", action="store_true", help="Skip the data floor row.")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--inception", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    cfg = [float(v) for v in args.cfg.split(",") if v.strip()]
    ref_num = args.ref_num
    if ref_num is None and ":" in args.ref and not Path(args.ref).exists():
        from diffsamp.data import DataNotFoundError, load_labels

        try:
            ref_num = len(load_labels(*args.ref.split(":", 1), args.data_dir))  # the whole split
        except (ValueError, OSError, DataNotFoundError):  # no labels: N reference images
            ref_num = None
    command = "python benchmarks/conditional_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    _, table = run_table(args.model, cfg=cfg, num=args.num, sampler=args.sampler, steps=args.steps,
                         schedule=args.schedule, reference=args.ref, ref_num=ref_num, out=args.out,
                         classifier_path=args.classifier, data_dir=args.data_dir, inception=args.inception,
                         device=args.device, batch_size=args.batch_size, grid_cols=args.grid_cols,
                         floor=not args.no_floor, progress=not args.quiet, command=command.strip())
    print(table)
    print(f"-> {args.out}/table.md, table.csv, grid_w*.png, cells/")


if __name__ == "__main__":
    main()
