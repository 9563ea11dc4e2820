"""`diffsamp sample` and `diffsamp models`: seed parsing, grids and per-seed files, errors, a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from diffsamp.cli import main
from diffsamp.cli.sampling import parse_seeds


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_model(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.mark.parametrize(
    "text, seeds",
    [("0-3", [0, 1, 2, 3]), ("1,5,9", [1, 5, 9]), ("0-3,10", [0, 1, 2, 3, 10]), ("7", [7]), (" 2 - 3 ", [2, 3]),
     ("10-10", [10])],
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("bad", ["", "a", "3-1", "1,,2", "1,1", "-1", "0-2,2"])
def test_parse_seeds_rejects(bad):
    with pytest.raises(ValueError):
        parse_seeds(bad)


def test_sample_grid_and_outdir(tiny_model, tmp_path):
    grid = tmp_path / "grid.png"
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model), "--sampler", "euler", "--steps", "3",
                                    "--seeds", "0-5", "--out", str(grid), "--nrow", "3"])
    assert res.exit_code == 0, res.output
    assert "NFE 3" in res.output and " s (" in res.output
    img = Image.open(grid)
    assert img.size == (3 * 10 + 2, 2 * 10 + 2)  # 3 per row, 8 px + 2 px padding each
    outdir = tmp_path / "imgs"
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model), "--sampler", "heun", "--steps", "2",
                                    "--seeds", "3,12", "--outdir", str(outdir), "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    assert "NFE 3" in res.output  # heun with a final step to 0: 2·2 − 1
    assert sorted(p.name for p in outdir.iterdir()) == ["000003.png", "000012.png", "config.json"]
    # image i depends only on its seed: seed 3 alone at another batch size gives the same PNG
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model), "--sampler", "heun", "--steps", "2",
                                    "--seeds", "3", "--outdir", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "one" / "000003.png").read_bytes() == (outdir / "000003.png").read_bytes()


def test_sample_usage_errors(tiny_model, tmp_path):
    run = CliRunner().invoke
    r = run(main, ["sample", "--model", str(tiny_model), "--seeds", "0-1"])
    assert r.exit_code != 0 and "give --out" in r.output
    r = run(main, ["sample", "--model", str(tiny_model), "--out", "a.png", "--outdir", str(tmp_path)])
    assert r.exit_code != 0 and "not both" in r.output
    r = run(main, ["sample", "--model", "no-such-model", "--out", str(tmp_path / "a.png")])
    assert r.exit_code != 0 and "not in the zoo" in r.output
    r = run(main, ["sample", "--model", str(tiny_model), "--seeds", "5-1", "--out", str(tmp_path / "a.png")])
    assert r.exit_code != 0 and "--seeds" in r.output
    r = run(main, ["sample", "--model", str(tiny_model), "--sampler", "nope", "--out", str(tmp_path / "a.png")])
    assert r.exit_code != 0


def test_models_lists_the_zoo():
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0, r.output
    assert "mnist-ddpm" in r.output and "fashion-mnist-ddpm" in r.output and "M params" in r.output
    ddpm_line = next(line for line in r.output.splitlines() if line.startswith("mnist-ddpm "))
    assert "training steps" in ddpm_line and "FID" in ddpm_line and "data floor" in ddpm_line  # from its card


def test_sample_subprocess_end_to_end(tmp_path):
    """The newcomer's first command, as a real process, offline, with the shipped model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "grid.png"
    proc = subprocess.run(
        [sys.executable, "-m", "diffsamp", "sample", "--model", "mnist-ddpm", "--sampler", "heun", "--steps", "4",
         "--seeds", "0-3", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "NFE 7" in proc.stdout
    assert Image.open(out).size == (2 * 34 + 2, 2 * 34 + 2)


def test_clip_denoised_and_bfloat16(tiny_model, tmp_path):
    for extra in (["--clip-denoised"], ["--dtype", "bfloat16"]):
        r = CliRunner().invoke(main, ["sample", "--model", str(tiny_model), "--sampler", "euler", "--steps", "2",
                                      "--seeds", "0-1", "--out", str(tmp_path / "g.png"), *extra])
        assert r.exit_code == 0, r.output
        assert "NFE 2" in r.output


def test_sample_picks_the_models_grid(tiny_model, tmp_path):
    """No --schedule: karras for a diffusion UNet, rf (uniform RF time) for a rectified flow."""
    from diffsamp.models.rectified_flow import RFDenoiser, save_rf
    from tests.conftest import tiny_unet

    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model), "--sampler", "euler", "--steps", "2",
                                    "--seeds", "0-1", "--out", str(tmp_path / "a.png")])
    assert res.exit_code == 0, res.output
    assert "with euler/karras," in res.output
    save_rf(RFDenoiser(tiny_unet(8), time_scale=999.0), tmp_path / "flow.safetensors")
    res = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "flow.safetensors"), "--sampler", "euler",
                                    "--steps", "2", "--seeds", "0-1", "--out", str(tmp_path / "b.png")])
    assert res.exit_code == 0, res.output
    assert "with euler/rf," in res.output and "NFE 2" in res.output


