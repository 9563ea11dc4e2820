"""The model zoo: pretrained models shipped inside the package, plus one loader for every model source.

``load(name_or_path)`` accepts

* a zoo name — a folder ``diffsamp/weights/<name>/`` in diffusers' pipeline layout (``mnist-ddpm``,
  ``fashion-mnist-ddpm``) or a shipped rectified flow ``diffsamp/weights/<name>.json``;
* a local path — a diffusers directory (pipeline layout ``unet/`` + ``scheduler/``, or a flat UNet folder
  with ``scheduler_config.json``), a ``diffsamp train ddpm`` run directory (its exported model, else the
  EMA weights of its latest checkpoint), or a saved rectified flow;
* a Hugging Face Hub id such as ``google/ddpm-cifar10-32`` (needs the network the first time; diffusers
  caches it).

and returns a σ-space ``Denoiser``. ``available_models()`` lists the zoo, ``model_card(name)`` its card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from diffsamp.models.base import Denoiser

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def _is_diffusers_dir(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file() or (
        (path / "config.json").is_file() and (path / "scheduler_config.json").is_file()
    )


def _shipped_diffusers() -> list[str]:
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.is_dir() and _is_diffusers_dir(p))


def _shipped_rf() -> list[str]:
    try:
        from diffsamp.models.rectified_flow import shipped_rf_models
    except ImportError:
        return []
    return list(shipped_rf_models())


def available_models() -> list[str]:
    """Names of every model shipped with diffsamp (what ``diffsamp models`` lists)."""
    return sorted(set(_shipped_diffusers()) | set(_shipped_rf()))


def model_card(name: str) -> dict[str, Any]:
    """The card of a zoo model (architecture, data, training, quality); {} if it has none."""
    for p in (WEIGHTS_DIR / name / "card.json", WEIGHTS_DIR / f"{name}.card.json"):
        if p.is_file():
            return json.loads(p.read_text())
    rf_cfg = WEIGHTS_DIR / f"{name}.json"
    if rf_cfg.is_file():
        cfg = json.loads(rf_cfg.read_text())
        return dict(cfg.get("card", {})) if isinstance(cfg.get("card"), dict) else {}
    if name not in available_models():
        raise KeyError(f"no model {name!r} in the zoo; available: {', '.join(available_models()) or 'none'}")
    return {}


def model_path(name: str) -> Path:
    """Where a zoo model's files are."""
    if (WEIGHTS_DIR / name).is_dir():
        return WEIGHTS_DIR / name
    if (WEIGHTS_DIR / f"{name}.json").is_file():
        return WEIGHTS_DIR / f"{name}.json"
    raise KeyError(f"no model {name!r} in the zoo; available: {', '.join(available_models()) or 'none'}")


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def load(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    clip: bool | None = None,
) -> Denoiser:
    """A σ-space denoiser from a zoo name, a local directory/file, or a Hub id (see the module doc).

    ``clip`` (diffusers UNets only): clamp x̂0 to the data range as the model's scheduler config says
    (None), always (True) or never (False); see ``DiffusersUNetDenoiser``.
    """
    from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser

    name = str(name_or_path)
    if name in _shipped_diffusers():
        return DiffusersUNetDenoiser.from_pretrained(WEIGHTS_DIR / name, device=device, dtype=dtype, clip=clip)
    if name in _shipped_rf():
        return _load_rf(WEIGHTS_DIR / f"{name}.json", device, dtype)
    path = Path(name).expanduser()
    if path.exists():
        if _is_rf(path):
            return _load_rf(path, device, dtype)
        if path.is_dir() and _is_diffusers_dir(path):
            return DiffusersUNetDenoiser.from_pretrained(path, device=device, dtype=dtype, clip=clip)
        if path.is_dir() and (path / "checkpoint.safetensors").is_file():
            return load_ddpm_checkpoint(path / "checkpoint.safetensors", device=device, dtype=dtype, clip=clip)
        if path.is_file() and path.suffix == ".safetensors":
            return load_ddpm_checkpoint(path, device=device, dtype=dtype, clip=clip)
        raise ValueError(
            f"{path} is neither a diffusers model directory (unet/ + scheduler/, or config.json + "
            "scheduler_config.json), a diffsamp run directory, nor a saved rectified flow"
        )
    if _looks_like_hub_id(name):
        return DiffusersUNetDenoiser.from_pretrained(name, device=device, dtype=dtype, clip=clip)
    raise ValueError(
        f"unknown model {name!r}: not in the zoo ({', '.join(available_models()) or 'empty'}), not an existing "
        "path, and not a Hugging Face Hub id of the form owner/name"
    )


def _is_rf(path: Path) -> bool:
    try:
        from diffsamp.models.rectified_flow import is_rf_model
    except ImportError:
        return False
    return bool(is_rf_model(path))


def _load_rf(path: Path, device: Any, dtype: torch.dtype | None) -> Denoiser:
    from diffsamp.models.rectified_flow import load_rf

    return load_rf(path, device=device, dtype=dtype or torch.float32)


def load_ddpm_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    clip: bool | None = None,
) -> Denoiser:
    """The EMA model of a ``diffsamp train ddpm`` checkpoint as a denoiser (sample while it trains).

    Its x̂0 is clamped to [−1, 1] unless ``clip=False``, as the exported model's scheduler config says.
    """
    from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser, clip_range
    from diffsamp.training.ddpm import scheduler_kwargs
    from diffsamp.training.ddpm import unet_from_checkpoint

    unet, alphas_cumprod, prediction_type = unet_from_checkpoint(path)
    unet.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        unet.to(device=device, dtype=dtype)
    clip_sample = clip_range(scheduler_kwargs(prediction_type), clip)
    return DiffusersUNetDenoiser(unet, alphas_cumprod, prediction_type, clip_sample=clip_sample)


def model_dataset(name: str, model: Any = None) -> str | None:
    """The data set a model was trained on (``mnist``, ``fashion-mnist``, …), from its own info or its card.

    Looks at ``model.info["dataset"]`` (rectified flows), then the zoo card of ``name``, then a ``card.json``
    in ``name`` when it is a local model directory; None when none of them records it.
    """
    info = getattr(model, "info", None) or {}
    if info.get("dataset"):
        return str(info["dataset"])
    if name in available_models():
        return model_card(name).get("dataset")
    card = Path(name) / "card.json"
    if card.is_file():
        return json.loads(card.read_text()).get("dataset")
    return None


def sample_shape(model: Any) -> tuple[int, ...]:
    """One sample's shape (C, H, W) for a loaded model."""
    shape = getattr(model, "sample_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    cfg = getattr(getattr(model, "network", None), "config", None)
    if cfg is not None and hasattr(cfg, "in_channels") and hasattr(cfg, "sample_size"):
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))
    raise ValueError(f"cannot tell the sample shape of {type(model).__name__}; pass the shape explicitly")
