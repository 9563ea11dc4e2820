"""torchrun on the CPU: the same sampling work in one process and in 2 gloo ranks — CPU time and wall time.

Runs ``diffsamp sample`` (``--outdir``, N seeds) three ways, each ``--repeats`` times, alternating, on the same
model and settings: one process with one thread, one process with 2 threads, and ``torchrun --nproc_per_node 2``
with one thread per rank. CPU time is the children's user + system time (``resource.getrusage``), wall time
includes start-up (the model load, torchrun's rendezvous). The PNGs of every run are compared byte for byte with
the one-process run. Prints a table (medians) and writes it to ``--out``.

    python benchmarks/distributed.py                       # mnist-ddpm, 512 seeds, dpmpp2m 10 steps
    python benchmarks/distributed.py --num 128 --repeats 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_OUT = "benchmarks/results/distributed.txt"


def timed(cmd: list[str], threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the children) of one command, with ``threads`` intra-op threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def same_pngs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.png"))
    return names == sorted(p.name for p in b.glob("*.png")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--num", type=int, default=512, help="Seeds 0…N−1.")
    ap.add_argument("--sampler", default="dpmpp2m")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="diffsamp-dist-"))
    sample = ["-m", "diffsamp", "sample", "--model", args.model, "--sampler", args.sampler, "--steps", str(args.steps),
              "--seeds", f"0-{args.num - 1}", "--batch-size", str(args.batch_size), "--quiet"]
    ways = {
        "1 process, 1 thread": ([sys.executable, *sample], 1),
        "1 process, 2 threads": ([sys.executable, *sample], 2),
        "torchrun, 2 ranks × 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2", *sample], 1),
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    identical = True
    for r in range(args.repeats):
        for name, (cmd, threads) in ways.items():
            out = tmp / f"{r}-{re.sub(r'[^a-z0-9]+', '-', name)}"
            runs[name].append(timed([*cmd, "--outdir", str(out)], threads))
            identical &= same_pngs(tmp / f"{r}-1-process-1-thread", out)
    shutil.rmtree(tmp, ignore_errors=True)

    base_wall = statistics.median(w for w, _ in runs["1 process, 1 thread"])
    base_cpu = statistics.median(c for _, c in runs["1 process, 1 thread"])
    lines = [f"# torchrun on the CPU: {args.num} images of {args.model}, {args.sampler} {args.steps} steps, batch "
             f"{args.batch_size} (medians of {args.repeats}; start-up included)",
             f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}", "",
             "| run | wall s | CPU s | wall ÷ 1 process | CPU ÷ 1 process |", "|---|---|---|---|---|"]
    for name, xs in runs.items():
        wall, cpu = statistics.median(w for w, _ in xs), statistics.median(c for _, c in xs)
        lines.append(f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / base_wall:.2f} | {cpu / base_cpu:.2f} |")
    lines += ["", f"PNGs byte-identical to the one-process run: {'yes' if identical else 'NO'}"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
