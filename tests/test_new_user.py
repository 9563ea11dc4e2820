"""What a new user hits first: file modes, Ctrl-C, one-line errors, output formats, metadata, progress, FID at
small N, the Hub offline, and warnings for settings known to fail."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import diffsamp
from diffsamp.cli import fid as fid_cli
from diffsamp.cli import main
from tests.fid_fakes import tiny_extractor, write_idx

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def sample(model: Path, *args: str):
    return CliRunner().invoke(main, ["sample", "--model", str(model), "--steps", "2", "--seeds", "0-3", *args])


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def tiny_net(monkeypatch):
    ext = tiny_extractor()
    monkeypatch.setattr(fid_cli, "_extractor", lambda *args: ext)
    return ext


# --------------------------------------------------------------------------------------- 1. file modes
def test_every_file_the_commands_write_gets_the_umask_mode(tiny_model_dir, tmp_path, umask022, tiny_net, monkeypatch):
    """Grid PNGs, per-seed PNGs and config.json, `fid ref` .npz files and the reference statistics cache."""
    assert sample(tiny_model_dir, "--out", str(tmp_path / "grid.png"), "-q").exit_code == 0
    assert sample(tiny_model_dir, "--outdir", str(tmp_path / "imgs"), "-q").exit_code == 0
    res = CliRunner().invoke(main, ["fid", "ref", str(tmp_path / "imgs"), "--out", str(tmp_path / "ref.npz"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    write_idx(tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz",
              np.random.default_rng(0).integers(0, 256, (4, 28, 28)))
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["fid", "ref", "--dataset", "mnist", "--split", "test", "--data-dir",
                                    str(tmp_path / "data"), "--out", str(tmp_path / "mnist.npz"), "--no-progress"])
    assert res.exit_code == 0, res.output
    files = [tmp_path / "grid.png", *sorted((tmp_path / "imgs").iterdir()), tmp_path / "ref.npz",
             tmp_path / "mnist.npz", *sorted((tmp_path / "cache" / "fid-stats").iterdir())]
    assert len(files) == 9 and (tmp_path / "imgs" / "config.json") in files
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(0o644) for p in files}


# --------------------------------------------------------------------------------------- 2. Ctrl-C
def test_ctrl_c_keeps_finished_pngs_exits_130_and_skip_existing_continues(tiny_model_dir, tmp_path):
    out = tmp_path / "imgs"
    cmd = [sys.executable, "-m", "diffsamp", "sample", "--model", str(tiny_model_dir), "--sampler", "heun",
           "--steps", "20", "--seeds", "0-39", "--batch-size", "2", "--outdir", str(out), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    pngs = lambda: sorted(p.name for p in out.glob("*.png") if not p.name.startswith("."))  # noqa: E731 - not temporaries
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(pngs()) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    kept = pngs()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and 2 <= len(kept) < 40
    assert f"{len(kept)} of 40 PNGs written" in err and "--skip-existing" in err
    assert all(Image.open(out / name).size == (8, 8) for name in kept)  # complete files only
    done = subprocess.run(cmd + ["--skip-existing"], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{40 - len(kept)} PNGs, {len(kept)} already there" in done.stdout
    assert len(pngs()) == 40 and not [p for p in out.iterdir() if p.name.startswith(".")] and json.loads((out / "config.json").read_text())["seeds"] == "0-39"


def test_skip_existing_refuses_a_folder_of_other_settings(tiny_model_dir, tmp_path):
    out = str(tmp_path / "imgs")
    assert sample(tiny_model_dir, "--outdir", out, "--sampler", "euler", "-q").exit_code == 0
    (tmp_path / "imgs" / "000001.png").unlink()
    res = sample(tiny_model_dir, "--outdir", out, "--sampler", "heun", "-q", "--skip-existing")
    assert res.exit_code == 1 and "other settings" in res.output and "sampler" in res.output
    res = sample(tiny_model_dir, "--outdir", out, "--sampler", "euler", "-q", "--skip-existing")
    assert res.exit_code == 0 and "1 PNGs, 3 already there" in res.output
    assert "--skip-existing continues an --outdir run" in sample(tiny_model_dir, "--out", "g.png", "--skip-existing").output


# --------------------------------------------------------------------------------------- 3. one-line errors
def _one_line_error(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), res.output


def test_bad_destination_device_and_seeds_are_one_line_errors(tiny_model_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_line_error(sample(tiny_model_dir, "--out", str(tmp_path / "afile" / "a.png")), 2, "afile is a file")
    _one_line_error(sample(tiny_model_dir, "--outdir", str(tmp_path / "afile" / "sub")), 2, "afile is a file")
    _one_line_error(sample(tiny_model_dir, "--device", "tpu", "--out", str(tmp_path / "a.png")), 2, "tpu")
    res = CliRunner().invoke(main, ["sample", "--model", str(tiny_model_dir), "--seeds", "abc", "--out", "a.png"])
    _one_line_error(res, 2, "'abc'", "not a seed")
    assert "invalid literal" not in res.output
    if not torch.cuda.is_available():
        _one_line_error(sample(tiny_model_dir, "--device", "cuda", "--out", str(tmp_path / "a.png")), 2, "CUDA")
    assert not list(tmp_path.glob("*.png"))


def test_bad_destination_fails_before_sampling_as_a_process(tiny_model_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "diffsamp", "sample", "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "afile" / "a.png")], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "afile is a file, not a folder" in proc.stderr and "NFE" not in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fid_on_cuda_without_cuda_names_cuda_not_the_weights(tmp_path, tiny_net):
    from diffsamp.metrics.inception import load_extractor

    with pytest.raises(ValueError, match="CUDA is not available"):
        load_extractor(os.environ.get("DIFFSAMP_INCEPTION"), "cuda")
    (tmp_path / "a").mkdir()
    for i in range(3):
        diffsamp.save_images(torch.rand(1, 8, 8) * 2 - 1, tmp_path / "a" / f"{i}.png")
    res = CliRunner().invoke(main, ["fid", "calc", str(tmp_path / "a"), str(tmp_path / "a"), "--device", "cuda"])
    _one_line_error(res, 2, "CUDA is not available")


# --------------------------------------------------------------------------------------- 4. silent surprises
def test_out_writes_the_format_its_extension_names_and_refuses_others(tiny_model_dir, tmp_path):
    for name, fmt in (("g.jpg", "JPEG"), ("g.webp", "WEBP"), ("g.png", "PNG")):
        assert sample(tiny_model_dir, "--out", str(tmp_path / name), "-q").exit_code == 0
        assert Image.open(tmp_path / name).format == fmt
    for bad in ("noext", "g.txt"):
        _one_line_error(sample(tiny_model_dir, "--out", str(tmp_path / bad)), 2, "ending in", ".png")
        assert not (tmp_path / bad).exists()
    help_text = CliRunner().invoke(main, ["sample", "--help"]).output
    assert "Missing output folders are created" in help_text


def test_a_corrupted_cached_reference_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    from diffsamp.metrics.fid import reference_stats

    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 256, (5, 28, 28)))
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    ext = tiny_extractor()
    first = reference_stats("mnist", "test", data_dir=tmp_path, extractor=ext, progress=False)
    (cached,) = (tmp_path / "cache" / "fid-stats").iterdir()
    cached.write_bytes(cached.read_bytes()[:100])  # a truncated file, as a full disk or a crash leaves it
    with pytest.warns(UserWarning, match="unreadable.*computing them again"):
        again = reference_stats("mnist", "test", data_dir=tmp_path, extractor=ext, progress=False)
    np.testing.assert_allclose(again.mu, first.mu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference_stats("mnist", "test", data_dir=tmp_path, extractor=ext, progress=False)  # the cache works again


# --------------------------------------------------------------------------------------- 5. FID at small N
def test_fid_below_the_feature_dimension_warns_in_our_words():
    from scipy.linalg import LinAlgWarning

    from diffsamp.metrics.fid import compute_stats, fid_from_stats

    ext = tiny_extractor(dims=16)
    g = torch.Generator().manual_seed(0)
    a = compute_stats(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=g), extractor=ext, progress=False)
    b = compute_stats(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=g), extractor=ext, progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fid = fid_from_stats(a, b)
    texts = [str(w.message) for w in seen]
    assert any("FID from 5 images with 16-dimensional features" in t and "biased" in t for t in texts), texts
    assert not any(issubclass(w.category, LinAlgWarning) for w in seen) and np.isfinite(fid)


def test_round_off_negatives_print_as_zero(tmp_path, monkeypatch):
    from diffsamp.metrics import fid as fid_mod
    from diffsamp.metrics.stats import FIDStats, save_stats

    feats = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    save_stats(FIDStats(feats.mean(0), np.cov(feats, rowvar=False), {"num_images": 12}, feats), tmp_path / "s.npz")
    monkeypatch.setattr(fid_mod, "fid_from_stats", lambda a, b, check=True: -1.2e-4)  # what round-off gives
    monkeypatch.setattr(fid_mod, "kid_from_stats", lambda a, b, **kw: (-3e-6, 1e-6))
    res = CliRunner().invoke(main, ["fid", "calc", str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "FID: 0.0000 (round-off: -0.00012)" in res.output and "KID: 0.000000 (round-off: -3e-06)" in res.output


# --------------------------------------------------------------------------------------- 6. rk45
def test_rk45_reports_its_adaptive_nfe_and_tolerance_not_steps(tiny_model_dir, tmp_path):
    res = sample(tiny_model_dir, "--sampler", "rk45", "--knob", "rtol=1e-2", "--knob", "atol=1e-2", "--out",
                 str(tmp_path / "g.png"), "-q")
    assert res.exit_code == 0, res.output
    assert "rk45/karras, adaptive (rtol 0.01, atol 0.01): NFE " in res.output and "steps" not in res.output


# --------------------------------------------------------------------------------------- expectations
def test_sample_shows_a_progress_bar_unless_quiet(tiny_model_dir, tmp_path):
    res = sample(tiny_model_dir, "--sampler", "heun", "--out", str(tmp_path / "g.png"))
    assert res.exit_code == 0 and "sampling:" in res.stderr and "/3 [" in res.stderr and "NFE/s" in res.stderr, res.stderr
    res = sample(tiny_model_dir, "--sampler", "heun", "--out", str(tmp_path / "g.png"), "--quiet")
    assert res.exit_code == 0 and res.stderr == ""


def test_grid_text_chunk_and_outdir_config_record_the_settings(tiny_model_dir, tmp_path):
    assert sample(tiny_model_dir, "--sampler", "dpm2", "--knob", "r=0.3", "--out", str(tmp_path / "g.png"),
                  "-q").exit_code == 0
    meta = json.loads(Image.open(tmp_path / "g.png").text["diffsamp"])
    assert meta["model"] == str(tiny_model_dir) and meta["sampler"] == "dpm2" and meta["knobs"] == {"r": 0.3}
    assert meta["schedule"] == "karras" and meta["steps"] == 2 and meta["nfe"] == 3 and meta["seeds"] == "0-3"
    assert len(meta["sigma_grid"]) == 3 and {"diffsamp", "torch", "diffusers"} <= set(meta["versions"])
    assert sample(tiny_model_dir, "--outdir", str(tmp_path / "d"), "--seeds", "0-2,7", "-q").exit_code == 0
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["seeds"] == "0-2,7" and cfg["sampler"] == "heun" and cfg["nfe"] == 3 and cfg["dtype"] == "float32"


def test_save_images_and_to_uint8_map_the_data_range(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    assert diffsamp.to_uint8(x).flatten().tolist() == [0, 128, 255]
    diffsamp.save_images(x[0], tmp_path / "one.png")
    assert np.asarray(Image.open(tmp_path / "one.png")).tolist() == [[0, 128, 255]]
    diffsamp.save_images(torch.zeros(4, 1, 5, 5), tmp_path / "grid.jpg", nrow=2)
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG" and Image.open(tmp_path / "grid.jpg").size == (16, 16)
    with pytest.raises(ValueError, match="ending in"):
        diffsamp.save_images(x, tmp_path / "bad.txt")


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
    res = sample(tiny_model_dir, "--dtype", "bfloat16", "--out", str(tmp_path / "g.png"), "-q")
    assert res.exit_code == 0 and res.stderr.count("warning: bfloat16 weights on the CPU") == 1, res.stderr
    res = sample(tiny_model_dir, "--sampler", "euler_maruyama", "--steps", "10", "--out", str(tmp_path / "g.png"), "-q")
    assert res.stderr.startswith("warning: euler_maruyama at 10 steps") and res.stderr.count("\n") == 1
    doc = CliRunner().invoke(main, ["samplers", "pc"]).output
    assert "unstable when σ_next/σ < 0.5" in doc and "heun" in doc
