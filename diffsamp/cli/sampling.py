"""``diffsamp sample`` (images from any model with any sampler) and ``diffsamp models`` (the zoo)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from diffsamp.cli._common import knob_option, load_or_fail, main, parse_knobs, resolve_device
from diffsamp.samplers import available_samplers, available_schedules

DTYPES = ("float32", "bfloat16", "float16")
MAX_SEEDS = 1_000_000


def parse_seeds(text: str) -> list[int]:
    """``0-63`` → 0..63, ``1,5,9`` → [1, 5, 9], ``0-3,10`` → [0, 1, 2, 3, 10]. Order kept, duplicates refused."""
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty item in seed list {text!r}")
        if "-" in part[1:]:
            i = part.index("-", 1)
            lo, hi = int(part[:i]), int(part[i + 1 :])
            if hi < lo:
                raise ValueError(f"seed range {part!r} is decreasing")
            if hi - lo + 1 > MAX_SEEDS:
                raise ValueError(f"seed range {part!r} is longer than {MAX_SEEDS}")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(int(part))
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise ValueError("seeds must be non-negative 64-bit integers")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seed list {text!r} repeats a seed")
    return seeds


class SeedList(click.ParamType):
    """A click type for ``parse_seeds`` lists."""

    name = "SEEDS"

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        if isinstance(value, list):
            return value
        try:
            return parse_seeds(str(value))
        except ValueError as exc:
            self.fail(f"{exc} (expected e.g. 0-63, 1,5,9 or 0-3,10)", param, ctx)


@main.command("sample")
@click.option("--model", "model_name", required=True, help="Zoo name (see `diffsamp models`), a local model/run directory, or a Hub id.")
@click.option("--sampler", default="heun", show_default=True, type=click.Choice(available_samplers()))
@click.option("--schedule", default=None, type=click.Choice(available_schedules()), help="σ grid. Default: rf for rectified flows, karras otherwise.")
@click.option("--steps", default=18, show_default=True, type=click.IntRange(min=1), help="Number of grid intervals.")
@click.option("--seeds", default="0-63", show_default=True, type=SeedList(), help="One image per seed: 0-63, 1,5,9, 0-3,10.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Images per network call (default: all seeds at once, at most 256).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPES), help="Network weights' precision.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write one grid PNG.")
@click.option("--outdir", default=None, type=click.Path(file_okay=False), help="Write one PNG per seed, named by seed.")
@click.option("--clip-denoised/--no-clip-denoised", default=None, help="Clamp the denoised estimate D(x, σ) to [-1, 1] at every step (diffusers' clip_sample). Default: as the model's scheduler config says.")
@click.option("--nrow", default=None, type=click.IntRange(min=1), help="Images per grid row (default: √N).")
@click.option("--fid-ref", default=None, help="Score the images: FID (and KID) against a stats .npz (`diffsamp fid ref`) or DATASET:SPLIT, e.g. mnist:test (its first N images).")
@click.option("--inception", default=None, type=click.Path(dir_okay=False), help="FID network weights (else $DIFFSAMP_INCEPTION, then the cache).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Data set folder for a DATASET:SPLIT --fid-ref (else $DIFFSAMP_DATA).")
@knob_option
@click.option("--predictor", default=None, help="AMED predictor: a trained run directory/.json or a shipped name (see `diffsamp models`); sets the sampler, grid and NFE it was trained for.")
@click.pass_context
def sample_cmd(
    ctx: click.Context,
    model_name: str,
    sampler: str,
    schedule: str | None,
    steps: int,
    seeds: list[int],
    batch_size: int | None,
    device: str,
    dtype: str,
    out: str | None,
    outdir: str | None,
    nrow: int | None,
    clip_denoised: bool | None,
    fid_ref: str | None,
    inception: str | None,
    data_dir: str | None,
    knobs: tuple[str, ...],
    predictor: str | None,
) -> None:
    """Generate images, one per seed, and write a grid (--out) or one PNG per seed (--outdir).

    \b
    Examples:
      diffsamp sample --model mnist-ddpm --sampler heun --steps 18 --seeds 0-63 --out grid.png
      diffsamp sample --model fashion-mnist-ddpm --sampler dpmpp2m --steps 10 --seeds 0-999 --outdir samples/
      diffsamp sample --model runs/mnist --sampler ddpm --schedule ddpm --steps 1000 --seeds 0-15 --out g.png
      diffsamp sample --model mnist-ddpm --steps 18 --seeds 0-1999 --fid-ref mnist:test --data-dir ~/data
      diffsamp sample --model mnist-ddpm --sampler dpm2 --knob r=0.3 --steps 10 --out grid.png
      diffsamp sample --model mnist-ddpm --sampler amed --predictor mnist-ddpm/amed-nfe5 --seeds 0-63 --out g.png
    Image i depends only on its seed, whatever --batch-size and --device.
    With --fid-ref alone, samples stream into the FID statistics and nothing is written.
    """
    import torch

    from diffsamp.api import generate
    from diffsamp.models.base import ClampDenoiser, default_schedule

    if out is not None and outdir is not None:
        raise click.UsageError("give one of --out (a grid PNG) or --outdir (one PNG per seed), not both")
    if out is None and outdir is None and fid_ref is None:
        raise click.UsageError("give --out (a grid PNG), --outdir (one PNG per seed) or --fid-ref (score the samples)")
    amed_knobs: dict = {}
    if predictor is not None:  # the sampler, grid and knobs the predictor was trained with
        sampler, amed_knobs = _predictor_knobs(predictor, model_name, sampler, ctx)
        steps, schedule = len(amed_knobs["grid"]), amed_knobs["predictor"].config["schedule"]
    knob_values = {**parse_knobs(sampler, knobs), **amed_knobs}
    device = resolve_device(device)
    torch_dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]  # None: as stored
    t0 = time.perf_counter()
    model = load_or_fail(model_name, device=device, dtype=torch_dtype, clip=clip_denoised)
    try:
        shape = model.sample_shape
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    load_s = time.perf_counter() - t0
    schedule = schedule or default_schedule(model)
    if clip_denoised and model.clip_sample is None:
        model = ClampDenoiser(model, -1.0, 1.0)  # models without a clip setting of their own (rectified flows)
    run = dict(sampler=sampler, schedule=schedule, steps=steps, seeds=seeds, batch_size=batch_size or min(len(seeds), 256),
               **knob_values)
    what = (f"{len(seeds)} images {tuple(shape)} with {sampler}/{schedule}, {steps} step{'s' * (steps != 1)}")
    scoring = _fid_reference(fid_ref, inception, data_dir, device, len(seeds), shape) if fid_ref else None
    try:
        if scoring is not None and out is None and outdir is None:  # stream into the statistics, write nothing
            from diffsamp.metrics.scoring import score_model

            q = score_model(model, scoring[1], extractor=scoring[0], **run)
            click.echo(f"{what}: NFE {q.nfe} per image, sampling {q.sampling_seconds:.2f} s on {device} {dtype}; "
                       f"model loaded in {load_s:.1f} s")
            click.echo(_quality_line(q.fid, q.kid, q.kid_std, len(seeds), q.reference))
            return
        result = generate(model, shape, device=device, **run)
        images = result.images.clamp(-1, 1)
        where = _write_images(images, result.seeds, out, outdir, nrow)
        click.echo(f"{what}: NFE {result.nfe} per image, {result.seconds:.2f} s "
                   f"({len(seeds) / max(result.seconds, 1e-9):.1f} img/s) on {device} {dtype}; "
                   f"model loaded in {load_s:.1f} s -> {where}")
        if scoring is not None:
            from diffsamp.metrics.scoring import score_images

            fid, kid, kid_std = score_images(images, scoring[1], extractor=scoring[0])
            click.echo(_quality_line(fid, kid, kid_std, len(seeds), str(scoring[1].meta.get("source") or fid_ref)))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


def _write_images(images, seeds: list[int], out: str | None, outdir: str | None, nrow: int | None) -> str:
    """A grid PNG at ``out`` or one PNG per seed in ``outdir``; returns where they went."""
    import math

    from diffsamp.images import save_grid, save_png

    if out is not None:
        save_grid(images, out, nrow=nrow or max(1, math.ceil(math.sqrt(len(seeds)))))
        return out
    folder = Path(outdir)  # type: ignore[arg-type]
    width = max(6, len(str(max(seeds))))
    for s, img in zip(seeds, images):
        save_png(img, folder / f"{s:0{width}d}.png")
    return f"{folder}/ ({len(seeds)} PNGs)"


def _predictor_knobs(name: str, model_name: str, sampler: str, ctx: click.Context) -> tuple[str, dict]:
    """The sampler and knobs (grid included) a --predictor was trained with; mismatches are one-line errors."""
    from diffsamp.samplers.amed_files import check_predictor_model, load_predictor, sampling_settings

    try:
        pred = load_predictor(name)
        check_predictor_model(pred, model_name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    trained, grid, knobs = sampling_settings(pred)
    if ctx.get_parameter_source("sampler") is not click.core.ParameterSource.DEFAULT and sampler != trained:
        raise click.ClickException(f"this predictor was trained for --sampler {trained}, not {sampler}")
    return trained, {"grid": grid, **knobs}


def _fid_reference(ref: str, inception: str | None, data_dir: str | None, device: str, num: int, shape):
    """The feature network and the --fid-ref statistics, resolved before any sampling (so a missing weights
    file or data set fails at once)."""
    from diffsamp.metrics.scoring import resolve_reference
    from diffsamp.metrics.fid import WeightsNotFoundError, load_extractor

    if num < 2:
        raise click.BadParameter("FID needs at least 2 seeds", param_hint="--seeds")
    try:
        extractor = load_extractor(inception, device)
        return extractor, resolve_reference(ref, num=num, image_size=shape[-1], extractor=extractor, data_dir=data_dir)
    except (ValueError, FileNotFoundError, WeightsNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None


def _quality_line(fid: float, kid: float | None, kid_std: float | None, n: int, ref: str) -> str:
    kid_txt = f", KID {kid * 1e3:.3f} ± {kid_std * 1e3:.3f} ×1e-3" if kid is not None else ""
    return f"FID {fid:.3f}{kid_txt} ({n} samples vs {ref})"


@main.command("models")
@click.option("--verbose", "-v", is_flag=True, help="Print each model's whole card.")
def models_cmd(verbose: bool) -> None:
    """List the pretrained models shipped with diffsamp (usable offline by name).

    \b
    Example:
      diffsamp models
      diffsamp sample --model mnist-ddpm --out grid.png
    Any diffusers directory, `diffsamp train` run directory or Hub id (e.g. google/ddpm-cifar10-32)
    works with --model too.
    """
    import json

    from diffsamp.models.zoo import available_models, model_card

    names = available_models()
    if not names:
        click.echo("no models shipped in this installation")
        return
    width = max(len(n) for n in names)
    for name in names:
        card = model_card(name)
        if verbose:
            click.echo(f"{name}:\n{json.dumps(card, indent=2)}")
            continue
        bits = []
        if card.get("dataset"):
            bits.append(str(card["dataset"]))
        if card.get("parameters"):
            bits.append(f"{card['parameters'] / 1e6:.1f} M params")
        if card.get("objective"):
            bits.append(str(card["objective"]))
        steps = card.get("steps") or (card.get("training") or {}).get("steps")
        if steps:
            bits.append(f"{steps} training steps")
        bits.extend(_quality_summary(card))
        click.echo(f"{name:<{width}}  {'; '.join(bits)}")
    _list_predictors()


def _list_predictors() -> None:
    """The shipped AMED predictors, with what they were trained for (use with --predictor NAME)."""
    from diffsamp.samplers.amed_files import load_predictor, shipped_predictors

    names = shipped_predictors()
    if not names:
        return
    click.echo("\nAMED predictors (diffsamp sample --model MODEL --predictor NAME):")
    width = max(len(n) for n in names)
    for name in names:
        cfg = load_predictor(name).config
        kind = "static" if cfg["predictor"]["kind"] == "static" else "per-sample"
        fid = cfg.get("fid")
        fid_txt = f"; FID {fid['fid']:.2f} (N = {fid['num']})" if isinstance(fid, dict) else ""
        click.echo(f"{name:<{width}}  {cfg['sampler']}, NFE {cfg['nfe']}, {cfg['schedule']}, {kind}, "
                   f"{cfg['training']['trajectories_done']} trajectories{fid_txt}")


def _quality_summary(card: dict) -> list[str]:
    """The measured FID(s) of a card, one short phrase each: DDPM cards' ``fid`` block, flows' ``quality`` cells."""
    out = []
    fid = card.get("fid")
    if isinstance(fid, dict) and "fid" in fid:
        how = f"{fid['sampler']}, " if fid.get("sampler") else ""
        out.append(f"FID {fid['fid']:.2f} ({how}{fid.get('nfe', '?')} NFE; data floor {fid.get('floor_fid', float('nan')):.2f}, "
                   f"N = {fid.get('num', '?')})")
    quality = card.get("quality")
    if isinstance(quality, dict) and quality.get("cells"):
        cells = ", ".join(f"{c['fid']:.1f} ({c['sampler']} {c['nfe']} NFE)" for c in quality["cells"])
        floor = (quality.get("floor") or {}).get("fid")
        out.append(f"FID {cells}" + (f" (data floor {floor:.2f}, N = {quality.get('num')})" if floor else ""))
    return out
