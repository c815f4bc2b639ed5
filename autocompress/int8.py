"""A real int8 model for CPU through PyTorch's own quantization, measured beside the cost model's estimate.

`to_int8` converts every conv / linear (post-training quantization, whatever bits the model holds), in the scheme
of the torch-int8 runtime (cost/quantized.py: int8 per-channel symmetric weights on the 8-bit fake-quant grid,
7-bit per-tensor affine activations, torch.ao's FX flow on the x86 engine). Calibration uses the given input
batches, or, with none (data-free), inputs synthesized from the model's BatchNorm statistics
(`quantize.synthesize_inputs`).
"""
from __future__ import annotations

import io

import torch
from torch import nn

from .compress import apply
from .compress.base import layer_targets
from .compress.quantize import synthesize_inputs
from .cost.measure import measure_latency_ms
from .cost.model import estimate
from .cost.quantized import RANGES, convert, engine, plain_copy
from .evaluate import accuracy
from .graph import analyze


def to_int8(model: nn.Module, example_input: torch.Tensor, calibration=None, keep_float=()) -> nn.Module:
    """The int8 CPU version of `model`; `calibration` is an iterable of input batches (or (inputs, labels)),
    None for data-free calibration (a model that keeps its judged ranges, `quantized.RANGES`, uses those); the
    conv / linear layers named in `keep_float` stay float."""
    if calibration is None and RANGES not in model._buffers:  # ranges it keeps need no calibration
        with torch.enable_grad():
            calibration = [synthesize_inputs(model, example_input)]
    return convert(model, example_input, calibration, keep_float)


def file_bytes(model: nn.Module) -> int:
    """Bytes of the model's state_dict as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def int8_report(model: nn.Module, example_input: torch.Tensor, calibration=None, hardware="host",
                val_loader=None) -> dict:
    """The cost model's estimate for `model` with 8-bit weights and activations, beside the real int8 model's
    measured host latency and file size (and the float model's, for scale); accuracies with `val_loader`."""
    names = [name for name, _ in layer_targets(analyze(model, example_input))]
    policy = {"quantize": {"weight_bits": dict.fromkeys(names, 8), "act_bits": dict.fromkeys(names, 8)}}
    est = estimate(apply(model, policy, example_input), example_input, hardware)
    calibration = list(calibration) if calibration is not None else None
    quantized = to_int8(model, example_input, calibration)
    with engine():
        measured = measure_latency_ms(quantized, example_input)
    report = {"estimated_latency_ms": est.latency_ms, "measured_latency_ms": measured,
              "float_latency_ms": measure_latency_ms(plain_copy(model), example_input),
              "estimated_size_kb": est.size_kb, "file_size_kb": file_bytes(quantized) / 1024,
              "float_file_kb": file_bytes(plain_copy(model)) / 1024}
    if val_loader is not None:
        with engine():
            report.update(float_accuracy=accuracy(model, val_loader), int8_accuracy=accuracy(quantized, val_loader))
    return report
