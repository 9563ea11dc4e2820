"""The conditioning options every sampling command shares: class labels or text prompts cycled over the
seeds, classifier-free guidance (scale, interval, rescale) and an img2img start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from diffsamp.cli._seeds import parse_class_list
from diffsamp.models.conditioning import Guidance


def condition_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--class``, ``--classes``, ``--prompt``, ``--prompts``, ``--negative-prompt``, ``--cfg``, ``--cfg-interval``,
    ``--cfg-rescale``, ``--init-image``, ``--strength``."""
    options = [
        click.option("--class", "class_label", default=None, type=click.IntRange(min=0),
                     help="Class-conditional models: the class of every image."),
        click.option("--classes", default=None,
                     help="Class-conditional models: classes cycled over the seeds, e.g. 0-9 (seed i gets the i-th "
                          "class mod the list's length)."),
        click.option("--prompt", default=None,
                     help="Text-conditional models (Stable Diffusion pipelines): the prompt of every image."),
        click.option("--prompts", "prompts_file", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Text-conditional models: a file of prompts, one per line (blank lines skipped), cycled over "
                          "the seeds."),
        click.option("--negative-prompt", default=None,
                     help="Text-conditional models under guidance (--cfg): the prompt of the unconditional half "
                          "(default: the empty prompt)."),
        click.option("--cfg", "cfg_scale", default=None, type=float,
                     help="Classifier-free guidance scale w (Ho & Salimans 2022): D = D_u + w·(D_c − D_u); 1 = the "
                          "conditional model alone (default), 0 = the unconditional one."),
        click.option("--cfg-interval", default=None, metavar="LO,HI",
                     help="Apply the guidance only for σ in [LO, HI] (Kynkäänniemi et al. 2024), e.g. 0.3,5."),
        click.option("--cfg-rescale", default=0.0, show_default=True, type=click.FloatRange(0, 1),
                     help="Guidance rescale φ (Lin et al. 2024, Alg. 2)."),
        click.option("--init-image", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="img2img (SDEdit, Meng et al. 2022): start every image from this one, noised to the σ "
                          "that --strength picks (resized and converted to the model's image size and channels)."),
        click.option("--strength", default=None, type=click.FloatRange(0, 1),
                     help="With --init-image: the fraction of the grid's steps that run (its later part); 1 ignores "
                          "the image, 0 returns it.  [default: 0.6]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def parse_init(kw: dict[str, Any]) -> tuple[str | None, float]:
    """Pop ``--init-image`` and ``--strength``: (the image path or None, the strength)."""
    path, strength = kw.pop("init_image"), kw.pop("strength")
    if strength is not None and path is None:
        raise click.UsageError("--strength sets how much of an --init-image is kept; give --init-image too")
    return path, 0.6 if strength is None else strength


def _read_prompts(path: str) -> list[str]:
    """The prompts of a ``--prompts`` file: one per line, blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise click.UsageError(f"--prompts: cannot read {path} ({exc})") from None
    if not prompts:
        raise click.UsageError(f"--prompts: {path} holds no prompt (one per line)")
    return prompts


def parse_conditions(kw: dict[str, Any], n_seeds: int) -> tuple[list[int] | list[str] | None, Guidance | None]:
    """Pop the conditioning options from ``kw``: (one condition per seed — class labels or prompts — or None,
    the guidance or None). A bad combination is a click.UsageError before any model loads."""
    one, many = kw.pop("class_label"), kw.pop("classes")
    prompt, prompts_file, negative = kw.pop("prompt"), kw.pop("prompts_file"), kw.pop("negative_prompt")
    scale, interval, rescale = kw.pop("cfg_scale"), kw.pop("cfg_interval"), kw.pop("cfg_rescale")
    given = [n for n, v in (("--class", one), ("--classes", many), ("--prompt", prompt), ("--prompts", prompts_file))
             if v is not None]
    if len(given) > 1:
        raise click.UsageError(f"give one of --class, --classes, --prompt or --prompts, not {' and '.join(given)}")
    if negative is not None and prompt is None and prompts_file is None:
        raise click.UsageError("--negative-prompt guides a text-conditional model: give --prompt or --prompts too")
    if negative is not None and (scale is None or scale == 1.0):
        raise click.UsageError("--negative-prompt is the unconditional half of guidance: give --cfg W with W ≠ 1 too")
    if prompt is not None or prompts_file is not None:
        cycle = [prompt] if prompt is not None else _read_prompts(prompts_file)
        prompts: list[str] = [cycle[i % len(cycle)] for i in range(n_seeds)]
        return prompts, _guidance(scale, interval, rescale, negative, prompts)
    classes = None
    if one is not None:
        classes = [one] * n_seeds
    elif many is not None:
        cycle = parse_class_list(many)
        classes = [cycle[i % len(cycle)] for i in range(n_seeds)]
    return classes, _guidance(scale, interval, rescale, None, classes)


def _guidance(scale: float | None, interval: str | None, rescale: float, negative: str | None,
              conditions: list[Any] | None) -> Guidance | None:
    """The guidance the options ask for (Ho & Salimans 2022), None without any; a UsageError for a bad one."""
    guided = scale is not None or interval is not None or rescale
    if guided and conditions is None:
        raise click.UsageError("--cfg, --cfg-interval and --cfg-rescale guide a conditional model: give --class, "
                               "--classes, --prompt or --prompts too")
    if not guided:
        return None
    lohi = None
    if interval is not None:
        try:
            lo, hi = (float(v) for v in interval.split(","))
        except ValueError:
            raise click.UsageError(f"--cfg-interval: expected LO,HI (two numbers, e.g. 0.3,5), got {interval!r}") from None
        lohi = (lo, hi)
    try:
        return Guidance(1.0 if scale is None else scale, lohi, rescale, negative)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
