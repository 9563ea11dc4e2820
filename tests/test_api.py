"""The sampling core (``diffsamp.api``): what ``generate`` returns and the warnings for settings known to fail."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner

import diffsamp
from diffsamp.cli import main
from tests.conftest import run_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_result_sigma_grid_and_the_deprecated_grid(gaussian):
    out = diffsamp.generate(gaussian, (4,), sampler="euler", steps=3, seeds=[0])
    assert len(out.sigma_grid) == 3
    with pytest.warns(DeprecationWarning, match="sigma_grid"):
        assert out.grid is out.sigma_grid
    assert "[-1, 1]" in diffsamp.GenerateResult.__doc__ and "save_images" in diffsamp.generate.__doc__


def test_settings_known_to_fail_warn_once_with_what_to_use(gaussian, tiny_model_dir, tmp_path):
    from diffsamp.api import setting_warnings

    for name in ("euler_maruyama", "pc"):
        with pytest.warns(UserWarning, match=rf"{name} at 10 steps .* unstable .* Use \d+\+ steps of this schedule"):
            diffsamp.generate(gaussian, (4,), sampler=name, steps=10, seeds=[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffsamp.generate(gaussian, (4,), sampler="euler_maruyama", steps=200, seeds=[0])
        diffsamp.generate(gaussian, (4,), sampler="heun", steps=10, seeds=[0])
    grid = diffsamp.make_grid(gaussian, "heun", steps=4)
    assert setting_warnings(diffsamp.get_sampler("heun"), grid, dtype=torch.float32, device="cpu") == []
    (text,) = setting_warnings(diffsamp.get_sampler("heun"), grid, dtype=torch.bfloat16, device="cpu")
    assert "bfloat16" in text and "float32" in text
    res = run_sample(tiny_model_dir, "--dtype", "bfloat16", "--out", str(tmp_path / "g.png"), "-q")
    assert res.exit_code == 0 and res.stderr.count("warning: bfloat16 weights on the CPU") == 1, res.stderr
    res = run_sample(tiny_model_dir, "--sampler", "euler_maruyama", "--steps", "10", "--out", str(tmp_path / "g.png"), "-q")
    assert res.stderr.startswith("warning: euler_maruyama at 10 steps") and res.stderr.count("\n") == 1
    doc = CliRunner().invoke(main, ["samplers", "pc"]).output
    assert "unstable when σ_next/σ < 0.5" in doc and "heun" in doc


def test_integrate_counts_on_a_counter_it_is_given_and_reports_only_this_run(gaussian):
    """``generate`` hands ``integrate`` its own checking counter (one wrapper per call, rows counted there): the NFE
    returned is this run's, not the counter's total, and the counter's rows grow by calls × batch."""
    from diffsamp.api import integrate
    from diffsamp.models.base import CountingDenoiser

    grid = diffsamp.get_schedule("karras", model=gaussian).grid(4)
    counter = CountingDenoiser(gaussian, check=True)
    counter(torch.zeros(3, 4), torch.ones(3))  # an earlier call on the same counter
    x, nfe = integrate(counter, torch.zeros(3, 4), sampler="heun", grid=grid)
    assert nfe == diffsamp.get_sampler("heun").expected_nfe(grid) == counter.calls - 1
    assert counter.rows == 3 * counter.calls
    plain, nfe_plain = integrate(gaussian, torch.zeros(3, 4), sampler="heun", grid=grid)
    assert nfe_plain == nfe and torch.equal(plain, x)
