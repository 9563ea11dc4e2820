"""Stable-Diffusion-style pipeline folders (``model_index.json`` with ``unet``, ``vae``, ``text_encoder``,
``tokenizer``, ``scheduler``) as text-conditional latent σ-space denoisers (latent diffusion, Rombach et al. 2022).

The ``UNet2DConditionModel`` is a DDPM network on the scheduler's ᾱ_t table, seen exactly as the pixel UNets of
``diffusers_unet``: prior "vp", called on x_VP = x̄/√(1+σ²) at the timestep t(σ) (log-σ interpolation of the
table), its ε / v / x0 output converted to D = E[x0 | x̄] (SD 1.x: ε; SD 2.x 768: v-prediction). Sampling runs
in latent space: ``sample_shape`` is the latent's (4, H/8, W/8).

* ``conditioning = TextConditioning(encode_prompts)``: prompts are tokenized (padded to the tokenizer's maximum
  length, truncated) and run through the CLIP text encoder, giving (N, 77, D) hidden states, as diffusers'
  ``StableDiffusionPipeline.encode_prompt`` does (no clip skip); ``bind(emb)`` is the plain D(x, σ) that calls
  ``unet(x_in, t, encoder_hidden_states=emb)``. Guidance's unconditional half is the empty or negative prompt.
* ``codec``: the VAE with its ``scaling_factor``: ``decode(z) = vae.decode(z / s).sample`` clamped to [-1, 1],
  ``encode(x) = s · vae.encode(x).latent_dist.mean`` (Rombach et al. 2022, Sec. 3.1).
* SDXL (``StableDiffusionXLPipeline`` folders: ``text_encoder_2``/``tokenizer_2``) is one more prompt encoder:
  the penultimate hidden states of both CLIP encoders concatenated, the pooled projection of the second and the
  added time ids (original size, crop (0, 0), target size: the UNet's native resolution), an encoded condition
  being the dict {"embeds", "pooled", "time_ids"}; the unconditional half is zeros when the folder's
  ``force_zeros_for_empty_prompt`` says so and no negative prompt is given, as in diffusers (tested against
  ``StableDiffusionXLPipeline``). A float16 SDXL VAE is run in float32 (``force_upcast``). Not supported: the
  refiner (no first text encoder, aesthetic-score time ids), size/crop micro-conditioning other than the native
  resolution, clip skip, prompt weighting and prompts over the tokenizer's length (truncated, as diffusers does).

``clip_sample`` is None: latents are not clamped. A Hub id is fetched (only the folders above, safetensors
weights) unless the Hub is unreachable, in which case it must be in the local Hub cache or the load fails at once
in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffsamp.io import read_json
from diffsamp.models.base import DenoiserBase, Prior, Wrapper
from diffsamp.models.conditioning import Encoded, TextConditioning, stacked_copies, tile
from diffsamp.models.diffusers_unet import (
    check_model_files,
    hub_offline_check,
    local_scheduler_config,
    scheduler_alphas_cumprod,
)
from diffsamp.models.parameterization import DdpmTimesteps, ddpm_sigmas, vp_scale, x0_from_eps, x0_from_v

PredictionType = Literal["epsilon", "v_prediction", "sample"]
_COMPONENTS = ("unet", "vae", "scheduler")


# ---------------------------------------------------------------------------------------------- prompts
def _tokens(tokenizer: Any, prompts: list[str]) -> Tensor:
    """Token ids (N, L): padded to the tokenizer's maximum length and truncated, as diffusers' pipelines do."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _unique(prompts: list[str]) -> tuple[list[str], Tensor]:
    """The distinct prompts and, for each prompt, its index among them (encode each prompt once)."""
    distinct = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(distinct)}
    return distinct, torch.tensor([where[p] for p in prompts], dtype=torch.int64)


class CLIPPromptEncoder:
    """Prompts → (N, L, D) last hidden states of a CLIP text encoder (Rombach et al. 2022, Sec. 3.3: τ_θ(y)),
    as ``StableDiffusionPipeline.encode_prompt`` computes them (the attention mask only where the encoder's
    config asks for it)."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    def __call__(self, prompts: list[str]) -> Tensor:
        distinct, index = _unique(prompts)
        enc = self.tokenizer(distinct, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = enc.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        with torch.no_grad():
            emb = self.text_encoder(enc.input_ids.to(device), attention_mask=mask)[0]
        return emb[index.to(device)]


class SDXLPromptEncoder:
    """Prompts → {"embeds": (N, L, D1 + D2), "pooled": (N, P), "time_ids": (N, 6)} for an SDXL UNet (Podell et
    al. 2023, Sec. 2.1–2.2): the penultimate hidden states of both CLIP encoders concatenated, the second
    encoder's pooled projection, and the size/crop conditioning ``time_ids``."""

    def __init__(self, tokenizers: list[Any], text_encoders: list[nn.Module], time_ids: Tensor) -> None:
        self.tokenizers, self.text_encoders, self.time_ids = tokenizers, text_encoders, time_ids

    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        distinct, index = _unique(prompts)
        states, pooled = [], None
        with torch.no_grad():
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                device = next(encoder.parameters()).device
                out = encoder(_tokens(tokenizer, distinct).to(device), output_hidden_states=True)
                if out[0].ndim == 2:  # the projection of the last encoder (CLIPTextModelWithProjection)
                    pooled = out[0]
                states.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError("the SDXL pipeline's text_encoder_2 gives no pooled projection (not a "
                             "CLIPTextModelWithProjection)")
        embeds = torch.cat(states, dim=-1)
        index = index.to(embeds.device)
        n = len(prompts)
        return {"embeds": embeds[index], "pooled": pooled[index.to(pooled.device)],
                "time_ids": self.time_ids.to(embeds.device).expand(n, -1).clone()}


@dataclass(frozen=True)
class SDXLTextConditioning(TextConditioning):
    """SDXL's text conditioning: without a negative prompt the unconditional half is all zeros (embeddings and
    pooled projection; the time ids stay) where the folder sets ``force_zeros_for_empty_prompt``, as diffusers'
    ``StableDiffusionXLPipeline`` does."""

    zeros_for_empty: bool = True

    def unconditional(self, n: int, negative: Any = None) -> Encoded:
        if negative is not None or not self.zeros_for_empty:
            return super().unconditional(n, negative)
        one = self.encode([""])
        assert isinstance(one, dict)
        return {k: (v.expand(n, *v.shape[1:]).clone() if k == "time_ids" else v.new_zeros((n, *v.shape[1:])))
                for k, v in one.items()}


# ---------------------------------------------------------------------------------------------- the VAE
class VAECodec:
    """The autoencoder of a latent diffusion model (Rombach et al. 2022, Sec. 3.1): latents z = s·E(x) with the
    VAE's ``scaling_factor`` s (so that z has about unit variance), images x = D(z/s) in [-1, 1].

    Runs the VAE in its own dtype and device; a float16 VAE whose config says ``force_upcast`` (the SDXL VAE,
    which overflows in float16) is kept in float32."""

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None) -> None:
        if getattr(vae.config, "force_upcast", False) and next(vae.parameters()).dtype == torch.float16:
            vae = vae.float()
        self.vae = vae
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else vae.config.scaling_factor)

    def _param(self) -> Tensor:
        return next(self.vae.parameters())

    def decode(self, latents: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [-1, 1] from latents (N, 4, H/8, W/8), in the latents' dtype and device."""
        p = self._param()
        with torch.no_grad():
            images = self.vae.decode((latents / self.scaling_factor).to(device=p.device, dtype=p.dtype)).sample
        return images.clamp(-1, 1).to(device=latents.device, dtype=latents.dtype)

    def encode(self, images: Tensor) -> Tensor:
        """Latents s·E(x) (the posterior mean, no sampling) of images (N, 3, H, W) in [-1, 1]."""
        p = self._param()
        with torch.no_grad():
            mean = self.vae.encode(images.to(device=p.device, dtype=p.dtype)).latent_dist.mean
        return (mean * self.scaling_factor).to(device=images.device, dtype=images.dtype)


# ---------------------------------------------------------------------------------------------- the denoiser
class StableDiffusionDenoiser(DenoiserBase):
    """D(x̄, σ; c) from a ``UNet2DConditionModel`` on latents, its scheduler's ᾱ_t table and ``prediction_type``
    (Rombach et al. 2022; EDM Table 1, VP): text-conditional (``conditioning``), a latent model (``codec``).

    ``feature_module`` is the UNet's ``mid_block``. Call ``bind(encoded prompts)`` for a plain D(x, σ)."""

    prior: Prior = "vp"

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod: Tensor,
        prediction_type: PredictionType,
        conditioning: TextConditioning,
        codec: VAECodec,
        *,
        quantize: bool = False,
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected epsilon, v_prediction or "
                             "sample")
        self.network = unet
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.prediction_type = prediction_type
        self.quantize = quantize
        self.clip_sample = None
        sig = ddpm_sigmas(self.alphas_cumprod)
        self.timestep_sigmas = sig
        self.sigma_min, self.sigma_max = float(sig[0]), float(sig[-1])
        self.feature_module = getattr(unet, "mid_block", None)
        self.conditioning = conditioning
        self.codec = codec
        self._timesteps = DdpmTimesteps(self.alphas_cumprod)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The latent's (C, h, w) from the UNet's config (its ``sample_size`` is the latent size)."""
        cfg = self.network.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's (possibly fractional) timestep for σ (exact integers on the table's σ)."""
        return self._timesteps(sigma, quantize=self.quantize)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise ValueError("this model is text-conditional (text prompts): give one prompt per seed "
                         "(cond=[...], --prompt / --prompts)")

    def bind(self, cond: Encoded) -> "_PromptBound":
        """The model with encoded prompts ``cond`` (one row per batch row) fixed: a plain D(x, σ)."""
        return _PromptBound(self, cond)

    def evaluate(self, x: Tensor, sigma: Tensor, cond: Encoded) -> Tensor:
        """D(x̄, σ) for the encoded prompts ``cond`` (one per row of ``x``): the UNet on x_VP = x̄/√(1+σ²) at
        t(σ), its ε (D = x̄ − σε̂) or v (D = √ᾱ x_VP − √(1−ᾱ) v̂) output converted (EDM Table 1, VP)."""
        cfg = self.network.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"this UNet takes (B, {cfg.in_channels}, h, w) latents, got x of shape {tuple(x.shape)}")
        p = next(self.network.parameters())
        emb = cond["embeds"] if isinstance(cond, dict) else cond
        if emb.shape[0] != x.shape[0]:
            raise ValueError(f"{emb.shape[0]} encoded prompts for a batch of {x.shape[0]}")
        kwargs: dict[str, Any] = {"encoder_hidden_states": emb.to(device=p.device, dtype=p.dtype)}
        if isinstance(cond, dict):  # SDXL's added conditions
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(device=p.device, dtype=p.dtype),
                                           "time_ids": cond["time_ids"].to(device=p.device, dtype=p.dtype)}
        sig = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        x_in = x * vp_scale(sig)
        t = self.timestep(sigma).to(torch.float32)
        out = self.network(x_in.to(p.dtype), t, **kwargs).sample.to(x.dtype)
        if self.prediction_type == "epsilon":
            return x0_from_eps(x, out, sig)
        if self.prediction_type == "v_prediction":
            return x0_from_v(x, out, sig)
        return out

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "StableDiffusionDenoiser":
        """Load a Stable-Diffusion-style pipeline folder (SD 1.x, 2.x, XL) or Hub id; see the module doc."""
        path = Path(name_or_path).expanduser()
        if not path.exists():
            path = _hub_snapshot(str(name_or_path))
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        index = read_json(path / "model_index.json", what="a diffusers pipeline index")
        xl = "text_encoder_2" in index
        needs = _COMPONENTS + (("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if xl
                               else ("text_encoder", "tokenizer"))
        missing = [c for c in needs if not _component(index, c)]
        if missing:
            what = "an SDXL refiner (no first text encoder) is not supported" if xl and "text_encoder" in missing \
                else f"it lacks {', '.join(missing)}"
            raise ValueError(f"{path}: not a Stable Diffusion pipeline diffsamp can run: {what}")
        if _component(index, "unet")[1] != "UNet2DConditionModel":
            raise ValueError(f"{path}: its unet is a {_component(index, 'unet')[1]}; diffsamp runs "
                             "UNet2DConditionModel pipelines (SD 1.x, 2.x, XL)")
        for sub in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if xl else ()):
            check_model_files(path / sub, what=f"a diffusers {sub} config")
        sched_cfg = local_scheduler_config(path)
        try:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
        except ImportError:
            raise ValueError("Stable Diffusion pipelines need the transformers package for their CLIP text "
                             "encoder: pip install transformers") from None
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers.utils import logging as hf_logging

        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, low_cpu_mem_usage=False)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # transformers' per-file "Loading weights" bars
        try:
            enc = CLIPTextModel.from_pretrained(path / "text_encoder")
            tok = CLIPTokenizer.from_pretrained(path / "tokenizer")
            modules = [unet, vae, enc]
            if xl:
                enc2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2")
                tok2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2")
                modules.append(enc2)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        for m in modules:
            m.eval().requires_grad_(False)
            if device is not None:
                m.to(device)
            if dtype is not None and m is not unet and m is not vae:  # the text encoders (unet, vae: torch_dtype)
                m.to(dtype)
        if xl:
            conditioning: TextConditioning = SDXLTextConditioning(
                SDXLPromptEncoder([tok, tok2], [enc, enc2], sdxl_time_ids(unet, vae, enc2)),
                zeros_for_empty=bool(index.get("force_zeros_for_empty_prompt", True)))
        else:
            conditioning = TextConditioning(CLIPPromptEncoder(tok, enc))
        return cls(unet, scheduler_alphas_cumprod(sched_cfg), sched_cfg.get("prediction_type", "epsilon"),
                   conditioning, VAECodec(vae))


class _PromptBound(Wrapper):
    """A Stable Diffusion model with one batch's encoded prompts fixed (``StableDiffusionDenoiser.bind``)."""

    def __init__(self, inner: StableDiffusionDenoiser, cond: Encoded) -> None:
        super().__init__(inner)
        self.cond = cond

    conditioning = property(lambda self: None)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.inner.evaluate(x, sigma, tile(self.cond, stacked_copies(x, self.cond)))


def sdxl_time_ids(unet: nn.Module, vae: nn.Module, text_encoder_2: nn.Module) -> Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2) at the UNet's native resolution: (1, 6) =
    original (H, W), crop top-left (0, 0), target (H, W), as ``StableDiffusionXLPipeline`` uses by default."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    ids = [h * scale, w * scale, 0, 0, h * scale, w * scale]
    expected = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
    got = unet.config.addition_time_embed_dim * len(ids) + text_encoder_2.config.projection_dim
    if expected is not None and expected.in_features != got:
        raise ValueError(f"the SDXL UNet expects added conditions of length {expected.in_features}, the pipeline "
                         f"gives {got} (an SDXL refiner with aesthetic scores is not supported)")
    return torch.tensor([ids], dtype=torch.float32)


def _component(index: dict[str, Any], name: str) -> tuple[str, str] | None:
    """(library, class) of a component of ``model_index.json``, None where it is absent or null."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None and entry[1] is not None:
        return str(entry[0]), str(entry[1])
    return None


# ---------------------------------------------------------------------------------------------- formats
def is_sd_pipeline_dir(path: str | Path) -> bool:
    """A local diffusers pipeline folder whose ``model_index.json`` names a text-conditional UNet pipeline
    (``unet``, ``vae`` and a ``text_encoder`` or ``text_encoder_2``)."""
    index_file = Path(path) / "model_index.json"
    if not index_file.is_file():
        return False
    try:
        index = read_json(index_file, what="a diffusers pipeline index")
    except ValueError:
        return False  # a damaged index is reported by the zoo's checks
    return bool(_component(index, "unet") and _component(index, "vae")
                and (_component(index, "text_encoder") or _component(index, "text_encoder_2")))


_ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors"]


def _hub_snapshot(repo_id: str) -> Path:
    """The local folder of Hub repo ``repo_id`` (only what ``from_pretrained`` reads: configs, tokenizers and
    safetensors weights); offline from the local Hub cache, else a one-line ValueError at once."""
    offline = hub_offline_check(repo_id)  # before importing anything heavy: an offline machine fails in seconds
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_ALLOW, local_files_only=bool(offline)))
    except Exception as exc:  # noqa: BLE001 - the Hub client raises many kinds; report one line
        raise ValueError(f"could not load {repo_id!r}: it is not a local directory and the Hugging Face Hub did not "
                         f"provide it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def is_sd_hub_id(repo_id: str) -> bool:
    """Whether Hub repo ``repo_id`` is a Stable-Diffusion-style pipeline (its ``model_index.json``, from the Hub
    or, offline, the local cache); False where that cannot be told."""
    from diffsamp.models.diffusers_unet import hub_unreachable

    try:
        from huggingface_hub import hf_hub_download

        offline = hub_unreachable()
        index = hf_hub_download(repo_id, "model_index.json", local_files_only=bool(offline))
    except Exception:  # noqa: BLE001 - no index, no network, no such repo: not one of ours
        return False
    return is_sd_pipeline_dir(Path(index).parent)


def load_sd_pipeline(
    path: str | Path, *, device: Any = None, dtype: torch.dtype | None = None, clip: bool | None = None
) -> StableDiffusionDenoiser:
    """A Stable-Diffusion-style pipeline folder or Hub id as a denoiser (``clip`` is ignored: latents are not
    clamped)."""
    return StableDiffusionDenoiser.from_pretrained(path, device=device, dtype=dtype)
