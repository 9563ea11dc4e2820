"""FID/KID building blocks without the network: Fréchet distance, KID, TF1 resize, streaming moments,
stats files and image folders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsamp import images as dimages
from diffsamp.metrics.fid import IncompatibleStatsError, fid_from_stats, kid_from_stats
from diffsamp.metrics import distances
from diffsamp.metrics.distances import frechet_distance, kernel_inception_distance
from diffsamp.metrics.resize import resize_tf1_bilinear, tf1_bilinear_matrix
from diffsamp.metrics.stats import FIDStats, StreamingMoments, load_stats, make_meta, save_stats
from tests.conftest import tiny_extractor, write_idx


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------------- Fréchet


def test_frechet_closed_form_commuting_diagonal():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_closed_form_general_covariances():
    # W2² between Gaussians: ‖μ1−μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½), evaluated through eigh only.
    rng = np.random.default_rng(1)
    d = 12
    s1, s2 = _spd(rng, d), _spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_matches_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(2)
    for d in (8, 64):
        f1, f2 = rng.standard_normal((3 * d, d)), rng.standard_normal((3 * d, d)) * 1.3 + 0.2
        mu1, s1, mu2, s2 = f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # its sqrtm(disp=False) call
            ref = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
        assert abs(frechet_distance(mu1, s1, mu2, s2) - ref) < 1e-6


def test_frechet_singular_product_retries_with_offset(monkeypatch):
    real = distances.scipy.linalg.sqrtm
    calls = []

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real(a)

    monkeypatch.setattr(distances.scipy.linalg, "sqrtm", flaky)
    s = np.diag([1.0, 2.0])
    with pytest.warns(RuntimeWarning, match="singular"):
        value = frechet_distance(np.zeros(2), s, np.zeros(2), s, eps=1e-6)
    assert len(calls) == 2 and np.allclose(calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2)))
    assert value == pytest.approx(0.0, abs=1e-5)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="imaginary"):  # not a covariance: sqrtm(diag(-1, 1)) = diag(i, 1)
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------------------------------------- KID


def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2 * sxy / (m * m)


def test_kid_equals_naive_unbiased_mmd():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((20, 5)), rng.standard_normal((20, 5)) + 0.5
    # one subset holding every row: the estimate does not depend on the order, so it is exact
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=20)
    assert mean == pytest.approx(_naive_mmd2(x, y), rel=1e-10) and std == 0.0


def test_kid_subsets_seeded_and_paths_agree():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((60, 6)), rng.standard_normal((50, 6)) * 1.2
    a = kernel_inception_distance(x, y, num_subsets=7, subset_size=30, seed=5)
    b = kernel_inception_distance(x, y, num_subsets=7, subset_size=30, seed=5, max_gram_rows=0)  # per-subset path
    c = kernel_inception_distance(x, y, num_subsets=7, subset_size=30, seed=6)
    assert np.allclose(a, b, rtol=1e-10) and a != c and a[1] > 0


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    same, std = kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(x, y + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * std + 1e-3 and shifted > 10 * abs(same)


def test_kid_errors():
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="dimensions differ"):
        kernel_inception_distance(np.zeros((4, 3)), np.zeros((4, 2)))


# ---------------------------------------------------------------------------------------------- TF1 resize


def _naive_tf1_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """tf.compat.v1.image.resize_bilinear(align_corners=False) of one (H, W) channel, pixel by pixel."""
    h, w = img.shape
    img = img.astype(np.float32)
    sy, sx = np.float32(h) / np.float32(out_h), np.float32(w) / np.float32(out_w)
    out = np.empty((out_h, out_w), np.float32)
    for i in range(out_h):
        fy = np.float32(i) * sy
        y0 = int(np.floor(fy))
        y1, dy = min(y0 + 1, h - 1), fy - y0
        for j in range(out_w):
            fx = np.float32(j) * sx
            x0 = int(np.floor(fx))
            x1, dx = min(x0 + 1, w - 1), fx - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


@pytest.mark.parametrize("size_in,size_out", [((5, 7), (11, 13)), ((13, 9), (4, 6)), ((6, 6), (6, 6)), ((1, 3), (2, 5))])
def test_tf1_resize_matches_naive_loop(size_in, size_out):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, *size_in), dtype=torch.uint8, generator=g)
    y = resize_tf1_bilinear(x, size_out)
    assert y.shape == (2, 3, *size_out) and y.dtype == torch.float32
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(y[n, c].numpy(), _naive_tf1_resize(x[n, c].numpy(), *size_out), atol=1e-3)


def test_tf1_resize_to_299_matches_naive_loop_and_differs_from_half_pixel():
    x = torch.randint(0, 256, (1, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = resize_tf1_bilinear(x, 299)[0, 0].numpy()
    np.testing.assert_allclose(y, _naive_tf1_resize(x[0, 0].numpy(), 299, 299), atol=1e-3)
    half_pixel = torch.nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
    assert np.abs(half_pixel[0, 0].numpy() - y).max() > 10  # the resize that would break comparability


def test_tf1_resize_equals_shifted_grid_sample():
    # Another formulation of the same resize (align_corners=False sampling grid shifted by half an input
    # pixel minus half an output pixel, border padding): sampling at o·in/out exactly.
    x = torch.rand(2, 3, 32, 20, generator=torch.Generator().manual_seed(2)) * 255
    h, w = x.shape[-2:]
    theta = torch.tensor([[1.0, 0.0, 1 / w - 1 / 299], [0.0, 1.0, 1 / h - 1 / 299]]).expand(2, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, [2, 3, 299, 299], align_corners=False)
    ref = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(resize_tf1_bilinear(x, 299), ref, atol=2e-3, rtol=0)


def test_tf1_matrix_rows_sum_to_one():
    m = tf1_bilinear_matrix(28, 299, dtype=torch.float64)
    assert m.shape == (299, 28) and torch.allclose(m.sum(1), torch.ones(299, dtype=torch.float64))
    assert m[0, 0] == 1 and m[-1, -1] > 0  # src = 0 at the first pixel; the last one clamps to the edge


# ---------------------------------------------------------------------------------------------- moments, files


def test_streaming_moments_equal_numpy():
    rng = np.random.default_rng(6)
    feats = rng.standard_normal((103, 7)) * 3 + 1e3  # a large common offset: the shifted sums keep precision
    m = StreamingMoments()
    for a, b in ((0, 1), (1, 40), (40, 40), (40, 103)):  # uneven batches, one of size 1, one empty
        m.update(torch.from_numpy(feats[a:b]).float() if a == 40 else feats[a:b])
    ref = np.concatenate([feats[:40], feats[40:].astype(np.float32).astype(np.float64)])
    assert m.n == 103
    np.testing.assert_allclose(m.mean, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.cov, np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-9)


def test_streaming_moments_need_two_rows_and_one_dimension():
    m = StreamingMoments()
    m.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        m.cov
    with pytest.raises(ValueError, match="dimension changed"):
        m.update(np.ones((2, 4)))


def _stats(n: int = 10, d: int = 4, size=(32, 32), padding=2, seed=0, features=True) -> FIDStats:
    f = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    meta = make_meta(extractor="x", resize="tf1-bilinear-299", num_images=n, size=size, channels=1, padding=padding)
    return FIDStats(f.mean(0).astype(np.float64), np.cov(f, rowvar=False), meta, f if features else None)


def test_stats_roundtrip_and_pytorch_fid_layout(tmp_path):
    s = _stats()
    path = save_stats(s, tmp_path / "s.npz")
    back = load_stats(path)
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    np.testing.assert_array_equal(back.features, s.features)
    assert back.meta == s.meta and back.num_images == 10
    with np.load(path) as f:  # what pytorch-fid reads: f['mu'][:], f['sigma'][:], no pickles
        assert f["mu"].shape == (4,) and f["sigma"].shape == (4, 4)
        assert json.loads(str(f["meta"]))["format"].startswith("diffsamp-fid-stats")
    np.savez(tmp_path / "ptfid.npz", mu=s.mu, sigma=s.sigma)  # a pytorch-fid file
    plain = load_stats(tmp_path / "ptfid.npz")
    assert plain.meta == {} and plain.features is None and fid_from_stats(plain, back) == pytest.approx(0.0, abs=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ptfid.npz", "s.npz"]  # no temporary files left


def test_stats_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "s.npz"
    save_stats(_stats(seed=1), target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        save_stats(_stats(seed=2), target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["s.npz"]


def test_load_stats_errors(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_stats(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="need 'mu' and 'sigma'"):
        load_stats(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "missing.npz")


def test_mismatched_preprocessing_is_refused():
    a, b = _stats(size=(32, 32), padding=2), _stats(size=(28, 28), padding=0, seed=1)
    with pytest.raises(IncompatibleStatsError, match="size: 32×32 vs 28×28"):
        fid_from_stats(a, b)
    assert fid_from_stats(a, b, check=False) > 0
    unknown_padding = _stats(padding=None, seed=2)  # e.g. a folder of samples: padding not recorded
    assert fid_from_stats(a, unknown_padding) > 0
    with pytest.raises(IncompatibleStatsError, match="padding"):
        fid_from_stats(a, _stats(padding=0, seed=3))


def test_kid_from_stats_needs_features():
    a, b = _stats(n=30), _stats(n=30, seed=1, features=False)
    with pytest.raises(ValueError, match="features of both"):
        kid_from_stats(a, b)
    mean, std = kid_from_stats(a, _stats(n=30, seed=1), num_subsets=5, subset_size=10)
    assert np.isfinite(mean) and std >= 0


# ---------------------------------------------------------------------------------------------- image folders


def _write(folder: Path, name: str, arr: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / name)


def test_image_folder_roundtrip_sorted_and_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (11, 3, 8, 6), dtype=torch.uint8, generator=g)
    dimages.save_image_folder(x, tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    back = dimages.load_image_folder(tmp_path / "imgs")
    assert back.dtype == torch.uint8 and torch.equal(back, x)
    assert torch.equal(dimages.load_image_folder(tmp_path / "imgs", limit=3), x[:3])
    _write(tmp_path / "nat", "img10.png", np.full((2, 2), 10, np.uint8))
    _write(tmp_path / "nat", "img2.png", np.full((2, 2), 2, np.uint8))
    assert dimages.load_image_folder(tmp_path / "nat")[:, 0, 0, 0].tolist() == [2, 10]
    grid = dimages.image_grid(x[:5], nrow=2, padding=1)
    assert grid.shape == (3, 3 * 9 + 1, 2 * 7 + 1) and torch.equal(grid[:, 1:9, 8:14], x[1])
    with pytest.warns(DeprecationWarning, match="image_grid"):
        assert dimages.make_grid is dimages.image_grid  # the old name, for old scripts
    dimages.save_grid(dimages.to_float(x[:4]), tmp_path / "grid.png", nrow=2)  # float [-1, 1] is quantized back
    written = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png"))).permute(2, 0, 1)
    assert torch.equal(written[:, 2:10, 2:8], x[0])


def test_image_folder_gray_and_colour_mix_reads_as_colour(tmp_path):
    _write(tmp_path, "a.png", np.full((4, 4), 7, np.uint8))
    _write(tmp_path, "b.png", np.full((4, 4, 3), 9, np.uint8))
    x = dimages.load_image_folder(tmp_path)
    assert x.shape == (2, 3, 4, 4) and x[0].eq(7).all() and x[1].eq(9).all()
    _write(tmp_path / "gray", "a.png", np.full((4, 4), 7, np.uint8))
    assert dimages.load_image_folder(tmp_path / "gray").shape == (1, 1, 4, 4)


def test_bad_image_folders_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(dimages.ImageFolderError, match="empty"):
        dimages.load_image_folder(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    with pytest.raises(dimages.ImageFolderError, match="no images"):
        dimages.load_image_folder(tmp_path / "text")
    _write(tmp_path / "corrupt", "a.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "corrupt" / "b.png").write_bytes(b"definitely not a png")
    with pytest.raises(dimages.ImageFolderError, match="b.png: not a readable image"):
        dimages.load_image_folder(tmp_path / "corrupt")
    _write(tmp_path / "mixed", "a.png", np.zeros((4, 4), np.uint8))
    _write(tmp_path / "mixed", "b.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(dimages.ImageFolderError, match="different sizes.*4×4.*5×4"):
        dimages.load_image_folder(tmp_path / "mixed")
    with pytest.raises(dimages.ImageFolderError, match="no such folder"):
        dimages.load_image_folder(tmp_path / "missing")


def test_to_uint8_quantizes_like_png():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7, -3.0])
    assert dimages.to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255, 0]


def test_a_corrupted_cached_reference_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    from diffsamp.metrics.fid import reference_stats

    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 256, (5, 28, 28)))
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    ext = tiny_extractor()
    first = reference_stats("mnist", "test", data_dir=tmp_path, extractor=ext, progress=False)
    (cached,) = (tmp_path / "cache" / "fid-stats").iterdir()
    cached.write_bytes(cached.read_bytes()[:100])  # a truncated file, as a full disk or a crash leaves it
    with pytest.warns(UserWarning, match="unreadable.*computing them again"):
        again = reference_stats("mnist", "test", data_dir=tmp_path, extractor=ext, progress=False)
    np.testing.assert_allclose(again.mu, first.mu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference_stats("mnist", "test", data_dir=tmp_path, extractor=ext, progress=False)  # the cache works again


def test_fid_below_the_feature_dimension_warns_in_our_words():
    from scipy.linalg import LinAlgWarning

    from diffsamp.metrics.fid import compute_stats, fid_from_stats

    ext = tiny_extractor(dims=16)
    g = torch.Generator().manual_seed(0)
    a = compute_stats(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=g), extractor=ext, progress=False)
    b = compute_stats(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=g), extractor=ext, progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fid = fid_from_stats(a, b)
    texts = [str(w.message) for w in seen]
    assert any("FID from 5 images with 16-dimensional features" in t and "biased" in t for t in texts), texts
    assert not any(issubclass(w.category, LinAlgWarning) for w in seen) and np.isfinite(fid)
