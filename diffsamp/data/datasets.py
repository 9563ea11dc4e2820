"""Datasets for training and for FID reference statistics.

Every loader returns images as a ``torch.uint8`` tensor of shape (N, C, H, W) — the one form both the
FID code (which wants integer pixels) and training (``to_float``: [-1, 1]) start from.

* ``mnist`` / ``fashion-mnist``: read from the canonical idx ``.gz`` files with gzip + numpy, no network.
  Files are looked up in ``data_dir`` (or the environment variable ``DIFFSAMP_DATA``) under either layout::

      <dir>/mnist/train-images-idx3-ubyte.gz              (the canonical layout)
      <dir>/fashion-mnist/t10k-images-idx3-ubyte.gz
      <dir>/MNIST/raw/train-images-idx3-ubyte[.gz]         (torchvision's layout)
      <dir>/FashionMNIST/raw/...
      <dir>/train-images-idx3-ubyte.gz                     (the files directly in <dir>)

  28×28 images are zero-padded to ``pad_to`` (32 by default: 2 pixels on each side).
* ``cifar10``: through torchvision's ``CIFAR10`` class; downloaded only when ``download=True``.
* any other name that is an existing directory: every image in that folder (``diffsamp.images``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffsamp.images import load_image_folder, to_float

DATASETS = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")
ENV_VAR = "DIFFSAMP_DATA"

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_FOLDERS = {"mnist": ("mnist", "MNIST/raw", "MNIST"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw", "FashionMNIST", "fashion_mnist")}


_CIFAR_HINT = "torchvision's 'cifar-10-batches-py' folder, or pass download=True (needs the network)"


class DataNotFoundError(FileNotFoundError):
    """The data set's files are not on this machine (and no download was asked for)."""


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The directory to read data from: ``data_dir`` if given, else ``$DIFFSAMP_DATA``, else None."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else None


def _normalize_name(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key in ("fashion", "fashionmnist", "fmnist"):
        return "fashion-mnist"
    if key in ("cifar-10", "cifar"):
        return "cifar10"
    return key


def _missing(name: str, split: str, looked: list[Path] | None, hint: str = "") -> DataNotFoundError:
    where = "\n  ".join(str(p) for p in looked) if looked else "(no directory given)"
    what = hint or f"'{name}/{_IDX_PREFIX.get(split, split)}-images-idx3-ubyte.gz'"
    return DataNotFoundError(
        f"{name} ({split}) not found. Looked in:\n  {where}\n"
        f"Point --data-dir (or the environment variable {ENV_VAR}) at a folder holding {what}."
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (``.gz`` or raw) into a numpy array of its declared shape (uint8 images/labels)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte idx files are supported (type code {data[2]:#x})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but holds {arr.size} bytes")
    return arr.reshape(dims)


def find_idx_file(name: str, split: str, kind: str = "images", data_dir: str | os.PathLike | None = None) -> Path:
    """Locate ``<prefix>-<kind>-idx{3,1}-ubyte[.gz]`` for an MNIST-like data set (see the module doc)."""
    name = _normalize_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = data_root(data_dir)
    if root is None:
        raise _missing(name, split, None)
    stem = f"{_IDX_PREFIX[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    looked: list[Path] = []
    for folder in (*_IDX_FOLDERS[name], "."):
        for suffix in (".gz", ""):
            p = root / folder / f"{stem}{suffix}"
            looked.append(p)
            if p.is_file():
                return p
    raise _missing(name, split, looked)


def load_labels(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, *, limit: int | None = None
) -> Tensor:
    """The class labels (int64, (N,)) of ``mnist`` or ``fashion-mnist``, in the images' canonical order (so
    ``load_labels(...)[i]`` is the class of ``load_dataset_uint8(...)[i]``); 10 classes each."""
    key = _normalize_name(name)
    if key not in ("mnist", "fashion-mnist"):
        raise ValueError(f"class labels are available for mnist and fashion-mnist, not {name!r}")
    arr = read_idx(find_idx_file(key, split, "labels", data_dir))
    if limit is not None:
        arr = arr[:limit]
    return torch.from_numpy(arr.astype("int64"))


def load_dataset_uint8(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    pad_to: int | None = 32,
    *,
    download: bool = False,
    limit: int | None = None,
) -> Tensor:
    """All images of a data set as a uint8 tensor (N, C, H, W).

    ``name``: ``mnist``, ``fashion-mnist``, ``cifar10`` or a directory of images. ``pad_to`` zero-pads
    smaller images symmetrically (28 → 32 adds 2 pixels each side); None keeps them as stored.
    ``limit`` keeps the first ``limit`` images (the canonical order, so ``train[:N]`` is reproducible).
    """
    key = _normalize_name(name)
    if key in ("mnist", "fashion-mnist"):
        arr = read_idx(find_idx_file(key, split, "images", data_dir))  # (N, 28, 28)
        if limit is not None:
            arr = arr[:limit]
        x = torch.from_numpy(arr.copy()).unsqueeze(1)
    elif key == "cifar10":
        x = _load_cifar10(split, data_dir, download)
        if limit is not None:
            x = x[:limit]
    elif Path(name).expanduser().is_dir():
        x = _load_folder(Path(name).expanduser())
        if limit is not None:
            x = x[:limit]
    else:
        raise ValueError(f"unknown data set {name!r}: expected one of {DATASETS} or a folder of images")
    if pad_to is not None:
        x = pad_images(x, pad_to)
    return x.contiguous()


def pad_images(x: Tensor, size: int) -> Tensor:
    """Zero-pad (N, C, H, W) images symmetrically up to ``size``×``size`` (no-op when already that size)."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"cannot pad {h}×{w} images to {size}×{size}: they are larger")
    if h == size and w == size:
        return x
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top), value=0)


def _load_cifar10(split: str, data_dir: str | os.PathLike | None, download: bool) -> Tensor:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from torchvision.datasets import CIFAR10

    root = data_root(data_dir)
    if root is None:
        if not download:
            raise _missing("cifar10", split, None, hint=_CIFAR_HINT)
        root = Path.home() / ".cache" / "diffsamp" / "data"
    candidates = [root, root / "cifar10", root / "cifar-10"]
    for cand in candidates:
        if (cand / "cifar-10-batches-py").is_dir():
            root = cand
            break
    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise _missing("cifar10", split, [c / "cifar-10-batches-py" for c in candidates],
                       hint=_CIFAR_HINT) from exc
    except OSError as exc:  # download attempted without network
        raise DataNotFoundError(f"could not download CIFAR-10 into {root}: {exc}. Use --data-dir with a local copy.") from exc
    return torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()


def _load_folder(folder: Path) -> Tensor:
    x = load_image_folder(folder)
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dtype != torch.uint8:
        raise TypeError(f"load_image_folder returned {x.dtype}, expected uint8")
    if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    return x


def load_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, pad_to: int | None = 32, **kw
) -> Tensor:
    """``load_dataset_uint8`` scaled to float32 in [-1, 1]."""
    return to_float(load_dataset_uint8(name, split, data_dir, pad_to, **kw))


class ImageTensorDataset(torch.utils.data.Dataset):
    """A uint8 (N, C, H, W) tensor served as float [-1, 1] images, one at a time."""

    def __init__(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return to_float(self.images[i])


def make_loader(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 128,
    *,
    pad_to: int | None = 32,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    download: bool = False,
) -> torch.utils.data.DataLoader:
    """A plain ``DataLoader`` of float [-1, 1] images (for users who want the torch idiom).

    Training in diffsamp uses ``BatchSampler`` (resumable order); this is for everything else.
    """
    images = load_dataset_uint8(name, split, data_dir, pad_to, download=download)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ImageTensorDataset(images), batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=num_workers
    )
