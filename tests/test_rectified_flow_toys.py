"""Reflow on a 2-D toy straightens the flow and makes one-step sampling work (RF paper §2.2, §5).

Thresholds come from measurements of this exact setting (toy mix2, MLP 64×2, 300/300/200 steps, 2000
pairs) with seeds 0–2 on CPU: straightness S of 1-RF 5.9–6.8 vs 2-RF 0.006–0.010; one-step sliced
Wasserstein-2 to the target 1.65–1.76 (1-RF), 0.35–0.49 (2-RF), 0.24–0.37 (2-RF + distill); one-step
MMD² 1.40–1.70, 0.07–0.12, 0.011–0.027. The asserted margins are several times looser than that spread.
"""

from __future__ import annotations

import pytest
import torch

from diffsamp.data.toys import TOYS, ToyBatches, get_toy
from diffsamp.metrics.toy_distances import mmd_rbf, sliced_wasserstein
from diffsamp.training.toy_recipe import rectify_toy

@pytest.fixture(scope="module")
def mix2(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return rectify_toy("mix2", tmp_path_factory.mktemp("toy"), train_steps=300, reflow_steps=300, distill_steps=200,
                       num_pairs=2000, hidden=64, depth=2, seed=0)


def test_reflow_is_measurably_straighter(mix2):
    s1, s2 = mix2.metrics["1-RF"], mix2.metrics["2-RF"]
    assert s1["straightness"] > 2.0  # independent coupling: the 1-RF paths bend
    assert s2["straightness"] < 0.05 * s1["straightness"]
    # and the difference is far outside the Monte-Carlo error
    assert s1["straightness"] - s2["straightness"] > 20 * (s1["straightness_err"] + s2["straightness_err"])


def test_one_step_2rf_is_far_closer_to_the_target_than_one_step_1rf(mix2):
    m1, m2 = mix2.metrics["1-RF"], mix2.metrics["2-RF"]
    assert m2["sw_1step"] < 0.5 * m1["sw_1step"]
    assert m2["mmd_1step"] < 0.25 * m1["mmd_1step"]
    # with 100 steps both are good: the gap is a one-step effect, not a worse 1-RF
    assert m1["sw_100step"] < 0.5 * m1["sw_1step"]


def test_distilled_one_step_beats_1rf_and_2rf_one_step(mix2):
    m1, m2, md = mix2.metrics["1-RF"], mix2.metrics["2-RF"], mix2.metrics["2-RF+distill"]
    assert md["sw_1step"] < 0.4 * m1["sw_1step"]
    assert md["mmd_1step"] < 0.1 * m1["mmd_1step"]
    assert md["mmd_1step"] < m2["mmd_1step"]


def test_training_lowers_the_loss(mix2):
    """The trained 1-RF's velocity loss on fresh pairs is far below a fresh network's (same seed, same draws)."""
    from diffsamp.models.networks import MLPVelocity
    from diffsamp.training.rectified_flow import RFLoss

    batch = ToyBatches("mix2", 4096, seed=123).next()
    loss = RFLoss(time_scale=1.0, paired=True)
    torch.manual_seed(0)
    with torch.no_grad():
        fresh = float(loss(MLPVelocity(2, 64, 2), batch, torch.Generator().manual_seed(0)))
        trained = float(loss(mix2.models["1-RF"].network, batch, torch.Generator().manual_seed(0)))
    assert trained < 0.5 * fresh


def test_toys_and_distances():
    g = torch.Generator().manual_seed(0)
    for name in TOYS:
        toy = get_toy("toy:" + name)
        assert toy.source(100, g).shape == (100, 2) and toy.target(100, g).shape == (100, 2)
    with pytest.raises(ValueError, match="unknown toy"):
        get_toy("toy:spiral")
    a, b = get_toy("moons").target(1000, g), get_toy("moons").target(1000, g)
    far = get_toy("gauss8").target(1000, g)
    assert sliced_wasserstein(a, b) < 0.5 * sliced_wasserstein(a, far)
    assert mmd_rbf(a, b) < 0.2 * mmd_rbf(a, far)
    assert sliced_wasserstein(a, a) == 0.0
    src = ToyBatches("moons", 8, seed=1)
    state = src.state_dict()
    first = src.next()
    src.load_state_dict(state)
    assert torch.equal(src.next(), first)
