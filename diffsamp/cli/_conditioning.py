"""The conditioning options every sampling command shares: class labels cycled over the seeds,
classifier-free guidance (scale, interval, rescale) and an img2img start."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from diffsamp.cli._seeds import parse_seeds
from diffsamp.models.conditioning import Guidance


def condition_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--class``, ``--classes``, ``--cfg``, ``--cfg-interval``, ``--cfg-rescale``, ``--init-image``,
    ``--strength``."""
    options = [
        click.option("--class", "class_label", default=None, type=click.IntRange(min=0),
                     help="Class-conditional models: the class of every image."),
        click.option("--classes", default=None,
                     help="Class-conditional models: classes cycled over the seeds, e.g. 0-9 (seed i gets the i-th "
                          "class mod the list's length)."),
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


def parse_conditions(kw: dict[str, Any], n_seeds: int) -> tuple[list[int] | None, Guidance | None]:
    """Pop the conditioning options from ``kw``: (one class per seed or None, the guidance or None). A bad
    combination is a click.UsageError before any model loads."""
    one, many = kw.pop("class_label"), kw.pop("classes")
    scale, interval, rescale = kw.pop("cfg_scale"), kw.pop("cfg_interval"), kw.pop("cfg_rescale")
    if one is not None and many is not None:
        raise click.UsageError("give one of --class (every image) or --classes (cycled over the seeds)")
    classes = None
    if one is not None:
        classes = [one] * n_seeds
    elif many is not None:
        try:
            cycle = parse_seeds(many)
        except ValueError as exc:
            raise click.UsageError(f"--classes: {exc} (expected e.g. 0-9 or 1,5,9)") from None
        classes = [cycle[i % len(cycle)] for i in range(n_seeds)]
    guided = scale is not None or interval is not None or rescale
    if guided and classes is None:
        raise click.UsageError("--cfg, --cfg-interval and --cfg-rescale guide a conditional model: give --class or "
                               "--classes too")
    if not guided:
        return classes, None
    lohi = None
    if interval is not None:
        try:
            lo, hi = (float(v) for v in interval.split(","))
        except ValueError:
            raise click.UsageError(f"--cfg-interval: expected LO,HI (two numbers, e.g. 0.3,5), got {interval!r}") from None
        lohi = (lo, hi)
    try:
        return classes, Guidance(1.0 if scale is None else scale, lohi, rescale)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
