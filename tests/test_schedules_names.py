"""The k-diffusion/ComfyUI/diffusers schedules against their formulas and diffusers' σ options; sampler aliases
wherever a name works; close-name suggestions; diffsamp sample's --sigma-min/--sigma-max/--rho."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import diffsamp
from diffsamp.cli import main
from diffsamp.samplers import get_sampler, get_schedule, sampler_aliases
from tests.conftest import assert_one_line_error, run_sample

T = 1000


def _acp():
    from diffusers import DDPMScheduler

    return DDPMScheduler().alphas_cumprod


def _table():
    acp = _acp().double()
    return ((1 - acp) / acp).sqrt()


# --- schedules -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,name", [("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
                                         ("use_beta_sigmas", "beta")])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_schedule_equals_diffusers_sigma_option(option, name, n, record_property):
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(**{option: True})
    sched.set_timesteps(n)
    table = _table()
    ours = get_schedule(name, sigma_min=float(table[0]), sigma_max=float(table[-1])).grid(n).sigmas
    record_property("max_abs_diff", float((ours - sched.sigmas.double()).abs().max()))
    record_property("state_scale", float(sched.sigmas.abs().max()))
    assert torch.allclose(ours, sched.sigmas.double(), rtol=2e-6, atol=1e-6), (ours, sched.sigmas)


def test_exponential_is_logsnr_and_polyexponential_formula():
    a = get_schedule("exponential", sigma_min=0.03, sigma_max=50).grid(9).sigmas
    assert torch.equal(a, get_schedule("logsnr", sigma_min=0.03, sigma_max=50).grid(9).sigmas)
    assert torch.allclose(get_schedule("polyexponential", sigma_min=0.03, sigma_max=50).grid(9).sigmas, a)
    # k-diffusion get_sigmas_polyexponential, rho = 2.5
    ramp = torch.linspace(1, 0, 9, dtype=torch.float64) ** 2.5
    ref = torch.exp(ramp * (math.log(50) - math.log(0.03)) + math.log(0.03))
    got = get_schedule("polyexponential", sigma_min=0.03, sigma_max=50, rho=2.5).grid(9).sigmas
    assert torch.allclose(got[:-1], ref, rtol=1e-12) and got[-1] == 0


def test_kl_optimal_formula():
    n, lo, hi = 8, 0.02, 80.0  # ComfyUI kl_optimal_scheduler
    idx = torch.arange(n, dtype=torch.float64) / (n - 1)
    ref = torch.tan(idx * math.atan(lo) + (1 - idx) * math.atan(hi))
    got = get_schedule("kl_optimal", sigma_min=lo, sigma_max=hi).grid(n).sigmas
    assert torch.allclose(got[:-1], ref, rtol=1e-12) and got[-1] == 0


def test_beta_schedule_other_alpha_beta():
    from scipy.stats import beta

    got = get_schedule("beta", sigma_min=0.1, sigma_max=10, alpha=0.5, beta=0.8).grid(6).sigmas
    ref = 0.1 + beta.ppf(1 - np.linspace(0, 1, 6), 0.5, 0.8) * 9.9
    assert np.allclose(got[:-1].numpy(), ref, rtol=1e-12)


def _log_interp(table, t):
    lt = table.log()
    lo, hi = t.floor().long(), t.ceil().long()
    w = t - t.floor()
    return ((1 - w) * lt[lo] + w * lt[hi]).exp()


@pytest.mark.parametrize("n", [1, 7, 10, 33])
def test_comfyui_table_schedules(n):
    """ComfyUI's normal_scheduler (sgm=False/True), simple_scheduler and ddim_scheduler, written out."""
    acp, table = _acp(), _table()
    normal = _log_interp(table, torch.linspace(T - 1, 0, n, dtype=torch.float64)) if n > 1 else table[-1:]
    sgm = _log_interp(table, torch.linspace(T - 1, 0, n + 1, dtype=torch.float64)[:-1])
    simple = torch.tensor([float(table[-(1 + int(x * (T / n)))]) for x in range(n)], dtype=torch.float64)
    ss, ddim, x = max(T // n, 1), [], 1
    while x < T:
        ddim.append(float(table[x]))
        x += ss
    for name, ref in (("normal", normal), ("sgm_uniform", sgm), ("simple", simple),
                      ("ddim_uniform", torch.tensor(ddim[::-1], dtype=torch.float64))):
        got = get_schedule(name, alphas_cumprod=acp).grid(n).sigmas
        assert got[-1] == 0 and torch.allclose(got[:-1], ref, rtol=1e-12), name


def test_linear_quadratic_formula():
    """ComfyUI linear_quadratic_schedule (threshold 0.025, linear_steps n // 2), times σ_max."""
    n, tn = 10, 0.025
    lin = n // 2
    diff = lin - tn * n
    qs = n - lin
    qc, lc = diff / (lin * qs**2), tn / lin - 2 * diff / qs**2
    ref = [i * tn / lin for i in range(lin)] + [qc * i**2 + lc * i + qc * lin**2 for i in range(lin, n)] + [1.0]
    got = get_schedule("linear_quadratic", sigma_max=14.6).grid(n).sigmas
    assert torch.allclose(got, torch.tensor([(1 - v) * 14.6 for v in ref], dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("name", ["normal", "sgm_uniform", "simple", "linear_quadratic", "kl_optimal", "beta"])
def test_without_final_zero_n_intervals_ending_above_zero(name, tiny_model_dir):
    kw = {"alphas_cumprod": _acp()} if name in ("normal", "sgm_uniform", "simple") else {"sigma_min": 0.01, "sigma_max": 80}
    if name == "linear_quadratic":
        kw = {"sigma_max": 80}
    grid = get_schedule(name, **kw).grid(6, final_zero=False)
    assert len(grid) == 6 and not grid.ends_at_zero


# --- names -----------------------------------------------------------------------------------------------------------


def test_aliases_resolve_to_their_targets_with_bound_knobs():
    aliases = sampler_aliases()
    assert aliases["dpmpp_2m"] == "dpmpp2m" and aliases["dpm_2"] == "dpm2" and aliases["uni_pc"] == "unipc"
    assert get_sampler("uni_pc_bh2").knob_values()["variant"] == "bh2"
    assert get_sampler("uni_pc").knob_values()["variant"] == "bh1"
    assert get_sampler("dpmpp_2m").knob_values()["order"] == 2
    assert get_sampler("DPMSolverMultistepScheduler").fn is get_sampler("dpmpp").fn
    for alias, target in aliases.items():  # every name resolves to its registered target's function
        assert get_sampler(alias).fn is get_sampler(target).fn, alias
    if "euler_ancestral" in diffsamp.available_samplers():
        assert get_sampler("euler_a").fn is get_sampler("euler_ancestral").fn


def test_lazy_alias_resolves_once_its_target_is_registered():
    from diffsamp.samplers import registry

    registry.register_alias("later_name_x", "later_sampler_x", description="test", lazy=True)
    try:
        assert "later_name_x" not in sampler_aliases()
        with pytest.raises(ValueError, match="names 'later_sampler_x', which is not registered"):
            get_sampler("later_name_x")

        @registry.register_sampler("later_sampler_x", kind="ode", nfe=lambda g, k: len(g))
        def later(model, x, grid, *, generator=None, callback=None):
            """A test sampler."""
            return x

        assert get_sampler("later_name_x").fn is later and sampler_aliases()["later_name_x"] == "later_sampler_x"
    finally:
        for d in (registry._NAMES, registry._RESOLVED, registry._SAMPLERS):
            d.pop("later_name_x", None)
            d.pop("later_sampler_x", None)


def test_alias_in_generate_gives_the_targets_samples(mixture2d):
    a = diffsamp.generate(mixture2d, (2,), sampler="uni_pc_bh2", steps=6, seeds=range(3)).images
    b = diffsamp.generate(mixture2d, (2,), sampler="unipc", steps=6, seeds=range(3), variant="bh2").images
    c = diffsamp.generate(mixture2d, (2,), sampler="unipc", steps=6, seeds=range(3), variant="bh1").images
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("typo,expect", [("unipcc", "unipc"), ("dpmpp_2n", "dpmpp_2m"), ("Euler", "euler"),
                                         ("uni_pc_bh3", "uni_pc_bh2")])
def test_unknown_name_suggests_the_closest(typo, expect):
    with pytest.raises(ValueError, match=f"unknown sampler '{typo}'; did you mean {expect}\\b"):
        get_sampler(typo)


def test_cli_samplers_shows_aliases_and_takes_them():
    r = CliRunner()
    out = r.invoke(main, ["samplers"]).output
    line = next(ln for ln in out.splitlines() if ln.startswith("dpmpp2m "))
    assert "dpmpp_2m" in line and "DPMSolverMultistepScheduler" in line
    res = r.invoke(main, ["samplers", "uni_pc_bh2"])
    assert res.exit_code == 0 and "= unipc" in res.output and "variant: bh1|bh2 = 'bh2'" in res.output
    res = r.invoke(main, ["samplers", "dpmpp3m"])
    assert "differs from k-diffusion" in res.output and "variant=k-diffusion" in res.output
    res = r.invoke(main, ["samplers", "uni_pcc"])
    assert res.exit_code == 2 and "did you mean uni_pc" in res.output


def test_diffusers_equivalent():
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    assert diffsamp.samplers.diffusers_equivalent(DPMSolverMultistepScheduler(use_karras_sigmas=True))[:2] == \
        ("dpmpp2m", "karras")
    s, sch, k = diffsamp.samplers.diffusers_equivalent("UniPCMultistepScheduler", {"solver_type": "bh1",
                                                                                   "solver_order": 3})
    assert (s, sch, k["variant"], k["order"]) == ("unipc", "ddpm", "bh1", 3)
    assert diffsamp.samplers.diffusers_equivalent(UniPCMultistepScheduler(use_beta_sigmas=True))[1] == "beta"


# --- CLI σ options ------------------------------------------------------------------------------------------------------


def test_cli_alias_and_sigma_options_recorded(tiny_model_dir, tmp_path):
    res = run_sample(tiny_model_dir, "--sampler", "uni_pc_bh2", "--schedule", "karras", "--sigma-min", "0.05",
                     "--sigma-max", "20", "--rho", "3", "--outdir", str(tmp_path / "o"), "-q")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    cfg = cfg.get("settings", cfg)
    assert cfg["schedule_params"] == {"sigma_min": 0.05, "sigma_max": 20.0, "rho": 3.0}
    ref = get_schedule("karras", sigma_min=0.05, sigma_max=20, rho=3).grid(2).sigmas.tolist()
    assert np.allclose(cfg["sigma_grid"], ref)


@pytest.mark.parametrize("args,needles", [
    (["--schedule", "logsnr", "--rho", "3"], ["--rho", "'logsnr' does not take rho"]),
    (["--schedule", "ddpm", "--sigma-min", "0.1"], ["--sigma-min", "does not take sigma_min"]),
    (["--schedule", "karras", "--sigma-min", "5", "--sigma-max", "2"], ["--sigma-min < --sigma-max"]),
    (["--schedule", "karras", "--rho", "-1"], ["--rho", "finite positive"]),
    (["--sampler", "unipcc"], ["did you mean unipc"]),
])
def test_cli_sigma_option_errors(tiny_model_dir, tmp_path, args, needles):
    res = run_sample(tiny_model_dir, *args, "--out", str(tmp_path / "g.png"), "-q")
    assert_one_line_error(res, 2, *needles)
