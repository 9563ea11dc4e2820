"""Atomic writes (``diffsamp.io``): complete or absent, and with the file mode a plain ``open`` gives, for every
file the commands write."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from diffsamp import io
from diffsamp.cli import main
from diffsamp.images import save_png
from diffsamp.metrics.stats import FIDStats, save_stats
from tests.conftest import file_mode, run_sample, write_idx


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask022):
    """Regression: mkstemp's 0600 leaked into every atomically written file (cards, stats, PNGs, weights)."""
    paths = [
        io.write_text(tmp_path / "a.txt", "x"),
        io.write_json(tmp_path / "a.json", {"a": 1}),
        io.save_safetensors({"t": torch.zeros(2)}, tmp_path / "a.safetensors"),
        io.save_npz(tmp_path / "a.npz", x=np.zeros(2)),
        save_png(torch.zeros(1, 4, 4, dtype=torch.uint8), tmp_path / "a.png"),
        save_stats(FIDStats(np.zeros(2), np.eye(2), {}), tmp_path / "s.npz"),
    ]
    assert {p.name: file_mode(p) for p in paths} == {p.name: 0o644 for p in paths}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = io.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_state_file_round_trip(tmp_path):
    io.save_state_file(tmp_path / "c.safetensors", {"w": torch.arange(3.0)}, {"step": 7})
    tensors, state = io.read_state_file(tmp_path / "c.safetensors")
    assert torch.equal(tensors["w"], torch.arange(3.0)) and state == {"step": 7}
    io.save_safetensors({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a diffsamp training checkpoint"):
        io.read_state_file(tmp_path / "plain.safetensors")


def test_every_file_the_commands_write_gets_the_umask_mode(tiny_model_dir, tmp_path, umask022, tiny_net, monkeypatch,
                                                           one_thread):
    """Grid PNGs, per-seed PNGs and config.json, `fid ref` .npz files and the reference statistics cache."""
    assert run_sample(tiny_model_dir, "--out", str(tmp_path / "grid.png"), "-q").exit_code == 0
    assert run_sample(tiny_model_dir, "--outdir", str(tmp_path / "imgs"), "-q").exit_code == 0
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
    assert {p.name: oct(file_mode(p)) for p in files} == {p.name: oct(0o644) for p in files}


def test_exported_diffusers_models_get_the_umask_mode(tmp_path, umask022):
    """diffusers' save_pretrained writes its weights through mkstemp (0o600); an exported model is readable."""
    from diffsamp.models.diffusers_unet import save_diffusers
    from diffsamp.models.networks import make_unet

    save_diffusers(make_unet(channels=(8, 16), sample_size=8), tmp_path / "m")
    files = sorted(p for p in (tmp_path / "m").rglob("*") if p.is_file())
    assert len(files) >= 4
    assert {p.name: oct(file_mode(p)) for p in files} == {p.name: oct(0o644) for p in files}
