"""The regression fixture: samples of every shipped model with every main sampler, analytic-model samples and
σ grids, one FID statistic and two short training runs, computed at fixed seeds on one CPU thread.

``python -m tests.regression --write`` (re)writes ``tests/fixtures/regression.safetensors``;
``tests/test_regression.py`` recomputes everything and compares. Regenerate only when a change is *meant* to
alter numbers, and say so in the commit.

Two kinds of entries. ``EXACT`` ones are bit-identical on every machine: float64 σ grids, the analytic
Gaussian-mixture denoiser (float64 arithmetic with no kernel-dependent reduction order) and the non-float
training state (data order, RNG states). The others go through float32 convolutions and matrix products,
whose summation order, and so whose last bits, depend on the CPU's instruction set (PyTorch picks kernels by
``ATEN_CPU_CAPABILITY``, oneDNN by ``ONEDNN_MAX_CPU_ISA``): they are compared within ``TOLERANCES``, derived
in ``docs/regression-tolerances.md`` from those kernels' spread and checked by emulating other machines.
Within one process everything is bit-identical (``test_exact_within_one_process``).
"""

from __future__ import annotations

import hashlib
import os
from fnmatch import fnmatch
from math import inf
import sys
import tempfile
import warnings
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "regression.safetensors"
MODELS = ("mnist-ddpm", "fashion-mnist-ddpm", "mnist-rf", "mnist-2rf", "mnist-2rf-distill", "mnist-ddpm-reflow")
SAMPLERS = ("euler", "heun", "dpm2", "dpmpp3m", "ipndm", "ddim", "ddpm", "euler_maruyama")
ANALYTIC_SAMPLERS = SAMPLERS + ("dpmpp2m", "pc")
SCHEDULES = ("karras", "logsnr", "time_uniform")
SEEDS = (0, 1)
STEPS = 3

# (atol, rtol, rms): every |Δ| ≤ atol + rtol·|stored| and the RMS of Δ over the entry ≤ rms. The first pattern
# that matches an entry's name applies. Each is about 5× the largest deviation seen when the fixture is computed
# on other kernels (``benchmarks/regression_tolerances.py``: PyTorch's scalar and AVX2 kernels, oneDNN's SSE4.1
# and AVX2 convolutions, and an AVX-512 machine's fixture), leaving room for kernels not emulated here.
# Heun at 3 steps amplifies a network's last-bit differences most (its 2nd evaluation at the last σ > 0 is
# weighted by a large step), hence its own row. See docs/regression-tolerances.md.
TOLERANCES: dict[str, tuple[float, float, float]] = {
    "sample/*/heun": (1e-1, 0.0, 5e-3),    # seen: max 1.9e-2, RMS 1.2e-3 (images in [-1, 1])
    "sample/*/dpm2": (1e-2, 0.0, 5e-4),    # seen: 1.8e-3, 1.1e-4
    "sample/*": (2e-3, 0.0, 2e-4),         # seen: 3.9e-4, 3.7e-5
    "forward/*": (2e-4, 0.0, 2e-5),        # seen: 2.7e-5, 2.8e-6 (one network evaluation)
    "rk45/*": (5e-4, 0.0, 1e-4),           # seen: 6.8e-5, 1.5e-5
    "straightness/*": (0.0, 2e-4, inf),    # seen: relative 3.1e-5
    "fid/mu": (1e-2, 0.0, 1e-3),           # seen: 1.9e-3, 2.3e-4 (pool3 features)
    "fid/sigma_*": (2e-2, 0.0, 1e-3),      # seen: 3.6e-3, 1.8e-4
    "fid/frechet": (0.0, 3e-3, inf),       # seen: relative 5.2e-4
    "ckpt/ddpm/*": (3e-4, 0.0, 5e-6),      # seen: 4.7e-5, 6.4e-7 (Adam turns tiny gradient differences into steps)
    "ckpt/rf/*": (2e-7, 0.0, 5e-8),        # seen: 3.0e-8, 5.6e-9
    "grid/ddpm": (0.0, 1e-6, inf),         # seen: relative 8.4e-8 (σ from the scheduler's float32 ᾱ table)
}
# Exact on every machine: float64 σ grids, the float64 analytic mixture, and the non-float training state.
EXACT = ("grid/karras", "grid/logsnr", "grid/time_uniform", "grid/rf", "analytic/*", "ckpt/*/state_sha256")


def tolerance(key: str) -> tuple[float, float, float]:
    """(atol, rtol, rms) of a fixture entry: zeros for the exact ones, else the first matching pattern's."""
    if any(fnmatch(key, p) for p in EXACT):
        return 0.0, 0.0, 0.0
    for pattern, tol in TOLERANCES.items():
        if fnmatch(key, pattern):
            return tol
    raise KeyError(f"no tolerance for fixture entry {key!r}")


def deviations(stored: dict[str, torch.Tensor], now: dict[str, torch.Tensor], keys: list[str]) -> list[str]:
    """One line per entry of ``keys`` that moved beyond its tolerance ("" for those within), saying how far."""
    lines = []
    for key in keys:
        a, b = stored[key], now[key]
        atol, rtol, rms = tolerance(key)
        if a.shape != b.shape or a.dtype != b.dtype:
            lines.append(f"{key}: {tuple(a.shape)} {a.dtype} stored, {tuple(b.shape)} {b.dtype} now")
        elif atol == rtol == rms == 0:
            lines.append("" if torch.equal(a, b) else f"{key}: not bit-identical (exact on every machine)")
        else:
            d = (b.double() - a.double()).abs()
            excess = (d - atol - rtol * a.double().abs()).max().item()
            d_rms = d.pow(2).mean().sqrt().item()
            ok = excess <= 0 and d_rms <= rms and bool(torch.isfinite(b).all())
            lines.append("" if ok else f"{key}: max |Δ| {d.max().item():.3g}, RMS Δ {d_rms:.3g} "
                                       f"(atol {atol:g}, rtol {rtol:g}, RMS {rms:g})")
    return lines


def _digest(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 of the tensors' bytes (sorted by name) as a uint8 tensor."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def samples(models: tuple[str, ...] = MODELS) -> dict[str, torch.Tensor]:
    """``sample/MODEL/SAMPLER``: 2 images (seeds 0, 1), 3 steps on the model's default schedule."""
    import diffsamp
    from diffsamp.models import load, sample_shape

    out = {}
    for name in models:
        model = load(name)
        for sampler in SAMPLERS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # euler_maruyama at 3 steps is warned about, by design
                res = diffsamp.generate(model, sample_shape(model), sampler=sampler, steps=STEPS, seeds=SEEDS)
            out[f"sample/{name}/{sampler}"] = res.images
    return out


def forward_passes() -> dict[str, torch.Tensor]:
    """``forward/MODEL``: one denoiser evaluation D(x, σ) of 2 fixed inputs at σ = 20, 1 and 0.05 (the
    per-evaluation error that every sampler entry amplifies)."""
    from diffsamp.models import load, sample_shape

    out = {}
    for name in MODELS:
        model = load(name)
        x0 = torch.randn(2, *sample_shape(model), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            out[f"forward/{name}"] = torch.stack([model(x0 * (1 + s), torch.full((2,), s)) for s in (20.0, 1.0, 0.05)])
    return out


def analytic() -> dict[str, torch.Tensor]:
    """``analytic/SAMPLER`` (a float64 2-D Gaussian mixture, 4 seeds, 5 karras steps) and ``grid/SCHEDULE``
    (6 steps): exact on every machine."""
    import diffsamp
    from diffsamp.models import load
    from diffsamp.models.analytic import GaussianMixtureDenoiser

    model = GaussianMixtureDenoiser([[-1.5, 0.3], [1.0, 1.0], [0.5, -1.2]], [0.4, 0.6, 0.3], [0.3, 0.4, 0.3],
                                    sigma_min=0.02, sigma_max=20.0)
    out = {}
    for sampler in ANALYTIC_SAMPLERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = diffsamp.generate(model, (2,), sampler=sampler, schedule="karras", steps=5, seeds=range(4))
        out[f"analytic/{sampler}"] = res.images
    for schedule in SCHEDULES:
        out[f"grid/{schedule}"] = diffsamp.get_schedule(schedule, sigma_min=0.002, sigma_max=80.0).grid(6).sigmas
    out["grid/rf"] = diffsamp.get_schedule("rf").grid(6).sigmas
    out["grid/ddpm"] = diffsamp.get_schedule("ddpm", model=load("mnist-ddpm")).grid(6).sigmas
    return out


def rk45_pairs() -> dict[str, torch.Tensor]:
    """``rk45/mnist-rf``: one rk45 end point (loose tolerance) of the first shipped flow."""
    import diffsamp
    from diffsamp.models import load

    model = load("mnist-rf")
    res = diffsamp.generate(model, (1, 32, 32), sampler="rk45", seeds=(0,), rtol=1e-2, atol=1e-2)
    return {"rk45/mnist-rf": res.images}


def straightness_figures() -> dict[str, torch.Tensor]:
    """``straightness/MODEL``: S, its error, relative S, transport cost and t0 of 4 paths, 4 Euler steps."""
    from diffsamp.data.toys import draw_noise
    from diffsamp.metrics.straightness import straightness
    from diffsamp.models import load

    out = {}
    for name in ("mnist-rf", "mnist-ddpm"):
        r = straightness(load(name), draw_noise("normal", (1, 32, 32), 0, 4, 0), steps=4, batch_size=3)
        out[f"straightness/{name}"] = torch.tensor([r["S"], r["S_err"], r["relative"], r["transport_cost"], r["t0"]],
                                                   dtype=torch.float64)
    return out


def fid_statistic() -> dict[str, torch.Tensor]:
    """``fid/mu``, ``fid/sigma_diag``, ``fid/sigma_probe`` (Σ times a fixed unit vector) and ``fid/frechet``:
    Inception statistics of 8 mnist-ddpm samples and their Fréchet distance to 8 others; {} without the
    Inception weights."""
    import diffsamp
    from diffsamp.metrics import WeightsNotFoundError, frechet_distance, load_extractor
    from diffsamp.models import load

    try:
        extractor = load_extractor(None, "cpu")
    except WeightsNotFoundError:
        return {}
    from diffsamp.metrics.fid import compute_stats

    model = load("mnist-ddpm")
    a = diffsamp.generate(model, (1, 32, 32), sampler="euler", steps=2, seeds=range(8)).images
    b = diffsamp.generate(model, (1, 32, 32), sampler="euler", steps=2, seeds=range(8, 16)).images
    sa = compute_stats(a.clamp(-1, 1), extractor=extractor, progress=False)
    sb = compute_stats(b.clamp(-1, 1), extractor=extractor, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 images: a singular covariance, by design
        fd = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    sigma = torch.from_numpy(sa.sigma.copy())
    probe = torch.randn(sigma.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return {"fid/mu": torch.from_numpy(sa.mu.copy()),
            "fid/sigma_diag": sigma.diagonal().clone(),
            "fid/sigma_probe": sigma @ (probe / probe.norm()),
            "fid/frechet": torch.tensor([fd], dtype=torch.float64)}


def _checkpoint_entries(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training checkpoint as fixture entries: its weights and EMA weights (float), and the SHA-256 of
    everything that is not a float (data order, RNG states), which is exact."""
    def flat(prefix: str) -> torch.Tensor:
        return torch.cat([v.flatten().float() for k, v in sorted(tensors.items()) if k.startswith(prefix)])

    state = {k: v for k, v in tensors.items() if not v.is_floating_point()}
    return {f"ckpt/{name}/model": flat("model."), f"ckpt/{name}/ema": flat("ema."),
            f"ckpt/{name}/state_sha256": _digest(state)}


def checkpoints() -> dict[str, torch.Tensor]:
    """``ckpt/ddpm/*`` and ``ckpt/rf/*``: a 4-step training run each (tiny DDPM UNet on random digits; toy MLP
    rectified flow)."""
    from diffsamp.training.ddpm import DDPMTrainOptions, train_ddpm
    from diffsamp.training.checkpoint import CHECKPOINT, read_checkpoint
    from diffsamp.training.loop import TrainConfig
    from diffsamp.training.rectified_flow import RFTrainOptions, train_rf

    out = {}
    cfg = dict(steps=4, lr=1e-3, warmup_steps=1, ema_decay=0.9, ckpt_every=0, log_every=2, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        images = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        opts = DDPMTrainOptions(dataset="random", batch_size=4, channels=(8, 16), sample_size=8, num_grid=0)
        train_ddpm(Path(tmp) / "ddpm", opts, TrainConfig(**cfg), progress=False, images=images)
        out.update(_checkpoint_entries("ddpm", read_checkpoint(Path(tmp) / "ddpm" / CHECKPOINT)[0]))
        ropts = RFTrainOptions(dataset="toy:moons", batch_size=8, mlp_hidden=16, mlp_depth=2, num_grid=0)
        train_rf(Path(tmp) / "rf", ropts, TrainConfig(**cfg), progress=False)
        out.update(_checkpoint_entries("rf", read_checkpoint(Path(tmp) / "rf" / CHECKPOINT)[0]))
    return out


def compute() -> dict[str, torch.Tensor]:
    """Everything the fixture holds, on one CPU thread (so the numbers do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {**samples(), **forward_passes(), **analytic(), **rk45_pairs(), **straightness_figures(), **fid_statistic(),
                **checkpoints()}
    finally:
        torch.set_num_threads(threads)


def write(path: Path) -> None:
    """Compute the fixture and store it at ``path`` (safetensors)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in compute().items()}, str(path))
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB)")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "--write":
        sys.exit("usage: python -m tests.regression --write [PATH]")
    write(Path(sys.argv[2]) if len(sys.argv) > 2 else FIXTURE)
