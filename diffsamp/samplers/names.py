"""The names other toolkits give our samplers: k-diffusion's and ComfyUI's sampler names, A1111's short ones and
diffusers' scheduler classes, registered as lazy aliases (``register_alias(..., lazy=True)``): they resolve at first
lookup, so names of samplers registered by modules imported after this one work too.

A diffusers scheduler class names a sampler and, through its σ options, a schedule: ``diffusers_equivalent``
gives both (``DPMSolverMultistepScheduler`` with ``use_karras_sigmas=True`` → dpmpp2m on karras).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffsamp.samplers.registry import register_alias

# (name, target, bound knobs, where the name comes from)
_TOOLKIT_NAMES: list[tuple[str, str, dict[str, Any], str]] = [
    ("dpmpp_2m", "dpmpp2m", {}, "k-diffusion/ComfyUI sample_dpmpp_2m"),
    ("dpm_2", "dpm2", {}, "k-diffusion/ComfyUI sample_dpm_2"),
    ("dpm_2_ancestral", "dpm2_ancestral", {}, "k-diffusion/ComfyUI sample_dpm_2_ancestral"),
    ("euler_a", "euler_ancestral", {}, "A1111's 'Euler a'"),
    ("dpmpp_sde_gpu", "dpmpp_sde", {}, "ComfyUI"),
    ("dpmpp_2m_sde_gpu", "dpmpp_2m_sde", {}, "ComfyUI"),
    ("dpmpp_3m_sde_gpu", "dpmpp_3m_sde", {}, "ComfyUI"),
    ("uni_pc", "unipc", {"variant": "bh1"}, "ComfyUI uni_pc (bh1)"),
    ("uni_pc_bh2", "unipc", {"variant": "bh2"}, "ComfyUI uni_pc_bh2"),
    ("sample_lms", "lms", {}, "k-diffusion"),
    ("sample_euler", "euler", {}, "k-diffusion"),
    ("sample_heun", "heun", {}, "k-diffusion"),
    ("sample_dpm_2", "dpm2", {}, "k-diffusion"),
    ("sample_dpmpp_2m", "dpmpp2m", {"variant": "k-diffusion"}, "k-diffusion"),
    ("sample_euler_ancestral", "euler_ancestral", {}, "k-diffusion"),
    ("sample_dpmpp_2s_ancestral", "dpmpp_2s_ancestral", {}, "k-diffusion"),
    ("sample_dpmpp_sde", "dpmpp_sde", {}, "k-diffusion"),
    ("sample_dpmpp_2m_sde", "dpmpp_2m_sde", {}, "k-diffusion"),
    ("sample_dpmpp_3m_sde", "dpmpp_3m_sde", {}, "k-diffusion"),
    ("sample_ipndm", "ipndm", {}, "k-diffusion"),
    ("sample_deis", "deis", {}, "k-diffusion"),
    ("sample_res_multistep", "res_multistep", {}, "ComfyUI"),
]

# diffusers scheduler class → (sampler, bound knobs); the schedule comes from its σ options (diffusers_equivalent)
DIFFUSERS_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIMScheduler": ("ddim", {}),
    "DDPMScheduler": ("ddpm", {}),
    "EulerDiscreteScheduler": ("euler", {}),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", {}),
    "HeunDiscreteScheduler": ("heun", {}),
    "KDPM2DiscreteScheduler": ("dpm2", {}),
    "KDPM2AncestralDiscreteScheduler": ("dpm2_ancestral", {}),
    "LMSDiscreteScheduler": ("lms", {}),
    "DPMSolverMultistepScheduler": ("dpmpp2m", {}),
    "DPMSolverSDEScheduler": ("dpmpp_sde", {}),
    "UniPCMultistepScheduler": ("unipc", {}),
    "DEISMultistepScheduler": ("deis", {}),
}

for _name, _target, _knobs, _src in _TOOLKIT_NAMES:
    register_alias(_name, _target, description=f"{_src}: = {_target}", lazy=True, **_knobs)
for _name, (_target, _knobs) in DIFFUSERS_SCHEDULERS.items():
    register_alias(_name, _target, lazy=True, description=f"diffusers' {_name}: = {_target} (σ's: diffusers_equivalent)",
                   **_knobs)


def diffusers_equivalent(scheduler: Any, config: Mapping[str, Any] | None = None) -> tuple[str, str, dict[str, Any]]:
    """(sampler, schedule, knobs) that implement a diffusers scheduler: ``scheduler`` is an instance or a class name
    (then ``config`` holds its settings). σ options: use_karras_sigmas → karras, use_exponential_sigmas → exponential,
    use_beta_sigmas → beta, else ddpm (the model's timesteps; diffusers' multistep schedulers space them over n + 1
    points, so the grids agree only for some n). Solver settings carried over: solver_order → order,
    solver_type → variant (UniPC), lower_order_final.
    """
    if isinstance(scheduler, str):
        name, cfg = scheduler, dict(config or {})
    else:
        name, cfg = type(scheduler).__name__, {**dict(scheduler.config), **dict(config or {})}
    if name not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"no sampler here implements diffusers' {name}; known: {', '.join(sorted(DIFFUSERS_SCHEDULERS))}")
    sampler, knobs = DIFFUSERS_SCHEDULERS[name]
    knobs = dict(knobs)
    if cfg.get("use_karras_sigmas"):
        schedule = "karras"
    elif cfg.get("use_exponential_sigmas"):
        schedule = "exponential"
    elif cfg.get("use_beta_sigmas"):
        schedule = "beta"
    else:
        schedule = "ddpm"
    if name == "DPMSolverMultistepScheduler" and cfg.get("solver_order", 2) != 2:
        sampler = {1: "euler", 3: "dpmpp3m"}[cfg["solver_order"]]
    elif name in ("UniPCMultistepScheduler", "DEISMultistepScheduler") and "solver_order" in cfg:
        knobs["order"] = cfg["solver_order"]
    if name == "UniPCMultistepScheduler" and "solver_type" in cfg:
        knobs["variant"] = cfg["solver_type"]
    if name in ("UniPCMultistepScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler") \
            and "lower_order_final" in cfg and sampler != "euler":
        knobs["lower_order_final"] = bool(cfg["lower_order_final"])
    return sampler, schedule, knobs
