"""The training loop and DDPM trainer on tiny UNets: learning, bit-for-bit resume, signals, diffusers format."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsamp.models.diffusers_unet import unet_from_checkpoint
from diffsamp.models.networks import make_unet
from diffsamp.models.parameterization import ddpm_alphas_cumprod
from diffsamp.training.checkpoint import CHECKPOINT, read_checkpoint
from diffsamp.training.ddpm import DDPMLoss, DDPMTrainOptions, export_checkpoint, train_ddpm
from diffsamp.training.loop import TrainConfig, lr_at, read_log, train_loop


def linear_alphas_cumprod():
    """The shipped DDPMs' table as diffusers computes it (float32)."""
    return ddpm_alphas_cumprod(dtype=torch.float32)

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP oversubscription makes
    them ~10× slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = dict(channels=(8, 16), sample_size=8, num_grid=0, batch_size=8)


def tiny_images(n: int = 32, size: int = 8, seed: int = 0) -> torch.Tensor:
    """A learnable toy data set: bright squares on a dark background at random places."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i in range(n):
        r, c = torch.randint(0, size - 3, (2,), generator=g).tolist()
        x[i, 0, r : r + 3, c : c + 3] = 255
    return x


def cfg(**kw) -> TrainConfig:
    base = dict(steps=12, lr=2e-3, warmup_steps=2, decay_steps=4, ckpt_every=4, log_every=2, ema_decay=0.9, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_ddpm_loss_targets():
    ac = linear_alphas_cumprod()
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    from diffusers import DDPMScheduler

    assert torch.equal(ac, DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    seen = {}

    class Oracle(torch.nn.Module):  # returns what the loss should be compared against, so the loss is 0
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def forward(self, x_t, t):
            a = ac[t].view(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
            seen["t"] = t
            out = eps if self.kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
            return type("O", (), {"sample": out})()

    for kind in ("epsilon", "v_prediction"):
        loss = DDPMLoss(ac, kind)(Oracle(kind), x0, torch.Generator().manual_seed(0))
        assert float(loss) < 1e-8
        assert seen["t"].dtype == torch.int64 and 0 <= int(seen["t"].min()) and int(seen["t"].max()) < 1000
    wrong = DDPMLoss(ac, "v_prediction")(Oracle("epsilon"), x0, torch.Generator().manual_seed(0))
    assert float(wrong) > 1e-3
    with pytest.raises(ValueError, match="prediction_type"):
        DDPMLoss(ac, "sample")


def test_lr_warmup_stable_decay():
    c = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay_steps=20)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warm-up
    assert all(x == 1.0 for x in lrs[10:81])  # stable
    assert lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)  # (steps − step) / decay_steps
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    assert lr_at(50, TrainConfig(steps=100, lr=1.0, warmup_steps=0)) == 1.0  # no decay by default
    # a resumed run given more steps keeps the stable phase until its new decay window
    assert lr_at(90, TrainConfig(steps=200, lr=1.0, warmup_steps=10, decay_steps=20)) == 1.0


def test_tiny_training_lowers_the_loss(tmp_path):
    images = tiny_images(64)
    train_ddpm(tmp_path / "run", DDPMTrainOptions(**TINY), cfg(steps=30, log_every=5, ckpt_every=0, lr=3e-3),
               images=images, progress=False)
    losses = [r["loss"] for r in read_log(tmp_path / "run") if "loss" in r]
    assert len(losses) == 6
    assert losses[-1] < 0.6 * losses[0], losses


def test_resume_is_bit_for_bit(tmp_path):
    images = tiny_images()
    opts = DDPMTrainOptions(**TINY)
    train_ddpm(tmp_path / "a", opts, cfg(), images=images, progress=False)
    r1 = train_ddpm(tmp_path / "b", opts, cfg(), images=images, progress=False, stop_after=7)  # "killed" at 7
    assert (r1.step, r1.finished) == (7, False)
    assert not (tmp_path / "b" / "unet").exists()  # an interrupted run exports nothing
    assert read_checkpoint(tmp_path / "b" / CHECKPOINT)[1]["step"] == 7
    r2 = train_ddpm(tmp_path / "b", opts, cfg(), images=images, progress=False, resume=True)
    assert (r2.step, r2.finished) == (12, True)
    a, b = load_file(tmp_path / "a" / CHECKPOINT), load_file(tmp_path / "b" / CHECKPOINT)
    assert a.keys() == b.keys()
    assert {k.split(".")[0] for k in a} >= {"model", "ema", "optim", "rng", "data"}
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, diff[:5]
    ua = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    ub = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    # and a resume that restored nothing would differ: the test can fail
    train_ddpm(tmp_path / "c", opts, cfg(seed=4), images=images, progress=False)
    c = load_file(tmp_path / "c" / CHECKPOINT)
    assert not torch.equal(a["ema.conv_in.weight"], c["ema.conv_in.weight"])


def test_sigterm_writes_a_checkpoint_at_a_step_boundary(tmp_path):
    images = tiny_images()
    inner = DDPMLoss(linear_alphas_cumprod())
    calls = {"n": 0}

    def loss_fn(model, batch, gen):
        calls["n"] += 1
        if calls["n"] == 5:  # the signal arrives during step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return inner(model, batch, gen)

    from diffsamp.data import BatchSampler

    torch.manual_seed(0)
    model = make_unet(channels=(8, 16), sample_size=8)
    config = cfg(ckpt_every=0, steps=50)
    result, _ = train_loop(model, loss_fn, BatchSampler(images, 8, seed=config.seed), config, tmp_path / "run", progress=False)
    assert result.interrupted and result.step == 5 and not result.finished
    tensors, state = read_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert state["step"] == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    # no temporary files left behind by the atomic write
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []


def test_run_dir_is_locked_and_not_overwritten(tmp_path):
    images = tiny_images()
    opts = DDPMTrainOptions(**TINY)
    train_ddpm(tmp_path / "r", opts, cfg(steps=4), images=images, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train_ddpm(tmp_path / "r", opts, cfg(steps=4), images=images, progress=False)
    import fcntl

    with open(tmp_path / "r" / "lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process holds the run dir
        with pytest.raises(RuntimeError, match="in use"):
            train_ddpm(tmp_path / "r", opts, cfg(steps=8), images=images, progress=False, resume=True)


def test_diffusers_roundtrip(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from diffsamp.models import load

    images = tiny_images()
    out = tmp_path / "run"
    train_ddpm(out, DDPMTrainOptions(**TINY, prediction_type="v_prediction"), cfg(steps=6), images=images, progress=False)
    ckpt = load_file(out / CHECKPOINT)
    unet = UNet2DModel.from_pretrained(out / "unet")
    ema = {k[4:]: v for k, v in ckpt.items() if k.startswith("ema.")}
    sd = unet.state_dict()
    assert sd.keys() == ema.keys() and all(torch.equal(sd[k], ema[k]) for k in sd)
    sched = DDPMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.prediction_type == "v_prediction" and sched.config.num_train_timesteps == 1000
    assert torch.equal(sched.alphas_cumprod, linear_alphas_cumprod())
    pipe = DDPMPipeline.from_pretrained(out)
    img = pipe(batch_size=2, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 8, 8, 1)
    card = json.loads((out / "card.json").read_text())
    assert card["steps"] == 6 and card["parameters"] == sum(p.numel() for p in unet.parameters())
    den = load(out)
    assert den.prediction_type == "v_prediction"
    # the checkpoint alone (a run still training) loads too, with the same EMA weights
    u2, ac, pred = unet_from_checkpoint(out / CHECKPOINT)
    assert pred == "v_prediction" and all(torch.equal(u2.state_dict()[k], sd[k]) for k in sd)
    exported = export_checkpoint(out, tmp_path / "exported")
    assert (Path(exported) / "model_index.json").is_file()
    assert json.loads((Path(exported) / "card.json").read_text())["steps"] == 6


def test_cli_train_ddpm_end_to_end(tmp_path):
    """`diffsamp train ddpm` on a fake MNIST folder, then continued to more steps with --resume."""
    import gzip

    import numpy as np
    from click.testing import CliRunner

    from diffsamp.cli import main

    imgs = tiny_images(16, size=28).numpy()[:, 0]
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    header = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in imgs.shape)
    with gzip.open(d / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + imgs.astype(np.uint8).tobytes())
    def args(steps: int) -> list[str]:
        return ["train", "ddpm", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out",
                str(tmp_path / "run"), "--steps", str(steps), "--batch-size", "4", "--channels", "8,16",
                "--attention-levels", "none", "--ckpt-every", "2", "--log-every", "1", "--device", "cpu",
                "--no-progress", "--num-grid", "2"]

    res = CliRunner().invoke(main, args(3))
    assert res.exit_code == 0, res.output
    assert "finished at step 3" in res.output
    assert (tmp_path / "run" / "unet" / "config.json").is_file()
    cfg_json = json.loads((tmp_path / "run" / "unet" / "config.json").read_text())
    assert cfg_json["block_out_channels"] == [8, 16] and cfg_json["sample_size"] == 32
    assert "Attn" not in "".join(cfg_json["down_block_types"])
    assert (tmp_path / "run" / "samples" / "step0000003.png").is_file()
    res = CliRunner().invoke(main, [*args(5), "--resume"])
    assert res.exit_code == 0, res.output
    assert "finished at step 5" in res.output
    missing = CliRunner().invoke(main, ["train", "ddpm", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x")])
    assert missing.exit_code != 0 and "--data-dir" in missing.output


def test_init_warm_starts_from_an_exported_model(tmp_path):
    """`init`: the new run starts from the given model's weights (a tiny lr keeps them), and a model that does
    not fit (other prediction type, other image size) is refused with a clear error."""
    from diffusers import UNet2DModel

    images = tiny_images()
    train_ddpm(tmp_path / "first", DDPMTrainOptions(**TINY), cfg(steps=4), images=images, progress=False)
    first = UNet2DModel.from_pretrained(tmp_path / "first" / "unet").state_dict()

    opts = DDPMTrainOptions(**{**TINY, "channels": (16, 32)}, init=str(tmp_path / "first"))
    train_ddpm(tmp_path / "second", opts, cfg(steps=1, lr=1e-12, warmup_steps=0), images=images, progress=False)
    second = UNet2DModel.from_pretrained(tmp_path / "second" / "unet").state_dict()
    assert second.keys() == first.keys()  # the init's architecture, not --channels
    assert all(torch.allclose(second[k], first[k], atol=1e-6) for k in first)
    scratch = DDPMTrainOptions(**TINY)
    train_ddpm(tmp_path / "scratch", scratch, cfg(steps=1, lr=1e-12, warmup_steps=0), images=images, progress=False)
    other = UNet2DModel.from_pretrained(tmp_path / "scratch" / "unet").state_dict()
    assert not all(torch.allclose(other[k], first[k], atol=1e-6) for k in first)

    with pytest.raises(ValueError, match="predicts 'epsilon'"):
        train_ddpm(tmp_path / "v", DDPMTrainOptions(**TINY, prediction_type="v_prediction", init=str(tmp_path / "first")),
                   cfg(steps=1), images=images, progress=False)
    with pytest.raises(ValueError, match="shape"):
        train_ddpm(tmp_path / "big", DDPMTrainOptions(**TINY, init=str(tmp_path / "first")), cfg(steps=1),
                   images=tiny_images(size=16), progress=False)


def test_rf_training_warm_starts_from_a_ddpm(tmp_path):
    """`train rf --init DDPM`: the velocity network starts from the diffusion UNet's weights (a tiny lr keeps
    them); reflow and distillation still insist on a rectified flow."""
    from diffusers import UNet2DModel

    from diffsamp.models.rectified_flow import load_rf
    from diffsamp.training.rectified_flow import RFTrainOptions, resolve_rf, train_rf

    images = tiny_images()
    train_ddpm(tmp_path / "ddpm", DDPMTrainOptions(**TINY), cfg(steps=4), images=images, progress=False)
    ddpm = UNet2DModel.from_pretrained(tmp_path / "ddpm" / "unet").state_dict()

    opts = RFTrainOptions(dataset="images", channels=(16, 32), sample_size=8, num_grid=0, batch_size=8,
                          init=str(tmp_path / "ddpm"))
    train_rf(tmp_path / "rf", opts, cfg(steps=1, lr=1e-12, warmup_steps=0), images=images, progress=False)
    flow = load_rf(tmp_path / "rf")
    weights = flow.network.state_dict()
    assert weights.keys() == ddpm.keys()  # the init's architecture, not --channels
    assert all(torch.allclose(weights[k].float(), ddpm[k], atol=1e-3) for k in ddpm)
    assert flow.time_scale == 999.0 and "ddpm" in flow.info["warm_start"]

    with pytest.raises(ValueError, match="not a rectified flow"):  # what reflow and distill resolve --init with
        resolve_rf(str(tmp_path / "ddpm"))
