"""Atomic writes (``diffsamp.io``): complete or absent, and with the file mode a plain ``open`` gives."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from diffsamp import io
from diffsamp.images import save_png
from diffsamp.metrics.stats import FIDStats, save_stats


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask022):
    """Regression: mkstemp's 0600 leaked into every atomically written file (cards, stats, PNGs, weights)."""
    paths = [
        io.write_text(tmp_path / "a.txt", "x"),
        io.write_json(tmp_path / "a.json", {"a": 1}),
        io.save_safetensors({"t": torch.zeros(2)}, tmp_path / "a.safetensors"),
        io.save_npz(tmp_path / "a.npz", x=np.zeros(2)),
        save_png(torch.zeros(1, 4, 4, dtype=torch.uint8), tmp_path / "a.png"),
        save_stats(FIDStats(np.zeros(2), np.eye(2), {}), tmp_path / "s.npz"),
    ]
    assert {p.name: _mode(p) for p in paths} == {p.name: 0o644 for p in paths}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = io.write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_state_file_round_trip(tmp_path):
    io.save_state_file(tmp_path / "c.safetensors", {"w": torch.arange(3.0)}, {"step": 7})
    tensors, state = io.read_state_file(tmp_path / "c.safetensors")
    assert torch.equal(tensors["w"], torch.arange(3.0)) and state == {"step": 7}
    io.save_safetensors({"w": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a diffsamp training checkpoint"):
        io.read_state_file(tmp_path / "plain.safetensors")
