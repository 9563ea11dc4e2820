"""The networks diffsamp builds: diffusers' ``UNet2DModel`` (the zoo architecture) and a small MLP velocity net
for 2-D toys, with the JSON description each is rebuilt from (``network_spec`` ↔ ``build_network``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

# The architecture of the shipped models: 3 resolutions (32, 16, 8), one ResNet block per level and
# self-attention at 8×8 only. 1.5 M parameters (6 MB in fp32); ~0.37 GFLOP per image: 2 000 images at
# 35 NFE took ~8 minutes on one CPU core, and it trains at ~90 images/s on one idle core with bf16 autocast.
DEFAULT_CHANNELS = (16, 48, 96)
DEFAULT_LAYERS_PER_BLOCK = 1


def make_unet(
    *,
    in_channels: int = 1,
    sample_size: int = 32,
    channels: Sequence[int] = DEFAULT_CHANNELS,
    layers_per_block: int = DEFAULT_LAYERS_PER_BLOCK,
    attention_levels: Sequence[int] | None = None,
    attention_head_dim: int = 32,
    norm_num_groups: int | None = None,
    dropout: float = 0.0,
    num_class_embeds: int | None = None,
) -> nn.Module:
    """A diffusers ``UNet2DModel``; attention at the lowest resolution by default (``attention_levels``
    lists the indices of levels with self-attention; ``()`` for none). ``num_class_embeds``: a learned class
    embedding added to the time embedding (diffusers' class conditioning), one row per class index."""
    from diffusers import UNet2DModel

    channels = tuple(int(c) for c in channels)
    if len(channels) < 1:
        raise ValueError("channels must list at least one level, e.g. 32,64,128")
    if sample_size % (2 ** (len(channels) - 1)):
        raise ValueError(f"sample_size {sample_size} is not divisible by 2^{len(channels) - 1}")
    if attention_levels is None:
        attention_levels = (len(channels) - 1,) if len(channels) > 1 else ()
    groups = norm_num_groups or min(32, min(channels) // 4 if min(channels) >= 8 else 1)
    if any(c % groups for c in channels):
        raise ValueError(f"every channel count must be divisible by norm_num_groups={groups}: {channels}")
    down = tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in range(len(channels)))
    up = tuple(
        "AttnUpBlock2D" if (len(channels) - 1 - i) in attention_levels else "UpBlock2D" for i in range(len(channels))
    )
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=min(attention_head_dim, channels[-1]),
        norm_num_groups=groups,
        dropout=dropout,
        num_class_embeds=num_class_embeds,
    )


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
    """An ``MLPVelocity`` for ``dim``-dimensional toy data."""
    return MLPVelocity(dim, hidden, depth)


def param_dtype(net: nn.Module) -> torch.dtype:
    """The dtype of the first parameter (float32 for a network without any)."""
    for p in net.parameters():
        return p.dtype
    return torch.float32


def network_spec(net: nn.Module) -> dict[str, Any]:
    """The JSON description a network is rebuilt from."""
    if isinstance(net, MLPVelocity):
        return {"kind": "mlp", "config": dict(net.config)}
    cls = type(net).__name__
    if cls == "UNet2DModel":
        return {"kind": "unet", "config": {k: v for k, v in dict(net.config).items() if not k.startswith("_")}}
    raise ValueError(f"cannot describe a {cls} network: use MLPVelocity or diffusers' UNet2DModel")


def build_network(spec: dict[str, Any]) -> nn.Module:
    """The network ``network_spec`` described (fresh weights)."""
    kind = spec.get("kind")
    if kind == "mlp":
        return MLPVelocity(**spec["config"])
    if kind == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel.from_config(spec["config"])
    raise ValueError(f"unknown network kind {kind!r} (expected 'mlp' or 'unet')")
