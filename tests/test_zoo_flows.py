"""The shipped rectified flows: listed with cards, load offline, and their velocity fields are trained ones."""

from __future__ import annotations

import pytest
import torch

from diffsamp import generate
from diffsamp.models import available_models, model_card, sample_shape
from diffsamp.metrics.straightness import straightness
from diffsamp.models import load as load_model
from diffsamp.models.zoo import WEIGHTS_DIR

FLOWS = ("mnist-rf", "mnist-2rf", "mnist-ddpm-reflow", "mnist-2rf-distill")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", FLOWS)
def test_shipped_flows_are_listed_with_cards(name):
    assert name in available_models()
    card = model_card(name)
    for key in ("trainer", "rectification", "dataset", "parameters", "weights", "training"):
        assert key in card, (name, key)
    for key in ("steps", "seconds", "hardware", "final_loss"):
        assert key in card["training"], (name, key)
    files = [WEIGHTS_DIR / f"{name}.safetensors", WEIGHTS_DIR / f"{name}.json"]
    assert all(p.is_file() for p in files)
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    model = load_model(name)
    assert sum(p.numel() for p in model.network.parameters()) == card["parameters"]


@pytest.mark.parametrize("name", FLOWS)
def test_shipped_flows_sample_in_one_step(name):
    model = load_model(name)
    out = generate(model, sample_shape(model), sampler="euler", steps=1, seeds=range(4))
    assert out.nfe == 1 and out.images.shape == (4, 1, 32, 32)
    assert torch.isfinite(out.images).all()
    assert out.images.abs().max() < 3  # data lie in [-1, 1]; an untrained network lands far outside


@pytest.mark.parametrize("name", FLOWS)
def test_shipped_flows_point_from_noise_to_data(name, mnist_test):
    """x̂0 = x_t − t·v(x_t, t) on held-out digits at t = 0.5: a trained flow recovers x0 far better than x_t.

    Measured for mnist-rf: MSE(x̂0, x0) = 0.020 against MSE(x_t, x0) = 0.484 (ratio 0.04). Reflowed flows see
    only their teacher's samples, not the test digits, but still map a noised digit close to it; the distilled
    generator, trained at t = 1 only, keeps enough of 2-RF's velocity at t = 0.5 to pass too."""
    model = load_model(name)
    x0 = mnist_test[:32]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = 0.5
    x_t = (1 - t) * x0 + t * eps
    with torch.inference_mode():
        x0_hat = x_t - t * model.velocity(x_t, torch.full((x0.shape[0],), t))
    assert float((x0_hat - x0).pow(2).mean()) < 0.15 * float((x_t - x0).pow(2).mean())


@pytest.mark.parametrize("rectified, teacher", [("mnist-2rf", "mnist-rf"), ("mnist-ddpm-reflow", "mnist-ddpm")])
def test_reflow_straightens_the_teachers_paths(rectified, teacher):
    """The RF paper's claim on our shipped weights: reflow makes the ODE paths straighter (S of Liu et al. 2022, eq. 7).

    Measured (32 paths, 16 Euler steps, seed 0), S per coordinate: mnist-rf 0.0579 ± 0.0026, mnist-2rf
    0.0038 ± 0.0004 (ratio 0.066); mnist-ddpm's probability-flow ODE 0.0929 ± 0.0033, mnist-ddpm-reflow
    0.0033 ± 0.0003 (ratio 0.036)."""
    z = torch.randn((32, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    s = {name: straightness(load_model(name), z, steps=16, batch_size=32) for name in (rectified, teacher)}
    assert s[rectified]["S"] + 3 * s[rectified]["S_err"] < 0.25 * s[teacher]["S"]


def test_one_step_maps_rank_as_in_the_rf_paper():
    """One Euler step from held-out noise (seeds past the 10 000 training pairs) against 2-RF's own 16-step ipndm
    sample: the distilled map is closest, 2-RF's one step close, 1-RF's one step far (RF paper, Table 1(a)).

    Measured (seeds 20000–20031), MSE per pixel: distill 0.0121, 2-RF 0.0153, 1-RF 0.195."""
    seeds = range(20000, 20032)
    shape = (1, 32, 32)
    ref = generate(load_model("mnist-2rf"), shape, sampler="ipndm", steps=16, seeds=seeds).images
    err = {name: float((generate(load_model(name), shape, sampler="euler", steps=1, seeds=seeds).images - ref)
                       .pow(2).mean())
           for name in ("mnist-2rf-distill", "mnist-2rf", "mnist-rf")}
    assert err["mnist-2rf-distill"] < 0.85 * err["mnist-2rf"]
    assert err["mnist-2rf"] < 0.25 * err["mnist-rf"]
