"""Learned-solver predictors on disk (AMED's ≈9k-weight network or static table, EPD's table):
``NAME.safetensors`` (the weights) + ``NAME.json`` (everything needed to sample).

The JSON records the base sampler, schedule and its parameters, the grid's σ's, NFE, AFS, the scales, the
model's identity and feature size, and the training card. Shipped predictors live in
``diffsamp/weights/predictors/<model>/<name>.*`` and are found by ``<model>/<name>`` (``mnist-ddpm/amed-nfe5``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffsamp.io import load_safetensors, read_json, save_safetensors, write_text
from diffsamp.models.zoo import WEIGHTS_DIR
from diffsamp.samplers.amed import AmedPredictor, StaticPredictor
from diffsamp.samplers.epd import AdaSdeTable, EpdTable
from diffsamp.samplers.grid import Grid

PREDICTORS_DIR = WEIGHTS_DIR / "predictors"
FORMAT = "diffsamp-amed-predictor/1"


class PredictorNotFoundError(ValueError):
    """No predictor file and no shipped predictor of that name."""


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_suffix(".safetensors"), p.with_suffix(".json")


Predictor = AmedPredictor | StaticPredictor | EpdTable


def save_predictor(predictor: Predictor, path: str | os.PathLike, config: dict[str, Any]) -> Path:
    """Write the predictor's weights and ``config`` (written last, atomically: its presence marks a complete file)."""
    weights, cfg_path = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in predictor.state_dict().items()}, weights)
    arch: dict[str, Any] = {"scale_dir": predictor.scale_dir, "scale_time": predictor.scale_time}
    if isinstance(predictor, StaticPredictor):
        arch.update(kind="static", num_steps=predictor.num_steps)
    elif isinstance(predictor, AdaSdeTable):
        arch.update(kind="adasde", num_steps=predictor.num_steps, num_points=predictor.num_points,
                    gamma_min=predictor.gamma_min, gamma_max=predictor.gamma_max)
    elif isinstance(predictor, EpdTable):
        arch.update(kind="epd", num_steps=predictor.num_steps, num_points=predictor.num_points)
    else:
        arch.update(kind="features", feature_dim=predictor.feature_dim)
        if predictor.num_steps:
            arch.update(num_steps=predictor.num_steps)
        if predictor.first_logits is not None:
            arch.update(first_step_static=True)
    write_text(cfg_path, json.dumps({"format": FORMAT, "predictor": arch, **config}, indent=2) + "\n")
    return cfg_path


def resolve_predictor(name_or_path: str | os.PathLike) -> Path:
    """The JSON of a predictor given by path, or by shipped name ``<model>/<name>``; a clear error otherwise."""
    weights, cfg = _paths(name_or_path)
    if cfg.is_file() and weights.is_file():
        return cfg
    p = Path(name_or_path)
    if p.is_dir() and (p / "predictor.json").is_file():
        return p / "predictor.json"
    shipped = _paths(PREDICTORS_DIR / str(name_or_path))[1]
    if shipped.is_file():
        return shipped
    raise PredictorNotFoundError(
        f"no learned-solver predictor {str(name_or_path)!r}: give a trained predictor's directory or .json, "
        f"or a shipped name ({', '.join(shipped_predictors()) or 'none shipped'})"
    )


def predictor_digest(name_or_path: str | os.PathLike) -> str:
    """The first 16 hex digits of the SHA-256 of a predictor's weights file: what a cached result was made with."""
    weights = _paths(resolve_predictor(name_or_path))[0]
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def load_predictor(name_or_path: str | os.PathLike) -> Predictor:
    """Rebuild a saved predictor; ``.config`` holds its JSON, ``.grid_sigmas`` the σ's it was trained on and
    ``.digest`` its ``predictor_digest``."""
    cfg_path = resolve_predictor(name_or_path)
    cfg = read_json(cfg_path, fmt=FORMAT, what=f"an AMED predictor ({FORMAT})")
    weights = _paths(cfg_path)[0]
    pred: Predictor
    try:
        arch = cfg["predictor"]
        if arch["kind"] == "static":
            pred = StaticPredictor(arch["num_steps"], scale_dir=arch["scale_dir"], scale_time=arch["scale_time"])
        elif arch["kind"] == "adasde":
            pred = AdaSdeTable(arch["num_steps"], arch["num_points"], scale_dir=arch["scale_dir"],
                               scale_time=arch["scale_time"], gamma_max=arch["gamma_max"],
                               gamma_min=arch["gamma_min"])
        elif arch["kind"] == "epd":
            pred = EpdTable(arch["num_steps"], arch["num_points"], scale_dir=arch["scale_dir"],
                            scale_time=arch["scale_time"])
        else:
            pred = AmedPredictor(arch["feature_dim"], scale_dir=arch["scale_dir"], scale_time=arch["scale_time"],
                                 num_steps=arch.get("num_steps", 0),
                                 first_step_static=arch.get("first_step_static", False))
        grid_sigmas = torch.tensor(cfg["grid"], dtype=torch.float64)
        for key in ("sampler", "schedule", "nfe", "afs"):
            cfg[key]  # noqa: B018 - what sampling with it reads
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_path} is not a complete AMED predictor description "
                         f"({type(exc).__name__}: {exc})") from None
    try:
        pred.load_state_dict(load_safetensors(weights))
    except RuntimeError as exc:  # the weights do not fit the architecture the JSON describes
        raise ValueError(f"{weights} does not fit {cfg_path}: {str(exc).splitlines()[0]}") from None
    pred.eval().requires_grad_(False)
    pred.config = cfg  # type: ignore[attr-defined]
    pred.grid_sigmas = grid_sigmas  # type: ignore[attr-defined]
    pred.digest = predictor_digest(cfg_path)  # type: ignore[attr-defined]
    return pred


def describe_predictor(arch: dict[str, Any]) -> str:
    """What a predictor file's ``predictor`` entry holds, in words: "per-sample predictor", "static predictor",
    "EPD table of K points" or "AdaSDE table of K points" (bench settings and ``diffsamp models`` say it so)."""
    points = arch.get("num_points")
    return {"static": "static predictor", "epd": f"EPD table of {points} points",
            "adasde": f"AdaSDE table of {points} points"}.get(arch["kind"], "per-sample predictor")


def check_predictor_model(predictor: Any, model_name: str) -> None:
    """A predictor trained for one model refuses another (by the recorded model name)."""
    trained = predictor.config.get("model")
    if trained is not None and Path(str(trained)).name != Path(str(model_name)).name:
        raise ValueError(f"this predictor was trained for model {trained!r}, not {model_name!r}")


def shipped_predictors() -> list[str]:
    """Names ``<model>/<name>`` of the predictors shipped in ``diffsamp/weights/predictors``."""
    if not PREDICTORS_DIR.is_dir():
        return []
    return sorted(f"{p.parent.name}/{p.stem}" for p in PREDICTORS_DIR.glob("*/*.json"))


def sampling_settings(predictor: Any) -> tuple[str, Grid, dict[str, Any]]:
    """(sampler, grid, knobs) to sample with a loaded predictor exactly as it was trained."""
    cfg = predictor.config
    knobs = {"predictor": predictor, "afs": bool(cfg["afs"]), **cfg.get("knobs", {})}
    return cfg["sampler"], Grid(predictor.grid_sigmas), knobs


def reset_to_base(predictor: torch.nn.Module) -> None:
    """Set ``predictor`` to the plain solver it starts from: logits 0 (r = ½, c = a = 1: DPM-Solver-2's step for
    ``amed``) for AMED predictors; the untrained table (r_k = k/(K+1), λ_k = 1/K) for EPD and AdaSDE."""
    with torch.no_grad():
        if isinstance(predictor, EpdTable):
            fresh = type(predictor)(predictor.num_steps, predictor.num_points)
            predictor.logits.copy_(fresh.logits)
            if isinstance(predictor, AdaSdeTable):
                predictor.gamma_logits.zero_()
        elif isinstance(predictor, StaticPredictor):
            predictor.logits.zero_()
        else:  # AmedPredictor: every head's output 0
            predictor.heads.weight.zero_()
            predictor.heads.bias.zero_()
            for extra in (predictor.step_logits, predictor.first_logits):
                if extra is not None:
                    extra.zero_()


def start_of(predictor: Predictor) -> Predictor:
    """A copy of a loaded ``predictor`` reset to the plain solver its training started from (``reset_to_base``), with
    the same ``.config`` and grid: the point a learned solver must beat on its own grid (its ``.digest`` gets a
    ``-start`` suffix, so a cache tells the two apart)."""
    import copy

    base = copy.deepcopy(predictor)
    reset_to_base(base)
    base.digest = f"{getattr(predictor, 'digest', 'unsaved')}-start"  # type: ignore[attr-defined]
    return base
