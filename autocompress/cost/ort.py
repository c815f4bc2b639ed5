"""ONNX Runtime from PyTorch: a module's ONNX file, CPU sessions of a file, and the share of a run its profiler
puts in each kind of op. The onnxruntime runtimes (cost/runtimes.py), calibration and the exports use these."""
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
    options.log_severity_level = 3  # errors only: its notices (an unused initializer removed, ...) are not the user's
    if profile_to:
        options.enable_profiling, options.profile_file_prefix = True, profile_to
    return onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                        providers=["CPUExecutionProvider"])


LAYOUT_OPS = ("ReorderInput", "ReorderOutput")  # ONNX Runtime's conversions to and from its NCHWc conv layout
CONVERSION_OPS = ("QuantizeLinear", "DequantizeLinear")  # float <-> int8, where a QDQ graph's int8 ops end


def op_share(model: bytes, example: torch.Tensor, ops: tuple[str, ...], threads: int | None = None,
             runs: int = 20) -> float:
    """The share of a graph's node time that ONNX Runtime spends in the op types `ops`, from its profiler over
    `runs` runs. A kernel timed alone is charged without what a model pays elsewhere: the conversions to and from
    the blocked layout (NCHWc) its CPU convolutions work in (`LAYOUT_OPS`, at a model's ends only) and, for an
    int8 kernel, the float <-> int8 conversions of its input and outputs (`CONVERSION_OPS`, priced on their own)."""
    with tempfile.TemporaryDirectory() as folder:
        session = ort_session(model, threads, profile_to=os.path.join(folder, "run"))
        feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
        for _ in range(runs + 2):
            session.run(None, feed)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    total = sum(e["dur"] for e in nodes)
    chosen = sum(e["dur"] for e in nodes if e.get("args", {}).get("op_name") in ops)
    return chosen / total if total else 0.0


def op_types(model: bytes) -> set[str]:
    """The op types an ONNX file's graph holds (onnx imported here: calibrating other runtimes does not need it)."""
    import onnx

    return {node.op_type for node in onnx.load_from_string(model).graph.node}


def conversion_graph(shape: tuple[int, ...], ops: tuple[str, ...] = ("QuantizeLinear", "DequantizeLinear"),
                     stored: str = "INT8") -> bytes:
    """An ONNX graph of per-tensor conversions of a tensor of `shape` between float and `stored` (INT8 or UINT8),
    in the order `ops`: by default to int8 and back, as a QDQ model converts at each edge between its int8 and
    float ops; one op alone converts one way (its input or its output then `stored`)."""
    from onnx import TensorProto, helper

    kind = getattr(TensorProto, stored)
    names = ["input", *(f"step{i}" for i in range(len(ops) - 1)), "output"]
    nodes = [helper.make_node(op, [a, "scale", "zero"], [b]) for op, a, b in zip(ops, names, names[1:])]
    dims = ["batch", *shape[1:]]
    graph = helper.make_graph(
        nodes, "conversion",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT if ops[0] == "QuantizeLinear" else kind, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT if ops[-1] == "DequantizeLinear" else kind, dims)],
        [helper.make_tensor("scale", TensorProto.FLOAT, [], [0.05]),
         helper.make_tensor("zero", kind, [], [128 if stored == "UINT8" else 0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def conversion_timing(x: torch.Tensor, kind: str, threads: int | None = None) -> tuple[nn.Module, float]:
    """(bound graph, share of its time that is the conversion) of one float <-> int8 conversion (`kind` quantize
    or dequantize) of a tensor like `x`: a QuantizeLinear -> DequantizeLinear graph and its profiler's share of
    the one sampled."""
    graph = conversion_graph(x.shape)
    op = "QuantizeLinear" if kind == "quantize" else "DequantizeLinear"
    return BoundOrt(graph, x, threads), op_share(graph, x, (op,), threads)


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
