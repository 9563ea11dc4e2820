"""Schedule files: a grid as data. ``schedule.json`` holds the σ's (and, for a discrete-time model, the training
timesteps) of a learned schedule (GITS, learned steps), with how it was found; ``diffsamp sample --sigmas``, ``bench
--schedule ROW=FILE`` and ``diffsamp solver export`` read it. Schedules that won their bench cell ship in
``diffsamp/weights/schedules/<model>/<name>.json`` and are found by ``<model>/<name>``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from diffsamp.models.zoo import WEIGHTS_DIR
from diffsamp.samplers.grid import Grid

SCHEDULE_FORMAT = "diffsamp-schedule/1"
EXPORT_FORMATS = ("diffusers", "comfyui", "json")
SCHEDULES_DIR = WEIGHTS_DIR / "schedules"


def shipped_schedules() -> list[str]:
    """Names ``<model>/<name>`` of the learned schedules shipped in ``diffsamp/weights/schedules``."""
    if not SCHEDULES_DIR.is_dir():
        return []
    return sorted(f"{p.parent.name}/{p.stem}" for p in SCHEDULES_DIR.glob("*/*.json"))


def _locate(path: str | os.PathLike) -> Path:
    """A path as given, or the shipped schedule ``<model>/<name>`` where no such path exists."""
    p = Path(path)
    shipped = SCHEDULES_DIR / f"{path}.json"
    if not p.exists() and str(path).count("/") == 1 and shipped.is_file():
        return shipped
    return p


def is_schedule_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a schedule file (or a folder holding ``schedule.json``, or a shipped schedule),
    rather than a schedule name."""
    p = _locate(path)
    return (p.is_dir() and (p / "schedule.json").is_file()) or (p.suffix == ".json" and p.is_file())


def read_schedule(path: str | os.PathLike) -> tuple[Grid, dict[str, Any]]:
    """A ``schedule.json`` (a file, a folder holding one, or a shipped ``<model>/<name>``) → its grid and the
    whole record."""
    p = _locate(path)
    if p.is_dir():
        p = p / "schedule.json"
    if not p.is_file():
        shipped = ", ".join(shipped_schedules()) or "none"
        raise FileNotFoundError(f"{p}: no schedule file (shipped: {shipped}; write one with "
                                "`diffsamp train solver --method gits|steps`)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not a readable schedule file ({exc})") from None
    if doc.get("format") != SCHEDULE_FORMAT or "sigmas" not in doc:
        raise ValueError(f"{p}: not a diffsamp schedule file (format {doc.get('format')!r})")
    return Grid(torch.tensor(doc["sigmas"], dtype=torch.float64)), doc


def export_schedule(doc: dict[str, Any], fmt: str) -> str:
    """A schedule file's σ's in the form another tool takes: ``diffusers`` (JSON: ``sigmas`` with the final 0 for
    ``EulerDiscreteScheduler.set_timesteps(sigmas=…)`` or a pipeline's ``sigmas=``; for a discrete-time model also
    ``timesteps``, the σ's rounded to training timesteps, for schedulers that take ``set_timesteps(timesteps=…)``
    such as DDIM and DPMSolverMultistep), ``comfyui`` (one line of comma-separated σ's ending in 0, as custom-sigma
    nodes read them) or ``json`` (``{"sigmas": […]}``)."""
    sigmas = [float(v) for v in doc["sigmas"]]
    if fmt == "json":
        return json.dumps({"sigmas": sigmas}) + "\n"
    if fmt == "comfyui":
        return ", ".join(repr(v) for v in sigmas) + "\n"
    if fmt != "diffusers":
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    out: dict[str, Any] = {"sigmas": sigmas}
    if doc.get("timesteps") is not None:
        ints = [int(round(t)) for t in doc["timesteps"]]
        if len(set(ints)) != len(ints):
            raise ValueError("two σ's of the schedule round to the same training timestep; use the sigmas")
        out["timesteps"] = ints
    return json.dumps(out) + "\n"
