"""Seed lists on the command line: ``0-63``, ``1,5,9``, ``0-3,10`` (also the syntax of ``--classes``)."""

from __future__ import annotations

import click

MAX_SEEDS = 1_000_000


def _seed_int(part: str, text: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise ValueError(f"{part!r} in {text!r} is not a seed (a non-negative integer)") from None


def parse_seeds(text: str) -> list[int]:
    """``0-63`` → 0..63, ``1,5,9`` → [1, 5, 9], ``0-3,10`` → [0, 1, 2, 3, 10]. Order kept, duplicates refused."""
    seeds: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty item in seed list {text!r}")
        if "-" in part[1:]:
            i = part.index("-", 1)
            lo, hi = _seed_int(part[:i], text), _seed_int(part[i + 1 :], text)
            if hi < lo:
                raise ValueError(f"seed range {part!r} is decreasing")
            if hi - lo + 1 > MAX_SEEDS:
                raise ValueError(f"seed range {part!r} is longer than {MAX_SEEDS}")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(_seed_int(part, text))
    if any(s < 0 or s >= 2**63 for s in seeds):
        raise ValueError("seeds must be non-negative 64-bit integers")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seed list {text!r} repeats a seed")
    return seeds


def format_seeds(seeds: list[int]) -> str:
    """The inverse of ``parse_seeds``: runs of consecutive seeds written as ``lo-hi``, e.g. ``0-63,100``."""
    parts: list[str] = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


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


def parse_class_list(text: str | None, hint: str = "--classes") -> list[int] | None:
    """``--classes`` (the seed-list syntax, e.g. ``0-9``) as a list of classes, None when not given; a bad list
    is a click.BadParameter."""
    if text is None:
        return None
    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (expected e.g. 0-9 or 1,5,9)", param_hint=hint) from None
