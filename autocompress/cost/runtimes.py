"""The runtimes a model is timed and deployed in: what "latency" means is the kernels of one runtime.

    torch        eager PyTorch: every module call runs its own kernel, with Python's dispatch around it
    torch-int8   eager PyTorch with torch.ao's x86 int8 kernels for the layers held at 8 bits or fewer, and the
                 ops around them FX quantizes (cost/quantized.py); float elsewhere, converting at the edges
    onnxruntime  the model exported to ONNX (TorchScript exporter) and run by an ONNX Runtime CPU session: BatchNorm
                 folded, Conv+activation fused, one session call per inference (cost/ort.py)
    onnxruntime-int8  the same, the graph quantized by ONNX Runtime's static QDQ flow for the layers held at 8 bits
                 or fewer (cost/ort_int8.py): its int8 kernels (QLinearConv, ...) where it fuses them, float elsewhere

A profile names its runtime (`HardwareProfile.runtime`); calibration times its kernels there and measurement
times the model there, so the estimate, `run --measure` and the exported file speak of the same kernels.
`runnable(model, example, runtime, threads)` gives a module whose call runs `model` in that runtime.
"""
from __future__ import annotations

import torch
from torch import nn

from ..compress.quantize import synthesize_inputs
from ..errors import AutocompressError, one_of
from .ort import OrtModule, onnx_bytes
from .ort_int8 import ORT_RANGES, observe_ort_ranges, runnable_ort_int8
from .quantized import RANGES, kept_float, observe_ranges, runnable_int8

RUNTIMES = ("torch", "torch-int8", "onnxruntime", "onnxruntime-int8")
ORT_RUNTIMES = ("onnxruntime", "onnxruntime-int8")  # a model runs as one ONNX Runtime session call
INT8_RUNTIMES = ("torch-int8", "onnxruntime-int8")  # their outputs for 8-bit layers are int8 kernels' outputs
KEPT_RANGES = {"torch-int8": RANGES, "onnxruntime-int8": ORT_RANGES}  # the root buffer each judges a model with


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
    if runtime == "onnxruntime-int8":
        return runnable_ort_int8(model, example, threads)
    return OrtModule(onnx_bytes(model.eval(), example), threads)


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
    converted module, or an ONNX Runtime session of the QDQ file); the float runtimes compute the module's own
    outputs (ONNX Runtime's agree to float rounding), so it is the module itself."""
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
