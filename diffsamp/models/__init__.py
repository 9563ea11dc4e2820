"""Models as σ-space denoisers; ``load(name_or_path)`` gets one from the zoo, a directory or the Hub."""

from diffsamp.models.base import DenoiserBase, default_schedule, prior_scale
from diffsamp.models.zoo import available_models, load, model_card, sample_shape

__all__ = [
    "DenoiserBase",
    "available_models",
    "default_schedule",
    "load",
    "model_card",
    "prior_scale",
    "sample_shape",
]
