"""Model cards: the record of how a model was trained, written beside its weights (``card.json`` for DDPMs,
the ``card`` entry of a rectified flow's JSON). One description of the hardware and of the training run."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from diffsamp.training.loop import TrainConfig, TrainResult, read_log


def hardware(device: torch.device) -> str:
    """``cuda: <name>``, or the CPU with its cores and torch threads."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def final_loss(log_dir: str | os.PathLike, step: int | None = None) -> float | None:
    """The mean of the last 10 logged losses (up to ``step``) of a run's ``log.jsonl``; None without any."""
    log = [r for r in read_log(log_dir) if "loss" in r and (step is None or r.get("step", 0) <= step)]
    tail = log[-10:]
    return (sum(r["loss"] for r in tail) / len(tail)) if tail else None


def training_record(config: TrainConfig, result: TrainResult, device: torch.device, log_dir: Path,
                    *, hw: str | None = None) -> dict[str, Any]:
    """What every card says about the run: optimizer, EMA, precision, seed, hardware, software, final loss, date."""
    bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
    return {
        "optimizer": {
            "name": "AdamW", "lr": config.lr, "warmup_steps": config.warmup_steps, "decay_steps": config.decay_steps,
            "weight_decay": config.weight_decay, "betas": list(config.adam_betas), "grad_clip": config.grad_clip,
        },
        "ema_decay": config.ema_decay,
        "mixed_precision": "bf16 autocast" if bf16 else "fp32",
        "seed": config.seed,
        "hardware": hw or hardware(device),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "final_loss": final_loss(log_dir, result.step),
        "date": time.strftime("%Y-%m-%d"),
    }
