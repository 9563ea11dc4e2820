"""One restorable batch source for training: shuffled mini-batches of images or of reflow pairs."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from diffsamp.images import to_float


class BatchSampler:
    """Endless shuffled mini-batches of a tensor's rows on ``device``: uint8 images come out as float [-1, 1]
    (``to_float``), anything else (reflow pairs (N, 2, *shape)) as stored.

    The order is a pure function of a seeded ``torch.Generator``, whose state (with the position in
    the current epoch) is part of ``state_dict()``, so a resumed run sees exactly the batches the
    uninterrupted run would have seen. Data sets as small as MNIST live in memory (on the GPU when
    training there), which is faster than a DataLoader with workers; ``random_flip`` mirrors images
    horizontally at random (for CIFAR-10; not for digits). With ``labels`` ((N,) integers) each batch is the
    pair (images, their labels).
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        random_flip: bool = False,
        labels: Tensor | None = None,
    ) -> None:
        if data.dtype == torch.uint8 and data.ndim != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {data.dtype} {tuple(data.shape)}")
        if data.dtype != torch.uint8 and not data.is_floating_point():
            raise ValueError(f"expected uint8 images or a float tensor, got {data.dtype}")
        if random_flip and data.dtype != torch.uint8:
            raise ValueError("random_flip mirrors images: it needs uint8 (N, C, H, W) images")
        if not 0 < batch_size:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if labels is not None and (labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.is_floating_point()):
            raise ValueError(f"labels must be (N,) = ({data.shape[0]},) integers, got {labels.dtype} {tuple(labels.shape)}")
        self.images = data.to(device)
        self.labels = labels.long().to(device) if labels is not None else None
        self.n = data.shape[0]
        self.batch_size = min(batch_size, self.n)
        self.random_flip = random_flip
        self.generator = torch.Generator().manual_seed(seed)
        self._perm: Tensor | None = None
        self._pos = 0
        self.epoch = 0

    def _new_epoch(self) -> None:
        self._perm = torch.randperm(self.n, generator=self.generator)
        self._pos = 0

    def next(self) -> Tensor | tuple[Tensor, Tensor]:
        if self._perm is None or self._pos + self.batch_size > self.n:  # drop the last partial batch
            if self._perm is not None:
                self.epoch += 1
            self._new_epoch()
        assert self._perm is not None
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        x = self.images[idx.to(self.images.device)]
        if x.dtype == torch.uint8:
            x = to_float(x)
        if self.random_flip:
            flip = torch.rand(x.shape[0], generator=self.generator) < 0.5
            x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
        if self.labels is not None:
            return x, self.labels[idx.to(self.labels.device)]
        return x

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        """Generator state (uint8 tensor) + epoch permutation + position: enough to replay the order."""
        return {
            "generator": self.generator.get_state(),
            "perm": self._perm.clone() if self._perm is not None else torch.empty(0, dtype=torch.long),
            "pos": self._pos,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        perm = state["perm"]
        self._perm = perm.clone().long() if perm.numel() else None
        self._pos = int(state["pos"])
        self.epoch = int(state.get("epoch", 0))
