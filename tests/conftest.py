"""Shared fixtures and helpers: small analytic models, a tiny random diffusers UNet, tiny stand-ins for the FID
network and fake idx data (no downloads or weights), the umask, and the CLI helpers several test files use."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsamp.metrics.inception import FeatureExtractor
from diffsamp.models.analytic import GaussianDenoiser, GaussianMixtureDenoiser

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_test() -> torch.Tensor:
    """MNIST test[:64] in [-1, 1], padded to 32×32 (from $DIFFSAMP_DATA or ../shared/data); skips without it."""
    from diffsamp.data import DataNotFoundError, load_dataset

    root = os.environ.get("DIFFSAMP_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    try:
        return load_dataset("mnist", "test", root)[:64]
    except (FileNotFoundError, DataNotFoundError):
        pytest.skip("no local MNIST (set DIFFSAMP_DATA)")


@pytest.fixture
def gaussian() -> GaussianDenoiser:
    return GaussianDenoiser([0.5, -1.0, 2.0, 0.0], 0.7, sigma_min=0.02, sigma_max=20.0)


@pytest.fixture
def mixture2d() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(
        [[-1.5, 0.3], [1.0, 1.0], [0.5, -1.2]], [0.4, 0.6, 0.3], [0.3, 0.4, 0.3], sigma_min=0.02, sigma_max=20.0
    )


@pytest.fixture
def mixture64d() -> GaussianMixtureDenoiser:
    g = torch.Generator().manual_seed(3)
    return GaussianMixtureDenoiser(
        torch.randn(5, 64, generator=g, dtype=torch.float64), [0.5, 0.7, 0.6, 0.4, 0.8], sigma_min=0.02, sigma_max=20.0
    )


def tiny_unet(sample_size: int = 8, seed: int = 0):
    """A randomly initialised 1-channel UNet2DModel, ~40k parameters."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    ).eval()


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (the CLI and sampling tests are dominated by thread start-up)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random UNet (8×8, channels 8-16) saved in diffusers' pipeline layout, as `train ddpm` exports."""
    from diffsamp.models.diffusers_unet import save_diffusers
    from diffsamp.models.networks import make_unet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_diffusers(make_unet(channels=(8, 16), sample_size=8), path)
    return path


# ------------------------------------------------------------------------------ FID stand-ins and fake data
class TinyPool3(torch.nn.Module):
    """Same contract as the pool3 file: float (N, 3, 299, 299) scaled to [-1, 1) → (N, dims) features."""

    def __init__(self, dims: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, dims, kernel_size=23, stride=23)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x)).mean((2, 3)) + 0.1 * self.conv(x).std((2, 3))


class TinyNVlabs(torch.nn.Module):
    """Same contract as NVlabs' file: images in [0, 255]; ``return_features=True`` gives the features."""

    def __init__(self, core: TinyPool3) -> None:
        super().__init__()
        self.core = core

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        feats = self.core((img.to(torch.float32) - 128.0) / 128.0)
        return feats if return_features else feats.sum(1, keepdim=True)


def tiny_extractor(dims: int = 8) -> FeatureExtractor:
    return FeatureExtractor(TinyPool3(dims).eval(), "pool3", "cpu", name="tiny-test-net", dims=dims)


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_net(monkeypatch):
    """Every ``diffsamp fid`` command gets the tiny network; the list returned records each time one was asked for."""
    from diffsamp.cli import fid as fid_cli

    calls = []
    ext = tiny_extractor()

    def fake(*args):
        calls.append(args)
        return ext

    monkeypatch.setattr(fid_cli, "_extractor", fake)
    return calls


# ------------------------------------------------------------------------------ files and the CLI
@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def file_mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for ``python -m diffsamp`` in a subprocess: this checkout on the path, one thread."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_sample(model: Path, *args: str):
    """``diffsamp sample`` of seeds 0-3 at 2 steps through CliRunner."""
    from click.testing import CliRunner

    from diffsamp.cli import main

    return CliRunner().invoke(main, ["sample", "--model", str(model), "--steps", "2", "--seeds", "0-3", *args])


def assert_one_line_error(res, code: int, *needles: str) -> None:
    """A CliRunner result that failed with ``code`` and exactly one ``Error:`` line holding every needle."""
    assert res.exit_code == code, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), res.output
