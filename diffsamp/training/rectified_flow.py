"""Rectified-flow training: 1-RF on data, k-RF on reflow pairs, and k-step distillation (RF Alg. 1, §2.2).

Our time runs t = 0 data → t = 1 noise (``diffsamp.models.rectified_flow``). For a pair (x0, x1) — data or
a reflow sample x0, noise or source draw x1 — the straight interpolation is x_t = (1 − t)·x0 + t·x1 and the
velocity-matching loss is  E_t ‖v_θ(x_t, t) − (x1 − x0)‖²  (RF paper Alg. 1 with t_paper = 1 − t,
v_paper = −v; mean over coordinates, then over the batch, as the RF code's ``reduce_mean``).

* ``rf``:      x0 ~ data, x1 ~ N(0, I) independent (or a toy's source); t ~ U(0, 1) or logit-normal.
* ``reflow``:  (x0, x1) = (Z_0, Z_1) pairs from the previous flow's ODE (``diffsamp.training.pairs``).
* ``distill``: the sampler's own K-step Euler grid t_k = t_max·(1 − k/K) (K = 1: t = t_max only), on the
  straight line through both ends of a pair *as the sampler sees them* — x_{t_max} = x1 exactly — i.e.
  x_t = x0 + (t/t_max)(x1 − x0), target (x1 − x0)/t_max. Then K-step Euler from z reproduces the pair's
  sample exactly when the loss is 0, and for K = 1 the loss is the L2 distance of the one-step output
  z − t_max·v(z, t_max) to the pair's sample, divided by t_max² (the RF paper's L2 distillation).

Every run directory ends with ``model.safetensors`` + ``model.json`` (EMA weights; ``load_rf(RUN_DIR)``),
next to the resumable ``checkpoint.safetensors`` of the shared loop (``diffsamp.training.loop``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsamp import dist
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
from diffsamp.models.networks import MLPVelocity, call_velocity, make_unet
from diffsamp.models.parameterization import T_MAX
from diffsamp.models.rectified_flow import RFDenoiser, save_rf
from diffsamp.models.zoo import load
from diffsamp.training.cards import training_record
from diffsamp.training.loop import TrainConfig, TrainResult, train_loop
from diffsamp.training.pairs import load_pairs, pair_batches

T_SAMPLINGS = ("uniform", "logit-normal")


def _bcast(t: Tensor, ndim: int) -> Tensor:
    return t.reshape((-1,) + (1,) * (ndim - 1))


class RFLoss:
    """Velocity matching on straight interpolations (see the module docstring).

    ``paired``: batches are (B, 2, ...) = [x0, x1]; otherwise (B, ...) data and x1 ~ N(0, I) is drawn here.
    ``distill_steps``: K > 0 switches to the K-step distillation grid and line.
    """

    def __init__(
        self,
        *,
        time_scale: float,
        paired: bool = False,
        t_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        distill_steps: int = 0,
        t_max: float = T_MAX,
    ) -> None:
        if t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {t_sampling!r}")
        if distill_steps < 0:
            raise ValueError(f"distill_steps must be ≥ 0, got {distill_steps}")
        if distill_steps and not paired:
            raise ValueError("distillation needs (noise, sample) pairs")
        self.time_scale = float(time_scale)
        self.paired = paired
        self.t_sampling = t_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.distill_steps = distill_steps
        self.t_max = t_max

    def sample_t(self, n: int, device: torch.device, generator: torch.Generator) -> Tensor:
        if self.distill_steps:
            k = torch.randint(0, self.distill_steps, (n,), device=device, generator=generator)
            return self.t_max * (1 - k.float() / self.distill_steps)
        if self.t_sampling == "uniform":
            return torch.rand(n, device=device, generator=generator)
        u = torch.randn(n, device=device, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * u)

    def __call__(self, model: nn.Module, batch: Tensor, generator: torch.Generator) -> Tensor:
        if self.paired:
            x0, x1 = batch[:, 0], batch[:, 1]
        else:
            x0 = batch
            x1 = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t = self.sample_t(x0.shape[0], x0.device, generator)
        tb = _bcast(t, x0.ndim).to(x0.dtype)
        if self.distill_steps:
            x_t = x0 + (tb / self.t_max) * (x1 - x0)
            target = (x1 - x0) / self.t_max
        else:
            x_t = (1 - tb) * x0 + tb * x1
            target = x1 - x0
        pred = call_velocity(model, x_t, t * self.time_scale)
        return torch.nn.functional.mse_loss(pred.float(), target.float())


# ------------------------------------------------------------------------------------------ options
@dataclass
class RFTrainOptions:
    """What is trained and on what (the loop's own settings are a ``TrainConfig``)."""

    dataset: str = "mnist"  # mnist, fashion-mnist or toy:NAME (rf); ignored for reflow / distill
    data_dir: str | None = None
    batch_size: int = 128
    t_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # new image networks (the DDPM zoo architecture by default, diffsamp.training.ddpm)
    channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] | None = None
    dropout: float = 0.0
    sample_size: int = 32
    # new toy networks
    mlp_hidden: int = 256
    mlp_depth: int = 3
    init: str | None = None  # start from this rectified flow (zoo name or path)
    num_grid: int = 64
    extra_info: dict[str, Any] = field(default_factory=dict)


def resolve_rf(name_or_path: str, *, what: str = "--init") -> RFDenoiser:
    """A rectified flow by zoo name or path; a clear error for anything else (e.g. a DDPM)."""
    model = load(name_or_path)
    if not isinstance(model, RFDenoiser):
        raise ValueError(f"{what} {name_or_path!r} is not a rectified flow (it is a {type(model).__name__} with "
                         f"prior {model.prior!r}); reflow and distillation fine-tune a velocity network: pass a "
                         "model trained by `diffsamp train rf|reflow`, or leave --init out to start from scratch")
    return model


def _new_network(options: RFTrainOptions, shape: tuple[int, ...]) -> tuple[nn.Module, float]:
    if len(shape) == 1:
        return MLPVelocity(shape[0], options.mlp_hidden, options.mlp_depth), 1.0
    c, h, w = shape
    if h != w:
        raise ValueError(f"square images expected, got {h}×{w}")
    net = make_unet(in_channels=c, sample_size=h, channels=options.channels, layers_per_block=options.layers_per_block,
                    attention_levels=options.attention_levels, dropout=options.dropout)
    return net, 999.0


def _grid_sampler(time_scale: float, shape: tuple[int, ...], n: int, source: str):
    """EMA sample grids for the loop (images: Euler with 1 and 32 steps; toys: a scatter plot)."""

    def sample(model: nn.Module, step: int, run_dir: Path) -> None:
        from diffsamp.api import generate

        den = RFDenoiser(model, time_scale=time_scale, source=source)
        if len(shape) == 1:
            _toy_scatter(den, n * 16, run_dir / "samples" / f"step{step:07d}.png")
            return
        from diffsamp.images import save_grid

        for steps in (1, 32):
            res = generate(den, shape, sampler="euler", schedule="rf", steps=steps, seeds=range(n))
            save_grid(res.images.clamp(-1, 1), run_dir / "samples" / f"step{step:07d}-euler{steps}.png", nrow=8)

    return sample


def _toy_scatter(den: RFDenoiser, n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffsamp.data.toys import draw_noise
    from diffsamp.training.pairs import integrate_on_schedule

    z = draw_noise(den.source, (2,), 0, n, 0)
    dev = next(den.network.parameters()).device
    x, _ = integrate_on_schedule(den, z, sampler="euler", schedule="rf", steps=64, device=dev)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(z[:, 0], z[:, 1], s=1, alpha=0.3, label="source")
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5, label="samples (Euler 64)")
    ax.legend(loc="upper right", markerscale=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finish(
    out: Path,
    ema_model: nn.Module,
    *,
    time_scale: float,
    source: str,
    info: dict[str, Any],
    config: TrainConfig,
    result: TrainResult,
    device: torch.device,
) -> Path:
    record = training_record(config, result, device, out)
    keep = ("trainer", "rectification", "distill_steps", "sampling", "dataset", "shape", "warm_start")
    card = {
        **info,
        "training": {"steps": result.step, **{k: v for k, v in record.items() if k not in ("hardware", "software",
                     "final_loss", "date")}, "seconds": round(result.seconds, 1),
                     **{k: record[k] for k in ("hardware", "software", "final_loss", "date")}},
        "parameters": sum(p.numel() for p in ema_model.parameters()),
        "weights": "EMA",
    }
    top = {k: info[k] for k in keep if k in info}
    den = RFDenoiser(ema_model, time_scale=time_scale, source=source, info={**top, "card": card})
    weights, _ = save_rf(den, out / "model.safetensors")
    return weights


def _run(
    kind: str,
    out: str | os.PathLike,
    options: RFTrainOptions,
    config: TrainConfig,
    *,
    net: nn.Module,
    time_scale: float,
    shape: tuple[int, ...],
    source: str,
    batches: Any,
    loss_fn: RFLoss,
    info: dict[str, Any],
    device: torch.device,
    resume: bool,
    progress: bool,
    stop_after: int | None,
) -> TrainResult:
    out = Path(out)
    config.extra = {**config.extra, "trainer": kind, "shape": list(shape), "time_scale": time_scale,
                    "source": source, "batch_size": options.batch_size, "t_sampling": options.t_sampling,
                    "init": options.init, "parameters": sum(p.numel() for p in net.parameters()), **info}
    sample_fn = _grid_sampler(time_scale, shape, options.num_grid, source) if options.num_grid else None
    result, ema = train_loop(net, loss_fn, batches, config, out, device=device, resume=resume, sample_fn=sample_fn,
                             progress=progress, stop_after=stop_after)
    if dist.is_main() and (result.finished or (result.step > 0 and not result.interrupted and stop_after is None)):
        _finish(out, ema.shadow, time_scale=time_scale, source=source,
                info={**info, "shape": list(shape), "batch_size": options.batch_size,
                      "t_sampling": options.t_sampling, "init": options.init, **options.extra_info},
                config=config, result=result, device=device)
    return result


def _init_network(
    options: RFTrainOptions, shape: tuple[int, ...], *, allow_diffusion: bool = False
) -> tuple[nn.Module, float, dict[str, Any]]:
    """A fresh network, or a copy of ``options.init``'s after checking it fits ``shape``.

    With ``allow_diffusion`` (1-RF training only) ``options.init`` may also be a diffusers DDPM/score UNet: its
    weights warm-start the velocity network (same architecture and 0…999 timestep embedding, t = 1 ↔ timestep
    999 at the noise end); the velocity loss retrains what the output means. The objective and the independent
    noise–data coupling are those of 1-RF, so the result is a 1-rectified flow whatever it started from.
    """
    if options.init is None:
        net, ts = _new_network(options, shape)
        return net, ts, {}
    if allow_diffusion:
        model = load(options.init)
        if isinstance(model, DiffusersUNetDenoiser):
            _check_init_shape(options.init, model.sample_shape, shape)
            net = copy.deepcopy(model.network).float().train().requires_grad_(True)
            return net, 999.0, {"warm_start": f"{options.init} (diffusion UNet weights)"}
    init = resolve_rf(options.init)
    _check_init_shape(options.init, init.sample_shape, shape)
    net = init.network.float().train().requires_grad_(True)
    return net, init.time_scale, {k: init.info[k] for k in ("rectification", "distill_steps", "dataset")
                                  if k in init.info}


def _check_init_shape(name: str, init_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
    if tuple(init_shape) != tuple(shape):
        raise ValueError(f"--init {name!r} takes samples of shape {tuple(init_shape)} but the data/pairs "
                         f"have shape {tuple(shape)}")


def train_rf(
    out: str | os.PathLike,
    options: RFTrainOptions,
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    images: Tensor | None = None,
) -> TrainResult:
    """Train a 1-rectified flow on ``options.dataset`` (mnist, fashion-mnist, toy:NAME) into ``out``.

    ``images`` (uint8 (N, C, H, W)) replaces loading the data set (tests, custom data).
    """
    device = torch.device(device)
    torch.manual_seed(config.seed)  # the initial weights are a function of the seed
    dataset = options.dataset
    if dataset.startswith("toy:"):
        from diffsamp.data.toys import ToyBatches, get_toy

        toy = get_toy(dataset)
        shape: tuple[int, ...] = (2,)
        batches: Any = ToyBatches(toy, options.batch_size, seed=config.seed, device=device)
        source, paired = toy.source_name, True
        n_train = None
    else:
        from diffsamp.data import BatchSampler, load_dataset_uint8

        if images is None:
            images = load_dataset_uint8(dataset, "train", options.data_dir, pad_to=options.sample_size)
        shape = tuple(int(s) for s in images.shape[1:])
        batches = BatchSampler(images, options.batch_size, seed=config.seed, device=device)
        source, paired = "normal", False
        n_train = int(images.shape[0])
    net, time_scale, init_info = _init_network(options, shape, allow_diffusion=True)
    loss_fn = RFLoss(time_scale=time_scale, paired=paired, t_sampling=options.t_sampling,
                     logit_mean=options.logit_mean, logit_std=options.logit_std)
    info = {"trainer": "rf", "rectification": 1, "dataset": dataset, "train_images": n_train,
            "objective": "velocity matching on straight interpolations (1-rectified flow)",
            "sampling": {"sampler": "euler", "schedule": "rf", "steps": 32},
            **{k: v for k, v in init_info.items() if k != "dataset"}}
    return _run("rf", out, options, config, net=net, time_scale=time_scale, shape=shape, source=source,
                batches=batches, loss_fn=loss_fn, info=info, device=device, resume=resume, progress=progress,
                stop_after=stop_after)


def _pairs_for(pairs_dir: str | os.PathLike, allow_partial: bool):
    pairs = load_pairs(pairs_dir, allow_partial=allow_partial)
    return pairs, tuple(pairs.shape)


def train_reflow(
    out: str | os.PathLike,
    pairs_dir: str | os.PathLike,
    options: RFTrainOptions,
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    allow_partial: bool = False,
) -> TrainResult:
    """Train the (k+1)-rectified flow on the pairs of a k-rectified flow (or any model's ODE), from ``options.init``."""
    device = torch.device(device)
    torch.manual_seed(config.seed)
    pairs, shape = _pairs_for(pairs_dir, allow_partial)
    net, time_scale, init_info = _init_network(options, shape)
    source = pairs.meta.get("source", "normal")
    batches = pair_batches(pairs, options.batch_size, seed=config.seed, device=device)
    loss_fn = RFLoss(time_scale=time_scale, paired=True, t_sampling=options.t_sampling,
                     logit_mean=options.logit_mean, logit_std=options.logit_std)
    teacher_k = pairs.meta.get("rectification")
    k = int(teacher_k) + 1 if teacher_k is not None else None
    info = {"trainer": "reflow", "rectification": k, "dataset": _pairs_dataset(pairs, init_info),
            "pairs": _pairs_summary(pairs_dir, pairs),
            "objective": "velocity matching on straight interpolations of reflow pairs (k-rectified flow)",
            "sampling": {"sampler": "euler", "schedule": "rf", "steps": 8}}
    return _run("reflow", out, options, config, net=net, time_scale=time_scale, shape=shape, source=source,
                batches=batches, loss_fn=loss_fn, info=info, device=device, resume=resume, progress=progress,
                stop_after=stop_after)


def train_distill(
    out: str | os.PathLike,
    pairs_dir: str | os.PathLike,
    options: RFTrainOptions,
    config: TrainConfig,
    *,
    distill_steps: int = 1,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    allow_partial: bool = False,
) -> TrainResult:
    """Distill the coupling of ``pairs_dir`` into a ``distill_steps``-step Euler generator (L2), from ``options.init``."""
    if distill_steps < 1:
        raise ValueError(f"distill steps must be ≥ 1, got {distill_steps}")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    pairs, shape = _pairs_for(pairs_dir, allow_partial)
    net, time_scale, init_info = _init_network(options, shape)
    source = pairs.meta.get("source", "normal")
    batches = pair_batches(pairs, options.batch_size, seed=config.seed, device=device)
    loss_fn = RFLoss(time_scale=time_scale, paired=True, distill_steps=distill_steps)
    info = {"trainer": "distill", "distill_steps": distill_steps,
            "rectification": pairs.meta.get("rectification"), "dataset": _pairs_dataset(pairs, init_info),
            "pairs": _pairs_summary(pairs_dir, pairs),
            "objective": f"{distill_steps}-step Euler distillation of the pairs' coupling (L2)",
            "sampling": {"sampler": "euler", "schedule": "rf", "steps": distill_steps}}
    return _run("distill", out, options, config, net=net, time_scale=time_scale, shape=shape, source=source,
                batches=batches, loss_fn=loss_fn, info=info, device=device, resume=resume, progress=progress,
                stop_after=stop_after)


def _pairs_dataset(pairs: Any, init_info: dict[str, Any]) -> str | None:
    """The data set behind the pairs: recorded in their meta, else that of the ``--init`` flow."""
    return pairs.meta.get("dataset") or init_info.get("dataset")


def _pairs_summary(pairs_dir: str | os.PathLike, pairs: Any) -> dict[str, Any]:
    m = pairs.meta
    return {"dir": str(pairs_dir), "num": len(pairs), "model": m.get("model"), "sampler": m.get("sampler"),
            "schedule": m.get("schedule"), "steps": m.get("steps"), "nfe": m.get("nfe"), "seed": m.get("seed")}


__all__ = [
    "RFLoss",
    "RFTrainOptions",
    "resolve_rf",
    "train_distill",
    "train_reflow",
    "train_rf",
]

