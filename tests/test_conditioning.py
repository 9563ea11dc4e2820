"""Class conditions bound per seed and classifier-free guidance as a denoiser wrapper, on a tiny random
class-conditional UNet2DModel saved and loaded as a user would: identities, formulas written out, one batched
network call per guided evaluation, batch invariance, diffusers' own guided DDIM loop, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import diffsamp
from diffsamp.models import load
from diffsamp.models.conditioning import ClassConditioning, Guidance, Guided, bind
from diffsamp.models.diffusers_unet import DiffusersUNetDenoiser, save_diffusers
from diffsamp.models.networks import make_unet

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # classes 0, 1, 2; null class 3


def conditional_unet(seed: int = 0):
    torch.manual_seed(seed)
    unet = make_unet(channels=(8, 16), sample_size=8, num_class_embeds=K + 1)
    torch.nn.init.normal_(unet.class_embedding.weight, std=2.0)  # classes far apart, as after training
    return unet.eval()


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cond") / "m"
    save_diffusers(conditional_unet(), path)
    (path / "card.json").write_text(json.dumps({"conditioning": {"kind": "class", "num_classes": K, "null_class": K}}))
    return path


@pytest.fixture
def model(cond_dir):
    return load(cond_dir)


def xs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=g) * 3, torch.tensor([5.0, 2.0, 0.7, 0.1])[:b]


def test_the_card_declares_the_classes_and_the_null_class(model, cond_dir):
    assert model.conditioning == ClassConditioning(K, K)
    assert bare_model(cond_dir).conditioning == ClassConditioning(K + 1, None)  # no card: every row a class


def bare_model(cond_dir):
    """The same UNet without its card (a class-conditional UNet from elsewhere)."""
    from diffusers import UNet2DModel

    from diffsamp.models.parameterization import ddpm_alphas_cumprod

    return DiffusersUNetDenoiser(UNet2DModel.from_pretrained(cond_dir / "unet").eval(), ddpm_alphas_cumprod())


def test_bound_labels_reach_the_network(model):
    x, s = xs()
    labels = torch.tensor([0, 1, 2, 1])
    got = bind(model, labels)(x, s)
    want = model.evaluate(x, s, labels)
    assert torch.equal(got, want)
    assert not torch.allclose(bind(model, torch.tensor([2, 0, 1, 0]))(x, s), want, atol=1e-3)  # labels matter
    clamped = bind(diffsamp.ClampDenoiser(model, -0.1, 0.1), labels)(x, s)  # wrappers stay, around the bound model
    assert torch.equal(clamped, want.clamp(-0.1, 0.1))


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, -0.5])
def test_guidance_is_the_formula_in_one_batched_call(model, w):
    x, s = xs()
    c, u = torch.tensor([0, 1, 2, 1]), torch.full((4,), K)
    d_c, d_u = model.evaluate(x, s, c), model.evaluate(x, s, u)
    calls = []
    hook = model.network.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        guided = Guided(model, c, u, Guidance(w))(x, s)
    finally:
        hook.remove()
    torch.testing.assert_close(guided, d_u + w * (d_c - d_u), rtol=1e-5, atol=1e-5)
    if w == 1.0:
        assert torch.equal(guided, d_c) and calls == [4]  # the conditional model alone, one plain pass
    else:
        assert calls == [8]  # both halves in one call on the doubled batch
    if w == 0.0:
        torch.testing.assert_close(guided, d_u, rtol=1e-6, atol=1e-6)


def test_guidance_interval_applies_w_only_inside(model):
    x, s = xs()  # σ = 5, 2, 0.7, 0.1
    c, u = torch.tensor([0, 1, 2, 1]), torch.full((4,), K)
    d_c, d_u = model.evaluate(x, s, c), model.evaluate(x, s, u)
    g = Guided(model, c, u, Guidance(3.0, interval=(0.5, 2.5)))
    out = g(x, s)
    inside = torch.tensor([False, True, True, False])
    want = torch.where(inside.view(-1, 1, 1, 1), d_u + 3.0 * (d_c - d_u), d_c)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert g.passes == 2
    one = Guided(model, c[:1], u[:1], Guidance(3.0, interval=(0.5, 2.5)))
    assert torch.equal(one(x[:1], s[:1]), model.evaluate(x[:1], s[:1], c[:1]))  # σ = 5: outside, one plain pass
    assert one.passes == 1


def test_guidance_rescale_against_lin_et_al_algorithm_2(model):
    x, s = xs()
    c, u = torch.tensor([0, 1, 2, 1]), torch.full((4,), K)
    w, phi = 4.0, 0.7
    d_c, d_u = model.evaluate(x, s, c), model.evaluate(x, s, u)
    sig = s.view(-1, 1, 1, 1)
    eps_c, eps_u = (x - d_c) / sig, (x - d_u) / sig  # the networks' ε̂ halves
    eps_cfg = eps_u + w * (eps_c - eps_u)
    std_c = eps_c.flatten(1).std(1).view(-1, 1, 1, 1)
    std_cfg = eps_cfg.flatten(1).std(1).view(-1, 1, 1, 1)
    eps = phi * eps_cfg * std_c / std_cfg + (1 - phi) * eps_cfg
    got = Guided(model, c, u, Guidance(w, rescale=phi))(x, s)
    torch.testing.assert_close(got, x - sig * eps, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, Guided(model, c, u, Guidance(w))(x, s), atol=1e-3)


def test_generate_counts_guided_evaluations_and_network_passes(model):
    res = diffsamp.generate(model, (1, 8, 8), sampler="heun", steps=3, seeds=range(3), cond=[0, 1, 2], guidance=2.0)
    assert res.nfe == 5 and res.network_passes == 10 and res.cond == [0, 1, 2] and res.guidance.scale == 2.0
    res = diffsamp.generate(model, (1, 8, 8), sampler="heun", steps=3, seeds=range(3), cond=[0, 1, 2])
    assert res.nfe == res.network_passes == 5 and res.guidance is None


def test_w1_is_the_conditional_model_and_images_do_not_depend_on_the_batch(model):
    kw = dict(sampler="dpmpp2m", steps=6, seeds=range(6), cond=[0, 1, 2, 2, 1, 0])
    plain = diffsamp.generate(model, (1, 8, 8), **kw).images
    assert torch.equal(diffsamp.generate(model, (1, 8, 8), guidance=1.0, **kw).images, plain)
    whole = diffsamp.generate(model, (1, 8, 8), guidance=2.0, **kw).images
    split = diffsamp.generate(model, (1, 8, 8), guidance=2.0, batch_size=4, **kw).images
    # equal up to float32 kernels that sum in another order at another batch size
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=3e-4)
    alone = diffsamp.generate(model, (1, 8, 8), sampler="dpmpp2m", steps=6, seeds=[4], cond=[1], guidance=2.0).images
    torch.testing.assert_close(alone[0], whole[4], rtol=1e-4, atol=3e-4)
    assert not torch.allclose(whole, plain, atol=1e-3)


def test_guided_ddim_matches_diffusers_own_loop(cond_dir):
    """diffsamp's ddim with guidance against diffusers' DDIMScheduler driven by the usual CFG loop (the noise
    predictions combined as in diffusers' pipelines), on the same float64 UNet and initial noise."""
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(cond_dir / "unet").double().eval()
    sched = DDIMScheduler(clip_sample=False)
    n, w, labels = 10, 3.0, torch.tensor([0, 2, 1])
    sched.set_timesteps(n)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full((3,), K)])).sample
            e_c, e_u = both.chunk(2)
            x = sched.step(e_u + w * (e_c - e_u), t, x).prev_sample
    den = DiffusersUNetDenoiser(unet, sched.alphas_cumprod, conditioning=ClassConditioning(K, K))
    grid = diffsamp.get_schedule("ddpm", model=den, spacing="leading").grid(n)
    with torch.no_grad():
        guided = Guided(den, labels, torch.full((3,), K), Guidance(w))
        ours = diffsamp.get_sampler("ddim")(guided, z * math.sqrt(1 + float(grid.sigmas[0]) ** 2), grid)
    torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6 * float(x.abs().max()))


def test_wrong_conditions_are_one_line_errors(model, cond_dir, tiny_model_dir):
    gen = lambda m, **kw: diffsamp.generate(m, (1, 8, 8), sampler="euler", steps=2, seeds=range(2), **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"conditional \(class labels 0–2, unconditional = class 3\)"):
        gen(model)
    with pytest.raises(ValueError, match="class 3 is not one of this model's classes 0–2"):
        gen(model, cond=[0, 3])
    with pytest.raises(ValueError, match="1 conditions for 2 seeds"):
        gen(model, cond=[0])
    with pytest.raises(ValueError, match="integers"):
        gen(model, cond=["cat", "dog"])
    with pytest.raises(ValueError, match="unconditional: it takes no condition"):
        gen(load(tiny_model_dir), cond=[0, 1])
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        gen(load(tiny_model_dir), guidance=2.0)
    with pytest.raises(ValueError, match="without an unconditional"):
        gen(bare_model(cond_dir), cond=[0, 1], guidance=2.0)
    with pytest.raises(ValueError, match="class-conditional"):
        model(*xs())
    for bad in (dict(scale=math.inf), dict(interval=(2.0, 1.0)), dict(rescale=1.5)):
        with pytest.raises(ValueError, match="guidance"):
            Guidance(**bad)


# ---------------------------------------------------------------------------------------------- the CLI
def _cli(*args: str):
    from click.testing import CliRunner

    from diffsamp.cli import main

    return CliRunner().invoke(main, ["sample", *args])


def test_cli_classes_cycle_over_the_seeds_and_the_record_says_so(cond_dir, tmp_path):
    from PIL import Image

    res = _cli("--model", str(cond_dir), "--sampler", "euler", "--steps", "3", "--seeds", "10-14", "--classes", "2,0",
               "--cfg", "2.5", "--cfg-interval", "0.1,50", "--cfg-rescale", "0.5", "--out", str(tmp_path / "g.png"))
    assert res.exit_code == 0, res.output
    # karras, 3 steps: σ = 157.4, 1.9, 0.01; only the middle one is inside [0.1, 50]
    assert "NFE 3 per image (4 network passes with guidance)" in res.output
    meta = json.loads(Image.open(tmp_path / "g.png").text["diffsamp"])
    assert meta["classes"] == [2, 0, 2, 0, 2]
    assert meta["guidance"] == {"scale": 2.5, "interval": [0.1, 50.0], "rescale": 0.5, "negative": None}
    res = _cli("--model", str(cond_dir), "--sampler", "euler", "--steps", "3", "--seeds", "0-2", "--class", "1",
               "--outdir", str(tmp_path / "d"))
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "d" / "config.json").read_text())["classes"] == [1, 1, 1]
    want = diffsamp.generate(load(cond_dir), (1, 8, 8), sampler="euler", steps=3, seeds=[2], cond=[1]).images
    assert torch.equal(diffsamp.to_uint8(want.clamp(-1, 1))[0, 0],
                       torch.from_numpy(__import__("numpy").array(Image.open(tmp_path / "d" / "000002.png"))))


@pytest.mark.parametrize("args, message", [
    (["--class", "1", "--classes", "0-2"], "give one of --class"),
    (["--cfg", "2"], "give --class, --classes, --prompt or --prompts too"),
    (["--classes", "2-1"], "--classes"),
    (["--class", "0", "--cfg-interval", "5"], "--cfg-interval: expected LO,HI"),
    (["--class", "0", "--cfg", "2", "--cfg-interval", "5,1"], "interval"),
])
def test_cli_bad_conditioning_options_are_usage_errors_before_loading(args, message, tmp_path):
    res = _cli("--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "g.png"), *args)
    assert res.exit_code == 2 and message in res.output, res.output


@pytest.mark.parametrize("which, args, message", [
    ("cond", ["--class", "7"], "class 7 is not one of this model's classes 0–2"),
    ("cond", [], "give one condition per seed"),
    ("plain", ["--class", "0"], "unconditional"),
])
def test_cli_conditions_the_model_does_not_take_are_one_line(which, args, message, cond_dir, tiny_model_dir, tmp_path):
    model = cond_dir if which == "cond" else tiny_model_dir
    res = _cli("--model", str(model), "--steps", "2", "--seeds", "0-1", "--out", str(tmp_path / "g.png"), *args)
    assert res.exit_code == 1 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "g.png").exists()


# ---------------------------------------------------------------------------------------------- bench
def test_bench_scores_each_guidance_scale_with_class_balanced_seeds(cond_dir, tmp_path, monkeypatch):
    """One table per scale, cells keyed by classes and scale, each cell's FID that of generate(cond, guidance)."""
    from click.testing import CliRunner

    import diffsamp.metrics.fid
    from diffsamp.cli import main
    from diffsamp.metrics.fid import compute_stats, frechet_distance, save_stats
    from tests.conftest import tiny_extractor

    ext = tiny_extractor()
    ref_images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    ref = compute_stats(ref_images, extractor=ext, keep_features=True, padding=0, progress=False)
    save_stats(ref, tmp_path / "ref.npz")
    monkeypatch.setattr(diffsamp.metrics.fid, "load_extractor", lambda *a, **k: ext)
    monkeypatch.setattr("diffsamp.metrics.inception.load_extractor", lambda *a, **k: ext)
    out = tmp_path / "b"
    args = ["bench", "--model", str(cond_dir), "--ref", str(tmp_path / "ref.npz"), "--out", str(out), "--num", "9",
            "--quiet", "--no-reference", "--samplers", "euler", "--nfe", "3", "--classes", "0-2", "--cfg", "1,3"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert (out / "fid_vs_cfg.png").is_file() and (out / "cfg-1" / "table.md").is_file()
    assert "guidance w = 3" in (out / "cfg-3" / "table.md").read_text()
    cell = json.loads(next((out / "cfg-3" / "cells").glob("euler-*.json")).read_text())
    images = diffsamp.generate(load(cond_dir), (1, 8, 8), sampler="euler", steps=3, seeds=range(9),
                               cond=[i % 3 for i in range(9)], guidance=3.0).images.clamp(-1, 1)
    mine = compute_stats(images, extractor=ext, padding=0, progress=False)
    assert cell["fid"] == pytest.approx(max(frechet_distance(mine.mu, mine.sigma, ref.mu, ref.sigma), 0), rel=1e-4)
    other = json.loads(next((out / "cfg-1" / "cells").glob("euler-*.json")).read_text())
    assert other["fid"] != cell["fid"]
    assert cell["nfe"] == 3 and cell["network_passes"] == 6 and other["network_passes"] == 3  # w = 1: one half
    assert "2 network passes per NFE" in (out / "cfg-3" / "table.md").read_text()
    res = CliRunner().invoke(main, args[:-4] + ["--cfg", "2"])
    assert res.exit_code == 2 and "give --classes too" in res.output


# ---------------------------------------------------------------------------------------------- AMED
def test_amed_trains_on_a_guided_model_reading_the_conditional_half(cond_dir, tmp_path):
    from diffsamp.samplers.amed import evaluate_with_features
    from diffsamp.samplers.amed_files import load_predictor
    from diffsamp.training.amed import AmedTrainOptions, train_amed

    model = load(cond_dir)
    x, s = xs(3)
    c = torch.tensor([0, 1, 2])
    _, h_guided = evaluate_with_features(Guided(model, c, torch.full((3,), K), Guidance(3.0)), x, s)
    _, h_cond = evaluate_with_features(bind(model, c), x, s)
    torch.testing.assert_close(h_guided, h_cond, rtol=1e-5, atol=1e-5)  # the conditional half's bottleneck

    opts = AmedTrainOptions(nfe=3, trajectories=8, batch=4, classes=[0, 2], guidance=2.0)
    path = train_amed(model, model.sample_shape, opts, tmp_path / "amed", model_name=str(cond_dir))
    pred = load_predictor(path)
    assert pred.config["classes"] == [0, 2] and pred.config["guidance"] == 2.0
    kw = dict(sampler="amed", predictor=pred, grid=diffsamp.Grid(torch.tensor(pred.config["grid"])), seeds=range(2),
              cond=[0, 2], afs=pred.config["afs"])
    with pytest.warns(UserWarning, match="trained under guidance w = 2; sampling at w = 4"):
        diffsamp.generate(model, (1, 8, 8), guidance=4.0, **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = diffsamp.generate(model, (1, 8, 8), guidance=2.0, **kw)
    assert res.nfe == 3 and res.network_passes == 6
    with pytest.raises(ValueError, match="give one condition per seed"):
        train_amed(model, model.sample_shape, AmedTrainOptions(nfe=3, trajectories=4, batch=4), tmp_path / "x",
                   model_name=str(cond_dir))


def test_a_schedule_learned_under_guidance_warns_at_another_scale(cond_dir, tmp_path, monkeypatch):
    """A GITS schedule found along trajectories guided at w = 2: `sample --sigmas` and `bench --schedule` say so at
    w = 3, before sampling, and stay quiet at w = 2 (and for the same file without classes in its record)."""

    from click.testing import CliRunner

    import diffsamp.metrics.fid
    from diffsamp.cli import main
    from diffsamp.metrics.fid import compute_stats, save_stats
    from diffsamp.models.conditioning import guidance_mismatch
    from tests.conftest import tiny_extractor

    sched = tmp_path / "gits"
    res = CliRunner().invoke(main, ["train", "solver", "--method", "gits", "--model", str(cond_dir), "--nfe", "2",
                                    "--fine-steps", "6", "--trajectories", "3", "--batch", "3", "--classes", "0-2",
                                    "--cfg", "2", "--out", str(sched)])
    assert res.exit_code == 0, res.output
    doc = json.loads((sched / "schedule.json").read_text())
    assert guidance_mismatch(doc, 2.0, "s") is None
    assert guidance_mismatch(doc, 3.0, "s") == "s was trained under guidance w = 2; sampling at w = 3"
    assert guidance_mismatch({**doc, "options": {**doc["options"], "classes": None}}, 3.0, "s") is None
    assert guidance_mismatch({"classes": [0], "guidance": 1.5}, 1.0, "p") is not None  # a predictor's config

    def sample(w: str):
        return CliRunner().invoke(main, ["sample", "--model", str(cond_dir), "--sampler", "ddim", "--sigmas",
                                         str(sched), "--classes", "0-2", "--cfg", w, "--seeds", "0-1", "--out",
                                         str(tmp_path / f"g{w}.png")])

    res = sample("3")  # the CLI prints each warning as one line
    assert res.exit_code == 0 and f"the schedule {sched} was trained under guidance w = 2; sampling at w = 3" in \
        res.output, res.output
    res = sample("2")
    assert res.exit_code == 0 and "trained under guidance" not in res.output, res.output

    ext = tiny_extractor()
    ref = compute_stats(torch.zeros((4, 1, 8, 8), dtype=torch.uint8), extractor=ext, padding=0, progress=False)
    save_stats(ref, tmp_path / "ref.npz")
    monkeypatch.setattr(diffsamp.metrics.fid, "load_extractor", lambda *a, **k: ext)
    monkeypatch.setattr("diffsamp.metrics.inception.load_extractor", lambda *a, **k: ext)

    def bench(w: str):
        return CliRunner().invoke(main, ["bench", "--model", str(cond_dir), "--ref", str(tmp_path / "ref.npz"),
                                         "--out", str(tmp_path / "b"), "--num", "3", "--no-reference", "--cached-only",
                                         "--samplers", "ddim", "--schedule", f"ddim={sched}", "--nfe", "2",
                                         "--classes", "0-2", "--cfg", w])

    res = bench("3")
    assert res.exit_code == 0 and f"warning: the schedule {sched} was trained under guidance w = 2" in res.output
    res = bench("2")
    assert res.exit_code == 0 and "warning" not in res.output, res.output
