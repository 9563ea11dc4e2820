"""``diffsamp train ...``: one subcommand per trainer, sharing the loop options below.

Other trainers add themselves to the group the same way::

    from diffsamp.cli.train import train, loop_options, loop_config
    @train.command("rf")
    @loop_options
    def rf_cmd(**kw): ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from diffsamp.cli._common import main, pop_options, resolve_device, writable_folder


def loop_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options every trainer shares (the loop's ``TrainConfig`` plus run dir, device, resume)."""
    opts = [
        click.option("--out", "out", required=True, type=click.Path(file_okay=False), callback=writable_folder, help="Run directory."),
        click.option("--steps", default=20_000, show_default=True, type=click.IntRange(min=1), help="Optimizer steps in total."),
        click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1)),
        click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak AdamW learning rate."),
        click.option("--warmup-steps", default=500, show_default=True, type=click.IntRange(min=0)),
        click.option("--decay-steps", default=0, show_default=True, type=click.IntRange(min=0), help="Decay the learning rate linearly to 0 over the last K steps (0: constant after warm-up)."),
        click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0)),
        click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0), help="Max gradient norm (0: off)."),
        click.option("--ema-decay", default=0.999, show_default=True, type=click.FloatRange(0, 1, max_open=True)),
        click.option("--ckpt-every", default=1000, show_default=True, type=click.IntRange(min=0), help="Checkpoint every K steps (0: only at the end / on interruption)."),
        click.option("--sample-every", default=0, show_default=True, type=click.IntRange(min=0), help="Write an EMA sample grid every K steps (0: only at the end)."),
        click.option("--log-every", default=50, show_default=True, type=click.IntRange(min=1)),
        click.option("--seed", default=0, show_default=True, type=int),
        click.option("--max-minutes", default=None, type=click.FloatRange(min=0, min_open=True), help="Stop (with a checkpoint and an exported model) after this wall time; --resume continues."),
        click.option("--precision", "mixed_precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "no"]), help="auto: bf16 autocast on CUDA, fp32 on CPU."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--resume", is_flag=True, help="Continue the checkpoint in --out exactly where it stopped."),
        click.option("--no-progress", is_flag=True, help="No progress bar (log lines still go to RUN_DIR/log.jsonl)."),
    ]
    return functools.reduce(lambda acc, opt: opt(acc), reversed(opts), f)


LOOP_KEYS = (
    "steps", "lr", "warmup_steps", "decay_steps", "weight_decay", "grad_clip", "ema_decay", "ckpt_every",
    "sample_every", "log_every", "seed", "max_minutes", "mixed_precision",
)


def loop_config(kw: dict[str, Any]):
    """Pop the loop's options out of a command's keyword arguments into a ``TrainConfig``."""
    from diffsamp.training.loop import TrainConfig

    return TrainConfig(**{k: kw.pop(k) for k in LOOP_KEYS})


@main.group("train")
def train() -> None:
    """Train models (DDPM on MNIST / Fashion-MNIST / CIFAR-10 / an image folder).

    \b
    Example:
      diffsamp train ddpm --dataset mnist --data-dir ~/data --out runs/mnist --steps 20000
      diffsamp train ddpm --dataset mnist --data-dir ~/data --out runs/mnist --resume
    """


@train.command("ddpm")
@click.option("--dataset", default="mnist", show_default=True, help="mnist, fashion-mnist, cifar10 or a folder of images.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Folder holding the data set (else $DIFFSAMP_DATA).")
@click.option("--prediction-type", default="epsilon", show_default=True, type=click.Choice(["epsilon", "v_prediction"]))
@click.option("--channels", default="16,48,96", show_default=True, help="UNet channels per resolution level.")
@click.option("--layers-per-block", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--attention-levels", default=None, help="Levels with self-attention, e.g. 2 (default: the lowest resolution); 'none' for none.")
@click.option("--dropout", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--random-flip", is_flag=True, help="Mirror training images horizontally at random (not for digits).")
@click.option("--num-grid", default=64, show_default=True, type=click.IntRange(min=0), help="Images in each EMA sample grid (RUN_DIR/samples/; 0: none).")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=8), help="Pad images to this size.")
@click.option("--init", default=None, help="Warm start from a DDPM model (zoo name, diffusers dir or run dir); its architecture replaces --channels etc.")
@click.option("--class-conditional", is_flag=True, help="Learn p(x | class) from the data set's labels (mnist, fashion-mnist), with label dropout for classifier-free guidance; an unconditional --init gains a zero-initialised class embedding.")
@click.option("--class-lr-scale", default=50.0, show_default=True, type=click.FloatRange(0, min_open=True), help="With --class-conditional: the class embedding's learning rate relative to --lr (it starts at zero; at the base rate it learns too slowly in a warm-started network).")
@click.option("--label-dropout", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True), help="With --class-conditional: the fraction of labels replaced by the null class (Ho & Salimans 2022).")
@loop_options
def ddpm_cmd(**kw: Any) -> None:
    """Train a DDPM (ε- or v-prediction, linear β 1e-4→0.02, T=1000) saved in diffusers' format.

    \b
    The run directory ends up loadable by diffsamp.models.load(RUN_DIR), by
    diffusers' DDPMPipeline.from_pretrained(RUN_DIR) and UNet2DModel.from_pretrained(RUN_DIR/unet).
    Ctrl-C writes a checkpoint; --resume continues bit for bit.

    \b
    Example:
      diffsamp train ddpm --dataset mnist --data-dir ~/data --out runs/mnist --steps 20000
      diffsamp train ddpm --class-conditional --init mnist-ddpm --out runs/mnist-cond --steps 4000
    """
    from diffsamp.data import DataNotFoundError
    from diffsamp.training.ddpm import DDPMTrainOptions, train_ddpm

    options = pop_options(DDPMTrainOptions, kw, sample_size=kw.pop("image_size"))
    config = loop_config(kw)
    device = resolve_device(kw.pop("device"))
    try:
        result = train_ddpm(
            kw.pop("out"), options, config, device=device, resume=kw.pop("resume"), progress=not kw.pop("no_progress")
        )
    except (DataNotFoundError, FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    state = "finished" if result.finished else "stopped (resume with --resume)"
    loss = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
    click.echo(f"{state} at step {result.step}; last loss {loss}; {result.seconds:.0f} s of training")


@train.command("export")
@click.argument("run_dir", type=click.Path(exists=True))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Target directory (default: RUN_DIR itself).")
@click.option("--raw", is_flag=True, help="Export the raw (non-EMA) weights.")
def export_cmd(run_dir: str, out: str | None, raw: bool) -> None:
    """Write the latest checkpoint's EMA weights of a DDPM run in diffusers' format, with a card.

    \b
    Works while the run is still training (it only reads the checkpoint).
    Example:
      diffsamp train export runs/mnist --out models/mnist-ddpm
    """
    from diffsamp.training.ddpm import export_checkpoint

    try:
        path = export_checkpoint(run_dir, out, which="model" if raw else "ema")
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"exported to {path}")
