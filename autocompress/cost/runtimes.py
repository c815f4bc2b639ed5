"""The runtimes a model is timed and deployed in: what "latency" means is the kernels of one runtime.

    torch        eager PyTorch: every module call runs its own kernel, with Python's dispatch around it
    torch-int8   eager PyTorch with torch.ao's x86 int8 kernels for the layers held at 8 bits or fewer, and the
                 ops around them FX quantizes (cost/quantized.py); float elsewhere, converting at the edges
    onnxruntime  the model exported to ONNX (TorchScript exporter) and run by an ONNX Runtime CPU session: BatchNorm
                 folded, Conv+activation fused, one session call per inference (cost/ort.py)
    onnxruntime-int8  the same, the graph quantized by ONNX Runtime's static QDQ flow for the layers held at 8 bits
                 or fewer (cost/ort_int8.py): its int8 kernels (QLinearConv, ...) where it fuses them, float elsewhere
    openvino     the same float ONNX file compiled by OpenVINO for the CPU (cost/ov.py): its kernels and fusions, f32
    openvino-int8  the same QDQ file as onnxruntime-int8 (the same ranges) compiled by OpenVINO, whose
                 low-precision transformations run the ops between its quantize / dequantize pairs as int8 kernels

A profile names its runtime (`HardwareProfile.runtime`); calibration times its kernels there and measurement
times the model there, so the estimate, `run --measure` and the exported file speak of the same kernels.
`runnable(model, example, runtime, threads)` gives a module whose call runs `model` in that runtime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..compress.quantize import synthesize_inputs
from ..errors import AutocompressError, one_of
from . import ort, ov
from .ort_int8 import ORT_RANGES, int8_graph, observe_ort_ranges
from .quantized import RANGES, kept_float, observe_ranges, runnable_int8

RUNTIMES = ("torch", "torch-int8", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8")
INT8_RUNTIMES = ("torch-int8", "onnxruntime-int8", "openvino-int8")  # 8-bit layers' outputs are int8 kernels'
# the root buffer each judges a model with (OpenVINO's int8 runs ONNX Runtime's QDQ file: the same ranges)
KEPT_RANGES = {"torch-int8": RANGES, "onnxruntime-int8": ORT_RANGES, "openvino-int8": ORT_RANGES}


@dataclass(frozen=True)
class GraphEngine:
    """A runtime that runs a model as one call of its ONNX file, as calibration and measurement need it: a
    module of a file (`session(file, threads)`), one whose call runs a file's graph alone on a fixed input
    (`bound(file, example, threads)`), its profiler's share of op types (`op_share(file, example, ops,
    threads)`), its op types that convert layouts and convert float <-> int8, and one conversion timed alone
    (`conversion(x, kind, threads)` -> bound graph, share of it that is the conversion)."""

    session: Callable
    bound: Callable
    op_share: Callable
    layout_ops: tuple[str, ...]
    conversion_ops: tuple[str, ...]
    conversion: Callable


_ORT = GraphEngine(ort.OrtModule, ort.BoundOrt, ort.op_share, ort.LAYOUT_OPS, ort.CONVERSION_OPS,
                   ort.conversion_timing)
_OV = GraphEngine(ov.OvModule, ov.BoundOv, ov.op_share, ov.LAYOUT_OPS, ov.CONVERSION_OPS, ov.conversion_timing)
ENGINES = {"onnxruntime": _ORT, "onnxruntime-int8": _ORT, "openvino": _OV, "openvino-int8": _OV}  # graph runtimes


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise one_of("runtime", runtime, RUNTIMES)
    return runtime


def runnable(model: nn.Module, example: torch.Tensor, runtime: str, threads: int | None = None) -> nn.Module:
    """A module whose call runs `model` in `runtime` (torch: the module itself, in eval mode)."""
    if check_runtime(runtime) == "torch":
        return model.eval()
    if runtime == "torch-int8":
        return runnable_int8(model, example)
    graph = int8_graph(model, example) if runtime in INT8_RUNTIMES else ort.onnx_bytes(model.eval(), example)
    return ENGINES[runtime].session(graph, threads)


def prepare_as_run(model: nn.Module, example: torch.Tensor, runtime: str, calibration=None) -> None:
    """Before `model` is judged for `runtime`: what the runtime derives from data, kept in the model. The int8
    runtimes: the activation ranges of their int8 conversion, observed on `calibration` input batches (None:
    inputs synthesized from the BatchNorm statistics); the float runtimes derive nothing."""
    if runtime not in INT8_RUNTIMES or kept_float(model) is None:
        return
    if calibration is None:
        with torch.enable_grad():
            calibration = [synthesize_inputs(model, example)]
    if runtime == "torch-int8":
        observe_ranges(model, example, calibration)
    else:
        observe_ort_ranges(model, example, calibration)


def as_run(model: nn.Module, example: torch.Tensor, runtime: str) -> nn.Module:
    """The module whose outputs `runtime` computes for `model`, the one its accuracy is judged on: the int8
    runtimes run the int8 conversion of its 8-bit layers (with the ranges `prepare_as_run` kept: torch.ao's
    converted module, or an ONNX Runtime session or OpenVINO compilation of the QDQ file); the float runtimes
    compute the module's own outputs (ONNX Runtime's and OpenVINO's f32 agree to float rounding), so it is the
    module itself."""
    if runtime not in INT8_RUNTIMES or kept_float(model) is None:
        return model.eval()
    if KEPT_RANGES[runtime] not in model._buffers:
        raise AutocompressError(f"this model's 8-bit layers have no int8 activation ranges, so what {runtime} "
                                f"computes is not known; judge it first (its evaluator calibrates them)")
    return runnable(model, example, runtime)


def keep_ranges(model: nn.Module, state: dict) -> None:
    """Give `model` the int8 range buffers `state` (a state_dict) holds, so that loading it keeps them."""
    for name in KEPT_RANGES.values():
        if name in state:
            model.register_buffer(name, torch.empty_like(state[name]))
