"""The DDPM/diffusers family: a ``UNet2DModel`` trained on a discrete DDPM schedule, seen as a σ-space denoiser,
and its on-disk formats (a diffusers directory or Hub id; a ``diffsamp train ddpm`` checkpoint).

σ_t = √((1−ᾱ_t)/ᾱ_t); the network is called on x_VP = x̄/√(1+σ²) at the timestep t(σ) found by
linear interpolation of log σ_t (optionally quantized to an integer step), and its output is converted
by ``prediction_type``: ε → D = x̄ − σε, v → D = √ᾱ x_VP − √(1−ᾱ) v, sample → D = x̂0 (EDM Table 1, VP).

``clip_sample`` clamps D to [−r, r], as diffusers' DDPM/DDIM schedulers clamp their x̂0 when the scheduler
config says ``clip_sample: true`` (range ``clip_sample_range``). ``from_pretrained`` follows the model's
own config by default, so every sampler sees the model as its scheduler would; ``clip=False`` turns it off.
With ε-prediction it matters most at high σ, where x̂0 = x̄ − σε̂ amplifies the network's error by σ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from diffsamp.io import check_safetensors, normal_modes, read_json, read_state_file
from diffsamp.models.base import Denoiser, DenoiserBase, Prior, Wrapper, unwrap
from diffsamp.models.conditioning import ClassConditioning, stacked_copies, tile
from diffsamp.models.parameterization import (
    BETA_END,
    BETA_START,
    NUM_TRAIN_TIMESTEPS,
    DdpmTimesteps,
    ddpm_alphas_cumprod,
    ddpm_sigmas,
    vp_scale,
    x0_from_eps,
    x0_from_v,
)

PredictionType = Literal["epsilon", "v_prediction", "sample"]


class DiffusersUNetDenoiser(DenoiserBase):
    """D(x̄, σ) from ``unet`` + its scheduler's ᾱ_t table + ``prediction_type``.

    ``feature_module`` is the UNet's ``mid_block`` (the bottleneck AMED reads). A UNet with a class embedding
    (diffusers' ``num_class_embeds``) is class-conditional: ``conditioning`` says which labels it takes (by
    default all ``num_class_embeds`` of them, without an unconditional class; a diffsamp run's card records
    the null class its label dropout trained), and ``bind(labels)`` gives the plain D(x, σ) for one batch.
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
        conditioning: ClassConditioning | None = None,
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
        self.timestep_sigmas = sig  # trained on the scheduler's integer timesteps
        self.sigma_min, self.sigma_max = float(sig[0]), float(sig[-1])
        self.feature_module = getattr(unet, "mid_block", None)
        self._timesteps = DdpmTimesteps(self.alphas_cumprod)
        embeds = getattr(unet.config, "num_class_embeds", None)
        if conditioning is None and embeds:
            conditioning = ClassConditioning(int(embeds))
        if conditioning is not None and (not embeds or conditioning.num_classes > embeds
                                         or (conditioning.null_class or 0) >= embeds):
            raise ValueError(f"{conditioning.describe()} does not fit a UNet with num_class_embeds={embeds}")
        self.conditioning = conditioning

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """(C, H, W) from the UNet's config."""
        cfg = self.network.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's (possibly fractional) timestep for σ."""
        return self._timesteps(sigma, quantize=self.quantize)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.conditioning is not None:
            raise ValueError(f"this UNet is class-conditional ({self.conditioning.describe()}): give one class per "
                             "seed (cond=[...], --class / --classes)")
        return self.evaluate(x, sigma)

    def bind(self, labels: Tensor) -> "Denoiser":
        """The model with class ``labels`` ((B,) int64, one per batch row) fixed: a plain D(x, σ)."""
        if self.conditioning is None:
            raise ValueError("this UNet is unconditional: it takes no class labels")
        return _LabelsBound(self, labels)

    def evaluate(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """D(x̄, σ), given the class labels of a class-conditional UNet."""
        cfg = self.network.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"this UNet takes (B, {cfg.in_channels}, H, W) images, got x of shape {tuple(x.shape)}"
            )
        sig = sigma.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        x_in = x * vp_scale(sig)
        net_dtype = next(self.network.parameters()).dtype
        t = self.timestep(sigma).to(torch.float32)
        if class_labels is not None:
            if class_labels.shape != (x.shape[0],):
                raise ValueError(f"{tuple(class_labels.shape)} class labels for a batch of {x.shape[0]}")
            class_labels = class_labels.to(x.device)
        out = self.network(x_in.to(net_dtype), t, class_labels=class_labels).sample.to(x.dtype)
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
            sched_cfg = local_scheduler_config(path)
            check_model_files(unet_dir)
            unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False, torch_dtype=dtype)
        else:
            unet, sched_cfg = _hub_load(str(name_or_path), dtype)
        alphas_cumprod = scheduler_alphas_cumprod(sched_cfg)
        prediction_type = sched_cfg.get("prediction_type", "epsilon")
        unet.eval().requires_grad_(False)
        if device is not None:
            unet.to(device)
        return cls(unet, alphas_cumprod, prediction_type, quantize=quantize, clip_sample=clip_range(sched_cfg, clip),
                   conditioning=_card_conditioning(path) if path.exists() else None)


class _LabelsBound(Wrapper):
    """A class-conditional model with one batch's labels fixed (``DiffusersUNetDenoiser.bind``, ``DiTDenoiser.bind``):
    ``inner.evaluate(x, σ, labels)`` as a plain D(x, σ)."""

    def __init__(self, inner: Denoiser, labels: Tensor) -> None:
        super().__init__(inner)
        self.labels = labels

    conditioning = property(lambda self: None)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        labels = tile(self.labels, stacked_copies(x, self.labels))  # k stacked copies of the batch: labels k times
        return self.inner.evaluate(x, sigma, labels)  # type: ignore[attr-defined]


def _card_conditioning(path: Path) -> ClassConditioning | None:
    """The class conditioning a diffsamp run's ``card.json`` records (``train ddpm --class-conditional``)."""
    card = path / "card.json"
    if not card.is_file():
        return None
    record = read_json(card, what="a model card").get("conditioning")
    if not record:
        return None
    if record.get("kind") != "class":
        raise ValueError(f"{card}: unknown conditioning kind {record.get('kind')!r}")
    return ClassConditioning(int(record["num_classes"]), record.get("null_class"))


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


def check_model_files(unet_dir: Path, what: str = "a diffusers UNet config") -> None:
    """A damaged ``config.json`` or weights file of a local diffusers model folder (a UNet, a transformer, a VAE)
    as a one-line ValueError naming it (diffusers would raise an OSError about "the checkpoint" or a bare JSON
    error); ``what`` names the config in that error."""
    read_json(unet_dir / "config.json", what=what)
    weights = sorted(unet_dir.glob("*.safetensors"))
    if not weights and not any(unet_dir.glob("*.bin")):
        raise ValueError(f"{unet_dir} has no weights file (diffusion_pytorch_model.safetensors)")
    for w in weights:
        check_safetensors(w)


def local_scheduler_config(path: Path) -> dict[str, Any]:
    """The scheduler config of a local diffusers folder (pipeline or flat layout); a ValueError without one."""
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.exists():
            return read_json(candidate, what="a diffusers scheduler config")
    raise ValueError(
        f"{path} has no scheduler config (scheduler/scheduler_config.json or scheduler_config.json): "
        "the ᾱ_t table and prediction_type are needed to use the UNet"
    )


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (``HF_HUB_OFFLINE`` set, or no connection to its endpoint
    within ``timeout`` seconds), or None when it can."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY"):
        return None  # through a proxy: let the client try
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"no connection to {host}: {exc}"
    return None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hub cache holds any snapshot of model repo ``repo_id``."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def offline_message(repo_id: str, why: str) -> str:
    """The one-line error for a Hub id that cannot be loaded offline."""
    return (f"could not load {repo_id!r}: it is not a local directory, the Hugging Face Hub is unreachable "
            f"({why}) and the model is not in the local Hub cache. Download it where you have internet "
            "and pass the local directory instead.")


def hub_offline_check(repo_id: str) -> str | None:
    """Why the Hub is unreachable (None when it is reachable); when it is and ``repo_id`` is not in the local Hub
    cache, a one-line ValueError at once, before diffusers' loaders are imported (an offline machine fails in
    seconds, not after retries)."""
    offline = hub_unreachable()
    if offline and not _in_hub_cache(repo_id):
        raise ValueError(offline_message(repo_id, offline))
    return offline


def hub_model_index(repo_id: str) -> Path | None:
    """The local copy of Hub repo ``repo_id``'s ``model_index.json`` (a pipeline's list of components; from the Hub
    or, when it is unreachable, the local Hub cache), None where there is none or it cannot be had. Its folder is
    what a format's ``detect`` reads to tell which pipeline the repo holds."""
    offline = hub_unreachable()
    if offline and not _in_hub_cache(repo_id):
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "model_index.json", local_files_only=bool(offline)))
    except Exception:  # noqa: BLE001 - no index, no such repo, no network: nothing to tell
        return None


def _hub_load(repo_id: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The UNet and scheduler config of a Hub repo: from the Hub, or only from the local Hub cache when the
    Hub is unreachable (checked first, so an offline machine fails in seconds, not after retries)."""
    import warnings

    offline = hub_offline_check(repo_id)

    from diffusers import DDPMScheduler, UNet2DModel

    local = {"local_files_only": True} if offline else {}
    errors = []
    with warnings.catch_warnings():  # the Hub client's deprecation notices are not the user's business
        warnings.simplefilter("ignore")
        for sub in ("unet", None):
            try:
                unet = UNet2DModel.from_pretrained(repo_id, subfolder=sub, low_cpu_mem_usage=False, torch_dtype=dtype,
                                                   **local)
                break
            except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds; report them together
                errors.append(f"{type(exc).__name__}: {exc}")
        else:
            if offline:
                raise ValueError(offline_message(repo_id, offline))
            raise ValueError(
                f"could not load {repo_id!r}: it is not a local directory and the Hugging Face Hub did not "
                f"provide it (no such repo, or not a diffusers UNet). Download it where you have internet and pass "
                f"the local directory instead. Details: {' | '.join(e.splitlines()[0] for e in errors)}"
            )
        for sub in ("scheduler", None):
            try:
                return unet, dict(DDPMScheduler.load_config(repo_id, subfolder=sub, **local))
            except Exception:  # noqa: BLE001
                continue
    raise ValueError(f"{repo_id!r} has a UNet but no scheduler config on the Hub")


# ------------------------------------------------------------------------------------------- formats
def scheduler_kwargs(prediction_type: str) -> dict[str, Any]:
    """The DDPMScheduler config of models trained by ``diffsamp train ddpm`` (linear β, T = 1000, clipped x̂0)."""
    return dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=True,
        variance_type="fixed_small",
    )


def training_alphas_cumprod() -> Tensor:
    """ᾱ_t of ``scheduler_kwargs`` exactly as diffusers computes it (float32), widened to float64."""
    return ddpm_alphas_cumprod(dtype=torch.float32).double()


def save_diffusers(unet: nn.Module, out_dir: str | os.PathLike, prediction_type: str = "epsilon") -> Path:
    """Save ``unet`` and its DDPM scheduler as a diffusers pipeline directory (fp32 safetensors)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    out_dir = Path(out_dir)
    unet = unet.to("cpu")
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet = unet.float()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler_kwargs(prediction_type)))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    normal_modes(out_dir)
    return out_dir


def unet_from_checkpoint(path: str | os.PathLike, *, which: str = "ema") -> tuple[nn.Module, Tensor, str]:
    """(UNet2DModel, ᾱ_t, prediction_type) of a DDPM training checkpoint; ``which``: "ema" or "model"."""
    from diffusers import UNet2DModel

    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    tensors, state = read_state_file(path)
    extra = state["config"].get("extra", {})
    if extra.get("trainer") != "ddpm" or "unet" not in extra:
        raise ValueError(f"{path} is not a DDPM training checkpoint")
    cfg = {k: v for k, v in extra["unet"].items() if not k.startswith("_")}
    unet = UNet2DModel.from_config(cfg)
    n = len(which) + 1
    unet.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(which + ".")})
    return unet, training_alphas_cumprod(), extra.get("prediction_type", "epsilon")


def is_diffusers_dir(path: str | os.PathLike) -> bool:
    """A diffusers model directory: pipeline layout (``unet/``) or flat (``config.json`` + scheduler config)."""
    path = Path(path)
    return (path / "unet" / "config.json").is_file() or (
        (path / "config.json").is_file() and (path / "scheduler_config.json").is_file()
    )


def is_ddpm_checkpoint(path: str | os.PathLike) -> bool:
    """A ``diffsamp train ddpm`` run directory (its checkpoint) or checkpoint file."""
    path = Path(path)
    return (path.is_dir() and (path / "checkpoint.safetensors").is_file()) or (
        path.is_file() and path.suffix == ".safetensors"
    )


def load_ddpm_checkpoint(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    clip: bool | None = None,
) -> DiffusersUNetDenoiser:
    """The EMA model of a ``diffsamp train ddpm`` checkpoint as a denoiser (sample while it trains).

    Its x̂0 is clamped to [−1, 1] unless ``clip=False``, as the exported model's scheduler config says.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    unet, alphas_cumprod, prediction_type = unet_from_checkpoint(path)
    unet.eval().requires_grad_(False)
    if device is not None or dtype is not None:
        unet.to(device=device, dtype=dtype)
    clip_sample = clip_range(scheduler_kwargs(prediction_type), clip)
    return DiffusersUNetDenoiser(unet, alphas_cumprod, prediction_type, clip_sample=clip_sample)


def load_diffusers(
    path: str | os.PathLike, *, device: Any = None, dtype: torch.dtype | None = None, clip: bool | None = None
) -> DiffusersUNetDenoiser:
    """A diffusers directory or Hub id as a denoiser (``DiffusersUNetDenoiser.from_pretrained``)."""
    return DiffusersUNetDenoiser.from_pretrained(path, device=device, dtype=dtype, clip=clip)


def alphas_cumprod_of(model: Denoiser) -> Tensor | None:
    """The discrete ᾱ_t table of a DDPM-family model (through any wrappers): the scheduler's ᾱ table a model
    trained on it keeps as ``alphas_cumprod`` (the diffusers UNets, DiT); None for other families."""
    table = getattr(unwrap(model), "alphas_cumprod", None)
    return table if isinstance(table, Tensor) else None
