"""``diffsamp sample`` (images from any model with any sampler) and ``diffsamp models`` (the zoo)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import click

from diffsamp import dist
from diffsamp.cli._conditioning import condition_options, parse_conditions, parse_init
from diffsamp.cli._fast import apply_fast, fast_options
from diffsamp.cli._seeds import SeedList, format_seeds, parse_seeds  # noqa: F401 - parse_seeds is public here
from diffsamp.cli._common import (DTYPES, SamplerName, check_writable, knob_option, load_or_fail, main, network_dtype,
                                  nonnegative, parse_knobs, resolve_device)
from diffsamp.models.base import Wrapper
from diffsamp.samplers import available_schedules



def _check_destination(path: str, hint: str, *, folder: bool) -> None:
    """Refuse, before any sampling, a destination that cannot be written: an unknown image extension, a file
    where a folder is needed (on the way to it too), a folder where a file is needed, or no write permission."""
    from diffsamp.images import image_format

    p = Path(path).expanduser()
    if not folder:
        try:
            image_format(p)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=hint) from None
        if p.is_dir():
            raise click.BadParameter(f"{p} is a folder; give a file name such as {p / 'grid.png'}", param_hint=hint)
    check_writable(path, hint, folder=folder)  # creates the folder and writes a probe file in it


def _json_value(value):  # noqa: ANN001, ANN202 - any knob value
    import json

    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


@main.command("sample")
@click.option("--model", "model_name", required=True, help="Zoo name (see `diffsamp models`), a local model/run directory, or a Hub id.")
@click.option("--sampler", default=None, type=SamplerName(), help="A name or alias from `diffsamp samplers`. Default: euler for rectified flows, heun otherwise.")
@click.option("--schedule", default=None, type=click.Choice(available_schedules()), help="σ grid. Default: rf for rectified flows, karras otherwise.")
@click.option("--steps", default=18, show_default=True, type=click.IntRange(min=1), help="Number of grid intervals (adaptive rk45 ignores it).")
@click.option("--sigma-min", default=None, type=float, help="The schedule's smallest σ (default: the model's); for schedules that take it (`diffsamp schedules`).")
@click.option("--sigma-max", default=None, type=float, help="The schedule's largest σ (default: the model's); for schedules that take it.")
@click.option("--rho", default=None, type=float, help="The schedule's ρ (karras: 7, polyexponential: 1, time_uniform: 1); for schedules that take it.")
@click.option("--seeds", default="0-63", show_default=True, type=SeedList(), help="One image per seed: 0-63, 1,5,9, 0-3,10.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Images per network call (default: all seeds at once, at most 256).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPES), help="Network weights' precision (bfloat16/float16 are for GPUs: on the CPU they are ~20× slower).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write one grid image: PNG (settings in its text chunk), or .jpg/.webp/.bmp/.tif as the extension says. A missing folder is created.")
@click.option("--outdir", default=None, type=click.Path(file_okay=False), help="Write one PNG per seed, named by seed, as each batch finishes, and config.json with the settings. Created if missing.")
@click.option("--skip-existing", is_flag=True, help="With --outdir: sample only the seeds whose PNG is not there yet (continue an interrupted run).")
@click.option("--clip-denoised/--no-clip-denoised", default=None, help="Clamp the denoised estimate D(x, σ) to [-1, 1] at every step (diffusers' clip_sample). Default: as the model's scheduler config says.")
@click.option("--nrow", default=None, type=click.IntRange(min=1), help="Images per grid row (default: √N).")
@click.option("--fid-ref", default=None, help="Score the images: FID (and KID) against a stats .npz (`diffsamp fid ref`) or DATASET:SPLIT, e.g. mnist:test (its first N images).")
@click.option("--inception", default=None, type=click.Path(dir_okay=False), help="FID network weights (else $DIFFSAMP_INCEPTION, then the cache).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Data set folder for a DATASET:SPLIT --fid-ref (else $DIFFSAMP_DATA).")
@knob_option
@click.option("--predictor", default=None, help="AMED predictor: a trained run directory/.json or a shipped name (see `diffsamp models`); sets the sampler, grid and NFE it was trained for.")
@click.option("--sigmas", "sigmas_file", default=None, type=click.Path(),
              help="Sample on the σ's of a schedule file (`diffsamp train solver` writes OUT/schedule.json); sets the "
                   "grid and so the steps.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (it goes to stderr).")
@condition_options
@fast_options
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
    skip_existing: bool,
    nrow: int | None,
    clip_denoised: bool | None,
    fid_ref: str | None,
    inception: str | None,
    data_dir: str | None,
    knobs: tuple[str, ...],
    predictor: str | None,
    quiet: bool,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
    compile: bool = False,  # noqa: A002 - the --compile flag
    cuda_graphs: bool = False,
    sigmas_file: str | None = None,
    **conditioning: object,
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
      diffsamp sample --model mnist-ddpm --sampler ipndm --sigmas runs/gits5 --seeds 0-63 --out g.png
      diffsamp sample --model mnist-ddpm-cond --classes 0-9 --cfg 2 --seeds 0-99 --nrow 10 --out g.png
      diffsamp sample --model SD-FOLDER --prompt "a cat" --cfg 7.5 --sampler ddim --steps 20 --seeds 0-3 --out g.png
    Image i depends only on its seed (and its class or prompt), whatever --batch-size and --device.
    With --fid-ref alone, samples stream into the FID statistics and nothing is written.
    Missing output folders are created. With --outdir each batch is written as it finishes: after Ctrl-C
    (exit code 130) the same command with --skip-existing continues where it stopped.
    """
    if out is not None and outdir is not None:
        raise click.UsageError("give one of --out (a grid PNG) or --outdir (one PNG per seed), not both")
    if out is None and outdir is None and fid_ref is None:
        raise click.UsageError("give --out (a grid PNG), --outdir (one PNG per seed) or --fid-ref (score the samples)")
    if skip_existing and outdir is None:
        raise click.UsageError("--skip-existing continues an --outdir run; give --outdir")
    classes, guidance = parse_conditions(conditioning, len(seeds))
    init_image, strength = parse_init(conditioning)
    if sampler is None and predictor is None:
        sampler = _default_sampler_for(model_name)
    if predictor is None:
        _needs_predictor(sampler, model_name)
    if out is not None:
        _check_destination(out, "--out", folder=False)
    if outdir is not None:
        _check_destination(outdir, "--outdir", folder=True)
    try:
        _sample(ctx, model_name, sampler, schedule, steps, seeds, batch_size, device, dtype, out, outdir,
                skip_existing, nrow, clip_denoised, fid_ref, inception, data_dir, knobs, predictor, quiet,
                classes, guidance, init_image, strength, compile, cuda_graphs)
    except KeyboardInterrupt:
        written = ctx.meta.get("diffsamp.written")
        if outdir is not None and written is not None:
            click.echo(f"\ninterrupted: {written[0]} of {written[1]} PNGs written to {outdir}/; the same command "
                       "with --skip-existing continues", err=True)
        else:
            click.echo("\ninterrupted: nothing written", err=True)
        ctx.exit(130)


def _sample(ctx: click.Context, model_name, sampler, schedule, steps, seeds, batch_size, device, dtype, out, outdir,  # noqa: ANN001
            skip_existing, nrow, clip_denoised, fid_ref, inception, data_dir, knobs, predictor, quiet,
            classes, guidance, init_image=None, strength=0.6, compile=False, cuda_graphs=False) -> None:  # noqa: A002
    import torch

    from diffsamp.models.conditioning import encode_conditions

    from diffsamp.api import generate, make_grid
    from diffsamp.models.base import ClampDenoiser, default_schedule
    from diffsamp.samplers import get_sampler

    amed_knobs: dict = {}
    if predictor is not None:  # the sampler, grid and knobs the predictor was trained with
        sampler, amed_knobs = _predictor_knobs(predictor, model_name, sampler, ctx)
        given = {"--steps": steps if _given(ctx, "steps") else None, "--schedule": schedule}
        steps, schedule = len(amed_knobs["grid"]), amed_knobs["predictor"].config["schedule"]
        _refuse_overrides(predictor, amed_knobs, given, {"--steps": steps, "--schedule": schedule},
                          parse_knobs(sampler, knobs))
    knob_values = {**parse_knobs(sampler, knobs), **amed_knobs}
    sigmas_file = ctx.params.get("sigmas_file")
    if sigmas_file is not None:
        knob_values["grid"] = _schedule_file(ctx, sigmas_file, predictor, model_name)
    device = resolve_device(device)
    torch_dtype = network_dtype(dtype)
    all_seeds, folder = seeds, Path(outdir).expanduser() if outdir is not None else None
    class_of = dict(zip(seeds, classes)) if classes is not None else None
    width = max(6, len(str(max(seeds))))
    name_of = lambda s: f"{s:0{width}d}.png"  # noqa: E731
    if skip_existing:  # what can be compared before the model loads (the σ grid is compared once it has)
        early = {"model": model_name, "sampler": sampler, "dtype": dtype, "clip_denoised": clip_denoised,
                 "knobs": {k: (predictor if k == "predictor" else _json_value(v))
                           for k, v in knob_values.items() if k != "grid"}}
        if schedule is not None:
            early["schedule"] = schedule
        early.update(_condition_record(classes, guidance))
        _check_previous_run(folder, early, skip_existing)
        seeds = [s for s in seeds if not (folder / name_of(s)).is_file()]
        dist.barrier()  # under torchrun: every rank has read the folder before any rank writes to it
    t0 = time.perf_counter()
    model = load_or_fail(model_name, device=device, dtype=torch_dtype, clip=clip_denoised)
    model = apply_fast(model, compile, cuda_graphs, device)
    try:
        shape = model.sample_shape
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    load_s = time.perf_counter() - t0
    try:  # the model takes these conditions (kind, range, unconditional half), before any sampling
        encode_conditions(model, classes, len(all_seeds))
        if guidance is not None and guidance.active:
            model.conditioning.unconditional(1, guidance.negative)
    except ValueError as exc:
        raise click.ClickException(f"{model_name}: {exc}") from None
    schedule = schedule or default_schedule(model)
    schedule_params = _schedule_params(ctx, schedule, model)
    if clip_denoised and model.clip_sample is None:
        model = ClampDenoiser(model, -1.0, 1.0)  # models without a clip setting of their own (rectified flows)
    spec = get_sampler(sampler)
    plain_knobs = {k: v for k, v in knob_values.items() if k != "grid"}
    try:
        grid = knob_values.get("grid")
        if grid is None:
            grid = make_grid(model, spec, schedule=schedule, steps=steps, knobs=plain_knobs, schedule_params=schedule_params)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    expected = spec.expected_nfe(grid, **plain_knobs)
    batch = batch_size or min(-(-len(seeds) // dist.world_size()), 256)  # under torchrun: every rank gets work
    run = dict(sampler=sampler, schedule=schedule, steps=steps, seeds=seeds, batch_size=batch, **knob_values)
    if class_of is not None:
        run.update(cond=[class_of[s] for s in seeds], guidance=guidance)
    if init_image is not None:
        try:
            run.update(init=_init_tensor(init_image, model, shape), strength=strength)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    if expected is None:  # adaptive: the grid's steps are not used
        tol = ", ".join(f"{k} {v:g}" for k, v in spec.knob_values(**plain_knobs).items() if k in ("rtol", "atol"))
        how = f"adaptive ({tol})" if tol else "adaptive"
    else:
        how = f"{len(grid)} step{'s' * (len(grid) != 1)}"
    space = f"from latents {tuple(shape)}" if getattr(model, "codec", None) is not None else str(tuple(shape))
    what = f"{len(seeds)} images {space} with {sampler}/{schedule}, {how}"
    settings = {
        "model": model_name, "sampler": sampler, "schedule": schedule,
        "steps": len(grid) if expected is not None else "adaptive",
        "knobs": {k: (predictor if k == "predictor" else _json_value(v)) for k, v in plain_knobs.items()},
        **({"schedule_params": schedule_params} if schedule_params else {}),
        "sigma_grid": [float(v) for v in grid.sigmas], "clip_denoised": clip_denoised,
        "clip_sample": model.clip_sample, "dtype": dtype, "device": device, "batch_size": batch,
        "compile": compile, "cuda_graphs": cuda_graphs,
        **_condition_record(classes, guidance),
        **({"init_image": str(init_image), "strength": strength} if init_image is not None else {}),
        **({"sigmas_file": str(sigmas_file)} if sigmas_file is not None else {}),
    }
    if skip_existing:
        _check_previous_run(folder, settings, skip_existing)  # always, even when every PNG is there
        if not seeds:
            click.echo(f"all {len(all_seeds)} PNGs are already in {folder}/ with these settings; nothing to do")
            return
    scoring = _fid_reference(fid_ref, inception, data_dir, device, len(seeds), shape) if fid_ref else None
    bar = _progress_bar(None if expected is None else expected * -(-len(seeds) // batch), quiet)
    model = _Progress(model, bar)
    try:
        if scoring is not None and out is None and outdir is None:  # stream into the statistics, write nothing
            from diffsamp.metrics.scoring import score_model

            q = score_model(model, scoring[1], extractor=scoring[0], progress=not quiet, **run)
            bar.close()
            click.echo(f"{what}: NFE {q.nfe} per image, sampling {q.sampling_seconds:.2f} s on {device} {dtype}; "
                       f"model loaded in {load_s:.1f} s")
            click.echo(_quality_line(q.fid, q.kid, q.kid_std, len(seeds), q.reference))
            return
        on_batch = None
        if folder is not None:
            _check_previous_run(folder, settings, skip_existing)
            written = ctx.meta["diffsamp.written"] = [len(all_seeds) - len(seeds), len(all_seeds)]
            if dist.is_main():
                _write_config(folder, settings, all_seeds, None)

            def on_batch(chunk: list[int], images) -> None:  # noqa: ANN001
                from diffsamp.images import save_png

                for s, img in zip(chunk, images.clamp(-1, 1)):
                    save_png(img, folder / name_of(s))
                    written[0] += 1

        mine = dist.shard_indices(len(seeds), batch)  # under torchrun: this rank's batches, as one process runs them
        run["seeds"] = [seeds[i] for i in mine]
        if "cond" in run:
            run["cond"] = [run["cond"][i] for i in mine]
        result = generate(model, shape, device=device, on_batch=on_batch, **run) if mine else None
        bar.close()
        images = result.images.clamp(-1, 1) if result is not None else torch.zeros(0)
        if dist.world_size() > 1:
            done = [r for r in dist.gather_objects(result and (result.nfe, result.seconds)) if r]
            result = dataclasses.replace(result, nfe=max(n for n, _ in done), seconds=max(t for _, t in done)) \
                if result is not None else None
            if out is not None or scoring is not None:
                images = dist.gather_shards(images, len(seeds), batch)
            if folder is not None:
                written[0] = sum(dist.gather_objects(len(mine))) + len(all_seeds) - len(seeds)
        from diffsamp.metrics.fid import DEFAULT_BATCH_SIZE as FEATURE_BATCH

        if not dist.is_main():
            if scoring is not None:
                from diffsamp.metrics.scoring import score_images

                score_images(images[dist.shard_indices(len(images), FEATURE_BATCH)], scoring[1],
                             extractor=scoring[0], progress=False, shard_block=FEATURE_BATCH)
            return
        if out is not None:
            from diffsamp.images import save_images

            meta = _metadata(settings, all_seeds, result.nfe)
            save_images(images, out, nrow=nrow, text={"diffsamp": json.dumps(meta)})
            where = out
        else:
            _write_config(folder, settings, all_seeds, result.nfe)
            where = f"{folder}/ ({len(seeds)} PNGs" + (f", {len(all_seeds) - len(seeds)} already there)" if skip_existing else ")")
        passes = f" ({result.network_passes} network passes with guidance)" if result.guidance else ""
        click.echo(f"{what}: NFE {result.nfe} per image{passes}, {result.seconds:.2f} s "
                   f"({len(seeds) / max(result.seconds, 1e-9):.1f} img/s) on {device} {dtype}; "
                   f"model loaded in {load_s:.1f} s -> {where}")
        if scoring is not None:
            from diffsamp.metrics.scoring import score_images

            fid, kid, kid_std = score_images(images[dist.shard_indices(len(images), FEATURE_BATCH)], scoring[1],
                                             extractor=scoring[0], progress=not quiet, shard_block=FEATURE_BATCH)
            click.echo(_quality_line(fid, kid, kid_std, len(seeds), str(scoring[1].meta.get("source") or fid_ref)))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bar.close()


def _progress_bar(total: int | None, quiet: bool):  # noqa: ANN202 - a tqdm bar
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sampling", unit="NFE", disable=quiet, leave=False, dynamic_ncols=True)


class _Progress(Wrapper):
    """Advances a progress bar by one at each network evaluation (batched: one per batch)."""

    def __init__(self, inner, bar) -> None:  # noqa: ANN001
        super().__init__(inner)
        self.bar = bar

    def __call__(self, x, sigma):  # noqa: ANN001, ANN204
        out = self.inner(x, sigma)
        self.bar.update(1)
        return out


def _init_tensor(path: str, model, shape):  # noqa: ANN001, ANN202 - a Denoiser; a (1, C, H, W) tensor
    """The --init-image at the model's image size: its sample shape, or the latent's times the codec's factor."""
    from diffsamp.images import load_init_image

    codec = getattr(model, "codec", None)
    if codec is None:
        return load_init_image(path, int(shape[0]), (int(shape[1]), int(shape[2])))
    f = int(getattr(codec, "scale_factor", 8))
    return load_init_image(path, int(getattr(codec, "image_channels", 3)), (int(shape[1]) * f, int(shape[2]) * f))


def _condition_record(classes: list[int] | list[str] | None, guidance) -> dict:  # noqa: ANN001 - a Guidance or None
    """The conditioning part of a run's record: the class (``classes``) or prompt (``prompts``) of every seed, in
    seed order, and the guidance."""
    if classes is None:
        return {}
    key = "prompts" if any(isinstance(c, str) for c in classes) else "classes"
    return {key: classes, "guidance": guidance.record() if guidance is not None else None}


def _metadata(settings: dict, seeds: list[int], nfe: int | None) -> dict:
    """What reproduces the images: the settings, the seeds, the measured NFE and the versions."""
    import platform
    import sys

    import torch

    from diffsamp._version import __version__

    versions = {"diffsamp": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    return {"format": "diffsamp-samples/1", **settings, "seeds": format_seeds(seeds), "num_images": len(seeds),
            "nfe": nfe, "versions": versions, "command": " ".join(["diffsamp", *sys.argv[1:]])}


def _write_config(folder: Path, settings: dict, seeds: list[int], nfe: int | None) -> None:
    from diffsamp.io import write_json

    write_json(folder / "config.json", _metadata(settings, seeds, nfe))


_SAME_RUN_KEYS = ("model", "sampler", "schedule", "steps", "knobs", "sigma_grid", "clip_denoised", "dtype")


def _check_previous_run(folder: Path, settings: dict, skip_existing: bool) -> None:
    """--skip-existing into a folder whose config.json records other settings would mix two runs: refuse."""
    import json

    cfg = folder / "config.json"
    if not skip_existing or not cfg.is_file():
        return
    from diffsamp.io import read_json

    try:
        old = read_json(cfg, what="a diffsamp samples record")
    except ValueError as exc:
        raise click.ClickException(f"{exc}; cannot tell which settings made the PNGs in {folder}/: use another "
                                   "--outdir, or drop --skip-existing to overwrite") from None
    now = {k: json.loads(json.dumps(settings[k])) for k in _SAME_RUN_KEYS if k in settings}
    diffs = [k if isinstance(now[k], (list, dict)) else f"{k} ({old[k]}, not {now[k]})"
             for k in now if k in old and old[k] != now[k]]
    if diffs:
        raise click.ClickException(
            f"{folder}/ holds images made with other settings (its config.json has another {', '.join(diffs)}); "
            "use another --outdir, or drop --skip-existing to overwrite")


def _schedule_params(ctx: click.Context, schedule: str, model) -> dict:  # noqa: ANN001
    """--sigma-min/--sigma-max/--rho as schedule parameters: each finite and positive, σ_min < σ_max (the model's
    own bound standing in for the one not given), and taken by the schedule; one-line usage errors otherwise."""
    import math

    from diffsamp.samplers.grid import schedule_parameters

    given = {k: ctx.params.get(k) for k in ("sigma_min", "sigma_max", "rho") if ctx.params.get(k) is not None}
    takes = schedule_parameters(schedule)
    for key, value in given.items():
        opt = "--" + key.replace("_", "-")
        if key not in takes:
            raise click.UsageError(f"{opt}: schedule {schedule!r} does not take {key} (it takes "
                                   f"{', '.join(takes) or 'nothing'}); see `diffsamp schedules`")
        if not (math.isfinite(value) and value > 0):
            raise click.BadParameter(f"must be a finite positive number, got {value:g}", param_hint=opt)
    lo, hi = given.get("sigma_min", model.sigma_min), given.get("sigma_max", model.sigma_max)
    if ("sigma_min" in given or "sigma_max" in given) and lo is not None and hi is not None and not lo < hi:
        raise click.UsageError(f"need --sigma-min < --sigma-max, got σ_min = {lo:g}, σ_max = {hi:g}")
    return given


def _default_sampler_for(model_name: str) -> str:
    """``default_sampler`` told from the model's files, before it loads: euler for a saved rectified flow
    (zoo name, run directory or model.json), heun for everything else."""
    from diffsamp.models import rectified_flow, zoo

    path = zoo.model_path(model_name) if model_name in zoo.available_models() else Path(model_name).expanduser()
    return "euler" if path.exists() and rectified_flow.is_rf_model(path) else "heun"


def _needs_predictor(sampler: str, model_name: str) -> None:
    """A learned sampler without --predictor is a usage error before anything loads, naming the shipped
    predictors that fit (same model, same sampler)."""
    from diffsamp.samplers.registry import learned_samplers

    if sampler not in learned_samplers():
        return
    from diffsamp.io import read_json
    from diffsamp.samplers.amed_files import PREDICTORS_DIR, shipped_predictors

    fits = []
    for name in shipped_predictors():
        if name.split("/")[0] == Path(model_name).name:
            try:
                if read_json(PREDICTORS_DIR / f"{name}.json").get("sampler") == sampler:
                    fits.append(name)
            except ValueError:
                continue
    shipped = f"shipped for {model_name}: {', '.join(fits)}" if fits else "`diffsamp models` lists the shipped ones"
    raise click.UsageError(f"--sampler {sampler} is a learned solver and needs --predictor NAME_OR_PATH "
                           f"({shipped}; `diffsamp train amed` trains one)")


def _schedule_file(ctx: click.Context, path: str, predictor: str | None, model_name: str):  # noqa: ANN202 - a Grid
    """The grid of a ``--sigmas`` schedule file; --steps/--schedule/--predictor that would set it too are refused."""
    import warnings

    from diffsamp.models.conditioning import guidance_mismatch
    from diffsamp.samplers.schedule_file import read_schedule

    clash = [f"--{n.replace('_', '-')}" for n in ("steps", "schedule", "sigma_min", "sigma_max", "rho")
             if _given(ctx, n)] + (["--predictor"] if predictor else [])
    if clash:
        raise click.UsageError(f"--sigmas sets the grid; drop {' and '.join(clash)}")
    try:
        grid, doc = read_schedule(path)
    except (ValueError, FileNotFoundError) as exc:
        raise click.BadParameter(str(exc), param_hint="--sigmas") from None
    if doc.get("model") and doc["model"] != model_name:
        warnings.warn(f"the schedule {path} was found for {doc['model']}, not {model_name}", UserWarning, stacklevel=2)
    scale = ctx.params.get("cfg_scale")
    mismatch = guidance_mismatch(doc, 1.0 if scale is None else scale, f"the schedule {path}")
    if mismatch and (ctx.params.get("classes") or ctx.params.get("class_label") is not None):
        warnings.warn(mismatch, UserWarning, stacklevel=2)
    return grid


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def _refuse_overrides(predictor: str, amed_knobs: dict, given: dict, fixed: dict, user_knobs: dict) -> None:
    """A predictor samples on the grid and with the knobs it was trained with: --steps, --schedule or a --knob
    that says otherwise is refused in one line saying what the predictor uses (rather than silently ignored)."""
    clash = [f"{opt} {given[opt]}" for opt in given if given[opt] is not None and given[opt] != fixed[opt]]
    text = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731 - as typed on the command line
    clash += [f"--knob {k}={text(v)}" for k, v in user_knobs.items() if k in amed_knobs and amed_knobs[k] != v]
    if clash:
        cfg = amed_knobs["predictor"].config
        uses = f"--steps {fixed['--steps']} --schedule {fixed['--schedule']} (NFE {cfg.get('nfe', '?')})"
        uses += "".join(f" --knob {k}={text(v)}" for k, v in amed_knobs.items() if k in user_knobs)
        raise click.UsageError(f"--predictor {predictor} samples on the grid it was trained on: {uses}; "
                               f"drop {' and '.join(clash)} (or train a predictor for them with `diffsamp train amed`)")


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
    spread = f" ± {kid_std * 1e3:.3f}" if kid_std else ""  # none (or 0: one subset) is not a spread to print
    kid_txt = f", KID {kid * 1e3:.3f}{spread} ×1e-3" if kid is not None else ""
    return f"FID {nonnegative(fid, 3)}{kid_txt} ({n} samples vs {ref})"


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
        cond = card.get("conditioning")
        if cond and cond.get("kind") == "class":
            guided = ", guidance: yes" if cond.get("null_class") is not None else ""
            bits.append(f"class-conditional ({cond['num_classes']} classes{guided})")
        steps = card.get("steps") or (card.get("training") or {}).get("steps")
        if steps:
            bits.append(f"{steps} training steps")
        bits.extend(_quality_summary(card))
        click.echo(f"{name:<{width}}  {'; '.join(bits)}")
    _list_predictors()
    _list_schedules()


def _echo_listing(title: str, rows: dict[str, str]) -> None:
    """A titled block of ``name  description`` lines, names aligned (nothing when there are no rows)."""
    if not rows:
        return
    click.echo(f"\n{title}:")
    width = max(len(n) for n in rows)
    for name, text in rows.items():
        click.echo(f"{name:<{width}}  {text}")


def _list_predictors() -> None:
    """The shipped learned-solver predictors, with what they were trained for (use with --predictor NAME)."""
    from diffsamp.samplers.amed_files import describe_predictor, load_predictor, shipped_predictors

    rows = {}
    for name in shipped_predictors():
        cfg = load_predictor(name).config
        kind = describe_predictor(cfg["predictor"])
        fid = cfg.get("fid")
        fid_txt = f"; FID {fid['fid']:.2f} (N = {fid['num']})" if isinstance(fid, dict) else ""
        rows[name] = (f"{cfg['sampler']}, NFE {cfg['nfe']}, {cfg['schedule']}, {kind}, "
                      f"{cfg['training']['trajectories_done']} trajectories{fid_txt}")
    _echo_listing("Learned-solver predictors (diffsamp sample --model MODEL --sampler S --predictor NAME)", rows)


def _list_schedules() -> None:
    """The shipped learned schedules: the sampler, NFE and loss they were learned with (use with --sigmas NAME)."""
    from diffsamp.samplers.schedule_file import read_schedule, shipped_schedules

    rows = {}
    for name in shipped_schedules():
        grid, doc = read_schedule(name)
        opts = doc.get("options", {})
        fid = doc.get("fid")
        fid_txt = (f"; FID {fid['fid']:.2f} against {fid['start_fid']:.2f} on its starting grid (N = {fid['num']})"
                   if isinstance(fid, dict) else "")
        rows[name] = (f"{doc.get('method')} for {opts.get('base', 'ipndm')}, loss {opts.get('loss', 'l2')}, "
                      f"NFE {len(grid)}, from {opts.get('schedule')}, {opts.get('trajectories')} trajectories{fid_txt}")
    _echo_listing("Learned schedules (diffsamp sample --model MODEL --sampler S --sigmas NAME)", rows)


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
