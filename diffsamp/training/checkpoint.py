"""Training checkpoints: one safetensors file holding the model, its EMA, the optimizer and every random state.

Tensors: ``model.*``, ``ema.*``, ``optim.<i>.<name>``, ``rng.*`` (torch CPU and CUDA, the loss's generator,
numpy's key array) and ``data.*`` (the batch source's tensors). JSON state in the file's metadata
(``diffsamp.io.STATE_KEY``): format, step, elapsed seconds, the ``TrainConfig``, the optimizer's
hyper-parameters and scalars, numpy's and Python's remaining RNG state and the batch source's position.
Written atomically (``diffsamp.io``); no pickled code.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from diffsamp.io import read_state_file, save_state_file

CHECKPOINT = "checkpoint.safetensors"
FORMAT_VERSION = 1


class BatchSource(Protocol):
    """Endless batches whose order is restorable (``diffsamp.data.BatchSampler`` is one)."""

    def next(self) -> Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...

def _rng_tensors_and_meta(loss_gen: torch.Generator, batches: BatchSource) -> tuple[dict[str, Tensor], dict]:
    t: dict[str, Tensor] = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            t[f"rng.cuda.{i}"] = s
    t["rng.loss_generator"] = loss_gen.get_state()
    mt = np.random.get_state()
    t["rng.numpy_keys"] = torch.from_numpy(np.asarray(mt[1], dtype=np.int64))
    data_state = batches.state_dict()
    meta_data: dict[str, Any] = {}
    for k, v in data_state.items():
        if isinstance(v, Tensor):
            t[f"data.{k}"] = v.cpu()
        else:
            meta_data[k] = v
    py = random.getstate()
    meta = {
        "numpy": [mt[0], int(mt[2]), int(mt[3]), float(mt[4])],
        "python": [py[0], list(py[1]), py[2]],
        "data": meta_data,
    }
    return t, meta


def _restore_rng(tensors: dict[str, Tensor], meta: dict, loss_gen: torch.Generator, batches: BatchSource) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    loss_gen.set_state(tensors["rng.loss_generator"])
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["rng.numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    data_state: dict[str, Any] = dict(meta["data"])
    for k, v in tensors.items():
        if k.startswith("data."):
            data_state[k[len("data.") :]] = v
    batches.load_state_dict(data_state)


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, sc in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def _prefixed(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def save_checkpoint(
    path: Path,
    *,
    step: int,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_gen: torch.Generator,
    batches: BatchSource,
    config: dict[str, Any],
    elapsed: float,
) -> None:
    """Write the whole training state to ``path`` atomically (see the module docstring)."""
    tensors = {**_prefixed("model", model), **_prefixed("ema", ema)}
    opt_t, opt_meta = _optimizer_split(optimizer)
    rng_t, rng_meta = _rng_tensors_and_meta(loss_gen, batches)
    tensors.update(opt_t)
    tensors.update(rng_t)
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "elapsed_seconds": elapsed,
        "config": config,
        "optimizer": opt_meta,
        "rng": rng_meta,
    }
    save_state_file(path, tensors, state)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(tensors, state) of a checkpoint; ``state['config']`` is the TrainConfig as a dict."""
    return read_state_file(path)


def load_checkpoint_into(
    path: Path,
    *,
    model: nn.Module,
    ema: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_gen: torch.Generator,
    batches: BatchSource,
) -> dict:
    """Restore a checkpoint into the given objects in place; returns its JSON state."""
    tensors, state = read_checkpoint(path)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT_VERSION}")
    model.load_state_dict(_unprefixed("model", tensors))
    ema.load_state_dict(_unprefixed("ema", tensors))
    opt_state = _optimizer_join(tensors, state["optimizer"])
    optimizer.load_state_dict(opt_state)
    _restore_rng(tensors, state["rng"], loss_gen, batches)
    return state
