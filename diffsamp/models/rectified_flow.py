"""Rectified flow (Liu, Gong & Liu 2023, "Flow Straight and Fast"): a velocity network as a σ-space denoiser.

Our convention (``diffsamp.models.parameterization``, CONTRIBUTING.md): t ∈ [0, 1], t = 0 data, t = 1 noise,

    x_t = (1 − t)·x0 + t·ε,   v = dx_t/dt = ε − x0,   σ = t/(1 − t),   x_t = x̄/(1 + σ),   x̂0 = x_t − t·v.

The RF paper and its code run time the other way: t_paper = 1 − t, X_{t_paper} = t_paper·X1 + (1 − t_paper)·X0
with X0 = noise and X1 = data, and v_paper = X1 − X0 = −v. So the paper's Euler step
Z_{t_p + 1/N} = Z_{t_p} + v_paper(Z, t_p)/N is, in our time, x_{t − 1/N} = x_t − v(x_t, t)/N, and a paper
checkpoint's velocity network plugs in here as v(x, t) = −v_paper(x, 1 − t). ``RFDenoiser`` converts at the
boundary so every registered sampler runs on a rectified flow; ``euler`` on the ``rf`` schedule *is* the
paper's Euler method (tests/test_rectified_flow.py checks it to 1e-12 in float64).

σ = ∞ (t = 1) is not representable in σ-space: sampling starts just inside, at t_max = 1 − 10⁻³ (the RF
code's ε), with x_{t_max} = z, i.e. x̄ = (1 + σ_max)·z (``prior_scale('rf', σ)``).

This module is the family: the adapter ``RFDenoiser`` and its on-disk format (``save_rf``, ``load_rf``,
``is_rf_model``). A model on disk is two files: ``NAME.safetensors`` (the network's weights) and ``NAME.json`` (architecture,
time scale, source distribution, how it was trained, how to sample it). No pickles.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsamp.io import load_safetensors, read_json, save_safetensors, write_json
from diffsamp.models.base import DenoiserBase, Prior
from diffsamp.models.networks import MLPVelocity, build_network, call_velocity, network_spec, param_dtype
from diffsamp.models.parameterization import T_MAX, T_MIN, rf_t_from_sigma
FORMAT = "diffsamp-rectified-flow"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- networks
# ---------------------------------------------------------------------------------------------- denoiser
class RFDenoiser(DenoiserBase):
    """A rectified-flow velocity network ``net(x_t, time_scale·t) ≈ ε − x0`` as a σ-space denoiser.

    D(x̄, σ) = x_t − t·v(x_t, t) with t = σ/(1 + σ) and x_t = x̄/(1 + σ) (CONTRIBUTING.md). ``time_scale`` is what
    the network's time input is multiplied by: 999 for a diffusers ``UNet2DModel`` (the RF code feeds 999·t,
    which matches the UNet's timestep embedding range), 1 for ``MLPVelocity``.

    ``source``: the distribution x_{t=1} is drawn from — "normal" (N(0, I), the generative setting, whose
    prior in σ-space is (1 + σ)·z) or a toy's source name for 2-D couplings (``diffsamp.data.toys``).
    ``autocast``: run the network under bf16 autocast on CUDA (the conversion stays in the input dtype).
    """

    prior: Prior = "rf"

    def __init__(
        self,
        net: nn.Module,
        *,
        time_scale: float = 999.0,
        t_max: float = T_MAX,
        t_min: float = T_MIN,
        source: str = "normal",
        info: dict[str, Any] | None = None,
        autocast: bool = False,
    ) -> None:
        if not 0 < t_min < t_max < 1:
            raise ValueError(f"need 0 < t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.network = net
        self.time_scale = float(time_scale)
        self.t_max, self.t_min = float(t_max), float(t_min)
        self.sigma_max = float(t_max / (1 - t_max))
        self.sigma_min = float(t_min / (1 - t_min))
        self.source = source
        self.info: dict[str, Any] = dict(info or {})
        self.autocast = autocast
        self.feature_module: nn.Module | None = getattr(net, "mid_block", None)

    # native interface ---------------------------------------------------------------------------------
    def velocity(self, x_t: Tensor, t: Tensor) -> Tensor:
        """v(x_t, t) = dx_t/dt ≈ E[ε − x0 | x_t] in our time (t = 1 noise); ``t`` of shape (B,) or scalar."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        net_dtype = param_dtype(self.network)
        use_ac = self.autocast and x_t.device.type == "cuda"
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_ac else nullcontext()
        with ctx:
            v = call_velocity(self.network, x_t.to(net_dtype), (t * self.time_scale).to(torch.float32))
        return v.to(x_t.dtype)

    # σ-space interface --------------------------------------------------------------------------------
    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sig = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        t = rf_t_from_sigma(sig)
        x_t = x / (1 + sig)
        v = self.velocity(x_t, t.reshape(-1))
        return x_t - t * v

    # convenience --------------------------------------------------------------------------------------
    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) for a UNet, (d,) for an MLP."""
        cfg = getattr(self.network, "config", None)
        if isinstance(self.network, MLPVelocity):
            return (int(self.network.config["dim"]),)
        if cfg is not None and hasattr(cfg, "in_channels"):
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
            return (int(cfg.in_channels), int(size), int(size))
        raise ValueError("cannot tell this network's sample shape")

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "RFDenoiser":
        self.network.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "RFDenoiser":
        self.network.eval().requires_grad_(False)
        return self

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
        """Write ``path`` (.safetensors, weights in ``dtype``) and the JSON config beside it."""
        return save_rf(self, path, dtype=dtype)


# ---------------------------------------------------------------------------------------------- save/load
def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_rf(model: RFDenoiser, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """Save weights (safetensors, atomically) and config (JSON) of an ``RFDenoiser``."""
    weights, cfg_path = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.network.state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "network": network_spec(model.network),
        "time_scale": model.time_scale,
        "t_max": model.t_max,
        "t_min": model.t_min,
        "source": model.source,
        "convention": "t=0 data, t=1 noise, x_t=(1-t)x0+t*eps, v=eps-x0 (diffsamp.models.rectified_flow)",
        "weights_dtype": str(dtype).replace("torch.", ""),
        **model.info,
    }
    save_safetensors(tensors, weights, {"format": FORMAT})
    write_json(cfg_path, config)
    return weights, cfg_path


def is_rf_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` (weights, config, or a run directory holding model.json) is a saved rectified flow."""
    try:
        cfg = _config_path(path)
    except FileNotFoundError:
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not a JSON object
        return False


def _config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "model.json"
    weights, cfg = _paths(p)
    if not cfg.is_file():
        raise FileNotFoundError(f"no rectified-flow config at {cfg}")
    return cfg


def load_rf(
    path: str | os.PathLike, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> RFDenoiser:
    """Load an ``RFDenoiser`` saved by ``save_rf`` (or a run directory of ``diffsamp train rf|reflow|distill``)."""
    cfg_path = _config_path(path)
    weights = cfg_path.with_suffix(".safetensors")
    config = read_json(cfg_path, fmt=FORMAT, what="a diffsamp rectified-flow model")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (the weights of {cfg_path})")
    net = build_network(config["network"])
    state = load_safetensors(weights)
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    net.to(device=device).eval().requires_grad_(False)
    if dtype != torch.float32:  # (a dtype-less move keeps diffusers from warning about fp32-only modules)
        net.to(dtype=dtype)
    skip = {"format", "format_version", "network", "time_scale", "t_max", "t_min", "source", "convention", "weights_dtype"}
    return RFDenoiser(
        net,
        time_scale=config["time_scale"],
        t_max=config.get("t_max", T_MAX),
        t_min=config.get("t_min", T_MIN),
        source=config.get("source", "normal"),
        info={k: v for k, v in config.items() if k not in skip},
    )


def euler_rf_native(model: RFDenoiser, z: Tensor, n: int, *, t_max: float | None = None) -> Tensor:
    """The RF paper's Euler method written natively in t (our direction): n equal steps from t_max to 0,
    x_{t − Δ} = x_t − Δ·v(x_t, t), Δ = t_max/n, starting from x_{t_max} = z. A reference for tests."""
    t_max = model.t_max if t_max is None else t_max
    x = z
    dt = t_max / n
    for k in range(n):
        t = t_max * (1 - k / n)
        x = x - dt * model.velocity(x, torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device))
    return x
