"""Error vs NFE of every registered sampler on Gaussian-mixture oracles (2-D and 64-D).

ODE samplers (deterministic): max |x − x_ref| at σ_min over 256 starting points, where x_ref is rk45 at
rtol = atol = 1e-12 on the same PF-ODE (karras grid ending at σ_min, no final zero). The number of
intervals is chosen per sampler so that its measured NFE is the largest not above the target.
SDE samplers: the distribution error at σ = 0 (grid with final zero) over 20 000 samples:
‖mean − μ‖ + ‖cov − Σ‖_F against the mixture's exact moments (sampling noise ≈ 0.02).

    python benchmarks/oracle_convergence.py [--nfe 3,5,7,9,15,30]
"""

from __future__ import annotations

import argparse

import torch

import diffsamp
from diffsamp.models.analytic import GaussianMixtureDenoiser
from diffsamp.models.base import CountingDenoiser


def mixtures() -> dict[str, GaussianMixtureDenoiser]:
    g = torch.Generator().manual_seed(3)
    return {
        "2-D": GaussianMixtureDenoiser(
            [[-1.5, 0.3], [1.0, 1.0], [0.5, -1.2]], [0.4, 0.6, 0.3], [0.3, 0.4, 0.3], sigma_min=0.002, sigma_max=80.0
        ),
        "64-D": GaussianMixtureDenoiser(
            torch.randn(5, 64, generator=g, dtype=torch.float64), [0.5, 0.7, 0.6, 0.4, 0.8], sigma_min=0.002, sigma_max=80.0
        ),
    }


def run_at_nfe(model, name: str, target: int, x: torch.Tensor, final_zero: bool, generator=None):
    """Run ``name`` with the most intervals whose measured NFE ≤ target; returns (out, nfe) or None."""
    spec = diffsamp.get_sampler(name)
    sched = diffsamp.get_schedule("karras", model=model)
    best = None
    for k in range(1, target + 1):
        grid = sched.grid(k, final_zero=final_zero)
        nfe = spec.expected_nfe(grid)
        if nfe is not None and nfe <= target:
            best = grid
    if best is None:
        return None
    counter = CountingDenoiser(model)
    out = spec(counter, x, best, generator=generator)
    return out, counter.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", default="3,5,7,9,15,30")
    args = parser.parse_args()
    targets = [int(v) for v in args.nfe.split(",")]
    for label, model in mixtures().items():
        x = torch.randn(256, model.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * model.sigma_max
        ref_grid = diffsamp.get_schedule("karras", model=model).grid(1, final_zero=False)
        ref = diffsamp.get_sampler("rk45")(model, x, ref_grid, rtol=1e-12, atol=1e-12)
        print(f"\n## {label} mixture, ODE samplers: max |x − x_rk45(1e-12)| at σ_min = {model.sigma_min} (NFE)")
        print("| sampler | " + " | ".join(f"NFE≤{t}" for t in targets) + " |")
        print("|---|" + "---|" * len(targets))
        for name in diffsamp.available_samplers():
            spec = diffsamp.get_sampler(name)
            if spec.kind != "ode" or name == "rk45":
                continue
            cells = []
            for t in targets:
                res = run_at_nfe(model, name, t, x, final_zero=False)
                cells.append("—" if res is None else f"{(res[0] - ref).abs().max().item():.2e} ({res[1]})")
            print(f"| {name} | " + " | ".join(cells) + " |")
        for tol in (1e-3, 1e-5):
            c = CountingDenoiser(model)
            out = diffsamp.get_sampler("rk45")(c, x, ref_grid, rtol=tol, atol=tol)
            print(f"| rk45 rtol=atol={tol:g} | {(out - ref).abs().max().item():.2e} ({c.calls}) |")

        print(f"\n## {label} mixture, SDE samplers: ‖mean−μ‖ + ‖cov−Σ‖_F at σ=0, 20 000 samples (NFE)")
        print("| sampler | " + " | ".join(f"NFE≤{t}" for t in targets) + " |")
        print("|---|" + "---|" * len(targets))
        mu, cov = model.mean(), model.covariance()
        xs = torch.randn(20000, model.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for name in ["ddpm", "euler_maruyama", "pc"]:
            cells = []
            for t in targets:
                res = run_at_nfe(model, name, t, xs * model.sigma_max, final_zero=True, generator=torch.Generator().manual_seed(2))
                if res is None:
                    cells.append("—")
                    continue
                out, nfe = res
                err = (out.mean(0) - mu).norm() + (torch.cov(out.T) - cov).norm()
                cells.append(f"{err.item():.3f} ({nfe})")
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
