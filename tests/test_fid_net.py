"""The feature pipeline: weight lookup, both TorchScript formats, in-memory scoring, reference caching,
and (when the weights are present) the real network's batch-size independence."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsamp.metrics import fid
from diffsamp.data import to_float
from diffsamp.metrics import inception
from diffsamp.metrics.inception import FeatureExtractor, WeightsNotFoundError, find_weights, load_extractor
from tests.conftest import TinyNVlabs, TinyPool3, tiny_extractor, write_idx

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights" / "inception-2015-12-05-pool3.torchscript.pt"
REAL_WEIGHTS = Path(os.environ.get("DIFFSAMP_INCEPTION") or SHARED_WEIGHTS)
needs_weights = pytest.mark.skipif(
    not REAL_WEIGHTS.is_file(),
    reason=f"FID Inception weights not found at {REAL_WEIGHTS}: set DIFFSAMP_INCEPTION to "
    "inception-2015-12-05-pool3.torchscript.pt (or NVlabs' inception-2015-12-05.pt)",
)


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture
def no_weights_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFSAMP_INCEPTION", raising=False)
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _digits(n: int, seed: int = 0) -> torch.Tensor:
    """MNIST-like uint8 (n, 1, 32, 32): bright blobs on a black background with a 2-pixel border."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    x[:, :, 2:30, 2:30] = (torch.rand(n, 1, 28, 28, generator=g) ** 3 * 255).to(torch.uint8)
    return x


# ---------------------------------------------------------------------------------------------- weights lookup


def test_missing_weights_error_says_how_to_provide_them(no_weights_env):
    with pytest.raises(WeightsNotFoundError) as info:
        find_weights()
    msg = str(info.value)
    assert "--inception" in msg and "DIFFSAMP_INCEPTION" in msg and "diffsamp fid download" in msg
    assert str(no_weights_env) in msg


def test_weights_lookup_order(no_weights_env, tmp_path, monkeypatch):
    cached = no_weights_env / "inception-2015-12-05.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_weights() == cached
    env_file = tmp_path / "env.pt"
    env_file.write_bytes(b"x")
    monkeypatch.setenv("DIFFSAMP_INCEPTION", str(env_file))
    assert find_weights() == env_file
    assert find_weights(cached) == cached  # an explicit path wins
    monkeypatch.setenv("DIFFSAMP_INCEPTION", str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsNotFoundError, match=r"\$DIFFSAMP_INCEPTION points at"):
        find_weights()


def test_download_writes_cache_only_when_asked(no_weights_env, tmp_path):
    src = tmp_path / "served.pt"
    torch.jit.script(TinyNVlabs(TinyPool3())).save(str(src))
    with pytest.raises(WeightsNotFoundError):
        load_extractor(device="cpu")  # nothing is fetched unless asked
    path = inception.download_weights(src.as_uri())
    assert path == no_weights_env / "inception-2015-12-05.pt" and path.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in no_weights_env.iterdir()) == ["inception-2015-12-05.pt"]
    (tmp_path / "garbage.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="not a TorchScript"):
        inception.download_weights((tmp_path / "garbage.pt").as_uri(), tmp_path / "dl" / "w.pt")
    assert list((tmp_path / "dl").iterdir()) == []  # nothing half-written


# ---------------------------------------------------------------------------------------------- the two formats


def test_pool3_and_nvlabs_formats_give_the_same_features(tmp_path):
    core = TinyPool3().eval()
    torch.jit.script(core).save(str(tmp_path / "pool3.pt"))
    torch.jit.script(TinyNVlabs(core)).save(str(tmp_path / "nvlabs.pt"))
    a = load_extractor(tmp_path / "pool3.pt", "cpu")
    b = load_extractor(tmp_path / "nvlabs.pt", "cpu")
    assert (a.kind, b.kind) == ("pool3", "nvlabs")
    a.dims = b.dims = 8
    x = _digits(3)
    fa, fb = a(x), b(x)
    assert fa.shape == (3, 8) and torch.allclose(fa, fb, atol=1e-5)
    assert load_extractor(tmp_path / "pool3.pt", "cpu") is a  # loaded once


def test_network_input_is_tf1_resized_scaled_and_three_channel():
    ext = tiny_extractor()
    x = _digits(2)
    inp = ext.network_input(x)
    assert inp.shape == (2, 3, 299, 299) and torch.equal(inp[:, 0], inp[:, 2])
    assert inp.min() >= -1 and inp.max() < 1 and inp[0, 0, 0, 0] == -1.0  # background 0 → (0 − 128)/128
    with pytest.raises(TypeError, match="uint8"):
        ext.network_input(x.float())


# ---------------------------------------------------------------------------------------------- library API


def test_compute_stats_streams_batches_and_quantizes_floats():
    ext = tiny_extractor()
    x = _digits(12, seed=1)
    whole = fid.compute_stats(x, extractor=ext, batch_size=5, keep_features=True, progress=False)
    chunks = fid.compute_stats((to_float(x[i : i + 4]) for i in range(0, 12, 4)), extractor=ext, batch_size=3,
                               keep_features=True, padding=2, progress=False)  # float [-1, 1], an iterable
    np.testing.assert_allclose(whole.features, chunks.features, atol=1e-6)
    np.testing.assert_allclose(whole.mu, whole.features.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(chunks.sigma, np.cov(chunks.features.astype(np.float64), rowvar=False), atol=1e-9)
    assert chunks.meta["size"] == [32, 32] and chunks.meta["padding"] == 2 and chunks.meta["num_images"] == 12
    assert chunks.meta["extractor"] == "tiny-test-net" and chunks.meta["resize"] == "tf1-bilinear-299"
    assert fid.fid_from_stats(whole, chunks) == pytest.approx(0.0, abs=1e-6)


def test_compute_fid_against_reference_stats(tmp_path):
    ext = tiny_extractor()
    ref = fid.compute_stats(_digits(20, seed=2), extractor=ext, padding=2, progress=False)
    fid.save_stats(ref, tmp_path / "ref.npz")
    same = fid.compute_fid(_digits(20, seed=2), tmp_path / "ref.npz", extractor=ext, padding=2, progress=False)
    other = fid.compute_fid(_digits(20, seed=3) // 2, ref, extractor=ext, progress=False)
    assert same == pytest.approx(0.0, abs=1e-6) and other > 1e-3
    with pytest.raises(fid.IncompatibleStatsError, match="size: 28×28 vs 32×32"):
        fid.compute_fid(_digits(20)[:, :, 2:30, 2:30], ref, extractor=ext, progress=False)


def test_compute_stats_errors():
    ext = tiny_extractor()
    with pytest.raises(ValueError, match="at least 2 images"):
        fid.compute_stats(_digits(1), extractor=ext, progress=False)
    with pytest.raises(ValueError, match="size changed"):
        fid.compute_stats([_digits(2), _digits(2)[:, :, :30, :30]], extractor=ext, progress=False)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fid.compute_stats(torch.zeros(3, 32, 32, dtype=torch.uint8), extractor=ext, progress=False)
    with pytest.raises(TypeError, match="uint8 images or float"):
        fid.compute_stats(torch.zeros(3, 1, 8, 8, dtype=torch.int64), extractor=ext, progress=False)


def test_reference_stats_pad_cache_and_superset(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (9, 28, 28)))
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    ext = tiny_extractor()
    calls = []
    real_call = FeatureExtractor.__call__
    monkeypatch.setattr(FeatureExtractor, "__call__", lambda self, x: calls.append(len(x)) or real_call(self, x))
    kw = dict(data_dir=tmp_path / "data", extractor=ext, progress=False)
    six = fid.reference_stats("mnist", "test", num=6, **kw)
    assert six.meta["size"] == [32, 32] and six.meta["padding"] == 2 and six.meta["source"] == "mnist:test[:6]"
    assert sum(calls) == 6 and six.features.shape == (6, 8)
    again = fid.reference_stats("mnist", "test", num=6, **kw)
    four = fid.reference_stats("mnist", "test", num=4, **kw)  # served from the cached first 6
    assert sum(calls) == 6
    np.testing.assert_array_equal(again.sigma, six.sigma)
    fresh = fid.reference_stats("mnist", "test", num=4, cache=False, **kw)
    np.testing.assert_allclose(four.sigma, fresh.sigma, atol=1e-9)
    assert four.meta == fresh.meta
    unpadded = fid.reference_stats("mnist", "test", num=4, pad_to=None, **kw)
    assert unpadded.meta["size"] == [28, 28] and unpadded.meta["padding"] == 0
    with pytest.raises(fid.IncompatibleStatsError):
        fid.fid_from_stats(four, unpadded)


# ---------------------------------------------------------------------------------------------- the real network


@needs_weights
def test_real_features_do_not_depend_on_batch_size_or_channel_repetition():
    ext = load_extractor(REAL_WEIGHTS, "cpu")
    x = _digits(2, seed=4)
    batched = ext(x)  # grayscale, both images in one batch
    one_by_one_rgb = torch.cat([ext(x[i : i + 1].expand(-1, 3, -1, -1)) for i in range(2)])
    assert batched.shape == (2, 2048) and torch.isfinite(batched).all() and batched.std() > 0
    torch.testing.assert_close(one_by_one_rgb, batched, atol=1e-4, rtol=1e-4)
