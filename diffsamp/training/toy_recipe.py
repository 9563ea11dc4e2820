"""The rectified-flow recipe on a 2-D toy, end to end (RF paper §5.1): 1-RF, reflow pairs, 2-RF, distillation,
and the figures of each model (straightness, distances to the target). The notebook and the tests call it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from diffsamp.data.toys import draw_noise, get_toy
from diffsamp.metrics.straightness import straightness
from diffsamp.metrics.toy_distances import mmd_rbf, sliced_wasserstein
from diffsamp.models.rectified_flow import RFDenoiser, load_rf
from diffsamp.training.loop import TrainConfig
from diffsamp.training.pairs import generate_pairs, integrate_on_schedule
from diffsamp.training.rectified_flow import RFTrainOptions, train_distill, train_reflow, train_rf


@dataclass
class ToyRun:
    """What ``rectify_toy`` produced: the models, their figures and the run directories."""

    models: dict[str, RFDenoiser]
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]
    target: Tensor
    source: Tensor


def rectify_toy(
    name: str,
    workdir: str | os.PathLike,
    *,
    train_steps: int = 600,
    reflow_steps: int = 600,
    distill_steps: int = 300,
    num_pairs: int = 4000,
    pair_euler_steps: int = 64,
    batch_size: int = 256,
    hidden: int = 128,
    depth: int = 3,
    lr: float = 2e-3,
    num_eval: int = 2000,
    seed: int = 0,
) -> ToyRun:
    """The whole RF recipe on a 2-D toy, with the commands' library functions: 1-RF on independent pairs,
    reflow pairs from its ODE (Euler), 2-RF fine-tuned from it, then one-step distillation of 2-RF.

    Metrics per model: straightness (Euler 100 steps) and the sliced Wasserstein-2 distance / MMD² of its
    one-step (and 100-step) Euler samples to fresh target draws.
    """
    toy = get_toy(name)
    work = Path(workdir)

    def cfg(steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, lr=lr, warmup_steps=min(50, steps // 4), ema_decay=0.99, ckpt_every=0,
                           log_every=max(1, steps // 4), seed=seed)

    def opts(init: str | None = None) -> RFTrainOptions:
        return RFTrainOptions(dataset=f"toy:{toy.name}", batch_size=batch_size, mlp_hidden=hidden, mlp_depth=depth,
                              init=init, num_grid=0)

    seconds: dict = {}
    t = time.perf_counter()
    train_rf(work / "rf1", opts(), cfg(train_steps), progress=False)
    seconds["1-RF"] = time.perf_counter() - t
    rf1 = load_rf(work / "rf1")
    t = time.perf_counter()
    generate_pairs(rf1, work / "pairs1", num=num_pairs, shape=(2,), sampler="euler", schedule="rf",
                   steps=pair_euler_steps, model_name="rf1", rectification=1, source=toy.source_name,
                   shard_size=num_pairs, batch_size=num_pairs, seed=seed + 10_000, progress=False)
    seconds["pairs"] = time.perf_counter() - t
    t = time.perf_counter()
    train_reflow(work / "rf2", work / "pairs1", opts(str(work / "rf1")), cfg(reflow_steps), progress=False)
    seconds["2-RF"] = time.perf_counter() - t
    rf2 = load_rf(work / "rf2")
    generate_pairs(rf2, work / "pairs2", num=num_pairs, shape=(2,), sampler="euler", schedule="rf",
                   steps=pair_euler_steps, model_name="rf2", rectification=2, source=toy.source_name,
                   shard_size=num_pairs, batch_size=num_pairs, seed=seed + 20_000, progress=False)
    t = time.perf_counter()
    train_distill(work / "distill", work / "pairs2", opts(str(work / "rf2")), cfg(distill_steps), progress=False)
    seconds["2-RF+distill"] = time.perf_counter() - t
    models = {"1-RF": rf1, "2-RF": rf2, "2-RF+distill": load_rf(work / "distill")}

    g = torch.Generator().manual_seed(seed + 99)
    target = toy.target(num_eval, g)
    z = draw_noise(toy.source_name, (2,), 0, num_eval, seed + 30_000)
    metrics: dict = {}
    for label, m in models.items():
        one, _ = integrate_on_schedule(m, z, sampler="euler", schedule="rf", steps=1)
        many, _ = integrate_on_schedule(m, z, sampler="euler", schedule="rf", steps=100)
        s = straightness(m, z[:500], steps=100)
        metrics[label] = {
            "straightness": s["S"], "straightness_err": s["S_err"], "relative_straightness": s["relative"],
            "sw_1step": sliced_wasserstein(one, target), "mmd_1step": mmd_rbf(one, target),
            "sw_100step": sliced_wasserstein(many, target), "mmd_100step": mmd_rbf(many, target),
        }
    metrics["data floor"] = {"sw": sliced_wasserstein(toy.target(num_eval, g), target),
                             "mmd": mmd_rbf(toy.target(num_eval, g), target)}
    return ToyRun(models, metrics, seconds, target, z)
