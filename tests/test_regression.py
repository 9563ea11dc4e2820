"""Every sample, FID statistic and training run stays where the stored fixture has it (``tests/regression.py``
computes it; see its docstring for when to regenerate): exactly where the arithmetic is exact on every CPU,
within the derived float32 tolerances elsewhere, and bit for bit when recomputed in the same process."""

from __future__ import annotations

import pytest
import torch

from tests.regression import ANALYTIC_SAMPLERS, FIXTURE, MODELS, SAMPLERS, compute, deviations, samples, tolerance


@pytest.fixture(scope="module")
def stored() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURE))


@pytest.fixture(scope="module")
def now() -> dict[str, torch.Tensor]:
    return compute()


def test_fixture_covers_every_model_and_sampler(stored):
    for m in MODELS:
        for s in SAMPLERS:
            assert f"sample/{m}/{s}" in stored
    for s in ANALYTIC_SAMPLERS:
        assert f"analytic/{s}" in stored
    for key in stored:
        tolerance(key)  # every entry has a stated tolerance


def test_matches_the_fixture(stored, now):
    keys = set(stored)
    if "fid/mu" not in now:  # no Inception weights here: the FID statistic is not recomputed
        keys -= {k for k in keys if k.startswith("fid/")}
    assert keys <= set(now), f"missing: {sorted(keys - set(now))}"
    bad = [line for line in deviations(stored, now, sorted(keys)) if line]
    assert not bad, "moved beyond the tolerance:\n" + "\n".join(bad)


def test_exact_within_one_process(now):
    """The same computation twice in one process is bit-identical (seeds, kernels and thread count fixed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        again = samples(models=MODELS[:1])
    finally:
        torch.set_num_threads(threads)
    for key, value in again.items():
        assert torch.equal(value, now[key]), key
