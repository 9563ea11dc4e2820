"""An independent MNIST classifier, for measuring how well a class-conditional model obeys its labels.

A small CNN (two 3×3 conv layers with batch norm and max pooling, two fully connected layers; ~86k
parameters) trained on MNIST train as diffsamp loads it ([-1, 1], 28×28 zero-padded to 32×32), with random
shifts of up to ±2 pixels. The shipped weights (``diffsamp/weights/classifiers/mnist-cnn.safetensors``, card
``mnist-cnn.json`` next to them: architecture, training cost, test accuracy) are reproduced by
``benchmarks/train_mnist_classifier.py``.

Class adherence (``class_adherence``) is the fraction of images the classifier assigns to the class each was
asked for; ``per_class_adherence`` gives it class by class.

    >>> clf = load_classifier()
    >>> class_adherence(out.images, labels, clf)     # images in [-1, 1], (N, 1, 32, 32) or (N, 1, 28, 28)
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLASSIFIER_DIR",
    "DEFAULT_WEIGHTS",
    "ClassifierConfig",
    "MNISTClassifier",
    "TrainResult",
    "accuracy",
    "class_adherence",
    "embed",
    "load_classifier",
    "per_class_adherence",
    "perceptual_distance",
    "predict",
    "save_classifier",
    "train_classifier",
]

CLASSIFIER_DIR = Path(__file__).resolve().parents[1] / "weights" / "classifiers"
DEFAULT_WEIGHTS = CLASSIFIER_DIR / "mnist-cnn.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    """The CNN's widths: conv1 → conv2 channels, the hidden fully connected width, the number of classes."""

    channels: tuple[int, int] = (32, 64)
    hidden: int = 64
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 32
    dropout: float = 0.25
    pool: int = 4  # max pooling after conv2 (the first conv is followed by 2×2)


class MNISTClassifier(nn.Module):
    """conv3×3(c1)-BN-ReLU-maxpool2 → conv3×3(c2)-BN-ReLU-maxpool(pool) → fc(hidden)-ReLU-dropout → fc(classes).

    Takes images in [-1, 1], (N, 1, 32, 32); returns logits (N, num_classes).
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or ClassifierConfig()
        c1, c2 = config.channels
        self.conv1 = nn.Conv2d(config.in_channels, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        side = config.image_size // (2 * config.pool)
        self.fc1 = nn.Linear(c2 * side * side, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.num_classes)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.features(x)[-1].flatten(1)))

    def embedding(self, x: Tensor) -> Tensor:
        """The penultimate (fc1, post-ReLU) features (N, hidden) of images in [-1, 1] (or uint8), padded to size."""
        return self.features(_prepare(x, self.config.image_size))[-1].flatten(1)

    def features(self, x: Tensor) -> list[Tensor]:
        """The activations after each ReLU: conv1 (N, c1, 32, 32), conv2 (N, c2, 16, 16), fc1 (N, hidden, 1, 1)."""
        a1 = F.relu(self.bn1(self.conv1(x)))
        a2 = F.relu(self.bn2(self.conv2(F.max_pool2d(a1, 2))))
        a3 = F.relu(self.fc1(F.max_pool2d(a2, self.config.pool).flatten(1)))
        return [a1, a2, a3[:, :, None, None]]


def num_parameters(model: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------ saving and loading
def save_classifier(model: MNISTClassifier, path: str | os.PathLike, card: dict[str, Any] | None = None) -> Path:
    """Write the weights (fp32 safetensors) and a JSON card (``<path>.json`` with the suffix replaced) holding
    the architecture plus ``card``."""
    from safetensors.torch import save_file

    from diffsamp.io import atomic_path, write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "diffsamp-classifier"})
    cfg = asdict(model.config)
    cfg["channels"] = list(cfg["channels"])
    body = {"format": "diffsamp-classifier", "format_version": 1, "architecture": "MNISTClassifier",
            "config": cfg, "parameters": num_parameters(model), **(card or {})}
    write_text(path.with_suffix(".json"), json.dumps(body, indent=2) + "\n")
    return path


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> MNISTClassifier:
    """The classifier stored at ``path`` (default: the shipped ``mnist-cnn``), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights {path} do not exist "
                                "(train them with `python benchmarks/train_mnist_classifier.py`)")
    card_path = path.with_suffix(".json")
    cfg: dict[str, Any] = {}
    if card_path.is_file():
        cfg = dict(json.loads(card_path.read_text()).get("config", {}))
        if "channels" in cfg:
            cfg["channels"] = tuple(cfg["channels"])
    model = MNISTClassifier(ClassifierConfig(**cfg))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


# ------------------------------------------------------------------------------ prediction and adherence
def _prepare(images: Tensor, size: int) -> Tensor:
    """Float images in [-1, 1] at ``size``×``size`` (uint8 is scaled; smaller images are padded with -1)."""
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1.0
    if images.ndim == 3:
        images = images.unsqueeze(1)
    h, w = images.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"images of {h}×{w} are larger than the classifier's {size}×{size}")
    if (h, w) != (size, size):
        top, left = (size - h) // 2, (size - w) // 2
        images = F.pad(images, (left, size - w - left, top, size - h - top), value=-1.0)
    return images.float()


def perceptual_distance(classifier: MNISTClassifier, a: Tensor, b: Tensor) -> Tensor:
    """LPIPS-style distance (Zhang et al. 2018, Eq. 1 with unit layer weights) in the classifier's activations: per
    layer, features unit-normalised over channels at each position, squared differences summed over channels and
    averaged over positions, then summed over layers. (N,), differentiable in ``a`` and ``b`` (images in [-1, 1]).
    An independent network's features — not the FID network's, which would tune to the reported metric."""
    if a.shape != b.shape:
        raise ValueError(f"perceptual_distance needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    size = classifier.config.image_size
    fa, fb = classifier.features(_prepare(a, size)), classifier.features(_prepare(b, size))
    total = a.new_zeros(a.shape[0], dtype=torch.float32)
    for x, y in zip(fa, fb):
        x = x / (x.pow(2).sum(1, keepdim=True) + 1e-10).sqrt()
        y = y / (y.pow(2).sum(1, keepdim=True) + 1e-10).sqrt()
        total = total + (x - y).pow(2).sum(1).mean((1, 2))
    return total


@torch.no_grad()
def embed(classifier: MNISTClassifier, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """The classifier's penultimate (fc1, post-ReLU) features of images in [-1, 1] or uint8: (N, hidden) float32 —
    an independent network's embedding for Fréchet distances that are not the reported FID's."""
    was_training = classifier.training
    classifier.eval()
    device = next(iter(classifier.parameters())).device
    out = [classifier.embedding(images[b : b + batch_size].to(device)).cpu()
           for b in range(0, images.shape[0], batch_size)]
    classifier.train(was_training)
    return torch.cat(out) if out else torch.empty(0, classifier.config.hidden)


@torch.no_grad()
def predict(classifier: nn.Module, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """The predicted class (int64, (N,)) of each image in [-1, 1] (or uint8)."""
    was_training = classifier.training
    classifier.eval()
    size = getattr(getattr(classifier, "config", None), "image_size", images.shape[-1])
    device = next(iter(classifier.parameters()), torch.empty(0)).device
    out = []
    for b in range(0, images.shape[0], batch_size):
        x = _prepare(images[b : b + batch_size], size).to(device)
        out.append(classifier(x).argmax(1).cpu())
    classifier.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def _as_labels(classes: Sequence[int] | Tensor, n: int) -> Tensor:
    labels = torch.as_tensor(classes, dtype=torch.int64).flatten().cpu()
    if labels.numel() != n:
        raise ValueError(f"{labels.numel()} classes for {n} images: give one class per image")
    return labels


def class_adherence(images: Tensor, classes: Sequence[int] | Tensor, classifier: nn.Module,
                    *, batch_size: int = 500) -> float:
    """The fraction of ``images`` that ``classifier`` assigns to the class each was asked for."""
    labels = _as_labels(classes, images.shape[0])
    if labels.numel() == 0:
        raise ValueError("class adherence of no images")
    return (predict(classifier, images, batch_size=batch_size) == labels).double().mean().item()


accuracy = class_adherence  # on real images with their true labels, adherence is the classifier's accuracy


def per_class_adherence(images: Tensor, classes: Sequence[int] | Tensor, classifier: nn.Module,
                        *, batch_size: int = 500) -> dict[int, float]:
    """Class adherence (or accuracy) class by class: {class: fraction correct} over the classes present."""
    labels = _as_labels(classes, images.shape[0])
    hit = predict(classifier, images, batch_size=batch_size) == labels
    return {int(c): hit[labels == c].double().mean().item() for c in labels.unique().tolist()}


# ------------------------------------------------------------------------------ training
@dataclass
class TrainResult:
    """A trained classifier with its per-epoch record (mean loss, seconds) and total training seconds."""

    model: MNISTClassifier
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch (or per logged chunk)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    log: list[dict[str, Any]] = field(default_factory=list)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image by an integer (dy, dx) in [−max_shift, max_shift]², filling with the background −1."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * p)
    cropped = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return cropped.gather(3, cols)


def train_classifier(
    images: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    config: ClassifierConfig | None = None,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 2,
    seed: int = 0,
    max_steps: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Train ``MNISTClassifier`` with AdamW and a cosine learning rate over ``epochs`` on ``images`` / ``labels``
    (default: MNIST train as ``diffsamp.data.load_dataset`` gives it, [-1, 1] 32×32), with random shifts.

    Deterministic for a given ``seed`` on one device and thread count. ``checkpoint``: a file written after
    every epoch and resumed from when present (an interrupted run loses at most one epoch). ``max_steps``
    stops early (for tests).
    """
    if images is None or labels is None:
        from diffsamp.data import load_dataset, load_labels

        images = load_dataset("mnist", "train", data_dir)
        labels = load_labels("mnist", "train", data_dir)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    images, labels = images.float(), labels.long()
    config = config or ClassifierConfig(image_size=images.shape[-1], in_channels=images.shape[1])
    torch.manual_seed(seed)
    model = MNISTClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = images.shape[0]
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    res = TrainResult(model)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        res.losses, res.epochs, res.steps = state["losses"], state["epochs"], state["steps"]
        res.seconds, res.log = state["seconds"], state["log"]
        if "torch_rng" in state:  # dropout draws from the global generator
            torch.set_rng_state(state["torch_rng"])
        if log:
            log(f"resumed from {ckpt} after epoch {res.epochs}")
    model.train()
    while res.epochs < epochs:
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        running, count = 0.0, 0
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            x = random_shift(images[idx], max_shift, gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * idx.numel()
            count += idx.numel()
            res.steps += 1
            if max_steps is not None and res.steps >= max_steps:
                break
        res.epochs += 1
        res.losses.append(running / max(count, 1))
        dt = time.perf_counter() - t0
        res.seconds += dt
        res.log.append({"epoch": res.epochs, "steps": res.steps, "loss": res.losses[-1], "seconds": round(dt, 1)})
        if log:
            log(f"epoch {res.epochs}/{epochs}: loss {res.losses[-1]:.4f}, {dt:.0f} s")
        if max_steps is not None and res.steps >= max_steps:
            break
        if ckpt is not None:
            from diffsamp.io import atomic_path

            ckpt.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "generator": gen.get_state(),
                            "torch_rng": torch.get_rng_state(), "losses": res.losses,
                            "epochs": res.epochs, "steps": res.steps, "seconds": res.seconds, "log": res.log}, tmp)
    model.eval()
    return res


def hardware() -> str:
    """A one-line description of the machine, as the model cards state it."""
    return f"cpu: {platform.machine()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch thread(s)"
