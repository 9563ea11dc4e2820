"""Every shipped AMED predictor is a finished training run for a zoo model, and samples at its declared NFE."""

from __future__ import annotations

import pytest
import torch

import diffsamp
from diffsamp.models.zoo import load, sample_shape
from diffsamp.samplers.amed_files import check_predictor_model, load_predictor, sampling_settings, shipped_predictors

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = shipped_predictors()


def test_the_documented_predictors_ship():
    assert {"mnist-ddpm/amed-nfe5", "mnist-ddpm/amed-static-nfe5", "mnist-ddpm/ipndm-amed-nfe5"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_a_shipped_predictor_is_finished_and_samples_at_its_nfe(name):
    pred = load_predictor(name)
    cfg = pred.config
    model_name = name.split("/")[0]
    check_predictor_model(pred, model_name)
    assert cfg["training"]["finished"], f"{name}: the training run stopped before its budget"
    assert cfg["training"]["trajectories_done"] == cfg["training"]["trajectories"]
    assert cfg["training"]["wall_seconds"] > 0 and cfg["training"]["hardware"]
    model = load(model_name)
    method, grid, knobs = sampling_settings(pred)
    res = diffsamp.generate(model, sample_shape(model), sampler=method, grid=grid, seeds=[0], **knobs)
    assert res.nfe == cfg["nfe"] and torch.isfinite(res.images).all()
