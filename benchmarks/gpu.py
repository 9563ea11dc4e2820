"""Images/s of diffsamp's sampling loop (``diffsamp.generate``) against diffusers' own loop at the same NFE, on a GPU.

Both loops run DDIM (η = 0) on the same network, at the same timesteps (diffsamp: ``ddim`` on the ``ddpm`` schedule
with the scheduler's spacing) and batch, in the same dtype, and both end with the samples on the CPU; diffusers'
loop is written as its pipelines write it (``scale_model_input``, the UNet, classifier-free guidance on the doubled
batch, ``scheduler.step``). Models:

* ``mnist-ddpm``, the shipped model (``diffsamp.models.load``);
* ``loop``: the loops alone — ``mnist-ddpm``'s shapes and timesteps with an identity network (its output is its
  input), so a cell's time is each loop's own work per step: σ-space conversions, timestep lookup, update rule;
* a randomly initialised UNet2DModel of ``google/ddpm-cifar10-32``'s config (35.7 M parameters; no download);
* a randomly initialised UNet2DConditionModel of Stable Diffusion 1.5's config (860 M parameters) at latent 64×64
  with classifier-free guidance (w = 7.5); the prompt encoder is replaced by fixed random (77, 768) embeddings
  and neither loop decodes latents (``--small``: a two-level 32/64-channel UNet at latent 16×16).

Variants, where CUDA exists: ``eager``; ``compile`` (``diffsamp.models.fast.compile_denoiser``, default mode: the
first run of each batch size compiles, its time is the "first run" column); ``graphs`` (``cuda_graph_denoiser``:
the network call replayed from CUDA graphs). Each variant's network serves both loops. "1 call" is one network
evaluation at that batch (the doubled batch under guidance); "overhead" = loop wall time / (NFE × 1 call), for
diffsamp and for diffusers; "loop ms/step" = (loop wall time − NFE × 1 call) / NFE, the loop's own cost per step
(precise on the ``loop`` row, a difference of two large numbers on the others). The last row is the FID feature
throughput (``diffsamp.metrics.inception``, weights from ``$DIFFSAMP_INCEPTION``). A cell that would not fit in the remaining ``--budget`` is skipped and says so. The table
and the settings go to ``benchmarks/results/gpu_<device>.txt`` (``gpu_cpu.txt`` on the CPU).

    python benchmarks/gpu.py                # CUDA: batch 64/256/1024, eager / compile / graphs, ≈ 7 min on an H200
    python benchmarks/gpu.py --small        # CPU-sized: batch 4/16, eager (the default without CUDA)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import re
import statistics
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import diffsamp  # noqa: E402
from diffsamp.models import load  # noqa: E402
from diffsamp.models.base import Denoiser, unwrap  # noqa: E402
from diffsamp.models.conditioning import TextConditioning  # noqa: E402
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser  # noqa: E402
from diffsamp.models.fast import compile_denoiser, cuda_graph_denoiser  # noqa: E402
from diffsamp.models.sd_pipeline import StableDiffusionDenoiser  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = ("loop", "mnist", "cifar", "sd")
VARIANTS = ("eager", "graphs", "compile")
GUIDANCE = 7.5

# google/ddpm-cifar10-32's unet config
CIFAR_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32, attention_head_dim=None,
    mid_block_scale_factor=1, act_fn="silu", center_input_sample=False, time_embedding_type="positional",
)
CIFAR_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                       clip_sample=True, timestep_spacing="leading")
# runwayml/stable-diffusion-v1-5's unet and scheduler configs
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", center_input_sample=False, mid_block_scale_factor=1,
)
SD_SMALL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@dataclass
class Case:
    """One model of the table: the diffsamp denoiser, its diffusers scheduler config, the sample shape, and (for a
    text-conditional model) the encoded prompt and the empty prompt that guidance pairs it with."""

    name: str
    model: Denoiser
    scheduler: dict[str, Any]
    shape: tuple[int, ...]
    compile_allowance: float  # seconds a first torch.compile of this network may take
    embeds: Callable[[list[str]], torch.Tensor] | None = None
    loop_only: bool = False  # an identity network: eager only, many timed runs
    params: float = field(init=False)

    def __post_init__(self) -> None:
        self.params = sum(p.numel() for p in unwrap(self.model).network.parameters()) / 1e6


class IdentityUNet(nn.Module):
    """A stand-in network whose output is its input, with a UNet's ``config`` and one parameter (for its dtype)."""

    def __init__(self, config: Any, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros((), device=device, dtype=dtype), requires_grad=False)

    def forward(self, sample: torch.Tensor, timestep: Any, **_: Any) -> Any:
        return SimpleNamespace(sample=sample)


def random_embeddings(dim: int, device: torch.device, dtype: torch.dtype) -> Callable[[list[str]], torch.Tensor]:
    """A stand-in prompt encoder: fixed random (77, dim) embeddings per prompt, on the device (as CLIP's are)."""
    table: dict[str, torch.Tensor] = {}

    def encode(prompts: list[str]) -> torch.Tensor:
        for p in set(prompts) - set(table):
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            table[p] = torch.randn(77, dim, generator=g).to(device=device, dtype=dtype)
        return torch.stack([table[p] for p in prompts])

    return encode


def build_cases(names: list[str], small: bool, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """The models asked for, on ``device`` in ``dtype`` (random ones built there directly)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

    from diffsamp.models.zoo import model_path
    from diffsamp.io import read_json

    cases = []
    gpu = device.type == "cuda"
    for name in names:
        torch.manual_seed(0)
        if name in ("loop", "mnist"):
            model = load("mnist-ddpm", device=device, dtype=dtype)
            cfg = read_json(model_path("mnist-ddpm") / "scheduler" / "scheduler_config.json")
            if name == "loop":
                model.network = IdentityUNet(model.network.config, device, dtype)
                cases.append(Case("loop only (identity network, mnist-ddpm shapes)", model, cfg, model.sample_shape,
                                  0.0, loop_only=True))
            else:
                cases.append(Case("mnist-ddpm (shipped)", model, cfg, model.sample_shape, 60.0))
        elif name == "cifar":
            with torch.device(device):
                unet = UNet2DModel(**CIFAR_UNET)
            unet = unet.to(dtype).eval().requires_grad_(False)
            sched = DDIMScheduler(**CIFAR_SCHEDULER)
            model = DiffusersUNetDenoiser(unet, sched.alphas_cumprod, "epsilon", clip_sample=1.0)
            cases.append(Case("ddpm-cifar10-32 config (random)", model, CIFAR_SCHEDULER, (3, 32, 32), 90.0))
        elif name == "sd":
            cfg = SD_SMALL_UNET if small else SD15_UNET
            with torch.device(device):
                unet = UNet2DConditionModel(**cfg)
            unet = unet.to(dtype).eval().requires_grad_(False)
            sched = DDIMScheduler(**SD_SCHEDULER)
            encode = random_embeddings(cfg["cross_attention_dim"], device, dtype)
            model = StableDiffusionDenoiser(unet, sched.alphas_cumprod, "epsilon", TextConditioning(encode),
                                            codec=None)  # type: ignore[arg-type] - latents only, no VAE decode
            size = cfg["sample_size"]
            label = f"SD-1.5 config (random), latent {size}×{size}, cfg {GUIDANCE}" if not small else \
                f"small SD-style UNet (random, 32/64 ch), latent {size}×{size}, cfg {GUIDANCE}"
            cases.append(Case(label, model, SD_SCHEDULER, (4, size, size), 300.0 if gpu else 120.0, encode))
    return cases


# ---------------------------------------------------------------------------------------------- the two loops
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def diffsamp_run(case: Case, model: Denoiser, batch: int, steps: int) -> tuple[float, int]:
    """Wall time of ``diffsamp.generate`` (DDIM on the scheduler's timesteps) and its measured NFE."""
    kw: dict[str, Any] = {}
    if case.embeds is not None:
        kw = dict(cond=["a photograph of an astronaut riding a horse"] * batch, guidance=GUIDANCE)
    sync(model.device)
    t0 = time.perf_counter()
    res = diffsamp.generate(model, case.shape, sampler="ddim", schedule="ddpm", steps=steps, seeds=range(batch),
                            batch_size=batch, schedule_params={"spacing": case.scheduler.get("timestep_spacing",
                                                                                             "leading")}, **kw)
    return time.perf_counter() - t0, res.nfe


def diffusers_run(case: Case, unet: nn.Module, batch: int, steps: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[float, int]:
    """Wall time and network calls of diffusers' DDIM loop, as its pipelines write it."""
    from diffusers import DDIMScheduler

    keys = inspect.signature(DDIMScheduler.__init__).parameters
    scheduler = DDIMScheduler(**{k: v for k, v in case.scheduler.items() if k in keys})
    sync(device)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((batch, *case.shape), generator=g).to(device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    prompt_embeds = None
    if case.embeds is not None:
        cond = case.embeds(["a photograph of an astronaut riding a horse"] * batch)
        prompt_embeds = torch.cat([case.embeds([""] * batch), cond])
    calls = 0
    with torch.inference_mode():
        for t in scheduler.timesteps:
            if prompt_embeds is not None:
                latent_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                noise_pred = unet(latent_in, t, encoder_hidden_states=prompt_embeds).sample
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + GUIDANCE * (text - uncond)
            else:
                noise_pred = unet(scheduler.scale_model_input(latents, t), t).sample
            calls += 1
            latents = scheduler.step(noise_pred, t, latents).prev_sample
        latents.float().cpu()
    return time.perf_counter() - t0, calls


def call_seconds(case: Case, unet: nn.Module, batch: int, device: torch.device, dtype: torch.dtype,
                 repeats: int) -> float:
    """Median wall time of one network evaluation as diffsamp's denoiser calls it (the doubled batch under
    guidance), after one warm-up call."""
    rows = 2 * batch if case.embeds is not None else batch
    x = torch.randn((rows, *case.shape), device=device, dtype=dtype)
    t = torch.full((rows,), 500.0, device=device)
    kw: dict[str, Any] = {"class_labels": None}
    if case.embeds is not None:
        kw = {"encoder_hidden_states": case.embeds(["x"] * rows)}
    times = []
    with torch.inference_mode():
        unet(x, t, **kw)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            unet(x, t, **kw)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- cells
@dataclass
class Row:
    model: str
    batch: int
    variant: str
    cells: dict[str, str] = field(default_factory=dict)
    note: str = ""


def make_variant(case: Case, variant: str) -> Denoiser:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fallback is reported in the row's note instead
        if variant == "eager":
            return case.model
        if variant == "compile":
            return compile_denoiser(case.model)
        if variant == "graphs":
            return cuda_graph_denoiser(case.model)
    raise ValueError(f"unknown variant {variant!r}")


def cell_cost(case: Case, variant: str, batch: int, args: argparse.Namespace, eager_call: float) -> tuple[float, int]:
    """(estimated seconds, timed runs per loop) of a cell, from the eager one-call time: the warm-ups (2 steps of
    each loop; a capture adds ≈ 4 calls per loop), the timed runs (one where a loop takes over 5 s) and the
    case's allowance for a first compilation."""
    loop = args.steps * eager_call
    repeats = args.repeats if loop < 5.0 else 1
    if case.loop_only:
        repeats = max(repeats, 30)
    warmup = 2 * (2 + (4 if variant == "graphs" else 0)) * eager_call
    return 2 * repeats * loop + warmup + (case.compile_allowance if variant == "compile" else 0.0), repeats


def run_cell(case: Case, model: Denoiser, variant: str, batch: int, args: argparse.Namespace,
             device: torch.device, dtype: torch.dtype, deadline: float, eager_call: float) -> Row:
    """One row: warm-up runs (compilation, capture) at 2 steps, then alternating timed runs of both loops."""
    row = Row(case.name, batch, variant)
    if eager_call == float("inf"):
        row.note = "out of GPU memory (one eager call at the smallest batch)"
        return row
    cost, repeats = cell_cost(case, variant, batch, args, eager_call)
    left = deadline - time.perf_counter()
    if cost > left:
        row.note = f"skipped: needs ≈ {cost:.0f} s, {max(left, 0):.0f} s of the budget left"
        return row
    net = unwrap(model).network
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t0 = time.perf_counter()
            diffsamp_run(case, model, batch, 2)
            diffusers_run(case, net, batch, 2, device, dtype)
            first = time.perf_counter() - t0
            one = call_seconds(case, net, batch, device, dtype, 5 if eager_call < 0.5 else 2)
            ours, theirs, nfe_ours, nfe_theirs = [], [], 0, 0
            for _ in range(repeats):  # alternating, so drifts of the machine's speed hit both loops alike
                s, nfe_ours = diffsamp_run(case, model, batch, args.steps)
                ours.append(s)
                s, nfe_theirs = diffusers_run(case, net, batch, args.steps, device, dtype)
                theirs.append(s)
    except torch.cuda.OutOfMemoryError:
        row.note = "out of GPU memory"
        return row
    except Exception as exc:  # noqa: BLE001 - one failing cell (a compiler error, say) is reported, not fatal
        row.note = f"failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        return row
    a, b = statistics.median(ours), statistics.median(theirs)
    row.cells = {
        "NFE": f"{nfe_ours} / {nfe_theirs}",
        "diffsamp img/s": f"{batch / a:.1f}",
        "diffusers img/s": f"{batch / b:.1f}",
        "ratio": f"{b / a:.2f}",
        "1 call (ms)": f"{one * 1e3:.1f}",
        "overhead diffsamp": f"{a / (nfe_ours * one):.3f}",
        "overhead diffusers": f"{b / (nfe_theirs * one):.3f}",
        "loop ms/step diffsamp": f"{(a / nfe_ours - one) * 1e3:.3f}",
        "loop ms/step diffusers": f"{(b / nfe_theirs - one) * 1e3:.3f}",
        "first run (s)": f"{first:.1f}",
    }
    if case.loop_only:  # the identity call is microseconds: the overhead ratios would only measure noise
        row.cells.update({"1 call (ms)": f"{one * 1e3:.3f}", "overhead diffsamp": "", "overhead diffusers": ""})
    fallback = getattr(model, "fallback", None)
    if fallback:
        row.note = f"plain call: {fallback}"
    elif variant == "graphs":
        row.note = f"{model.captured} graphs"  # type: ignore[attr-defined]
    if repeats == 1 and args.repeats > 1:
        row.note = (row.note + "; " if row.note else "") + "1 timed run"
    return row


def fid_row(device: torch.device, batch: int, repeats: int) -> Row:
    """FID feature throughput: uint8 32×32 RGB images → 2048-d pool3 features, images/s."""
    from diffsamp.metrics.inception import WeightsNotFoundError, load_extractor

    row = Row("FID features (Inception pool3)", batch, "eager")
    try:
        extractor = load_extractor(None, device)
    except (WeightsNotFoundError, ValueError) as exc:
        row.note = f"skipped: {str(exc).splitlines()[0]} (set DIFFSAMP_INCEPTION)"
        return row
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    extractor(images)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        extractor(images).cpu()
        times.append(time.perf_counter() - t0)
    row.cells = {"diffsamp img/s": f"{batch / statistics.median(times):.1f}"}
    row.note = f"32×32 RGB uint8 → TF1 resize to 299 → 2048-d pool3; median of {repeats}"
    return row


COLUMNS = ["NFE", "diffsamp img/s", "diffusers img/s", "ratio", "1 call (ms)", "overhead diffsamp",
           "overhead diffusers", "loop ms/step diffsamp", "loop ms/step diffusers", "first run (s)"]


def table(rows: list[Row]) -> list[str]:
    head = ["model", "batch", "variant", *COLUMNS, "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model, str(r.batch), r.variant, *(r.cells.get(c, "") for c in COLUMNS), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CPU-sized models and batches (the default without CUDA).")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="Network and state dtype (default: bfloat16 on CUDA, float32 on the CPU).")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps = NFE (default 20; --small 5).")
    ap.add_argument("--batches", default=None, help="Comma-separated (default 64,256,1024; --small 4,16).")
    ap.add_argument("--models", default="loop,mnist,cifar,sd")
    ap.add_argument("--variants", default=None, help="eager,compile,graphs (default: all on CUDA, eager on the CPU).")
    ap.add_argument("--repeats", type=int, default=None, help="Timed runs per loop (default 3; 1 where a loop takes over 5 s).")
    ap.add_argument("--budget", type=float, default=None,
                    help="Seconds for the timed cells (default 330 on CUDA, 240 on the CPU); cells past it are skipped.")
    ap.add_argument("--out", type=Path, default=None, help="Default: benchmarks/results/gpu_<device>.txt.")
    args = ap.parse_args()
    models = args.models.split(",")
    variants = args.variants.split(",") if args.variants else None
    for given, known, what in ((models, MODELS, "--models"), (variants or [], VARIANTS, "--variants")):
        if unknown := [g for g in given if g not in known]:
            ap.error(f"{what}: unknown {', '.join(unknown)}; use {', '.join(known)}")
    try:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    except ValueError:
        ap.error(f"--batches: comma-separated integers, got {args.batches!r}")
    if batches is not None and min(batches) < 1 or any(v is not None and v < 1 for v in (args.steps, args.repeats)):
        ap.error("--batches, --steps and --repeats must be positive")
    start = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    gpu = device.type == "cuda"
    small = args.small or not gpu
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    args.steps = args.steps or (5 if small else 20)
    args.repeats = args.repeats or 3
    batches = sorted(batches or ([4, 16] if small else [64, 256, 1024]))
    variants = variants or (list(VARIANTS) if gpu else ["eager"])
    budget = args.budget or (330.0 if gpu else 240.0)
    if gpu:
        from torch import _dynamo

        _dynamo.config.cache_size_limit = 64  # two call signatures (ours, diffusers') × batch sizes × models
        _dynamo.config.accumulated_cache_size_limit = 512
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    out = args.out or RESULTS / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '_', name).strip('_')}.txt"

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its notices about casting random models
    cases = build_cases(models, small, device, dtype)
    rows = [fid_row(device, 256 if gpu else 16, 3 if gpu else 2)]
    print(table(rows)[-1], flush=True)
    deadline = time.perf_counter() + budget
    eager_calls: dict[tuple[str, int], float] = {}
    for case in cases:  # each cell's cost is estimated from one eager call at the smallest batch, scaled linearly
        try:
            one = call_seconds(case, unwrap(case.model).network, batches[0], device, dtype, 2)
        except torch.cuda.OutOfMemoryError:
            one = float("inf")
        eager_calls.update({(case.name, b): one * b / batches[0] for b in batches})
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    order = [v for v in VARIANTS if v in variants]
    cells = sorted(((c, b, v) for c in cases for b in batches for v in order  # the cheapest first
                    if v == "eager" or not c.loop_only),
                   key=lambda cell: cell_cost(cell[0], cell[2], cell[1], args, eager_calls[cell[0].name, cell[1]])[0])
    compiled: dict[str, Denoiser] = {}  # one compiled network per model, across batch sizes
    for case, batch, variant in cells:
        try:
            if variant == "compile" and case.name not in compiled:
                compiled[case.name] = make_variant(case, variant)
            model = compiled[case.name] if variant == "compile" else make_variant(case, variant)
        except ValueError as exc:  # torch.compile cannot run here
            rows.append(Row(case.name, batch, variant, note=f"skipped: {exc}"))
            continue
        row = run_cell(case, model, variant, batch, args, device, dtype, deadline, eager_calls[case.name, batch])
        rows.append(row)
        print(table([row])[-1], flush=True)
        del model
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
    rank = {v: i for i, v in enumerate(order)}
    rows[1:] = sorted(rows[1:], key=lambda r: ([c.name for c in cases].index(r.model), r.batch, rank[r.variant]))
    threads = torch.get_num_threads()
    header = [
        f"# diffsamp vs diffusers sampling loops ({'--small, ' if small else ''}{name})",
        "",
        f"device {name}; torch {torch.__version__}; diffusers {diffusers.__version__}; dtype "
        f"{str(dtype).removeprefix('torch.')}; {threads} CPU thread(s); "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"DDIM (η = 0), {args.steps} steps on both sides; batches {', '.join(map(str, batches))}; median of "
        f"{args.repeats} alternating timed run(s) after a 2-step warm-up; budget {budget:.0f} s; models: "
        + "; ".join(f"{c.name} {c.params:.1f} M params" for c in cases),
        "ratio = diffsamp img/s / diffusers img/s; overhead = loop wall time / (NFE × 1 call); first run = both "
        "loops' 2-step warm-ups (compilation, graph capture)",
        "",
    ]
    text = "\n".join(header + table(rows) + ["", f"total {time.perf_counter() - start:.0f} s"])
    print("\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
