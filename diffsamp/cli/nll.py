"""``diffsamp nll``: negative log-likelihood in bits/dim — the DDPM variational bound or the ODE likelihood."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import click

from diffsamp import dist
from diffsamp.cli._common import check_writable, main


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use --device cpu", param_hint="--device")
    return device


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plot(path: Path, x: list[float], y: list[float], *, xlabel: str, ylabel: str, title: str, logy: bool) -> None:
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(x, y, marker="." if len(x) <= 100 else None, lw=1)
    ax.set_xscale("log")
    if logy and all(v > 0 for v in y):
        ax.set_yscale("log")
    elif logy:  # Monte-Carlo terms can be ≤ 0: a log axis would drop them and break the line into fragments
        small = min((abs(v) for v in y if v != 0), default=1.0)
        ax.set_yscale("symlog", linthresh=small)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


@main.command("nll")
@click.option("--model", "model_name", required=True, help="Zoo name (mnist-ddpm, mnist-rf, …), local model/run directory, or Hub id.")
@click.option("--dataset", default=None, help="mnist, fashion-mnist, cifar10, or a folder of images  [default: the data "
                                               "set the model's card names]")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test"]))
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Where the data set files are (default $DIFFSAMP_DATA).")
@click.option("--num", "-n", "num", default=100, show_default=True, type=click.IntRange(min=1), help="Use the first NUM images.")
@click.option("--pad-to", default=None, type=click.IntRange(min=0), help="Pad smaller images (28×28 digits) with background to this size (default: the model's image size, 32 for the zoo); 0 keeps them.")
@click.option("--method", default="elbo", show_default=True, type=click.Choice(["elbo", "ode"]), help="elbo: DDPM variational bound; ode: probability-flow ODE likelihood.")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="elbo: length K of the strided chain (default: the model's T).")
@click.option("--variance", default="posterior", show_default=True, type=click.Choice(["posterior", "beta"]), help="elbo: reverse variance β̃_t (posterior, fixed_small) or β_t (beta, fixed_large).")
@click.option("--t-samples", default=None, type=click.IntRange(min=1), help="elbo: importance-sample this many KL terms per image (default: all of them, exactly).")
@click.option("--probes", default=1, show_default=True, type=click.IntRange(min=1), help="ode: Rademacher probes of Hutchinson's trace estimator per image.")
@click.option("--rtol", default=1e-5, show_default=True, type=click.FloatRange(min=0, min_open=True), help="ode: RK45 relative tolerance.")
@click.option("--atol", default=1e-5, show_default=True, type=click.FloatRange(min=0, min_open=True), help="ode: RK45 absolute tolerance.")
@click.option("--sigma-min", default=None, type=click.FloatRange(min=0, min_open=True), help="ode: where the ODE starts (default: the model's σ_min); the figure depends on it.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Image i draws its noise from SEED + i.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Write terms.csv, terms.png, per_image.csv and config.json here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def nll_cmd(model_name: str, dataset: str | None, split: str, data_dir: str | None, num: int, pad_to: int | None, method: str,
            steps: int | None, variance: str, t_samples: int | None, probes: int, rtol: float, atol: float,
            sigma_min: float | None, seed: int, batch_size: int, device: str, out: str | None, quiet: bool) -> None:
    """Negative log-likelihood of data images in bits/dim (8-bit data), with its standard error.

    \b
    elbo: DDPM's variational bound L_T + Σ L_{t−1} + L_0 (Ho et al. 2020, Eq. 5): the reverse process read
          as a hierarchical VAE, on the model's own T-step chain or a strided K-step one (--steps K);
          discretised Gaussian decoder, x̂0 not clipped. DDPM models only.
    ode:  the probability-flow ODE (Score-SDE §4.3): Hutchinson trace, RK45, uniform dequantisation.
          Any model (DDPM UNets, rectified flows).
    Bits/dim count every value the model sees (32×32 for padded MNIST); the figure per unpadded pixel
    (28×28), also printed, bounds the NLL of the unpadded image since the padding is deterministic.
    \b
    Examples:
      diffsamp nll --model mnist-ddpm --num 100 --t-samples 50 --out runs/nll-ddpm
      diffsamp nll --model mnist-ddpm --num 500 --steps 100
      diffsamp nll --model mnist-rf --method ode --num 64 --rtol 1e-4 --atol 1e-4
    """
    import torch

    from diffsamp.io import write_text as atomic_write_text
    from diffsamp.data import DataNotFoundError, load_dataset_uint8, pad_images
    from diffsamp.metrics.likelihood import LN2, elbo, merge_over_ranks, ode_nll, per_step_rows
    from diffsamp.models.zoo import load, model_dataset, sample_shape

    dataset = dataset or model_dataset(model_name)
    if not dataset:
        raise click.UsageError(f"{model_name} does not record the data set it was trained on: name it with --dataset")
    if method == "ode" and (steps is not None or t_samples is not None):
        raise click.UsageError("--steps and --t-samples belong to --method elbo")
    dev = _device(device)
    if out is not None:
        check_writable(out, "--out", folder=True)
    started = time.perf_counter()
    try:
        raw = load_dataset_uint8(dataset, split, data_dir, pad_to=None, limit=num)
    except (DataNotFoundError, ValueError) as exc:
        raise click.ClickException(" ".join(line.strip() for line in str(exc).splitlines())) from None
    try:
        model = load(model_name, device=dev)
        shape = sample_shape(model)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if pad_to is None:
        pad_to = int(shape[-1]) if len(shape) == 3 else 0
    images = pad_images(raw, pad_to) if pad_to and raw.shape[-1] < pad_to else raw
    if tuple(images.shape[1:]) != tuple(shape):
        raise click.ClickException(f"the model takes {tuple(shape)} images, the data are {tuple(images.shape[1:])} "
                                   "(check --pad-to)")
    raw_dims = int(raw[0].numel())
    mask = None
    if images.shape[-2:] != raw.shape[-2:]:
        mask = pad_images(torch.ones((1,) + tuple(raw.shape[1:]), dtype=torch.uint8), images.shape[-1])[0].bool()

    if len(images) < dist.world_size():
        raise click.ClickException(f"{len(images)} images for {dist.world_size()} processes: give -n ≥ the processes")
    block = min(batch_size, -(-len(images) // dist.world_size()))  # under torchrun every rank gets images
    mine = dist.shard_indices(len(images), block)  # this rank's batches, image i still drawing from seed + i
    part, seeds = images[mine], [seed + i for i in mine]
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(part), unit="img", desc=f"nll {method}", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(done - bar.n)
    try:
        if method == "elbo":
            res: Any = elbo(model, part, steps=steps, variance=variance, t_samples=t_samples, mask=mask, seed=seed,
                            batch_size=batch_size, progress=progress, image_seeds=seeds)
        else:
            res = ode_nll(model, part, probes=probes, rtol=rtol, atol=atol, sigma_min=sigma_min, seed=seed,
                          batch_size=batch_size, progress=progress, image_seeds=seeds)
        res = merge_over_ranks(res, len(images), block)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started

    bpd, se = res.bits_per_dim()
    bpd_raw, se_raw = res.bits_per_dim(raw_dims)
    results: dict[str, Any] = {"bits_per_dim": bpd, "stderr": se, "dims": res.dims, "num": len(images),
                               "seconds": round(seconds, 1), "nfe_per_image": res.nfe}
    if raw_dims != res.dims:
        results.update({"bits_per_unpadded_dim": bpd_raw, "stderr_unpadded": se_raw, "unpadded_dims": raw_dims})
    if method == "elbo":
        chain = f"T = {len(res.timesteps)}" if steps is None else f"strided K = {len(res.timesteps)}"
        how = "exact over t" if res.method == "exact" else f"{t_samples} importance-sampled t per image"
        parts = res.parts_bpd()
        results.update({"chain": chain, "estimate": res.method, "t_samples": res.t_samples, "variance": variance,
                        "L_T": parts["prior"], "sum_L_t-1": parts["kl"], "L_0": parts["decoder"]})
        if res.nats_in_mask is not None:
            inside = res.nats_in_mask / (res.mask_dims * LN2)
            results["interior_terms_bits_per_dim"] = float(inside.mean())
            results["interior_terms_stderr"] = float(inside.std() / math.sqrt(len(inside))) if len(inside) > 1 else None
        head = f"ELBO ({chain}, σ² = {'β̃' if variance == 'posterior' else 'β'}, {how})"
        tail = f"L_T {parts['prior']:.2g}, ΣL_t-1 {parts['kl']:.4f}, L_0 {parts['decoder']:.4f}"
    else:
        results.update({"probes": probes, "rtol": rtol, "atol": atol, "sigma_min": res.sigma_min,
                        "sigma_max": res.sigma_max, "nfe_per_batch": res.nfe})
        head = f"ODE (RK45 rtol {rtol:g}, atol {atol:g}, {probes} Rademacher probe(s), σ {res.sigma_min:.3g}→{res.sigma_max:.4g})"
        tail = f"{res.nfe:.0f} evaluations (forward + backward) per batch"
    line = f"{model_name} {dataset}:{split} {head}: {bpd:.4f} ± {se:.4f} bits/dim over {res.dims} dims"
    if raw_dims != res.dims:
        line += f" ({bpd_raw:.4f} ± {se_raw:.4f} per unpadded pixel, {raw_dims} dims)"
    click.echo(f"{line}; {tail}  [N = {len(images)}, {seconds:.0f} s]")

    if out is not None and dist.is_main():
        outdir = Path(out)
        outdir.mkdir(parents=True, exist_ok=True)
        per_image = [{"index": i, "nats": float(n), "bits_per_dim": float(n) / (res.dims * LN2)}
                     for i, n in enumerate(res.nats)]
        atomic_write_text(outdir / "per_image.csv", _csv(per_image))
        if method == "elbo":
            rows = per_step_rows(res)
            atomic_write_text(outdir / "terms.csv", _csv(rows))
            xs = [r["t"] for r in rows[:-1]]
            ys = [r["bits_per_dim"] for r in rows[:-1]]
            _plot(outdir / "terms.png", xs, ys, xlabel="t (τ_k of the chain)", ylabel="term, bits/dim (L_0 at t = 1)",
                  title=f"{model_name}: {head}\n{bpd:.3f} ± {se:.3f} bits/dim, N = {len(images)}", logy=True)
        else:
            rows = [{"sigma": float(s), "cumulative_bits_per_dim": float(c)}
                    for s, c in zip(res.curve_sigmas, res.curve_bpd)]
            atomic_write_text(outdir / "terms.csv", _csv(rows))
            _plot(outdir / "terms.png", [r["sigma"] for r in rows], [r["cumulative_bits_per_dim"] for r in rows],
                  xlabel="σ", ylabel="∫ (d − tr ∂D/∂x̄) dlog σ from σ_min, bits/dim",
                  title=f"{model_name}: {head}\n{bpd:.3f} ± {se:.3f} bits/dim, N = {len(images)}", logy=False)
        config = {"command": "nll", "model": model_name, "dataset": dataset, "split": split, "num": num,
                  "pad_to": pad_to, "method": method, "steps": steps, "variance": variance, "t_samples": t_samples,
                  "probes": probes, "rtol": rtol, "atol": atol, "sigma_min": sigma_min, "seed": seed,
                  "batch_size": batch_size, "device": dev, "x0_clipping": False if method == "elbo" else None,
                  "dequantisation": "uniform over the 2/255 bin centred on each value" if method == "ode" else None,
                  "results": results}
        atomic_write_text(outdir / "config.json", json.dumps(config, indent=2) + "\n")
