"""The model zoo: pretrained models shipped inside the package, plus one loader for every model source.

``load(name_or_path)`` accepts

* a zoo name — a folder ``diffsamp/weights/<name>/`` in diffusers' pipeline layout (``mnist-ddpm``,
  ``fashion-mnist-ddpm``) or a shipped rectified flow ``diffsamp/weights/<name>.json``;
* a local path — a diffusers directory (pipeline layout ``unet/`` + ``scheduler/``, or a flat UNet folder
  with ``scheduler_config.json``), a Stable-Diffusion-style pipeline folder (``model_index.json`` with a
  ``UNet2DConditionModel``, VAE and CLIP text encoder(s): ``sd_pipeline``), a ``diffsamp train ddpm`` run
  directory (its exported model, else the EMA weights of its latest checkpoint), or a saved rectified flow;
* a Hugging Face Hub id such as ``google/ddpm-cifar10-32`` or a Stable Diffusion repo (told apart by its
  ``model_index.json``; needs the network the first time; diffusers
  caches it).

and returns a σ-space ``Denoiser``. ``available_models()`` lists the zoo, ``model_card(name)`` its card.

Formats are a registry of ``(detect, load)`` pairs tried in order (``register_format``); a model family is its
module (adapter + format) plus one registration below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffsamp.models import diffusers_unet, dit, rectified_flow, sd_pipeline
from diffsamp.models.base import Denoiser

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

Loader = Callable[..., Denoiser]  # loader(path, *, device, dtype, clip) -> Denoiser


@dataclass(frozen=True)
class ModelFormat:
    """An on-disk model format: ``detect(path)`` says whether a local path holds one, ``load`` reads it."""

    name: str
    detect: Callable[[Path], bool]
    load: Loader


_FORMATS: list[ModelFormat] = []


def register_format(name: str, detect: Callable[[Path], bool], load: Loader) -> None:
    """Add a format; formats are tried in registration order, the first whose ``detect`` is true loads."""
    if any(f.name == name for f in _FORMATS):
        raise ValueError(f"model format {name!r} is already registered")
    _FORMATS.append(ModelFormat(name, detect, load))


def _load_rf(path: Path, *, device: Any = None, dtype: torch.dtype | None = None, clip: bool | None = None) -> Denoiser:
    return rectified_flow.load_rf(path, device=device, dtype=dtype or torch.float32)


register_format("rectified-flow", rectified_flow.is_rf_model, _load_rf)
register_format("sd-pipeline", sd_pipeline.is_sd_pipeline_dir, sd_pipeline.load_sd_pipeline)  # before "diffusers": it has unet/ too
register_format("diffusers", lambda p: p.is_dir() and diffusers_unet.is_diffusers_dir(p), diffusers_unet.load_diffusers)
register_format("ddpm-checkpoint", diffusers_unet.is_ddpm_checkpoint, diffusers_unet.load_ddpm_checkpoint)
register_format("dit", dit.is_dit_dir, dit.load_dit)


def find_format(path: str | os.PathLike) -> ModelFormat | None:
    """The first registered format that recognises ``path`` (None if none does)."""
    path = Path(path).expanduser()
    return next((f for f in _FORMATS if path.exists() and f.detect(path)), None)


def _shipped() -> dict[str, Path]:
    """Zoo name → path: every folder or ``NAME.json`` in ``diffsamp/weights`` that a format recognises."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    out = {}
    for p in sorted(WEIGHTS_DIR.iterdir()):
        if p.is_dir() and find_format(p) is not None:
            out[p.name] = p
        elif p.suffix == ".json" and not p.name.endswith(".card.json") and rectified_flow.is_rf_model(p):
            out[p.stem] = p
    return out


def available_models() -> list[str]:
    """Names of every model shipped with diffsamp (what ``diffsamp models`` lists)."""
    return sorted(_shipped())


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
    shipped = _shipped()
    if name not in shipped:
        raise KeyError(f"no model {name!r} in the zoo; available: {', '.join(available_models()) or 'none'}")
    return shipped[name]


def _damaged_description(path: Path) -> None:
    """A path no format recognises because one of its JSON descriptions is damaged (malformed ``model.json``,
    ``config.json``, …): a ValueError naming that file, rather than "neither … nor …"."""
    from diffsamp.io import read_json

    names = ("model.json", "model_index.json", "config.json", "unet/config.json", "scheduler_config.json",
             "scheduler/scheduler_config.json")
    candidates = [path / n for n in names] if path.is_dir() else [path] if path.suffix == ".json" else []
    for c in candidates:
        if c.is_file():
            read_json(c, what="a model description")
    rf_cfg = path / "model.json" if path.is_dir() else path
    if rf_cfg.name.endswith(".json") and rf_cfg.is_file():  # valid JSON, but not what a saved flow writes
        read_json(rf_cfg, fmt=rectified_flow.FORMAT, what="a diffsamp rectified-flow model")


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
    name = str(name_or_path)
    shipped = _shipped()
    path = shipped[name] if name in shipped else Path(name).expanduser()
    if path.exists():
        fmt = find_format(path)
        if fmt is None:
            _damaged_description(path)
            raise ValueError(
                f"{path} is neither a diffusers model directory (unet/ + scheduler/, or config.json + "
                "scheduler_config.json), a diffsamp run directory, nor a saved rectified flow"
            )
        return fmt.load(path, device=device, dtype=dtype, clip=clip)
    if _looks_like_hub_id(name):
        if sd_pipeline.is_sd_hub_id(name):
            return sd_pipeline.load_sd_pipeline(name, device=device, dtype=dtype, clip=clip)
        if dit.is_dit_hub_id(name):
            return dit.load_dit(name, device=device, dtype=dtype, clip=clip)
        return diffusers_unet.load_diffusers(name, device=device, dtype=dtype, clip=clip)
    raise ValueError(
        f"unknown model {name!r}: not in the zoo ({', '.join(available_models()) or 'empty'}), not an existing "
        "path, and not a Hugging Face Hub id of the form owner/name"
    )


def model_dataset(name: str, model: Denoiser | None = None) -> str | None:
    """The data set a model was trained on (``mnist``, ``fashion-mnist``, …), from its own info or its card.

    Looks at ``model.info["dataset"]`` (rectified flows), then the zoo card of ``name``, then a ``card.json``
    in ``name`` when it is a local model directory; None when none of them records it.
    """
    info = model.info if model is not None else {}
    if info.get("dataset"):
        return str(info["dataset"])
    if name in available_models():
        return model_card(name).get("dataset")
    card = Path(name) / "card.json"
    if card.is_file():
        return json.loads(card.read_text()).get("dataset")
    return None


def sample_shape(model: Denoiser) -> tuple[int, ...]:
    """One sample's shape (C, H, W) for a loaded model (its declared ``sample_shape``)."""
    return tuple(int(s) for s in model.sample_shape)
