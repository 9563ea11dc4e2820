"""``diffsamp nll`` through click's CliRunner on a tiny random UNet and a folder of 8×8 images."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from click.testing import CliRunner

from diffsamp.cli import main
from diffsamp.images import save_png


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        save_png(torch.randint(0, 256, (1, 8, 8), generator=g, dtype=torch.uint8), folder / f"{i}.png")
    return folder


def test_nll_elbo_writes_terms_plot_and_config(tiny_model_dir, image_folder, tmp_path, one_thread):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["nll", "--model", str(tiny_model_dir), "--dataset", str(image_folder), "--num", "4",
                                    "--steps", "6", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "ELBO (strided K = 6" in res.output and "bits/dim over 64 dims" in res.output
    rows = list(csv.DictReader((out / "terms.csv").open()))
    assert [r["term"] for r in rows] == ["L_0", "L_1", "L_2", "L_3", "L_4", "L_5", "L_T"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["results"]["num"] == 4 and cfg["x0_clipping"] is False
    parts = cfg["results"]["L_T"] + cfg["results"]["sum_L_t-1"] + cfg["results"]["L_0"]
    assert parts == pytest.approx(cfg["results"]["bits_per_dim"])
    assert (out / "terms.png").stat().st_size > 1000
    assert len(list(csv.DictReader((out / "per_image.csv").open()))) == 4


def test_nll_ode_and_one_line_errors(tiny_model_dir, image_folder, tmp_path, one_thread):
    res = CliRunner().invoke(main, ["nll", "--model", str(tiny_model_dir), "--dataset", str(image_folder), "--num", "2",
                                    "--method", "ode", "--rtol", "1e-2", "--atol", "1e-2", "--out", str(tmp_path / "o"),
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    assert "ODE (RK45" in res.output
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["results"]["nfe_per_batch"] > 0 and cfg["method"] == "ode"
    bad = CliRunner().invoke(main, ["nll", "--model", "mnist-rf", "--dataset", str(image_folder), "--num", "2", "--quiet"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    noisy = CliRunner().invoke(main, ["nll", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "nope"), "--quiet"])
    assert noisy.exit_code != 0 and noisy.output.startswith("Error:")
