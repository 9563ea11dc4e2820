"""In-memory scoring of a model's samples (``diffsamp.metrics.scoring``, ``diffsamp sample --fid-ref``) agrees with
the PNG round trip (sample → folder → ``folder_stats``), whatever the batch size; bad references fail clearly."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import diffsamp.metrics.fid
from diffsamp import generate
from diffsamp.cli import main
from diffsamp.metrics.scoring import data_floor, resolve_reference, score_images, score_model
from diffsamp.metrics.fid import compute_stats, fid_from_stats, folder_stats, kid_from_stats, reference_stats, save_stats
from diffsamp.images import save_png
from diffsamp.models import load
from tests.conftest import tiny_extractor, write_idx


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ext():
    return tiny_extractor()


@pytest.fixture(scope="module")
def ref(ext):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    return compute_stats(images, extractor=ext, keep_features=True, padding=0, progress=False)


def test_in_memory_score_equals_png_round_trip(tiny_model_dir, ext, ref, tmp_path):
    model = load(tiny_model_dir)
    seeds = list(range(3, 27))
    q = score_model(model, ref, seeds=seeds, sampler="euler", steps=3, batch_size=7, extractor=ext, progress=False)
    assert q.num == 24 and q.nfe == 3 and q.kid is not None

    res = generate(model, (1, 8, 8), sampler="euler", steps=3, seeds=seeds)
    for s, img in zip(seeds, res.images.clamp(-1, 1)):
        save_png(img, tmp_path / f"{s:04d}.png")
    from_pngs = folder_stats(tmp_path, extractor=ext, keep_features=True, padding=0, progress=False)
    assert q.fid == pytest.approx(fid_from_stats(from_pngs, ref), rel=1e-9, abs=1e-9)
    kid, kid_std = kid_from_stats(from_pngs, ref, subset_size=24)
    assert (q.kid, q.kid_std) == pytest.approx((kid, kid_std), rel=1e-6, abs=1e-9)

    # the batch size of sampling/streaming changes nothing
    q_one_batch = score_model(model, ref, seeds=seeds, sampler="euler", steps=3, batch_size=100, extractor=ext,
                              progress=False)
    assert q_one_batch.fid == pytest.approx(q.fid, rel=1e-9, abs=1e-9)
    # and different samples do score differently (the test can fail)
    q_other = score_model(model, ref, seeds=range(100, 124), sampler="euler", steps=3, extractor=ext, progress=False)
    assert q_other.fid != pytest.approx(q.fid, rel=1e-6)


def test_score_images_of_the_reference_itself_is_near_zero(ext, ref):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    fid, kid, _ = score_images(images, ref, extractor=ext, progress=False)
    assert abs(fid) < 1e-7 and kid is not None
    noisy = (images.float() / 127.5 - 1 + 0.5 * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    assert score_images(noisy, ref, extractor=ext, progress=False)[0] > 1e-4


def test_kid_is_none_without_reference_features(ext, ref):
    bare = type(ref)(ref.mu, ref.sigma, dict(ref.meta), None)
    g = torch.Generator().manual_seed(1)
    fid, kid, kid_std = score_images(torch.rand(10, 1, 8, 8, generator=g) * 2 - 1, bare, extractor=ext, progress=False)
    assert np.isfinite(fid) and kid is None and kid_std is None


@pytest.mark.parametrize("bad, words", [("mnist", "DATASET:SPLIT"), ("mnist:val", "DATASET:SPLIT"),
                                        ("nowhere/ref.npz", "does not exist")])
def test_bad_references_fail_clearly(ext, bad, words):
    with pytest.raises(ValueError, match=words):
        resolve_reference(bad, num=10, image_size=32, extractor=ext)


def test_sample_cli_fid_ref_with_and_without_images(tiny_model_dir, ext, ref, tmp_path, monkeypatch):
    monkeypatch.setattr(diffsamp.metrics.fid, "load_extractor", lambda *a, **k: ext)
    save_stats(ref, tmp_path / "ref.npz")
    args = ["sample", "--model", str(tiny_model_dir), "--sampler", "euler", "--steps", "3", "--seeds", "0-11",
            "--fid-ref", str(tmp_path / "ref.npz")]
    streamed = CliRunner().invoke(main, args)
    assert streamed.exit_code == 0, streamed.output
    assert "FID " in streamed.output and "KID " in streamed.output and "12 samples" in streamed.output
    with_grid = CliRunner().invoke(main, args + ["--out", str(tmp_path / "g.png")])
    assert with_grid.exit_code == 0, with_grid.output
    assert (tmp_path / "g.png").is_file()
    def fid_lines(text: str) -> list[str]:
        return re.findall(r"FID \d[^\n\r]*", text)

    assert len(fid_lines(streamed.output)) == 1
    assert fid_lines(streamed.output) == fid_lines(with_grid.output)

    missing = CliRunner().invoke(main, args[:-1] + [str(tmp_path / "nope.npz")])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    nothing = CliRunner().invoke(main, args[:-2])
    assert nothing.exit_code != 0 and "--fid-ref" in nothing.output


def test_data_floor_is_train_against_test(ext, tmp_path, monkeypatch):
    """The floor is FID/KID of train[:N] vs test[:N] (padded alike), and its reference is test[:N]: zero when
    the two splits hold the same images, the independent computation's value when they differ."""
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    test_imgs = rng.integers(0, 256, (30, 28, 28))
    write_idx(tmp_path / "same" / "mnist" / "t10k-images-idx3-ubyte.gz", test_imgs)
    write_idx(tmp_path / "same" / "mnist" / "train-images-idx3-ubyte.gz", test_imgs)
    same = data_floor("mnist", num=20, image_size=32, extractor=ext, data_dir=tmp_path / "same", progress=False)
    assert same.fid == pytest.approx(0.0, abs=1e-6) and same.test.meta["padding"] == 2
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache2"))  # the cache is keyed by data set name, not content
    write_idx(tmp_path / "diff" / "mnist" / "t10k-images-idx3-ubyte.gz", test_imgs)
    write_idx(tmp_path / "diff" / "mnist" / "train-images-idx3-ubyte.gz", rng.integers(0, 128, (30, 28, 28)))
    kw = dict(num=20, data_dir=tmp_path / "diff", extractor=ext, progress=False)
    floor = data_floor("mnist", image_size=32, **kw)
    train, test = (reference_stats("mnist", split, pad_to=32, cache=False, **kw) for split in ("train", "test"))
    assert floor.fid > 1e-3 and floor.fid == pytest.approx(fid_from_stats(train, test), rel=1e-9)
    assert (floor.kid, floor.kid_std) == pytest.approx(kid_from_stats(train, test, subset_size=20), rel=1e-9)
    np.testing.assert_allclose(floor.test.mu, test.mu, atol=1e-12)
