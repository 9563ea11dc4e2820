"""Rectified flow (Liu, Gong & Liu 2023, "Flow Straight and Fast"): a velocity network as a σ-space denoiser.

Our convention (``diffsamp.models.parameterization``, SPEC §5.1, §7.2): t ∈ [0, 1], t = 0 data, t = 1 noise,

    x_t = (1 − t)·x0 + t·ε,   v = dx_t/dt = ε − x0,   σ = t/(1 − t),   x_t = x̄/(1 + σ),   x̂0 = x_t − t·v.

The RF paper and its code run time the other way: t_paper = 1 − t, X_{t_paper} = t_paper·X1 + (1 − t_paper)·X0
with X0 = noise and X1 = data, and v_paper = X1 − X0 = −v. So the paper's Euler step
Z_{t_p + 1/N} = Z_{t_p} + v_paper(Z, t_p)/N is, in our time, x_{t − 1/N} = x_t − v(x_t, t)/N, and a paper
checkpoint's velocity network plugs in here as v(x, t) = −v_paper(x, 1 − t). ``RFDenoiser`` converts at the
boundary so every registered sampler runs on a rectified flow; ``euler`` on the ``rf`` schedule *is* the
paper's Euler method (tests/test_rectified_flow.py checks it to 1e-12 in float64).

σ = ∞ (t = 1) is not representable in σ-space: sampling starts just inside, at t_max = 1 − 10⁻³ (the RF
code's ε), with x_{t_max} = z, i.e. x̄ = (1 + σ_max)·z (``prior_scale('rf', σ)``).

A model on disk is two files: ``NAME.safetensors`` (the network's weights) and ``NAME.json`` (architecture,
time scale, source distribution, how it was trained, how to sample it). No pickles.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsamp.atomic import atomic_write_text
from diffsamp.models.base import Prior
from diffsamp.models.zoo import WEIGHTS_DIR
from diffsamp.models.parameterization import rf_sigma_from_t, rf_t_from_sigma

T_MAX = 1.0 - 1e-3  # the stated start just inside σ = ∞ (SPEC §5.3, §7.2)
T_MIN = 1e-3
FORMAT = "diffsamp-rectified-flow"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- networks
class TimeEmbedding(nn.Module):
    """Sinusoidal features of t ∈ [0, 1]: sin/cos(2π·k·t) for k = 1 … n_freq (plus t itself)."""

    def __init__(self, n_freq: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.arange(1, n_freq + 1, dtype=torch.float32), persistent=False)
        self.dim = 2 * n_freq + 1

    def forward(self, t: Tensor) -> Tensor:
        a = t[:, None].float() * self.freqs[None, :]
        return torch.cat([t[:, None].float(), a.sin(), a.cos()], dim=1)


class MLPVelocity(nn.Module):
    """A small MLP v(x, t) for d-dimensional toy data: [x, emb(t)] → hidden (SiLU) × depth → d."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, n_freq: int = 16) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"MLPVelocity needs positive dim/hidden/depth, got {dim}/{hidden}/{depth}")
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "n_freq": n_freq}
        self.embed = TimeEmbedding(n_freq)
        layers: list[nn.Module] = []
        width = dim + self.embed.dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self.net(torch.cat([x, self.embed(t).to(x.dtype)], dim=1))


def call_velocity(net: nn.Module, x: Tensor, t_model: Tensor) -> Tensor:
    """The network's raw output v for input x at model time ``t_model`` (diffusers returns ``.sample``)."""
    out = net(x, t_model)
    return out.sample if hasattr(out, "sample") else out


def make_mlp(dim: int = 2, hidden: int = 128, depth: int = 3) -> MLPVelocity:
    return MLPVelocity(dim, hidden, depth)


# ---------------------------------------------------------------------------------------------- denoiser
class RFDenoiser:
    """A rectified-flow velocity network ``net(x_t, time_scale·t) ≈ ε − x0`` as a σ-space denoiser.

    D(x̄, σ) = x_t − t·v(x_t, t) with t = σ/(1 + σ) and x_t = x̄/(1 + σ) (SPEC §7.3). ``time_scale`` is what
    the network's time input is multiplied by: 999 for a diffusers ``UNet2DModel`` (the RF code feeds 999·t,
    which matches the UNet's timestep embedding range), 1 for ``MLPVelocity``.

    ``source``: the distribution x_{t=1} is drawn from — "normal" (N(0, I), the generative setting, whose
    prior in σ-space is (1 + σ)·z) or a toy's source name for 2-D couplings (``diffsamp.toys``).
    ``autocast``: run the network under bf16 autocast on CUDA (the conversion stays in the input dtype).
    """

    prior: Prior = "rf"
    alphas_cumprod: Tensor | None = None

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
        net_dtype = _param_dtype(self.network)
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


class AutocastDenoiser:
    """Runs any denoiser under bf16 autocast on CUDA (for fast pair generation); output in the input dtype."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        for attr in ("sigma_min", "sigma_max", "prior", "alphas_cumprod", "feature_module", "network"):
            setattr(self, attr, getattr(inner, attr, None))

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            out = self.inner(x, sigma)
        return out.to(x.dtype)


def _param_dtype(net: nn.Module) -> torch.dtype:
    for p in net.parameters():
        return p.dtype
    return torch.float32


# ---------------------------------------------------------------------------------------------- save/load
def network_spec(net: nn.Module) -> dict[str, Any]:
    """The JSON description a network is rebuilt from."""
    if isinstance(net, MLPVelocity):
        return {"kind": "mlp", "config": dict(net.config)}
    cls = type(net).__name__
    if cls == "UNet2DModel":
        return {"kind": "unet", "config": {k: v for k, v in dict(net.config).items() if not k.startswith("_")}}
    raise ValueError(f"cannot describe a {cls} network: use MLPVelocity or diffusers' UNet2DModel")


def build_network(spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("kind")
    if kind == "mlp":
        return MLPVelocity(**spec["config"])
    if kind == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel.from_config(spec["config"])
    raise ValueError(f"unknown network kind {kind!r} (expected 'mlp' or 'unet')")


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def save_rf(model: RFDenoiser, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
    """Save weights (safetensors, atomically) and config (JSON) of an ``RFDenoiser``."""
    from diffsamp.training.loop import atomic_save_safetensors

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
    atomic_save_safetensors(tensors, weights, {"format": FORMAT})
    atomic_write_text(cfg_path, json.dumps(config, indent=2) + "\n")
    return weights, cfg_path


def is_rf_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` (weights, config, or a run directory holding model.json) is a saved rectified flow."""
    try:
        cfg = _config_path(path)
    except FileNotFoundError:
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
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
    from safetensors.torch import load_file

    cfg_path = _config_path(path)
    weights = cfg_path.with_suffix(".safetensors")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from None
    if config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a diffsamp rectified-flow model (format {config.get('format')!r})")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing (the weights of {cfg_path})")
    net = build_network(config["network"])
    state = load_file(str(weights))
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


def straightness(
    model: Any, z: Tensor, *, steps: int = 100, batch_size: int = 1000, device: str | torch.device | None = None
) -> dict[str, float]:
    """The RF paper's straightness S(Z) = ∫₀¹ E‖(Z₁ − Z₀) − Ż_t‖² dt of a model's ODE, with its Monte-Carlo error.

    The path is simulated with Euler in RF time (uniform t from t₀ to 0; t₀ = t_max for flows, or the model's
    σ_max mapped to t = σ/(1 + σ) for any other denoiser — any model's probability-flow ODE written in RF
    coordinates x_t = x̄/(1 + σ) has velocity dx_t/dt = ε̂ − x̂0). Time is rescaled to unit length: with
    Δ = x_{t₀} − x_0 the straight displacement per unit time is Δ/t₀, the velocity is ż = v, and
    S_i = (1/N) Σ_k ‖Δ_i/t₀ − v(x_{t_k}, t_k)‖² (rectangle rule at the Euler nodes, where Σ_k v_k t₀/N = Δ
    exactly, so S_i is the spread of the velocity along path i). Reports S = mean_i S_i (sum over coordinates),
    its standard error, S per coordinate, and S relative to E‖Δ/t₀‖² (0 for straight paths).
    ``z``: source draws (N, *shape); the start is x̄ = prior_scale(prior, σ₀)·z.
    """
    from diffsamp.models.base import prior_scale
    from diffsamp.samplers.grid import Grid

    sigma0 = float(model.sigma_max)
    t0 = min(T_MAX, sigma0 / (1 + sigma0))
    t = t0 * (1 - torch.arange(steps + 1, dtype=torch.float64) / steps)
    sig = (t / (1 - t)).tolist()
    Grid(torch.tensor(sig))  # validates the grid
    if device is None:
        params = list(getattr(model, "network", nn.Identity()).parameters())
        device = params[0].device if params else torch.device("cpu")
    per_sample, disp_norm = [], []
    with torch.inference_mode():
        for b in range(0, z.shape[0], batch_size):
            zb = z[b : b + batch_size].to(device=device, dtype=torch.float32)
            xbar = zb * prior_scale(model.prior, sig[0])
            x_start = xbar / (1 + sig[0])
            vs = []
            for s, s_next in zip(sig[:-1], sig[1:]):
                sb = torch.full((zb.shape[0],), s, device=device, dtype=zb.dtype)
                d = model(xbar, sb)
                v = (xbar - d) / s - d  # ε̂ − x̂0 at x_t = x̄/(1 + σ)
                vs.append(v.flatten(1).double().cpu())
                xbar = d + (s_next / s) * (xbar - d)
            x_end = xbar  # σ = 0: x̄ = x_0
            disp = (x_start - x_end).flatten(1).double().cpu() / t0
            dev = torch.stack([((disp - v) ** 2).sum(1) for v in vs], dim=0).mean(0)
            per_sample.append(dev)
            disp_norm.append((disp**2).sum(1))
    s_i = torch.cat(per_sample)
    d_i = torch.cat(disp_norm)
    n, dim = s_i.numel(), int(z[0].numel())
    mean, err = float(s_i.mean()), float(s_i.std(unbiased=True) / n**0.5) if n > 1 else float("nan")
    return {"S": mean, "S_err": err, "S_per_dim": mean / dim, "S_per_dim_err": err / dim,
            "relative": mean / float(d_i.mean()), "transport_cost": float(d_i.mean()) * t0 * t0,
            "num": n, "steps": steps, "t0": t0, "dim": dim}


def shipped_rf_models() -> list[str]:
    """Names of the rectified flows shipped in ``diffsamp/weights`` (NAME.safetensors + NAME.json)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json") if is_rf_model(p))


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device | None = None) -> Any:
    """Any model diffsamp can sample (``diffsamp.models.zoo.load``): a zoo name (mnist-rf, mnist-ddpm, …), a
    saved rectified flow (file or run directory), a diffusers directory or a DDPM run directory."""
    from diffsamp.models import zoo

    name = str(name_or_path)
    if is_rf_model(name):  # a rectified flow's run directory or file: load it directly
        return load_rf(name, device=device)
    return zoo.load(name, device=device)


__all__ = [
    "AutocastDenoiser",
    "load_model",
    "shipped_rf_models",
    "straightness",
    "MLPVelocity",
    "RFDenoiser",
    "T_MAX",
    "T_MIN",
    "build_network",
    "euler_rf_native",
    "is_rf_model",
    "load_rf",
    "make_mlp",
    "network_spec",
    "rf_sigma_from_t",
    "save_rf",
]
