"""The complete Denoiser protocol: every family declares it, and every wrapper forwards all of it."""

from __future__ import annotations

import pytest
import torch

import diffsamp
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
