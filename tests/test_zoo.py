"""The model zoo: shipped models load offline and sample; every other source of models resolves or fails clearly."""

from __future__ import annotations


import pytest
import torch

from diffsamp import generate
from diffsamp.models import available_models, load, model_card, sample_shape
from diffsamp.models.zoo import WEIGHTS_DIR

SHIPPED = ("mnist-ddpm", "fashion-mnist-ddpm")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_models_are_listed_with_cards():
    names = available_models()
    for name in SHIPPED:
        assert name in names
        card = model_card(name)
        for key in ("architecture", "parameters", "dataset", "steps", "batch_size", "training_seconds", "hardware", "final_loss"):
            assert key in card, (name, key)
        files = [p for p in (WEIGHTS_DIR / name).rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in files) <= 20 * 2**20
        assert {p.name for p in files} >= {"model_index.json", "config.json", "scheduler_config.json",
                                           "diffusion_pytorch_model.safetensors", "card.json"}
        assert not any(p.suffix in (".bin", ".pt", ".pth", ".ckpt") for p in files)  # no pickles


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_sample_finite_images(name):
    den = load(name, clip=False)  # unclipped: a broken model shows as values far outside the data range
    assert den.prior == "vp" and den.sigma_max > 100 and den.sigma_min < 0.02
    shape = sample_shape(den)
    assert shape == (1, 32, 32)
    assert sum(p.numel() for p in den.network.parameters()) == model_card(name)["parameters"]
    res = generate(den, shape, sampler="euler", steps=4, seeds=[0, 1, 2])
    assert res.images.shape == (3, 1, 32, 32) and res.nfe == 4
    assert torch.isfinite(res.images).all()
    # data space is [-1, 1]; 4 unclipped Euler steps overshoot it a little with the shipped weights (max |x|
    # 1.87 / 1.79 at 16.5 k / 19 k steps, 4.8 at 7.2 k), while an untrained or broken network lands at tens
    # (35.8 after 600 training steps)
    assert float(res.images.abs().max()) < 10.0


def test_shipped_model_denoises_real_data(mnist_test):
    """A trained (not random) model: from data + noise at σ = 0.5 it recovers the data far better than the input."""
    x0 = mnist_test[:16]
    den = load("mnist-ddpm")
    g = torch.Generator().manual_seed(0)
    sigma = torch.full((16,), 0.5)
    x = x0 + 0.5 * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        err = (den(x, sigma) - x0).pow(2).mean()
    assert float(err) < 0.25 * 0.25  # the noisy input's error is 0.25


def test_load_dtype_and_device():
    den = load("mnist-ddpm", device="cpu", dtype=torch.bfloat16)
    assert next(den.network.parameters()).dtype == torch.bfloat16
    out = den(torch.randn(2, 1, 32, 32), torch.tensor([1.0, 10.0]))
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


def test_load_local_dirs_and_errors(tmp_path):
    from diffsamp.models.diffusers_unet import save_diffusers
    from diffsamp.models.networks import make_unet

    torch.manual_seed(0)
    unet = make_unet(channels=(8, 16), sample_size=8)
    save_diffusers(unet, tmp_path / "pipe")
    den = load(tmp_path / "pipe")
    assert sample_shape(den) == (1, 8, 8)
    # the flat layout: a UNet folder with the scheduler config beside its config.json
    flat = tmp_path / "flat"
    unet.save_pretrained(flat)
    (flat / "scheduler_config.json").write_text((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 3.0])
    assert torch.allclose(load(flat)(x, s), den(x, s))
    with pytest.raises(ValueError, match="not in the zoo"):
        load("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither"):
        load(tmp_path / "empty")
    with pytest.raises(KeyError):
        model_card("no-such-model")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty local Hub cache, no proxy, the Hub client's offline flag off."""
    from huggingface_hub import constants

    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return constants


def _sample_unknown_hub_id(tmp_path, monkeypatch):
    """``diffsamp sample`` on a Hub id absent from the cache; diffusers' loaders must not even be tried (they
    wait on the network or scan the cache for seconds)."""
    from click.testing import CliRunner
    from diffusers import UNet2DModel

    from diffsamp.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("diffusers' loader was called on the offline path")

    monkeypatch.setattr(UNet2DModel, "from_pretrained", refuse)
    return CliRunner().invoke(main, ["sample", "--model", "diffsamp-tests/no-such-model", "--steps", "2",
                                     "--seeds", "0", "--out", str(tmp_path / "grid.png")])


def test_hub_offline_flag_fails_fast_in_one_line(tmp_path, empty_hub, monkeypatch):
    """HF_HUB_OFFLINE and an empty cache: one line naming the model and what to do, nothing written, no wait."""
    monkeypatch.setattr(empty_hub, "HF_HUB_OFFLINE", True)
    res = _sample_unknown_hub_id(tmp_path, monkeypatch)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("Error: could not load 'diffsamp-tests/no-such-model'"), res.output
    assert "HF_HUB_OFFLINE is set" in lines[0] and "local Hub cache" in lines[0] and "local directory" in lines[0]
    assert not (tmp_path / "grid.png").exists()


def test_an_unreachable_hub_fails_fast_in_one_line(tmp_path, empty_hub, monkeypatch):
    """No offline flag, but nothing listens at the endpoint: no retries, one line, no wait."""
    monkeypatch.setattr(empty_hub, "ENDPOINT", "http://127.0.0.1:9")
    res = _sample_unknown_hub_id(tmp_path, monkeypatch)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: could not load"), res.output
    assert "unreachable (no connection to 127.0.0.1" in lines[0] and "local Hub cache" in lines[0]


def test_hub_cache_lookup(tmp_path, empty_hub):
    """A repo with a snapshot in the cache is found (then diffusers loads it); an empty one is not."""
    from diffsamp.models.diffusers_unet import _in_hub_cache

    snap = tmp_path / "hub" / "models--owner--name" / "snapshots"
    snap.mkdir(parents=True)
    assert not _in_hub_cache("owner/name")
    (snap / "0123abc").mkdir()
    assert _in_hub_cache("owner/name") and not _in_hub_cache("owner/other")


def test_the_shipped_class_conditional_model_declares_its_classes_and_samples():
    from diffsamp.models.conditioning import ClassConditioning

    model = load("mnist-ddpm-cond")
    assert model.conditioning == ClassConditioning(10, 10)
    card = model_card("mnist-ddpm-cond")
    assert card["conditioning"]["null_class"] == 10 and card["training_seconds"] > 0 and "class_adherence" in card
    res = generate(model, sample_shape(model), sampler="euler", steps=2, seeds=range(2), cond=[3, 7], guidance=2.0)
    assert res.images.shape == (2, 1, 32, 32) and torch.isfinite(res.images).all() and res.network_passes == 4
