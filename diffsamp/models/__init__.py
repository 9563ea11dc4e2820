"""Models as σ-space denoisers; ``load(name_or_path)`` gets one from the zoo, a directory or the Hub."""

from diffsamp.models.zoo import available_models, load, model_card, sample_shape

__all__ = ["available_models", "load", "model_card", "sample_shape"]
