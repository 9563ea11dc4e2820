"""The complete Denoiser protocol: every family declares it, and every wrapper forwards all of it."""

from __future__ import annotations

import pytest
import torch

import diffsamp
from diffsamp.models.analytic import GaussianDenoiser
from diffsamp.models.base import AutocastDenoiser, ClampDenoiser, CountingDenoiser, Denoiser, unwrap
from diffsamp.models.networks import MLPVelocity
from diffsamp.models.rectified_flow import RFDenoiser

ATTRS = ("sigma_min", "sigma_max", "prior", "source", "sample_shape", "device", "dtype", "feature_module",
         "clip_sample", "timestep_sigmas", "info", "network")


@pytest.mark.parametrize("wrap", [ClampDenoiser, CountingDenoiser, AutocastDenoiser])
def test_wrappers_forward_every_declared_attribute(wrap, mixture2d):
    flow = RFDenoiser(MLPVelocity(2, 8, 1).double(), time_scale=1.0, source="gauss6", info={"dataset": "toy"})
    for model in (flow, mixture2d):
        wrapped = wrap(wrap(model))
        assert isinstance(wrapped, Denoiser) and unwrap(wrapped) is model
        for attr in ATTRS:
            assert getattr(wrapped, attr) == getattr(model, attr), attr


def test_generate_keeps_a_wrapped_models_dtype():
    """Regression: a ClampDenoiser hid its model's network, so generate drew float32 noise on the CPU."""
    torch.manual_seed(0)
    flow = RFDenoiser(MLPVelocity(2, 8, 1).double(), time_scale=1.0)
    seen = []
    diffsamp.generate(ClampDenoiser(flow, -3.0, 3.0), (2,), sampler="euler", steps=2, seeds=[0],
                      callback=lambda info: seen.append(info.x.dtype))
    assert seen == [torch.float64, torch.float64]


# ------------------------------------------------------------------ a wrapped model works wherever a model does
class _Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k


def _progress(model):
    from diffsamp.cli.sampling import _Progress

    return _Progress(model, _Bar())


# every class of the package that wraps a denoiser (``Wrapper`` subclasses), as a callable model -> wrapped model
def _cuda_graphs(m):  # noqa: ANN001, ANN202 - off CUDA it warns once and calls the network plainly
    import warnings

    from diffsamp.models.fast import cuda_graph_denoiser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cuda_graph_denoiser(m)


WRAPPERS = {"counting": CountingDenoiser, "counting-checked": lambda m: CountingDenoiser(m, check=True),
            "clamp": lambda m: ClampDenoiser(m, -5.0, 5.0), "autocast": AutocastDenoiser, "progress": _progress,
            "cuda-graphs": _cuda_graphs}


def test_the_wrapper_list_is_complete():
    """A new Wrapper subclass in the package is added to WRAPPERS (and so to the tests below)."""
    import importlib
    import pkgutil

    from diffsamp.models.base import Wrapper

    for info in pkgutil.walk_packages(diffsamp.__path__, "diffsamp."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    found = {c.__name__ for c in subclasses(Wrapper) if c.__module__.startswith("diffsamp.")}
    found -= {"Guided", "_LabelsBound", "_PromptBound"}  # bound conditional models: test_conditioning, test_sd_pipeline
    assert found == {"CountingDenoiser", "ClampDenoiser", "AutocastDenoiser", "_Progress", "CUDAGraphDenoiser"}, found


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_elbo_takes_any_wrapper_and_leaves_the_models_clipping_as_it_was(name, one_thread):
    """Regression: the bound switched clipping off by assigning ``clip_sample`` on a copy of the model, which a
    wrapper (whose ``clip_sample`` forwards to its inner model) refused with AttributeError."""
    from diffsamp.metrics.likelihood import elbo
    from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
    from diffsamp.models.parameterization import ddpm_alphas_cumprod
    from tests.conftest import tiny_unet

    unet, ac = tiny_unet(8), ddpm_alphas_cumprod(num_steps=6)
    clipped = DiffusersUNetDenoiser(unet, ac, clip_sample=0.1)  # a tight clip: the bound would change under it
    images = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    plain = elbo(DiffusersUNetDenoiser(unet, ac), images, batch_size=3)
    wrapped = WRAPPERS[name](clipped)
    res = elbo(wrapped, images, batch_size=3)
    torch.testing.assert_close(res.nats, plain.nats, rtol=1e-6, atol=1e-6)
    assert clipped.clip_sample == 0.1 and wrapped.clip_sample == 0.1  # restored
    if isinstance(wrapped, CountingDenoiser):
        assert wrapped.calls == 6  # the caller's counter counted: one batched call per chain step
    if name == "progress":
        assert wrapped.bar.n == 6
    with pytest.raises(ValueError, match="no discrete DDPM"):
        elbo(WRAPPERS[name](GaussianDenoiser([0.0], 1.0)), torch.zeros(2, 1))


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_ode_likelihood_straightness_and_bench_plans_take_any_wrapper(name, mixture2d):
    from diffsamp.metrics.bench import plan_cell, reference_plan
    from diffsamp.metrics.likelihood import ode_nll
    from diffsamp.metrics.straightness import straightness

    x = mixture2d.sample(8, torch.Generator().manual_seed(0))
    wrapped = WRAPPERS[name](mixture2d)
    torch.testing.assert_close(ode_nll(wrapped, x, probes=None, rtol=1e-3, atol=1e-3).nats,
                               ode_nll(mixture2d, x, probes=None, rtol=1e-3, atol=1e-3).nats)
    flow = RFDenoiser(MLPVelocity(2, 8, 1).double(), time_scale=1.0)
    z = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert straightness(WRAPPERS[name](flow), z, steps=4) == straightness(flow, z, steps=4)
    for sampler, nfe in (("heun", 5), ("dpm2", 4), ("dpmpp2m", 5), ("euler", 3)):
        a, b = plan_cell(WRAPPERS[name](mixture2d), "mix", sampler, nfe), plan_cell(mixture2d, "mix", sampler, nfe)
        assert torch.equal(a.grid.sigmas, b.grid.sigmas) and (a.method, a.knobs, a.setting) == (b.method, b.knobs, b.setting)
    assert torch.equal(reference_plan(WRAPPERS[name](mixture2d)).grid.sigmas, reference_plan(mixture2d).grid.sigmas)
