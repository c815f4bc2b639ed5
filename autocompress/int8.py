"""A real int8 model for CPU through PyTorch's own quantization, measured beside the cost model's estimate.

Weights are int8 per output channel, symmetric on [-127, 127] (the grid of 8-bit fake-quant, so the
two agree; BatchNorm is folded first, which per-channel scales absorb exactly); activations are
per-tensor affine uint8 on 7 bits (reduce_range, as torch.ao's x86 default: no saturation without VNNI) from
min/max calibration. The flow is torch.ao's FX graph mode (x86 engine),
whose quantized::conv2d / linear kernels run int8 in eager mode. torchao's pt2e flow (0.18, with
X86InductorQuantizer) was tried first: it fails to annotate ResNet blocks that call one ReLU module
twice ("Input partition has more than one output node"), and its converted graph runs
quantize/dequantize around float kernels unless compiled by inductor.

Calibration uses the given input batches, or, with none (data-free), inputs synthesized from the
model's BatchNorm statistics (`quantize.synthesize_inputs`).
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings

import torch
from torch import nn

from .compress import apply
from .compress.base import layer_targets
from .compress.quantize import act_fake_quant, synthesize_inputs
from .cost.measure import measure_latency_ms
from .cost.model import estimate
from .errors import AutocompressError
from .evaluate import accuracy
from .graph import analyze

ENGINE = "x86"


def qconfig_mapping():
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig, QConfigMapping

    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                quant_min=-127, quant_max=127)
    # 7-bit activations, as torch.ao's own x86 default: fbgemm's AVX2 / AVX-512 kernels multiply uint8 activations
    # by int8 weights in int16 pair sums, which saturate on CPUs without VNNI (one front model here lost 6 points)
    activation = MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=True)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


@contextlib.contextmanager
def _engine(name: str):
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` without activation fake-quant hooks and ranges (the int8 flow quantizes for real)."""
    out = copy.deepcopy(model).eval()
    for m in out.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is act_fake_quant:
                del m._forward_pre_hooks[key]
        m._buffers.pop("act_range", None)
    return out


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def to_int8(model: nn.Module, example_input: torch.Tensor, calibration=None) -> nn.Module:
    """The int8 CPU version of `model`; `calibration` is an iterable of input batches (or (inputs, labels)),
    None for data-free calibration."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if calibration is None:
        with torch.enable_grad():
            calibration = [synthesize_inputs(model, example_input)]
    with warnings.catch_warnings(), _engine(ENGINE):
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices (see the module docstring)
        try:
            prepared = prepare_fx(plain_copy(model), qconfig_mapping(), (example_input,))
        except Exception as exc:
            raise AutocompressError(f"the model cannot be converted to int8: torch.fx cannot trace it "
                                    f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None
        for batch in calibration:
            prepared(_inputs(batch))
        return convert_fx(prepared)


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
    with _engine(ENGINE):
        measured = measure_latency_ms(quantized, example_input)
    report = {"estimated_latency_ms": est.latency_ms, "measured_latency_ms": measured,
              "float_latency_ms": measure_latency_ms(plain_copy(model), example_input),
              "estimated_size_kb": est.size_kb, "file_size_kb": file_bytes(quantized) / 1024,
              "float_file_kb": file_bytes(plain_copy(model)) / 1024}
    if val_loader is not None:
        with _engine(ENGINE):
            report.update(float_accuracy=accuracy(model, val_loader), int8_accuracy=accuracy(quantized, val_loader))
    return report
