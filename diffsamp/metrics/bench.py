"""``diffsamp bench``: FID/KID of samplers at given NFEs on one model, as the AMED paper's Table 2 (Zhou et al. 2024).

Each (sampler, NFE) cell gets the grid whose declared NFE is the target. A grid's last interval is a denoising
step σ_min → 0 counted in the NFE (``final_step="zero"``, the default: how samplers end in use), or the grid ends at
σ_min (``"sigma_min"``, the AMED paper's Table 2, whose leftover noise FID punishes); each cell's record states
which. Ending at σ_min, one-stage methods take NFE intervals and two-stage methods (heun, dpm2) (NFE + 1)/2
intervals with AFS on the first step at odd NFE, as the paper does (run as ``dpm2+amed`` with the fixed r of the method: r = 1 is Heun, r = ½ DPM-Solver-2 — the
identities are tested); learned samplers take their predictor's grid. The reference row (heun, 18 karras steps to
0, 35 NFE) and the data floor complete the table.
A learned sampler may be named with a variant, ``amed:static``: its row reads the predictor
``<model>/amed-static-nfe<N>`` (or ``--predictor amed:static:N=PATH``), so per-sample and sample-independent
predictors share one table. Cells are cached one JSON file each, so an interrupted bench resumes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from diffsamp import dist
from diffsamp.io import write_text
from diffsamp.models.base import Denoiser, default_schedule
from diffsamp.models.conditioning import Guidance, guidance_mismatch
from diffsamp.samplers import Grid, get_sampler, get_schedule
from diffsamp.samplers.amed import FixedPredictor
from diffsamp.samplers.registry import describe_knobs, learned_samplers
from diffsamp.samplers.amed_files import (PredictorNotFoundError, check_predictor_model, describe_predictor,
                                          load_predictor, sampling_settings, start_of)
from diffsamp.samplers.epd import epd_network_passes
from diffsamp.samplers.schedule_file import is_schedule_file, read_schedule

# How a cell's grid ends: "zero" (a last denoising step σ_min → 0 inside the NFE, as every sampler ends in use)
# or "sigma_min" (no step to 0, the AMED paper's Table 2); learned rows end where their predictor was trained to.
FINAL_STEPS = ("zero", "sigma_min")
# A row's default schedule and a two-stage method's r are on its registration (``SamplerSpec.planning``); without
# one, the model's own schedule (default_schedule: karras, polynomial ρ = 7, for diffusion models; rf for flows).


class NoGridError(ValueError):
    """A sampler (with its row's knobs) has no grid of the target NFE (e.g. restart, whose returns cost 2·steps)."""


@dataclass(frozen=True)
class CellPlan:
    """How one (sampler, NFE) cell is sampled: the registered method, its grid and knobs, and a description."""

    sampler: str
    nfe: int
    method: str
    grid: Grid
    knobs: dict[str, Any]
    schedule: str
    setting: str  # human-readable: grid, AFS, predictor
    predictor: str | None = None
    predictor_digest: str | None = None  # of the predictor's weights: a retrained predictor is a new cell
    row_knobs: str = ""  # knobs set for the row on top of the plan's own, e.g. "max_order=3"
    final_step: str = "sigma_min"  # "zero": the last interval is a denoising step to σ = 0; "sigma_min": ends there
    training: dict[str, Any] | None = None  # a learned row's training record (predictor card, schedule file)


def split_row(row: str) -> tuple[str, str | None]:
    """A bench row ``SAMPLER`` or ``SAMPLER:VARIANT`` → (registered sampler, variant or None). A learned sampler's
    variant names its predictor; a built-in sampler's is a label for a row with its own --schedule or --knob."""
    sampler, _, variant = row.partition(":")
    return sampler, variant or None


def predictor_name(model_name: str, sampler: str, nfe: int) -> str:
    """The shipped name of a learned sampler's predictor: ``<model>/<sampler>-nfe<N>`` (``+`` and ``:`` written ``-``),
    e.g. ``mnist-ddpm/ipndm-amed-nfe5`` or, for the row ``amed:static``, ``mnist-ddpm/amed-static-nfe5``."""
    return f"{Path(model_name).name}/{sampler.replace('+', '-').replace(':', '-')}-nfe{nfe}"


def plan_cell(
    model: Denoiser, model_name: str, sampler: str, nfe: int, *, schedules: Mapping[str, str] | None = None,
    predictors: Mapping[str, str] | None = None, knobs: Mapping[str, Mapping[str, Any]] | None = None,
    final_step: str = "zero", row_final_steps: Mapping[str, str] | None = None,
) -> CellPlan:
    """The grid and knobs whose declared NFE is ``nfe`` for ``sampler`` (see the module doc); ``knobs`` maps a row
    to sampler knobs set on top (e.g. ``{"ipndm": {"max_order": 3}}``), named in the cell's setting. ``final_step``
    (``FINAL_STEPS``; ``row_final_steps`` per row) says how a built-in sampler's grid ends; a learned row ends where
    its predictor was trained to end."""
    final = (row_final_steps or {}).get(sampler, final_step)
    extra = dict((knobs or {}).get(sampler, {}))
    base, variant = split_row(sampler)
    if variant and base not in learned_samplers() and not extra and not _row_schedules(sampler, schedules or {}):
        raise ValueError(f"row {sampler!r}: a built-in sampler's :VARIANT labels a row with its own settings; give "
                         f"--schedule {sampler}=… or --knob {sampler}:NAME=VALUE")
    typed = {}
    if extra:  # typed against the row's own sampler first: a knob may change the NFE a grid declares (restart)
        row_spec = get_sampler(split_row(sampler)[0])
        typed = {k: row_spec.parse_knob(k, v) if isinstance(v, str) and k in row_spec.knob_specs() else v
                 for k, v in extra.items()}
    plan = _default_plan(model, model_name, sampler, nfe, dict(schedules or {}), dict(predictors or {}), final, typed)
    if not extra:
        return plan
    spec = get_sampler(plan.method)
    unknown = sorted(set(extra) - set(spec.knob_specs()))
    if unknown:
        raise ValueError(f"row {sampler!r} runs {plan.method}, which has no knob {unknown[0]!r}; "
                         f"its knobs: {describe_knobs(spec.knob_specs()) or 'none'}")
    typed = {k: spec.parse_knob(k, v) if isinstance(v, str) else v for k, v in typed.items()}  # the method's own
    merged = {**plan.knobs, **typed}
    declared = spec.expected_nfe(plan.grid, **merged)
    if declared != nfe:
        raise ValueError(f"row {sampler!r} with {_knob_text(typed)} declares NFE {declared}, not {nfe}")
    text = _knob_text(typed)
    return replace(plan, knobs=merged, setting=f"{plan.setting}, {text}", row_knobs=text)


def _knob_text(knobs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(knobs.items()))


def _default_plan(model: Denoiser, model_name: str, sampler: str, nfe: int, schedules: dict[str, str],
                  predictors: dict[str, str], final: str, knobs: Mapping[str, Any]) -> CellPlan:
    base, variant = split_row(sampler)
    planning = get_sampler(base).planning
    if planning.learned is not None:
        key = f"{sampler}:{nfe}"
        plain = None if variant else predictors.get(str(nfe))  # a bare NFE=PATH names the plain row's predictor
        path = predictors.get(key) or plain or predictor_name(model_name, sampler, nfe)
        pred = load_predictor(path)
        check_predictor_model(pred, model_name)
        method, grid, knobs = sampling_settings(pred)
        if method != base:
            raise ValueError(f"predictor {path} is for {method}, not {base}")
        cfg = pred.config
        declared = get_sampler(method).expected_nfe(grid, **knobs)
        if declared != nfe:  # checked here, before any cell samples, not after the cell has run
            raise ValueError(f"predictor {path} samples at NFE {declared} ({cfg['schedule']}, {len(grid)} steps), "
                             f"not {nfe}: give {sampler}:{nfe}=PATH (or {nfe}=PATH) of a predictor trained for NFE "
                             f"{nfe} (`diffsamp train amed --nfe {nfe}`)")
        kind = describe_predictor(cfg["predictor"])
        end = "the last to 0" if grid.ends_at_zero else "to σ_min"
        setting = f"{cfg['schedule']}, {len(grid)} steps {end}, AFS {'on' if cfg['afs'] else 'off'}, {kind}"
        return CellPlan(sampler, nfe, method, grid, knobs, cfg["schedule"], setting, str(path), pred.digest,
                        final_step="zero" if grid.ends_at_zero else "sigma_min", training=cfg.get("training"))
    schedule = schedules.get(f"{sampler}:{nfe}") or schedules.get(sampler)
    if schedule is None and _row_schedules(sampler, schedules):
        raise NoGridError(f"{sampler} has no schedule for NFE {nfe} (give --schedule {sampler}:{nfe}=FILE)")
    schedule = schedule or planning.default_schedule or default_schedule(model)
    if is_schedule_file(schedule):  # a learned schedule (GITS, learned steps): its σ's, whatever the NFE asks
        return _plan_from_file(sampler, nfe, schedule, knobs)
    sched = get_schedule(schedule, model=model)
    if final not in FINAL_STEPS:
        raise ValueError(f"final step {final!r}: expected one of {', '.join(FINAL_STEPS)}")
    if final == "zero":
        return _plan_to_zero(sampler, nfe, sched, schedule, knobs)
    if planning.two_stage_r is not None:
        afs = nfe % 2 == 1
        grid = sched.grid((nfe + int(afs)) // 2, final_zero=False)
        if afs:
            knobs = {"predictor": FixedPredictor(planning.two_stage_r, 1.0), "afs": True}
            return CellPlan(sampler, nfe, "dpm2+amed", grid, knobs, schedule,
                            f"{schedule}, {len(grid)} steps to σ_min, AFS on", final_step="sigma_min")
        return CellPlan(sampler, nfe, base, grid, {}, schedule, f"{schedule}, {len(grid)} steps to σ_min",
                        final_step="sigma_min")
    spec = get_sampler(base)
    grid = sched.grid(nfe, final_zero=False)
    declared = spec.expected_nfe(grid)
    if declared != nfe:
        raise ValueError(f"{sampler} has no grid of NFE {nfe} ending at σ_min (declared {declared} for {nfe} steps)")
    return CellPlan(sampler, nfe, base, grid, {}, schedule, f"{schedule}, {nfe} steps to σ_min",
                    final_step="sigma_min")


def _row_schedules(row: str, schedules: Mapping[str, str]) -> list[str]:
    """The keys of ``schedules`` that set ``row``'s schedule: ``ROW`` (every NFE) and ``ROW:N`` (NFE N only, e.g.
    one learned schedule file per NFE)."""
    return [k for k in schedules if k == row or (k.rpartition(":")[0] == row and k.rpartition(":")[2].isdigit())]


def _plan_from_file(sampler: str, nfe: int, path: str, knobs: Mapping[str, Any]) -> CellPlan:
    """A row on a schedule file's grid: the cell exists where that grid's declared NFE is the target."""
    grid, doc = read_schedule(path)
    base = split_row(sampler)[0]
    spec = get_sampler(base)
    own = {k: v for k, v in knobs.items() if k in spec.knob_specs()}
    declared = spec.expected_nfe(grid, **own)
    if declared != nfe:
        raise NoGridError(f"{sampler} on the schedule {path} declares NFE {declared}, not {nfe}")
    how = doc.get("method") or "schedule file"
    end = "the last to 0" if grid.ends_at_zero else "ending at σ_min"
    return CellPlan(sampler, nfe, base, grid, {}, str(path),
                    f"{how} schedule {Path(path).name}, {len(grid)} steps, {end}",
                    final_step="zero" if grid.ends_at_zero else "sigma_min",
                    training={k: v for k, v in doc.items()
                              if k in ("method", "options", "seconds", "hardware", "processes", "init")})


def _plan_to_zero(sampler: str, nfe: int, sched: Any, schedule: str, knobs: Mapping[str, Any]) -> CellPlan:
    """The grid of ``nfe`` evaluations whose last interval goes from σ_min to 0 (one denoising evaluation, x̂0 at
    σ_min, as EDM's and diffusers' samplers end): the most intervals whose declared NFE is ``nfe``. A two-stage row at
    even NFE saves one evaluation with AFS on its first step (AMED §3.4). ``knobs``: the row's, which may change
    what a grid declares (restart's restart_steps)."""
    base = split_row(sampler)[0]
    spec = get_sampler(base)
    own = {k: v for k, v in knobs.items() if k in spec.knob_specs()}
    for k in range(nfe, 0, -1):
        grid = sched.grid(k, final_zero=True)
        if spec.expected_nfe(grid, **own) == nfe:
            return CellPlan(sampler, nfe, base, grid, {}, schedule, f"{schedule}, {k} steps, the last to 0",
                            final_step="zero")
    two_stage_r = spec.planning.two_stage_r
    if two_stage_r is not None:
        knobs = {"predictor": FixedPredictor(two_stage_r, 1.0), "afs": True}
        for k in range(nfe, 0, -1):
            grid = sched.grid(k, final_zero=True)
            if get_sampler("dpm2+amed").expected_nfe(grid, **knobs) == nfe:
                return CellPlan(sampler, nfe, "dpm2+amed", grid, knobs, schedule,
                                f"{schedule}, {k} steps, the last to 0, AFS on", final_step="zero")
    hint = f" with {_knob_text(knobs)}" if knobs else ""
    raise NoGridError(f"{sampler}{hint} has no grid of NFE {nfe} ending with a step to 0")


BUDGETS = ("nfe", "passes")


def plan_passes(plan: CellPlan) -> int:
    """Network passes per image of a plan without guidance: its NFE, or 1 + K per interval for EPD/AdaSDE (their K
    points share one call but each is a pass of the network)."""
    table = plan.knobs.get("predictor")
    learned = get_sampler(plan.method).planning.learned
    if learned is not None and learned.table and table is not None:
        return epd_network_passes(plan.grid, table.num_points, bool(plan.knobs.get("afs")))
    return plan.nfe


def plan_for_passes(model: Denoiser, model_name: str, row: str, passes: int, *, passes_per_nfe: int = 1,
                    **kw: Any) -> CellPlan:
    """The cell of ``row`` whose network passes per image are ``passes`` (``--budget passes``): the largest NFE
    whose plan makes that many (× ``passes_per_nfe``, 2 under classifier-free guidance); NoGridError if none."""
    for n in range(passes // passes_per_nfe, 0, -1):
        try:
            plan = plan_cell(model, model_name, row, n, **kw)
        except (NoGridError, PredictorNotFoundError):
            continue
        if plan_passes(plan) * passes_per_nfe == passes:
            return plan
    raise NoGridError(f"{row} has no grid of {passes} network passes per image")


def reference_plan(model: Denoiser) -> CellPlan:
    """The table's high-NFE reference row: Heun on 18 karras steps to σ = 0, 35 NFE (EDM, Karras et al. 2022)."""
    grid = get_schedule("karras", model=model).grid(18)
    return CellPlan("heun", 35, "heun", grid, {}, "karras", "karras, 18 steps to 0 (EDM)", final_step="zero")


@dataclass
class CellResult:
    """A finished cell: FID/KID, measured NFE, wall time and everything that made it."""

    sampler: str
    nfe_target: int | None
    nfe: int
    fid: float
    kid: float | None
    kid_std: float | None
    num: int
    seeds: str
    sampling_seconds: float
    feature_seconds: float
    setting: str
    clip: str
    grid: list[float]
    predictor: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    predictor_digest: str | None = None
    final_step: str | None = None  # FINAL_STEPS; None in records written before it was stated (read the grid's end)
    network_passes: int | None = None  # per image (NFE, ×2 under guidance); None in records written before


def cache_parts(model_name: str, reference: str, clip: str, shape: Sequence[int]) -> dict[str, Any]:
    """What every cell of one bench directory shares in its cache key (``run_cell`` adds the cell's own plan)."""
    return {"model": model_name, "reference": reference, "clip": clip, "shape": tuple(shape)}


def _cell_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_cell(
    model: Denoiser, plan: CellPlan, *, reference: Any, extractor: Any, num: int, batch_size: int, clip: str,
    cache_dir: Path, cache_parts: Mapping[str, Any], progress: bool = False, cached_only: bool = False,
    cond: Sequence[Any] | None = None, guidance: Guidance | None = None,
) -> CellResult | None:
    """Score one cell (or read it from ``cache_dir``): ``num`` samples, seeds 0…num−1, streamed into FID/KID.
    ``cached_only``: None for a cell not in the cache, instead of computing it. A conditional model takes one
    condition per seed (``cond``) and ``guidance``; both are part of ``cache_parts``."""
    from diffsamp.metrics.scoring import score_model

    parts = {**cache_parts, "sampler": plan.sampler, "nfe": plan.nfe, "method": plan.method,
             "grid": plan.grid.sigmas.tolist(), "predictor": plan.predictor, "setting": plan.setting, "num": num}
    if plan.predictor_digest is not None:
        parts["predictor_digest"] = plan.predictor_digest
    path = cache_dir / f"{plan.sampler.replace('+', '-').replace(':', '-')}-nfe{plan.nfe}-{_cell_key(parts)}.json"
    if all(dist.gather_objects(path.is_file())):  # under torchrun every rank takes the same branch
        return CellResult(**json.loads(path.read_text()))
    if cached_only:
        return None
    extra_kw: dict[str, Any] = {"cond": cond} if cond is not None else {}
    if guidance is not None:
        extra_kw["guidance"] = guidance
    q = score_model(model, reference, num=num, sampler=plan.method, schedule=plan.schedule, batch_size=batch_size,
                    extractor=extractor, grid=plan.grid, progress=progress, **extra_kw, **plan.knobs)
    res = CellResult(plan.sampler, plan.nfe, q.nfe, q.fid, q.kid, q.kid_std, num, f"0-{num - 1}",
                     round(q.sampling_seconds, 2), round(q.feature_seconds, 2), plan.setting, clip,
                     plan.grid.sigmas.tolist(), plan.predictor, predictor_digest=plan.predictor_digest,
                     extra={"knobs": plan.row_knobs} if plan.row_knobs else {}, final_step=plan.final_step,
                     network_passes=q.network_passes)
    if q.nfe != plan.nfe:
        raise RuntimeError(f"{plan.sampler} at NFE {plan.nfe}: measured {q.nfe} evaluations")
    if dist.is_main():  # under torchrun every rank holds the merged result; one writes it
        write_text(path, json.dumps(asdict(res), indent=2) + "\n")
    return res


def format_table(cells: Sequence[CellResult], nfes: Sequence[int], floor: tuple[float, float | None] | None,
                 reference: CellResult | None, budget: str = "nfe") -> str:
    """Markdown: one row per sampler, FID (KID×10³) per NFE (``budget="passes"``: per network passes per image);
    then the reference row and the data floor."""
    samplers = list(dict.fromkeys(c.sampler for c in cells))
    # a record written before network passes were stated counts its NFE (as the plot does)
    by = {(c.sampler, (c.network_passes or c.nfe) if budget == "passes" else c.nfe_target): c for c in cells}
    label = "passes" if budget == "passes" else "NFE"
    lines = ["| sampler | " + " | ".join(f"{label} {n}" for n in nfes) + " | setting |",
             "|---|" + "---|" * len(nfes) + "---|"]
    for s in samplers:
        row = []
        for n in nfes:
            c = by.get((s, n))
            row.append("—" if c is None else f"{c.fid:.2f}" + (f" ({1e3 * c.kid:.1f})" if c.kid is not None else ""))
        first = next(c for c in cells if c.sampler == s)
        passes = ("" if not first.network_passes or first.network_passes == first.nfe
                  else f"{first.network_passes / first.nfe:g} network passes per NFE")
        if budget == "passes":
            passes = ", ".join(f"NFE {c.nfe}" for n in nfes if (c := by.get((s, n))) is not None)
        heads = list(dict.fromkeys(c.setting.split(", ", 1)[0] for c in cells if c.sampler == s))
        head = heads[0] if len(heads) == 1 else f"{heads[0]}, … (one per NFE: table.csv)"
        setting = ", ".join(filter(None, [head, first.extra.get("knobs"), passes]))
        lines.append(f"| {s} | " + " | ".join(row) + f" | {setting} |")
    if reference is not None:
        lines.append(f"| reference: {reference.sampler} ({reference.nfe} NFE) | "
                     + " | ".join([f"{reference.fid:.2f}"] * len(nfes)) + f" | {reference.setting} |")
    if floor is not None:
        kid = f" ({1e3 * floor[1]:.1f})" if floor[1] is not None else ""
        lines.append("| data floor (train vs test) | " + " | ".join([f"{floor[0]:.2f}{kid}"] * len(nfes)) + " | — |")
    return "\n".join(lines) + "\n"


def start_plan(model: Denoiser, plan: CellPlan, plans: Sequence[CellPlan]) -> CellPlan | None:
    """The plain solver a learned row starts from, on its own grid — the cell it must beat: a predictor reset to its
    base (``start_of``: AMED's DPM-Solver-2 step, EPD's untrained table) on the predictor's grid; for a learned
    schedule (gits, steps) its sampler on the grid training started from (the ``init`` σ's, else the K-step grid of
    the schedule the search ran on, the last step to 0). A plain row of ``plans`` with that method, grid and knobs
    is that cell itself; None for a row that learned nothing."""
    if not plan.training:
        return None
    if plan.predictor is not None:
        pred = start_of(plan.knobs["predictor"])
        return replace(plan, sampler=f"{plan.sampler}:start", knobs={**plan.knobs, "predictor": pred},
                       predictor=f"{plan.predictor} (reset to its base)", predictor_digest=pred.digest,
                       setting=f"{plan.setting}, reset to the solver it starts from", training=None)
    opts = plan.training.get("options", {})
    if plan.training.get("init") is not None:
        grid = Grid(torch.tensor(plan.training["init"], dtype=torch.float64))
    else:
        grid = get_schedule(opts.get("schedule") or default_schedule(model), model=model).grid(
            len(plan.grid), final_zero=True) if plan.grid.ends_at_zero else None
        if grid is None:
            return None
    for other in plans:
        if (other.predictor is None and not other.training and other.method == plan.method and other.nfe == plan.nfe
                and len(other.grid) == len(grid) and torch.allclose(other.grid.sigmas, grid.sigmas, rtol=1e-6)
                and other.knobs == plan.knobs):
            return other
    name = opts.get("schedule") or "init"
    return replace(plan, sampler=f"{plan.sampler}:start", grid=grid, schedule=name, training=None,
                   setting=f"{name}, {len(grid)} steps, the last to 0 (where {plan.sampler}'s training started)")


def format_vs_start(pairs: Sequence[tuple[CellPlan, CellPlan]], cells: Sequence[CellResult]) -> str:
    """Markdown: each learned cell against the plain solver it starts from on its own grid (``start_plan``), and
    which one to keep — the learned one only where its FID is lower."""
    by = {(c.sampler, c.nfe_target): c for c in cells}
    lines = []
    for learned, start in pairs:
        a, b = by.get((learned.sampler, learned.nfe)), by.get((start.sampler, start.nfe))
        if a is None or b is None:
            continue
        keep = "learned" if a.fid < b.fid else "start: the learned solver scores worse than where it started"
        lines.append(f"| {learned.sampler} | {learned.nfe} | {a.fid:.2f} | {start.sampler} | {b.fid:.2f} | {keep} |")
    if not lines:
        return ""
    return ("\nLearned rows against the plain solver they start from (same grid, same seeds):\n\n"
            "| row | NFE | FID | start | start FID | keep |\n|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n")


def training_cost(training: Mapping[str, Any]) -> tuple[str, str, str]:
    """(wall time, teacher trajectories, hardware) of a learned row's training, from its predictor card
    (``train amed``/``train solver --method amed|epd|adasde``) or its schedule file's record (gits, steps)."""
    opts = training.get("options", {})
    seconds = training.get("wall_seconds", training.get("seconds"))
    trajectories = training.get("trajectories_done", opts.get("trajectories", training.get("trajectories")))
    epochs = f" × {opts['epochs']} epochs" if "epochs" in opts else ""
    processes = training.get("processes") or 1
    hw = training.get("hardware") or "—"
    return ("—" if seconds is None else f"{seconds:.0f} s", "—" if trajectories is None else f"{trajectories}{epochs}",
            hw + (f", {processes} processes" if processes > 1 else ""))


def format_training(plans: Sequence[CellPlan]) -> str:
    """Markdown: what each learned cell's training cost (wall, trajectories, hardware), one line per (row, NFE)."""
    lines = [f"| {p.sampler} | {p.nfe} | " + " | ".join(training_cost(p.training)) + " |"
             for p in plans if p.training]
    if not lines:
        return ""
    return ("\nTraining of the learned rows:\n\n| row | NFE | wall | teacher trajectories | hardware |\n|---|---|---|---|---|\n"
            + "\n".join(lines) + "\n")


def write_csv(cells: Sequence[CellResult], path: Path) -> None:
    """One line per cell with every recorded field."""
    buf = io.StringIO()
    fields = [f for f in CellResult.__dataclass_fields__ if f not in ("grid", "extra")] + ["grid"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for c in cells:
        d = asdict(c)
        d["grid"] = " ".join(f"{v:.6g}" for v in c.grid)
        w.writerow({k: d[k] for k in fields})
    write_text(path, buf.getvalue())


def _save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_fid_vs_cfg(results: Mapping[float, Sequence[CellResult]], nfe: int, floor: float | None, path: Path,
                    title: str) -> None:
    """FID against the guidance scale w at one NFE, one line per sampler (the guidance trade-off curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    rows = dict.fromkeys(c.sampler for cells in results.values() for c in cells)
    for s in rows:
        pts = sorted((w, c.fid) for w, cells in results.items() for c in cells if c.sampler == s and c.nfe == nfe)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", label="data floor")
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel("FID")
    ax.set_title(f"{title}, NFE {nfe}", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no cell is cached yet
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_fid_vs_nfe(cells: Sequence[CellResult], floor: float | None, reference: CellResult | None, path: Path,
                    title: str, budget: str = "nfe") -> None:
    """FID against NFE (``budget="passes"``: network passes per image), one line per sampler (log FID axis), the
    data floor and the reference drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for s in dict.fromkeys(c.sampler for c in cells):
        pts = sorted(((c.network_passes or c.nfe) if budget == "passes" else c.nfe, c.fid)
                     for c in cells if c.sampler == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    if reference is not None:
        ax.axhline(reference.fid, color="0.4", ls=":", label=f"{reference.sampler} {reference.nfe} NFE")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", label="data floor")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # NFEs are whole numbers
    ax.set_xlabel("network passes per image" if budget == "passes" else "NFE")
    ax.set_ylabel("FID")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no cell is cached yet
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)


def bench(
    model: Denoiser, model_name: str, *, samplers: Sequence[str], nfes: Sequence[int], num: int, reference: str,
    out: str | os.PathLike, extractor: Any, data_dir: str | os.PathLike | None = None, batch_size: int = 250,
    schedules: Mapping[str, str] | None = None, predictors: Mapping[str, str] | None = None, clip: str = "model default",
    reference_row: bool = True, echo: Callable[[str], None] = print, progress: bool = False, skip_missing: bool = False,
    knobs: Mapping[str, Mapping[str, Any]] | None = None, cached_only: bool = False,
    classes: Sequence[int] | None = None, guidance: Guidance | None = None, final_step: str = "zero",
    row_final_steps: Mapping[str, str] | None = None, budget: str = "nfe", vs_start: bool = False,
) -> tuple[list[CellResult], str]:
    """Run (or resume) every cell, write ``table.md``, ``table.csv``, ``fid_vs_nfe.png`` and ``config.json``.

    ``skip_missing``: a learned row without a predictor at some NFE, or a row with no grid of that NFE, shows "—"
    there instead of stopping the bench.
    ``knobs``: per-row sampler knobs, ``final_step``/``row_final_steps``: how grids end (see ``plan_cell``). ``cached_only``: the tables from the cells already in the
    cache (the others show "—"; nothing is sampled), e.g. while another process is filling them. A class-conditional
    model takes ``classes``, cycled over the seeds (seed i gets ``classes[i mod len]``), and ``guidance``.
    ``budget="passes"``: ``nfes`` are network passes per image, each row at the NFE that makes that many
    (EPD's K points per step count K passes, guidance doubles them): methods compared at equal network work.
    ``vs_start``: each learned cell also beside the plain solver it starts from on its own grid (``start_plan``), in
    a row ``ROW:start`` (or the plain row already planned) and a closing section saying which one to keep."""
    from diffsamp.metrics.scoring import data_floor, resolve_reference

    out = Path(out)
    cache = out / "cells"
    cache.mkdir(parents=True, exist_ok=True)
    shape = tuple(model.sample_shape)
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r}: expected one of {', '.join(BUDGETS)}")
    if budget == "passes" and guidance is not None and guidance.interval is not None:
        raise ValueError("--budget passes needs guidance on every step: drop the guidance interval")
    per_nfe = 2 if guidance is not None and guidance.active else 1
    plans = []
    for s in samplers:
        for n in nfes:
            kw = dict(schedules=schedules, predictors=predictors, knobs=knobs, final_step=final_step,
                      row_final_steps=row_final_steps)
            try:
                plans.append(plan_for_passes(model, model_name, s, n, passes_per_nfe=per_nfe, **kw)
                             if budget == "passes" else plan_cell(model, model_name, s, n, **kw))
            except PredictorNotFoundError:
                if not skip_missing:
                    raise
                echo(f"{s:>12} NFE {n:>2}: no predictor {predictor_name(model_name, s, n)} — left out")
            except NoGridError as exc:
                if not skip_missing:
                    raise
                echo(f"{s:>12} NFE {n:>2}: {exc} — left out")
    pairs = []
    if vs_start:  # each learned cell beside the plain solver it starts from (the cell it must beat)
        for plan in list(plans):
            start = start_plan(model, plan, plans)
            if start is not None:
                pairs.append((plan, start))
                if all(start is not p for p in plans):
                    plans.append(start)
    w = guidance.scale if guidance is not None else 1.0
    for plan in plans:  # a learned schedule fitted to other guided trajectories: said before any cell samples
        mismatch = guidance_mismatch(plan.training or {}, w, f"the schedule {plan.schedule}") \
            if classes is not None and plan.predictor is None else None
        if mismatch:
            echo(f"{plan.sampler:>12} NFE {plan.nfe:>2}: warning: {mismatch}")
    ref = resolve_reference(reference, num=num, image_size=shape[-1], extractor=extractor, data_dir=data_dir,
                            progress=progress)
    parts = cache_parts(model_name, reference, clip, shape)
    cond = None
    if classes is not None:
        cond = [classes[i % len(classes)] for i in range(num)]
        parts["classes"] = list(classes)
        parts["guidance"] = guidance.record() if guidance is not None else None
    floor = None
    if ":" in reference and not Path(reference).exists():
        f = data_floor(reference.split(":")[0], num=num, image_size=shape[-1], extractor=extractor,
                       data_dir=data_dir, progress=progress)
        floor = (f.fid, f.kid)
    config = {"model": model_name, "samplers": list(samplers), "nfes": list(nfes), "num": num, "reference": reference,
              "clip": clip, "schedules": dict(schedules or {}), "predictors": dict(predictors or {}),
              "knobs": {row: {k: str(v) for k, v in kv.items()} for row, kv in (knobs or {}).items()},
              "final_step": final_step, "row_final_steps": dict(row_final_steps or {}), "budget": budget,
              "torch": torch.__version__, "hardware": f"{platform.machine()}, {os.cpu_count()} cores",
              "threads": torch.get_num_threads(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "cached_only": cached_only, "vs_start": vs_start, "classes": list(classes) if classes is not None else None,
              "guidance": guidance.record() if guidance is not None else None}
    config["processes"] = dist.world_size()
    if dist.is_main():
        write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    cells = []
    for plan in plans:
        c = run_cell(model, plan, reference=ref, extractor=extractor, num=num, batch_size=batch_size, clip=clip,
                     cache_dir=cache, cache_parts=parts, progress=progress, cached_only=cached_only, cond=cond,
                     guidance=guidance)
        if c is None:
            echo(f"{plan.sampler:>12} NFE {plan.nfe:>2}: not in the cache — left out")
            continue
        echo(f"{c.sampler:>12} NFE {c.nfe:>2}: FID {c.fid:7.2f}  ({c.setting}; {c.sampling_seconds:.0f} s sampling)")
        cells.append(c)
    ref_cell = None
    if reference_row:
        ref_cell = run_cell(model, reference_plan(model), reference=ref, extractor=extractor, num=num,
                            batch_size=batch_size, clip=clip, cache_dir=cache, cache_parts=parts, progress=progress,
                            cached_only=cached_only, cond=cond, guidance=guidance)
        if ref_cell is not None:
            ref_cell.nfe_target = None
    done = {(c.sampler, c.nfe_target) for c in cells}
    table = format_table(cells, nfes, floor, ref_cell, budget) + format_training(
        [p for p in plans if (p.sampler, p.nfe) in done]) + format_vs_start(pairs, cells)
    conditioning = ""
    if classes is not None:
        conditioning = f"; classes {classes} cycled over the seeds, guidance w = {w:g}"
    head = (f"{model_name}: FID (KID×10³) of N = {num} samples (seeds 0–{num - 1}) vs {reference}; "
            f"x̂0 clipping: {clip}{conditioning}\n\n")
    if dist.is_main():
        write_text(out / "table.md", head + table)
        write_csv(cells + ([ref_cell] if ref_cell else []), out / "table.csv")
        plot_fid_vs_nfe(cells, floor[0] if floor else None, ref_cell, out / "fid_vs_nfe.png", f"{model_name}, N = {num}",
                        budget)
    return cells, head + table

