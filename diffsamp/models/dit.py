"""The DiT family: diffusers' class-conditional latent transformer (Peebles & Xie 2023, "Scalable Diffusion Models
with Transformers"; ``DiTTransformer2DModel``, saved as ``Transformer2DModel`` by older diffusers) with its VAE,
as ``DiTPipeline`` holds them, seen as a σ-space denoiser over the VAE's latents.

The transformer is a DDPM ε-predictor on the scheduler's discrete ᾱ_t table (linear β, T = 1000 for the released
models): σ → timestep and x̄ → x_VP as for the diffusers UNets (``diffusers_unet``), D = x̄ − σ ε̂. Its output has
2·C channels where it learned the variance (Peebles & Xie 2023, Sec. 3.1, after Nichol & Dhariwal 2021): the
first C are ε̂, the rest the variance interpolation, which an ODE or DDIM sampler does not use and is dropped.
The class embedder has K + 1 rows; the last (label K) is the null class of label dropout, the unconditional half
of classifier-free guidance (Ho & Salimans 2022), as ``DiTPipeline`` uses it. Guidance (``conditioning.Guided``)
combines all latent channels, as diffusers' ``DiTPipeline`` does since it guides ``noise_pred[:, :latent_channels]``;
the original DiT code (``forward_with_cfg``) and early ``DiTPipeline`` releases guided only the first 3 of the 4,
which diffsamp does not reproduce.

``codec`` maps latents to images and back through the ``AutoencoderKL`` with its ``scaling_factor`` (0.18215 for
DiT's sd-vae-ft-ema; Rombach et al. 2022, Sec. 4.3.2): ``decode(z) = vae.decode(z / s)`` clamped to [−1, 1],
``encode(x) = s · mean(q(z | x))`` (``sd_pipeline.VAECodec``, shared with Stable Diffusion).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsamp.io import read_json
from diffsamp.models.base import Denoiser, DenoiserBase, Prior
from diffsamp.models.conditioning import ClassConditioning
from diffsamp.models.diffusers_unet import (
    _LabelsBound,
    check_model_files,
    clip_range,
    hub_offline_check,
    hub_model_index,
    local_scheduler_config,
    offline_message,
    scheduler_alphas_cumprod,
)
from diffsamp.models.parameterization import DdpmTimesteps, ddpm_sigmas, vp_scale, x0_from_eps
from diffsamp.models.sd_pipeline import VAECodec  # latent diffusion's VAE with its scaling factor

PIPELINE_CLASSES = ("DiTPipeline",)
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


class DiTDenoiser(DenoiserBase):
    """D(x̄, σ) over latents from a DiT transformer + its scheduler's ᾱ_t table (Peebles & Xie 2023).

    Class-conditional: ``conditioning`` is ``ClassConditioning(K, null_class=K)`` for a class embedder of K + 1
    rows (K = ``num_embeds_ada_norm``); ``bind(labels)`` gives the plain D(x, σ) for one batch and guidance
    (``conditioning.Guided``) evaluates [x; x] with [labels; K] in one transformer call. ``sample_shape`` is the
    latent's (C, H, W); ``codec`` decodes samples to images. ``feature_module`` is the middle transformer block
    (its (B, tokens, D) output, pooled over tokens, is what AMED reads). ``labels`` maps class names to ids
    (the pipeline's ``id2label``), {} if it has none.
    """

    prior: Prior = "vp"

    def __init__(
        self,
        transformer: nn.Module,
        alphas_cumprod: Tensor,
        *,
        codec: VAECodec | None = None,
        quantize: bool = False,
        clip_sample: float | None = None,
        labels: dict[str, int] | None = None,
    ) -> None:
        if clip_sample is not None and not clip_sample > 0:
            raise ValueError(f"clip_sample must be a positive range or None, got {clip_sample}")
        cfg = transformer.config
        k = int(cfg.num_embeds_ada_norm)
        rows = int(transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings)
        self.network = transformer
        self.codec = codec
        self.conditioning = ClassConditioning(k, k if rows > k else None)
        self.learned_variance = int(transformer.out_channels) == 2 * int(cfg.in_channels)
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.quantize = quantize
        self.clip_sample = clip_sample
        self.timestep_sigmas = ddpm_sigmas(self.alphas_cumprod)
        self.sigma_min, self.sigma_max = float(self.timestep_sigmas[0]), float(self.timestep_sigmas[-1])
        blocks = transformer.transformer_blocks
        self.feature_module = blocks[len(blocks) // 2]
        self.labels = dict(labels or {})
        self._timesteps = DdpmTimesteps(self.alphas_cumprod)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The latent's (C, H, W) from the transformer's config."""
        cfg = self.network.config
        return (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    def timestep(self, sigma: Tensor) -> Tensor:
        """The transformer's (possibly fractional) DDPM timestep for σ."""
        return self._timesteps(sigma, quantize=self.quantize)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise ValueError(f"this DiT is class-conditional ({self.conditioning.describe()}): give one class per seed "
                         "(cond=[...], --class / --classes)")

    def bind(self, labels: Tensor) -> Denoiser:
        """The model with class ``labels`` ((B,) int64, one per batch row; the null class for the unconditional
        half) fixed: a plain D(x, σ)."""
        return _LabelsBound(self, labels)

    def evaluate(self, x: Tensor, sigma: Tensor, class_labels: Tensor) -> Tensor:
        """D(x̄, σ) = x̄ − σ ε̂ for latents ``x`` with ``class_labels`` (B,); ε̂ is the first half of a learned-variance
        output (Peebles & Xie 2023, Sec. 3.1)."""
        c = self.sample_shape[0]
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"this DiT takes (B, {c}, H, W) latents, got x of shape {tuple(x.shape)}")
        if class_labels.shape != (x.shape[0],):
            raise ValueError(f"{tuple(class_labels.shape)} class labels for a batch of {x.shape[0]}")
        sig = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        net_dtype = next(self.network.parameters()).dtype
        t = self.timestep(sigma).to(torch.float32)
        out = self.network((x * vp_scale(sig)).to(net_dtype), timestep=t,
                           class_labels=class_labels.to(x.device)).sample
        if self.learned_variance:
            out = out.chunk(2, dim=1)[0]
        out = x0_from_eps(x, out.to(x.dtype), sig)
        if self.clip_sample is not None:
            out = out.clamp(-self.clip_sample, self.clip_sample)
        return out

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantize: bool = False,
        clip: bool | None = None,
    ) -> "DiTDenoiser":
        """Load a ``DiTPipeline`` folder (``model_index.json``, ``transformer/``, ``vae/``, ``scheduler/``) or
        Hub id (e.g. ``facebook/DiT-XL-2-256``). Offline, a Hub id not in the local cache fails at once in one
        line. ``clip``: clamp x̂0 as the scheduler config's ``clip_sample`` says (None), always or never."""
        path = Path(name_or_path).expanduser()
        if path.exists():
            if not is_dit_dir(path):
                raise ValueError(f"{path} is not a DiT pipeline folder (model_index.json with transformer and vae)")
            for sub in ("transformer", "vae"):
                check_model_files(path / sub, what=f"a diffusers {sub} config")
            source, local, sched_cfg = str(path), {}, local_scheduler_config(path)
            index = read_json(path / "model_index.json", what="a diffusers pipeline index")
        else:
            source = str(name_or_path)
            offline = hub_offline_check(source)
            local = {"local_files_only": True} if offline else {}
            try:
                index, sched_cfg = _hub_configs(source, local)
            except Exception as exc:  # noqa: BLE001 - the Hub client raises many kinds
                if offline:
                    raise ValueError(offline_message(source, offline)) from None
                raise ValueError(f"could not load {source!r} as a DiT pipeline: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        transformer, vae = _load_modules(source, dtype, local)
        for module in (transformer, vae):
            module.eval().requires_grad_(False)
            if device is not None:
                module.to(device)
        return cls(transformer, scheduler_alphas_cumprod(sched_cfg), codec=VAECodec(vae), quantize=quantize,
                   clip_sample=clip_range(sched_cfg, clip), labels=_label_ids(index.get("id2label")))


def _hub_configs(repo_id: str, local: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model_index.json`` and the scheduler config of a Hub DiT pipeline."""
    import json
    import warnings

    from diffusers import DDIMScheduler
    from huggingface_hub import hf_hub_download

    index = json.loads(Path(hf_hub_download(repo_id, "model_index.json", **local)).read_text())
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise ValueError(f"it is a {index.get('_class_name')}, not a DiTPipeline")
    with warnings.catch_warnings():  # the Hub client's deprecation notices are not the user's business
        warnings.simplefilter("ignore")
        return index, dict(DDIMScheduler.load_config(repo_id, subfolder="scheduler", **local))


def _load_modules(source: str, dtype: torch.dtype | None, local: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """The transformer and the VAE of a DiT pipeline folder or Hub id."""
    import warnings

    from diffusers import AutoencoderKL, DiTTransformer2DModel

    with warnings.catch_warnings():  # older diffusers' "Transformer2DModel" configs load as DiT: not the user's business
        warnings.simplefilter("ignore")
        kw = dict(low_cpu_mem_usage=False, torch_dtype=dtype, **local)
        transformer = DiTTransformer2DModel.from_pretrained(source, subfolder="transformer", **kw)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **kw)
    return transformer, vae


def _label_ids(id2label: dict[str, str] | None) -> dict[str, int]:
    """Class name → id from a pipeline's ``id2label`` (comma-separated synonyms per id, as DiTPipeline reads it)."""
    out: dict[str, int] = {}
    for key, value in (id2label or {}).items():
        for name in str(value).split(","):
            out[name.strip()] = int(key)
    return dict(sorted(out.items()))


def is_dit_dir(path: str | os.PathLike) -> bool:
    """A ``DiTPipeline`` folder: ``model_index.json`` naming a DiT transformer and a VAE."""
    path = Path(path)
    index = path / "model_index.json"
    if not (path.is_dir() and index.is_file()):
        return False
    try:
        cfg = read_json(index, what="a diffusers pipeline index")
    except ValueError:
        return False
    transformer = cfg.get("transformer")
    return (cfg.get("_class_name") in PIPELINE_CLASSES or (isinstance(transformer, list)
            and transformer[-1] in TRANSFORMER_CLASSES and "unet" not in cfg)) and "vae" in cfg


def is_dit_hub_id(repo_id: str) -> bool:
    """Whether Hub repo ``repo_id`` holds a DiT pipeline (its ``model_index.json``; offline, from the local cache)."""
    index = hub_model_index(repo_id)
    return index is not None and is_dit_dir(index.parent)


def load_dit(
    path: str | os.PathLike, *, device: Any = None, dtype: torch.dtype | None = None, clip: bool | None = None
) -> DiTDenoiser:
    """A DiT pipeline folder or Hub id as a denoiser (``DiTDenoiser.from_pretrained``)."""
    return DiTDenoiser.from_pretrained(path, device=device, dtype=dtype, clip=clip)
