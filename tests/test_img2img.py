"""img2img (SDEdit, Meng et al. 2022): the strength picks the grid's later part and the start x0 + σ·ε; strength 1
is plain sampling, 0 the image itself; a latent model encodes the image and decodes the result."""

from __future__ import annotations

import json

import pytest
import torch

import diffsamp
from diffsamp.api import integrate
from diffsamp.models.analytic import GaussianMixtureDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")


def mixture() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser([[-1.5, 0.3], [1.0, 1.0]], [0.4, 0.6], [0.5, 0.5], sigma_min=0.02, sigma_max=20.0)


class HalfCodec:
    """A toy latent codec: latents are images × 0.5 (so encode/decode are exact inverses)."""

    def encode(self, images):
        return images * 0.5

    def decode(self, latents):
        return latents * 2.0


class LatentMixture(GaussianMixtureDenoiser):
    codec = HalfCodec()


def test_strength_one_is_plain_sampling_and_zero_is_the_image():
    m, init = mixture(), torch.tensor([[0.3, -0.7]])
    plain = diffsamp.generate(m, (2,), sampler="ddim", steps=10, seeds=range(3))
    same = diffsamp.generate(m, (2,), sampler="ddim", steps=10, seeds=range(3), init=init, strength=1.0)
    assert torch.equal(same.images, plain.images) and same.nfe == 10
    kept = diffsamp.generate(m, (2,), sampler="ddim", steps=10, seeds=range(3), init=init, strength=0.0)
    assert kept.nfe == 0 and torch.equal(kept.images, init.expand(3, 2).float())


@pytest.mark.parametrize("strength, kept", [(0.3, 3), (0.55, 5), (0.84, 8)])
def test_the_strength_runs_the_grids_last_steps_from_the_noised_image(strength, kept):
    m, init = mixture(), torch.tensor([[0.3, -0.7], [1.2, 0.4]])
    res = diffsamp.generate(m, (2,), sampler="heun", steps=10, seeds=[4, 9], init=init, strength=strength)
    full = diffsamp.make_grid(m, "heun", steps=10)
    tail = diffsamp.Grid(full.sigmas[10 - kept :])
    assert torch.equal(res.sigma_grid.sigmas, tail.sigmas)
    z = torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(s)) for s in (4, 9)])
    start = init + float(tail.sigmas[0]) * z  # SDEdit's x = x0 + σ·ε, ε from each seed
    want, _ = integrate(m, z, sampler="heun", grid=tail, start=start)
    torch.testing.assert_close(res.images, want, rtol=0, atol=1e-12)
    assert res.nfe == 2 * kept - 1


def test_a_latent_model_encodes_the_image_and_decodes_the_result():
    m, init = LatentMixture([[-1.5, 0.3], [1.0, 1.0]], [0.4, 0.6], [0.5, 0.5], sigma_min=0.02, sigma_max=20.0), \
        torch.tensor([[0.6, -1.4]])
    kept = diffsamp.generate(m, (2,), sampler="euler", steps=8, seeds=[0], init=init, strength=0.0, return_latents=True)
    assert torch.equal(kept.images, init) and torch.equal(kept.latents, init * 0.5)
    res = diffsamp.generate(m, (2,), sampler="euler", steps=8, seeds=[0], init=init, strength=0.5, return_latents=True)
    assert torch.equal(res.images, res.latents * 2.0)
    tail = diffsamp.Grid(diffsamp.make_grid(m, "euler", steps=8).sigmas[4:])
    z = torch.randn(2, generator=torch.Generator().manual_seed(0))[None]
    want, _ = integrate(m, z, sampler="euler", grid=tail, start=init * 0.5 + float(tail.sigmas[0]) * z)
    torch.testing.assert_close(res.latents, want, rtol=0, atol=1e-12)


def test_bad_img2img_settings_are_one_line_errors():
    m = mixture()
    with pytest.raises(ValueError, match="strength must be in"):
        diffsamp.generate(m, (2,), steps=4, seeds=[0], init=torch.zeros(1, 2), strength=1.5)
    with pytest.raises(ValueError, match="one per seed or one for all"):
        diffsamp.generate(m, (2,), steps=4, seeds=[0, 1, 2], init=torch.zeros(2, 2), strength=0.5)
    with pytest.raises(ValueError, match="the model samples"):
        diffsamp.generate(m, (2,), steps=4, seeds=[0], init=torch.zeros(1, 3), strength=0.5)


def test_cli_init_image(tiny_model_dir, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from diffsamp.cli import main

    Image.new("L", (20, 12), 200).save(tmp_path / "start.png")  # another size: resized to the model's 8×8
    args = ["sample", "--model", str(tiny_model_dir), "--sampler", "euler", "--steps", "4", "--seeds", "0-1"]
    res = CliRunner().invoke(main, [*args, "--init-image", str(tmp_path / "start.png"), "--strength", "0",
                                    "--outdir", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "d" / "config.json").read_text())
    assert record["strength"] == 0.0 and record["init_image"].endswith("start.png")
    assert (torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / "d" / "000001.png"))) == 200).all()
    res = CliRunner().invoke(main, [*args, "--strength", "0.5", "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 2 and "give --init-image too" in res.output
    (tmp_path / "bad.png").write_bytes(b"not a png")
    res = CliRunner().invoke(main, [*args, "--init-image", str(tmp_path / "bad.png"), "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 1 and "bad.png: not a readable image" in res.output
    assert len(res.output.strip().splitlines()) == 1
