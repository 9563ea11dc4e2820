"""Our ddim/ddpm on a tiny random UNet2DModel match diffusers' scheduler loops (no downloads).

Compared with timestep_spacing="leading": diffusers' DDIM/DDPM steps from t to t − T//n, which is the
next timestep of its own list only for that spacing (with "linspace"/"trailing" it jumps to a point that
is not on its grid), so only there are "the same timesteps" well defined.
"""

import math

import pytest
import torch

import diffsamp
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
from tests.conftest import tiny_unet


def _diffusers_loop(unet, scheduler, z, n, generator, **step_kwargs):
    scheduler.set_timesteps(n)
    x = z.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize(
    "kind,config,knobs,step_kwargs,n",
    [
        ("ddim", {}, {}, {}, 10),
        ("ddim", {}, {}, {}, 7),
        ("ddim", {}, {"eta": 1.0}, {"eta": 1.0}, 10),
        ("ddim", {}, {"eta": 0.3}, {"eta": 0.3}, 20),
        ("ddpm", {}, {}, {}, 25),
        ("ddpm", {"variance_type": "fixed_large"}, {"variance": "beta"}, {}, 25),
        ("ddpm", {"prediction_type": "v_prediction"}, {}, {}, 10),
        ("ddim", {"prediction_type": "sample"}, {}, {}, 10),
    ],
)
def test_matches_diffusers_scheduler(kind, config, knobs, step_kwargs, n):
    from diffusers import DDIMScheduler, DDPMScheduler

    unet = tiny_unet().double()
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    sched = cls(clip_sample=False, **config)
    den = DiffusersUNetDenoiser(unet, sched.alphas_cumprod, sched.config.prediction_type)
    spacing = sched.config.timestep_spacing
    grid = diffsamp.get_schedule("ddpm", model=den, spacing=spacing).grid(n)

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    ref = _diffusers_loop(unet, sched, z, n, g, **step_kwargs)

    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours = diffsamp.get_sampler(kind)(den, z * math.sqrt(1 + float(grid.sigmas[0]) ** 2), grid, generator=g, **knobs)
    scale = ref.abs().max()
    # diffusers does its scheduler arithmetic with float32 ᾱ's: agreement to ~1e-7 relative
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6 * float(scale)), float((ours - ref).abs().max())


def test_clamp_denoiser_reproduces_clip_sample_for_ddpm():
    from diffusers import DDPMScheduler

    unet = tiny_unet().double()
    sched = DDPMScheduler(clip_sample=True)
    den = diffsamp.ClampDenoiser(DiffusersUNetDenoiser(unet, sched.alphas_cumprod))
    grid = diffsamp.get_schedule("ddpm", model=den).grid(20)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    ref = _diffusers_loop(unet, sched, z, 20, g)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ours = diffsamp.get_sampler("ddpm")(den, z * math.sqrt(1 + float(grid.sigmas[0]) ** 2), grid, generator=g)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
