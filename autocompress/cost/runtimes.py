"""The runtimes a model is timed and deployed in: what "latency" means is the kernels of one runtime.

    torch        eager PyTorch: every module call runs its own kernel, with Python's dispatch around it
    torch-int8   eager PyTorch with torch.ao's x86 int8 kernels for the layers held at 8 bits or fewer, and the
                 ops around them FX quantizes (cost/quantized.py); float elsewhere, converting at the edges
    onnxruntime  the model exported to ONNX (TorchScript exporter) and run by an ONNX Runtime CPU session: BatchNorm
                 folded, Conv+activation fused, one session call per inference

A profile names its runtime (`HardwareProfile.runtime`); calibration times its kernels there and measurement
times the model there, so the estimate, `run --measure` and the exported file speak of the same kernels.
`runnable(model, example, runtime, threads)` gives a module whose call runs `model` in that runtime.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from ..compress.quantize import synthesize_inputs
from ..errors import AutocompressError, one_of
from .quantized import RANGES, kept_float, observe_ranges, runnable_int8

RUNTIMES = ("torch", "torch-int8", "onnxruntime")
INT8_RUNTIMES = ("torch-int8",)  # the runtimes whose outputs for 8-bit layers are int8 kernels' outputs


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise one_of("runtime", runtime, RUNTIMES)
    return runtime


def onnx_bytes(model: nn.Module, example: torch.Tensor, **options) -> bytes:
    """`model` as an ONNX file's bytes, batch dimension dynamic (the exporter's warnings silenced, and the graph
    it prints to stdout when it fails: the exception says what failed)."""
    buffer = io.BytesIO()
    # The TorchScript-based exporter (dynamo=False) needs no extra package; the dynamo one needs onnxscript.
    with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, **options)
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet_stdout():
    """File descriptor 1 sent to /dev/null inside the block: the exporter's C++ side prints there."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def ort_session(model: "bytes | str", threads: int | None = None, profile_to: str | None = None):
    """An ONNX Runtime CPU session of an ONNX file (bytes or path) with `threads` intra-op threads (None: torch's
    count, the one the torch runtime would use) and one inter-op thread: ops run in turn, as in eager PyTorch.
    `profile_to`: a file prefix for ONNX Runtime's profiler (one record per node run)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if profile_to:
        options.enable_profiling, options.profile_file_prefix = True, profile_to
    return onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                        providers=["CPUExecutionProvider"])


LAYOUT_OPS = ("ReorderInput", "ReorderOutput")  # ONNX Runtime's conversions to and from its NCHWc conv layout


def layout_share(model: bytes, example: torch.Tensor, threads: int | None = None, runs: int = 20) -> float:
    """The share of a graph's node time that ONNX Runtime spends converting to and from the blocked layout
    (NCHWc) its CPU convolutions work in, from its profiler over `runs` runs. A model converts at its ends
    only, so a kernel timed alone, which converts its input and every output, is charged without them."""
    with tempfile.TemporaryDirectory() as folder:
        session = ort_session(model, threads, profile_to=os.path.join(folder, "run"))
        feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
        for _ in range(runs + 2):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes)
    layout = sum(e["dur"] for e in nodes if e.get("args", {}).get("op_name") in LAYOUT_OPS)
    return layout / total if total else 0.0


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the nn.Module call convention: `accuracy` judges it and
    `measure_latency_ms` times it like any module (a tensor in, the first output back as a tensor)."""

    def __init__(self, model: "bytes | str", threads: int | None = None):
        super().__init__()
        self.session = ort_session(model, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0])


class BoundOrt(nn.Module):
    """A session whose input and outputs are bound once to fixed buffers (ONNX Runtime's I/O binding): a call
    runs the graph and nothing else, no conversion or copy, which is how calibration times one kernel."""

    def __init__(self, model: bytes, example: torch.Tensor, threads: int | None = None):
        super().__init__()
        self.session = ort_session(model, threads)
        self.input = np.ascontiguousarray(example.detach().cpu().numpy())
        self.outputs = [np.empty(out.shape, np.float32) for out in self.session.run(None, {"input": self.input})]
        self.binding = self.session.io_binding()
        self.binding.bind_input("input", "cpu", 0, np.float32, self.input.shape, self.input.ctypes.data)
        for meta, out in zip(self.session.get_outputs(), self.outputs):
            self.binding.bind_output(meta.name, "cpu", 0, np.float32, out.shape, out.ctypes.data)

    def forward(self, x: torch.Tensor) -> None:  # the bound input is the example: x only says "run"
        self.session.run_with_iobinding(self.binding)


def runnable(model: nn.Module, example: torch.Tensor, runtime: str, threads: int | None = None) -> nn.Module:
    """A module whose call runs `model` in `runtime` (torch: the module itself, in eval mode)."""
    if check_runtime(runtime) == "torch":
        return model.eval()
    if runtime == "torch-int8":
        return runnable_int8(model, example)
    return OrtModule(onnx_bytes(model.eval(), example), threads)


def prepare_as_run(model: nn.Module, example: torch.Tensor, runtime: str, calibration=None) -> None:
    """Before `model` is judged for `runtime`: what the runtime derives from data, kept in the model. torch-int8:
    the activation ranges of its int8 conversion, observed on `calibration` input batches (None: inputs
    synthesized from the BatchNorm statistics); the float runtimes derive nothing."""
    if runtime not in INT8_RUNTIMES or kept_float(model) is None:
        return
    if calibration is None:
        with torch.enable_grad():
            calibration = [synthesize_inputs(model, example)]
    observe_ranges(model, example, calibration)


def as_run(model: nn.Module, example: torch.Tensor, runtime: str) -> nn.Module:
    """The module whose outputs `runtime` computes for `model`, the one its accuracy is judged on: torch-int8 runs
    the int8 conversion of its 8-bit layers (with the ranges `prepare_as_run` kept); the float runtimes compute the
    module's own outputs (ONNX Runtime's agree to float rounding), so it is the module itself."""
    if runtime not in INT8_RUNTIMES or kept_float(model) is None:
        return model.eval()
    if RANGES not in model._buffers:
        raise AutocompressError(f"this model's 8-bit layers have no int8 activation ranges, so what {runtime} "
                                f"computes is not known; judge it first (its evaluator calibrates them)")
    return runnable_int8(model, example)
