"""Faster network calls on a GPU, each keeping the σ-space denoiser around the network: ``torch.compile`` of the
network (``compile_denoiser``), replay of the network call from CUDA graphs (``cuda_graph_denoiser``) and
channels-last convolution weights (``channels_last``).

All three act on ``model.network`` only, so the σ-space conversions, guidance and the samplers run unchanged, and the
noise is still drawn from each seed's CPU generator (``diffsamp.api.generate``): images on a GPU equal the CPU's
within float tolerance. ``compile_denoiser`` and ``cuda_graph_denoiser`` return a new model and leave the given one
(and its network module) as it was: the new model's network is a shallow copy of the module (the same weights and
submodules, so its type, config and ``feature_module`` stay) whose call alone is replaced, through the slot that
``nn.Module.compile`` uses. Apply them to a model before its conditions are bound (as ``diffsamp sample`` does, right
after loading); a conditional model's conditions stay inputs of the network call, so one graph serves every batch.

CUDA graphs (``torch.cuda.CUDAGraph``): per static signature of the call (the shape, dtype and device of every tensor
argument, the other arguments' values, inference mode and autocast), the network is warmed up on a side stream,
captured once, and replayed afterwards with the arguments copied into the captured input buffers and the outputs
copied out (a sampler may keep an output while the next call replays). The plain call runs instead where a replay
could differ from it: with autograd on, with forward hooks on any of the network's modules (AMED's feature reader,
timing meters), or for arguments off the GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from diffsamp.models.base import Denoiser, Wrapper

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------------------------------------- helpers
def _network_of(model: Denoiser, what: str) -> nn.Module:
    """The model's trained network; a ValueError for a model without one (closed-form models)."""
    net = model.network
    if not isinstance(net, nn.Module):
        raise ValueError(f"{type(model).__name__} has no network to {what} (a closed-form model)")
    return net


def _replace_network(model: Denoiser, make: Callable[[nn.Module], nn.Module]) -> Denoiser:
    """A copy of ``model`` (its wrappers copied too, as ``conditioning.bind`` does) whose network is
    ``make(network)``; ``model`` itself is left as it was."""
    if isinstance(model, Wrapper):
        outer = copy.copy(model)
        outer.inner = _replace_network(model.inner, make)
        return outer
    out = copy.copy(model)
    out.network = make(model.network)  # type: ignore[misc]
    return out


def _call_of(net: nn.Module) -> Callable[..., Any]:
    """What calling ``net`` runs: its compiled call if it was compiled, else the module's own call (hooks included)."""
    return net._compiled_call_impl or net._call_impl  # type: ignore[return-value]


def compile_unavailable(device: torch.device | str | None = None, backend: str = "inductor") -> str | None:
    """Why ``torch.compile`` cannot run here with ``backend`` for a model on ``device`` (None when it can): too old a
    torch, an unsupported Python, no Triton for inductor on a CUDA device, no C++ compiler for inductor on the CPU."""
    if not hasattr(torch, "compile") or not hasattr(nn.Module, "compile"):
        return f"torch {torch.__version__} has no torch.compile for modules (it needs torch ≥ 2.2)"
    try:
        from torch import _dynamo
    except Exception as exc:  # noqa: BLE001 - any import failure means: no compiler here
        return f"torch.compile is unavailable ({type(exc).__name__}: {exc})"
    if not _dynamo.is_dynamo_supported():
        return (f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} "
                f"with torch {torch.__version__}")
    kind = torch.device(device).type if device is not None else "cpu"
    if backend == "inductor" and kind == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile's inductor backend needs Triton on a CUDA device (pip install triton)"
    if backend == "inductor" and kind == "cpu" and not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        return "torch.compile's inductor backend needs a C++ compiler (g++ or clang++) for a model on the CPU"
    return None


# ---------------------------------------------------------------------------------------------- torch.compile
def compile_denoiser(model: Denoiser, mode: str = "default", *, backend: str = "inductor",
                     dynamic: bool | None = None) -> Denoiser:
    """``model`` with its network run through ``torch.compile(mode=mode, backend=backend, dynamic=dynamic)``
    (``nn.Module.compile``); the σ-space wrapper around it stays eager.

    Compilation happens at the first call of each new input signature (a new batch size recompiles, or compiles a
    dynamic-shape graph), which on the CPU takes about a minute even for a small UNet. ``mode`` only applies to
    the inductor backend; "reduce-overhead" captures CUDA graphs of its own (do not combine it with
    ``cuda_graph_denoiser``).
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown torch.compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"torch.compile mode {mode!r} applies to the inductor backend only, not {backend!r}")
    _network_of(model, "compile")
    why = compile_unavailable(model.device, backend)
    if why is not None:
        raise ValueError(f"cannot compile the network: {why}")
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
    if backend == "inductor":
        options["mode"] = mode

    def make(net: nn.Module) -> nn.Module:
        out = copy.copy(net)  # the same weights and submodules; only this copy's call is compiled
        out.compile(**options)
        return out

    return _replace_network(model, make)


# ---------------------------------------------------------------------------------------------- CUDA graphs
def _autocast_state() -> tuple[bool, torch.dtype | None]:
    """Whether CUDA autocast is on, and its dtype (part of a graph's signature: a capture bakes it in)."""
    try:
        on = torch.is_autocast_enabled("cuda")
        return on, torch.get_autocast_dtype("cuda") if on else None
    except TypeError:  # torch < 2.4: the CUDA-only forms
        on = torch.is_autocast_enabled()
        return on, torch.get_autocast_gpu_dtype() if on else None


class _Graph:
    """One captured network call: its input buffers (the flattened arguments), the graph and its outputs."""

    def __init__(self, inputs: list[Any], graph: torch.cuda.CUDAGraph, outputs: list[Any], out_spec: Any) -> None:
        self.inputs, self.graph, self.outputs, self.out_spec = inputs, graph, outputs, out_spec

    def replay(self, leaves: list[Any]) -> Any:
        """Copy the arguments into the input buffers, replay, and return copies of the outputs."""
        for buf, leaf in zip(self.inputs, leaves):
            if isinstance(buf, Tensor):
                buf.copy_(leaf)
        self.graph.replay()
        return tree_unflatten([o.clone() if isinstance(o, Tensor) else o for o in self.outputs], self.out_spec)


class GraphedCall:
    """A network's call replayed from CUDA graphs, one per static signature of its arguments (PyTorch's "whole
    network capture": warm-up on a side stream, capture, replay with copies into static input buffers). All graphs
    share one memory pool. After a failed capture it warns once and runs the plain call from then on."""

    def __init__(self, net: nn.Module, call: Callable[..., Any], warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"CUDA-graph capture needs at least one warm-up call, got warmup={warmup}")
        self.call, self.warmup = call, warmup
        self.modules = list(net.modules())
        self.graphs: dict[Any, _Graph] = {}
        self.failed: str | None = None
        self.pool: Any = None

    def hooked(self) -> bool:
        """Whether forward hooks would run in the call (a replay would skip them)."""
        from torch.nn.modules import module as torch_module

        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    @staticmethod
    def signature(leaves: list[Any], spec: Any) -> Any:
        """The key of a call's graph, or None where it cannot be replayed (no tensor, a tensor off the GPU, an
        argument that cannot be part of a key)."""
        parts: list[Any] = []
        for leaf in leaves:
            if isinstance(leaf, Tensor):
                if leaf.device.type != "cuda":
                    return None
                parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
            else:
                parts.append(("value", leaf))
        if not any(isinstance(leaf, Tensor) for leaf in leaves):
            return None
        key = (spec, tuple(parts), torch.is_inference_mode_enabled(), _autocast_state())
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None or torch.is_grad_enabled() or self.hooked():
            return self.call(*args, **kwargs)
        leaves, spec = tree_flatten((args, kwargs))
        key = self.signature(leaves, spec)
        if key is None:
            return self.call(*args, **kwargs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.capture(leaves, spec)
            if graph is None:
                return self.call(*args, **kwargs)
            self.graphs[key] = graph
        return graph.replay(leaves)

    def capture(self, leaves: list[Any], spec: Any) -> _Graph | None:
        """Warm up and capture the call on copies of ``leaves`` (None, with one warning, if capture fails)."""
        inputs = [leaf.clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        args, kwargs = tree_unflatten(inputs, spec)
        device = next(leaf.device for leaf in leaves if isinstance(leaf, Tensor))
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy initialisation, cuDNN's choices and allocations happen here
                for _ in range(self.warmup):
                    self.call(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            try:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self.call(*args, **kwargs)
                outputs, out_spec = tree_flatten(out)
                if not any(isinstance(o, Tensor) for o in outputs):
                    raise TypeError(f"the network returned a {type(out).__name__} without tensors to copy out")
            except Exception as exc:  # noqa: BLE001 - anything the capture refuses: run the plain call
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                self.failed = f"{type(exc).__name__}: {first}"
                warnings.warn(f"CUDA-graph capture of the network failed ({self.failed}); running the plain call",
                              RuntimeWarning, stacklevel=2)
                return None
        return _Graph(inputs, graph, outputs, out_spec)


class CUDAGraphDenoiser(Wrapper):
    """A denoiser whose network call is replayed from CUDA graphs (``cuda_graph_denoiser``); every attribute of the
    model is forwarded. ``graphed`` is the replaying call (None where the model is not on a CUDA device);
    ``fallback`` says why the plain call runs instead (None while graphs are used)."""

    def __init__(self, inner: Denoiser, graphed: GraphedCall | None, reason: str | None = None) -> None:
        super().__init__(inner)
        self.graphed = graphed
        self._reason = reason

    @property
    def fallback(self) -> str | None:
        """Why the plain network call runs (not on CUDA, or a failed capture), None while graphs are used."""
        if self.graphed is not None and self.graphed.failed is not None:
            return f"capture failed ({self.graphed.failed})"
        return self._reason

    @property
    def captured(self) -> int:
        """How many graphs (input signatures) have been captured so far."""
        return len(self.graphed.graphs) if self.graphed is not None else 0


def cuda_graph_denoiser(model: Denoiser, *, warmup: int = 3) -> CUDAGraphDenoiser:
    """``model`` with its network call replayed from CUDA graphs (``torch.cuda.CUDAGraph``), one per static input
    shape and dtype, captured at the first call of each after ``warmup`` calls on a side stream.

    On a model that is not on a CUDA device or has no network (a closed-form model), or once a capture fails, the
    plain call runs, with one ``warnings.warn`` line saying so. The replay removes the per-kernel launch cost of the network (most of the
    time of a small UNet at small batches), not the samplers' own work around it."""
    try:
        net = _network_of(model, "capture")
        reason = None if model.device.type == "cuda" else f"the model is on {model.device}, not a CUDA device"
    except ValueError as exc:  # a closed-form model: nothing to capture
        net, reason = None, str(exc)
    if reason is not None:
        warnings.warn(f"CUDA graphs skipped: {reason}; running the plain network call", RuntimeWarning, stacklevel=2)
        return CUDAGraphDenoiser(model, None, reason)
    if not hasattr(net, "_compiled_call_impl"):
        reason = f"torch {torch.__version__} has no call slot to replay a module from"
        warnings.warn(f"CUDA graphs skipped: {reason}; running the plain network call", RuntimeWarning, stacklevel=2)
        return CUDAGraphDenoiser(model, None, reason)
    holder: dict[str, GraphedCall] = {}

    def make(network: nn.Module) -> nn.Module:
        out = copy.copy(network)  # the same weights and submodules; only this copy's call replays graphs
        holder["graphed"] = out._compiled_call_impl = GraphedCall(network, _call_of(out), warmup)
        return out

    return CUDAGraphDenoiser(_replace_network(model, make), holder["graphed"])


# ---------------------------------------------------------------------------------------------- channels-last
def channels_last(model: Denoiser) -> Denoiser:
    """The network's 4-D weights in channels-last (NHWC) memory format, in place, where the model is on a CUDA
    device: its convolutions then run on cuDNN's NHWC kernels (tensor cores without layout transposes) and their
    outputs stay channels-last. Elsewhere, or without 2-D convolutions, a no-op with one warning line saying why.
    Returns ``model``."""
    net = _network_of(model, "convert to channels-last")
    if model.device.type != "cuda":
        warnings.warn(f"channels-last skipped: the model is on {model.device}, not a CUDA device", RuntimeWarning,
                      stacklevel=2)
        return model
    if not any(isinstance(m, nn.Conv2d) for m in net.modules()):
        warnings.warn(f"channels-last skipped: the {type(net).__name__} has no 2-D convolutions", RuntimeWarning,
                      stacklevel=2)
        return model
    net.to(memory_format=torch.channels_last)
    return model
