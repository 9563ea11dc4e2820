"""unipc, deis, lms, res_multistep and dpmpp's k-diffusion variant: empirical order on the analytic oracles, NFE,
equivalence with diffusers' schedulers on a tiny random UNet, and the k-diffusion/ComfyUI loops written out."""

import math

import numpy as np
import pytest
import torch

from diffsamp.models.base import CountingDenoiser
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
from diffsamp.samplers import Grid, get_sampler, get_schedule
from tests.conftest import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = [32, 64, 128]
# (sampler, knobs, global order): UniP-p is order p, UniPC-p (with the corrector) p + 1 (UniPC Thm. 3.1)
CASES = (
    [("unipc", {"order": p, "variant": v, "use_corrector": c, "lower_order_final": False}, p + int(c))
     for p in (1, 2, 3) for v in ("bh1", "bh2") for c in (True, False)]
    + [("deis", {"order": p, "lower_order_final": False}, p) for p in (1, 2, 3)]
    + [("lms", {"order": p}, p) for p in (1, 2, 3, 4)]
    + [("res_multistep", {}, 2)]
)
_REFS: dict = {}


def _ref(model, name, x0):
    if name == "gaussian":
        return model.ode_solution(x0, 20.0, 0.02)
    if name not in _REFS:
        grid = get_schedule("karras", model=model).grid(1, final_zero=False)
        _REFS[name] = get_sampler("rk45")(model, x0, grid, rtol=1e-12, atol=1e-12)
    return _REFS[name]


@pytest.mark.parametrize("fixture", ["gaussian", "mixture2d"])
@pytest.mark.parametrize("name,knobs,order", CASES, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k, _ in CASES])
def test_global_order_on_oracles(name, knobs, order, fixture, request):
    model = request.getfixturevalue(fixture)
    x0 = torch.randn(16, model.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 20.0
    ref = _ref(model, fixture, x0)
    sched = get_schedule("karras", model=model)
    errs = [(get_sampler(name)(model, x0, sched.grid(n, final_zero=False), **knobs) - ref).abs().max().item()
            for n in STEPS]
    slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
    assert order - 0.4 < slope < order + 0.5, f"{name} {knobs}: slope {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("name,knobs", [
    ("unipc", {"use_corrector": False}), ("unipc", {"order": 3, "variant": "bh1"}), ("deis", {"order": 1}),
    ("lms", {"order": 2}), ("uni_pc_bh2", {}), ("dpmpp3m", {"variant": "k-diffusion"})])
@pytest.mark.parametrize("final_zero,final_denoise", [(True, False), (False, True)])
def test_nfe_declared_equals_measured(name, knobs, final_zero, final_denoise, mixture2d):
    spec = get_sampler(name)
    grid = get_schedule("karras", model=mixture2d).grid(6, final_zero=final_zero)
    counter = CountingDenoiser(mixture2d)
    spec(counter, torch.randn(3, 2, dtype=torch.float64) * 20, grid, final_denoise=final_denoise, **knobs)
    assert counter.calls == spec.expected_nfe(grid, final_denoise=final_denoise, **knobs)


# --- diffusers --------------------------------------------------------------------------------------------------


def _compare(cls, n, name, knobs, step_kwargs=None, **config):
    """Our sampler on the scheduler's own σ's against its loop; returns (max |Δ|, max |x|)."""
    unet = tiny_unet().double()
    sched = cls(**config)
    den = DiffusersUNetDenoiser(unet, sched.alphas_cumprod, sched.config.prediction_type)
    sched.set_timesteps(n)
    grid = Grid(sched.sigmas.double())
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z * sched.init_noise_sigma
    start = x.clone()
    if sched.init_noise_sigma == 1.0:  # VP-scaled state: x̄ = √(1 + σ²) x
        start = z * math.sqrt(1 + float(grid.sigmas[0]) ** 2)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x, **(step_kwargs or {})).prev_sample
        ours = get_sampler(name)(den, start, grid, **knobs)
    if sched.init_noise_sigma == 1.0:  # back to diffusers' scaled state at the last σ (σ_min for DEIS)
        ours = ours / math.sqrt(1 + float(grid.sigmas[-1]) ** 2)
    return float((ours - x).abs().max()), float(x.abs().max())


# diffusers computes its coefficients in float32: relative agreement ~1e-7 of the state's scale
@pytest.mark.parametrize("n", [5, 12, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_matches_diffusers(variant, order, n, record_property):
    from diffusers import UniPCMultistepScheduler

    # diffusers' bh1 steps to σ = 0 with B(h) = h = −∞ and returns NaN there: compare bh1 on grids ending at σ_min
    final = {"final_sigmas_type": "sigma_min"} if variant == "bh1" else {}
    diff, scale = _compare(UniPCMultistepScheduler, n, "unipc", {"order": order, "variant": variant},
                           solver_order=order, solver_type=variant, **final)
    record_property("max_abs_diff", diff), record_property("state_scale", scale)
    assert diff < 1e-6 * scale, (diff, scale)


@pytest.mark.parametrize("n", [6, 20])
def test_unipc_without_corrector_matches_diffusers_disable_corrector(n, record_property):
    from diffusers import UniPCMultistepScheduler

    diff, scale = _compare(UniPCMultistepScheduler, n, "unipc", {"use_corrector": False, "order": 3},
                           solver_order=3, disable_corrector=list(range(n)))
    record_property("max_abs_diff", diff), record_property("state_scale", scale)
    assert diff < 1e-6 * scale, (diff, scale)
    with_c, _ = _compare(UniPCMultistepScheduler, n, "unipc", {"order": 3}, solver_order=3,
                         disable_corrector=list(range(n)))
    assert with_c > 1e-4 * scale  # the corrector is what the knob switches


@pytest.mark.parametrize("n", [5, 12, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_matches_diffusers(order, n, record_property):
    from diffusers import DEISMultistepScheduler

    diff, scale = _compare(DEISMultistepScheduler, n, "deis", {"order": order}, solver_order=order)
    record_property("max_abs_diff", diff), record_property("state_scale", scale)
    assert diff < 1e-6 * scale, (diff, scale)


@pytest.mark.parametrize("n", [5, 12, 20])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_matches_diffusers(order, n, record_property):
    from diffusers import LMSDiscreteScheduler

    diff, scale = _compare(LMSDiscreteScheduler, n, "lms", {"order": order}, step_kwargs={"order": order})
    record_property("max_abs_diff", diff), record_property("state_scale", scale)
    # at n = 20 diffusers' timesteps are fractional and its σ's interpolated linearly in σ, while the denoiser maps
    # σ back to t through log σ: the UNet sees t's ~1e-6 apart, hence 2.2e-6 relative there (1e-7 elsewhere)
    assert diff < 5e-6 * scale, (diff, scale)


# --- k-diffusion / ComfyUI written out -----------------------------------------------------------------------------


def _den(model, x, s):
    return model(x, torch.full((len(x),), float(s), dtype=x.dtype))


def _lms_reference(model, x, sigmas, order):
    """k-diffusion's sample_lms: coefficients by quadrature of the Lagrange basis (linear_multistep_coeff)."""
    from scipy import integrate

    t, ds = sigmas.tolist(), []
    for i in range(len(t) - 1):
        den = _den(model, x, t[i])
        ds.append((x - den) / t[i])
        ds = ds[-order:]
        cur = min(i + 1, order)

        def coeff(j):
            def fn(tau):
                prod = 1.0
                for k in range(cur):
                    if j != k:
                        prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
                return prod
            return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-12)[0]

        x = x + sum(coeff(j) * d for j, d in zip(range(cur), reversed(ds)))
    return x


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_is_k_diffusion_sample_lms(order, mixture2d):
    grid = get_schedule("karras", model=mixture2d).grid(9)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 20
    ours = get_sampler("lms")(mixture2d, x, grid, order=order)
    assert torch.allclose(ours, _lms_reference(mixture2d, x, grid.sigmas, order), rtol=1e-9, atol=1e-9)


def _res_multistep_reference(model, x, sigmas):
    """ComfyUI's res_multistep at η = 0 (comfy/k_diffusion/sampling.py), tensors and all."""
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_denoised, old_sigma_down = None, None
    for i in range(len(sigmas) - 1):
        denoised = _den(model, x, sigmas[i])
        sigma_down = sigmas[i + 1]
        if sigma_down == 0 or old_denoised is None:
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


def test_res_multistep_is_comfyui_res_multistep(mixture2d):
    grid = get_schedule("karras", model=mixture2d).grid(8)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 20
    ref = _res_multistep_reference(mixture2d, x, grid.sigmas)
    assert torch.allclose(get_sampler("res_multistep")(mixture2d, x, grid), ref, rtol=1e-10, atol=1e-10)


def _dpmpp_3m_kdiffusion(model, x, sigmas):
    """k-diffusion's sample_dpmpp_3m_sde with eta = 0 (ComfyUI dpmpp_3m_sde, eta=0)."""
    denoised_1 = denoised_2 = None
    h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = _den(model, x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * 1.0
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@pytest.mark.parametrize("final_zero", [True, False])
def test_dpmpp3m_k_diffusion_variant_is_sample_dpmpp_3m_sde_at_eta_0(final_zero, mixture2d):
    grid = get_schedule("karras", model=mixture2d).grid(7, final_zero=final_zero)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 20
    ref = _dpmpp_3m_kdiffusion(mixture2d, x, grid.sigmas)
    ours = get_sampler("dpmpp3m")(mixture2d, x, grid, variant="k-diffusion")
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    default = get_sampler("dpmpp3m")(mixture2d, x, grid)
    assert (default - ref).abs().max() > 1e-3  # below 15 steps the default (diffusers) differs


def test_dpmpp2m_k_diffusion_variant_keeps_the_last_step_second_order(mixture2d):
    """k-diffusion's sample_dpmpp_2m has no lower-order final steps: on a grid ending above 0 its last step is 2M."""
    grid = get_schedule("karras", model=mixture2d).grid(6, final_zero=False)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 20
    kd = get_sampler("dpmpp2m")(mixture2d, x, grid, variant="k-diffusion")
    assert torch.allclose(kd, get_sampler("dpmpp2m")(mixture2d, x, grid, lower_order_final=False), rtol=0, atol=1e-12)
    assert (kd - get_sampler("dpmpp2m")(mixture2d, x, grid)).abs().max() > 1e-4
