"""GITS and learned steps on a class-conditional model under classifier-free guidance: each trajectory runs with its
own class (cycled) at the stated scale, checked against the registered samplers run on the guided model directly."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import diffsamp
from diffsamp.cli import main
from diffsamp.models.base import prior_scale
from diffsamp.models.conditioning import ClassConditioning, Guidance, condition_model, encode_conditions
from diffsamp.training.gits import GitsOptions, cost_matrix, teacher_trajectory
from diffsamp.training.steps import StepsOptions, train_steps
from tests.conftest import assert_one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def cond_model():
    from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
    from diffsamp.models.networks import make_unet

    torch.manual_seed(0)
    unet = make_unet(channels=(8, 16), sample_size=8, num_class_embeds=4)
    torch.nn.init.normal_(unet.class_embedding.weight, std=2.0)  # classes far apart: the condition matters
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return DiffusersUNetDenoiser(unet.eval(), torch.cumprod(1 - betas, 0), "epsilon",
                                 conditioning=ClassConditioning(3, 3))


def _guided(model, labels, w):
    return condition_model(model, encode_conditions(model, labels, len(labels)), Guidance(w))


def test_gits_costs_follow_each_trajectory_class_and_the_guidance(cond_model):
    opts = GitsOptions(steps=2, fine_steps=6, schedule="karras", trajectories=3, batch=2, classes=[2, 0], guidance=2.5)
    fine = diffsamp.get_schedule("karras", model=cond_model).grid(6)
    cost = cost_matrix(cond_model, SHAPE, fine, opts)
    sig = fine.sigmas.tolist()
    want = torch.zeros_like(cost)
    for k, label in enumerate([2, 0, 2]):  # trajectory k: seed k, class classes[k mod 2]
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))[None] * prior_scale(cond_model.prior, sig[0])
        points, slopes = teacher_trajectory(_guided(cond_model, [label], 2.5), z, fine, "heun")
        for i in range(len(sig) - 1):
            for j in range(i + 1, len(sig)):
                want[i, j] += (points[i] + (sig[j] - sig[i]) * slopes[i] - points[j]).double().norm() / 3
    upper = torch.triu(torch.ones_like(cost, dtype=torch.bool), diagonal=1)
    # float32 round-off of batch-of-2 against batch-of-1 network calls, at the state scale (σ_max = 157)
    torch.testing.assert_close(cost[upper], want[upper], rtol=1e-4, atol=1e-6 * float(want[upper].max()))
    other_class = cost_matrix(cond_model, SHAPE, fine, GitsOptions(**{**opts.__dict__, "classes": [1]}))
    unguided = cost_matrix(cond_model, SHAPE, fine, GitsOptions(**{**opts.__dict__, "guidance": 1.0}))
    assert not torch.allclose(other_class[upper], cost[upper], rtol=1e-3)
    assert not torch.allclose(unguided[upper], cost[upper], rtol=1e-3)
    with pytest.raises(ValueError, match="conditional"):
        cost_matrix(cond_model, SHAPE, fine, GitsOptions(steps=2, fine_steps=6, trajectories=2, batch=2))
    with pytest.raises(ValueError, match="guidance needs a class-conditional model"):  # a scale without classes
        train_steps(cond_model, SHAPE, StepsOptions(steps=3, schedule="karras", trajectories=2, batch=2, guidance=2.0))


def test_learned_steps_pool_loss_is_the_guided_solvers_distance(cond_model):
    """Epoch 0's pool loss: dpmpp2m on the initial grid against Heun on the fine grid, both on the guided model
    with each trajectory's class, from the pool's noise."""
    opts = StepsOptions(steps=3, schedule="karras", teacher_steps=8, trajectories=4, batch=2, epochs=1,
                        classes=[1, 0, 2], guidance=3.0)
    grid, record = train_steps(cond_model, SHAPE, opts)
    sched = diffsamp.get_schedule("karras", model=cond_model)
    init, fine = sched.grid(3), sched.grid(8)
    z = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(0)) * prior_scale(cond_model.prior, float(init.sigmas[0]))
    guided = _guided(cond_model, [1, 0, 2, 1], 3.0)
    with torch.no_grad():
        student = diffsamp.get_sampler("dpmpp2m")(guided, z, init)
        teacher = diffsamp.get_sampler("heun")(guided, z, fine)
    want = float((student - teacher).pow(2).sum((1, 2, 3)).mean())
    assert record["pool_loss"][0] == pytest.approx(want, rel=1e-4)
    assert record["options"]["classes"] == [1, 0, 2] and record["options"]["guidance"] == 3.0
    assert len(grid) == 3 and grid.ends_at_zero


def test_cli_guidance_needs_classes():
    res = CliRunner().invoke(main, ["train", "solver", "--method", "gits", "--model", "mnist-ddpm", "--nfe", "3",
                                    "--cfg", "2", "--out", "unused-out"])
    assert_one_line_error(res, 2, "--cfg guides a class-conditional model")
