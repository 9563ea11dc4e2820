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


@pytest.mark.parametrize("how", ["wrapper", "scheduler config"])
def test_clipping_reproduces_clip_sample_for_ddpm(how, tmp_path):
    """x̂0 clipping, as a ClampDenoiser or read from a saved model's scheduler config, is diffusers' clip_sample."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = tiny_unet().double()
    sched = DDPMScheduler(clip_sample=True, clip_sample_range=0.8)
    if how == "wrapper":
        den = diffsamp.ClampDenoiser(DiffusersUNetDenoiser(unet, sched.alphas_cumprod), -0.8, 0.8)
    else:
        DDPMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(tmp_path / "m")
        den = DiffusersUNetDenoiser.from_pretrained(tmp_path / "m", dtype=torch.float64)
        assert den.clip_sample == 0.8
        assert DiffusersUNetDenoiser.from_pretrained(tmp_path / "m", clip=False).clip_sample is None
    grid = diffsamp.get_schedule("ddpm", model=den).grid(20)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    ref = _diffusers_loop(unet, sched, z, 20, g)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    x_start = z * math.sqrt(1 + float(grid.sigmas[0]) ** 2)
    g_state = g.get_state()
    with torch.no_grad():
        ours = diffsamp.get_sampler("ddpm")(den, x_start, grid, generator=g)
        g.set_state(g_state)
        unclipped = diffsamp.get_sampler("ddpm")(DiffusersUNetDenoiser(unet, sched.alphas_cumprod), x_start, grid, generator=g)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(unclipped, ref, rtol=1e-3, atol=1e-3)  # the clipping is what makes them agree
