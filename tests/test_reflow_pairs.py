"""Reflow pairs on disk: resumable shards, crash safety, corruption and mismatch errors, and the CLI recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from diffsamp.models.networks import MLPVelocity
from diffsamp.models.rectified_flow import RFDenoiser, save_rf
from diffsamp.training import pairs as pairs_mod
from diffsamp.training.pairs import PairsError, generate_pairs, load_pairs, shard_name

pytestmark = pytest.mark.usefixtures("one_thread")


def _flow(seed: int = 0) -> RFDenoiser:
    torch.manual_seed(seed)
    return RFDenoiser(MLPVelocity(2, 16, 1).eval(), time_scale=1.0, info={"dataset": "toy:moons"})


def _make(out, model=None, **kw):
    args = dict(num=10, shape=(2,), sampler="euler", schedule="rf", steps=4, shard_size=4, batch_size=3,
                model_name="toy", rectification=1, dataset="toy:moons", progress=False)
    args.update(kw)
    return generate_pairs(model or _flow(), out, **args)


def test_pairs_are_written_in_shards_and_resume_without_redoing_them(tmp_path, monkeypatch):
    meta = _make(tmp_path)
    assert meta["complete"] and meta["done"] == 10 and meta["nfe"] == 4 and meta["dataset"] == "toy:moons"
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [shard_name(i) for i in range(3)]
    first = load_pairs(tmp_path)
    assert first.noise.shape == (10, 2) and len(first) == 10

    (tmp_path / shard_name(1)).unlink()
    written = []
    real = pairs_mod.write_shard
    monkeypatch.setattr(pairs_mod, "write_shard", lambda path, *a: (written.append(path.name), real(path, *a)))
    again = _make(tmp_path)
    assert written == [shard_name(1)] and again["complete"]
    second = load_pairs(tmp_path)  # pair i depends on seed + i only: the redone shard is identical
    assert torch.equal(first.noise, second.noise) and torch.equal(first.sample, second.sample)


def test_resuming_with_other_settings_is_refused(tmp_path):
    _make(tmp_path)
    with pytest.raises(PairsError, match="steps: 4 on disk vs 8 now"):
        _make(tmp_path, steps=8)


def test_a_corrupt_or_truncated_shard_is_detected_and_regenerated(tmp_path, capsys):
    _make(tmp_path)
    path = tmp_path / shard_name(0)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit inside the tensor bytes
    path.write_bytes(bytes(data))
    with pytest.raises(PairsError, match="checksum"):
        load_pairs(tmp_path)
    path.write_bytes(bytes(data[:50]))  # truncated
    with pytest.raises(PairsError, match="corrupt or truncated"):
        load_pairs(tmp_path)
    assert _make(tmp_path)["complete"]
    assert "regenerating it" in capsys.readouterr().err
    assert len(load_pairs(tmp_path)) == 10


def test_a_crash_while_writing_leaves_no_shard_under_its_name(tmp_path, monkeypatch):
    def crash(src, dst):
        raise OSError("disk full")

    _make(tmp_path)
    (tmp_path / shard_name(1)).unlink()
    monkeypatch.setattr(pairs_mod.os, "replace", crash)  # the rename of a fully written temporary file fails
    with pytest.raises(OSError, match="disk full"):
        _make(tmp_path)
    assert not (tmp_path / shard_name(1)).exists()
    with pytest.raises(PairsError, match="incomplete: 1 of 3 shards missing"):
        load_pairs(tmp_path)


def test_a_model_that_returns_nan_stops_before_writing_its_shard(tmp_path):
    class NaNAfter(torch.nn.Module):
        calls = 0

        def forward(self, x, t):
            NaNAfter.calls += 1
            return torch.full_like(x, float("nan")) if NaNAfter.calls > 6 else torch.zeros_like(x)

    model = RFDenoiser(NaNAfter(), time_scale=1.0)
    with pytest.raises(ValueError, match="NaN/inf at evaluation"):
        _make(tmp_path, model=model, batch_size=4)
    assert [p.name for p in tmp_path.glob("shard-*")] == [shard_name(0)]
    with pytest.raises(PairsError, match="incomplete: 2 of 3 shards missing"):
        load_pairs(tmp_path)
    assert len(load_pairs(tmp_path, allow_partial=True)) == 4


def test_shard_of_another_shape_is_refused(tmp_path):
    _make(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["shape"] = [3]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(PairsError, match=r"shape \(2,\), expected \(3,\)"):
        load_pairs(tmp_path)


def test_init_of_another_shape_than_the_pairs_is_a_clear_error(tmp_path):
    from diffsamp.training.loop import TrainConfig
    from diffsamp.training.rectified_flow import RFTrainOptions, train_reflow
    from tests.conftest import tiny_unet

    _make(tmp_path / "pairs")
    save_rf(RFDenoiser(tiny_unet(8), time_scale=999.0), tmp_path / "unet.safetensors")
    opts = RFTrainOptions(batch_size=4, init=str(tmp_path / "unet.safetensors"))
    with pytest.raises(ValueError, match=r"takes samples of shape \(1, 8, 8\) but the data/pairs have shape \(2,\)"):
        train_reflow(tmp_path / "run", tmp_path / "pairs", opts, TrainConfig(steps=2), progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffsamp.cli", *args], capture_output=True, text=True)


def test_cli_recipe_rf_pairs_reflow_distill_straightness(tmp_path):
    """The whole RF recipe through the command line on a 2-D toy: every step runs, and cards carry the lineage."""
    small = ["--mlp-hidden", "32", "--mlp-depth", "2", "--num-grid", "0", "--batch-size", "128", "--warmup-steps", "0",
             "--device", "cpu", "--no-progress"]
    rf1, pairs, rf2, one = (str(tmp_path / n) for n in ("rf1", "pairs", "rf2", "one"))
    steps = [
        ["train", "rf", "--dataset", "toy:moons", "--out", rf1, "--steps", "30", *small],
        ["reflow", "pairs", "--model", rf1, "--steps", "8", "--num", "300", "--shard-size", "100", "--out", pairs,
         "--device", "cpu", "--no-progress"],
        ["train", "reflow", "--pairs", pairs, "--init", rf1, "--out", rf2, "--steps", "20", *small],
        ["train", "distill", "--pairs", pairs, "--init", rf2, "--out", one, "--train-steps", "20", *small],
    ]
    for cmd in steps:
        r = _cli(*cmd)
        assert r.returncode == 0, (cmd, r.stderr)
    assert "300/300 pairs" in _cli(*steps[1]).stdout  # rerun: nothing left to do
    cards = {n: json.loads((tmp_path / n / "model.json").read_text())["card"] for n in ("rf1", "rf2", "one")}
    assert [cards[n]["rectification"] for n in ("rf1", "rf2", "one")] == [1, 2, 1]
    assert {cards[n]["dataset"] for n in cards} == {"toy:moons"}
    assert cards["one"]["distill_steps"] == 1 and cards["rf2"]["pairs"]["num"] == 300
    r = _cli("rf", "straightness", "--model", rf2, "--num", "50", "--steps", "10", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["num"] == 50 and res["S"] >= 0 and res["S_err"] >= 0


def test_cli_bad_pairs_give_one_line_errors(tmp_path):
    r = _cli("train", "reflow", "--pairs", str(tmp_path / "nope"), "--out", str(tmp_path / "run"), "--device", "cpu")
    assert r.returncode != 0 and "not a pairs directory" in r.stderr and "Traceback" not in r.stderr
    _make(tmp_path / "pairs")
    (tmp_path / "pairs" / shard_name(2)).write_bytes(b"garbage")
    r = _cli("train", "reflow", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "run"), "--device", "cpu")
    assert r.returncode != 0 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_rk45_pairs_on_the_rf_schedule_reach_the_end_point_generate_reaches(tmp_path):
    """Regression: pairs integrated on the full 100-step grid stopped at its second-to-last σ (≈ 0.0101)."""
    import diffsamp

    model = _flow(3)
    meta = _make(tmp_path, model=model, num=6, sampler="rk45", schedule="rf", steps=100, shard_size=6, batch_size=6)
    pairs = load_pairs(tmp_path)
    ref = diffsamp.generate(model, (2,), sampler="rk45", schedule="rf", seeds=range(6))
    assert torch.equal(pairs.sample, ref.images) and meta["nfe"] == ref.nfe
