"""Sampler knobs: defaults written once (the signature), typed parsing, and ``--knob`` on the command line."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from click.testing import CliRunner

from diffsamp.cli import main
from diffsamp.samplers import available_samplers, get_sampler

pytestmark = pytest.mark.usefixtures("one_thread")


def test_knob_defaults_come_from_the_signature():
    for name in available_samplers():
        spec = get_sampler(name)
        sig = inspect.signature(spec.fn).parameters
        for knob, (_, default) in spec.knob_specs().items():
            assert default == spec.defaults.get(knob, sig[knob].default), (name, knob)
    assert get_sampler("dpm2").knob_specs()["r"][1] == 0.5 and get_sampler("ddim").knob_specs()["eta"][1] == 0.0


@pytest.mark.parametrize("sampler, knob, text, value", [
    ("dpm2", "r", "0.3", 0.3), ("dpmpp", "order", "3", 3), ("heun", "final_denoise", "true", True),
    ("ddpm", "variance", "beta", "beta"), ("rk45", "time", "none", None), ("rk45", "time", "rf", "rf"),
])
def test_parse_knob_types(sampler, knob, text, value):
    assert get_sampler(sampler).parse_knob(knob, text) == value


@pytest.mark.parametrize("sampler, knob, text, match", [
    ("dpm2", "rr", "1", "no knob 'rr'.*r: float = 0.5"), ("dpm2", "r", "half", "is float"),
    ("dpmpp", "order", "2.5", "is int"), ("ddpm", "variance", "big", "one of posterior, beta"),
    ("heun", "final_denoise", "maybe", "bool"),
])
def test_parse_knob_errors(sampler, knob, text, match):
    with pytest.raises(ValueError, match=match):
        get_sampler(sampler).parse_knob(knob, text)


def test_samplers_name_lists_knobs_with_types_and_defaults():
    res = CliRunner().invoke(main, ["samplers", "dpm2"])
    assert res.exit_code == 0, res.output
    assert "r: float = 0.5" in res.output and "final_denoise: bool = False" in res.output


def test_sample_knob_reaches_the_sampler(tiny_model_dir, tmp_path):
    outs = {}
    for r in ("0.5", "1.0"):
        out = tmp_path / f"g{r}.png"
        res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir), "--sampler", "dpm2", "--steps", "2",
                                        "--seeds", "0-1", "--knob", f"r={r}", "--out", str(out)])
        assert res.exit_code == 0, res.output
        outs[r] = out.read_bytes()
    assert outs["0.5"] != outs["1.0"]


@pytest.mark.parametrize("knob, match", [("rr=1", "no knob 'rr'"), ("r=half", "is float"), ("r", "NAME=VALUE")])
def test_sample_bad_knob_is_a_one_line_error_listing_the_knobs(tiny_model_dir, tmp_path, knob, match):
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir), "--sampler", "dpm2", "--knob", knob,
                                    "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and match in res.output and res.output.count("r: float = 0.5") == 1


def test_reflow_pairs_knob(tmp_path):
    from diffsamp.models.networks import MLPVelocity
    from diffsamp.models.rectified_flow import RFDenoiser, save_rf

    torch.manual_seed(0)
    save_rf(RFDenoiser(MLPVelocity(2, 8, 1), time_scale=1.0), tmp_path / "m.safetensors")
    res = CliRunner().invoke(main, ["reflow", "pairs", "--model", str(tmp_path / "m.safetensors"), "--sampler", "dpmpp",
                                    "--knob", "order=3", "--steps", "4", "--num", "4", "--out", str(tmp_path / "p"),
                                    "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["knobs"] == {"order": 3}
    res = CliRunner().invoke(main, ["reflow", "pairs", "--model", str(tmp_path / "m.safetensors"), "--knob", "order=3",
                                    "--num", "4", "--out", str(tmp_path / "q"), "--device", "cpu"])
    assert res.exit_code == 2 and "no knob 'order'" in res.output
