"""Rectified-flow commands: ``train rf|reflow|distill``, ``reflow pairs`` and ``rf straightness``.

\b
The whole recipe (RF paper, Alg. 1) on MNIST:
  diffsamp train rf --dataset mnist --data-dir DATA --out runs/rf1 --steps 20000
  diffsamp reflow pairs --model runs/rf1 --sampler euler --steps 100 --num 50000 --out runs/pairs1
  diffsamp train reflow --pairs runs/pairs1 --init runs/rf1 --out runs/rf2 --steps 10000
  diffsamp reflow pairs --model runs/rf2 --sampler euler --steps 100 --num 50000 --out runs/pairs2
  diffsamp train distill --pairs runs/pairs2 --init runs/rf2 --out runs/rf2-distill --train-steps 5000
  diffsamp rf straightness --model runs/rf2
"""

from __future__ import annotations

import json
from typing import Any

import click

from diffsamp.cli._common import (
    knob_option,
    load_or_fail,
    main,
    parse_knobs,
    pop_options,
    resolve_device,
    writable_folder,
)
from diffsamp.cli.train import loop_config, loop_options, train
from diffsamp.samplers import available_samplers, available_schedules, get_sampler

ODE_SAMPLERS = [s for s in available_samplers() if get_sampler(s).kind == "ode"]


def _arch_options(f):
    opts = [
        click.option("--t-sampling", default="uniform", show_default=True, type=click.Choice(["uniform", "logit-normal"]),
                     help="How t is drawn: U(0, 1), or sigmoid(N(m, s²)) (--logit-mean/--logit-std)."),
        click.option("--logit-mean", default=0.0, show_default=True, type=float),
        click.option("--logit-std", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True)),
        click.option("--channels", default="32,64,128", show_default=True, help="New UNet: channels per resolution level."),
        click.option("--layers-per-block", default=1, show_default=True, type=click.IntRange(min=1)),
        click.option("--attention-levels", default=None, help="New UNet: levels with self-attention (default: the lowest resolution); 'none' for none."),
        click.option("--dropout", default=0.0, show_default=True, type=click.FloatRange(0, 1)),
        click.option("--mlp-hidden", default=256, show_default=True, type=click.IntRange(min=1), help="New toy MLP: width."),
        click.option("--mlp-depth", default=3, show_default=True, type=click.IntRange(min=1), help="New toy MLP: hidden layers."),
        click.option("--num-grid", default=64, show_default=True, type=click.IntRange(min=0), help="Samples in the EMA sample grids (0: none)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _options(kw: dict[str, Any], **extra: Any):
    from diffsamp.training.rectified_flow import RFTrainOptions

    return pop_options(RFTrainOptions, kw, **extra)


def _report(result: Any, out: str) -> None:
    state = "finished" if result.finished else "stopped (resume with --resume)"
    loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    click.echo(f"{state} at step {result.step}; last loss {loss}; {result.seconds:.0f} s of training; model: {out}")


def _run_training(fn, kw: dict[str, Any], *args: Any, **kwargs: Any) -> None:
    from diffsamp.data import DataNotFoundError
    from diffsamp.training.pairs import PairsError

    config = loop_config(kw)
    device = resolve_device(kw.pop("device"))
    out = kw.pop("out")
    try:
        result = fn(out, *args, config, device=device, resume=kw.pop("resume"), progress=not kw.pop("no_progress"),
                    **kwargs)
    except (DataNotFoundError, FileExistsError, FileNotFoundError, PairsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    _report(result, out)


@train.command("rf")
@click.option("--dataset", default="mnist", show_default=True, help="mnist, fashion-mnist or toy:NAME (toy:moons, toy:gauss8, toy:gauss6-moons, toy:mix2).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Folder holding the data set (else $DIFFSAMP_DATA).")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=8), help="Pad images to this size.")
@click.option("--init", default=None, help="Start from this rectified flow (zoo name, file or run dir) instead of fresh weights.")
@_arch_options
@loop_options
def rf_cmd(**kw: Any) -> None:
    """Train a 1-rectified flow: velocity matching on straight lines between noise and data.

    \b
    Time runs t = 0 data → t = 1 noise, x_t = (1−t)·x0 + t·ε, v = ε − x0 (the RF paper's
    time reversed). The run directory ends with model.safetensors + model.json (EMA weights),
    usable as --model RUN_DIR everywhere. Ctrl-C writes a checkpoint; --resume continues bit for bit.
    \b
    Examples:
      diffsamp train rf --dataset mnist --data-dir DATA --out runs/rf1 --steps 20000
      diffsamp train rf --dataset toy:moons --out runs/moons --steps 2000 --batch-size 512
    """
    opts = _options(kw, dataset=kw.pop("dataset"), data_dir=kw.pop("data_dir"), sample_size=kw.pop("image_size"),
                    init=kw.pop("init"))
    from diffsamp.training.rectified_flow import train_rf

    _run_training(train_rf, kw, opts)


@train.command("reflow")
@click.option("--pairs", "pairs_dir", required=True, type=click.Path(file_okay=False), help="Pairs directory from `diffsamp reflow pairs`.")
@click.option("--init", default=None, help="The rectified flow to fine-tune (usually the one that made the pairs); default: fresh weights.")
@click.option("--allow-partial", is_flag=True, help="Use the complete shards of an unfinished pairs directory.")
@_arch_options
@loop_options
def reflow_cmd(**kw: Any) -> None:
    """Train the (k+1)-rectified flow on (noise, sample) pairs of a k-rectified flow (or of any model's ODE).

    \b
    Example:
      diffsamp train reflow --pairs runs/pairs1 --init runs/rf1 --out runs/rf2 --steps 10000
    """
    opts = _options(kw, init=kw.pop("init"))
    from diffsamp.training.rectified_flow import train_reflow

    _run_training(train_reflow, kw, kw.pop("pairs_dir"), opts, allow_partial=kw.pop("allow_partial"))


@train.command("distill")
@click.option("--pairs", "pairs_dir", required=True, type=click.Path(file_okay=False), help="Pairs directory from `diffsamp reflow pairs`.")
@click.option("--init", default=None, help="The rectified flow to start from (usually the one that made the pairs).")
@click.option("--steps", "distill_steps", default=1, show_default=True, type=click.IntRange(min=1), help="K: the generator's Euler steps (1: one-step generator).")
@click.option("--allow-partial", is_flag=True, help="Use the complete shards of an unfinished pairs directory.")
@_arch_options
@loop_options
def distill_cmd(**kw: Any) -> None:
    """Distill a flow's coupling into a K-step Euler generator (L2 on the pairs).

    \b
    Here --steps is K, the generator's sampling steps; the optimizer's steps are --train-steps.
    Sample the result with: --sampler euler --schedule rf --steps K.
    \b
    Example:
      diffsamp train distill --pairs runs/pairs2 --init runs/rf2 --out runs/distill --train-steps 5000
    """
    kw.pop("t_sampling"), kw.pop("logit_mean"), kw.pop("logit_std")
    kw.update(t_sampling="uniform", logit_mean=0.0, logit_std=1.0)
    opts = _options(kw, init=kw.pop("init"))
    from diffsamp.training.rectified_flow import train_distill

    _run_training(train_distill, kw, kw.pop("pairs_dir"), opts, distill_steps=kw.pop("distill_steps"),
                  allow_partial=kw.pop("allow_partial"))


# the loop's --steps (optimizer steps) is --train-steps for distill, whose --steps is K
for _p in distill_cmd.params:
    if _p.name == "steps":
        _p.opts = ["--train-steps"]
for _p in distill_cmd.params:
    if _p.name in ("t_sampling", "logit_mean", "logit_std"):
        _p.hidden = True


# ------------------------------------------------------------------------------------------ reflow pairs
@main.group("reflow")
def reflow_group() -> None:
    """Reflow: make (noise, sample) pairs from a model's ODE (then `diffsamp train reflow|distill`).

    \b
    Example:
      diffsamp reflow pairs --model mnist-rf --sampler euler --steps 100 --num 50000 --out pairs/
    """


@reflow_group.command("pairs")
@click.option("--model", "model_name", required=True, help="Zoo name (mnist-rf, mnist-ddpm, …), saved model or run dir.")
@click.option("--sampler", default="euler", show_default=True, type=click.Choice(ODE_SAMPLERS), help="A deterministic ODE sampler.")
@click.option("--schedule", default=None, type=click.Choice(available_schedules()), help="Default: rf for rectified flows, karras otherwise.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(min=1), help="Sampler steps (rk45: ignored, adaptive: it integrates the schedule's σ_max → σ_min).")
@click.option("--num", "-n", "num", required=True, type=click.IntRange(min=1), help="Number of pairs.")
@click.option("--out", required=True, type=click.Path(file_okay=False), callback=writable_folder, help="Pairs directory (resumes if it exists).")
@click.option("--shard-size", default=5000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Pair i uses noise seed SEED + i.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "no"]), help="auto: bf16 autocast for the network on CUDA.")
@click.option("--max-minutes", default=None, type=click.FloatRange(min=0, min_open=True), help="Stop after the shard in flight once this time is up (run again to resume).")
@click.option("--no-progress", is_flag=True)
@knob_option
def pairs_cmd(model_name: str, sampler: str, schedule: str | None, steps: int, num: int, out: str, shard_size: int,
              batch_size: int, seed: int, device: str, precision: str, max_minutes: float | None, no_progress: bool,
              knobs: tuple[str, ...]) -> None:
    """Integrate a model from fixed noise and store (noise, sample) pairs in resumable shards.

    \b
    The noise stored is the standard normal z of pair i (seed SEED + i), so a flow trained on the
    pairs maps z to the sample, whichever model (a flow, or a DDPM through its PF-ODE) made them.
    \b
    Examples:
      diffsamp reflow pairs --model mnist-rf --sampler euler --steps 100 --num 50000 --out runs/pairs1
      diffsamp reflow pairs --model mnist-ddpm --sampler heun --schedule karras --steps 18 --num 20000 --out runs/ddpm-pairs
    """
    from diffsamp.models.base import AutocastDenoiser, default_schedule
    from diffsamp.models.rectified_flow import RFDenoiser
    from diffsamp.models.zoo import model_dataset
    from diffsamp.training.pairs import PairsError, generate_pairs

    knob_values = parse_knobs(sampler, knobs)
    dev = resolve_device(device)
    model = load_or_fail(model_name, device=dev)
    is_rf = model.prior == "rf"
    if precision == "bf16" or (precision == "auto" and dev.startswith("cuda")):
        if isinstance(model, RFDenoiser):
            model.autocast = True  # the σ-space conversion stays in float32
        else:
            model = AutocastDenoiser(model)
    rect = int(model.info.get("rectification") or 1) if is_rf else 0
    try:
        meta = generate_pairs(
            model, out, num=num, shape=model.sample_shape, sampler=sampler,
            schedule=schedule or default_schedule(model), steps=steps, knobs=knob_values, model_name=model_name,
            rectification=rect, dataset=model_dataset(model_name, model), source=model.source,
            shard_size=shard_size, batch_size=batch_size, seed=seed, device=dev, max_minutes=max_minutes,
            progress=not no_progress,
        )
    except (PairsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    state = "complete" if meta["complete"] else "incomplete (run again to resume)"
    click.echo(f"{meta['done']}/{num} pairs in {out}: {state}; NFE per sample {meta.get('nfe')}; "
               f"{meta['seconds']:.0f} s this run")


# ------------------------------------------------------------------------------------------ rf straightness
@main.group("rf")
def rf_group() -> None:
    """Rectified-flow diagnostics.

    \b
    Example:
      diffsamp rf straightness --model mnist-rf --num 1000
    """


@rf_group.command("straightness")
@click.option("--model", "model_name", required=True, help="Zoo name, saved model or run dir (any model: its ODE in RF time).")
@click.option("--num", "-n", "num", default=1000, show_default=True, type=click.IntRange(min=2), help="Paths (Monte-Carlo samples).")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(min=1), help="Euler steps along each path.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def straightness_cmd(model_name: str, num: int, steps: int, seed: int, batch_size: int, device: str, as_json: bool) -> None:
    """The RF paper's straightness S = ∫ E‖(Z1 − Z0) − Ż_t‖² dt, with its Monte-Carlo error.

    \b
    0 for straight paths. Printed as the sum over coordinates and per coordinate, and relative
    to E‖Z1 − Z0‖² (the transport cost). Noise of path i: seed SEED + i.
    \b
    Example:
      diffsamp rf straightness --model mnist-2rf --num 1000 --steps 100
    """
    from diffsamp.data.toys import draw_noise
    from diffsamp.metrics.straightness import straightness

    dev = resolve_device(device)
    model = load_or_fail(model_name, device=dev)
    z = draw_noise(model.source, model.sample_shape, 0, num, seed)
    res = straightness(model, z, steps=steps, batch_size=batch_size, device=dev)
    if as_json:
        click.echo(json.dumps({"model": model_name, **res}))
        return
    click.echo(f"{model_name}: straightness S = {res['S']:.4g} ± {res['S_err']:.2g} (sum over {res['dim']} coordinates); "
               f"per coordinate {res['S_per_dim']:.4g} ± {res['S_per_dim_err']:.2g}; relative to E‖Z1−Z0‖² "
               f"{res['relative']:.4f}  [N={res['num']} paths, Euler {res['steps']} steps]")
