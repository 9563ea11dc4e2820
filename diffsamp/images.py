"""Images on disk: read a folder into uint8 tensors, write PNGs and grids.

Every reader returns ``torch.uint8`` tensors of shape (N, C, H, W) with C = 1 (grayscale) or 3 (RGB); float
images in [-1, 1] (a model's data space) are quantized with ``to_uint8`` exactly as saving them would.
Writers go through a temporary file in the destination folder and a rename, so an interrupted run never
leaves a half-written file behind; a missing destination folder is created.

Models' samples live in [-1, 1], not [0, 1]: ``save_images`` and ``to_uint8`` map -1 → 0 and 1 → 255
(``torchvision.utils.save_image`` expects [0, 1] and would clip the lower half).

    >>> x = load_image_folder("samples/")            # (N, C, H, W) uint8, sorted by file name
    >>> save_images(out.images, "grid.jpg")          # a grid, in the format the extension names
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from diffsamp.io import atomic_path

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderError",
    "iter_image_folder",
    "list_images",
    "load_image_folder",
    "image_grid",
    "save_grid",
    "save_image_folder",
    "save_images",
    "save_png",
    "WRITE_FORMATS",
    "image_format",
    "scan_image_folder",
    "to_float",
    "to_uint8",
]

# the one quantizer: x ∈ [-1, 1] ↔ round((x + 1)·127.5)
def to_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] → float32 [-1, 1]."""
    return x.float().div(127.5).sub(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] → uint8 [0, 255] (rounded, clipped); the inverse of ``to_float`` on its image."""
    return x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_GRAY_MODES = {"1", "L", "LA"}
_COLOR_MODES = {"RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}


class ImageFolderError(ValueError):
    """A folder that cannot be read as one set of same-sized images (empty, unreadable file, mixed sizes)."""


def _natural_key(path: Path) -> list:
    # "img2.png" before "img10.png"
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder`` (by extension, natural sort order); errors if there are none."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise ImageFolderError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ImageFolderError(f"{folder}: not a folder")
    entries = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    files = sorted((p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS), key=_natural_key)
    if not files:
        if not entries:
            raise ImageFolderError(f"{folder}: the folder is empty (expected image files: {', '.join(IMAGE_EXTENSIONS)})")
        others = ", ".join(p.name for p in sorted(entries)[:3])
        raise ImageFolderError(
            f"{folder}: no images among its {len(entries)} files (e.g. {others}); "
            f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )
    return files


def _channels(mode: str, path: Path) -> int:
    if mode in _GRAY_MODES:
        return 1
    if mode in _COLOR_MODES:
        return 3
    raise ImageFolderError(f"{path}: unsupported pixel format {mode!r} (16-bit or float images?); save 8-bit PNGs")


def scan_image_folder(folder: str | os.PathLike, limit: int | None = None) -> tuple[list[Path], tuple[int, int, int]]:
    """Check every image header of ``folder`` and return (files, (C, H, W)) without decoding pixels.

    Raises ``ImageFolderError`` naming the first offending file when a file is not a readable image or
    the sizes differ. A folder mixing grayscale and colour images is read as colour (C = 3): grayscale
    is repeated to 3 channels, which is what the FID network does with it anyway.
    """
    files = list_images(folder)
    if limit is not None:
        if limit < 1:
            raise ImageFolderError(f"limit must be positive, got {limit}")
        files = files[:limit]
    size: tuple[int, int] | None = None
    channels = 1
    for path in files:
        try:
            with Image.open(path) as im:  # lazy: reads the header only
                mode, (w, h) = im.mode, im.size
        except (UnidentifiedImageError, OSError) as exc:
            raise ImageFolderError(f"{path}: not a readable image ({exc})") from exc
        channels = max(channels, _channels(mode, path))
        if size is None:
            size, first = (h, w), path
        elif (h, w) != size:
            raise ImageFolderError(
                f"{Path(folder)}: images of different sizes: {first.name} is {size[0]}×{size[1]} "
                f"but {path.name} is {h}×{w} (all images must have one size)"
            )
    assert size is not None
    return files, (channels, *size)


def _read(path: Path, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageFolderError(f"{path}: not a readable image ({exc})") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_init_image(path: str | os.PathLike, channels: int, size: tuple[int, int]) -> Tensor:
    """One image file as a (1, C, H, W) float tensor in [-1, 1]: converted to ``channels`` (1: grey, 3: RGB) and
    resized to ``size`` (H, W) with bicubic resampling where it differs (an img2img start)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return to_float(torch.from_numpy(arr.copy())[None])


def iter_image_folder(
    folder: str | os.PathLike, batch_size: int = 256, limit: int | None = None, select: Sequence[int] | None = None
) -> Iterator[Tensor]:
    """Yield the images of ``folder`` as uint8 (B, C, H, W) batches, checking every header first; ``select``
    takes those positions of the (sorted, limited) file list, e.g. one rank's ``diffsamp.dist.shard_indices``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    files, (c, h, w) = scan_image_folder(folder, limit)
    if select is not None:
        files = [files[i] for i in select]
    for i in range(0, len(files), batch_size):
        chunk = files[i : i + batch_size]
        out = np.empty((len(chunk), c, h, w), dtype=np.uint8)
        for j, path in enumerate(chunk):
            arr = _read(path, c)
            if arr.shape != (c, h, w):  # the header lied (e.g. a multi-frame file)
                raise ImageFolderError(f"{path}: decoded shape {arr.shape} differs from {(c, h, w)}")
            out[j] = arr
        yield torch.from_numpy(out)


def load_image_folder(folder: str | os.PathLike, limit: int | None = None) -> Tensor:
    """All images of ``folder`` (sorted by name; the first ``limit`` if given) as one uint8 (N, C, H, W) tensor."""
    return torch.cat(list(iter_image_folder(folder, batch_size=1024, limit=limit)))


def _as_uint8(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    if images.is_floating_point():
        return to_uint8(images).cpu()
    raise TypeError(f"expected uint8 images or float images in [-1, 1], got {images.dtype}")


# extension → the PIL format written for it
WRITE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}


def image_format(path: str | os.PathLike) -> str:
    """The image format ``path``'s extension names (PNG, JPEG, …); a ValueError for any other extension."""
    suffix = Path(path).suffix.lower()
    if suffix not in WRITE_FORMATS:
        named = f"extension {suffix!r}" if suffix else "no extension"
        raise ValueError(f"{path}: {named}; write an image file ending in "
                         f"{', '.join(sorted(set(WRITE_FORMATS)))}")
    return WRITE_FORMATS[suffix]


def save_png(image: Tensor, path: str | os.PathLike, *, text: dict[str, str] | None = None) -> Path:
    """Write one image — uint8 or float in [-1, 1]; shape (C, H, W), (1, C, H, W) or (H, W) — as a PNG.

    ``text``: PNG text chunks (key → value), e.g. the settings that made the image.
    """
    return _save(image, path, "PNG", text)


def _save(image: Tensor, path: str | os.PathLike, fmt: str, text: dict[str, str] | None = None) -> Path:
    x = _as_uint8(image)
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"expected one (C, H, W) image with C = 1 or 3, got shape {tuple(image.shape)}")
    arr = x.numpy()
    pil = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0), mode="RGB")
    path = Path(path)
    options: dict = {}
    if fmt == "PNG" and text:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)
        options["pnginfo"] = info
    elif fmt in ("JPEG", "WEBP"):
        options["quality"] = 95
    with atomic_path(path) as tmp:
        pil.save(tmp, format=fmt, **options)
    return path


def image_grid(images: Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> Tensor:
    """Tile (N, C, H, W) images into one uint8 (C, H', W') image, ``nrow`` images per row."""
    x = _as_uint8(images)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    n, c, h, w = x.shape
    ncol = max(1, min(nrow, n))
    nrows = -(-n // ncol)
    grid = torch.full(
        (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value, dtype=torch.uint8
    )
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> Path:
    """Write (N, C, H, W) images (uint8 or float in [-1, 1]) as one PNG grid with ``nrow`` images per row."""
    return save_png(image_grid(images, nrow, padding, pad_value), path)


def save_images(
    images: Tensor, path: str | os.PathLike, *, nrow: int | None = None, text: dict[str, str] | None = None
) -> Path:
    """Write images in [-1, 1] (or uint8) as one file: a grid of an (N, C, H, W) batch (``nrow`` per row,
    default ⌈√N⌉) or a single (C, H, W) image, in the format the extension names (``image_format``).

    ``text`` goes into a PNG's text chunks. This is how to save ``generate``'s output: the [-1, 1] range maps
    to 0…255 exactly as ``to_uint8`` does.
    """
    import math

    fmt = image_format(path)
    if images.ndim == 4 and images.shape[0] > 1:
        images = image_grid(images, nrow or max(1, math.ceil(math.sqrt(images.shape[0]))))
    return _save(images, path, fmt, text if fmt == "PNG" else None)


def save_image_folder(images: Tensor, folder: str | os.PathLike, start: int = 0, prefix: str = "") -> list[Path]:
    """Write each image of an (N, C, H, W) batch as ``folder/{prefix}{start + i:06d}.png``."""
    folder = Path(folder)
    return [save_png(img, folder / f"{prefix}{start + i:06d}.png") for i, img in enumerate(images)]


def __getattr__(name: str) -> Any:
    """``make_grid``, this module's old name of ``image_grid`` (deprecated: ``diffsamp.make_grid`` is the σ grid)."""
    if name == "make_grid":
        import warnings

        warnings.warn("diffsamp.images.make_grid is now image_grid (diffsamp.make_grid builds σ grids)",
                      DeprecationWarning, stacklevel=2)
        return image_grid
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
