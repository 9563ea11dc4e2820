"""The EMA really averages: shadow ← d·shadow + (1 − d)·θ with d = min(decay, (1 + t)/(10 + t))."""

from __future__ import annotations

import torch
from torch import nn

from diffsamp.training.loop import EMA


def _pair(seed: int) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Linear(3, 2), nn.Linear(3, 2)


def test_ema_update_is_the_decayed_average():
    model, other = _pair(0)
    ema = EMA(model, 0.9)
    start = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(other.state_dict())
    ema.update(model, step=1000)  # d = min(0.9, 1001/1010) = 0.9
    for p0, p1, e in zip(start, model.parameters(), ema.shadow.parameters()):
        torch.testing.assert_close(e, 0.9 * p0 + 0.1 * p1.detach(), rtol=0, atol=1e-6)
        assert not torch.equal(e, p1)  # an EMA that copies the raw weights fails here


def test_ema_warmup_decay_early_in_training():
    model, other = _pair(1)
    ema = EMA(model, 0.999)
    start = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(other.state_dict())
    ema.update(model, step=0)  # d = min(0.999, 1/10) = 0.1
    for p0, p1, e in zip(start, model.parameters(), ema.shadow.parameters()):
        torch.testing.assert_close(e, 0.1 * p0 + 0.9 * p1.detach(), rtol=0, atol=1e-6)
