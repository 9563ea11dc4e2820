"""``diffsamp fid ref|calc|download``: reference statistics, FID/KID between two sides, the weights."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from diffsamp import dist
from diffsamp.cli._common import check_writable, main, nonnegative, resolve_device

DATASETS = ("mnist", "fashion-mnist", "cifar10")


def _inception_options(f):
    """The options every command that runs the network shares."""
    opts = [
        click.option("--inception", type=click.Path(dir_okay=False), default=None,
                     help="Inception weights (TorchScript); default $DIFFSAMP_INCEPTION, then the cache folder."),
        click.option("--download-weights", is_flag=True,
                     help="If no weights are found, download NVlabs' inception-2015-12-05.pt into the cache."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available).",
                     callback=lambda ctx, param, value: None if value is None else resolve_device(value)),
        click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _errors(f):
    """Turn the library's clear errors into click errors (no tracebacks)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from diffsamp.data import DataNotFoundError
        from diffsamp.metrics.fid import IncompatibleStatsError, WeightsNotFoundError
        from diffsamp.images import ImageFolderError

        try:
            return f(*args, **kwargs)
        except ImageFolderError as exc:
            raise click.BadParameter(str(exc)) from exc
        except (WeightsNotFoundError, DataNotFoundError, IncompatibleStatsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _extractor(inception, download_weights, device):
    from diffsamp.metrics.fid import load_extractor

    return load_extractor(inception, device, download=download_weights)


@main.group("fid")
def fid_group() -> None:
    """FID and KID with the standard TF Inception-v3 (2015-12-05) features.

    \b
    Examples:
      diffsamp fid ref --dataset mnist --split test --num 2000 --out mnist-test-2k.npz
      diffsamp fid calc samples/ mnist-test-2k.npz
      diffsamp fid download          # once, with internet, if you have no weights file

    Images are quantized to uint8, resized to 299×299 like TensorFlow 1's resize_bilinear, and
    grayscale is repeated to 3 channels. Both sides must have the same size and padding: MNIST-like
    references are padded 28→32 by default, as the models are trained.
    """


@fid_group.command("ref")
@click.argument("folder", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--dataset", type=click.Choice(DATASETS), default=None, help="A data set instead of a folder.")
@click.option("--split", type=click.Choice(("train", "test")), default="train", show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where the data set files are (default $DIFFSAMP_DATA).")
@click.option("--num", "-n", "num", type=click.IntRange(min=2), default=None, help="Use the first NUM images (default: all).")
@click.option("--pad-to", type=click.IntRange(min=0), default=32, show_default=True,
              help="Data sets: pad smaller images (28×28 digits) with background to this size; 0 keeps them as stored.")
@click.option("--padding", type=click.IntRange(min=0), default=None,
              help="Folders: background pixels the images carry on each side (recorded; checked by calc).")
@click.option("--features/--no-features", default=None,
              help="Store the raw features too (needed for KID). Default: when there are at most 10 000 images.")
@click.option("--no-cache", is_flag=True, help="Data sets: recompute instead of reusing the cached statistics.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .npz to write.")
@_inception_options
@_errors
def ref_cmd(folder, dataset, split, data_dir, num, pad_to, padding, features, no_cache, out,
            inception, download_weights, device, batch_size, progress) -> None:
    """Reference statistics (mu, sigma as pytorch-fid, + metadata) of a data set or a folder of images.

    \b
    Examples:
      diffsamp fid ref --dataset mnist --split train --num 2000 --out mnist-train-2k.npz
      diffsamp fid ref --dataset cifar10 --split train --data-dir ~/data --out cifar10-train.npz
      diffsamp fid ref my_images/ --out my_images.npz
    """
    from diffsamp.metrics.fid import FEATURES_UP_TO, folder_stats, reference_stats, save_stats
    from diffsamp.images import scan_image_folder

    if (folder is None) == (dataset is None):
        raise click.UsageError("give either a FOLDER of images or --dataset, not both or neither")
    if not out.endswith(".npz"):
        raise click.BadParameter(f"{out!r} must end in .npz", param_hint="--out")
    check_writable(out, "--out", folder=False)
    if dataset is not None:
        if padding is not None:
            raise click.BadParameter("--padding describes a folder; for a data set use --pad-to", param_hint="--padding")
        ext = _extractor(inception, download_weights, device)
        stats = reference_stats(dataset, split, num=num, data_dir=data_dir, pad_to=pad_to or None,
                                cache=not no_cache, keep_features=features, extractor=ext,
                                batch_size=batch_size, progress=progress)
    else:
        files, _ = scan_image_folder(folder, num)  # a bad folder fails here, before the network loads
        keep = features if features is not None else len(files) <= FEATURES_UP_TO
        ext = _extractor(inception, download_weights, device)
        stats = folder_stats(folder, limit=num, padding=padding, keep_features=keep, extractor=ext,
                             batch_size=batch_size, progress=progress)
    if dist.is_main():  # under torchrun every rank holds the merged statistics; one writes them
        path = save_stats(stats, out, include_features=features is not False)
        click.echo(f"wrote {path}: {stats.describe()}")


def _side_kind(value: str, hint: str) -> str:
    p = Path(value).expanduser()
    if p.is_dir():
        return "folder"
    if p.is_file() and p.suffix == ".npz":
        return "stats"
    if p.exists():
        raise click.BadParameter(f"{value}: neither a folder of images nor a .npz stats file", param_hint=hint)
    raise click.BadParameter(f"{value}: no such folder or file", param_hint=hint)


def _refuse_mismatch(diffs: list[str], allow: bool) -> None:
    if diffs and not allow:
        raise click.ClickException(
            "A and B were preprocessed differently: " + "; ".join(diffs)
            + ". FID between them is not meaningful; recompute one side to match (e.g. `diffsamp fid ref"
            " --dataset mnist --pad-to 32` for 32×32 padded samples), or pass --allow-mismatch."
        )


@fid_group.command("calc")
@click.argument("a")
@click.argument("b")
@click.option("--num", "-n", "num", type=click.IntRange(min=2), default=None, help="Folders: use the first NUM images.")
@click.option("--padding-a", type=click.IntRange(min=0), default=None,
              help="Folder A: background pixels its images carry on each side (checked against B).")
@click.option("--padding-b", type=click.IntRange(min=0), default=None, help="The same for folder B.")
@click.option("--kid/--no-kid", default=True, show_default=True,
              help="Also KID (needs features on both sides: folders, or stats saved with features).")
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="KID subset sampling.")
@click.option("--allow-mismatch", is_flag=True,
              help="Compare even if the two sides record different preprocessing (size, padding, …).")
@_inception_options
@_errors
def calc_cmd(a, b, num, padding_a, padding_b, kid, kid_subsets, kid_subset_size, seed, allow_mismatch,
             inception, download_weights, device, batch_size, progress) -> None:
    """FID (and KID ± std) between A and B, each a folder of images or a stats .npz.

    \b
    Examples:
      diffsamp fid calc samples/ mnist-test-2k.npz
      diffsamp fid calc samples_a/ samples_b/ --num 2000
      diffsamp fid calc mnist-train-2k.npz mnist-test-2k.npz
    """
    from diffsamp.metrics.fid import fid_from_stats, folder_stats, kid_from_stats, load_stats
    from diffsamp.images import scan_image_folder
    from diffsamp.metrics.stats import preprocessing_mismatches

    kinds = {"A": _side_kind(a, "A"), "B": _side_kind(b, "B")}
    paths = {"A": a, "B": b}
    pads = {"A": padding_a, "B": padding_b}
    loaded = {}
    for side in ("A", "B"):
        if kinds[side] == "stats":
            try:
                loaded[side] = load_stats(paths[side])
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=side) from exc
    # Check what can be checked before the slow part: a folder's size against the other side's record.
    planned = {}
    for side in ("A", "B"):
        if kinds[side] == "folder":
            _, (_, h, w) = scan_image_folder(paths[side], num)
            planned[side] = {"size": [h, w], "padding": pads[side]}
        else:
            planned[side] = loaded[side].meta
    _refuse_mismatch(preprocessing_mismatches(planned["A"], planned["B"]), allow_mismatch)
    for side in ("A", "B"):
        if kinds[side] == "stats" and not loaded[side].meta:
            click.echo(f"note: {side} has no metadata (e.g. written by pytorch-fid); its preprocessing is unchecked",
                       err=True)

    want_kid = kid and all(kinds[s] == "folder" or loaded[s].features is not None for s in ("A", "B"))
    if any(k == "folder" for k in kinds.values()):
        ext = _extractor(inception, download_weights, device)
        for side in ("A", "B"):
            if kinds[side] == "folder":
                loaded[side] = folder_stats(paths[side], limit=num, padding=pads[side], keep_features=want_kid,
                                            extractor=ext, batch_size=batch_size, progress=progress)

    diffs = preprocessing_mismatches(loaded["A"].meta, loaded["B"].meta)
    _refuse_mismatch(diffs, allow_mismatch)
    for side in ("A", "B"):
        click.echo(f"{side}: {paths[side]}  ({loaded[side].describe()})")
    if diffs:
        click.echo("warning: comparing despite different preprocessing: " + "; ".join(diffs), err=True)
    try:
        fid = fid_from_stats(loaded["A"], loaded["B"], check=False)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"FID: {nonnegative(fid, 4)}")
    if want_kid:
        m = min(kid_subset_size, len(loaded["A"].features), len(loaded["B"].features))
        mean, std = kid_from_stats(loaded["A"], loaded["B"], num_subsets=kid_subsets, subset_size=m, seed=seed,
                                   check=False)
        spread = f" ± {std:.6f}" if kid_subsets > 1 else ""  # one subset has no spread to report
        click.echo(f"KID: {nonnegative(mean, 6)}{spread}  ({kid_subsets} subset{'s' * (kid_subsets > 1)} of {m})")
    elif kid:
        click.echo("KID: n/a (needs features on both sides: folders, or stats written with --features)")


@fid_group.command("download")
@click.option("--url", default=None, help="Where to fetch the TorchScript file from (default: NVlabs' URL).")
@click.option("--to", "dest", type=click.Path(dir_okay=False), default=None,
              help="Destination file (default: the cache folder).")
@click.option("--force", is_flag=True, help="Download again even if the file is already there.")
def download_cmd(url, dest, force) -> None:
    """Download NVlabs' inception-2015-12-05.pt (TorchScript) into the cache folder.

    \b
    Example:
      diffsamp fid download
      diffsamp fid download --to ~/weights/inception-2015-12-05.pt   # then export DIFFSAMP_INCEPTION
    Offline: copy the file by hand and point --inception or $DIFFSAMP_INCEPTION at it.
    """
    from diffsamp.metrics.inception import NVLABS_URL, download_weights

    try:
        path = download_weights(url or NVLABS_URL, dest, force=force)
    except (OSError, ValueError) as exc:
        raise click.ClickException(
            f"download failed ({exc}). Without internet, copy the weights file to this machine and point "
            "--inception or the environment variable DIFFSAMP_INCEPTION at it."
        ) from exc
    click.echo(f"weights: {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
