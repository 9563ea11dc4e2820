"""How far the regression fixture moves on other CPUs' float32 kernels, against the tolerances it is checked with.

Computes the fixture (``tests/regression.py``) once natively and once per emulated machine — PyTorch's own
kernels follow ``ATEN_CPU_CAPABILITY`` (default = portable scalar code, avx2, avx512), oneDNN's convolutions
``ONEDNN_MAX_CPU_ISA`` (SSE41, AVX2, …) — each in a fresh process, then prints per entry group the largest
deviation from the native run, the tolerance, and the headroom (tolerance / deviation). Also measures how much
a 3-step sampler amplifies a perturbation of the network's output of the size the kernels produce.

    python benchmarks/regression_tolerances.py --out benchmarks/results/regression_tolerances.txt
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from fnmatch import fnmatch
from math import inf
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


MACHINES = {
    "native": {},
    "aten=default": {"ATEN_CPU_CAPABILITY": "default"},
    "onednn=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "aten=default onednn=SSE41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "aten=avx2 onednn=AVX2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def fixture_under(env: dict[str, str], path: Path) -> dict[str, torch.Tensor]:
    """The fixture computed in a fresh process under ``env``."""
    from safetensors.torch import load_file

    full = {**os.environ, **env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.regression", "--write", str(path)], cwd=ROOT, env=full,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"the fixture failed under {env or 'the native kernels'}:\n{proc.stderr[-2000:]}")
    return load_file(str(path))


def spread_table(runs: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Per tolerance row: the largest |Δ| and RMS Δ from native over every emulated machine, the tolerance, and
    the headroom (the smaller of atol / max |Δ| and rms / RMS Δ)."""
    from tests.regression import EXACT, TOLERANCES

    native = runs["native"]
    rows: dict[str, list[float]] = {}
    for name, run in runs.items():
        if name == "native":
            continue
        for key, ref in native.items():
            if key not in run:
                continue
            row = next((p for p in EXACT if fnmatch(key, p)), None) or next(p for p in TOLERANCES if fnmatch(key, p))
            a, b = ref.double(), run[key].double()
            diff = (b - a).abs() if ref.is_floating_point() else (a != b).double()
            g = rows.setdefault(row, [0.0, 0.0, 0.0])
            g[0] = max(g[0], diff.max().item())
            g[1] = max(g[1], diff.pow(2).mean().sqrt().item())
            g[2] = max(g[2], (diff / a.abs().clamp_min(1e-300)).max().item() if ref.is_floating_point() else g[2])
    lines = [f"{'entries':24s} {'max |Δ|':>9s} {'RMS Δ':>9s} {'max rel':>9s} {'atol':>7s} {'rtol':>7s} {'RMS':>7s} "
             f"{'headroom':>8s}"]
    for row, (d, r, rel) in rows.items():
        if row in EXACT:
            lines.append(f"{row:24s} {d:9.3g} {r:9.3g} {rel:9.3g} {'exact':>7s} {'':7s} {'':7s} "
                         f"{'ok' if d == 0 else 'BROKEN':>8s}")
            continue
        atol, rtol, rms = TOLERANCES[row]
        head = min(atol / d if atol and d else inf, rtol / rel if rtol and rel else inf, rms / r if r else inf)
        lines.append(f"{row:24s} {d:9.3g} {r:9.3g} {rel:9.3g} {atol:7.0e} {rtol:7.0e} {rms:7.0e} {head:8.1f}")
    return lines


def amplification(delta: float = 3e-5, draws: int = 4) -> list[str]:
    """Max |Δ image| when every network output of a 3-step run is perturbed by δ·D·N(0, 1) (δ = 3e-5: the
    largest one-evaluation deviation between kernels, the ``forward/*`` row): how each sampler on ``mnist-ddpm``
    amplifies a kernel's error."""
    import diffsamp
    from diffsamp.models import load
    from diffsamp.models.base import Wrapper
    from tests.regression import SAMPLERS, SEEDS, STEPS

    model = load("mnist-ddpm")

    class Jitter(Wrapper):
        """D(x, σ)·(1 + δ·N(0, 1)): a kernel's relative error δ at every evaluation, drawn afresh."""

        def __init__(self, inner, seed: int) -> None:
            super().__init__(inner)
            self.g = torch.Generator().manual_seed(seed)

        def __call__(self, x, sigma):
            d = self.inner(x, sigma)
            return d * (1 + delta * torch.randn(d.shape, generator=self.g, dtype=d.dtype))

    lines = [f"mnist-ddpm, {STEPS} steps, every evaluation's output × (1 + {delta:g}·N(0, 1)): max |Δ image| over "
             f"{draws} draws (the sampler's amplification of a kernel's relative error)"]
    for sampler in SAMPLERS:
        base = diffsamp.generate(model, (1, 32, 32), sampler=sampler, steps=STEPS, seeds=SEEDS).images
        worst = max((diffsamp.generate(Jitter(model, k), (1, 32, 32), sampler=sampler, steps=STEPS, seeds=SEEDS).images
                     - base).abs().max().item() for k in range(draws))
        lines.append(f"  {sampler:16s} {worst:.3g}  (×{worst / delta:.0f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--skip-amplification", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: fixture_under(env, Path(tmp) / f"{i}.st") for i, (name, env) in enumerate(MACHINES.items())}
    lines = [f"torch {torch.__version__}, native CPU capability {torch.backends.cpu.get_cpu_capability()}; "
             f"machines emulated: {', '.join(m for m in MACHINES if m != 'native')}", ""]
    lines += spread_table(runs)
    if not args.skip_amplification:
        lines += [""] + amplification()
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
