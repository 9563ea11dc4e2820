"""`diffsamp sample` and `diffsamp models`: seed parsing, grids and per-seed files, errors, a real subprocess, Ctrl-C,
--skip-existing, output formats, the progress bar and the settings recorded with the images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from diffsamp.cli import main
from diffsamp.cli.sampling import parse_seeds
from tests.conftest import assert_one_line_error, run_sample, subprocess_env


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


def test_ctrl_c_keeps_finished_pngs_exits_130_and_skip_existing_continues(tiny_model_dir, tmp_path):
    for n in (60, 400):  # enough work that the run is still going when the signal lands; more if it was not
        out = tmp_path / f"imgs{n}"
        cmd = [sys.executable, "-m", "diffsamp", "sample", "--model", str(tiny_model_dir), "--sampler", "heun",
               "--steps", "40", "--seeds", f"0-{n - 1}", "--batch-size", "4", "--outdir", str(out), "-q"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        pngs = lambda: sorted(p.name for p in out.glob("*.png") if not p.name.startswith("."))  # noqa: E731
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(pngs()) < 2:
            time.sleep(0.02)
        if proc.poll() is None:
            break
        proc.communicate()  # it finished before the signal could land: again with more work
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    kept = pngs()
    assert proc.returncode == 130, f"{len(kept)} PNGs; stdout {stdout!r}; stderr {err!r}"
    assert "Traceback" not in err and 2 <= len(kept) < n
    assert f"{len(kept)} of {n} PNGs written" in err and "--skip-existing" in err
    assert all(Image.open(out / name).size == (8, 8) for name in kept)  # complete files only
    done = subprocess.run(cmd + ["--skip-existing"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{n - len(kept)} PNGs, {len(kept)} already there" in done.stdout
    assert len(pngs()) == n and not [p for p in out.iterdir() if p.name.startswith(".")] and json.loads((out / "config.json").read_text())["seeds"] == f"0-{n - 1}"


def test_skip_existing_refuses_a_folder_of_other_settings(tiny_model_dir, tmp_path):
    out = str(tmp_path / "imgs")
    assert run_sample(tiny_model_dir, "--outdir", out, "--sampler", "euler", "-q").exit_code == 0
    (tmp_path / "imgs" / "000001.png").unlink()
    res = run_sample(tiny_model_dir, "--outdir", out, "--sampler", "heun", "-q", "--skip-existing")
    assert res.exit_code == 1 and "other settings" in res.output and "sampler" in res.output
    res = run_sample(tiny_model_dir, "--outdir", out, "--sampler", "euler", "-q", "--skip-existing")
    assert res.exit_code == 0 and "1 PNGs, 3 already there" in res.output
    assert "--skip-existing continues an --outdir run" in run_sample(tiny_model_dir, "--out", "g.png", "--skip-existing").output


def test_bad_destination_device_and_seeds_are_one_line_errors(tiny_model_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run_sample(tiny_model_dir, "--out", str(tmp_path / "afile" / "a.png")), 2, "afile is a file")
    assert_one_line_error(run_sample(tiny_model_dir, "--outdir", str(tmp_path / "afile" / "sub")), 2, "afile is a file")
    assert_one_line_error(run_sample(tiny_model_dir, "--device", "tpu", "--out", str(tmp_path / "a.png")), 2, "tpu")
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir), "--seeds", "abc", "--out", "a.png"])
    assert_one_line_error(res, 2, "'abc'", "not a seed")
    assert "invalid literal" not in res.output
    if not torch.cuda.is_available():
        assert_one_line_error(run_sample(tiny_model_dir, "--device", "cuda", "--out", str(tmp_path / "a.png")), 2, "CUDA")
    assert not list(tmp_path.glob("*.png"))


def test_bad_destination_fails_before_sampling_as_a_process(tiny_model_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "diffsamp", "sample", "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "afile" / "a.png")], capture_output=True, text=True, env=subprocess_env(),
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "afile is a file, not a folder" in proc.stderr and "NFE" not in proc.stdout


def test_out_writes_the_format_its_extension_names_and_refuses_others(tiny_model_dir, tmp_path):
    for name, fmt in (("g.jpg", "JPEG"), ("g.webp", "WEBP"), ("g.png", "PNG")):
        assert run_sample(tiny_model_dir, "--out", str(tmp_path / name), "-q").exit_code == 0
        assert Image.open(tmp_path / name).format == fmt
    for bad in ("noext", "g.txt"):
        assert_one_line_error(run_sample(tiny_model_dir, "--out", str(tmp_path / bad)), 2, "ending in", ".png")
        assert not (tmp_path / bad).exists()
    help_text = CliRunner().invoke(main, ["sample", "--help"]).output
    assert "Missing output folders are created" in help_text


def test_rk45_reports_its_adaptive_nfe_and_tolerance_not_steps(tiny_model_dir, tmp_path):
    res = run_sample(tiny_model_dir, "--sampler", "rk45", "--knob", "rtol=1e-2", "--knob", "atol=1e-2", "--out",
                 str(tmp_path / "g.png"), "-q")
    assert res.exit_code == 0, res.output
    assert "rk45/karras, adaptive (rtol 0.01, atol 0.01): NFE " in res.output and "steps" not in res.output


def test_sample_shows_a_progress_bar_unless_quiet(tiny_model_dir, tmp_path):
    res = run_sample(tiny_model_dir, "--sampler", "heun", "--out", str(tmp_path / "g.png"))
    assert res.exit_code == 0 and "sampling:" in res.stderr and "/3 [" in res.stderr and "NFE/s" in res.stderr, res.stderr
    res = run_sample(tiny_model_dir, "--sampler", "heun", "--out", str(tmp_path / "g.png"), "--quiet")
    assert res.exit_code == 0 and res.stderr == ""


def test_grid_text_chunk_and_outdir_config_record_the_settings(tiny_model_dir, tmp_path):
    assert run_sample(tiny_model_dir, "--sampler", "dpm2", "--knob", "r=0.3", "--out", str(tmp_path / "g.png"),
                  "-q").exit_code == 0
    meta = json.loads(Image.open(tmp_path / "g.png").text["diffsamp"])
    assert meta["model"] == str(tiny_model_dir) and meta["sampler"] == "dpm2" and meta["knobs"] == {"r": 0.3}
    assert meta["schedule"] == "karras" and meta["steps"] == 2 and meta["nfe"] == 3 and meta["seeds"] == "0-3"
    assert len(meta["sigma_grid"]) == 3 and {"diffsamp", "torch", "diffusers"} <= set(meta["versions"])
    assert run_sample(tiny_model_dir, "--outdir", str(tmp_path / "d"), "--seeds", "0-2,7", "-q").exit_code == 0
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["seeds"] == "0-2,7" and cfg["sampler"] == "heun" and cfg["nfe"] == 3 and cfg["dtype"] == "float32"
