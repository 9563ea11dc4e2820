"""The FID feature network: TensorFlow's Inception-v3 "2015-12-05", pool3 layer (2048-d).

Two TorchScript packagings of the same weights are accepted, told apart by their forward signature:

* ``pool3``: ``forward(x)``, x float (N, 3, 299, 299) already resized and scaled as (v − 128)/128;
  the classifier is removed (e.g. ``inception-2015-12-05-pool3.torchscript.pt``).
* ``nvlabs``: ``forward(img, return_features=False, ...)``, img in [0, 255] of any size (NVlabs'
  ``inception-2015-12-05.pt``). We hand it images we already resized to 299×299, so it does no
  resizing of its own and both files see exactly the same pixels.

Either way ``FeatureExtractor(images_uint8)`` does the whole preprocessing: uint8 → float, TF1 bilinear
resize to 299×299, grayscale repeated to 3 channels, then the network.

Where the weights come from, first hit wins: an explicit path (``--inception``), the environment
variable ``DIFFSAMP_INCEPTION``, then the cache folder (``$DIFFSAMP_CACHE``, else
``$XDG_CACHE_HOME/diffsamp``, else ``~/.cache/diffsamp``). Nothing is downloaded unless asked for
(``download_weights`` / ``diffsamp fid download``).
"""

from __future__ import annotations

import os
import shutil
import urllib.request
import warnings
from pathlib import Path

import torch
from torch import Tensor

from diffsamp.io import atomic_path
from diffsamp.metrics.resize import resize_tf1_bilinear

WEIGHTS_ENV = "DIFFSAMP_INCEPTION"
CACHE_ENV = "DIFFSAMP_CACHE"
NVLABS_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
WEIGHT_FILES = ("inception-2015-12-05-pool3.torchscript.pt", "inception-2015-12-05.pt")
EXTRACTOR_NAME = "inception-2015-12-05-pool3"
FEATURE_DIM = 2048
INPUT_SIZE = 299


class WeightsNotFoundError(FileNotFoundError):
    """The Inception weights are not on this machine."""


def cache_dir() -> Path:
    """diffsamp's cache folder (weights and reference statistics); not created here."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "diffsamp"


def _how_to_provide() -> str:
    return (
        "Provide the FID Inception weights in one of these ways:\n"
        "  --inception PATH (inception= in Python), a TorchScript file: either the pool3 network\n"
        f"      ({WEIGHT_FILES[0]}) or NVlabs' {WEIGHT_FILES[1]}\n"
        f"  export {WEIGHTS_ENV}=PATH\n"
        f"  copy either file into {cache_dir()}\n"
        f"  diffsamp fid download   (needs internet; fetches {NVLABS_URL})"
    )


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """Resolve the weights file: ``path``, then ``$DIFFSAMP_INCEPTION``, then the cache folder."""
    for given, what in ((path, "--inception"), (os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}")):
        if given is not None:
            p = Path(given).expanduser()
            if not p.is_file():
                raise WeightsNotFoundError(f"{what} points at {p}, which is not a file.\n{_how_to_provide()}")
            return p
    for name in WEIGHT_FILES:
        p = cache_dir() / name
        if p.is_file():
            return p
    raise WeightsNotFoundError(f"FID Inception weights not found.\n{_how_to_provide()}")


def download_weights(url: str = NVLABS_URL, dest: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Download NVlabs' ``inception-2015-12-05.pt`` into the cache (or ``dest``); returns its path.

    The file is written under a temporary name and renamed only once it has loaded as TorchScript.
    """
    dest = Path(dest).expanduser() if dest is not None else cache_dir() / WEIGHT_FILES[1]
    if dest.is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            shutil.copyfileobj(r, f, length=1 << 20)
        _load_module(tmp, "cpu")  # refuse to install something that is not a usable network
    return dest


def _load_module(path: Path, device: torch.device | str) -> tuple[torch.jit.ScriptModule, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001 — any failure means: not a TorchScript network we can use
        raise ValueError(f"{path}: not a TorchScript Inception network ({type(exc).__name__}: {exc})") from exc
    schema = str(module.forward.schema)
    kind = "nvlabs" if "return_features" in schema else "pool3"
    return module.eval(), kind


class FeatureExtractor:
    """uint8 images (N, C, H, W), C ∈ {1, 3}, any size → float32 pool3 features (N, 2048) on ``device``."""

    resize = f"tf1-bilinear-{INPUT_SIZE}"

    def __init__(
        self,
        module: torch.nn.Module,
        kind: str,
        device: torch.device | str,
        path: Path | None = None,
        *,
        name: str = EXTRACTOR_NAME,
        dims: int = FEATURE_DIM,
    ):
        if kind not in ("pool3", "nvlabs"):
            raise ValueError(f"unknown Inception format {kind!r}")
        self.module, self.kind, self.device, self.path = module, kind, torch.device(device), path
        self.name, self.dims = name, dims

    def network_input(self, images: Tensor) -> Tensor:
        """What the network sees: TF1-resized to 299×299, 3 channels (channels-last), scaled for this file's format."""
        if images.dtype != torch.uint8:
            raise TypeError(f"features are taken from uint8 images, got {images.dtype} (quantize with to_uint8)")
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (N, C, H, W) images with C = 1 or 3, got shape {tuple(images.shape)}")
        x = resize_tf1_bilinear(images.to(self.device, non_blocking=True), INPUT_SIZE)
        if self.kind == "pool3":
            x = (x - 128.0) / 128.0
        # channels-last: oneDNN's convolutions run ≈ 12 % faster on it on the CPU (benchmarks/fid_throughput.py)
        return x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)

    def network(self, x: Tensor) -> Tensor:
        """The bare forward pass on ``network_input`` output."""
        if self.kind == "nvlabs":
            return self.module(x, return_features=True)
        return self.module(x)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Tensor:
        feats = self.network(self.network_input(images)).float()
        if feats.ndim != 2 or feats.shape[1] != self.dims:
            raise ValueError(f"{self.path}: the network returned shape {tuple(feats.shape)}, not (N, {self.dims})")
        return feats


_LOADED: dict[tuple[str, str], FeatureExtractor] = {}


def load_extractor(
    path: str | os.PathLike | None = None, device: torch.device | str | None = None, *, download: bool = False
) -> FeatureExtractor:
    """Load (once per file and device) the Inception network found by ``find_weights``.

    With ``download=True`` and no weights found, NVlabs' file is downloaded into the cache first.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():  # else torch.jit.load blames the weights file
        raise ValueError(f"CUDA is not available on this machine, so the FID network cannot run on {device}; "
                         "use --device cpu")
    try:
        resolved = find_weights(path)
    except WeightsNotFoundError:
        if not download or path is not None or os.environ.get(WEIGHTS_ENV):
            raise  # an explicit location that is wrong is an error, not a reason to download
        resolved = download_weights()
    key = (str(resolved.resolve()), str(device))
    if key not in _LOADED:
        module, kind = _load_module(resolved, device)
        _LOADED[key] = FeatureExtractor(module, kind, device, resolved)
    return _LOADED[key]
