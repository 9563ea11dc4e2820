"""``diffsamp train amed``: distil an AMED predictor (Zhou et al. 2024, AMED Alg. 1) or an EPD table (Zhu et al.
2025) for a model."""

from __future__ import annotations

import click

from diffsamp.cli._common import load_or_fail, resolve_device, writable_folder
from diffsamp.cli.train import train
from diffsamp.samplers.registry import learned_samplers
from diffsamp.samplers.grid import available_schedules


@train.command("amed")
@click.option("--model", "model_name", required=True, help="Zoo name, local model/run directory or Hub id.")
@click.option("--sampler", default="amed", show_default=True, type=click.Choice(learned_samplers()), help="The student.")
@click.option("--nfe", default=5, show_default=True, type=click.IntRange(min=1), help="Student NFE = 2·steps − AFS, + 1 with --final-step zero.")
@click.option("--schedule", default=None, type=click.Choice(available_schedules()), help="Default: time_uniform for amed, logsnr for dpmpp+amed, karras otherwise (AMED §4.1); rf on a rectified flow.")
@click.option("--afs/--no-afs", default=None, help="Analytical first step (default: on for odd NFE).")
@click.option("--teacher", default=None, help="Teacher sampler (default: heun for amed, the base solver for plugins).")
@click.option("--teacher-m", default=None, type=click.IntRange(min=0), help="Points inserted per interval for the teacher (default 1 for amed/dpm2, 2 otherwise).")
@click.option("--static", is_flag=True, help="Sample-independent predictor: per-step (r, c, a), no features.")
@click.option("--scale-dir", default=0.01, show_default=True, type=click.FloatRange(min=0, max=1), help="c ∈ [1 − s, 1 + s] (0: c = 1).")
@click.option("--scale-time", default=None, type=click.FloatRange(min=0, max=1), help="a ∈ [1 − s, 1 + s] (default 0.2 for ipndm+amed, else 0).")
@click.option("--max-order", default=4, show_default=True, type=click.IntRange(1, 4),
              help="Adams–Bashforth order of ipndm+amed and of its ipndm teacher (iPNDM's is 4).")
@click.option("--r-gradient", default=None, type=click.Choice(["autograd", "smoothed"]),
              help="r's gradient: exact, or a per-sample central difference over ±π timesteps (default: smoothed "
                   "for discrete-time DDPM networks, whose output is not smooth between their integer timesteps).")
@click.option("--step-offsets/--no-step-offsets", default=True, show_default=True,
              help="Per-sample predictor: a learned logit offset per step beside the shared network.")
@click.option("--first-step-static/--no-first-step-static", default=True, show_default=True,
              help="Per-sample predictor under AFS: the first step (no features) has logits of its own, trained "
                   "as --static's, instead of the shared network's.")
@click.option("--beta1", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="Adam's β1 (default 0 for the per-sample network, whose r would otherwise overshoot its "
                   "optimum; 0.9 with --static).")
@click.option("--trajectories", default=10_000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Adam learning rate (default 5e-3, the paper's; 0.1 with --static, whose weights are the logits).")
@click.option("--clip/--no-clip", "clip", default=None, help="Clamp x̂0 as the model's scheduler says (default), always or never.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False), callback=writable_folder, help="Run directory (predictor.json + .safetensors).")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--snapshots", default="", help="Keep copies of the predictor after these trajectory counts, e.g. 1024,2048,4096.")
@click.option("--points", default=2, show_default=True, type=click.IntRange(min=1),
              help="epd, adasde: intermediate points per interval, evaluated in one network call (EPD's K).")
@click.option("--gamma-max", default=0.01, show_default=True, type=click.FloatRange(min=0.0002),
              help="adasde: the largest noise injection γ per step (σ̂ = (1 + γ)σ; the authors' CIFAR-10 setting).")
@click.option("--final-step", type=click.Choice(["zero", "sigma_min"]), default=None,
              help="How the student's grid ends: a last denoising step to σ = 0 counted in the NFE, or at σ_min "
                   "(default: zero for epd and adasde, sigma_min, the AMED paper's grids, for the AMED samplers).")
@click.option("--classes", default=None, help="Class-conditional models: classes cycled over the trajectories, e.g. 0-9.")
@click.option("--cfg", "cfg_scale", default=1.0, show_default=True, type=float, help="With --classes: the guidance scale the teacher and student run at (recorded; sampling at another scale warns).")
def train_amed_cmd(model_name: str, sampler: str, nfe: int, schedule: str | None, afs: bool | None, teacher: str | None,
                   teacher_m: int | None, static: bool, scale_dir: float, scale_time: float | None, max_order: int,
                   r_gradient: str | None, step_offsets: bool, first_step_static: bool, beta1: float | None,
                   trajectories: int,
                   batch: int, lr: float | None, clip: bool | None, seed: int, device: str, out: str, resume: bool,
                   quiet: bool, snapshots: str, points: int, gamma_max: float, final_step: str | None,
                   classes: str | None,
                   cfg_scale: float) -> None:
    """Train a learned solver (AMED predictor or EPD table): teacher trajectories on a refined grid, one Adam step
    per student interval.

    \b
    Examples:
      diffsamp train amed --model mnist-ddpm --sampler amed --nfe 5 --out runs/amed5
      diffsamp train amed --model mnist-ddpm --sampler ipndm+amed --nfe 3 --trajectories 4096 --out runs/ipndm-amed3
      diffsamp sample --model mnist-ddpm --sampler amed --predictor runs/amed5 --seeds 0-63 --out g.png
      diffsamp train amed --model runs/mnist-cond --classes 0-9 --cfg 2 --nfe 5 --out runs/amed5-cfg2
      diffsamp train amed --model mnist-ddpm --sampler epd --points 2 --nfe 5 --out runs/epd5
    """
    from tqdm import tqdm

    from diffsamp.training.amed import AmedTrainOptions, train_amed

    from diffsamp.cli._seeds import parse_class_list

    class_list = parse_class_list(classes)
    if class_list is None and cfg_scale != 1.0:
        raise click.UsageError("--cfg guides a class-conditional model: give --classes too")
    device = resolve_device(device)
    try:
        model = load_or_fail(model_name, device=device, clip=clip)
        shape = model.sample_shape
        opts = AmedTrainOptions(sampler=sampler, nfe=nfe, schedule=schedule, afs=afs, teacher=teacher,
                                teacher_m=teacher_m, static=static, scale_dir=scale_dir, scale_time=scale_time,
                                max_order=max_order, r_gradient=r_gradient, step_offsets=step_offsets,
                                first_step_static=first_step_static, beta1=beta1,
                                trajectories=trajectories, batch=batch, lr=lr, seed=seed, classes=class_list,
                                guidance=cfg_scale, points=points, gamma_max=gamma_max, final_step=final_step)
        opts.resolved()
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    bar = tqdm(total=-(-trajectories // batch), desc=f"train {sampler}", unit="batch", disable=quiet)

    def progress(it: int, total: int, loss: float) -> None:
        bar.n = it
        bar.set_postfix(loss=f"{loss:.4g}")
        bar.refresh()

    try:
        path = train_amed(model, shape, opts, out, model_name=model_name, device=device, resume=resume,
                          progress=progress, extra={"clip": clip},
                          snapshots=tuple(int(v) for v in snapshots.split(",") if v.strip()))
    except (ValueError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bar.close()
    click.echo(f"predictor -> {path}")
