"""The bit-identity fixture: samples of every shipped model with every main sampler, one FID statistic and
two short training checkpoints, computed at fixed seeds on one CPU thread.

``python -m tests.bit_identity --write`` (re)writes ``tests/fixtures/bit_identity.safetensors``;
``tests/test_bit_identity.py`` recomputes everything and compares with ``torch.equal``. Regenerate only when
a change is *meant* to alter numbers, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bit_identity.safetensors"
MODELS = ("mnist-ddpm", "fashion-mnist-ddpm", "mnist-rf", "mnist-2rf", "mnist-2rf-distill", "mnist-ddpm-reflow")
SAMPLERS = ("euler", "heun", "dpm2", "dpmpp3m", "ipndm", "ddim", "ddpm", "euler_maruyama")
SEEDS = (0, 1)
STEPS = 3


def _digest(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 of the tensors' bytes (sorted by name) as a uint8 tensor."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def samples() -> dict[str, torch.Tensor]:
    """``sample/MODEL/SAMPLER``: 2 images (seeds 0, 1), 3 steps on the model's default schedule."""
    import diffsamp
    from diffsamp.models import load, sample_shape

    out = {}
    for name in MODELS:
        model = load(name)
        for sampler in SAMPLERS:
            res = diffsamp.generate(model, sample_shape(model), sampler=sampler, steps=STEPS, seeds=SEEDS)
            out[f"sample/{name}/{sampler}"] = res.images
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
    """``fid/mu``, ``fid/sigma_sha256`` and ``fid/frechet``: Inception statistics of 2 mnist-ddpm samples and
    their Fréchet distance to 2 others; {} without the Inception weights."""
    import diffsamp
    from diffsamp.metrics import WeightsNotFoundError, frechet_distance, load_extractor
    from diffsamp.models import load

    try:
        extractor = load_extractor(None, "cpu")
    except WeightsNotFoundError:
        return {}
    from diffsamp.metrics.fid import compute_stats

    model = load("mnist-ddpm")
    a = diffsamp.generate(model, (1, 32, 32), sampler="euler", steps=2, seeds=range(2)).images
    b = diffsamp.generate(model, (1, 32, 32), sampler="euler", steps=2, seeds=range(2, 4)).images
    sa = compute_stats(a.clamp(-1, 1), extractor=extractor, progress=False)
    sb = compute_stats(b.clamp(-1, 1), extractor=extractor, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two images: a singular covariance, by design
        fd = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    return {"fid/mu": torch.from_numpy(sa.mu.copy()),
            "fid/sigma_sha256": _digest({"sigma": torch.from_numpy(sa.sigma.copy())}),
            "fid/frechet": torch.tensor([fd], dtype=torch.float64)}


def checkpoints() -> dict[str, torch.Tensor]:
    """``ckpt/ddpm`` and ``ckpt/rf``: SHA-256 of every tensor of a 4-step training checkpoint (tiny DDPM
    UNet on random digits; toy MLP rectified flow), and the EMA weights of the flow itself."""
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
        tensors, _ = read_checkpoint(Path(tmp) / "ddpm" / CHECKPOINT)
        out["ckpt/ddpm"] = _digest(tensors)
        ropts = RFTrainOptions(dataset="toy:moons", batch_size=8, mlp_hidden=16, mlp_depth=2, num_grid=0)
        train_rf(Path(tmp) / "rf", ropts, TrainConfig(**cfg), progress=False)
        tensors, _ = read_checkpoint(Path(tmp) / "rf" / CHECKPOINT)
        out["ckpt/rf"] = _digest(tensors)
        out["ckpt/rf/ema"] = torch.cat([v.flatten().float() for k, v in sorted(tensors.items()) if k.startswith("ema.")])
    return out


def compute() -> dict[str, torch.Tensor]:
    """Everything the fixture holds, on one CPU thread (so the numbers do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {**samples(), **rk45_pairs(), **straightness_figures(), **fid_statistic(), **checkpoints()}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    if "--write" not in sys.argv:
        sys.exit("usage: python -m tests.bit_identity --write")
    from safetensors.torch import save_file

    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in compute().items()}, str(FIXTURE))
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE) / 1024:.0f} KiB)")
