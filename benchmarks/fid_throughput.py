"""FID feature throughput on the CPU: diffsamp's Inception pass against pytorch-fid's, on the same image folder.

Both read the same N PNGs (MNIST-sized 32×32 grey digits, the case this project's FIDs are about) and compute the
2048-d pool3 features at the same batch size and thread count; the table gives images/s and the ratio. pytorch-fid
downloads its weights on first use: offline it runs with randomly initialised weights of the same architecture
(the timing does not depend on the weights; said in the output). diffsamp uses the TorchScript file
``--inception`` / ``DIFFSAMP_INCEPTION``.

    python benchmarks/fid_throughput.py --num 256 --batch 64 --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_folder(folder: Path, num: int) -> None:
    """``num`` 32×32 grey PNGs of random strokes (content does not change the cost)."""
    g = np.random.default_rng(0)
    for i in range(num):
        img = (g.random((32, 32)) > 0.8).astype(np.uint8) * 255
        Image.fromarray(img, mode="L").save(folder / f"{i:06d}.png")


def pytorch_fid_model(device: str) -> tuple[torch.nn.Module, str]:
    """pytorch-fid's InceptionV3 (pool3); random weights when its download is not reachable."""
    from pytorch_fid import inception

    try:
        return inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval(), "FID weights"
    except Exception:  # noqa: BLE001 - offline: the same architecture, untrained
        original = inception.load_state_dict_from_url
        inception.load_state_dict_from_url = lambda *a, **k: inception._inception_v3(  # type: ignore[attr-defined]
            num_classes=1008, aux_logits=False, weights=None).state_dict()
        try:
            net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except Exception:  # noqa: BLE001 - the FID-specific blocks differ in keys: build them untrained
            inception.load_state_dict_from_url = original
            net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=False)
        finally:
            inception.load_state_dict_from_url = original
        return net.to(device).eval(), "random weights (offline)"


def time_pytorch_fid(folder: Path, batch: int, device: str) -> float:
    from pytorch_fid.fid_score import get_activations

    model, _ = pytorch_fid_model(device)
    files = sorted(folder.glob("*.png"))
    t = time.perf_counter()
    feats = get_activations(files, model, batch_size=batch, dims=2048, device=device, num_workers=0)
    seconds = time.perf_counter() - t
    assert feats.shape == (len(files), 2048)
    return len(files) / seconds


def time_diffsamp(folder: Path, batch: int, device: str, inception: str | None) -> float:
    from diffsamp.metrics import load_extractor
    from diffsamp.metrics.fid import folder_stats

    extractor = load_extractor(inception, device)
    files = sorted(folder.glob("*.png"))
    t = time.perf_counter()
    folder_stats(folder, extractor=extractor, batch_size=batch, progress=False)
    return len(files) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--inception", default=None)
    ap.add_argument("--out", type=Path, default=None, help="Also write the table here.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, weights = pytorch_fid_model(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_folder(folder, args.num)
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so drifts of the machine's speed hit both alike
            ours.append(time_diffsamp(folder, args.batch, args.device, args.inception))
            theirs.append(time_pytorch_fid(folder, args.batch, args.device))
    a, b = statistics.median(ours), statistics.median(theirs)
    lines = [
        f"FID features, {args.num} 32×32 grey PNGs, batch {args.batch}, {args.threads} thread(s), {args.device}, "
        f"median of {args.repeats}; torch {torch.__version__}; pytorch-fid with {weights}",
        "",
        "| | images/s | runs |",
        "|---|---|---|",
        f"| diffsamp (`fid calc` path: TF1 bilinear resize, TorchScript pool3) | {a:.1f} | {', '.join(f'{v:.1f}' for v in ours)} |",
        f"| pytorch-fid (`get_activations`: PIL load, bilinear resize, InceptionV3) | {b:.1f} | {', '.join(f'{v:.1f}' for v in theirs)} |",
        "",
        f"ratio diffsamp / pytorch-fid: {a / b:.2f}",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
