"""Class-conditional DDPM training (classifier-free guidance's label dropout): aligned labels, the null class,
warm start from an unconditional model, and what the exported model records."""

from __future__ import annotations

import json

import pytest
import torch

from diffsamp.data import BatchSampler
from diffsamp.models.parameterization import ddpm_alphas_cumprod
from diffsamp.training.ddpm import DDPMLoss, DDPMTrainOptions, init_unet, train_ddpm
from diffsamp.training.loop import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(channels=(8, 16), sample_size=8, num_grid=0, batch_size=8)


def labelled_images(n: int = 24, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose brightness encodes their label (label j → every pixel 40·j), so pairs can be checked."""
    labels = torch.arange(n) % k
    images = (labels * 40).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    return images, labels


def test_batches_keep_images_and_labels_together():
    images, labels = labelled_images()
    batches = BatchSampler(images, 5, seed=1, labels=labels)
    for _ in range(10):  # across epochs
        x, y = batches.next()
        assert x.shape == (5, 1, 8, 8) and y.dtype == torch.int64
        assert torch.equal(((x[:, 0, 0, 0] + 1) * 127.5).round().long(), y * 40)
    with pytest.raises(ValueError, match="labels must be"):
        BatchSampler(images, 5, labels=labels[:-1])


class Recorder(torch.nn.Module):
    """Stands in for the UNet: records the class labels it is given, predicts zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, class_labels=None):
        self.seen.append(class_labels)
        return type("Out", (), {"sample": torch.zeros_like(x)})()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_label_dropout_replaces_a_fraction_of_labels_by_the_null_class(p):
    k, n = 4, 4000
    loss = DDPMLoss(ddpm_alphas_cumprod(dtype=torch.float32), num_classes=k, label_dropout=p)
    net = Recorder()
    labels = torch.arange(n) % k
    loss(net, (torch.zeros(n, 1, 2, 2), labels), torch.Generator().manual_seed(0))
    seen = net.seen[0]
    null = seen == k
    assert abs(null.float().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-9  # binomial, 4 s.d.
    assert torch.equal(seen[~null], labels[~null])  # the others untouched
    with pytest.raises(ValueError, match="needs \\(images, labels\\)"):
        loss(net, torch.zeros(2, 1, 2, 2), torch.Generator())


def test_warm_start_gains_a_zero_class_embedding_and_starts_from_the_unconditional_model(tiny_model_dir):
    from diffusers import UNet2DModel

    base = UNet2DModel.from_pretrained(tiny_model_dir / "unet").eval()
    cond = init_unet(str(tiny_model_dir), (1, 8, 8), "epsilon", num_classes=3).eval()
    assert cond.config.num_class_embeds == 4 and not cond.class_embedding.weight.any()
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 300, 600, 999])
    with torch.no_grad():
        want = base(x, t).sample
        for label in range(4):  # every class and the null class: the unconditional model, exactly
            assert torch.equal(cond(x, t, class_labels=torch.full((4,), label)).sample, want)



def test_warm_start_from_a_conditional_model_needs_the_same_classes(tiny_model_dir, tmp_path):
    from diffsamp.models.diffusers_unet import save_diffusers

    save_diffusers(init_unet(str(tiny_model_dir), (1, 8, 8), "epsilon", num_classes=3), tmp_path / "cond3")
    assert init_unet(str(tmp_path / "cond3"), (1, 8, 8), "epsilon", num_classes=3).config.num_class_embeds == 4
    for k in (0, 5):
        with pytest.raises(ValueError, match="num_class_embeds=4"):
            init_unet(str(tmp_path / "cond3"), (1, 8, 8), "epsilon", num_classes=k)


def test_a_conditional_run_learns_the_labels_and_records_them(tmp_path):
    from diffusers import UNet2DModel

    images, labels = labelled_images()
    opts = DDPMTrainOptions(**TINY, class_conditional=True, label_dropout=0.2)
    config = TrainConfig(steps=30, lr=3e-3, warmup_steps=2, ckpt_every=0, log_every=10, ema_decay=0.0, seed=0)
    train_ddpm(tmp_path / "run", opts, config, images=images, labels=labels, progress=False)
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["conditioning"] == {"kind": "class", "num_classes": 3, "null_class": 3, "label_dropout": 0.2}
    unet = UNet2DModel.from_pretrained(tmp_path / "run" / "unet").eval()
    assert unet.config.num_class_embeds == 4
    emb = unet.class_embedding.weight.detach()
    assert emb[:3].abs().sum(1).gt(0).all()  # the three classes were trained, apart from one another
    assert not torch.allclose(emb[0], emb[1]) and not torch.allclose(emb[1], emb[2])


def test_the_class_embedding_learns_at_its_own_rate(tmp_path, tiny_model_dir):
    """lr_scales: the class embedding's Adam steps are class_lr_scale times the others' (first step: |Δ| = lr·scale
    for every coordinate with a gradient, Adam's normalised update), and the groups survive a resume."""
    from diffsamp.training.checkpoint import CHECKPOINT, read_checkpoint

    images, labels = labelled_images()
    config = dict(lr=1e-4, warmup_steps=0, ckpt_every=0, log_every=1, ema_decay=0.0, seed=0, grad_clip=0.0)
    opts = DDPMTrainOptions(**TINY, class_conditional=True, class_lr_scale=40.0, init=str(tiny_model_dir))
    train_ddpm(tmp_path / "a", opts, TrainConfig(steps=1, **config), images=images, labels=labels, progress=False)
    tensors, _ = read_checkpoint(tmp_path / "a" / CHECKPOINT)
    emb = tensors["model.class_embedding.weight"]  # zero-initialised by the warm start, one step taken
    moved = emb[emb != 0].abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 1e-4 * 40.0), rtol=1e-3, atol=0)
    from diffusers import UNet2DModel

    before = UNet2DModel.from_pretrained(tiny_model_dir / "unet").state_dict()["conv_in.bias"]
    step = (tensors["model.conv_in.bias"] - before).abs()
    assert 0 < step.max() <= 1e-4 * 1.001  # the rest at the base rate
    train_ddpm(tmp_path / "a", opts, TrainConfig(steps=3, **config), images=images, labels=labels, progress=False,
               resume=True)  # the optimizer's two groups load back
    with pytest.raises(ValueError, match="no parameter is named"):
        from diffsamp.training.loop import param_groups

        param_groups(torch.nn.Linear(2, 2), {"class_embedding.": 2.0})
