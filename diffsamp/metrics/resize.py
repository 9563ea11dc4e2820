"""TensorFlow 1 ``tf.image.resize_bilinear`` (align_corners=False, half_pixel_centers=False), vectorised.

The FID network was trained and is always evaluated on images resized this way, so features (and
published FIDs) are only comparable if the resize is the same. For output pixel ``o`` TF1 samples the
input at ``src = o · (in/out)`` — no half-pixel shift — and blends ``floor(src)`` with the next pixel,
clamped at the last one. Bilinear resizing is separable, so it is one (out × in) matrix per axis:
``y = R_h · x · R_wᵀ``, two small batched matmuls.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=32)
def _matrix_cpu(in_size: int, out_size: int) -> Tensor:
    # TF1 computes the scale and the source coordinate in float32; so do we.
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lo = src.floor()
    frac = (src - lo).double()
    lo = lo.long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    rows = torch.arange(out_size)
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def tf1_bilinear_matrix(
    in_size: int, out_size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """The (out_size, in_size) matrix R with ``R @ v`` = TF1 bilinear resize of the 1-D signal ``v``."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
    return _matrix_cpu(int(in_size), int(out_size)).to(dtype=dtype, device=device)


def resize_tf1_bilinear(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize (..., H, W) images to ``size`` like TF1's ``resize_bilinear``; returns float32 (float64 kept).

    Integer input (e.g. uint8 in [0, 255]) is converted to float32 first; values are not rescaled.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = images if images.is_floating_point() else images.float()
    h, w = x.shape[-2:]
    if (h, w) == (out_h, out_w):
        return x
    rh = tf1_bilinear_matrix(h, out_h, dtype=x.dtype, device=x.device)
    rw = tf1_bilinear_matrix(w, out_w, dtype=x.dtype, device=x.device)
    return torch.matmul(torch.matmul(rh, x), rw.T)
