"""FID/KID sanity figures and feature-pipeline throughput. Prints a table; asserts nothing.

    python benchmarks/fid_sanity.py --num 2000            # ~10-40 min on 2 CPU cores the first time
    python benchmarks/fid_sanity.py --num 10000 --device cuda

Rows: MNIST train[:N] vs MNIST test[:N] (the data-vs-data floor: FID is biased upward at small N, so
every FID at this N should be read against it), MNIST vs Fashion-MNIST, and the images/s of the whole
pipeline (float images → uint8 → TF1 resize → network → float64 moments) against the bare network
forward at the same batch size. Reference statistics are cached (``diffsamp.metrics.fid.reference_stats``), so
a second run only re-measures throughput. Needs the Inception weights (``DIFFSAMP_INCEPTION``) and the
idx files (``DIFFSAMP_DATA`` or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffsamp.data import load_dataset_uint8, to_float, to_uint8
from diffsamp.metrics.fid import compute_stats, fid_from_stats, kid_from_stats, load_extractor, reference_stats


def _throughput(extractor, images: torch.Tensor, batch_size: int, rounds: int) -> tuple[float, float]:
    """Median images/s of the bare forward and of ``compute_stats``, measured alternately (fair under load)."""
    batch = images[:batch_size]
    x299 = extractor.network_input(to_uint8(batch))
    with torch.inference_mode():
        for _ in range(2):  # TorchScript specialises on the first calls
            extractor.network(x299)
    bare, pipe = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        with torch.inference_mode():
            extractor.network(x299)
        if x299.is_cuda:
            torch.cuda.synchronize()
        bare.append(batch_size / (time.perf_counter() - t))
        t = time.perf_counter()
        compute_stats(batch, extractor=extractor, batch_size=batch_size, progress=False)
        pipe.append(batch_size / (time.perf_counter() - t))
    return statistics.median(bare), statistics.median(pipe)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=2000, help="images per set (default 2000, for CPU)")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--inception", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="throughput: alternating timed batches of each kind")
    ap.add_argument("--no-cache", action="store_true", help="recompute reference statistics")
    ap.add_argument("--progress", action="store_true", help="show progress bars (stderr)")
    args = ap.parse_args()

    ext = load_extractor(args.inception, args.device)
    n = args.num
    kw = dict(num=n, data_dir=args.data_dir, extractor=ext, batch_size=args.batch_size,
              cache=not args.no_cache, keep_features=True, progress=args.progress)
    sets, seconds = {}, {}
    for name, split in (("mnist", "train"), ("mnist", "test"), ("fashion-mnist", "test")):
        t = time.perf_counter()
        sets[f"{name} {split}"] = reference_stats(name, split, **kw)
        seconds[f"{name} {split}"] = time.perf_counter() - t

    threads = torch.get_num_threads() if ext.device.type == "cpu" else None
    where = f"{ext.device.type}" + (f", {threads} threads" if threads else "")
    print(f"FID / KID at N = {n} per set ({ext.name} [{ext.kind} file], TF1 bilinear → 299, "
          f"uint8; MNIST-like sets padded 28→32; {where})")
    print("reference statistics: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + " (cached → ~0 s)")
    print()
    print(f"{'pair':<44} {'FID':>9} {'KID ×1e3':>18}")
    rows = [
        ("mnist train", "mnist test", "  ← data-vs-data floor at this N"),
        ("mnist test", "fashion-mnist test", ""),
        ("mnist train", "fashion-mnist test", ""),
    ]
    for a, b, note in rows:
        fid = fid_from_stats(sets[a], sets[b])
        kid, kid_std = kid_from_stats(sets[a], sets[b], subset_size=min(1000, n))
        label = f"{a}[:{n}] vs {b}[:{n}]"
        print(f"{label:<44} {fid:>9.3f} {kid * 1e3:>9.3f} ± {kid_std * 1e3:<6.3f}{note}")

    # in-memory float images in [-1, 1], as a sampler returns them
    images = to_float(load_dataset_uint8("mnist", "test", args.data_dir, pad_to=32, limit=args.batch_size))
    bare, pipe = _throughput(ext, images, args.batch_size, args.rounds)
    print()
    print(f"throughput, batch {args.batch_size}, median of {args.rounds} alternating rounds:")
    print(f"  bare network forward (299×299 input ready)   {bare:8.2f} img/s")
    print(f"  whole pipeline (float → uint8 → resize → net → moments) {pipe:8.2f} img/s"
          f"   = {pipe / bare:.3f} × bare")


if __name__ == "__main__":
    main()
