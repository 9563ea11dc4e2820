"""Stable-Diffusion-style pipeline folders as text-conditional latent denoisers, on tiny random components (a
UNet2DConditionModel, an AutoencoderKL, a CLIP text encoder and a CLIP tokenizer on a vocabulary written here)
saved with ``save_pretrained`` and loaded as a user would: diffsamp's euler and ddim against diffusers'
StableDiffusionPipeline with guidance and without, for ε- and v-prediction; one batched UNet call per guided
evaluation; the decode path; one-line errors; the CLI."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch

import diffsamp
from diffsamp.models import load
from diffsamp.models.conditioning import Guidance, bind

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat", "two dogs, running"]
IMAGE = 16  # pixels; the tiny VAE has 2 blocks: latents are (4, 8, 8)


def _tokenizer(folder):
    """A CLIP BPE tokenizer on the letters (each letter a token, no merges) plus CLIP's special tokens."""
    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters),
                                         ",</w>", "!</w>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77), len(vocab)


def _components(tmp, prediction_type: str):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok, vocab_size = _tokenizer(tmp / "vocab")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=IMAGE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=IMAGE)
    enc = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16))
    # Stable Diffusion's own scheduler config (scaled-linear β, leading spacing, steps_offset 1)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=enc.eval(), tokenizer=tok, scheduler=sched)


def _save(tmp, prediction_type: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**_components(tmp, prediction_type), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = tmp / f"sd-{prediction_type}"
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    return {p: _save(tmp, p) for p in ("epsilon", "v_prediction")}


def _reference(path, scheduler: str, z, steps: int, w: float, negative):
    """Latents of diffusers' StableDiffusionPipeline (float64) from initial noise z (before its scaling)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float64)
    if scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=w,
                   latents=z.double(), output_type="latent", height=IMAGE, width=IMAGE)
    return out.images, pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler, w, negative", [("euler", 1.0, None), ("euler", 7.5, ["blurry", "red"]),
                                                  ("ddim", 1.0, None), ("ddim", 7.5, None)])
def test_euler_and_ddim_equal_diffusers_stable_diffusion_pipeline(sd_dirs, prediction_type, sampler, w, negative):
    """The same timesteps (leading spacing, steps_offset 1), prompts, negative prompts and initial latents.

    Tolerance 1e-6 of the latents' largest magnitude: the UNet, text encoder and our arithmetic run in float64,
    but diffusers keeps its schedule in float32 (ᾱ, Euler's σ table; Euler steps in float32) and ``generate``
    returns float32 latents (rounding alone is 6e-8 relative); seen: ≤ 1.1e-7 of the scale."""
    path, steps = sd_dirs[prediction_type], 6
    model = load(path, dtype=torch.float64)
    assert model.prediction_type == prediction_type
    seeds = [3, 8]
    z = torch.stack([torch.randn(model.sample_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    ref, pipe = _reference(path, sampler, z, steps, w, negative)

    grid = diffsamp.get_schedule("ddpm", model=model, spacing="leading", steps_offset=1).grid(steps)
    if sampler == "ddim":  # SD's DDIM ends at ᾱ_0 (set_alpha_to_one false), at σ_0 rather than at 0
        grid = diffsamp.Grid(torch.cat([grid.sigmas[:-1], model.timestep_sigmas[:1]]))
    guidance = Guidance(w, negative=negative[0] if negative else None)
    if negative:  # one negative prompt per seed: run seed by seed (Guidance takes one negative)
        outs = [diffsamp.generate(model, model.sample_shape, sampler=sampler, grid=grid, seeds=[s], cond=[p],
                                  guidance=Guidance(w, negative=n), return_latents=True)
                for s, p, n in zip(seeds, PROMPTS, negative)]
        ours = torch.cat([o.latents for o in outs])
    else:
        res = diffsamp.generate(model, model.sample_shape, sampler=sampler, grid=grid, seeds=seeds, cond=PROMPTS,
                                guidance=guidance, return_latents=True)
        ours = res.latents
        assert res.nfe == steps and res.network_passes == steps * (2 if w != 1 else 1)
        if sampler == "ddim" and w != 1:  # the codec is the pipeline's decoding: its VAE and scaling factor
            with torch.no_grad():
                images = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
            torch.testing.assert_close(model.codec.decode(ref), images, rtol=0, atol=1e-12)
    if sampler == "ddim":
        ours = ours.double() / math.sqrt(1 + float(grid.sigmas[-1]) ** 2)  # x̄ at σ_0 → the VP latents x = √ᾱ_0 x̄
    diff = float((ours.double() - ref).abs().max())
    print(f"{prediction_type} {sampler} w={w}: max |ours − diffusers| = {diff:.2e} (scale {float(ref.abs().max()):.2f})")
    assert diff <= 1e-6 * float(ref.abs().max()), diff
    if w != 1:
        plain = _reference(path, sampler, z, steps, 1.0, None)[0]
        assert float((plain - ref).abs().max()) > 1e-2  # guidance changes the result: the test can fail


def test_one_batched_unet_call_per_guided_evaluation(sd_dirs):
    model = load(sd_dirs["epsilon"])
    calls = []
    hook = model.network.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        res = diffsamp.generate(model, model.sample_shape, sampler="heun", steps=3, seeds=range(3),
                                cond=["a cat", "a dog", "a cat"], guidance=Guidance(3.0, negative="blurry"))
    finally:
        hook.remove()
    assert calls == [6] * res.nfe and res.nfe == 5 and res.network_passes == 10


def test_prompts_are_encoded_once_and_bound_per_row(sd_dirs):
    model = load(sd_dirs["epsilon"])
    emb = model.conditioning.encode(["a cat", "a dog", "a cat"])
    assert emb.shape == (3, 77, 16) and torch.equal(emb[0], emb[2]) and not torch.allclose(emb[0], emb[1])
    assert torch.equal(model.conditioning.unconditional(2), model.conditioning.encode(["", ""]))
    x = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([10.0, 1.0, 0.1])
    with torch.no_grad():
        both = bind(model, emb)(x, s)
        one = bind(model, emb[1:2])(x[1:2], s[1:2])
    torch.testing.assert_close(both[1:2], one, rtol=1e-5, atol=1e-5)


def test_decode_and_encode_are_the_vae_with_its_scaling_factor(sd_dirs):
    model = load(sd_dirs["epsilon"])
    assert model.sample_shape == (4, IMAGE // 2, IMAGE // 2) and model.clip_sample is None and model.prior == "vp"
    res = diffsamp.generate(model, model.sample_shape, sampler="euler", steps=2, seeds=[0, 1], cond="a cat",
                            return_latents=True)
    assert res.images.shape == (2, 3, IMAGE, IMAGE) and res.latents.shape == (2, 4, IMAGE // 2, IMAGE // 2)
    assert float(res.images.min()) >= -1 and float(res.images.max()) <= 1
    vae, s = model.codec.vae, model.codec.scaling_factor
    assert s == vae.config.scaling_factor
    with torch.no_grad():
        want = vae.decode(res.latents / s).sample.clamp(-1, 1)
        torch.testing.assert_close(res.images, want)
        images = res.images
        torch.testing.assert_close(model.codec.encode(images), vae.encode(images).latent_dist.mean * s)


def test_wrong_condition_kinds_are_one_line_errors(sd_dirs, tiny_model_dir):
    model = load(sd_dirs["epsilon"])
    gen = lambda m, **kw: diffsamp.generate(m, m.sample_shape, sampler="euler", steps=2, seeds=[0], **kw)  # noqa: E731
    cases = [(lambda: gen(load(tiny_model_dir), cond=["a cat"]), "unconditional: it takes no condition"),
             (lambda: gen(model, cond=[3]), "this model takes text prompts, got 3"),
             (lambda: gen(model), "this model is conditional (text prompts)"),
             (lambda: model(torch.zeros(1, *model.sample_shape), torch.ones(1)), "text-conditional")]
    for call, message in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)


def test_an_offline_hub_id_fails_fast_in_one_line(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from diffsamp.models.sd_pipeline import load_sd_pipeline

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    for call in (lambda: load_sd_pipeline("diffsamp-tests/no-such-sd"), lambda: load("diffsamp-tests/no-such-sd")):
        with pytest.raises(ValueError) as err:
            call()
        assert "HF_HUB_OFFLINE is set" in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 5


def test_cli_prompts_write_a_decoded_rgb_grid_and_are_recorded(sd_dirs, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from diffsamp.cli import main

    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\n")
    run = lambda *a: CliRunner().invoke(main, ["sample", "--model", str(sd_dirs["epsilon"]), "--steps", "2", *a])  # noqa: E731
    res = run("--prompts", str(tmp_path / "prompts.txt"), "--seeds", "0-2", "--cfg", "7.5", "--negative-prompt",
              "blurry", "--sampler", "euler", "--out", str(tmp_path / "g.png"))
    assert res.exit_code == 0, res.output
    im = Image.open(tmp_path / "g.png")
    assert im.mode == "RGB"
    meta = json.loads(im.text["diffsamp"])
    assert meta["prompts"] == ["a cat", "a dog", "a cat"] and meta["guidance"]["negative"] == "blurry"
    res = run("--prompt", "a cat", "--seeds", "0", "--sampler", "euler", "--outdir", str(tmp_path / "d"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "d" / "config.json").read_text())["prompts"] == ["a cat"]
    assert Image.open(tmp_path / "d" / "000000.png").size == (IMAGE, IMAGE)


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a", "--class", "1"], "give one of"),
    (["--prompt", "a", "--prompts", "FILE"], "give one of"),
    (["--negative-prompt", "x", "--class", "1", "--cfg", "2"], "--negative-prompt"),
    (["--prompt", "a", "--negative-prompt", "x"], "--cfg"),
])
def test_cli_bad_prompt_options_are_usage_errors_before_loading(args, message, tmp_path):
    from click.testing import CliRunner

    from diffsamp.cli import main

    (tmp_path / "FILE").write_text("a\n")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    res = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "no-such-model"), "--out",
                                    str(tmp_path / "g.png"), *args])
    assert res.exit_code == 2 and message in res.output, res.output


# ---------------------------------------------------------------------------------------------- SDXL
@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tmp = tmp_path_factory.mktemp("sdxl")
    parts = _components(tmp, "epsilon")
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=IMAGE // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16, cross_attention_dim=32,
        norm_num_groups=4)
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=parts["text_encoder"].config.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        projection_dim=16))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], text_encoder_2=enc2.eval(),
                                     tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer"], unet=unet.eval(),
                                     scheduler=sched, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(tmp / "sdxl", safe_serialization=True)
    return tmp / "sdxl"


@pytest.mark.parametrize("w, negative", [(1.0, None), (5.0, None), (5.0, "blurry")])
def test_sdxl_euler_equals_diffusers_stable_diffusion_xl_pipeline(sdxl_dir, w, negative):
    """Both text encoders' penultimate states, the pooled projection, the added time ids and (without a negative
    prompt) the all-zero unconditional half, against StableDiffusionXLPipeline; tolerance as above."""
    from diffusers import StableDiffusionXLPipeline

    model = load(sdxl_dir, dtype=torch.float64)
    enc = model.conditioning.encode(PROMPTS)
    assert enc["embeds"].shape == (2, 77, 32) and enc["pooled"].shape == (2, 16)
    assert enc["time_ids"].tolist() == [[IMAGE, IMAGE, 0, 0, IMAGE, IMAGE]] * 2
    seeds, steps = [3, 8], 5
    z = torch.stack([torch.randn(model.sample_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, torch_dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, negative_prompt=None if negative is None else [negative] * 2, guidance_scale=w,
                   num_inference_steps=steps, latents=z.double(), output_type="latent").images
    grid = diffsamp.get_schedule("ddpm", model=model, spacing="leading", steps_offset=1).grid(steps)
    res = diffsamp.generate(model, model.sample_shape, sampler="euler", grid=grid, seeds=seeds, cond=PROMPTS,
                            guidance=Guidance(w, negative=negative), return_latents=True)
    diff = float((res.latents.double() - ref).abs().max())
    print(f"sdxl euler w={w} negative={negative}: max |ours − diffusers| = {diff:.2e} (scale {float(ref.abs().max()):.2f})")
    assert diff <= 1e-6 * float(ref.abs().max()), diff
    if negative is None and w != 1:
        zeros = model.conditioning.unconditional(2)
        assert not zeros["embeds"].any() and not zeros["pooled"].any() and torch.equal(zeros["time_ids"], enc["time_ids"])
