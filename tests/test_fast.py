"""The GPU fast path (``diffsamp.models.fast``): torch.compile of the network gives the eager samples, CUDA graphs fall
back to the plain call (with one warning) off CUDA and replay the same samples on it, the ``sample`` command's
--compile/--cuda-graphs are accepted and recorded, and images on a GPU equal the CPU's within float tolerance."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten

import diffsamp
from diffsamp.models import load
from diffsamp.models.base import ClampDenoiser, Denoiser, unwrap
from diffsamp.models.fast import (
    CUDAGraphDenoiser,
    GraphedCall,
    channels_last,
    compile_denoiser,
    compile_unavailable,
    cuda_graph_denoiser,
)
from tests.conftest import assert_one_line_error, run_sample

pytestmark = pytest.mark.usefixtures("one_thread")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SHAPE = (1, 8, 8)


def samples(model: Denoiser, seeds=range(5), batch_size: int = 3, **kw) -> torch.Tensor:
    return diffsamp.generate(model, SHAPE, sampler="heun", steps=3, seeds=seeds, batch_size=batch_size, **kw).images


@pytest.fixture
def tiny(tiny_model_dir) -> Denoiser:
    return load(str(tiny_model_dir))


@pytest.fixture
def no_tf32():
    """No TF32 on the GPU (restored afterwards), so its float32 images compare with the CPU's at float32 tolerance."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.skipif(compile_unavailable(backend="eager") is not None,
                    reason=f"torch.compile cannot run here: {compile_unavailable(backend='eager')}")
def test_compiled_network_gives_the_eager_samples(tiny):
    """Dynamo traces the network (the eager backend: no code generation, seconds on the CPU); the σ-space model
    around it, the given model and its network module stay as they were."""
    eager = samples(tiny)
    fast = compile_denoiser(ClampDenoiser(tiny), mode="default", backend="eager")
    net, compiled = unwrap(tiny).network, unwrap(fast).network
    assert compiled is not net and type(compiled) is type(net)  # a copy of the module: config, class checks stay
    assert compiled._compiled_call_impl is not None and net._compiled_call_impl is None
    assert unwrap(fast) is not tiny and unwrap(tiny).network is net
    assert next(compiled.parameters()) is next(net.parameters())  # the same weights, not a copy
    assert fast.sample_shape == tiny.sample_shape and fast.feature_module is tiny.feature_module
    assert torch.equal(samples(fast), samples(ClampDenoiser(tiny)))
    assert torch.equal(samples(tiny), eager)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="inductor's first compile of even a tiny UNet takes over 60 s on a CPU (a C++ build); "
                           "the eager-backend test covers the wrapper there, this runs where CUDA exists")
def test_inductor_compiled_network_matches_eager_on_cuda(tiny_model_dir, no_tf32):
    model = load(str(tiny_model_dir), device="cuda")
    fast = compile_denoiser(model)
    torch.testing.assert_close(samples(fast), samples(model), atol=1e-4, rtol=1e-4)


def test_compile_errors_are_one_line(tiny, gaussian):
    with pytest.raises(ValueError, match="unknown torch.compile mode 'fastest'"):
        compile_denoiser(tiny, mode="fastest")
    with pytest.raises(ValueError, match="inductor backend only"):
        compile_denoiser(tiny, mode="max-autotune", backend="eager")
    with pytest.raises(ValueError, match="no network to compile"):
        compile_denoiser(gaussian, backend="eager")


# ---------------------------------------------------------------------------------------------- CUDA graphs
def test_cuda_graphs_fall_back_on_the_cpu_with_one_warning(tiny):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = cuda_graph_denoiser(tiny)
        out = samples(fast)
    messages = [str(w.message) for w in caught]
    assert messages == ["CUDA graphs skipped: the model is on cpu, not a CUDA device; running the plain network call"]
    assert isinstance(fast, CUDAGraphDenoiser) and isinstance(fast, Denoiser)
    assert fast.fallback == "the model is on cpu, not a CUDA device" and fast.captured == 0
    for name in ("sigma_min", "sigma_max", "prior", "source", "sample_shape", "device", "dtype", "clip_sample",
                 "network", "feature_module", "conditioning", "codec"):
        assert getattr(fast, name) is getattr(tiny, name) or getattr(fast, name) == getattr(tiny, name), name
    assert torch.equal(out, samples(tiny))


def test_graphed_call_runs_the_plain_call_where_a_replay_could_differ(tiny):
    """No capture is attempted for arguments off the GPU, with autograd on, or while a forward hook is registered
    (AMED's feature reader, timing meters): a replay would skip the hook."""
    net = unwrap(tiny).network
    calls = []
    graphed = GraphedCall(net, lambda *a, **k: calls.append(a) or net(*a, **k))
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 10.0)
    leaves, spec = tree_flatten(((x, t), {"class_labels": None}))
    assert GraphedCall.signature(leaves, spec) is None  # CPU tensors
    assert not graphed.hooked()
    handle = net.mid_block.register_forward_hook(lambda *_: None)
    try:
        assert graphed.hooked()
    finally:
        handle.remove()
    assert not graphed.hooked()
    with torch.inference_mode():
        out = graphed(x, t).sample
    assert len(calls) == 1 and not graphed.graphs and torch.equal(out, net(x, t).sample)
    with pytest.raises(ValueError, match="at least one warm-up"):
        GraphedCall(net, net, warmup=0)


def test_channels_last_is_a_no_op_off_cuda(tiny, gaussian):
    with pytest.warns(RuntimeWarning, match="channels-last skipped: the model is on cpu"):
        assert channels_last(tiny) is tiny
    assert all(p.is_contiguous() for p in unwrap(tiny).network.parameters())
    with pytest.raises(ValueError, match="no network"):
        channels_last(gaussian)


@needs_cuda
def test_cuda_graphs_replay_the_eager_samples(tiny_model_dir):
    """Two batch shapes (3 and the last 2): two graphs, reused over the steps; the samples equal the eager GPU run's.
    With a forward hook on the bottleneck the plain call runs, so the hook sees every evaluation."""
    model = load(str(tiny_model_dir), device="cuda")
    fast = cuda_graph_denoiser(model)
    eager, graphed = samples(model), samples(fast)
    assert fast.fallback is None and fast.captured == 2
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(samples(fast), eager, atol=1e-5, rtol=1e-5)  # replays only
    assert fast.captured == 2
    seen = []
    handle = fast.feature_module.register_forward_hook(lambda *_: seen.append(1))
    try:
        hooked = samples(fast)
    finally:
        handle.remove()
    assert len(seen) == 2 * 5  # heun on 3 steps: NFE 5, two batches
    torch.testing.assert_close(hooked, eager, atol=1e-5, rtol=1e-5)


@needs_cuda
def test_cuda_graphs_over_a_compiled_network_on_cuda(tiny_model_dir, no_tf32):
    model = load(str(tiny_model_dir), device="cuda")
    fast = cuda_graph_denoiser(compile_denoiser(model))
    torch.testing.assert_close(samples(fast), samples(model), atol=1e-4, rtol=1e-4)
    assert fast.fallback is None and fast.captured == 2


@needs_cuda
def test_gpu_images_equal_the_cpu_images(tiny_model_dir, no_tf32):
    """The noise comes from each seed's CPU generator, so the device only changes float rounding."""
    cpu = samples(load(str(tiny_model_dir)))
    gpu_model = load(str(tiny_model_dir), device="cuda")
    torch.testing.assert_close(samples(gpu_model), cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(samples(cuda_graph_denoiser(gpu_model)), cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(samples(channels_last(load(str(tiny_model_dir), device="cuda"))), cpu,
                               atol=1e-4, rtol=1e-4)
    stochastic = dict(sampler="euler_maruyama")
    torch.testing.assert_close(diffsamp.generate(gpu_model, SHAPE, steps=4, seeds=range(3), **stochastic).images,
                               diffsamp.generate(load(str(tiny_model_dir)), SHAPE, steps=4, seeds=range(3),
                                                 **stochastic).images, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- the CLI
def test_sample_accepts_and_records_the_fast_flags(tiny_model_dir, tmp_path, monkeypatch):
    from diffsamp.models import fast as fast_module

    compiled = []
    real = fast_module.compile_denoiser

    def eager_backend(model, mode="default", **kw):  # noqa: ANN001, ANN202 - Dynamo without code generation
        compiled.append(mode)
        return real(model, mode, backend="eager")

    monkeypatch.setattr(fast_module, "compile_denoiser", eager_backend)
    res = run_sample(tiny_model_dir, "--device", "cpu", "--compile", "--cuda-graphs", "--outdir", str(tmp_path / "a"))
    assert res.exit_code == 0, res.output
    assert compiled == ["default"]
    assert "warning: --cuda-graphs skipped: CUDA graphs need a CUDA device, not cpu" in res.output
    record = json.loads((tmp_path / "a" / "config.json").read_text())
    assert record["compile"] is True and record["cuda_graphs"] is True
    res = run_sample(tiny_model_dir, "--device", "cpu", "--outdir", str(tmp_path / "b"))
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "b" / "config.json").read_text())
    assert record["compile"] is False and record["cuda_graphs"] is False
    for seed in range(4):  # the same images with and without the flags
        name = f"{seed:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    res = run_sample(tiny_model_dir, "--device", "cpu", "--cuda-graphs", "--out", str(tmp_path / "g.png"))
    assert res.exit_code == 0, res.output
    from PIL import Image

    meta = json.loads(Image.open(tmp_path / "g.png").text["diffsamp"])
    assert meta["compile"] is False and meta["cuda_graphs"] is True


def test_sample_compile_unavailable_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch):
    from diffsamp.models import fast as fast_module

    monkeypatch.setattr(fast_module, "compile_unavailable", lambda *a, **k: "no compiler in this test")
    res = run_sample(tiny_model_dir, "--device", "cpu", "--compile", "--out", str(tmp_path / "a.png"))
    assert_one_line_error(res, 2, "--compile", "cannot compile the network: no compiler in this test")
    assert not (tmp_path / "a.png").exists()
