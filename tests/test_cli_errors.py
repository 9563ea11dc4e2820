"""What a new user hits: bad input is a one-line error naming the problem, before any expensive work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from diffsamp.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self").exists(),
                                reason="needs /proc (a folder nobody can create files in, even root)")


class _Loaded(Exception):
    pass


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the error must come before it."""
    import diffsamp.models
    import diffsamp.models.zoo

    def refuse(*args, **kwargs):
        raise _Loaded("the model was loaded before the error")

    monkeypatch.setattr(diffsamp.models, "load", refuse)
    monkeypatch.setattr(diffsamp.models.zoo, "load", refuse)


def run(args: list[str]):
    return CliRunner().invoke(main, args)


def error_line(res) -> str:
    """The one ``Error:`` line of a refused command (and no traceback)."""
    assert res.exit_code in (1, 2), (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.output
    return lines[0]


# -- item 2: the destination is checked before sampling -------------------------------------------------------

@linux_only
@pytest.mark.parametrize("opt, path", [("--out", "/proc/nope/grid.png"), ("--outdir", "/proc/nope/dir"),
                                       ("--out", "/proc/grid.png"), ("--outdir", "/proc/dir")])
def test_sample_unwritable_destination(no_model_load, opt, path):
    line = error_line(run(["sample", "--model", "mnist-ddpm", "--steps", "1", "--seeds", "0-1", "-q", opt, path]))
    assert opt in line and "/proc" in line and "cannot" in line


def test_sample_destination_through_a_file(no_model_load, tmp_path):
    (tmp_path / "f").write_text("x")
    line = error_line(run(["sample", "--model", "mnist-ddpm", "--outdir", str(tmp_path / "f" / "d")]))
    assert "is a file" in line


@linux_only
def test_other_commands_check_their_out_folder(no_model_load):
    line = error_line(run(["bench", "--model", "mnist-ddpm", "--samplers", "euler", "--nfe", "2", "--num", "2",
                           "--out", "/proc/nope/b"]))
    assert "/proc/nope/b" in line
    line = error_line(run(["fid", "ref", "--dataset", "mnist", "--split", "test", "--num", "2",
                           "--out", "/proc/nope/r.npz"]))
    assert "/proc/nope" in line
    line = error_line(run(["nll", "--model", "mnist-ddpm", "--num", "2", "--out", "/proc/nope/n"]))
    assert "/proc/nope/n" in line
    line = error_line(run(["train", "ddpm", "--dataset", "mnist", "--steps", "1", "--out", "/proc/nope/t"]))
    assert "/proc/nope/t" in line
    line = error_line(run(["train", "amed", "--model", "mnist-ddpm", "--nfe", "3", "--out", "/proc/nope/a"]))
    assert "/proc/nope/a" in line
