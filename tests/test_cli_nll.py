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


def test_nll_reads_the_data_set_the_model_was_trained_on(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    res = CliRunner().invoke(main, ["nll", "--model", str(tiny_model_dir), "--num", "2", "--quiet"])
    assert res.exit_code != 0 and "--dataset" in res.output and "Traceback" not in res.output
    named = tmp_path / "fashion"
    shutil.copytree(tiny_model_dir, named)
    (named / "card.json").write_text(json.dumps({"dataset": "fashion-mnist"}))
    monkeypatch.setenv("DIFFSAMP_DATA", str(tmp_path / "empty"))
    res = CliRunner().invoke(main, ["nll", "--model", str(named), "--num", "2", "--quiet"])
    assert res.exit_code != 0 and "fashion" in res.output.lower() and "Traceback" not in res.output, res.output


def test_the_printed_standard_errors_are_the_per_image_spread_over_root_n(tiny_model_dir, tmp_path, one_thread):
    """bits/dim ± its standard error, over the model's 8×8 = 64 values and over the unpadded 6×6 = 36 pixels (the
    28×28 figure of padded MNIST), and the interior terms' figure: each written out from the per-image values
    (mean; sample std with n − 1, divided by √n), independently of the library."""
    import math

    from diffsamp.data import load_dataset_uint8, pad_images
    from diffsamp.metrics.likelihood import elbo
    from diffsamp.models import load

    folder = tmp_path / "six"
    g = torch.Generator().manual_seed(3)
    for i in range(6):
        save_png(torch.randint(0, 256, (1, 6, 6), generator=g, dtype=torch.uint8), folder / f"{i}.png")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["nll", "--model", str(tiny_model_dir), "--dataset", str(folder), "--num", "6",
                                    "--pad-to", "8", "--steps", "4", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    nats = [float(r["nats"]) for r in csv.DictReader((out / "per_image.csv").open())]
    n = len(nats)

    def mean_se(values):
        m = sum(values) / n
        return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) / math.sqrt(n)

    bpd, se = mean_se([v / (64 * math.log(2)) for v in nats])
    bpd_raw, se_raw = mean_se([v / (36 * math.log(2)) for v in nats])
    results = json.loads((out / "config.json").read_text())["results"]
    assert n == 6 and se > 0 and results["dims"] == 64 and results["unpadded_dims"] == 36
    assert (results["bits_per_dim"], results["stderr"]) == pytest.approx((bpd, se), rel=1e-9)
    assert (results["bits_per_unpadded_dim"], results["stderr_unpadded"]) == pytest.approx((bpd_raw, se_raw), rel=1e-9)
    assert f"{bpd:.4f} ± {se:.4f} bits/dim over 64 dims" in res.output
    assert f"({bpd_raw:.4f} ± {se_raw:.4f} per unpadded pixel, 36 dims)" in res.output
    raw = load_dataset_uint8(str(folder), "test", None, pad_to=None, limit=6)
    mask = pad_images(torch.ones((1, 1, 6, 6), dtype=torch.uint8), 8)[0].bool()
    direct = elbo(load(tiny_model_dir), pad_images(raw, 8), steps=4, mask=mask, seed=0)
    assert direct.mask_dims == 36
    inside = [float(v) / (36 * math.log(2)) for v in direct.nats_in_mask]
    assert (results["interior_terms_bits_per_dim"], results["interior_terms_stderr"]) == pytest.approx(mean_se(inside),
                                                                                                       rel=1e-9)
