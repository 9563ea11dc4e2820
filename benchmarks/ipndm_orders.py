"""iPNDM's Adams–Bashforth order on few-step grids: accuracy and the noise it leaves (its best stated setting).

For each schedule, order 1–4 and NFE, the end point of ``ipndm`` on the grid ``diffsamp bench`` gives it (NFE steps
to σ_min) is compared with a converged ODE solution (dpm2, 200 karras steps, as ``amed_accuracy.py``): the RMS
distance, and the mean |x − (−1)| on the reference's background pixels (< −0.9), a direct measure of the
high-frequency noise a high-order fixed-coefficient extrapolation leaves when a step shrinks σ by a large factor.

    python benchmarks/ipndm_orders.py --model mnist-ddpm --nfe 3,5,7,9 --num 32
"""

from __future__ import annotations

import argparse

import torch

import diffsamp
from diffsamp.metrics.bench import plan_cell
from diffsamp.models.base import prior_scale
from diffsamp.models.zoo import load, sample_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-ddpm")
    ap.add_argument("--nfe", default="3,5,7,9")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--schedules", default="karras,time_uniform,logsnr")
    args = ap.parse_args()
    model = load(args.model)
    shape = sample_shape(model)
    karras = diffsamp.get_schedule("karras", model=model)
    s0 = float(karras.grid(1, final_zero=False).sigmas[0])
    z = torch.randn((args.num, *shape), generator=torch.Generator().manual_seed(10_000)) * prior_scale(model.prior, s0)
    with torch.inference_mode():
        ref = diffsamp.get_sampler("dpm2")(model, z, karras.grid(200, final_zero=False))
    background = ref < -0.9
    nfes = [int(v) for v in args.nfe.split(",")]
    print(f"# {args.model}, {args.num} images; cell: RMS to the converged solution / mean |x + 1| on its background "
          f"({background.float().mean():.0%} of pixels)")
    print("| schedule | max_order | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
    print("|---|---|" + "---|" * len(nfes))
    for schedule in args.schedules.split(","):
        for order in (1, 2, 3, 4):
            row = []
            for n in nfes:
                plan = plan_cell(model, args.model, "ipndm", n, schedules={"ipndm": schedule},
                                 knobs={"ipndm": {"max_order": order}})
                counter = diffsamp.CountingDenoiser(model)
                with torch.inference_mode():
                    out = diffsamp.get_sampler(plan.method)(counter, z, plan.grid, **plan.knobs)
                assert counter.calls == n, (schedule, order, n, counter.calls)
                rms = (out - ref).pow(2).mean().sqrt().item()
                residual = (out[background] + 1).abs().mean().item()
                row.append(f"{rms:.3f} / {residual:.3f}")
            print(f"| {schedule} | {order} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
