"""Train the independent MNIST classifier that measures class adherence, and write its weights and card.

Reproduces ``diffsamp/weights/classifiers/mnist-cnn.safetensors`` (+ ``mnist-cnn.json``): the small CNN of
``diffsamp.metrics.classifier`` on MNIST train ([-1, 1], 32×32 padded, random ±2-pixel shifts), AdamW with a
cosine learning rate, seed 0, one torch thread; then its accuracy on the full MNIST test set (10 000) and per
class. A checkpoint is written after every epoch (``--checkpoint``); rerunning the command resumes from it.

    OMP_NUM_THREADS=1 python benchmarks/train_mnist_classifier.py --data-dir /path/to/data
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from diffsamp.data import load_dataset, load_labels
from diffsamp.metrics.classifier import (
    DEFAULT_WEIGHTS,
    ClassifierConfig,
    accuracy,
    hardware,
    num_parameters,
    per_class_adherence,
    save_classifier,
    train_classifier,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="Folder holding mnist/ (default: $DIFFSAMP_DATA).")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-shift", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=ClassifierConfig.hidden, help="Width of the hidden fc layer.")
    ap.add_argument("--pool", type=int, default=ClassifierConfig.pool, help="Max pooling after the second conv.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS))
    ap.add_argument("--checkpoint", default="runs/mnist-classifier/checkpoint.pt")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    config = ClassifierConfig(hidden=args.hidden, pool=args.pool)
    res = train_classifier(data_dir=args.data_dir, config=config, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           max_shift=args.max_shift, seed=args.seed, checkpoint=args.checkpoint,
                           log=lambda s: print(s, flush=True))
    test_x, test_y = load_dataset("mnist", "test", args.data_dir), load_labels("mnist", "test", args.data_dir)
    acc = accuracy(test_x, test_y, res.model)
    per_class = per_class_adherence(test_x, test_y, res.model)
    print(f"test accuracy {acc:.4f} on {len(test_y)} images; per class "
          + ", ".join(f"{c}: {a:.4f}" for c, a in per_class.items()))
    if acc < 0.99:
        print("test accuracy below 0.99: weights not written", file=sys.stderr)
        sys.exit(1)
    cmd = "python benchmarks/train_mnist_classifier.py " + " ".join(sys.argv[1:])
    card = {
        "description": "independent MNIST classifier for class adherence of class-conditional models",
        "data": "MNIST train (60 000), 28×28 zero-padded to 32×32, [-1, 1]; random integer shifts of ±"
                f"{args.max_shift} px (background -1)",
        "training": {
            "epochs": res.epochs, "steps": res.steps, "batch_size": args.batch_size,
            "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": 1e-4, "schedule": "cosine to 0"},
            "seed": args.seed, "seconds": round(res.seconds, 1), "hardware": hardware(),
            "software": {"torch": torch.__version__, "python": sys.version.split()[0]},
            "loss_per_epoch": [round(v, 5) for v in res.losses],
            "date": datetime.date.today().isoformat(), "command": cmd.strip(),
        },
        "test_accuracy": acc,
        "test_images": len(test_y),
        "test_accuracy_per_class": {str(c): a for c, a in per_class.items()},
        "weights": "fp32 safetensors (BatchNorm running statistics included)",
    }
    path = save_classifier(res.model, Path(args.out), card)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB, {num_parameters(res.model)} parameters) "
          f"and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
