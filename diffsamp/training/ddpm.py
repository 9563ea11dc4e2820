"""DDPM training (Ho et al. 2020, Alg. 1) of a diffusers ``UNet2DModel``, saved in diffusers' own format.

Discrete time t ∈ {0, …, T−1}, linear β from 1e-4 to 0.02, T = 1000; x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε, and the
loss is L_simple = ‖target − net(x_t, t)‖² with target ε (``epsilon``) or v = √ᾱ_t ε − √(1−ᾱ_t) x0
(``v_prediction``). The UNet receives the integer index t, as diffusers' schedulers feed it.

The finished run directory is a diffusers pipeline directory holding the EMA weights::

    RUN_DIR/model_index.json          DDPMPipeline.from_pretrained(RUN_DIR) works
    RUN_DIR/unet/                     UNet2DModel.from_pretrained(RUN_DIR / "unet")
    RUN_DIR/scheduler/                DDPMScheduler.from_pretrained(RUN_DIR / "scheduler")
    RUN_DIR/checkpoint.safetensors    the resumable training state (see ``diffsamp.training.loop``)
    RUN_DIR/log.jsonl, samples/       the loss curve and sample grids

and ``diffsamp.models.load(RUN_DIR)`` samples from it with every diffsamp sampler.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsamp import dist
from diffsamp.io import write_json
from diffsamp.models.diffusers_unet import (
    DiffusersUNetDenoiser,
    clip_range,
    save_diffusers,
    scheduler_kwargs,
    training_alphas_cumprod,
    unet_from_checkpoint,
)
from diffsamp.models.networks import DEFAULT_CHANNELS, DEFAULT_LAYERS_PER_BLOCK, make_unet
from diffsamp.models.zoo import load
from diffsamp.training.checkpoint import CHECKPOINT, read_checkpoint
from diffsamp.training.cards import hardware, training_record
from diffsamp.training.loop import TrainConfig, TrainResult, train_loop

PREDICTION_TYPES = ("epsilon", "v_prediction")

class DDPMLoss:
    """L_simple for ε- or v-prediction with uniformly drawn t ∈ {0, …, T−1} (Ho et al. 2020, Eq. 14).

    Class-conditional (``num_classes`` K > 0, batches of (images, labels)): each label is replaced by the null
    class K with probability ``label_dropout``, so one network learns both the conditional and the
    unconditional model that classifier-free guidance combines (Ho & Salimans 2022, Alg. 1).
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str = "epsilon", *, num_classes: int = 0,
                 label_dropout: float = 0.1) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.alphas_cumprod = alphas_cumprod.float()
        self.prediction_type = prediction_type
        self.num_classes = num_classes
        self.label_dropout = label_dropout
        self._cache: dict[torch.device, Tensor] = {}

    def _ac(self, device: torch.device) -> Tensor:
        if device not in self._cache:
            self._cache[device] = self.alphas_cumprod.to(device)
        return self._cache[device]

    def __call__(self, model: nn.Module, batch: Tensor | tuple[Tensor, Tensor], generator: torch.Generator) -> Tensor:
        x0, labels = batch if isinstance(batch, tuple) else (batch, None)
        if (labels is None) != (self.num_classes == 0):
            raise ValueError("a class-conditional loss needs (images, labels) batches, an unconditional one images")
        ac = self._ac(x0.device)
        b = x0.shape[0]
        t = torch.randint(0, ac.shape[0], (b,), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        a = ac[t].view(b, *([1] * (x0.ndim - 1)))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        target = eps if self.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        if labels is None:
            pred = model(x_t, t).sample
        else:
            drop = torch.rand(b, device=x0.device, generator=generator) < self.label_dropout
            pred = model(x_t, t, class_labels=torch.where(drop, self.num_classes, labels)).sample
        return torch.nn.functional.mse_loss(pred.float(), target.float())


@dataclass
class DDPMTrainOptions:
    """What a DDPM run trains and on what (the loop's own settings are a ``TrainConfig``)."""

    dataset: str = "mnist"
    data_dir: str | None = None
    prediction_type: str = "epsilon"
    batch_size: int = 128
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    layers_per_block: int = DEFAULT_LAYERS_PER_BLOCK
    attention_levels: tuple[int, ...] | None = None
    dropout: float = 0.0
    random_flip: bool = False
    sample_size: int = 32
    num_grid: int = 64
    init: str | None = None  # warm start: a DDPM UNet (zoo name, diffusers dir, run dir) whose architecture wins
    class_conditional: bool = False  # learn p(x | class) and, through label dropout, p(x) (null class = K)
    label_dropout: float = 0.1
    # the class embedding's learning rate relative to ``lr``: zero-initialised in a warm-started network, at the
    # base rate it barely moves (mnist-ddpm, lr 2e-4, 1 848 steps: row norms 0.03–0.10, class adherence at chance)
    class_lr_scale: float = 50.0


def _grid_sampler(prediction_type: str, n: int, shape: tuple[int, int, int]):
    """A ``sample_fn`` for the loop: an EMA sample grid with diffsamp's own Heun sampler, fixed seeds."""

    def sample(model: nn.Module, step: int, run_dir: Path) -> None:
        from diffsamp.api import generate
        from diffsamp.images import save_grid

        clip = clip_range(scheduler_kwargs(prediction_type))  # as the exported model will sample
        den = DiffusersUNetDenoiser(model, training_alphas_cumprod(), prediction_type, clip_sample=clip)
        res = generate(den, shape, sampler="heun", schedule="karras", steps=18, seeds=range(n))
        save_grid(res.images.clamp(-1, 1), run_dir / "samples" / f"step{step:07d}.png", nrow=8)

    return sample


def train_ddpm(
    out: str | os.PathLike,
    options: DDPMTrainOptions,
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    images: Tensor | None = None,
    labels: Tensor | None = None,
) -> TrainResult:
    """Train a DDPM on ``options.dataset`` into run directory ``out``; when the run reaches
    ``config.steps``, the EMA model is saved there in diffusers' format (see the module docstring).

    ``images`` (uint8 (N, C, H, W)) and, for a class-conditional run, ``labels`` ((N,) in 0…K−1) replace
    loading ``options.dataset`` (tests, custom data).
    """
    from diffsamp.data import BatchSampler, load_dataset_uint8, load_labels

    labels_given = labels
    out = Path(out)
    device = torch.device(device)
    if images is None:
        images = load_dataset_uint8(options.dataset, "train", options.data_dir, pad_to=options.sample_size)
    c, h, w = images.shape[1:]
    if h != w:
        raise ValueError(f"square images expected, got {h}×{w}")
    labels = None
    if options.class_conditional:
        if labels_given is None:
            labels_given = load_labels(options.dataset, "train", options.data_dir)
        labels = labels_given
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    torch.manual_seed(config.seed)  # the initial weights are a function of the seed
    if options.init is not None:
        unet = init_unet(options.init, (c, h, w), options.prediction_type, num_classes=num_classes)
    else:
        unet = make_unet(
            in_channels=c,
            sample_size=h,
            channels=options.channels,
            layers_per_block=options.layers_per_block,
            attention_levels=options.attention_levels,
            dropout=options.dropout,
            num_class_embeds=num_classes + 1 if num_classes else None,
        )
    n_params = sum(p.numel() for p in unet.parameters())
    if num_classes and options.class_lr_scale != 1.0:
        config.lr_scales = {**config.lr_scales, "class_embedding.": options.class_lr_scale}
    config.extra = {
        **config.extra,
        "trainer": "ddpm",
        "dataset": options.dataset,
        "num_train_images": int(images.shape[0]),
        "prediction_type": options.prediction_type,
        "batch_size": options.batch_size,
        "init": options.init,
        "conditioning": conditioning_record(num_classes, options.label_dropout),
        "class_lr_scale": options.class_lr_scale if num_classes else None,
        "parameters": n_params,
        "unet": {k: v for k, v in unet.config.items() if k != "_name_or_path"},  # no local paths
        "device": str(device),
        "hardware": hardware(device),
    }
    batches = BatchSampler(
        images, options.batch_size, seed=config.seed, device=device, random_flip=options.random_flip, labels=labels
    )
    loss_fn = DDPMLoss(training_alphas_cumprod().float(), options.prediction_type, num_classes=num_classes,
                       label_dropout=options.label_dropout)
    sample_fn = (_grid_sampler(options.prediction_type, options.num_grid, (c, h, w))
                 if options.num_grid and not num_classes else None)
    result, ema = train_loop(
        unet,
        loss_fn,
        batches,
        config,
        out,
        device=device,
        resume=resume,
        sample_fn=sample_fn,
        progress=progress,
        stop_after=stop_after,
    )
    if dist.is_main() and (result.finished or (result.step > 0 and not result.interrupted and stop_after is None)):
        # finished, or stopped by the time budget: export what we have (the checkpoint still resumes)
        save_diffusers(ema.shadow, out, options.prediction_type)
        write_card(out, options, config, result, device, n_params)
    return result


def conditioning_record(num_classes: int, label_dropout: float) -> dict[str, Any] | None:
    """What a class-conditional model takes, as its card and ``model_index.json`` record it; None if
    unconditional."""
    if not num_classes:
        return None
    return {"kind": "class", "num_classes": num_classes, "null_class": num_classes, "label_dropout": label_dropout}


def init_unet(init: str, shape: tuple[int, int, int], prediction_type: str, *, num_classes: int = 0) -> nn.Module:
    """The UNet of an existing DDPM model (zoo name, diffusers directory or run directory) to continue training
    from: same image shape, same prediction type and the same linear β schedule, else a ValueError.

    With ``num_classes`` K > 0 and an unconditional ``init``, the same architecture gains a class embedding of
    K + 1 rows (the last is the null class) initialised to zero, so training starts from the unconditional
    model for every class."""
    model = load(init, clip=False)
    if not isinstance(model, DiffusersUNetDenoiser):
        raise ValueError(f"--init {init!r} is not a DDPM UNet model (got {type(model).__name__})")
    if tuple(model.sample_shape) != tuple(shape):
        raise ValueError(f"--init {init!r} makes samples of shape {tuple(model.sample_shape)}, the data are {tuple(shape)}")
    if model.prediction_type != prediction_type:
        raise ValueError(f"--init {init!r} predicts {model.prediction_type!r}, this run trains {prediction_type!r}")
    if not torch.allclose(model.alphas_cumprod, training_alphas_cumprod(), rtol=1e-6, atol=1e-9):
        raise ValueError(f"--init {init!r} was trained on another noise schedule than DDPM's linear β 1e-4 → 0.02")
    unet = model.network.float()
    have = unet.config.get("num_class_embeds")
    if num_classes and have is None:
        from diffusers import UNet2DModel

        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        conditional = UNet2DModel(**{**config, "num_class_embeds": num_classes + 1})
        missing, unexpected = conditional.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or any(not k.startswith("class_embedding.") for k in missing):
            raise ValueError(f"--init {init!r}: its weights do not fit a class-conditional copy of its UNet")
        nn.init.zeros_(conditional.class_embedding.weight)
        unet = conditional
    elif (have or 0) != (num_classes + 1 if num_classes else 0):
        raise ValueError(f"--init {init!r} has num_class_embeds={have}; this run needs "
                         f"{num_classes + 1 if num_classes else None}")
    return unet.train().requires_grad_(True)


def write_card(
    out: Path,
    options: DDPMTrainOptions,
    config: TrainConfig,
    result: TrainResult,
    device: torch.device,
    n_params: int,
    *,
    log_dir: Path | None = None,
) -> Path:
    """``card.json``: what was trained, on what, for how long, on which hardware, and the final loss
    (the mean of the last 10 logged losses, from ``log_dir``'s log, default ``out``)."""
    record = training_record(config, result, device, Path(log_dir or out), hw=config.extra.get("hardware"))
    card = {
        "architecture": "diffusers UNet2DModel",
        "unet": config.extra.get("unet"),
        "parameters": n_params,
        "objective": f"DDPM L_simple, {options.prediction_type} prediction",
        "conditioning": config.extra.get("conditioning"),
        "scheduler": scheduler_kwargs(options.prediction_type),
        "dataset": options.dataset,
        "train_images": config.extra.get("num_train_images"),
        "image_size": options.sample_size,
        "steps": result.step,
        "batch_size": options.batch_size,
        **{k: record[k] for k in ("optimizer", "ema_decay", "mixed_precision", "seed")},
        "training_seconds": round(result.seconds, 1),
        **{k: record[k] for k in ("hardware", "software", "final_loss")},
        "weights": "EMA, fp32 safetensors",
        "date": record["date"],
    }
    path = Path(out) / "card.json"
    write_json(path, card)
    return path


def export_checkpoint(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, which: str = "ema") -> Path:
    """Write the EMA weights of ``run_dir``'s latest checkpoint in diffusers' format into ``out``
    (default: the run directory itself), with a card; training can go on meanwhile."""
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT if run_dir.is_dir() else run_dir
    unet, _, prediction_type = unet_from_checkpoint(ckpt, which=which)
    _, state = read_checkpoint(ckpt)
    out = Path(out) if out is not None else ckpt.parent
    save_diffusers(unet, out, prediction_type)
    cfg = state["config"]
    extra = cfg.get("extra", {})
    config = TrainConfig(**{k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__})
    config.adam_betas = tuple(config.adam_betas)  # type: ignore[assignment]
    options = DDPMTrainOptions(
        dataset=extra.get("dataset", "?"), prediction_type=prediction_type, batch_size=extra.get("batch_size", 0),
        sample_size=int(extra.get("unet", {}).get("sample_size", 32)),
    )
    result = TrainResult(step=int(state["step"]), finished=False, last_loss=None, seconds=float(state.get("elapsed_seconds", 0)))
    log_dir = ckpt.parent
    card = write_card(log_dir if out == log_dir else out, options, config, result, torch.device(extra.get("device", "cpu")),
                      int(extra.get("parameters", sum(p.numel() for p in unet.parameters()))), log_dir=log_dir)
    return card.parent
