"""The independent MNIST classifier (shape, adherence by hand, training, resume, shipped weights) and the
guidance table script run end to end on a tiny random class-conditional UNet with a tiny FID network."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from diffsamp.metrics.classifier import (
    DEFAULT_WEIGHTS,
    ClassifierConfig,
    MNISTClassifier,
    class_adherence,
    load_classifier,
    per_class_adherence,
    predict,
    random_shift,
    save_classifier,
    train_classifier,
)
from tests.conftest import REPO, tiny_extractor, write_idx

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ClassifierConfig(channels=(4, 8), hidden=16)


def test_forward_shape_and_padding_of_28px_images():
    model = MNISTClassifier().eval()
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 10)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 150_000
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    assert torch.equal(predict(model, x), predict(model, padded))  # 28×28 is padded with the background
    assert predict(model, ((x + 1) * 127.5).round().to(torch.uint8)).shape == (5,)  # uint8 is scaled


class FirstPixels(torch.nn.Module):
    """Stub classifier: the logits are the first 10 pixels, so an image with pixel k lit is class k."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def lit(k: int) -> torch.Tensor:
    x = torch.zeros(1, 4, 4)
    x.view(-1)[k] = 1.0
    return x


def test_class_adherence_by_hand():
    images = torch.stack([lit(k) for k in (0, 1, 9, 3, 5, 2)])  # predicted 0 1 9 3 5 2
    asked = [0, 1, 2, 3, 4, 2]  # hits: yes yes no yes no yes
    assert class_adherence(images, asked, FirstPixels()) == pytest.approx(4 / 6)
    assert per_class_adherence(images, asked, FirstPixels()) == {0: 1.0, 1: 1.0, 2: 0.5, 3: 1.0, 4: 0.0}
    assert class_adherence(images, torch.tensor(asked), FirstPixels(), batch_size=4) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="one class per image"):
        class_adherence(images, asked[:3], FirstPixels())


def test_random_shift_moves_each_image_within_bounds():
    x = torch.full((64, 1, 8, 8), -1.0)
    x[:, :, 3, 3] = 1.0
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    pos = [divmod(int(i), 8) for i in y.flatten(1).argmax(1)]
    assert all(1 <= r <= 5 and 1 <= c <= 5 for r, c in pos) and len(set(pos)) > 5
    assert torch.equal((y == 1).sum((1, 2, 3)), torch.ones(64, dtype=torch.long))  # nothing wraps around
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic 10-class data: class k is a bright square at position k, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = torch.full((n, 1, 32, 32), -1.0) + 0.2 * torch.randn(n, 1, 32, 32, generator=g)
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 5)
        x[i, 0, 4 + 12 * r : 12 + 12 * r, 2 + 6 * c : 8 + 6 * c] = 1.0
    return x, labels


def test_training_lowers_the_loss_and_resumes_bit_for_bit(tmp_path):
    x, y = blobs()
    a = train_classifier(x, y, config=TINY, epochs=3, batch_size=50, lr=1e-2, seed=1, log=None)
    assert a.epochs == 3 and a.steps == 12
    assert a.losses[-1] < 0.7 * a.losses[0]

    ckpt = tmp_path / "ckpt.pt"

    def stop_at_epoch_3(msg: str) -> None:
        if msg.startswith("epoch 3/"):
            raise KeyboardInterrupt  # after epoch 3's work, before its checkpoint: epoch 2 is on disk

    with pytest.raises(KeyboardInterrupt):
        train_classifier(x, y, config=TINY, epochs=3, batch_size=50, lr=1e-2, seed=1, checkpoint=ckpt,
                         log=stop_at_epoch_3)
    seen = []
    b = train_classifier(x, y, config=TINY, epochs=3, batch_size=50, lr=1e-2, seed=1, checkpoint=ckpt,
                         log=seen.append)
    assert seen[0].startswith("resumed") and "epoch 2" in seen[0]
    assert b.losses == a.losses
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_save_and_load_round_trip(tmp_path):
    model = MNISTClassifier(TINY).eval()
    path = save_classifier(model, tmp_path / "c.safetensors", {"test_accuracy": 0.5})
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["config"]["channels"] == [4, 8] and card["test_accuracy"] == 0.5
    again = load_classifier(path)
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(model(x), again(x))
    with pytest.raises(FileNotFoundError, match="train_mnist_classifier"):
        load_classifier(tmp_path / "missing.safetensors")


def test_shipped_weights_are_small_and_stated():
    card = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    assert card["test_accuracy"] >= 0.99 and card["test_images"] == 10_000
    assert {"epochs", "seconds", "hardware"} <= set(card["training"])
    assert card["parameters"] == sum(p.numel() for p in load_classifier().parameters())


def test_shipped_weights_classify_mnist_test(mnist_test):
    from diffsamp.data import load_labels

    root = os.environ.get("DIFFSAMP_DATA", REPO.parent / "shared" / "data")
    labels = load_labels("mnist", "test", root, limit=64)
    assert class_adherence(mnist_test, labels, load_classifier()) >= 0.97


# ------------------------------------------------------------------------------ the guidance table script
K = 3  # classes 0, 1, 2; null class 3


def load_script():
    spec = importlib.util.spec_from_file_location("conditional_table", REPO / "benchmarks" / "conditional_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def table_setup(tmp_path, monkeypatch):
    from diffsamp.models.diffusers_unet import save_diffusers
    from diffsamp.models.networks import make_unet

    torch.manual_seed(0)
    unet = make_unet(channels=(8, 16), sample_size=32, num_class_embeds=K + 1)
    torch.nn.init.normal_(unet.class_embedding.weight, std=2.0)
    model_dir = tmp_path / "cond"
    save_diffusers(unet.eval(), model_dir)
    (model_dir / "card.json").write_text(json.dumps({"conditioning": {"kind": "class", "num_classes": K,
                                                                      "null_class": K}}))
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    write_idx(data / "mnist" / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    write_idx(data / "mnist" / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (25, 28, 28)))
    write_idx(data / "mnist" / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, (25,)))
    torch.manual_seed(1)
    clf = save_classifier(MNISTClassifier(ClassifierConfig(channels=(4, 8), hidden=8, num_classes=K)).eval(),
                          tmp_path / "clf.safetensors", {"test_accuracy": 0.5})
    monkeypatch.setenv("DIFFSAMP_CACHE", str(tmp_path / "cache"))
    script = load_script()
    monkeypatch.setattr(script, "load_extractor", lambda *a, **k: tiny_extractor())
    args = ["--model", str(model_dir), "--num", "12", "--steps", "2", "--cfg", "0,1,2.5", "--grid-cols", "2",
            "--classifier", str(clf), "--data-dir", str(data), "--out", str(tmp_path / "out"), "--quiet"]
    return script, args, tmp_path / "out", model_dir, clf


def test_table_script_end_to_end_and_resumes(table_setup, monkeypatch):
    import diffsamp
    from diffsamp.images import to_uint8
    from diffsamp.models import load

    script, args, out, model_dir, clf = table_setup
    script.main(args)
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert [r["w"] for r in rows] == ["0.0", "1.0", "2.5", "data floor"]
    assert len(list((out / "cells").glob("*.json"))) == 3
    for w in ("0", "1", "2.5"):
        assert (out / f"grid_w{w}.png").is_file()
    from PIL import Image

    grid = Image.open(out / "grid_w2.5.png")
    assert grid.size == (2 * 34 + 2, K * 34 + 2)  # rows = classes, 2 samples each, 2-pixel padding
    assert json.loads(grid.text["diffsamp"])["w"] == 2.5
    cell = json.loads(next((out / "cells").glob("w2.5-*.json")).read_text())
    assert cell["num"] == 12 and cell["steps"] == 2 and cell["sampler"] == "heun" and cell["nfe"] == 3
    assert cell["reference"] == "mnist:test[:25]" and cell["feature_network"] == "tiny-test-net"
    assert set(cell["adherence_per_class"]) == {"0", "1", "2"}

    # adherence is the classifier's verdict on the very samples: the same seeds and classes sampled directly
    res = diffsamp.generate(load(model_dir), (1, 32, 32), sampler="heun", steps=2, seeds=range(12),
                            cond=[i % K for i in range(12)], guidance=2.5)
    want = class_adherence(to_uint8(res.images.clamp(-1, 1)), [i % K for i in range(12)], load_classifier(clf))
    assert cell["adherence"] == pytest.approx(want)
    config = json.loads((out / "config.json").read_text())
    assert config["cfg"] == [0.0, 1.0, 2.5] and config["floor"]["fid"] > 0
    assert "| 2.5 |" in (out / "table.md").read_text()

    def boom(*a, **k):
        raise AssertionError("a cached cell was computed again")

    monkeypatch.setattr(script, "score_model", boom)
    script.main(args)  # every cell read back
    card = json.loads((model_dir / "card.json").read_text())
    (model_dir / "card.json").write_text(json.dumps({**card, "class_adherence": {"2.5": 0.5}}))
    script.main(args)  # results added to the card: still the same model
    with pytest.raises(AssertionError, match="computed again"):
        script.main([*args, "--steps", "3"])  # other settings: a new cell
    (model_dir / "card.json").write_text(json.dumps({**card, "conditioning": {**card["conditioning"],
                                                                              "null_class": 0}}))
    with pytest.raises(AssertionError, match="computed again"):
        script.main(args)  # another null class samples other images: a new cell


def test_perceptual_distance_is_a_feature_distance_with_a_gradient():
    """LPIPS-style (unit-normalised activations, squared differences, spatial mean, summed over layers): zero on equal
    images, symmetric, larger for a larger change, differentiable in the images; the classifier's logits are its
    features' head (``forward`` = fc2 of the last feature)."""
    from diffsamp.metrics.classifier import perceptual_distance

    torch.manual_seed(0)
    clf = MNISTClassifier().eval()
    a = torch.rand(6, 1, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).requires_grad_(True)
    assert torch.equal(perceptual_distance(clf, a, a), torch.zeros(6))
    d = perceptual_distance(clf, a, b)
    torch.testing.assert_close(d, perceptual_distance(clf, b, a))
    assert bool((d > 0).all()) and bool((perceptual_distance(clf, a, a + 0.9 * (b - a)) < d).all())
    d.sum().backward()
    assert b.grad is not None and float(b.grad.abs().sum()) > 0
    feats = clf.features(a)
    torch.testing.assert_close(clf(a), clf.fc2(feats[-1].flatten(1)))
    # by hand for one layer set: the definition
    want = sum(((x / x.norm(dim=1, keepdim=True).clamp_min(1e-5) - y / y.norm(dim=1, keepdim=True).clamp_min(1e-5))
                .pow(2).sum(1).mean((1, 2))) for x, y in zip(clf.features(a), clf.features(b.detach())))
    torch.testing.assert_close(d.detach(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        perceptual_distance(clf, a, a[:, :, :28, :28])


def test_embed_is_the_fc1_activation_in_eval_mode():
    from diffsamp.metrics.classifier import embed

    torch.manual_seed(1)
    clf = MNISTClassifier()
    clf.train()
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    feats = embed(clf, images, batch_size=3)
    assert feats.shape == (7, clf.config.hidden) and clf.training  # its mode is restored
    clf.eval()
    x = torch.nn.functional.pad(images.float() / 127.5 - 1, (2, 2, 2, 2), value=-1.0)
    want = torch.relu(clf.fc1(torch.nn.functional.max_pool2d(clf.features(x)[1], clf.config.pool).flatten(1)))
    torch.testing.assert_close(feats, want.detach())
