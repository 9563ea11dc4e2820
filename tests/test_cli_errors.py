"""What a new user hits: bad input is a one-line error naming the problem, before any expensive work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffsamp.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self").exists(),
                                reason="needs /proc (a folder nobody can create files in, even root)")


class _Loaded(Exception):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the error must come before it."""
    import diffsamp.models
    import diffsamp.models.zoo

    def refuse(*args, **kwargs):
        raise _Loaded("the model was loaded before the error")

    monkeypatch.setattr(diffsamp.models, "load", refuse)
    monkeypatch.setattr(diffsamp.models.zoo, "load", refuse)


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def error_line(res) -> str:
    """The one ``Error:`` line of a refused command (and no traceback)."""
    assert res.exit_code in (1, 2), (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.output
    return lines[0]


# -- item 2: the destination is checked before sampling -------------------------------------------------------

@linux_only
@pytest.mark.parametrize("opt, path", [("--out", "/proc/nope/grid.png"), ("--outdir", "/proc/nope/dir"),
                                       ("--out", "/proc/grid.png"), ("--outdir", "/proc/dir")])
def test_sample_unwritable_destination(no_model_load, opt, path):
    line = error_line(run(["sample", "--model", "mnist-ddpm", "--steps", "1", "--seeds", "0-1", "-q", opt, path]))
    assert opt in line and "/proc" in line and "cannot" in line


def test_sample_destination_through_a_file(no_model_load, tmp_path):
    (tmp_path / "f").write_text("x")
    line = error_line(run(["sample", "--model", "mnist-ddpm", "--outdir", str(tmp_path / "f" / "d")]))
    assert "is a file" in line


@linux_only
def test_other_commands_check_their_out_folder(no_model_load):
    line = error_line(run(["bench", "--model", "mnist-ddpm", "--samplers", "euler", "--nfe", "2", "--num", "2",
                           "--out", "/proc/nope/b"]))
    assert "/proc/nope/b" in line
    line = error_line(run(["fid", "ref", "--dataset", "mnist", "--split", "test", "--num", "2",
                           "--out", "/proc/nope/r.npz"]))
    assert "/proc/nope" in line
    line = error_line(run(["nll", "--model", "mnist-ddpm", "--num", "2", "--out", "/proc/nope/n"]))
    assert "/proc/nope/n" in line
    line = error_line(run(["train", "ddpm", "--dataset", "mnist", "--steps", "1", "--out", "/proc/nope/t"]))
    assert "/proc/nope/t" in line
    line = error_line(run(["train", "amed", "--model", "mnist-ddpm", "--nfe", "3", "--out", "/proc/nope/a"]))
    assert "/proc/nope/a" in line


# -- item 3: damaged files are one line naming the file ---------------------------------------------------------

WEIGHTS = Path(__file__).resolve().parents[1] / "diffsamp" / "weights"


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _sample_error(model: str | Path, tmp_path: Path, *extra: str) -> str:
    return error_line(run(["sample", "--model", str(model), "--steps", "1", "--seeds", "0", "-q",
                           "--out", str(tmp_path / "g.png"), *extra]))


@pytest.fixture
def rf_dir(tmp_path) -> Path:
    d = tmp_path / "rf"
    d.mkdir()
    (d / "model.json").write_bytes((WEIGHTS / "mnist-rf.json").read_bytes())
    (d / "model.safetensors").write_bytes((WEIGHTS / "mnist-rf.safetensors").read_bytes())
    return d


@pytest.fixture
def ddpm_dir(tiny_model_dir, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_model_dir, tmp_path / "ddpm"))


@pytest.mark.parametrize("damage", ["truncated", "random", "tail"])
def test_damaged_diffusers_weights(ddpm_dir, tmp_path, damage):
    w = ddpm_dir / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        _truncate(w, 1000)
    elif damage == "tail":
        _truncate(w, w.stat().st_size - 1)
    else:
        w.write_bytes(bytes(range(256)) * 50)
    line = _sample_error(ddpm_dir, tmp_path)
    assert str(w) in line and ("truncated" in line or "not a safetensors file" in line)


def test_damaged_diffusers_configs(ddpm_dir, tmp_path):
    cfg = ddpm_dir / "unet" / "config.json"
    good = cfg.read_text()
    cfg.write_text(good[: len(good) // 2])
    line = _sample_error(ddpm_dir, tmp_path)
    assert str(cfg) in line and "not valid JSON" in line
    cfg.write_text(good)
    sched = ddpm_dir / "scheduler" / "scheduler_config.json"
    sched.write_text("{x")
    line = _sample_error(ddpm_dir, tmp_path)
    assert str(sched) in line and "not valid JSON" in line


def test_damaged_rectified_flow(rf_dir, tmp_path):
    w = rf_dir / "model.safetensors"
    _truncate(w, w.stat().st_size // 2)
    line = _sample_error(rf_dir, tmp_path)
    assert str(w) in line and "truncated" in line
    cfg = rf_dir / "model.json"
    cfg.write_text(cfg.read_text()[:300])
    line = _sample_error(rf_dir, tmp_path)
    assert str(cfg) in line and "not valid JSON" in line and "neither" not in line
    cfg.write_text("[1, 2]")
    line = _sample_error(rf_dir, tmp_path)
    assert str(cfg) in line and "list" in line


@pytest.fixture
def predictor_copy(tmp_path) -> Path:
    d = tmp_path / "pred"
    d.mkdir()
    for ext in (".json", ".safetensors"):
        (d / f"amed-nfe3{ext}").write_bytes((WEIGHTS / "predictors" / "mnist-ddpm" / f"amed-nfe3{ext}").read_bytes())
    return d / "amed-nfe3.json"


def test_damaged_predictor(predictor_copy, tmp_path, no_model_load):
    args = ("--sampler", "amed", "--predictor", str(predictor_copy))
    weights = predictor_copy.with_suffix(".safetensors")
    good_w = weights.read_bytes()
    _truncate(weights, 50)
    line = _sample_error("mnist-ddpm", tmp_path, *args)
    assert str(weights) in line and "truncated" in line
    weights.write_bytes(good_w)
    good = predictor_copy.read_text()
    predictor_copy.write_text(good[:40])
    line = _sample_error("mnist-ddpm", tmp_path, *args)
    assert str(predictor_copy) in line and "not valid JSON" in line
    cfg = json.loads(good)
    del cfg["predictor"]
    predictor_copy.write_text(json.dumps(cfg))
    line = _sample_error("mnist-ddpm", tmp_path, *args)
    assert str(predictor_copy) in line and "predictor" in line


def test_resume_on_a_truncated_checkpoint(tmp_path, mnist_test):
    from diffsamp.io import save_state_file

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    import torch

    ckpt = save_state_file(run_dir / "checkpoint.safetensors", {"model.w": torch.zeros(1000)}, {"format": 1})
    _truncate(ckpt, 200)
    line = error_line(run(["train", "ddpm", "--dataset", "mnist", "--channels", "8,16", "--attention-levels", "none",
                           "--steps", "2", "--batch-size", "2", "--out", str(run_dir), "--no-progress", "--resume"]))
    assert str(ckpt) in line and "truncated" in line
    # the same file as --model (sampling while it trains)
    line = _sample_error(run_dir, tmp_path)
    assert str(ckpt) in line and "truncated" in line


# -- item 9: a learned sampler without --predictor ---------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["amed", "ipndm+amed"])
def test_learned_sampler_needs_a_predictor_before_loading(no_model_load, tmp_path, sampler):
    line = error_line(run(["sample", "--model", "mnist-ddpm", "--sampler", sampler, "--out", str(tmp_path / "g.png")]))
    assert f"--sampler {sampler}" in line and "--predictor" in line and "mnist-ddpm/" in line


# -- item 1: a predictor fixes the grid; --steps/--schedule that disagree are refused --------------------------

@pytest.mark.parametrize("extra", [("--steps", "10"), ("--schedule", "logsnr"), ("--steps", "10", "--schedule", "logsnr"),
                                   ("--knob", "afs=false")])
def test_predictor_refuses_other_steps_schedule_knobs(no_model_load, tmp_path, extra):
    line = error_line(run(["sample", "--model", "mnist-ddpm", "--sampler", "amed", "--predictor", "mnist-ddpm/amed-nfe5",
                           "--seeds", "0", "--out", str(tmp_path / "g.png"), *extra]))
    assert "--steps 3 --schedule karras" in line  # what the predictor uses
    assert " ".join(extra[:2]) in line  # what the user gave, named


def test_predictor_records_what_ran(tmp_path):
    from PIL import Image

    out = tmp_path / "g.png"
    res = run(["sample", "--model", "mnist-ddpm", "--predictor", "mnist-ddpm/amed-nfe3", "--steps", "2",
               "--schedule", "karras", "--seeds", "0", "-q", "--out", str(out)])  # the predictor's own values: fine
    assert res.exit_code == 0, res.output
    meta = json.loads(Image.open(out).text["diffsamp"])
    assert (meta["sampler"], meta["schedule"], meta["steps"], meta["nfe"]) == ("amed", "karras", 2, 3)
    assert meta["knobs"]["predictor"] == "mnist-ddpm/amed-nfe3" and len(meta["sigma_grid"]) == 3


# -- item 4: bench checks a predictor's NFE against the cell's before sampling -----------------------------------

def test_bench_predictor_nfe_checked_before_sampling(monkeypatch, tmp_path):
    import diffsamp.metrics.bench
    import diffsamp.metrics.inception
    import diffsamp.metrics.scoring

    def refuse(*args, **kwargs):
        raise _Loaded("sampling/scoring started before the error")

    monkeypatch.setattr(diffsamp.metrics.inception, "load_extractor", lambda *a, **k: object())
    monkeypatch.setattr(diffsamp.metrics.scoring, "resolve_reference", refuse)
    monkeypatch.setattr(diffsamp.metrics.bench, "run_cell", refuse)
    line = error_line(run(["bench", "--model", "mnist-ddpm", "--samplers", "amed", "--nfe", "5", "--num", "2",
                           "--predictor", "5=mnist-ddpm/amed-nfe3", "--out", str(tmp_path / "b"), "--quiet"]))
    assert "mnist-ddpm/amed-nfe3" in line and "NFE 3" in line and "not 5" in line


# -- item 5: knobs validated up front, from each sampler's registration -------------------------------------------

@pytest.mark.parametrize("sampler, knob, says", [
    ("pc", "snr=1e9", "in (0, 1]"), ("pc", "snr=inf", "finite"), ("pc", "snr=nan", "finite"), ("pc", "snr=0", "(0, 1]"),
    ("rk45", "rtol=-1", "rtol"), ("rk45", "rtol=0", "rtol"), ("rk45", "atol=0", "> 0"), ("dpm2", "r=0", "(0, 1]"),
    ("ddim", "eta=2", "[0, 1]"), ("ipndm", "max_order=5", "1 to 4"), ("pc", "corrector_steps=-1", "≥ 0"),
    ("euler_maruyama", "gamma=-0.5", "[0, 1]"),
])
def test_knob_out_of_range_is_refused_before_loading(no_model_load, tmp_path, sampler, knob, says):
    line = error_line(run(["sample", "--model", "mnist-ddpm", "--sampler", sampler, "--knob", knob, "--steps", "2",
                           "--out", str(tmp_path / "g.png")]))
    name = knob.split("=")[0]
    assert f"sampler {sampler!r}: {name} must be" in line and says in line


def test_knob_ranges_hold_in_the_api_too(gaussian):
    import torch

    from diffsamp.api import integrate
    from diffsamp.samplers import Grid, get_sampler

    grid = Grid(torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="sampler 'rk45': rtol must be"):
        get_sampler("rk45")(gaussian, torch.zeros(1, 4), grid, rtol=0.0)
    with pytest.raises(ValueError, match="sampler 'pc': snr must be a finite"):
        integrate(gaussian, torch.zeros(1, 4), sampler="pc", grid=grid, knobs={"snr": float("inf")})


def test_every_declared_range_admits_the_default():
    from diffsamp.samplers import available_samplers, get_sampler

    for name in available_samplers():
        spec = get_sampler(name)
        spec.check_knobs(**{k: d for k, (_, d) in spec.knob_specs().items()})


def test_nan_blames_a_knob_set_away_from_its_default(gaussian):
    import torch

    from diffsamp.api import integrate
    from diffsamp.models.base import Wrapper
    from diffsamp.samplers import Grid

    class NanLater(Wrapper):  # finite at the first evaluation, NaN after
        calls = 0

        def __call__(self, x, sigma):
            self.calls += 1
            out = self.inner(x, sigma)
            return out if self.calls == 1 else out * float("nan")

    grid = Grid(torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"NaN/inf.*knob set away from the default \(r=0.3\)"):
        integrate(NanLater(gaussian), torch.zeros(1, 4), sampler="dpm2", grid=grid, knobs={"r": 0.3})
    with pytest.raises(ValueError, match="NaN/inf") as info:
        integrate(NanLater(gaussian), torch.zeros(1, 4), sampler="dpm2", grid=grid)
    assert "away from the default" not in str(info.value)


def test_the_deferred_nan_check_names_the_first_bad_evaluation(gaussian):
    """On a GPU the check is kept on the device until sampling ends (no sync per step); forced here on the CPU."""
    import torch

    from diffsamp.models.base import CountingDenoiser

    class NanFrom(CountingDenoiser):  # NaN from the third evaluation on
        def __call__(self, x, sigma):
            out = super().__call__(x, sigma)
            return out * float("nan") if self.calls >= 3 else out

    counter = CountingDenoiser(NanFrom(gaussian), check=True, defer=True)
    x = torch.randn(2, 4)
    for _ in range(5):
        counter(x, torch.ones(2))  # no error while sampling
    with pytest.raises(ValueError, match="NaN/inf at evaluation 3;"):
        counter.raise_deferred()
    fine = CountingDenoiser(gaussian, check=True, defer=True)
    fine(x, torch.ones(2))
    fine.raise_deferred()
    later = CountingDenoiser(NanFrom(gaussian), check=True, defer=True)  # checked, then used again
    later(x, torch.ones(2))
    later.raise_deferred()
    for _ in range(3):
        later(x, torch.ones(2))
    with pytest.raises(ValueError, match="NaN/inf at evaluation 3;"):
        later.raise_deferred()
    later.raise_deferred()  # reported once
    with pytest.raises(ValueError, match="NaN/inf at evaluation 3 "):  # on the CPU: at once
        now = CountingDenoiser(NanFrom(gaussian), check=True)
        for _ in range(5):
            now(x, torch.ones(2))


# -- item 6: --dtype float16 on the CPU works (float32 sampler state, float16 network) ----------------------------

def test_float16_on_the_cpu_samples(tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "h.png"
    res = CliRunner().invoke(main, ["sample", "--model", "mnist-ddpm", "--dtype", "float16", "--steps",
                                                    "2", "--seeds", "0", "-q", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "float16 weights on the CPU" in res.stderr and "slower" in res.stderr  # the one warning: float32 is the CPU's choice
    img = np.asarray(Image.open(out), dtype=np.float64)
    assert img.std() > 10  # a digit, not a constant image
    assert json.loads(Image.open(out).text["diffsamp"])["dtype"] == "float16"


# -- item 7: --skip-existing compares the settings first, even when every PNG is there -------------------------

def test_skip_existing_compares_settings_even_when_every_png_exists(tmp_path, monkeypatch):
    d = tmp_path / "d"
    base = ["sample", "--model", "mnist-ddpm", "--sampler", "euler", "--steps", "1", "--seeds", "0", "-q",
            "--outdir", str(d)]
    assert run(base).exit_code == 0
    res = run([*base, "--skip-existing"])
    assert res.exit_code == 0 and "nothing to do" in res.output
    line = error_line(run([*base, "--steps", "2", "--skip-existing"]))  # every PNG there, other settings
    assert "steps (1, not 2)" in line and str(d) in line
    import diffsamp.models

    monkeypatch.setattr(diffsamp.models, "load", lambda *a, **k: (_ for _ in ()).throw(_Loaded("loaded")))
    line = error_line(run([*base, "--sampler", "heun", "--skip-existing"]))  # refused before the model loads
    assert "sampler (euler, not heun)" in line
    (d / "config.json").write_text("{")
    line = error_line(run([*base, "--skip-existing"]))
    assert "config.json is not valid JSON" in line


# -- item 8: a flow's default sampler is euler -------------------------------------------------------------------

def test_flow_default_sampler_is_euler(tmp_path, rf_dir):
    from PIL import Image

    for model in ("mnist-rf", str(rf_dir)):
        out = tmp_path / "g.png"
        res = run(["sample", "--model", model, "--steps", "2", "--seeds", "0", "-q", "--out", str(out)])
        assert res.exit_code == 0, res.output
        assert "with euler/rf, 2 steps: NFE 2" in res.output
        assert json.loads(Image.open(out).text["diffsamp"])["sampler"] == "euler"
    res = run(["sample", "--model", "mnist-ddpm", "--steps", "1", "--seeds", "0", "-q", "--out", str(out)])
    assert res.exit_code == 0 and "with heun/karras" in res.output, res.output


def test_generate_defaults_to_the_models_sampler():
    import diffsamp
    from diffsamp.models import load

    res = diffsamp.generate(load("mnist-rf"), (1, 32, 32), steps=2, seeds=[0])
    assert res.nfe == 2  # euler: one evaluation per step (heun would take 3)


# -- item 10: cosmetics --------------------------------------------------------------------------------------------

def test_warnings_go_through_tqdm_write_once_per_command(monkeypatch):
    import click
    import tqdm

    from diffsamp.cli._common import _one_line_warning

    lines = []
    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, **k: lines.append(s)))
    with click.Context(main).scope():
        for _ in range(3):  # e.g. the small-N FID warning, once per bench cell
            _one_line_warning(UserWarning("FID from 2 images"), UserWarning, "f.py", 1)
        _one_line_warning(UserWarning("another"), UserWarning, "f.py", 2)
    assert lines == ["warning: FID from 2 images", "warning: another"]


def test_kid_with_one_subset_has_no_spread():
    from diffsamp.cli.sampling import _quality_line

    assert "±" not in _quality_line(12.0, 0.002, 0.0, 10, "mnist:test")
    assert "KID 2.000 ± 0.500 ×1e-3" in _quality_line(12.0, 0.002, 0.0005, 10, "mnist:test")


def _saved_figures(monkeypatch):
    import matplotlib.figure

    figs = []
    real = matplotlib.figure.Figure.savefig

    def keep(self, *a, **k):
        figs.append(self)
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figs


def test_fid_vs_nfe_has_integer_ticks(monkeypatch, tmp_path):
    from diffsamp.metrics.bench import CellResult, plot_fid_vs_nfe

    figs = _saved_figures(monkeypatch)
    cells = [CellResult("heun", n, n, 30.0 / n, None, None, 2, "0-1", 1.0, 1.0, "", "", []) for n in (3, 5)]
    plot_fid_vs_nfe(cells, None, None, tmp_path / "f.png", "t")
    ticks = [t for t in figs[0].axes[0].get_xticks() if 3 <= t <= 5]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_nll_terms_plot_keeps_nonpositive_terms(monkeypatch, tmp_path):
    from diffsamp.cli.nll import _plot

    figs = _saved_figures(monkeypatch)
    _plot(tmp_path / "t.png", [1, 2, 3, 4, 5], [0.5, -0.01, 0.02, 0.0, 0.3], xlabel="t", ylabel="b", title="x",
          logy=True)
    ax = figs[0].axes[0]
    assert ax.get_yscale() == "symlog"  # a log axis would drop −0.01 and 0 and break the line


def test_notebook_uses_sigma_grid():
    nb = (Path(__file__).resolve().parents[1] / "notebooks" / "samplers_2d.ipynb").read_text()
    assert "out.grid" not in nb


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "both infs", "none: large float16"])
def test_the_finite_check_catches_every_non_finite_output_and_only_those(bad):
    """The per-call check sums the output first (NaN/inf survive a sum) and confirms elementwise; +inf and −inf in
    one output sum to NaN, and finite float16 outputs whose sum overflows float16 are not flagged."""
    import torch

    from diffsamp.models.base import CountingDenoiser

    out = torch.ones(4, 1, 64, 64, dtype=torch.float16 if bad.startswith("none") else torch.float32)
    if bad == "none: large float16":
        out *= 60000.0
    elif bad == "both infs":
        out[0, 0, 0, 0], out[1, 0, 0, 0] = float("inf"), float("-inf")
    else:
        out[2, 0, 5, 7] = float(bad)
    counter = CountingDenoiser(lambda x, sigma: out, check=True, defer=False)
    if bad.startswith("none"):
        counter(out.clone(), torch.ones(4))
    else:
        with pytest.raises(ValueError, match="NaN/inf at evaluation 1"):
            counter(out.clone(), torch.ones(4))
