"""ONNX Runtime's int8 runtime: the model exported to ONNX and quantized by ONNX Runtime's static QDQ flow.

The float ONNX graph is pre-processed (shape inference, Conv+BatchNorm folding) and quantized by
`onnxruntime.quantization.quantize_static`: weights int8 per output channel, symmetric (the grid of 8-bit
fake-quant), activations per tensor with min/max ranges from calibration batches, uint8 where the CPU has VNNI
and int8 elsewhere (`activation_type`). ONNX Runtime fuses each DequantizeLinear -> op -> QuantizeLinear chain
into its int8 kernel (QLinearConv, QLinearAdd, ...) when it loads the file. As in torch-int8
(cost/quantized.py), the conv / linear layers a model holds wider than 8 bits stay float (`nodes_to_exclude`),
and a model with none at 8 bits or fewer runs float.

The ranges a model is judged with are kept in it: tensor name -> (min, max) of ONNX Runtime's calibration and
the activation type, as zlib-compressed JSON in a uint8 root buffer (`ORT_RANGES`), so that it travels with the state_dict and every later
quantization of the model (`int8_graph`, the onnx-int8 export) writes the very file whose accuracy was
judged, without the data. The tensor names are the exporter's, which a model of the same structure reproduces.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..compress.quantize import synthesize_inputs
from ..errors import AutocompressError
from .ort import onnx_bytes
from .quantized import RANGES, kept_float, plain_copy

ORT_RANGES = "ort_int8_ranges"  # a root buffer: the activation ranges the model's QDQ file was judged with
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the ONNX nodes of conv / linear layers


def prepared_graph(plain: bytes, folder: Path) -> Path:
    """A float ONNX file pre-processed for quantization as ONNX Runtime recommends (shape inference, BatchNorm
    folded into its convolution)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    (folder / "float.onnx").write_bytes(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(folder / "float.onnx"), str(folder / "prepared.onnx"), skip_symbolic_shape=True)
    return folder / "prepared.onnx"


def float_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """The model's float ONNX file, every weight fp32 and no fake-quant (ONNX Runtime quantizes for real). Kept
    ranges are left out: an extra buffer shifts the exporter's numbering of the weights' names."""
    plain = plain_copy(model)
    for name in (ORT_RANGES, RANGES):
        plain._buffers.pop(name, None)
    return onnx_bytes(plain, example)


def qdq_bytes(model: nn.Module, example: torch.Tensor, calibration=None, keep_float=None) -> bytes:
    """`model` as ONNX Runtime's QDQ int8 file. Activation ranges: those the model keeps (`observe_ort_ranges`),
    else from `calibration` input batches (None: inputs synthesized from the BatchNorm statistics). The conv /
    linear layers named in `keep_float` (None: those the model holds wider than 8 bits) stay float."""
    keep = tuple(kept_float(model) or ()) if keep_float is None else tuple(keep_float)
    plain, kept = float_bytes(model, example), model._buffers.get(ORT_RANGES)
    key = _key(plain, kept, keep) if kept is not None else None
    if key in _MADE:
        return _MADE[key]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        activations = _write_cache(kept, folder / "ranges.json") if kept is not None else activation_type()
        batches = None if kept is not None else _batches(model, example, calibration)
        _quantize(prepared_graph(plain, folder), folder / "int8.onnx", folder / "ranges.json", batches, keep,
                  activations)
        return _remember(key, (folder / "int8.onnx").read_bytes())


def observe_ort_ranges(model: nn.Module, example: torch.Tensor, calibration=None) -> None:
    """Calibrate the model's QDQ quantization on `calibration` input batches (None: synthesized inputs) and keep
    the ranges in the model (`ORT_RANGES`)."""
    model._buffers.pop(ORT_RANGES, None)
    keep = tuple(kept_float(model) or ())
    plain = float_bytes(model, example)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _quantize(prepared_graph(plain, folder), folder / "int8.onnx", folder / "ranges.json",
                  _batches(model, example, calibration), keep, activation_type())
        model.register_buffer(ORT_RANGES, _encoded(folder / "ranges.json", activation_type()))
        _remember(_key(plain, model._buffers[ORT_RANGES], keep), (folder / "int8.onnx").read_bytes())


_MADE: dict[bytes, bytes] = {}  # the last few QDQ files made, by what made them: judging quantizes just once
_MADE_KEPT = 4


def _key(plain: bytes, ranges: torch.Tensor, keep: tuple) -> bytes:
    return hashlib.sha256(plain + ranges.numpy().tobytes() + repr(keep).encode()).digest()


def _remember(key: bytes | None, made: bytes) -> bytes:
    if key is not None:
        _MADE[key] = made
        while len(_MADE) > _MADE_KEPT:
            del _MADE[next(iter(_MADE))]
    return made


def int8_graph(model: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX file the int8 runtimes run for `model`: its QDQ file (the float file when no layer is held at 8
    bits or fewer). Ranges: those the model keeps, else from the example input (what a call costs does not
    depend on them)."""
    if kept_float(model) is None:
        return onnx_bytes(model.eval(), example)
    return qdq_bytes(model, example, [example])


@functools.cache
def activation_type():
    """uint8 activations (U8S8, ONNX Runtime's fastest x86 int8 kernels) where the CPU has VNNI, whose instructions
    multiply uint8 by int8 into int32 sums; int8 (S8S8) elsewhere: without VNNI the AVX2 / AVX-512 kernels add
    uint8 x int8 products in pairs into int16, which saturates (ONNX Runtime's quantization documentation). On
    this machine's EPYC (avx512_vnni) U8S8 ran the digits ResNet-20 in 0.34 ms against S8S8's 0.91 ms."""
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if _cpu_has_vnni() else QuantType.QInt8


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: the safe choice
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _batches(model: nn.Module, example: torch.Tensor, calibration) -> list[np.ndarray]:
    if calibration is None:
        with torch.enable_grad():
            calibration = [synthesize_inputs(model, example)]
    return [(b[0] if isinstance(b, (tuple, list)) else b).detach().cpu().numpy() for b in calibration]


def _quantize(graph: Path, out: Path, cache: Path, batches, keep_float, activations) -> None:
    """ONNX Runtime's static QDQ quantization of `graph` into `out`, activations of type `activations`: ranges
    read from `cache` when `batches` is None, else calibrated on them and written there."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": x} for x in batches])

        def get_next(self):
            return next(self.items, None)

    excluded = _weight_nodes(onnx.load(str(graph)).graph, keep_float)
    with warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        try:
            quantize_static(str(graph), str(out), Batches() if batches is not None else None,
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=activations,
                            weight_type=QuantType.QInt8, nodes_to_exclude=excluded, calibration_cache_path=cache)
        except KeyError as exc:
            raise AutocompressError(f"the model keeps ONNX Runtime int8 ranges for other tensors than its graph "
                                    f"has ({exc}); re-judge it (its ranges were set for another structure)") from None


@contextlib.contextmanager
def _quiet_logging():
    """ONNX Runtime's quantizer logs its notices to the root logger (a per-channel axis it does not use, ...)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _weight_nodes(graph, layers) -> list[str]:
    """The ONNX nodes of the conv / linear modules named in `layers`. The TorchScript exporter names a node by
    its module scope: '/layer1/layer1.0/conv1/Conv' for 'layer1.0.conv1' (a container's child as 'parent.i')."""
    wanted, found = set(layers), {}
    for node in graph.node:
        if node.op_type in WEIGHT_OPS:
            found.setdefault(_module_of(node.name), []).append(node.name)
    missing = sorted(wanted - set(found))
    if missing:
        raise AutocompressError(f"the ONNX graph has no node for layer(s) {', '.join(missing)}, which must stay "
                                f"float in ONNX Runtime's int8 model; export it without them held wider than 8 bits")
    return [name for layer in sorted(wanted) for name in found[layer]]


def _module_of(node_name: str) -> str:
    """The module path of an exported node from its scope name (see `_weight_nodes`)."""
    path, previous = "", ""
    for part in node_name.strip("/").split("/")[:-1]:
        if previous and part.startswith(previous + "."):
            path += part[len(previous):]
        else:
            path = f"{path}.{part}" if path else part
        previous = part
    return path


def _encoded(cache: Path, activations) -> torch.Tensor:
    """ONNX Runtime's calibration cache as tensor name -> [min, max], with the activation type it quantizes to
    (a model judged on a CPU with VNNI is written the same way on one without), compressed in a uint8 tensor."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(cache).data
    ranges = {name: [float(np.asarray(v).reshape(-1)[0]) for v in data[name].range_value] for name in sorted(data)}
    kept = {"activations": activations.name, "ranges": ranges}
    packed = zlib.compress(json.dumps(kept, separators=(",", ":")).encode(), 9)
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8).clone()


def _write_cache(kept: torch.Tensor, cache: Path):
    """Write the ranges a model keeps as ONNX Runtime's calibration cache; return the activation type they are for."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    stored = json.loads(zlib.decompress(bytes(kept.numpy().tobytes())))
    data = {name: (np.array(lo, np.float32), np.array(hi, np.float32)) for name, (lo, hi) in stored["ranges"].items()}
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
    return QuantType[stored["activations"]]
