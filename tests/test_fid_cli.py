"""``diffsamp fid``: ref/calc through CliRunner with a tiny stand-in network, and one real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import diffsamp
from diffsamp.cli import main
from diffsamp.images import save_image_folder, save_png
from diffsamp.metrics.stats import load_stats
from tests.conftest import assert_one_line_error, write_idx


def _folder(path: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    save_image_folder(torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g), path)
    return path


def run(*args: str):
    return CliRunner().invoke(main, ["fid", *args, "--no-progress"] if args[0] != "download" else ["fid", *args])


def test_ref_folder_then_calc_against_it(tmp_path, tiny_net):
    a, b = _folder(tmp_path / "a", 12), _folder(tmp_path / "b", 10, seed=1)
    res = run("ref", str(a), "--out", str(tmp_path / "a.npz"), "--padding", "2")
    assert res.exit_code == 0, res.output
    assert "12 images, 32×32, padding 2" in res.output
    stats = load_stats(tmp_path / "a.npz")
    assert stats.meta["padding"] == 2 and stats.features.shape == (12, 8)

    res = run("calc", str(a), str(tmp_path / "a.npz"))
    assert res.exit_code == 0, res.output
    assert "12 images" in res.output and float(res.output.split("FID:")[1].split()[0]) == pytest.approx(0, abs=1e-4)

    res = run("calc", str(a), str(b), "--kid-subsets", "5")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("A:") and "12 images" in lines[0] and "10 images" in lines[1]
    assert float(lines[2].split()[1]) > 0 and lines[3].startswith("KID:") and "±" in lines[3] and "5 subsets of 10" in lines[3]


def test_ref_dataset_pads_and_calc_stats_need_no_network(tmp_path, tiny_net, monkeypatch):
    rng = np.random.default_rng(0)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(tmp_path / "data" / "mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (9, 28, 28)))
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        res = run("ref", "--dataset", "mnist", "--split", split, "--data-dir", str(tmp_path / "data"),
                  "--num", "8", "--out", str(tmp_path / f"{split}.npz"))
        assert res.exit_code == 0, res.output
        assert "8 images, 32×32, padding 2" in res.output
    tiny_net.clear()
    res = run("calc", str(tmp_path / "train.npz"), str(tmp_path / "test.npz"), "--kid-subsets", "3")
    assert res.exit_code == 0, res.output
    assert tiny_net == [] and "FID:" in res.output and "KID:" in res.output
    assert load_stats(tmp_path / "test.npz").meta["source"] == "mnist:test[:8]"

    res = run("ref", "--dataset", "mnist", "--split", "test", "--data-dir", str(tmp_path / "data"),
              "--num", "8", "--no-features", "--out", str(tmp_path / "nofeat.npz"))
    assert res.exit_code == 0 and load_stats(tmp_path / "nofeat.npz").features is None
    res = run("calc", str(tmp_path / "train.npz"), str(tmp_path / "nofeat.npz"))
    assert res.exit_code == 0 and "KID: n/a" in res.output
    res = run("ref", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--pad-to", "16",
              "--out", str(tmp_path / "bad.npz"))
    assert res.exit_code == 1 and "cannot pad 28×28 images to 16×16" in res.output and not (tmp_path / "bad.npz").exists()


def test_calc_refuses_mismatched_size_before_computing(tmp_path, tiny_net, monkeypatch):
    rng = np.random.default_rng(1)
    write_idx(tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (6, 28, 28)))
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    assert run("ref", "--dataset", "mnist", "--split", "test", "--data-dir", str(tmp_path / "data"),
               "--out", str(tmp_path / "ref.npz")).exit_code == 0
    small = _folder(tmp_path / "small", 6, size=28)
    tiny_net.clear()
    res = run("calc", str(small), str(tmp_path / "ref.npz"))
    assert res.exit_code == 1 and "preprocessed differently" in res.output and "size: 28×28 vs 32×32" in res.output
    assert tiny_net == [] and "Traceback" not in res.output
    res = run("calc", str(small), str(tmp_path / "ref.npz"), "--allow-mismatch")
    assert res.exit_code == 0 and "FID:" in res.output


@pytest.mark.parametrize("make,message", [
    (lambda p: p.mkdir(), "empty"),
    (lambda p: (p.mkdir(), (p / "x.txt").write_text("x")), "no images"),
    (lambda p: (_folder(p, 2), save_png(torch.zeros(1, 16, 16, dtype=torch.uint8), p / "z.png")), "different sizes"),
    (lambda p: (_folder(p, 2), (p / "bad.png").write_bytes(b"nope")), "not a readable image"),
])
def test_bad_folders_give_clear_errors_and_write_nothing(tmp_path, tiny_net, make, message):
    folder = tmp_path / "imgs"
    make(folder)
    out = tmp_path / "out.npz"
    res = run("ref", str(folder), "--out", str(out))
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_usage_errors(tmp_path, tiny_net):
    folder = _folder(tmp_path / "a", 3)
    res = run("ref", "--out", str(tmp_path / "x.npz"))
    assert res.exit_code == 2 and "either a FOLDER" in res.output
    res = run("ref", str(folder), "--dataset", "mnist", "--out", str(tmp_path / "x.npz"))
    assert res.exit_code == 2 and "either a FOLDER" in res.output
    res = run("ref", str(folder), "--out", str(tmp_path / "x.txt"))
    assert res.exit_code == 2 and "must end in .npz" in res.output
    res = run("calc", str(folder), str(tmp_path / "missing.npz"))
    assert res.exit_code == 2 and "no such folder or file" in res.output
    (tmp_path / "junk.npz").write_bytes(b"junk")
    res = run("calc", str(folder), str(tmp_path / "junk.npz"))
    assert res.exit_code == 2 and "not a readable .npz" in res.output
    res = run("download", "--url", (tmp_path / "missing.pt").as_uri(), "--to", str(tmp_path / "w.pt"))
    assert res.exit_code == 1 and "download failed" in res.output and "DIFFSAMP_INCEPTION" in res.output


def test_missing_weights_subprocess_says_how_to_provide_them(tmp_path):
    folder = _folder(tmp_path / "a", 2)
    env = {k: v for k, v in os.environ.items() if k != "DIFFSAMP_INCEPTION"}
    env["DIFFSAMP_CACHE"] = str(tmp_path / "empty-cache")
    proc = subprocess.run([sys.executable, "-m", "diffsamp", "fid", "ref", str(folder), "--out", str(tmp_path / "s.npz")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Provide the FID Inception weights" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fid_on_cuda_without_cuda_names_cuda_not_the_weights(tmp_path, tiny_net):
    from diffsamp.metrics.inception import load_extractor

    with pytest.raises(ValueError, match="CUDA is not available"):
        load_extractor(os.environ.get("DIFFSAMP_INCEPTION"), "cuda")
    (tmp_path / "a").mkdir()
    for i in range(3):
        diffsamp.save_images(torch.rand(1, 8, 8) * 2 - 1, tmp_path / "a" / f"{i}.png")
    res = CliRunner().invoke(main, ["fid", "calc", str(tmp_path / "a"), str(tmp_path / "a"), "--device", "cuda"])
    assert_one_line_error(res, 2, "CUDA is not available")


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
