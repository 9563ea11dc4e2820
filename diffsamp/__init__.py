"""diffsamp: sampling from diffusion and flow models in one σ-space denoiser convention.

x = x0 + σ·ε, a model is a denoiser D(x, σ) ≈ E[x0 | x], grids are decreasing σ's, and every sampler is
a stateless function ``sampler(model, x, grid, *, generator=None, callback=None, **knobs) -> x``.
Samples are in [-1, 1]: ``save_images(out.images, "grid.png")`` writes them, ``to_uint8`` converts them.
"""

from diffsamp._version import __version__  # noqa: E402

from diffsamp.models.base import ClampDenoiser, CountingDenoiser, Denoiser  # noqa: E402
from diffsamp.samplers import (  # noqa: E402
    Grid,
    available_samplers,
    available_schedules,
    get_sampler,
    get_schedule,
)
from diffsamp.samplers.amed import AmedPredictor, FixedPredictor, StaticPredictor  # noqa: E402
from diffsamp.samplers.amed_files import load_predictor, shipped_predictors  # noqa: E402
from diffsamp.api import GenerateResult, generate, integrate, make_grid  # noqa: E402
from diffsamp.images import save_images, to_float, to_uint8  # noqa: E402

__all__ = [
    "__version__",
    "AmedPredictor",
    "FixedPredictor",
    "StaticPredictor",
    "load_predictor",
    "shipped_predictors",
    "ClampDenoiser",
    "CountingDenoiser",
    "Denoiser",
    "GenerateResult",
    "Grid",
    "available_samplers",
    "available_schedules",
    "generate",
    "get_sampler",
    "get_schedule",
    "integrate",
    "make_grid",
    "save_images",
    "to_float",
    "to_uint8",
]
