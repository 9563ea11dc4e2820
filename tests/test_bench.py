"""``diffsamp bench``: each cell's grid gives the target NFE (measured), cells are cached, tables and plot written."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import diffsamp
import diffsamp.metrics.fid
import diffsamp.metrics.scoring
from diffsamp.cli import main
from diffsamp.io import save_safetensors
from diffsamp.metrics.fid import compute_stats, save_stats
from diffsamp.metrics.bench import bench, plan_cell, training_cost
from diffsamp.models import load
from diffsamp.samplers.amed_files import predictor_digest
from diffsamp.training.amed import AmedTrainOptions, train_amed
from tests.conftest import tiny_extractor

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    ext = tiny_extractor()
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    ref = compute_stats(images, extractor=ext, keep_features=True, padding=0, progress=False)
    tmp = tmp_path_factory.mktemp("bench")
    save_stats(ref, tmp / "ref.npz")
    model = load(tiny_model_dir)
    preds = {}
    for nfe in (3, 4):
        preds[f"amed:{nfe}"] = str(train_amed(model, model.sample_shape, AmedTrainOptions(nfe=nfe, trajectories=8, batch=8),
                                              tmp / f"amed{nfe}", model_name=str(tiny_model_dir)))
    return model, ext, tmp, preds


def test_plans_give_the_target_nfe_and_state_their_grid(setup, tiny_model_dir):
    model, _, _, preds = setup
    paper = {"final_step": "sigma_min"}  # the AMED paper's Table 2: grids end at σ_min
    heun3 = plan_cell(model, str(tiny_model_dir), "heun", 3, **paper)
    assert heun3.method == "dpm2+amed" and heun3.knobs["afs"] and len(heun3.grid) == 2 and "AFS on" in heun3.setting
    heun4 = plan_cell(model, str(tiny_model_dir), "heun", 4, **paper)
    assert heun4.method == "heun" and len(heun4.grid) == 2 and not heun4.grid.ends_at_zero
    assert heun4.final_step == "sigma_min" and "to σ_min" in heun4.setting
    assert plan_cell(model, str(tiny_model_dir), "dpmpp3m", 5).schedule == "logsnr"
    assert plan_cell(model, str(tiny_model_dir), "ipndm", 5, schedules={"ipndm": "logsnr"}).schedule == "logsnr"
    with pytest.raises(ValueError, match="no learned-solver predictor"):
        plan_cell(model, str(tiny_model_dir), "amed", 7)
    with pytest.raises(ValueError, match="trained for model"):
        plan_cell(model, "mnist-ddpm", "amed", 3, predictors=preds)


def test_by_default_a_grid_ends_with_a_denoising_step_inside_the_nfe(setup, tiny_model_dir):
    """final_step="zero": the last interval σ_min → 0 is one evaluation of the NFE, so one-stage rows run NFE
    intervals on grid(NFE) (the grid `diffsamp sample --steps NFE` runs), two-stage rows (NFE + 1)/2 at odd NFE and
    AFS at even NFE; a row's knobs choose the grid (restart's returns) and a row may keep the paper's ending."""
    model, _, _, _ = setup
    name = str(tiny_model_dir)
    karras = diffsamp.get_schedule("karras", model=model)
    ddim5 = plan_cell(model, name, "ddim", 5)
    assert torch.equal(ddim5.grid.sigmas, karras.grid(5).sigmas) and ddim5.final_step == "zero"
    assert ddim5.grid.sigmas[-2] == karras.sigma_min and "the last to 0" in ddim5.setting
    heun5, heun4 = plan_cell(model, name, "heun", 5), plan_cell(model, name, "heun", 4)
    assert heun5.method == "heun" and torch.equal(heun5.grid.sigmas, karras.grid(3).sigmas)
    assert heun4.method == "dpm2+amed" and heun4.knobs["afs"] and len(heun4.grid) == 3
    sde5 = plan_cell(model, name, "dpmpp_sde", 5)  # two evaluations per step, one on the step to 0
    assert len(sde5.grid) == 3 and sde5.grid.ends_at_zero
    with pytest.raises(ValueError, match="no grid of NFE 9 ending with a step to 0"):
        plan_cell(model, name, "restart", 9)
    with pytest.raises(ValueError, match="declares NFE"):  # a knob of the method run (dpm2+amed), typed as such
        plan_cell(model, name, "heun", 4, knobs={"heun": {"afs": "false"}})
    restart9 = plan_cell(model, name, "restart", 9, knobs={"restart": {"restart_steps": "2"}})
    assert len(restart9.grid) == 4 and restart9.knobs["restart_steps"] == 2
    mixed = plan_cell(model, name, "ddim", 5, row_final_steps={"ddim": "sigma_min"})
    assert torch.equal(mixed.grid.sigmas, karras.grid(5, final_zero=False).sigmas)
    with pytest.raises(ValueError, match="final step 'last'"):
        plan_cell(model, name, "ddim", 5, final_step="last")
    for plan in (ddim5, heun5, heun4, sde5, restart9):
        spec = diffsamp.get_sampler(plan.method)
        assert spec.expected_nfe(plan.grid, **plan.knobs) == plan.nfe


def test_bench_writes_tables_measures_nfe_and_resumes(setup, tiny_model_dir, monkeypatch):
    model, ext, tmp, preds = setup
    kw = dict(samplers=["euler", "heun", "dpm2", "amed"], nfes=[3, 4], num=12, reference=str(tmp / "ref.npz"),
              out=tmp / "out", extractor=ext, batch_size=5, predictors=preds, echo=lambda s: None)
    cells, table = bench(model, str(tiny_model_dir), **kw)
    assert [(c.sampler, c.nfe) for c in cells] == [(s, n) for s in kw["samplers"] for n in (3, 4)]
    assert all(c.nfe == c.nfe_target and c.num == 12 and c.seeds == "0-11" for c in cells)
    for name in ("table.md", "table.csv", "fid_vs_nfe.png", "config.json"):
        assert (tmp / "out" / name).is_file()
    assert "reference: heun (35 NFE)" in table and "| amed |" in table
    # each learned cell's training cost, read from its predictor's card: wall, trajectories, hardware
    costs = table.split("Training of the learned rows:", 1)[1]
    for nfe in (3, 4):
        assert re.search(rf"\| amed \| {nfe} \| \d+ s \| 8 \| cpu: ", costs), costs
    assert "| euler |" not in costs
    rows = list(csv.DictReader((tmp / "out" / "table.csv").open()))
    assert len(rows) == 9 and rows[-1]["nfe"] == "35"

    def boom(*a, **k):
        raise AssertionError("a cached cell was sampled again")

    monkeypatch.setattr(diffsamp.metrics.scoring, "score_model", boom)
    again, table2 = bench(model, str(tiny_model_dir), **kw)
    assert [c.fid for c in again] == [c.fid for c in cells] and table2 == table


def test_a_retrained_predictor_is_not_read_from_the_cache(setup, tiny_model_dir, monkeypatch, tmp_path):
    model, ext, tmp, preds = setup
    src = Path(preds["amed:3"])
    for f in (src, src.with_suffix(".safetensors")):
        shutil.copy(f, tmp_path / f.name)
    mine = {"amed:3": str(tmp_path / src.name)}
    kw = dict(samplers=["amed"], nfes=[3], num=6, reference=str(tmp / "ref.npz"), out=tmp_path / "out",
              extractor=ext, batch_size=6, predictors=mine, echo=lambda s: None, reference_row=False)
    (first,), _ = bench(model, str(tiny_model_dir), **kw)
    assert first.predictor_digest == predictor_digest(mine["amed:3"])
    weights = tmp_path / src.with_suffix(".safetensors").name
    retrained = {k: v + 0.5 for k, v in load_file(str(weights)).items()}
    save_safetensors(retrained, weights)  # same path, same grid, other weights

    def boom(*a, **k):
        raise RuntimeError("sampled again")

    monkeypatch.setattr(diffsamp.metrics.scoring, "score_model", boom)
    with pytest.raises(RuntimeError, match="sampled again"):
        bench(model, str(tiny_model_dir), **kw)


def test_bench_cli_errors_are_one_line(setup, tiny_model_dir, monkeypatch):
    _, ext, tmp, _ = setup
    monkeypatch.setattr(diffsamp.metrics.fid, "load_extractor", lambda *a, **k: ext)
    monkeypatch.setattr("diffsamp.metrics.inception.load_extractor", lambda *a, **k: ext)
    base = ["bench", "--model", str(tiny_model_dir), "--ref", str(tmp / "ref.npz"), "--out", str(tmp / "cli"),
            "--num", "6", "--quiet", "--no-reference"]
    res = CliRunner().invoke(main, base + ["--samplers", "euler,nope"])
    assert res.exit_code != 0 and "unknown sampler 'nope'" in res.output
    res = CliRunner().invoke(main, base + ["--samplers", "ddim:tu"])
    assert res.exit_code != 0 and "VARIANT labels a row with its own settings" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, base + ["--nfe", "3,x"])
    assert res.exit_code != 0 and "comma-separated integers" in res.output
    res = CliRunner().invoke(main, base + ["--samplers", "amed", "--nfe", "3"])
    assert res.exit_code != 0 and "no learned-solver predictor" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, base + ["--samplers", "euler", "--nfe", "2"])
    assert res.exit_code == 0, res.output
    assert "| euler |" in res.output
    res = CliRunner().invoke(main, base + ["--samplers", "dpmpp_2m", "--nfe", "2"])  # an alias names a row too
    assert res.exit_code == 0 and "| dpmpp_2m |" in res.output, res.output
    res = CliRunner().invoke(main, base + ["--samplers", "euler", "--nfe", "2", "--dtype", "bfloat16"])
    assert res.exit_code == 0 and "network bfloat16" in res.output, res.output  # its own cells, named
    cells = [json.loads(c.read_text()) for c in (tmp / "cli" / "cells").glob("euler-nfe2-*.json")]
    assert len(cells) == 2 and cells[0]["fid"] != cells[1]["fid"]  # the network really ran in bfloat16


def test_bench_compares_with_the_models_own_data_set(setup, tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    from diffsamp.metrics import bench as bench_mod

    _, ext, tmp, _ = setup
    monkeypatch.setattr("diffsamp.metrics.inception.load_extractor", lambda *a, **k: ext)
    args = ["--samplers", "euler", "--nfe", "2", "--num", "6", "--quiet", "--no-reference"]
    res = CliRunner().invoke(main, ["bench", "--model", str(tiny_model_dir), "--out", str(tmp_path / "a"), *args])
    assert res.exit_code != 0 and "does not record the data set" in res.output and "--ref" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "a" / "cells").exists()  # before any sampling
    named = tmp_path / "fashion"
    shutil.copytree(tiny_model_dir, named)
    (named / "card.json").write_text(json.dumps({"dataset": "fashion-mnist"}))
    seen = {}

    def spy(*a, **kw):
        seen["reference"] = kw["reference"]
        raise ValueError("stop here")

    monkeypatch.setattr(bench_mod, "bench", spy)
    res = CliRunner().invoke(main, ["bench", "--model", str(named), "--out", str(tmp_path / "b"), *args])
    assert seen["reference"] == "fashion-mnist:test", res.output  # not MNIST's test split


def test_a_row_knob_reaches_the_sampler_is_named_and_keys_its_own_cell(setup, tiny_model_dir, monkeypatch):
    model, ext, tmp, _ = setup
    plain = plan_cell(model, str(tiny_model_dir), "ipndm", 5)
    low = plan_cell(model, str(tiny_model_dir), "ipndm", 5, knobs={"ipndm": {"max_order": "2"}})
    assert low.knobs == {"max_order": 2} and low.setting == plain.setting + ", max_order=2"
    with pytest.raises(ValueError, match="no knob 'r'.*max_order"):
        plan_cell(model, str(tiny_model_dir), "ipndm", 5, knobs={"ipndm": {"r": 0.3}})
    with pytest.raises(ValueError, match="declares NFE 6, not 5"):  # a step more than the grid has
        plan_cell(model, str(tiny_model_dir), "ipndm", 5, knobs={"ipndm": {"final_denoise": True}},
                  final_step="sigma_min")
    kw = dict(samplers=["ipndm"], nfes=[5], num=6, reference=str(tmp / "ref.npz"), out=tmp / "knobs", extractor=ext,
              batch_size=6, reference_row=False, echo=lambda s: None)
    (first,), _ = bench(model, str(tiny_model_dir), **kw)
    (second,), table = bench(model, str(tiny_model_dir), knobs={"ipndm": {"max_order": 1}}, **kw)
    assert first.fid != second.fid and "max_order=1" in table  # order 1 is Euler: other samples
    assert len(list((tmp / "knobs" / "cells").glob("*.json"))) == 2

    def boom(*a, **k):
        raise RuntimeError("sampled")

    with monkeypatch.context() as m:  # the tables from the cache alone: nothing sampled, the missing cell shown —
        m.setattr(diffsamp.metrics.scoring, "score_model", boom)
        cells, table = bench(model, str(tiny_model_dir), cached_only=True, **{**kw, "samplers": ["ipndm", "euler"]})
    assert [c.sampler for c in cells] == ["ipndm"] and "| euler |" not in table and "| ipndm | " in table
    monkeypatch.setattr("diffsamp.metrics.inception.load_extractor", lambda *a, **k: ext)
    base = ["bench", "--model", str(tiny_model_dir), "--ref", str(tmp / "ref.npz"), "--out", str(tmp / "knobs"),
            "--num", "6", "--quiet", "--no-reference", "--samplers", "ipndm", "--nfe", "5"]
    res = CliRunner().invoke(main, base + ["--knob", "ipndm:max_order=1", "--knob", "euler:final_denoise=true"])
    assert res.exit_code == 0 and "max_order=1" in res.output, res.output  # a row not benched here: ignored
    for bad, says in (("max_order=1", "ROW:NAME=VALUE"), ("nope:max_order=1", "unknown sampler in row 'nope'"),
                      ("ipndm:max_order=x", "max_order"), ("ipndm:max_order=9", "max_order must be 1 to 4")):
        res = CliRunner().invoke(main, base + ["--knob", bad])
        assert res.exit_code != 0 and says in res.output and "Traceback" not in res.output, (bad, res.output)
    for bad, says in (("last", "[ROW=]zero|sigma_min"), ("ddim=zero", "row 'ddim' is not in --samplers")):
        res = CliRunner().invoke(main, base + ["--final-step", bad])
        assert res.exit_code != 0 and says in res.output and "Traceback" not in res.output, (bad, res.output)


def test_a_variant_row_reads_its_own_predictor_beside_the_plain_one(setup, tiny_model_dir):
    model, ext, tmp, preds = setup
    static = str(train_amed(model, model.sample_shape, AmedTrainOptions(nfe=3, trajectories=8, batch=8, static=True),
                            tmp / "amed-static3", model_name=str(tiny_model_dir)))
    both = {**preds, "amed:static:3": static}
    plain, var = plan_cell(model, str(tiny_model_dir), "amed", 3, predictors=both), \
        plan_cell(model, str(tiny_model_dir), "amed:static", 3, predictors=both)
    assert plain.predictor == preds["amed:3"] and var.predictor == static
    assert "per-sample predictor" in plain.setting and "static predictor" in var.setting and var.method == "amed"
    with pytest.raises(ValueError, match="no learned-solver predictor"):  # a variant never falls back to the plain NFE=PATH
        plan_cell(model, str(tiny_model_dir), "amed:static", 3, predictors={"3": preds["amed:3"]})
    with pytest.raises(ValueError, match="VARIANT labels a row with its own settings"):
        plan_cell(model, str(tiny_model_dir), "ipndm:fast", 3)
    cells, table = bench(model, str(tiny_model_dir), samplers=["amed", "amed:static"], nfes=[3], num=6,
                         reference=str(tmp / "ref.npz"), out=tmp / "variants", extractor=ext, batch_size=6,
                         predictors=both, reference_row=False, echo=lambda s: None)
    assert "| amed |" in table and "| amed:static |" in table and cells[0].fid != cells[1].fid
    kw = dict(samplers=["amed:static"], nfes=[3, 4], num=6, reference=str(tmp / "ref.npz"), out=tmp / "variants",
              extractor=ext, batch_size=6, predictors=both, reference_row=False, echo=lambda s: None)
    with pytest.raises(ValueError, match="no learned-solver predictor"):
        bench(model, str(tiny_model_dir), **kw)
    cells, table = bench(model, str(tiny_model_dir), skip_missing=True, **kw)
    assert [(c.sampler, c.nfe) for c in cells] == [("amed:static", 3)] and "| amed:static | " in table and "| — |" in table


def test_a_flow_is_benched_on_its_own_grid_unless_told(tiny_model_dir):
    flow = load("mnist-rf")
    assert plan_cell(flow, "mnist-rf", "ddim", 5).schedule == "rf"
    assert plan_cell(flow, "mnist-rf", "heun", 5).setting.startswith("rf, 3 steps")
    assert plan_cell(flow, "mnist-rf", "dpmpp3m", 5).schedule == "logsnr"
    assert plan_cell(flow, "mnist-rf", "ddim", 5, schedules={"ddim": "karras"}).schedule == "karras"
    assert plan_cell(load(tiny_model_dir), str(tiny_model_dir), "ddim", 5).schedule == "karras"


@pytest.mark.parametrize("sampler, r", [("heun", 1.0), ("dpm2", 0.5)])
def test_an_odd_nfe_two_stage_plan_is_its_method_with_afs_at_its_own_r(mixture2d, sampler, r):
    """Ending at σ_min (the paper's grids), at odd NFE a two-stage row runs (NFE + 1)/2 intervals with AFS on the first (AMED §3.4): its first step is
    ε̂ = x/√(1 + σ²) at σ, the intermediate s = σ'^r σ^(1−r) with r = 1 for Heun (s = σ') and ½ for DPM-Solver-2,
    and the generalized DPM-Solver-2 update x' = x + (σ' − σ)[ε̂_s/(2r) + (1 − 1/(2r)) ε̂] (AMED Table 1)."""
    plan = plan_cell(mixture2d, "mix", sampler, 5, final_step="sigma_min")
    assert plan.method == "dpm2+amed" and plan.knobs["afs"] is True and len(plan.grid) == 3
    s0, s1 = plan.grid.sigmas[:2].tolist()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s0
    seen = []
    diffsamp.get_sampler(plan.method)(mixture2d, x.clone(), plan.grid, callback=lambda i: seen.append(i.x), **plan.knobs)
    d = x / (1 + s0**2) ** 0.5
    sm = s1**r * s0 ** (1 - r)
    x_s = x + (sm - s0) * d
    d_s = (x_s - mixture2d(x_s, torch.full((16,), sm, dtype=torch.float64))) / sm
    expected = x + (s1 - s0) * (d_s / (2 * r) + (1 - 1 / (2 * r)) * d)
    assert torch.allclose(seen[0], expected, rtol=0, atol=1e-12), (seen[0] - expected).abs().max()


def test_budget_passes_compares_at_equal_network_work(setup, tiny_model_dir):
    """--budget passes: EPD's 2 parallel points per step count as passes, so at 4 passes ddim runs 4 NFE and EPD
    (1 learned interval + the step to 0) its 3; the table's columns are passes, each cell naming its NFE."""
    from diffsamp.metrics.bench import bench, plan_for_passes, plan_passes

    model, ext, tmp, _ = setup
    epd = str(train_amed(model, model.sample_shape, AmedTrainOptions(sampler="epd", nfe=3, trajectories=4, batch=4),
                         tmp / "epd3", model_name=str(tiny_model_dir)))
    preds = {"epd:3": epd}
    plan = plan_for_passes(model, str(tiny_model_dir), "epd", 4, predictors=preds)
    assert (plan.nfe, plan_passes(plan)) == (3, 4)
    assert plan_for_passes(model, str(tiny_model_dir), "ddim", 4).nfe == 4
    assert plan_for_passes(model, str(tiny_model_dir), "ddim", 8, passes_per_nfe=2).nfe == 4  # guidance doubles
    with pytest.raises(ValueError, match="no grid of 5 network passes"):
        plan_for_passes(model, str(tiny_model_dir), "epd", 5, predictors=preds)
    cells, table = bench(model, str(tiny_model_dir), samplers=["ddim", "epd"], nfes=[4], num=6,
                         reference=str(tmp / "ref.npz"), out=tmp / "passes", extractor=ext, batch_size=6,
                         predictors=preds, reference_row=False, echo=lambda s: None, budget="passes")
    assert [(c.sampler, c.nfe, c.network_passes) for c in cells] == [("ddim", 4, 4), ("epd", 3, 4)]
    assert "| sampler | passes 4 |" in table and "NFE 3" in table


def test_a_schedule_file_states_its_training_cost():
    """gits/steps records (options, seconds, hardware) and predictor cards (wall_seconds, trajectories_done) give the
    same three columns; a record without hardware says so with a dash."""
    steps = {"method": "steps", "options": {"trajectories": 100, "epochs": 10}, "seconds": 703.3, "hardware": "cpu: x"}
    assert training_cost(steps) == ("703 s", "100 × 10 epochs", "cpu: x")
    gits = {"method": "gits", "options": {"trajectories": 256}, "seconds": 1108.4, "processes": 2}
    assert training_cost(gits) == ("1108 s", "256", "—, 2 processes")
    card = {"wall_seconds": 882.3, "trajectories_done": 2048, "trajectories": 2048, "hardware": "cuda: H200"}
    assert training_cost(card) == ("882 s", "2048", "cuda: H200")


def test_a_row_whose_cells_differ_in_setting_says_so():
    """A row with one learned schedule per NFE names the first and points to table.csv; a row on one schedule
    names it."""
    from diffsamp.metrics.bench import CellResult, format_table

    def cell(nfe: int, setting: str) -> CellResult:
        return CellResult("ddim:steps", nfe, nfe, 30.0, None, None, 10, "0-9", 1.0, 1.0, setting, "on", [1.0, 0.0])

    table = format_table([cell(3, "steps schedule a3, 3 steps"), cell(5, "steps schedule a5, 5 steps")], [3, 5],
                         None, None)
    assert "| steps schedule a3, … (one per NFE: table.csv) |" in table
    same = format_table([cell(3, "karras, 3 steps"), cell(5, "karras, 5 steps")], [3, 5], None, None)
    assert same.splitlines()[-1].endswith("| karras |")


def test_a_record_without_network_passes_counts_its_nfe_in_the_passes_table():
    from diffsamp.metrics.bench import CellResult, format_table

    old = CellResult("amed", 7, 7, 55.6, None, None, 10, "0-9", 1.0, 1.0, "tu, 4 steps", "on", [1.0, 0.0])
    assert "| amed | 55.60 |" in format_table([old], [7], None, None, budget="passes")


def test_vs_start_scores_each_learned_cell_against_where_it_started(setup, tiny_model_dir, tmp_path):
    """--vs-start: an AMED predictor's start is the predictor reset to its base (DPM-Solver-2's step) on its grid,
    sampled and scored as ROW:start; learned steps start from their ``init`` σ's, which here are the plain dpmpp2m
    row already planned (that cell is reused, not a new one); the closing section keeps the lower FID. (The AMED
    predictor is moved far from its base: on this tiny random model a short training barely moves the images.)"""
    from diffsamp.metrics.bench import format_vs_start, start_plan
    from diffsamp.metrics.fid import frechet_distance
    from diffsamp.samplers.amed_files import load_predictor, save_predictor, start_of
    from diffsamp.training.gits import write_schedule
    from diffsamp.training.steps import StepsOptions, train_steps

    model, ext, tmp, _ = setup
    trained = load_predictor(train_amed(model, model.sample_shape, AmedTrainOptions(nfe=3, trajectories=8, batch=8),
                                        tmp_path / "amed3", model_name=str(tiny_model_dir), guard=False))
    with torch.no_grad():  # far from its base, so the two cells differ on this tiny random model
        trained.heads.bias.add_(2.0)
    preds = {"amed:3": str(save_predictor(trained, tmp_path / "amed3-far", trained.config))}
    grid, record = train_steps(model, model.sample_shape, StepsOptions(steps=3, schedule="karras", teacher_steps=8,
                                                                       trajectories=4, batch=2, epochs=2))
    sched = write_schedule(tmp_path / "steps3", model, str(tiny_model_dir), grid, {"method": "steps", **record})
    kw = dict(samplers=["amed", "dpmpp2m:steps", "dpmpp2m"], nfes=[3], num=6, reference=str(tmp / "ref.npz"),
              out=tmp_path / "b", extractor=ext, batch_size=6, predictors=preds, reference_row=False,
              schedules={"dpmpp2m:steps": str(sched), "dpmpp2m": "karras"}, echo=lambda s: None)
    cells, table = bench(model, str(tiny_model_dir), vs_start=True, **kw)
    fid = {c.sampler: c.fid for c in cells}
    assert set(fid) == {"amed", "dpmpp2m:steps", "dpmpp2m", "amed:start"}  # the steps' start is the dpmpp2m row

    pred = load_predictor(preds["amed:3"])
    base = start_of(pred)
    assert base.digest != pred.digest and any(not torch.equal(a, b) for a, b in
                                              zip(pred.state_dict().values(), base.state_dict().values()))
    images = diffsamp.generate(model, model.sample_shape, sampler="amed", predictor=base, afs=pred.config["afs"],
                               grid=diffsamp.Grid(pred.grid_sigmas), seeds=range(6)).images.clamp(-1, 1)
    ref = diffsamp.metrics.fid.load_stats(tmp / "ref.npz")
    mine = compute_stats(images, extractor=ext, padding=0, progress=False)
    assert fid["amed:start"] == pytest.approx(max(frechet_distance(mine.mu, mine.sigma, ref.mu, ref.sigma), 0),
                                              rel=1e-4)
    assert fid["amed:start"] != fid["amed"]

    section = table.split("Learned rows against the plain solver they start from", 1)[1]
    for row, start in (("amed", "amed:start"), ("dpmpp2m:steps", "dpmpp2m")):
        keep = "learned" if fid[row] < fid[start] else "start: the learned solver scores worse"
        assert f"| {row} | 3 | {fid[row]:.2f} | {start} | {fid[start]:.2f} | {keep}" in section, section
    plans = [plan_cell(model, str(tiny_model_dir), r, 3, schedules=kw["schedules"], predictors=preds)
             for r in kw["samplers"]]
    steps_start = start_plan(model, plans[1], plans)
    assert steps_start is plans[2] and torch.allclose(steps_start.grid.sigmas,
                                                       torch.tensor(record["init"], dtype=torch.float64))
    alone = start_plan(model, plans[1], plans[:2])  # no plain row planned: a row of its own on the init σ's
    assert alone.sampler == "dpmpp2m:steps:start" and torch.equal(alone.grid.sigmas, steps_start.grid.sigmas)
    assert start_plan(model, plans[2], plans) is None  # a plain row learned nothing
    gits = tmp_path / "gits"  # GITS records no init: its start is its sampler on the searched schedule's K steps
    res = CliRunner().invoke(main, ["train", "solver", "--method", "gits", "--model", str(tiny_model_dir), "--nfe",
                                    "3", "--fine-steps", "6", "--trajectories", "2", "--batch", "2", "--out", str(gits)])
    assert res.exit_code == 0, res.output
    g = plan_cell(model, str(tiny_model_dir), "ipndm:gits", 3, schedules={"ipndm:gits": str(gits)})
    g_start = start_plan(model, g, [g])
    want = diffsamp.get_schedule("time_uniform", model=model).grid(3, final_zero=True)
    assert g_start.method == "ipndm" and g_start.nfe == 3 and torch.equal(g_start.grid.sigmas, want.sigmas)
    assert not torch.equal(g.grid.sigmas, want.sigmas)

    # the keep column follows the FIDs either way
    worse = [type(cells[0])(**{**cells[0].__dict__, "sampler": "x", "fid": 9.0}),
             type(cells[0])(**{**cells[0].__dict__, "sampler": "x:start", "fid": 5.0})]
    pair = [(replace_plan(plans[0], "x"), replace_plan(plans[0], "x:start"))]
    assert "| x | 3 | 9.00 | x:start | 5.00 | start: the learned solver scores worse" in format_vs_start(pair, worse)
    worse[0].fid = 4.0
    assert "| x | 3 | 4.00 | x:start | 5.00 | learned |" in format_vs_start(pair, worse)


def replace_plan(plan, name):
    from dataclasses import replace

    return replace(plan, sampler=name)
