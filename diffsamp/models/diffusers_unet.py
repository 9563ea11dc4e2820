"""A diffusers ``UNet2DModel`` trained on a discrete DDPM schedule, seen as a σ-space denoiser.

σ_t = √((1−ᾱ_t)/ᾱ_t); the network is called on x_VP = x̄/√(1+σ²) at the timestep t(σ) found by
linear interpolation of log σ_t (optionally quantized to an integer step), and its output is converted
by ``prediction_type``: ε → D = x̄ − σε, v → D = √ᾱ x_VP − √(1−ᾱ) v, sample → D = x̂0 (SPEC §4.2, §7.3).

``clip_sample`` clamps D to [−r, r], as diffusers' DDPM/DDIM schedulers clamp their x̂0 when the scheduler
config says ``clip_sample: true`` (range ``clip_sample_range``). ``from_pretrained`` follows the model's
own config by default, so every sampler sees the model as its scheduler would; ``clip=False`` turns it off.
With ε-prediction it matters most at high σ, where x̂0 = x̄ − σε̂ amplifies the network's error by σ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffsamp.models.base import Prior
from diffsamp.models.parameterization import ddpm_timestep_from_sigma, vp_scale, x0_from_eps, x0_from_v
from diffsamp.samplers.grid import ddpm_sigmas

PredictionType = Literal["epsilon", "v_prediction", "sample"]


class DiffusersUNetDenoiser:
    """D(x̄, σ) from ``unet`` + its scheduler's ᾱ_t table + ``prediction_type``.

    ``feature_module`` is the UNet's ``mid_block`` (the bottleneck AMED reads).
    """

    prior: Prior = "vp"

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: Tensor,
        prediction_type: PredictionType = "epsilon",
        *,
        quantize: bool = False,
        clip_sample: float | None = None,
    ) -> None:
        if clip_sample is not None and not clip_sample > 0:
            raise ValueError(f"clip_sample must be a positive range or None, got {clip_sample}")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or sample"
            )
        self.network = unet
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.prediction_type = prediction_type
        self.quantize = quantize
        self.clip_sample = clip_sample
        sig = ddpm_sigmas(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = float(sig[0]), float(sig[-1])
        self.feature_module: nn.Module | None = getattr(unet, "mid_block", None)
        self._ac_cache: dict[torch.device, Tensor] = {}

    def _table(self, device: torch.device) -> Tensor:
        if device not in self._ac_cache:
            dtype = torch.float64 if device.type != "mps" else torch.float32
            self._ac_cache[device] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return self._ac_cache[device]

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's (possibly fractional) timestep for σ."""
        return ddpm_timestep_from_sigma(sigma, self._table(sigma.device), quantize=self.quantize)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        cfg = self.network.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"this UNet takes (B, {cfg.in_channels}, H, W) images, got x of shape {tuple(x.shape)}"
            )
        sig = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        x_in = x * vp_scale(sig)
        net_dtype = next(self.network.parameters()).dtype
        t = self.timestep(sigma).to(torch.float32)
        out = self.network(x_in.to(net_dtype), t).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            out = x0_from_eps(x, out, sig)
        elif self.prediction_type == "v_prediction":
            out = x0_from_v(x, out, sig)
        if self.clip_sample is not None:
            out = out.clamp(-self.clip_sample, self.clip_sample)
        return out

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantize: bool = False,
        clip: bool | None = None,
    ) -> "DiffusersUNetDenoiser":
        """Load a diffusers UNet2DModel and its scheduler config from a local directory or a Hub id.

        Accepts the pipeline layout (``unet/`` + ``scheduler/``, as ``DDPMPipeline.save_pretrained``
        writes) and the flat layout (``config.json`` + ``scheduler_config.json``, e.g.
        ``google/ddpm-cifar10-32``). Offline without the files: a ValueError that says so.
        ``clip``: clamp x̂0 as the scheduler config's ``clip_sample`` says (None), always (True) or never (False).
        """
        from diffusers import UNet2DModel

        path = Path(name_or_path)
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{path} is a file; a diffusers model is a directory with config.json")
            unet_dir = path / "unet" if (path / "unet" / "config.json").exists() else path
            if not (unet_dir / "config.json").exists():
                raise ValueError(f"{path} has no diffusers UNet (no config.json or unet/config.json)")
            sched_cfg = _local_scheduler_config(path)
            unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False, torch_dtype=dtype)
        else:
            unet, sched_cfg = _hub_load(str(name_or_path), dtype)
        alphas_cumprod = scheduler_alphas_cumprod(sched_cfg)
        prediction_type = sched_cfg.get("prediction_type", "epsilon")
        unet.eval().requires_grad_(False)
        if device is not None:
            unet.to(device)
        return cls(unet, alphas_cumprod, prediction_type, quantize=quantize, clip_sample=clip_range(sched_cfg, clip))


def clip_range(config: dict[str, Any], clip: bool | None = None) -> float | None:
    """The x̂0 clamp range a scheduler config asks for (``clip_sample``, ``clip_sample_range``), or None.

    ``clip`` overrides the config: True clamps (at the config's range, default 1), False never does.
    """
    wanted = bool(config.get("clip_sample", False)) if clip is None else clip
    return float(config.get("clip_sample_range") or 1.0) if wanted else None


def scheduler_alphas_cumprod(config: dict[str, Any]) -> Tensor:
    """ᾱ_t exactly as diffusers' DDPMScheduler computes it from a scheduler config (float32 → float64)."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    sched = DDPMScheduler(**{k: config[k] for k in keys if k in config and config[k] is not None})
    return sched.alphas_cumprod.to(torch.float64)


def _local_scheduler_config(path: Path) -> dict[str, Any]:
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    raise ValueError(
        f"{path} has no scheduler config (scheduler/scheduler_config.json or scheduler_config.json): "
        "the ᾱ_t table and prediction_type are needed to use the UNet"
    )


def _hub_load(repo_id: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import DDPMScheduler, UNet2DModel

    errors = []
    for sub in ("unet", None):
        try:
            unet = UNet2DModel.from_pretrained(repo_id, subfolder=sub, low_cpu_mem_usage=False, torch_dtype=dtype)
            break
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds; report them together
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        raise ValueError(
            f"could not load {repo_id!r}: it is not a local directory and the Hugging Face Hub did not "
            f"provide it (offline, or no such repo). Download it where you have internet and pass the "
            f"local directory instead. Details: {' | '.join(e.splitlines()[0] for e in errors)}"
        )
    for sub in ("scheduler", None):
        try:
            return unet, dict(DDPMScheduler.load_config(repo_id, subfolder=sub))
        except Exception:  # noqa: BLE001
            continue
    raise ValueError(f"{repo_id!r} has a UNet but no scheduler config on the Hub")
