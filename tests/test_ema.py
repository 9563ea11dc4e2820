"""The EMA really averages: shadow ← d·shadow + (1 − d)·θ with d = min(decay, (1 + t)/(10 + t))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffsamp.training.loop import EMA


def _pair(seed: int) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Linear(3, 2), nn.Linear(3, 2)


@pytest.mark.parametrize("decay, step, d", [(0.9, 1000, 0.9), (0.999, 0, 0.1)])  # d = min(decay, (1+t)/(10+t))
def test_ema_update_is_the_decayed_average(decay, step, d):
    model, other = _pair(0)
    ema = EMA(model, decay)
    start = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(other.state_dict())
    ema.update(model, step=step)
    for p0, p1, e in zip(start, model.parameters(), ema.shadow.parameters()):
        torch.testing.assert_close(e, d * p0 + (1 - d) * p1.detach(), rtol=0, atol=1e-6)
        assert not torch.equal(e, p1)  # an EMA that copies the raw weights fails here
