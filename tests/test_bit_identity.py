"""Every sample, FID statistic and training checkpoint stays bit-identical to the stored fixture
(``tests/bit_identity.py`` computes it; see its docstring for when to regenerate)."""

from __future__ import annotations

import pytest
import torch

from tests.bit_identity import FIXTURE, MODELS, SAMPLERS, compute


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


def test_bit_identical(stored, now):
    keys = set(stored)
    if "fid/mu" not in now:  # no Inception weights here: the FID statistic is not recomputed
        keys -= {k for k in keys if k.startswith("fid/")}
    assert keys <= set(now), f"missing: {sorted(keys - set(now))}"
    changed = [k for k in sorted(keys) if k != "fid/frechet" and not torch.equal(stored[k], now[k])]
    assert not changed, f"no longer bit-identical: {changed}"
    if "fid/frechet" in keys:
        # its inputs (μ exactly, Σ by SHA-256) are bit-identical above; the distance itself goes through a
        # multithreaded BLAS (matrix square root), whose last bits depend on the number of threads
        torch.testing.assert_close(now["fid/frechet"], stored["fid/frechet"], rtol=1e-6, atol=0)
