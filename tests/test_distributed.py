"""torchrun (gloo, 2 CPU processes): sharded sampling writes what one process writes, FID statistics merge to the
one-process figures, DDP training follows the one-process run, and a killed rank stops the job and resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from diffsamp import dist
from tests.conftest import subprocess_env, tiny_extractor, write_idx

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffsamp",
           *args]
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def one_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffsamp", *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=240)


# ------------------------------------------------------------------------------ in-process gloo workers
def _steps_options():
    from diffsamp.training.steps import StepsOptions

    return StepsOptions(steps=3, schedule="karras", teacher_steps=6, trajectories=6, batch=3, epochs=2, slack=0.05)


def _worker(rank: int, world: int, init_file: str, out: str, model_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        from diffsamp.metrics.fid import compute_stats

        images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        stats = compute_stats(images[dist.shard_indices(23, 4)], extractor=tiny_extractor(), keep_features=True,
                              total=23, shard_block=4, progress=False, batch_size=4)
        results["mu"], results["sigma"], results["features"] = stats.mu, stats.sigma, stats.features
        results["n"] = stats.num_images

        from diffsamp.training.loop import _sharded_forward

        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
        seen = []
        net.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
        target = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
        forward = _sharded_forward(net, torch.device("cpu"))
        loss = torch.nn.functional.mse_loss(forward(x), target)
        loss.backward()
        results["loss"] = float(loss)
        results["grads"] = [p.grad.clone() for p in net.parameters()]
        results["rows_seen"] = list(seen)
        from diffsamp.metrics.likelihood import elbo, merge_over_ranks
        from diffsamp.metrics.scoring import score_model
        from diffsamp.models import load

        model = load(model_dir)
        q = score_model(model, stats, num=7, batch_size=2, sampler="euler", steps=3, extractor=tiny_extractor(),
                        progress=False)
        results["fid"], results["kid"], results["nfe"] = q.fid, q.kid, q.nfe
        pixels = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
        mine = dist.shard_indices(5, 2)
        res = merge_over_ranks(elbo(model, pixels[mine], steps=4, batch_size=2, seed=9,
                                    image_seeds=[9 + i for i in mine]), 5, 2)
        results["nats"], results["per_step"] = res.nats, res.per_step_bpd

        from diffsamp.samplers.amed_files import load_predictor
        from diffsamp.training.amed import AmedTrainOptions, train_amed

        rows = []
        path = train_amed(model, model.sample_shape, AmedTrainOptions(nfe=3, trajectories=8, batch=4),
                          Path(out) / "amed", model_name=model_dir, observe=lambda it, i, r, loss: rows.append(len(r)))
        dist.barrier()
        results["amed_rows"] = rows
        results["amed_losses"] = load_predictor(path).config["training"]["loss_per_iteration"]

        from diffsamp.training.steps import train_steps

        grid, rec = train_steps(model, model.sample_shape, _steps_options())  # batches of 3 split 2 / 1 over the ranks
        results["steps_sigmas"], results["steps_record"] = grid.sigmas, rec

        net.zero_grad()  # gradients of half batches averaged over ranks: the full batch's
        half = slice(4 * rank, 4 * rank + 4)
        torch.nn.functional.mse_loss(net(x[half]), target[half]).backward()
        dist.average_gradients(list(net.parameters()))
        results["averaged"] = [p.grad.clone() for p in net.parameters()]
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp), str(tiny_model_dir)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_fid_statistics_merged_over_ranks_equal_one_process(gloo_results):
    """Float64 moments summed over ranks (re-centred on a common shift) and features gathered in image order."""
    from diffsamp.metrics.fid import compute_stats

    images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    one = compute_stats(images, extractor=tiny_extractor(), keep_features=True, progress=False, batch_size=4)
    for r in gloo_results:
        assert r["n"] == 23
        np.testing.assert_allclose(r["mu"], one.mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(r["sigma"], one.sigma, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(r["features"], one.features)  # same rows, same order (KID subsets agree)


def test_a_sharded_forward_gives_the_one_process_gradient(gloo_results):
    """Each rank's network sees its half of the batch; after DDP the gradient is the full batch's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    target = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    loss = torch.nn.functional.mse_loss(net(x), target)
    loss.backward()
    for r in gloo_results:
        assert r["rows_seen"] == [4]
        assert r["loss"] == pytest.approx(float(loss), rel=1e-6)
        for g, p in zip(r["grads"], net.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_scores_and_bounds_computed_on_shards_equal_one_process(gloo_results, tiny_model_dir):
    """score_model (what bench and sample --fid-ref run) and the DDPM bound (nll) on two ranks."""
    from diffsamp.metrics.fid import compute_stats
    from diffsamp.metrics.likelihood import elbo
    from diffsamp.metrics.scoring import score_model
    from diffsamp.models import load

    images = torch.randint(0, 256, (23, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ref = compute_stats(images, extractor=tiny_extractor(), keep_features=True, progress=False, batch_size=4)
    model = load(tiny_model_dir)
    q = score_model(model, ref, num=7, batch_size=2, sampler="euler", steps=3, extractor=tiny_extractor(),
                    progress=False)
    pixels = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    res = elbo(model, pixels, steps=4, batch_size=2, seed=9)
    for r in gloo_results:
        # the moments agree to 1e-9 (above); the matrix square root of 7-sample statistics amplifies their rounding
        assert r["fid"] == pytest.approx(q.fid, rel=1e-6) and r["kid"] == pytest.approx(q.kid, rel=1e-9, abs=1e-12)
        assert r["nfe"] == q.nfe
        torch.testing.assert_close(r["nats"], res.nats, rtol=1e-12, atol=0)
        torch.testing.assert_close(r["per_step"], res.per_step_bpd, rtol=1e-12, atol=0, equal_nan=True)


def test_an_amed_predictor_trains_on_two_ranks_as_in_one_process(gloo_results, tiny_model_dir, tmp_path):
    """Each rank runs the teacher and the student on its half of every batch and gradients are averaged over ranks:
    the first iteration's loss (the whole batch's, before any update) is the one-process loss. (Later iterations
    drift apart by float rounding amplified by Adam with β1 = 0, whose first update of a parameter is ±lr.)"""
    from diffsamp.samplers.amed_files import load_predictor
    from diffsamp.training.amed import AmedTrainOptions, train_amed
    from diffsamp.models import load

    model = load(tiny_model_dir)
    one = load_predictor(train_amed(model, model.sample_shape, AmedTrainOptions(nfe=3, trajectories=8, batch=4),
                                    tmp_path / "amed", model_name=str(tiny_model_dir))).config["training"]
    for r in gloo_results:
        assert set(r["amed_rows"]) == {2}  # half of each batch of 4
        assert r["amed_losses"][0] == pytest.approx(one["loss_per_iteration"][0], rel=1e-4)


def test_learned_steps_train_on_two_ranks_as_in_one_process(gloo_results, tiny_model_dir):
    """Each rank runs the teacher and the solve on its part of every batch (2 and 1 rows of 3), its loss a sum over
    those rows divided by the batch's size, gradients summed over ranks: the pool losses, per-epoch losses and the
    learned σ's of one process (float rounding of the sums aside), with LD3's slack on."""
    from diffsamp.models import load
    from diffsamp.training.steps import train_steps

    model = load(tiny_model_dir)
    grid, one = train_steps(model, model.sample_shape, _steps_options())
    for r in gloo_results:
        rec = r["steps_record"]
        assert rec["processes"] == 2 and one["processes"] == 1
        assert rec["pool_loss"] == pytest.approx(one["pool_loss"], rel=1e-4)
        assert rec["loss_per_epoch"] == pytest.approx(one["loss_per_epoch"], rel=1e-4)
        torch.testing.assert_close(r["steps_sigmas"], grid.sigmas, rtol=1e-4, atol=1e-6)
    assert one["pool_loss"][-1] != one["pool_loss"][0]  # the σ's moved


def test_gradients_averaged_over_ranks_are_the_full_batch_gradient(gloo_results):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    target = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    torch.nn.functional.mse_loss(net(x), target).backward()
    for r in gloo_results:
        for g, p in zip(r["averaged"], net.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_shards_deal_whole_batches_round_robin():
    """Rank r takes batches r, r + W, …: every batch is the one a single process runs (bit-identical kernels)."""
    assert dist.shard(list(range(5)), block=2) == [0, 1, 2, 3, 4]  # one process: everything
    parts = [dist.shard_indices(11, 3, of_rank=r, world=2) for r in range(2)]
    assert parts == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10]]


# ------------------------------------------------------------------------------ the command line under torchrun
def test_torchrun_sample_writes_the_bytes_one_process_writes(tiny_model_dir, tmp_path):
    args = ["sample", "--model", str(tiny_model_dir), "--sampler", "dpmpp_2m_sde", "--steps", "3", "--seeds", "0-6",
            "--batch-size", "2",
            "--quiet"]
    one = one_process(*args, "--outdir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--outdir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    pngs = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(pngs) == 7 and pngs == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for name in pngs:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert two.stdout.count("7 images") == 1  # rank 0 alone reports


@pytest.fixture
def tiny_mnist(tmp_path):
    imgs = torch.randint(0, 256, (32, 28, 28), generator=torch.Generator().manual_seed(0)).numpy()
    write_idx(tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz", imgs)
    return tmp_path / "data"


def train_args(data: Path, out: Path, steps: int) -> list[str]:
    return ["train", "ddpm", "--dataset", "mnist", "--data-dir", str(data), "--out", str(out), "--steps", str(steps),
            "--channels", "8,16", "--attention-levels", "none", "--batch-size", "8", "--num-grid", "0",
            "--warmup-steps", "0", "--no-progress"]


def test_torchrun_training_follows_the_one_process_run(tiny_mnist, tmp_path):
    from safetensors.torch import load_file

    one = one_process(*train_args(tiny_mnist, tmp_path / "one", 3))
    assert one.returncode == 0, one.stderr
    two = torchrun(*train_args(tiny_mnist, tmp_path / "two", 3))
    assert two.returncode == 0, two.stderr
    a, b = load_file(tmp_path / "one" / "checkpoint.safetensors"), load_file(tmp_path / "two" / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k  # data order and random states: the same global stream
    assert (tmp_path / "two" / "card.json").is_file() and two.stdout.count("finished at step 3") == 1


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the worker processes")
def test_a_killed_rank_stops_every_rank_and_the_run_resumes(tiny_mnist, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diffsamp",
           *train_args(tiny_mnist, run, 100000), "--ckpt-every", "5"]
    agent = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.safetensors").is_file() and time.time() < deadline and agent.poll() is None:
            time.sleep(0.2)
        assert (run / "checkpoint.safetensors").is_file(), agent.communicate()[1]
        workers = _children(agent.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        _, err = agent.communicate(timeout=90)  # no hang: the other rank is stopped with it
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    from diffsamp.training.checkpoint import read_checkpoint

    reached = read_checkpoint(run / "checkpoint.safetensors")[1]["step"]  # whole: written atomically by rank 0
    assert reached % 5 == 0 and reached > 0
    resumed = one_process(*train_args(tiny_mnist, run, reached + 3), "--resume")  # with fewer ranks
    assert resumed.returncode == 0, resumed.stderr
    assert f"finished at step {reached + 3}" in resumed.stdout


def test_torchrun_reflow_pairs_writes_the_shards_one_process_writes(tiny_model_dir, tmp_path):
    args = ["reflow", "pairs", "--model", str(tiny_model_dir), "--sampler", "euler", "--steps", "2", "-n", "9",
            "--shard-size", "3", "--batch-size", "3", "--no-progress"]
    one = one_process(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = torchrun(*args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    assert "9/9 pairs" in two.stdout and two.stdout.count("pairs in") == 1
    from safetensors import safe_open

    for i in range(3):  # the same tensors and metadata (safetensors orders its metadata map anew in each process)
        files = [safe_open(str(tmp_path / w / f"shard-{i:05d}.safetensors"), "pt") for w in ("one", "two")]
        assert files[0].metadata() == files[1].metadata() and files[0].keys() == files[1].keys()
        for k in files[0].keys():
            assert torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)), (i, k)


def test_every_rank_waits_for_the_others_when_a_command_succeeds(monkeypatch):
    """Under torchrun a rank that is done must not leave the process group while rank 0 still writes its files
    (a peer torn down mid-write ended a CI run with SIGABRT): the command group ends with a barrier, on success
    only (a failed rank leaves at once and the others see it in their next collective)."""
    from click.testing import CliRunner

    from diffsamp import dist
    from diffsamp.cli import main

    calls = []
    monkeypatch.setattr(dist, "barrier", lambda: calls.append(1))
    assert CliRunner().invoke(main, ["schedules"]).exit_code == 0
    assert calls == [1]
    assert CliRunner().invoke(main, ["samplers", "no-such-sampler"]).exit_code != 0
    assert calls == [1]
