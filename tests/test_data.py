"""Data loading: idx parsing, padding, scaling, the resumable batch order, and the offline error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsamp import data
from tests.conftest import write_idx

SHARED = Path(os.environ.get("DIFFSAMP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture()
def fake_mnist(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    imgs = rng.integers(1, 256, size=(10, 28, 28), dtype=np.uint8)  # no zeros: padding is visible
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz", imgs[:4])
    return tmp_path, imgs


def test_idx_roundtrip_and_padding(fake_mnist):
    root, imgs = fake_mnist
    x = data.load_dataset_uint8("mnist", "train", root)
    assert x.shape == (10, 1, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(imgs))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(x[:, :, border].max()) == 0
    raw = data.load_dataset_uint8("mnist", "train", root, pad_to=None, limit=3)
    assert raw.shape == (3, 1, 28, 28)


def test_torchvision_layout_and_env(fake_mnist, monkeypatch):
    root, imgs = fake_mnist
    monkeypatch.setenv(data.ENV_VAR, str(root))
    x = data.load_dataset_uint8("fashion-mnist", "test")
    assert x.shape == (4, 1, 32, 32)


def test_float_scaling_roundtrip(fake_mnist):
    root, _ = fake_mnist
    u = data.load_dataset_uint8("mnist", "train", root)
    f = data.to_float(u)
    assert f.dtype == torch.float32 and float(f.min()) >= -1 and float(f.max()) <= 1
    assert float(f[0, 0, 0, 0]) == -1.0
    assert torch.equal(data.to_uint8(f), u)


def test_missing_data_names_the_option(tmp_path, monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    with pytest.raises(data.DataNotFoundError, match="--data-dir"):
        data.load_dataset_uint8("mnist", "train")
    with pytest.raises(data.DataNotFoundError, match="DIFFSAMP_DATA"):
        data.load_dataset_uint8("fashion-mnist", "test", tmp_path)
    with pytest.raises(ValueError, match="unknown data set"):
        data.load_dataset_uint8("imagenet", "train", tmp_path)


def test_batch_sampler_resumes_the_same_order(fake_mnist):
    root, _ = fake_mnist
    x = data.load_dataset_uint8("mnist", "train", root)
    a = data.BatchSampler(x, 3, seed=7)
    first = [a.next() for _ in range(4)]  # crosses an epoch boundary (10 // 3 = 3 batches per epoch)
    state = a.state_dict()
    rest = [a.next() for _ in range(5)]
    b = data.BatchSampler(x, 3, seed=123)
    b.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(rest, [b.next() for _ in range(5)]))
    c = data.BatchSampler(x, 3, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(first, [c.next() for _ in range(4)]))
    # each epoch visits distinct images
    d = data.BatchSampler(x, 5, seed=0)
    ep = torch.cat([d.next(), d.next()])
    assert len({round(float(r.sum()), 3) for r in ep}) == 10


@pytest.mark.skipif(not (SHARED / "mnist" / "t10k-images-idx3-ubyte.gz").is_file(), reason="no local MNIST")
def test_real_mnist_test_split():
    x = data.load_dataset_uint8("mnist", "test", SHARED)
    assert x.shape == (10000, 1, 32, 32)
    assert 24 < float(x.float().mean()) < 27  # MNIST mean pixel 33.3 at 28x28 -> 25.5 padded
