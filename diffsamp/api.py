"""The one sampling core: a grid from a schedule (adaptive samplers included), the NFE counter, the prior's
initial state and the sampler, run under ``torch.inference_mode()``.

``integrate(model, z, ...)`` runs it from given source draws z (reflow pairs, straightness, FID streaming);
``generate(model, shape, seeds=...)`` draws z per seed and calls it batch by batch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffsamp.models.base import CountingDenoiser, Denoiser, all_finite, default_sampler, default_schedule, prior_scale
from diffsamp.models.conditioning import Guidance, Guided, condition_model, encode_conditions, guidance_mismatch, take
from diffsamp.samplers import Grid, SamplerSpec, get_sampler, get_schedule
from diffsamp.samplers._util import Generator, StepInfo, randn_per_sample


@dataclass(frozen=True)
class GenerateResult:
    """Samples (N, C, H, W) in the model's data space, the measured NFE per image, the wall time and the σ grid.

    ``images`` are float32 in the data range [-1, 1] (not [0, 1]): save them with ``diffsamp.save_images`` or
    convert them with ``diffsamp.to_uint8``; ``torchvision.utils.save_image`` would clip the lower half.
    ``sigma_grid`` is the σ discretisation the sampler ran on (``.grid``, its former name, still works).
    """

    images: Tensor
    seeds: list[int]
    nfe: int
    seconds: float
    sigma_grid: Grid
    cond: list[Any] | None = None  # the condition of each seed, as given
    guidance: Guidance | None = None
    network_passes: int | None = None  # per image: NFE, doubled where guidance evaluated both halves
    latents: Tensor | None = None  # a latent model's samples before decoding (``return_latents=True``)

    @property
    def grid(self) -> Grid:
        """Deprecated name of ``sigma_grid``."""
        warnings.warn("GenerateResult.grid is renamed sigma_grid (the σ grid, not an image grid); "
                      "use .sigma_grid", DeprecationWarning, stacklevel=2)
        return self.sigma_grid


def _worst_ratio(grid: Grid) -> float:
    s = grid.sigmas[grid.sigmas > 0]
    return float((s[1:] / s[:-1]).min()) if len(s) > 1 else 1.0


def setting_warnings(spec: SamplerSpec, grid: Grid, *, dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None,
                     regrid: Callable[[int], Grid] | None = None) -> list[str]:
    """Known-bad settings, one sentence each: a stochastic sampler on a grid too coarse for it (the sampler
    declares the smallest σ_{i+1}/σ_i it is stable at) and half-precision weights on the CPU.

    ``regrid(n)``: the same schedule at n steps, to say how many steps would do."""
    out = []
    ratio = spec.min_sigma_ratio
    if ratio is not None and (worst := _worst_ratio(grid)) < ratio:
        enough = ""
        if regrid is not None:
            n = len(grid)
            while n < 4096 and _worst_ratio(regrid(n)) < ratio:
                n = max(n + 1, int(n * 1.25))
            enough = f"{n}+ steps of this schedule or " if n < 4096 else ""
        out.append(
            f"{spec.name} at {len(grid)} steps lets σ drop to {worst:.2f}× its value in one step; its reverse-SDE "
            f"Euler step is unstable once σ_next/σ < {ratio} and gives noise. Use {enough}an ODE sampler "
            "(heun, dpmpp2m)")
    if dtype in (torch.bfloat16, torch.float16) and device is not None and torch.device(device).type == "cpu":
        name = str(dtype).removeprefix("torch.")
        out.append(f"{name} weights on the CPU run far slower (~20×) than float32 and are no more accurate; "
                   "use float32 on the CPU")
    return out


def make_grid(
    model: Denoiser,
    sampler: str | SamplerSpec,
    *,
    schedule: str | None = None,
    steps: int = 18,
    final_zero: bool = True,
    schedule_params: Mapping[str, Any] | None = None,
    knobs: Mapping[str, Any] | None = None,
) -> Grid:
    """The grid ``sampler`` runs on: ``steps`` intervals of ``schedule`` (default ``default_schedule(model)``).

    An adaptive sampler (declared NFE None, e.g. rk45) only uses the ends: it gets [σ_max, σ_min] (+ 0 with
    ``final_zero``), whatever ``steps`` says.
    """
    spec = get_sampler(sampler) if isinstance(sampler, str) else sampler
    sched = get_schedule(schedule or default_schedule(model), model=model, **dict(schedule_params or {}))
    grid = sched.grid(steps, final_zero=final_zero)
    if spec.expected_nfe(grid, **dict(knobs or {})) is None:
        grid = sched.grid(1, final_zero=False)
        if final_zero:
            grid = Grid(torch.cat([grid.sigmas, grid.sigmas.new_zeros(1)]))
    if len(grid) < spec.min_steps:
        raise ValueError(f"sampler {spec.name!r} needs at least {spec.min_steps} steps, got {len(grid)}")
    return grid


def integrate(
    model: Denoiser,
    z: Tensor,
    *,
    sampler: str | SamplerSpec,
    grid: Grid,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    generator: Generator = None,
    callback: Callable[[StepInfo], None] | None = None,
    knobs: Mapping[str, Any] | None = None,
    start: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Run ``sampler`` on ``grid`` from source draws ``z`` (the state at σ_0 is prior_scale(prior, σ_0)·z), or
    from the given state ``start`` at σ_0 (img2img; ``z`` is then ignored).

    ``device``/``dtype`` default to the model's, except float16 weights on the CPU: there the sampler's state
    is float32 (the network still runs in float16), since float16 updates on the CPU end in NaN/inf.
    The model is wrapped in a checking ``CountingDenoiser`` (shape, NaN/inf) unless it is one already (then its
    ``rows`` count this run's network passes too); a non-finite result is a ValueError. Returns (samples as float32
    on CPU, NFE).
    """
    spec = get_sampler(sampler) if isinstance(sampler, str) else sampler
    device = torch.device(model.device if device is None else device)
    counter = model if isinstance(model, CountingDenoiser) and model.check else CountingDenoiser(model, check=True)
    calls_before = counter.calls
    scale = prior_scale(model.prior, float(grid.sigmas[0]))
    if dtype is None:
        dtype = torch.float32 if model.dtype == torch.float16 and device.type == "cpu" else model.dtype
    with torch.inference_mode():
        x0 = z.to(device=device, dtype=dtype) * scale if start is None else start.to(device=device, dtype=dtype)
        try:
            x = spec(counter, x0, grid, generator=generator, callback=callback, **dict(knobs or {}))
            counter.raise_deferred()
        except ValueError as exc:
            if "NaN/inf" not in str(exc):
                raise
            raise ValueError(f"{exc}{_knob_blame(spec, knobs)}") from None
    if not all_finite(x):
        blame = _knob_blame(spec, knobs) or " and the sampler's knobs"
        raise ValueError(f"sampler {spec.name!r} produced NaN/inf samples; check the model{blame}")
    return x.float().cpu(), counter.calls - calls_before


def _knob_blame(spec: SamplerSpec, knobs: Mapping[str, Any] | None) -> str:
    """``; knob snr=0.9 … may be the cause`` when numeric knobs were set away from their defaults, else ""."""
    defaults = spec.knob_values()
    moved = {k: v for k, v in (knobs or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and v != defaults.get(k)}
    if not moved:
        return ""
    text = ", ".join(f"{k}={v:g}" for k, v in moved.items())
    return f"; the knob{'s' * (len(moved) > 1)} set away from the default ({text}) may be the cause"


def _img2img_start(model: Denoiser, grid: Grid, init: Tensor, strength: float, n: int, device: torch.device) -> tuple[Grid | None, Tensor | None]:
    """The tail of ``grid`` that ``strength`` keeps (None at strength 0: nothing to run) and the clean start x0
    (encoded for a latent model); the whole grid and no start at strength 1."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if init.ndim < 2 or init.shape[0] not in (1, n):
        raise ValueError(f"init images must be (1 or {n}, C, H, W), one per seed or one for all, got "
                         f"{tuple(init.shape)}")
    steps = len(grid)
    keep = min(int(strength * steps), steps)  # as diffusers' img2img pipelines count them
    if keep == steps:
        return grid, None
    codec = getattr(model, "codec", None)
    with torch.inference_mode():
        x0 = codec.encode(init.to(device)).float() if codec is not None else init.float().to(device)
    if tuple(x0.shape[1:]) != tuple(model.sample_shape):
        raise ValueError(f"the init image gives a state of shape {tuple(x0.shape[1:])}; the model samples "
                         f"{tuple(model.sample_shape)}")
    return (Grid(grid.sigmas[steps - keep :]) if keep else None), x0.cpu()


def generate(
    model: Denoiser,
    shape: Sequence[int],
    *,
    sampler: str | None = None,
    schedule: str | None = None,
    steps: int = 18,
    seeds: Sequence[int] = (0,),
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    schedule_params: Mapping[str, Any] | None = None,
    final_zero: bool = True,
    grid: Grid | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_batch: Callable[[list[int], Tensor], None] | None = None,
    cond: Sequence[Any] | Tensor | None = None,
    guidance: float | Guidance | None = None,
    return_latents: bool = False,
    init: Tensor | None = None,
    strength: float = 1.0,
    **knobs: Any,
) -> GenerateResult:
    """Draw one image per seed with a registered sampler on a grid from a registered schedule.

    Each seed gets its own CPU ``torch.Generator`` for the initial noise and every injected noise, so
    image i is the same whatever the batch size or device (CONTRIBUTING.md). The initial state at
    σ_0 follows the model's prior (``prior_scale``). Runs under ``torch.inference_mode()`` and returns
    the NFE measured by a ``CountingDenoiser`` (per image: one batched call counts once).
    ``shape`` is one sample's shape, e.g. (1, 32, 32). ``sampler`` None: ``default_sampler(model)`` (``euler``
    for rectified flows, ``heun`` otherwise); ``schedule`` None: ``default_schedule(model)`` (``rf``
    for rectified flows, ``karras`` otherwise). ``on_batch(seeds, images)`` sees each batch as it finishes
    (e.g. to write it at once). Images are in [-1, 1]: save them with ``diffsamp.save_images``.
    Known-bad settings (``setting_warnings``) are reported once with ``warnings.warn``.

    A conditional model takes ``cond``, one condition per seed (class labels, …; see the model's
    ``conditioning``), sliced with each batch and bound to the model, so image i depends only on seed i and
    its condition. ``guidance`` (a scale w or a ``Guidance``) applies classifier-free guidance (Ho & Salimans
    2022): NFE still counts guided evaluations; ``network_passes`` counts both halves. A latent model
    (``model.codec``) is sampled in latent space (``shape`` is the latent's) and its samples are decoded to
    images; ``return_latents`` keeps the latents too.

    img2img (SDEdit, Meng et al. 2022, Sec. 3): ``init`` ((N or 1, C, H, W) images in [-1, 1]; a latent
    model encodes them) and ``strength`` s in [0, 1] run the sampler over the last ⌊s·n⌋ intervals of the
    n-step grid only (as diffusers' img2img pipelines count them), from x = x0 + σ_start·ε with ε drawn from
    each seed. s = 1 is plain sampling (the image is not used), s = 0 returns the image (through the codec's
    round trip for a latent model).
    """
    sampler = sampler or default_sampler(model)
    spec = get_sampler(sampler)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"shape must be a sample's (C, H, W) with positive sizes, got {shape}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given: pass at least one, e.g. seeds=[0]")
    if guidance is not None and not isinstance(guidance, Guidance):
        guidance = Guidance(scale=float(guidance))
    encoded = encode_conditions(model, cond, len(seeds))  # checked before any network call
    if encoded is None and guidance is not None and guidance.active:
        raise ValueError("guidance needs a conditional model and a condition per seed")
    if encoded is not None and guidance is not None and guidance.active:
        model.conditioning.unconditional(1, guidance.negative)  # fails now, in one line, without an unconditional half
    regrid = None
    if grid is None:
        grid = make_grid(model, spec, schedule=schedule, steps=steps, final_zero=final_zero,
                         schedule_params=schedule_params, knobs=knobs)
        regrid = lambda n: make_grid(model, spec, schedule=schedule, steps=n, final_zero=final_zero,  # noqa: E731
                                     schedule_params=schedule_params, knobs=knobs)
    elif len(grid) < spec.min_steps:
        raise ValueError(f"sampler {sampler!r} needs at least {spec.min_steps} steps, got {len(grid)}")
    batch_size = batch_size or len(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(model.device if device is None else device)
    start_x0, run_grid = None, grid
    if init is not None:
        run_grid, start_x0 = _img2img_start(model, grid, init, strength, len(seeds), device)
        grid = run_grid if run_grid is not None else grid
    trained = getattr(knobs.get("predictor"), "config", None) or {}
    mismatch = guidance_mismatch(trained, guidance.scale if guidance is not None else 1.0, "the predictor")
    if mismatch and encoded is not None:
        warnings.warn(mismatch, UserWarning, stacklevel=2)
    for text in setting_warnings(spec, grid, dtype=model.dtype, device=device, regrid=regrid):
        warnings.warn(text, UserWarning, stacklevel=2)
    outs: list[Tensor] = []
    latents: list[Tensor] = []
    codec = getattr(model, "codec", None)
    nfe_per_batch: list[int] = []
    passes_per_batch: list[int] = []
    start = time.perf_counter()
    for b in range(0, len(seeds), batch_size):
        chunk = seeds[b : b + batch_size]
        gens = [torch.Generator().manual_seed(s) for s in chunk]
        z = randn_per_sample(gens, shape)
        bound = condition_model(model, None if encoded is None else take(encoded, slice(b, b + batch_size)), guidance)
        x_start = None
        if start_x0 is not None:
            x0 = start_x0 if start_x0.shape[0] == 1 else start_x0[b : b + batch_size]
            x_start = x0.expand(len(chunk), *x0.shape[1:]) + (float(grid.sigmas[0]) * z if run_grid is not None else 0)
        if run_grid is None:  # strength 0: the image itself
            x, nfe, rows = x_start.float().cpu(), 0, 0
        else:
            counter = CountingDenoiser(bound, check=True)
            x, nfe = integrate(counter, z, sampler=spec, grid=grid, device=device, generator=gens, callback=callback,
                               knobs=knobs, start=x_start)
            rows = counter.rows  # network passes: stacked points (EPD) count each
        nfe_per_batch.append(nfe)
        passes_per_batch.append(bound.passes if isinstance(bound, Guided) else
                                (rows // len(chunk) if run_grid is not None else 0))
        if codec is not None:
            if return_latents:
                latents.append(x)
            with torch.inference_mode():
                x = codec.decode(x.to(device)).float().cpu()
        outs.append(x)
        if on_batch is not None:
            on_batch(chunk, x)
        if progress is not None:
            progress(min(b + batch_size, len(seeds)), len(seeds))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    given = None
    if cond is not None:
        given = cond.tolist() if isinstance(cond, Tensor) else list(cond) if isinstance(cond, Sequence) and not isinstance(cond, str) else [cond] * len(seeds)
    return GenerateResult(torch.cat(outs), seeds, max(nfe_per_batch), seconds, grid, given,
                          guidance if encoded is not None else None, max(passes_per_batch),
                          torch.cat(latents) if latents else None)
