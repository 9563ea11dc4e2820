"""``diffsamp bench``: FID of samplers at given NFEs on one model (the AMED paper's Table 2, Zhou et al. 2024)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from diffsamp import dist
from diffsamp.cli._fast import apply_fast, fast_options
from diffsamp.cli._common import DTYPES, check_writable, load_or_fail, main, network_dtype, resolve_device


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}", param_hint=what)
        out[key.strip()] = val.strip()
    return out


def _row_knobs(values: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``("ipndm:max_order=3",)`` → ``{"ipndm": {"max_order": "3"}}`` (typed later, against the row's sampler)."""
    out: dict[str, dict[str, str]] = {}
    for key, val in _pairs(values, "--knob").items():
        row, _, name = key.rpartition(":")
        if not row or not name:
            raise click.BadParameter(f"expected ROW:NAME=VALUE such as ipndm:max_order=3, got {key}={val!r}",
                                     param_hint="--knob")
        out.setdefault(row.strip(), {})[name.strip()] = val
    return out


def _final_steps(values: tuple[str, ...], rows: list[str]) -> tuple[str, dict[str, str]]:
    """``("sigma_min", "ddim=zero")`` → the default final step and the per-row ones, checked."""
    from diffsamp.metrics.bench import FINAL_STEPS

    default, per_row = "zero", {}
    for v in values:
        row, sep, kind = v.rpartition("=")
        if kind not in FINAL_STEPS:
            raise click.BadParameter(f"expected [ROW=]{'|'.join(FINAL_STEPS)}, got {v!r}", param_hint="--final-step")
        if not sep:
            default = kind
        elif row not in rows:
            raise click.BadParameter(f"row {row!r} is not in --samplers ({', '.join(rows)})", param_hint="--final-step")
        else:
            per_row[row] = kind
    return default, per_row


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 3,5,7,9, got {text!r}", param_hint=what) from None
    if not vals or min(vals) < 1:
        raise click.BadParameter(f"expected positive NFEs, got {text!r}", param_hint=what)
    return vals


def _conditioning(classes: str | None, cfg_scales: str | None) -> tuple[list[int] | None, list[float]]:
    """``--classes`` as a list and ``--cfg`` as the guidance scales (``[1.0]`` without it)."""
    from diffsamp.cli._seeds import parse_class_list

    class_list = parse_class_list(classes)
    if cfg_scales is None:
        return class_list, [1.0]
    if class_list is None:
        raise click.UsageError("--cfg guides a class-conditional model: give --classes too")
    try:
        scales = [float(v) for v in cfg_scales.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated scales such as 1,2,4, got {cfg_scales!r}",
                                 param_hint="--cfg") from None
    if not scales or len(set(scales)) != len(scales):
        raise click.BadParameter(f"expected distinct scales such as 1,2,4, got {cfg_scales!r}", param_hint="--cfg")
    return class_list, scales


def _default_reference(model_name: str, model: Any) -> str:
    """The test split of the data set the model was trained on (its card), the reference FID compares with."""
    from diffsamp.models.zoo import model_dataset

    dataset = model_dataset(model_name, model)
    if not dataset:
        raise ValueError(f"{model_name} does not record the data set it was trained on: name the FID reference "
                         "with --ref DATASET:SPLIT or --ref STATS.npz")
    return f"{dataset}:test"


@main.command("bench")
@click.option("--model", "model_name", required=True, help="Zoo name, local model/run directory or Hub id.")
@click.option("--samplers", default="ddim,heun,dpm2,dpmpp3m,ipndm,amed,ipndm+amed", show_default=True,
              help="Rows; a learned sampler may carry a variant, amed:static → predictor <model>/amed-static-nfe<N>.")
@click.option("--nfe", "nfes", default="3,5,7,9", show_default=True, help="Target NFEs.")
@click.option("--num", "-n", "num", default=2000, show_default=True, type=click.IntRange(min=2), help="Samples per cell (seeds 0…N−1).")
@click.option("--ref", "reference", default=None,
              help="DATASET:SPLIT (its first N images) or a stats .npz  [default: the test split of the data set the "
                   "model's card names, e.g. fashion-mnist:test]")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bench directory (created): table.md, table.csv, fid_vs_nfe.png, cells/.")
@click.option("--schedule", "schedules", multiple=True, help="SAMPLER=SCHEDULE, e.g. ipndm=logsnr (default: the model's own, karras or rf; logsnr for dpmpp*), or "
                   "SAMPLER=FILE, a learned schedule (train solver --method gits|steps): its cell is at the NFE its σ's give; "
                   "SAMPLER:N=FILE: that row's schedule at NFE N only (one learned file per NFE).")
@click.option("--predictor", "predictors", multiple=True, help="[ROW:]NFE=PATH for a learned sampler's row (default: the shipped <model>/<row>-nfe<N>).")
@click.option("--knob", "knobs", multiple=True, metavar="ROW:NAME=VALUE",
              help="A sampler knob for one row (repeatable), e.g. ipndm:max_order=3; named in the row's setting.")
@click.option("--budget", type=click.Choice(["nfe", "passes"]), default="nfe", show_default=True,
              help="What --nfe counts: sequential network evaluations, or network passes per image (EPD's K "
                   "parallel points count K, guidance doubles): methods at equal network work.")
@click.option("--final-step", "final_steps", multiple=True, metavar="[ROW=]zero|sigma_min",
              help="How grids end: zero (default: a last denoising step to σ = 0, inside the NFE) or sigma_min (no step "
                   "to 0, the AMED paper's Table 2); ROW=… for one row. Learned rows end as their predictor was trained.")
@click.option("--clip/--no-clip", "clip", default=None, help="Clamp x̂0 as the model's scheduler says (default), always or never.")
@click.option("--batch-size", default=250, show_default=True, type=click.IntRange(min=1))
@click.option("--no-reference", is_flag=True, help="Skip the heun 35-NFE reference row.")
@click.option("--cached-only", is_flag=True, help="Only write the tables from the cells already cached (others show —).")
@click.option("--skip-missing", is_flag=True, help="A learned row without a predictor, or a row without a grid, at some NFE shows — there.")
@click.option("--vs-start", is_flag=True,
              help="Also score each learned cell's starting point (the predictor reset to its base solver, or the "
                   "grid a learned schedule started from) as ROW:start, and say which of the two to keep.")
@click.option("--inception", default=None, type=click.Path(dir_okay=False), help="FID network (else $DIFFSAMP_INCEPTION).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Data folder (else $DIFFSAMP_DATA).")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPES),
              help="Network weights' precision (bfloat16/float16 are for GPUs); sampler arithmetic stays float32.")
@fast_options
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--classes", default=None, help="Class-conditional models: classes cycled over the seeds, e.g. 0-9 (class-balanced).")
@click.option("--cfg", "cfg_scales", default=None, help="Guidance scales, e.g. 1,2,4: one table per scale (DIR/cfg-W/) and DIR/fid_vs_cfg.png.")
def bench_cmd(model_name: str, samplers: str, nfes: str, num: int, reference: str | None, out: str, schedules: tuple[str, ...],
              predictors: tuple[str, ...], knobs: tuple[str, ...], budget: str, final_steps: tuple[str, ...], clip: bool | None, batch_size: int, no_reference: bool,
              cached_only: bool, skip_missing: bool, vs_start: bool,
              inception: str | None, data_dir: str | None, device: str, dtype: str, compile: bool,  # noqa: A002
              cuda_graphs: bool, quiet: bool, classes: str | None, cfg_scales: str | None) -> None:
    """Score each sampler at each NFE; cached cells make an interrupted bench resume.

    \b
    Examples:
      diffsamp bench --model mnist-ddpm --nfe 3,5,7,9 --num 2000 --ref mnist:test --out bench/mnist-ddpm
      diffsamp bench --model mnist-ddpm --samplers ddim --final-step sigma_min --out b/   # the AMED paper's grids
      diffsamp bench --model mnist-ddpm --samplers ipndm,ipndm+amed --nfe 5 --predictor 5=runs/ipndm-amed5 --out b/
      diffsamp bench --model mnist-ddpm --samplers ipndm --schedule ipndm=time_uniform --knob ipndm:max_order=3 --out b/
      diffsamp bench --model mnist-ddpm-cond --classes 0-9 --cfg 1,2,4 --samplers ddim,dpmpp3m --nfe 5,9 --out b/
    """
    from diffsamp.metrics.bench import bench, split_row
    from diffsamp.metrics.inception import load_extractor
    from diffsamp.samplers import available_samplers, get_sampler

    names = [s.strip() for s in samplers.split(",") if s.strip()]
    try:
        bases = [split_row(s)[0] for s in names]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--samplers") from None
    for base in bases:  # a registered name or an alias (k-diffusion's, ComfyUI's, diffusers')
        try:
            get_sampler(base)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--samplers") from None
    row_knobs = _row_knobs(knobs)  # a row not in --samplers is ignored (one flag set for several runs), a typo is not
    stray = sorted(r for r in row_knobs if r not in names and r.partition(":")[0] not in available_samplers())
    if stray:
        raise click.BadParameter(f"unknown sampler in row {stray[0]!r}; available: {', '.join(available_samplers())}",
                                 param_hint="--knob")
    targets = _int_list(nfes, "--nfe")
    final_step, row_final_steps = _final_steps(final_steps, names)
    class_list, scales = _conditioning(classes, cfg_scales)
    device = resolve_device(device)
    check_writable(out, "--out", folder=True)
    clip_text = {None: "as the model's scheduler config", True: "on", False: "off"}[clip]
    if dtype != "float32":  # the network's precision changes every cell, so it keys the cells
        clip_text += f"; network {dtype}"
    try:
        model = apply_fast(load_or_fail(model_name, device=device, clip=clip, dtype=network_dtype(dtype)), compile,
                           cuda_graphs, device)
        reference = reference or _default_reference(model_name, model)
        extractor = load_extractor(inception, device)
        if class_list is not None:
            from diffsamp.models.conditioning import encode_conditions

            encode_conditions(model, class_list, len(class_list))  # the model takes these classes
            if any(w != 1.0 for w in scales):
                model.conditioning.unconditional(1)
        results, tables = {}, []
        for w in scales:
            from diffsamp.models.conditioning import Guidance

            where = out if len(scales) == 1 else str(Path(out) / f"cfg-{w:g}")
            cells, table = bench(model, model_name, samplers=names, nfes=targets, num=num, reference=reference,
                                 out=where, extractor=extractor, data_dir=data_dir, batch_size=batch_size,
                                 schedules=_pairs(schedules, "--schedule"), predictors=_pairs(predictors, "--predictor"),
                                 knobs=row_knobs, clip=clip_text, reference_row=not no_reference, echo=click.echo,
                                 progress=not quiet, skip_missing=skip_missing, cached_only=cached_only,
                                 classes=class_list, guidance=None if class_list is None else Guidance(w),
                                 final_step=final_step, row_final_steps=row_final_steps, budget=budget,
                                 vs_start=vs_start)
            results[w] = cells
            tables.append(table)
        if len(scales) > 1 and dist.is_main():
            from diffsamp.metrics.bench import plot_fid_vs_cfg

            plot_fid_vs_cfg(results, max(targets), None, Path(out) / "fid_vs_cfg.png", f"{model_name}, N = {num}")
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join(tables))
    click.echo(f"-> {out}/table.md, table.csv, fid_vs_nfe.png")
