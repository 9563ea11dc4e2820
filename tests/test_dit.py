"""DiT (Peebles & Xie 2023) as a σ-space denoiser, on a tiny random DiTPipeline (transformer with learned variance,
AutoencoderKL, scheduler) saved with ``save_pretrained`` and loaded as a user would (no downloads): diffsamp's
``ddim`` against ``DiTPipeline`` itself with and without guidance, the ε half of the output, one batched call per
guided evaluation, the codec, the CLI, and one-line errors.

The installed diffusers' ``DiTPipeline`` guides all latent channels (``noise_pred[:, :latent_channels]``), as
``Guided`` does; older releases guided only the first 3 (the original DiT code's ``forward_with_cfg``), which
diffsamp does not reproduce. The pipeline's null class is hard-coded to 1000, so the tiny model has 1000 classes.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import diffsamp
from diffsamp.models import load
from diffsamp.models.conditioning import ClassConditioning, Guidance, Guided, bind, condition_model
from diffsamp.models.dit import DiTDenoiser

pytestmark = pytest.mark.usefixtures("one_thread")

K, C, S = 1000, 4, 8  # classes (DiTPipeline's null class is 1000), latent channels, latent size
STEPS = 10


def tiny_pipeline(scheduler=None):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C,
                                        num_layers=2, sample_size=S, patch_size=2, num_embeds_ada_norm=K)
    with torch.no_grad():  # away from the initialisation, as after training; classes far apart
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.normal_(0, 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=C,
                        norm_num_groups=4, layers_per_block=1, sample_size=2 * S)
    # DiT's released scheduler: DDIM, linear β, no clipping, "leading" spacing
    return DiTPipeline(transformer=transformer.eval(), vae=vae.eval(),
                       scheduler=scheduler or DDIMScheduler(clip_sample=False))


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "dit"
    tiny_pipeline().save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())  # as the Hub's DiT pipelines ship it
    index["id2label"] = {"0": "tench, Tinca tinca", "1": "goldfish"}
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def model(dit_dir):
    return load(dit_dir, dtype=torch.float64)


def xs(b: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, C, S, S, generator=g, dtype=torch.float64) * 3, torch.tensor([20.0, 2.0, 0.3][:b],
                                                                                          dtype=torch.float64)


def test_a_saved_ditpipeline_loads_as_a_latent_class_conditional_vp_model(model, dit_dir, tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from diffsamp.models.diffusers_unet import alphas_cumprod_of

    assert isinstance(model, DiTDenoiser) and model.prior == "vp" and model.sample_shape == (C, S, S)
    assert model.conditioning == ClassConditioning(K, null_class=K)  # the embedder's last row: the null class
    assert model.dtype == torch.float64 and model.clip_sample is None and model.learned_variance
    assert model.labels == {"Tinca tinca": 0, "goldfish": 1, "tench": 0}
    assert model.codec.scaling_factor == pytest.approx(0.18215)
    torch.testing.assert_close(alphas_cumprod_of(model), DDIMScheduler().alphas_cumprod.double(), rtol=0, atol=0)
    assert model.feature_module is model.network.transformer_blocks[1]
    # the same folder with a DPM-Solver scheduler (what the Hub's DiT model card suggests): the same ᾱ table
    other = tmp_path / "dpm"
    shutil.copytree(dit_dir, other)
    shutil.rmtree(other / "scheduler")
    DPMSolverMultistepScheduler().save_pretrained(other / "scheduler")
    torch.testing.assert_close(load(other).alphas_cumprod, model.alphas_cumprod, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated")
@pytest.mark.parametrize("w", [1.0, 4.0])
def test_ddim_equals_ditpipeline(model, dit_dir, w):
    """diffsamp's ddim on the "leading" DDPM grid from DiTPipeline's own initial latents, with guidance (w = 4,
    DiTPipeline's default) and without (w = 1): the latents before decoding and the decoded images, float64."""
    from diffusers import DiTPipeline
    from diffusers.utils.torch_utils import randn_tensor

    pipe = DiTPipeline.from_pretrained(dit_dir, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 7, 999]
    seen = {}
    decode = pipe.vae.decode

    def spy(z, *args, **kwargs):  # the latents DiTPipeline decodes (divided by the scaling factor)
        seen["z"] = z.clone()
        return decode(z, *args, **kwargs)

    pipe.vae.decode = spy
    with torch.no_grad():
        ref = pipe(labels, guidance_scale=w, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS,
                   output_type="pt").images
    ref_latents = seen["z"] * pipe.vae.config.scaling_factor

    z = randn_tensor((3, C, S, S), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = diffsamp.get_schedule("ddpm", model=model, spacing="leading").grid(STEPS)
    calls = []
    hook = model.network.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            denoiser = condition_model(model, torch.tensor(labels), Guidance(w))
            ours = diffsamp.get_sampler("ddim")(denoiser, z * math.sqrt(1 + float(grid.sigmas[0]) ** 2), grid)
            images = model.codec.decode(ours)
    finally:
        hook.remove()
    assert calls == [6 if w != 1 else 3] * STEPS  # one transformer call per evaluation, both halves batched
    scale = float(ref_latents.abs().max())
    diff = float((ours - ref_latents).abs().max())
    print(f"w={w}: latents max |diff| {diff:.2e} (max |latent| {scale:.1f}), "
          f"images {float(((images + 1) / 2 - ref).abs().max()):.2e}")
    # diffusers does its scheduler arithmetic with float32 ᾱ's: agreement to ~1e-7 relative
    torch.testing.assert_close(ours, ref_latents, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close((images + 1) / 2, ref, rtol=0, atol=1e-6)


def test_only_the_eps_half_of_the_learned_variance_output_is_used(model):
    x, s = xs()
    labels = torch.tensor([0, 5, K])
    t = model.timestep(s).float()
    sig = s.view(-1, 1, 1, 1)
    with torch.no_grad():
        out = model.network(x / (1 + sig**2).sqrt(), timestep=t, class_labels=labels).sample
        d = model.evaluate(x, s, labels)
        assert out.shape == (3, 2 * C, S, S)
        torch.testing.assert_close(d, x - sig * out[:, :C], rtol=1e-12, atol=1e-12)  # D = x̄ − σ ε̂ (ε half)

        def garble(mod, args, output):  # anything at all in the variance half
            output.sample[:, C:] = 1e6
            return output

        hook = model.network.register_forward_hook(garble)
        try:
            assert torch.equal(bind(model, labels)(x, s), d)
        finally:
            hook.remove()


@pytest.mark.parametrize("w", [0.0, 2.5])
def test_guidance_is_the_formula_in_one_batched_call(model, w):
    x, s = xs()
    c, u = torch.tensor([1, 2, 3]), torch.full((3,), K)
    with torch.no_grad():
        d_c, d_u = model.evaluate(x, s, c), model.evaluate(x, s, u)
        calls = []
        hook = model.network.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
        try:
            guided = Guided(model, c, u, Guidance(w))(x, s)
        finally:
            hook.remove()
    assert calls == [6]
    torch.testing.assert_close(guided, d_u + w * (d_c - d_u), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(d_c, d_u, atol=1e-3)  # the class reaches the network


def test_generate_decodes_to_images_in_range_and_keeps_the_latents(model):
    res = diffsamp.generate(model, model.sample_shape, sampler="dpmpp2m", steps=4, seeds=range(2), cond=[0, 999],
                            guidance=4.0, return_latents=True)
    assert res.images.shape == (2, 3, 2 * S, 2 * S) and res.latents.shape == (2, C, S, S)
    assert res.nfe == 4 and res.network_passes == 8
    assert float(res.images.min()) >= -1 and float(res.images.max()) <= 1
    with torch.no_grad():
        torch.testing.assert_close(res.images, model.codec.decode(res.latents.double()).float())
        wild = model.codec.decode(torch.randn(2, C, S, S, dtype=torch.float64) * 50)
        assert wild.shape == (2, 3, 2 * S, 2 * S) and float(wild.abs().max()) <= 1
        images = res.images.double()
        want = model.codec.vae.encode(images).latent_dist.mean * 0.18215
        torch.testing.assert_close(model.codec.encode(images), want)


def test_wrong_conditions_are_one_line_errors(model):
    def gen(**kw):
        return diffsamp.generate(model, model.sample_shape, sampler="euler", steps=2, seeds=range(2), **kw)

    with pytest.raises(ValueError, match=f"class {K} is not one of this model's classes 0–{K - 1}"):
        gen(cond=[0, K])  # the null class is not a class to ask for
    with pytest.raises(ValueError, match=r"conditional \(class labels 0–999, unconditional = class 1000\)"):
        gen()
    with pytest.raises(ValueError, match="integers"):
        gen(cond=["goldfish", "tench"])
    with pytest.raises(ValueError, match="class-conditional"):
        model(*xs())
    with pytest.raises(ValueError, match=r"takes \(B, 4, H, W\) latents"):
        model.evaluate(torch.zeros(1, 3, 16, 16, dtype=torch.float64), torch.ones(1), torch.zeros(1, dtype=torch.long))


def test_an_offline_hub_id_fails_at_once_in_one_line(monkeypatch, tmp_path):
    from diffusers import DiTTransformer2DModel
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(DiTTransformer2DModel, "from_pretrained", lambda *a, **kw: pytest.fail("loader called"))
    with pytest.raises(ValueError) as err:
        DiTDenoiser.from_pretrained("diffsamp-tests/no-such-dit")
    assert len(str(err.value).splitlines()) == 1 and "HF_HUB_OFFLINE is set" in str(err.value)


def test_cli_samples_a_decoded_rgb_grid_and_lists_a_shipped_dit(dit_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from PIL import Image

    from diffsamp.cli import main
    from diffsamp.models import zoo

    out = tmp_path / "g.png"
    res = CliRunner().invoke(main, ["sample", "--model", str(dit_dir), "--classes", "0-3", "--cfg", "4", "--steps",
                                    "10", "--seeds", "0-7", "--out", str(out)])
    assert res.exit_code == 0, res.output
    png = Image.open(out)
    assert png.mode == "RGB" and png.size == (3 * (2 * S + 2) + 2,) * 2  # 8 decoded 16×16 images, 3 per row
    assert json.loads(png.text["diffsamp"])["classes"] == [0, 1, 2, 3, 0, 1, 2, 3]
    res = CliRunner().invoke(main, ["sample", "--model", str(dit_dir), "--class", "1000", "--steps", "2",
                                    "--seeds", "0", "--out", str(tmp_path / "h.png")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "class 1000 is not one of this model's classes 0–999" in res.output

    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "weights")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "tiny-dit").symlink_to(dit_dir)
    assert "tiny-dit" in zoo.available_models() and isinstance(load("tiny-dit"), DiTDenoiser)
    res = CliRunner().invoke(main, ["models"])
    assert res.exit_code == 0 and "tiny-dit" in res.output, res.output


def test_a_hub_id_in_the_local_cache_loads_offline(dit_dir, monkeypatch, tmp_path):
    """A DiT pipeline Hub id, offline, from the local Hub cache: ``load`` tells it from its ``model_index.json``."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--diffsamp-tests--tiny-dit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(dit_dir, repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub = load("diffsamp-tests/tiny-dit", dtype=torch.float64)
    assert isinstance(hub, DiTDenoiser) and hub.labels == {"Tinca tinca": 0, "goldfish": 1, "tench": 0}
    x, s = xs()
    labels = torch.tensor([0, 1, K])
    with torch.no_grad():
        assert torch.equal(hub.evaluate(x, s, labels), load(dit_dir, dtype=torch.float64).evaluate(x, s, labels))


def test_the_fid_path_scores_decoded_images(model, tmp_path):
    """score_model on a latent model: the statistics are those of the decoded RGB images, not of the latents."""
    from diffsamp.metrics.fid import compute_stats, frechet_distance
    from diffsamp.metrics.scoring import score_model
    from tests.conftest import tiny_extractor

    ext = tiny_extractor()
    ref = compute_stats(torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(2)),
                        extractor=ext, keep_features=True, padding=0, progress=False)
    cond = [i % 3 for i in range(6)]
    q = score_model(model, ref, num=6, sampler="ddim", steps=3, extractor=ext, progress=False, cond=cond,
                    guidance=2.0, kid=False)
    images = diffsamp.generate(model, model.sample_shape, sampler="ddim", steps=3, seeds=range(6), cond=cond,
                               guidance=2.0).images.clamp(-1, 1)
    assert images.shape == (6, 3, 16, 16)
    mine = compute_stats(images, extractor=ext, padding=0, progress=False)
    assert q.fid == pytest.approx(max(frechet_distance(mine.mu, mine.sigma, ref.mu, ref.sigma), 0.0), rel=1e-5)
