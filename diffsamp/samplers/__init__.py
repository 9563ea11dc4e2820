"""Registered samplers and σ schedules. Importing this package fills the registry."""

from diffsamp.samplers.grid import (
    Grid,
    Schedule,
    available_schedules,
    get_schedule,
    schedule_description,
)
from diffsamp.samplers.registry import (
    SamplerSpec,
    available_samplers,
    get_sampler,
    register_alias,
    register_sampler,
    sampler_aliases,
    suggest_samplers,
)
from diffsamp.samplers._util import StepInfo
from diffsamp.samplers import amed, ancestral, multistep, ode, sde  # noqa: F401  (registration side effects)
from diffsamp.samplers import ancestral_k, dpmpp_sde, epd, restart  # noqa: F401  (registration side effects)
from diffsamp.samplers.amed import StepState, amed_step, step_start
from diffsamp.samplers import names  # noqa: F401,E402  (aliases; last: they name samplers registered above)
from diffsamp.samplers.names import diffusers_equivalent

__all__ = [
    "Grid",
    "SamplerSpec",
    "Schedule",
    "StepInfo",
    "StepState",
    "amed_step",
    "available_samplers",
    "available_schedules",
    "diffusers_equivalent",
    "get_sampler",
    "get_schedule",
    "register_alias",
    "register_sampler",
    "sampler_aliases",
    "schedule_description",
    "step_start",
    "suggest_samplers",
]
