"""Shared fixtures: small analytic models and a tiny random diffusers UNet (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffsamp.models.analytic import GaussianDenoiser, GaussianMixtureDenoiser


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
