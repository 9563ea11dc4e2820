"""Measured NFE equals the declared NFE; seeds give the same images at any batch size; bad input fails clearly."""

import pytest
import torch

import diffsamp
from diffsamp.models.base import CountingDenoiser
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
from diffsamp.samplers.amed import FixedPredictor
from tests.conftest import tiny_unet

SAMPLERS = diffsamp.available_samplers()


def needed_knobs(name: str, steps: int) -> dict:
    """Knobs a sampler cannot run without: AMED methods take a predictor (a constant one here), EPD and AdaSDE
    a table of the grid's length (untrained; AdaSDE's with real noise)."""
    from diffsamp.samplers.epd import AdaSdeTable, EpdTable

    learned = diffsamp.get_sampler(name).planning.learned
    if learned is None:
        return {}
    if not learned.table:
        return {"predictor": FixedPredictor(0.4, 1.0)}
    return {"predictor": AdaSdeTable(steps, 2, gamma_max=0.2) if name == "adasde" else EpdTable(steps, 2)}


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("final_zero,final_denoise", [(True, False), (False, False), (False, True)])
def test_measured_nfe_equals_declared(name, final_zero, final_denoise, mixture2d):
    spec = diffsamp.get_sampler(name)
    grid = diffsamp.get_schedule("karras", model=mixture2d).grid(7, final_zero=final_zero)
    knobs = {"final_denoise": True} if final_denoise and name != "rk45" and not name.startswith(("ancestral", "ddpm", "ddim")) else {}
    knobs.update(needed_knobs(name, len(grid)))
    counter = CountingDenoiser(mixture2d)
    x = torch.randn(4, 2, dtype=torch.float64) * float(grid.sigmas[0])
    spec(counter, x, grid, generator=torch.Generator().manual_seed(0), **knobs)
    expected = spec.expected_nfe(grid, **knobs)
    if expected is None:  # adaptive (rk45): at least the 6 stages of one Dormand–Prince step
        assert counter.calls >= 6
    else:
        assert counter.calls == expected, f"{name}: measured {counter.calls}, declared {expected}"


def test_heun_18_steps_is_35_nfe(mixture2d):
    out = diffsamp.generate(mixture2d, (2,), sampler="heun", steps=18, seeds=[0])
    assert out.nfe == 35


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_sample_at_batch_sizes_1_and_8(name, mixture2d):
    knobs = {"norm": "sample"} if name == "pc" else needed_knobs(name, 6)
    a = diffsamp.generate(mixture2d, (2,), sampler=name, steps=6, seeds=range(8), batch_size=1, **knobs)
    b = diffsamp.generate(mixture2d, (2,), sampler=name, steps=6, seeds=range(8), batch_size=8, **knobs)
    if name == "rk45":  # one adaptive solve over the whole batch: step sizes depend on the batch
        assert torch.allclose(a.images, b.images, atol=1e-3)
    else:
        assert torch.allclose(a.images, b.images, rtol=1e-6, atol=1e-6), name


@pytest.mark.parametrize("name", ["ddpm", "heun", "euler_maruyama"])
def test_batch_invariance_on_a_unet(name):
    from diffusers import DDPMScheduler

    den = DiffusersUNetDenoiser(tiny_unet(), DDPMScheduler().alphas_cumprod)
    a = diffsamp.generate(den, (1, 8, 8), sampler=name, steps=4, seeds=range(4), batch_size=1)
    b = diffsamp.generate(den, (1, 8, 8), sampler=name, steps=4, seeds=range(4), batch_size=4)
    assert torch.allclose(a.images, b.images, rtol=1e-4, atol=1e-4)


def test_unknown_sampler_lists_valid_names(mixture2d):
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'.*available: .*ancestral"):
        diffsamp.generate(mixture2d, (2,), sampler="dpm++")


def test_nan_from_model_is_named(mixture2d):
    from diffsamp.models.base import DenoiserBase

    class Broken(DenoiserBase):
        sigma_min, sigma_max, prior = 0.01, 10.0, "ve"

        def __call__(self, x, sigma):
            return torch.full_like(x, float("nan"))

    with pytest.raises(ValueError, match="NaN/inf"):
        diffsamp.generate(Broken(), (2,), sampler="euler", steps=3)


def test_wrong_shapes_are_named(mixture2d):
    with pytest.raises(ValueError, match="2-dimensional"):
        diffsamp.generate(mixture2d, (3,), sampler="euler", steps=3)
    from diffusers import DDPMScheduler

    den = DiffusersUNetDenoiser(tiny_unet(), DDPMScheduler().alphas_cumprod)
    with pytest.raises(ValueError, match="takes \\(B, 1, H, W\\)"):
        diffsamp.generate(den, (3, 8, 8), sampler="euler", steps=2)
    with pytest.raises(ValueError, match="sigma must have shape"):
        CountingDenoiser(mixture2d, check=True)(torch.zeros(4, 2), torch.ones(3))


def test_bad_knobs_and_steps_are_named(mixture2d):
    with pytest.raises(ValueError, match="eta must be in"):
        diffsamp.generate(mixture2d, (2,), sampler="ddim", eta=2.0)
    with pytest.raises(ValueError, match="positive integer"):
        diffsamp.generate(mixture2d, (2,), sampler="heun", steps=0)
    with pytest.raises(ValueError, match="max_order must be 1 to 4"):
        diffsamp.generate(mixture2d, (2,), sampler="ipndm", max_order=5)
    with pytest.raises(ValueError, match="no knob not_a_knob; its knobs: final_denoise"):
        diffsamp.generate(mixture2d, (2,), sampler="euler", not_a_knob=1)


def test_registry_rejects_duplicates_and_every_sampler_is_documented():
    from diffsamp.samplers import register_sampler

    with pytest.raises(ValueError, match="already registered"):
        register_sampler("heun", kind="ode", nfe=lambda g, k: len(g))(lambda m, x, g: x)
    for name in SAMPLERS:
        spec = diffsamp.get_sampler(name)
        assert spec.description and spec.kind in ("ode", "sde")
