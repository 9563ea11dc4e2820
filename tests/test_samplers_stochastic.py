"""The k-diffusion-style stochastic samplers: ancestral (euler_ancestral, dpm2_ancestral, dpmpp_2s_ancestral) and the
stochastic DPM-Solver++ family (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) with their Brownian-tree noise.

Moments: the 2-D mixture's mean and covariance within 4 standard errors (mean: √(Var/N); covariance entry (i, j):
√((Σ_ii Σ_jj + Σ_ij²)/N)) plus a discretisation allowance of 0.03, as tests/test_stochastic_moments.py.
Identities at η = 0 (bit for bit where the arithmetic is the same), steps written out at η ≠ 0 with s_noise = 0,
and equivalence with diffusers' schedulers on a tiny random UNet (tolerances stated at each test).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import diffsamp
from diffsamp.models.analytic import GaussianMixtureDenoiser
from diffsamp.models.base import CountingDenoiser
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser
from diffsamp.samplers.brownian import BrownianNoise, tree_seeds
from diffsamp.samplers.grid import Grid
from diffsamp.samplers.ode import dpmpp_update
from tests.conftest import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ["euler_ancestral", "dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]
N = 6000


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixtureDenoiser(
        [[-1.5, 0.3], [1.0, 1.0], [0.5, -1.2]], [0.4, 0.6, 0.3], [0.3, 0.4, 0.3], sigma_min=0.01, sigma_max=40.0
    )


def _karras(model, n, final_zero=True):
    return diffsamp.get_schedule("karras", model=model).grid(n, final_zero=final_zero)


@pytest.mark.parametrize("name,knobs,steps", [
    ("euler_ancestral", {}, 100), ("euler_ancestral", {"eta": 0.5}, 100),
    ("dpm2_ancestral", {}, 40), ("dpmpp_2s_ancestral", {}, 40),
    ("dpmpp_sde", {}, 40), ("dpmpp_sde", {"noise": "gaussian"}, 40),
    ("dpmpp_2m_sde", {}, 40), ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}, 40),
    ("dpmpp_3m_sde", {}, 40),
])
def test_moments(mixture, name, knobs, steps):
    g = torch.Generator().manual_seed(123)
    grid = _karras(mixture, steps)
    x = torch.randn(N, 2, generator=g, dtype=torch.float64) * float(grid.sigmas[0])
    out = diffsamp.get_sampler(name)(mixture, x, grid, generator=g, **knobs)
    mean, cov = mixture.mean(), mixture.covariance()
    se_mean = (torch.diag(cov) / N).sqrt()
    se_cov = ((torch.outer(torch.diag(cov), torch.diag(cov)) + cov**2) / N).sqrt()
    assert ((out.mean(0) - mean).abs() < 4 * se_mean + 0.03).all(), f"{name}: mean {out.mean(0)} vs {mean}"
    assert ((torch.cov(out.T) - cov).abs() < 4 * se_cov + 0.03).all(), f"{name}: cov {torch.cov(out.T)} vs {cov}"


def _run(name, model, x, grid, seed=7, **knobs):
    return diffsamp.get_sampler(name)(model, x.clone(), grid, generator=torch.Generator().manual_seed(seed), **knobs)


@pytest.mark.parametrize("name,ref,ref_knobs,tol", [
    ("euler_ancestral", "euler", {}, 0.0), ("dpm2_ancestral", "dpm2", {}, 0.0),
    # the same DPM-Solver++(2S) step in two arithmetic forms: float64 round-off only
    ("dpmpp_2s_ancestral", "dpmpp_sde", {"eta": 0.0}, 1e-12),
])
def test_eta_zero_is_the_deterministic_solver(mixture64d, name, ref, ref_knobs, tol):
    """η = 0: euler_ancestral is euler and dpm2_ancestral is dpm2 bit for bit; 2S ancestral is dpmpp_sde(η=0)."""
    grid = _karras(mixture64d, 7)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    a, b = _run(name, mixture64d, x, grid, eta=0.0), _run(ref, mixture64d, x, grid, **ref_knobs)
    assert torch.equal(a, b) if tol == 0 else torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_euler_ancestral_is_ddim_eta(mixture64d, eta):
    """For η ≤ 1 k-diffusion's σ_up is DDIM's σ_t(η) in σ-space: the same draws give the same samples."""
    grid = _karras(mixture64d, 6)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    assert torch.equal(_run("euler_ancestral", mixture64d, x, grid, eta=eta), _run("ancestral", mixture64d, x, grid, eta=eta))


def test_dpmpp_2m_sde_at_eta_zero_is_dpmpp2m(mixture64d):
    grid = _karras(mixture64d, 9)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    for solver_type in ("midpoint",):
        ours = _run("dpmpp_2m_sde", mixture64d, x, grid, eta=0.0, solver_type=solver_type)
        ref = _run("dpmpp2m", mixture64d, x, grid, lower_order_final=False)
        assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12), float((ours - ref).abs().max())


def test_dpmpp_3m_sde_at_eta_zero(mixture64d):
    """Its first two steps are 2m_sde (heun); its third step is DPM-Solver++(3M) (Alg. 2) fed the same history."""
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    grid3 = _karras(mixture64d, 3)
    a = _run("dpmpp_3m_sde", mixture64d, x, grid3, eta=0.0)
    assert torch.allclose(a, _run("dpmpp_2m_sde", mixture64d, x, grid3, eta=0.0, solver_type="heun"), rtol=1e-12, atol=1e-12)
    grid = _karras(mixture64d, 5, final_zero=False)
    rec = []
    diffsamp.get_sampler("dpmpp_3m_sde")(mixture64d, x, grid, eta=0.0, callback=rec.append)
    xs = [x] + [r.x for r in rec]
    hist = [(rec[j].sigma, xs[j], rec[j].denoised) for j in (1, 0)]
    ref = dpmpp_update(xs[2], rec[2].denoised, rec[2].sigma, rec[2].sigma_next, hist, 10, max_order=3, total=100)
    assert torch.allclose(xs[3], ref, rtol=1e-12, atol=1e-12), float((xs[3] - ref).abs().max())


def _sde_step_written_out(x, den, hist, s, s_next, eta, kind):
    """One SDE-DPM-Solver++ step without noise (DPM-Solver++ Eq. 9 with the 2M/3M corrections at (1+η)h)."""
    lam = lambda v: -math.log(v)  # noqa: E731
    h = lam(s_next) - lam(s)
    hh = (1 + eta) * h
    out = (s_next / s) * math.exp(-eta * h) * x + (1 - math.exp(-hh)) * den
    if not hist:
        return out
    (s1, d1), *rest = hist
    r = (lam(s) - lam(s1)) / h
    diff = (den - d1) / r
    if kind == "midpoint":
        return out + 0.5 * (1 - math.exp(-hh)) * diff
    if kind == "heun" or not rest:
        return out + ((1 - math.exp(-hh)) / (-hh) + 1) * diff
    s2, d2 = rest[0]
    r1 = (lam(s1) - lam(s2)) / h
    diff1 = (d1 - d2) / r1
    first = diff + (diff - diff1) * r / (r + r1)
    second = (diff - diff1) / (r + r1)
    phi2 = (math.exp(-hh) - 1) / hh + 1
    return out + phi2 * first - (phi2 / hh - 0.5) * second


@pytest.mark.parametrize("name,knobs,kind,depth", [
    ("dpmpp_2m_sde", {}, "midpoint", 1), ("dpmpp_2m_sde", {"solver_type": "heun"}, "heun", 1),
    ("dpmpp_3m_sde", {}, "3m", 2),
])
def test_multistep_sde_steps_written_out(mixture64d, name, knobs, kind, depth):
    """η = 0.7 with s_noise = 0: the drift of every step, against the formula written out here."""
    grid = _karras(mixture64d, 6, final_zero=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    rec = []
    diffsamp.get_sampler(name)(mixture64d, x, grid, eta=0.7, s_noise=0.0, callback=rec.append, **knobs)
    xs = [x] + [r.x for r in rec]
    for i, r in enumerate(rec):
        hist = [(rec[j].sigma, rec[j].denoised) for j in range(i - 1, max(i - 1 - depth, -1), -1)]
        ref = _sde_step_written_out(xs[i], r.denoised, hist, r.sigma, r.sigma_next, 0.7, kind)
        assert torch.allclose(xs[i + 1], ref, rtol=1e-12, atol=1e-12), (i, float((xs[i + 1] - ref).abs().max()))


def test_dpmpp_sde_step_written_out(mixture64d):
    """η = 0.6, s_noise = 0: two ancestral DPM-Solver++(1) steps, to the λ-midpoint and to σ' with D there."""
    grid = _karras(mixture64d, 4, final_zero=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    rec = []
    diffsamp.get_sampler("dpmpp_sde")(mixture64d, x, grid, eta=0.6, s_noise=0.0, callback=rec.append)
    xs = [x] + [r.x for r in rec]
    D = lambda y, s: mixture64d(y, torch.full((len(y),), s, dtype=torch.float64))  # noqa: E731

    def down(s, t):  # σ_down of k-diffusion's get_ancestral_step, η = 0.6
        up = min(t, 0.6 * math.sqrt(t**2 * (s**2 - t**2) / s**2))
        return math.sqrt(t**2 - up**2)

    for i, r in enumerate(rec):
        s, t = r.sigma, r.sigma_next
        mid = math.sqrt(s * t)
        y = xs[i]
        y_mid = D(y, s) + down(s, mid) / s * (y - D(y, s))
        d_mid = D(y_mid, mid)
        ref = d_mid + down(s, t) / s * (y - d_mid)
        assert torch.allclose(xs[i + 1], ref, rtol=1e-11, atol=1e-11), (i, float((xs[i + 1] - ref).abs().max()))


def test_dpm2_ancestral_large_eta_nfe(mixture2d):
    """η large enough to cap σ_up at σ' leaves σ_down = 0: one evaluation there, as declared."""
    spec = diffsamp.get_sampler("dpm2_ancestral")
    grid = _karras(mixture2d, 5)
    for eta in (1.0, 3.0):
        c = CountingDenoiser(mixture2d)
        spec(c, torch.randn(3, 2, dtype=torch.float64) * 20, grid, generator=torch.Generator().manual_seed(0), eta=eta)
        assert c.calls == spec.expected_nfe(grid, eta=eta)
    assert spec.expected_nfe(grid, eta=3.0) < spec.expected_nfe(grid, eta=1.0)


@pytest.mark.parametrize("name", NEW)
def test_same_seed_same_sample_at_batch_sizes_1_and_8(name, mixture2d):
    a = diffsamp.generate(mixture2d, (2,), sampler=name, steps=6, seeds=range(8), batch_size=1)
    b = diffsamp.generate(mixture2d, (2,), sampler=name, steps=6, seeds=range(8), batch_size=8)
    assert torch.equal(a.images, b.images), name


# ------------------------------------------------------------------------------ the Brownian-tree noise
def test_brownian_noise_is_consistent_under_refinement():
    """W over [σ_b, σ_a] equals the sum over a refinement, whatever tree answered first (same seeds)."""
    x = torch.zeros(4, 3, 5, dtype=torch.float64)
    coarse = BrownianNoise(x, 0.02, 20.0, seed=[1, 2, 3, 4])
    fine = BrownianNoise(x, 0.02, 20.0, seed=[1, 2, 3, 4])
    pts = [10.0, 7.0, 5.5, 3.0, 1.0]
    parts = sum(fine.increment(a, b) for a, b in zip(pts[:-1], pts[1:]))
    whole = coarse.increment(10.0, 1.0)
    assert torch.allclose(parts, whole, rtol=0, atol=1e-12)
    assert torch.allclose(coarse(10.0, 1.0), whole / 3.0)
    # one tree per sample: sample i's noise is its own seed's, whatever the batch
    alone = BrownianNoise(x[2:3], 0.02, 20.0, seed=[3])
    assert torch.equal(alone.increment(10.0, 1.0)[0], whole[2])


def test_brownian_noise_law():
    """n(σ, σ') ~ N(0, 1) entrywise; increments over disjoint intervals are independent; the seeds come from the
    generators (one draw each)."""
    x = torch.zeros(1, 20000, dtype=torch.float64)
    b = BrownianNoise(x, 0.1, 10.0, seed=5)
    n1, n2 = b(8.0, 4.0).flatten(), b(4.0, 1.0).flatten()
    for n in (n1, n2):
        assert abs(n.mean()) < 4 / math.sqrt(20000) and abs(n.var() - 1) < 4 * math.sqrt(2 / 20000)
    assert abs((n1 * n2).mean()) < 4 / math.sqrt(20000)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    seeds = tree_seeds(gens, 3)
    assert seeds == [int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(i))) for i in range(3)]


# ------------------------------------------------------------------------------ diffusers' schedulers
def _loop(unet, sched, x, generator=None, variance_noise=False):
    with torch.no_grad():
        for k, t in enumerate(sched.timesteps):
            kw = {"generator": generator} if generator is not None else {}
            if variance_noise:  # diffusers draws float32 noise: hand it the float64 draws we make
                last = k == len(sched.timesteps) - 1
                kw = {"variance_noise": torch.zeros_like(x) if last else
                      torch.randn(x.shape, generator=generator, dtype=torch.float64)}
            x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("cls_name,name,spacing,knobs,n,rtol", [
    # diffusers steps in float32 (EulerAncestral upcasts the sample, its σ's are float32): ~1e-7 relative
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", "leading", {}, 10, 1e-6),
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", "trailing", {}, 10, 1e-6),
    ("KDPM2AncestralDiscreteScheduler", "dpm2_ancestral", "leading", {}, 10, 1e-6),
    ("KDPM2AncestralDiscreteScheduler", "dpm2_ancestral", "trailing", {}, 10, 1e-6),
    ("DPMSolverMultistepScheduler", "dpmpp_2m_sde", "linspace", {"noise": "gaussian"}, 10, 1e-6),
    ("DPMSolverMultistepScheduler", "dpmpp_2m_sde", "linspace", {"noise": "gaussian", "solver_type": "heun"}, 20, 1e-6),
])
def test_matches_diffusers_with_shared_generator(cls_name, name, spacing, knobs, n, rtol, record_property):
    """Same σ's (diffusers' own, float32), same starting x̄ and the same generator draws."""
    import diffusers

    cfg = {"timestep_spacing": spacing}
    vp = cls_name == "DPMSolverMultistepScheduler"
    if vp:
        cfg |= {"algorithm_type": "sde-dpmsolver++", "solver_type": knobs.get("solver_type", "midpoint")}
    sched = getattr(diffusers, cls_name)(**cfg)
    sched.set_timesteps(n)
    unet = tiny_unet().double()
    den = DiffusersUNetDenoiser(unet, sched.alphas_cumprod, sched.config.prediction_type)
    grid = Grid(torch.unique_consecutive(sched.sigmas.double()))
    assert len(grid) == n
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z if vp else z * float(sched.init_noise_sigma)  # diffusers' multistep scheduler runs in x_t = x̄/√(1+σ²)
    ref = _loop(unet, sched, x.clone(), torch.Generator().manual_seed(1), variance_noise=vp)
    start = z * math.sqrt(1 + float(grid.sigmas[0]) ** 2) if vp else x
    with torch.no_grad():
        ours = diffsamp.get_sampler(name)(den, start, grid, generator=torch.Generator().manual_seed(1), **knobs)
    scale = float(ref.abs().max())
    record_property("max_abs_diff", float((ours - ref).abs().max())), record_property("state_scale", scale)
    assert torch.allclose(ours, ref, rtol=rtol, atol=rtol * scale), float((ours - ref).abs().max())


@pytest.mark.parametrize("s_noise,rtol", [(0.0, 1e-6), (1.0, 2e-4)])
def test_dpmpp_sde_matches_diffusers_dpmsolver_sde(s_noise, rtol, record_property):
    """DPMSolverSDEScheduler given our trees' seeds (``noise_sampler_seed``, one per sample) draws the same Brownian
    paths. Without noise (s_noise = 0, the ancestral split still used) the two agree to float32 (1e-6 relative);
    with it to 2e-4 relative (measured 8e-5): diffusers queries its trees at float32 σ's, which torchsde resolves
    to its tolerance 1e-6 in σ. A different seed differs by O(1)."""
    from diffusers import DPMSolverSDEScheduler

    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
    sched = DPMSolverSDEScheduler(timestep_spacing="leading", noise_sampler_seed=tree_seeds(gens(), 3))
    sched.set_timesteps(8)
    unet = tiny_unet().double()
    den = DiffusersUNetDenoiser(unet, sched.alphas_cumprod)
    grid = Grid(torch.unique_consecutive(sched.sigmas.double()))
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(sched.init_noise_sigma)
    ref = z.clone()
    with torch.no_grad(), warnings.catch_warnings():  # diffusers queries its trees an ulp outside their ends
        warnings.simplefilter("ignore", UserWarning)
        for t in sched.timesteps:
            ref = sched.step(unet(sched.scale_model_input(ref, t), t).sample, t, ref, s_noise=s_noise).prev_sample
    with torch.no_grad():
        ours = diffsamp.get_sampler("dpmpp_sde")(den, z, grid, generator=gens(), s_noise=s_noise)
        other = diffsamp.get_sampler("dpmpp_sde")(den, z, grid, generator=torch.Generator().manual_seed(99))
    scale = float(ref.abs().max())
    record_property("max_abs_diff", float((ours - ref).abs().max())), record_property("state_scale", scale)
    assert torch.allclose(ours, ref, rtol=rtol, atol=rtol * scale), float((ours - ref).abs().max())
    if s_noise:
        assert (other - ref).abs().max() > 100 * rtol * scale



# ------------------------------------------------------------------------------ EDM's stochastic sampler (churn)
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_churn_steps_written_out(mixture64d, name):
    """EDM Alg. 2 with S_churn = 3, S_noise = 1.01 and a window [S_tmin, S_tmax] that leaves some steps out."""
    grid = _karras(mixture64d, 6)
    knobs = {"s_churn": 3.0, "s_tmin": 0.05, "s_tmax": 5.0, "s_noise": 1.01}
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    ours = _run(name, mixture64d, x, grid, seed=3, **knobs)
    g = torch.Generator().manual_seed(3)
    D = lambda y, s: mixture64d(y, torch.full((len(y),), s, dtype=torch.float64))  # noqa: E731
    y, churned = x.clone(), 0
    for s, t in grid.intervals():
        gamma = min(3.0 / 6, 2**0.5 - 1) if 0.05 <= s <= 5.0 else 0.0
        s_hat = s * (1 + gamma)
        if gamma > 0:
            churned += 1
            y = y + 1.01 * math.sqrt(s_hat**2 - s**2) * torch.randn(y.shape, generator=g, dtype=torch.float64)
        d = (y - D(y, s_hat)) / s_hat
        y_next = y + (t - s_hat) * d
        if name == "heun" and t > 0:
            y_next = y + (t - s_hat) * (d + (y_next - D(y_next, t)) / t) / 2
        y = y_next
    assert 0 < churned < len(grid)
    assert torch.allclose(ours, y, rtol=1e-12, atol=1e-12), float((ours - y).abs().max())


def test_churn_zero_is_the_deterministic_solver(mixture64d):
    grid = _karras(mixture64d, 6)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    for name in ("euler", "heun"):
        assert torch.equal(_run(name, mixture64d, x, grid, s_churn=0.0, s_noise=1.5), _run(name, mixture64d, x, grid))


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_churn_moments(mixture, name):
    """Churn with S_churn = 40 (EDM's ImageNet setting, γ = √2 − 1 at 40 steps) keeps the mixture's moments."""
    steps = 80 if name == "euler" else 40
    g = torch.Generator().manual_seed(123)
    grid = _karras(mixture, steps)
    x = torch.randn(N, 2, generator=g, dtype=torch.float64) * float(grid.sigmas[0])
    out = diffsamp.get_sampler(name)(mixture, x, grid, generator=g, s_churn=40.0)
    mean, cov = mixture.mean(), mixture.covariance()
    se_mean = (torch.diag(cov) / N).sqrt()
    se_cov = ((torch.outer(torch.diag(cov), torch.diag(cov)) + cov**2) / N).sqrt()
    assert ((out.mean(0) - mean).abs() < 4 * se_mean + 0.03).all(), f"{name}: mean {out.mean(0)} vs {mean}"
    assert ((torch.cov(out.T) - cov).abs() < 4 * se_cov + 0.03).all(), f"{name}: cov {torch.cov(out.T)} vs {cov}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_per_sample_noise_rows_are_each_generators_own_draws(dtype):
    """Row i of ``randn_per_sample`` is what ``torch.randn`` gives with generator i alone (image i never depends on
    the batch it was drawn in), in every dtype."""
    from diffsamp.samplers._util import randn_per_sample

    seeds = [7, 0, 123456]
    rows = randn_per_sample([torch.Generator().manual_seed(s) for s in seeds], (2, 5, 3), dtype=dtype)
    alone = torch.stack([torch.randn((2, 5, 3), generator=torch.Generator().manual_seed(s), dtype=dtype) for s in seeds])
    assert rows.shape == (3, 2, 5, 3) and rows.dtype == dtype and torch.equal(rows, alone)
