"""Every notebook in notebooks/ runs top to bottom in quick mode (DIFFSAMP_QUICK=1) on a real Jupyter kernel,
and is committed without outputs (``python notebooks/strip_outputs.py`` strips them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NEEDS_MNIST = {"ddpm_vae.ipynb"}


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"samplers_2d.ipynb", "ddpm_vae.ipynb", "rectified_flow.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, monkeypatch):
    if path.name in NEEDS_MNIST:
        from diffsamp.data import DataNotFoundError, find_idx_file

        root = os.environ.get("DIFFSAMP_DATA", str(ROOT.parent / "shared" / "data"))
        try:
            find_idx_file("mnist", "test", "images", root)
        except (FileNotFoundError, DataNotFoundError):
            pytest.skip("no local MNIST (set DIFFSAMP_DATA)")
        monkeypatch.setenv("DIFFSAMP_DATA", root)
    monkeypatch.setenv("DIFFSAMP_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, so figures are outputs
    # the kernel imports this checkout, whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    images = sum(1 for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {}))
    assert images >= 2, f"{path.name} drew {images} pictures"


def test_notebooks_are_committed_without_outputs():
    res = subprocess.run([sys.executable, str(ROOT / "notebooks" / "strip_outputs.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
