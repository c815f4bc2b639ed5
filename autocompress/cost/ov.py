"""OpenVINO from an ONNX file: compiled CPU models, and the share of a run its profiler puts in each kind of op.

OpenVINO reads ONNX files itself (`Core.read_model`), the float file and ONNX Runtime's QDQ int8 file alike: it
turns each QuantizeLinear -> DequantizeLinear pair into a FakeQuantize and its low-precision transformations run
the convolutions, matrix products, ... between them as int8 kernels. So the openvino runtimes (cost/runtimes.py)
run the very files the onnxruntime ones do, with OpenVINO's kernels. Float ops run at f32
(`INFERENCE_PRECISION_HINT`): OpenVINO's default on a CPU with bf16 or fp16 units is that precision, which is
another model than the one judged.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

PRECISION = "f32"
LAYOUT_OPS = ("Reorder",)  # OpenVINO's conversions between the plain and its blocked (nChw16c, ...) layouts
# float <-> int8 where a QDQ graph's int8 ops end: a FakeQuantize quantizes, Convert -> Subtract -> Multiply
# dequantize (fused into the int8 kernel before them where OpenVINO can: they are then not run)
CONVERSION_OPS = ("FakeQuantize", "Convert", "Subtract", "Multiply")


@functools.cache
def _core():  # one per process: OpenVINO loads its plugins once
    import openvino

    return openvino.Core()


def read(model: "bytes | str"):
    """An openvino.Model of an ONNX file (bytes or path) or an IR file (path of its .xml)."""
    return _core().read_model(model=model)


def compiled(model: "bytes | str", threads: int | None = None, profile: bool = False, shape: tuple | None = None):
    """The file `model` (bytes or path, see `read`) compiled for the CPU with `threads` inference threads (None:
    torch's count) and the latency hint, f32 (see the module docstring); `shape`: the input made static (what a
    deployment of batch-1 inference compiles); `profile`: per-node performance counters on."""
    model = read(model)
    if shape is not None:
        model.reshape({model.inputs[0].get_any_name(): list(shape)})
    config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": PRECISION}
    if profile:
        config["PERF_COUNT"] = True
    return _core().compile_model(model, "CPU", config)


def save_ir(model: bytes, xml: "str | object") -> list[Path]:
    """The ONNX file `model` as OpenVINO's IR, `xml` and the .bin beside it (returned), weights as the file holds
    them (no fp16 compression: the weights judged). Compile it with INFERENCE_PRECISION_HINT f32 to run what was
    judged (`compiled` does; the IR does not carry the hint)."""
    import openvino

    openvino.save_model(read(model), str(xml), compress_to_fp16=False)
    return [Path(xml), Path(xml).with_suffix(".bin")]


class OvModule(nn.Module):
    """A compiled OpenVINO model behind the nn.Module call convention (a tensor in, the first output back as a
    tensor), compiled once per input shape with that shape static, as a deployment compiles it."""

    def __init__(self, model: "bytes | str", threads: int | None = None):
        super().__init__()
        from openvino import Tensor

        self.model, self.threads, self.requests, self.tensor = model, threads, {}, Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(x.shape)
        if shape not in self.requests:
            self.requests[shape] = compiled(self.model, self.threads, shape=shape).create_infer_request()
        request = self.requests[shape]  # the input shared, not copied: the cheapest call of its Python API
        request.set_input_tensor(self.tensor(np.ascontiguousarray(x.detach().cpu().numpy()), shared_memory=True))
        request.infer()
        return torch.from_numpy(request.get_output_tensor(0).data.copy())


class BoundOv(nn.Module):
    """An infer request whose input tensor is set once (shared with a fixed array): a call runs the graph and
    nothing else, which is how calibration times one kernel."""

    def __init__(self, model: bytes, example: "torch.Tensor | np.ndarray", threads: int | None = None):
        super().__init__()
        import openvino

        self.input = np.ascontiguousarray(example.detach().cpu().numpy() if isinstance(example, torch.Tensor)
                                          else example)
        self.request = compiled(model, threads, shape=self.input.shape).create_infer_request()
        self.request.set_input_tensor(openvino.Tensor(self.input, shared_memory=True))

    def forward(self, x=None) -> None:  # the bound input is the example: x only says "run"
        self.request.infer()


def op_share(model: bytes, example: "torch.Tensor | np.ndarray", ops: tuple[str, ...], threads: int | None = None,
             runs: int = 20) -> float:
    """The share of a graph's node time OpenVINO spends in the node types `ops`, from its performance counters
    summed over `runs` runs (see cost/ort.py's `op_share` for why a kernel timed alone is charged without them)."""
    array = example.detach().cpu().numpy() if isinstance(example, torch.Tensor) else example
    request = compiled(model, threads, profile=True, shape=array.shape).create_infer_request()
    request.infer({0: array})
    total = chosen = 0.0
    for _ in range(runs):
        request.infer({0: array})
        for node in request.get_profiling_info():
            us = node.real_time.total_seconds()
            total += us
            chosen += us if node.node_type in ops else 0.0
    return chosen / total if total else 0.0


def conversion_timing(x: torch.Tensor, kind: str, threads: int | None = None) -> tuple[nn.Module, float]:
    """(bound graph, share of its time that is the conversion) of one float <-> int8 conversion of a tensor
    like `x` in OpenVINO: a QuantizeLinear of a float input (a FakeQuantize, then a Convert to uint8) or a
    DequantizeLinear of a uint8 input (Convert, Subtract, Multiply). A Q -> DQ pair, as ONNX Runtime's
    conversions are timed, would be folded into one FakeQuantize here, which is neither."""
    from .ort import conversion_graph

    op = "QuantizeLinear" if kind == "quantize" else "DequantizeLinear"
    model = conversion_graph(tuple(x.shape), (op,), stored="UINT8")
    example = x.numpy() if kind == "quantize" else np.full(tuple(x.shape), 130, np.uint8)
    return BoundOv(model, example, threads), 1.0 - op_share(model, example, LAYOUT_OPS, threads)
