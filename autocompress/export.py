"""Export one trial's compressed model to a file and prove it on the data and in its runtime.

Formats: state_dict, TorchScript and ONNX (float), and real int8 artifacts that run without autocompress:
`torch-int8` (torch.ao FX int8 with the x86 engine, saved as TorchScript: torch.jit.load runs it; what the
torch-int8 runtime runs, cost/quantized.py: layers the model holds wider than 8 bits stay float) and
`onnx-int8` (ONNX Runtime's static QDQ quantization of the float ONNX file, what the onnxruntime-int8 runtime
runs, cost/ort_int8.py: int8 weights per output channel, int8 activations calibrated on training batches, layers
held wider than 8 bits float unless none is held at 8 bits or fewer). The float ONNX file stores compressed weights compactly
(codes at their bit-width, codebooks, sparse non-zeros with a bitmask: onnx_weights.py). The int8 flows
re-quantize the float weights; the onnx-int8 file then stores each int8 weight in its smallest form
(`onnx_weights.compact_int8`: nibble indices where a tensor or each of its channels holds at most 16 values, as
4-bit and shared weights do, or non-zeros and a bitmask), folded back by ONNX Runtime when it loads the file, so
sparsity, 4-bit codes and shared values keep it small; torch.ao's packed int8 weights (torch-int8) are dense.
`openvino` and `openvino-int8` are OpenVINO's IR (.xml and .bin) of the float ONNX file and of the onnx-int8
QDQ file, what the openvino runtimes compile (cost/ov.py); the IR holds int8 weights dense, and runs as judged
when compiled with INFERENCE_PRECISION_HINT f32 (OpenVINO's default on a CPU with bf16 units is bf16).
`packed` is autocompress's own file: every weight at its bit-width
(codebook indices for shared weights, sparse indices, Huffman codes; what `size_kb` counts) plus the module's
structure; `autocompress.load_packed(path)` decodes it back to the exact module (it unpickles the structure:
load only files you trust), and `autocompress/unpack.py`, numpy only, reads its weights where autocompress is not
installed.

The model is `result.compressed(trial)`: the trial's policy with the weights its reported numbers were measured
on (delivered or judged), so nothing is trained again; in a run of an int8 runtime it keeps the activation ranges
it was judged with, so its file of that runtime (torch-int8, onnx-int8, openvino-int8) is the very int8 model
whose accuracy was reported. After writing, the file is loaded back on its own
(torch.load, torch.jit.load, onnxruntime, openvino), its accuracy re-measured on the validation data (and on the
test data when there is one) and its latency timed in that runtime on this machine, next to the reported figures.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cost.measure import measure_latency_ms
from .cost.pack import load_packed, save_packed
from .cost.ort import OrtModule, onnx_bytes
from .cost.ov import OvModule, save_ir
from .data import load_recorded_data, split_data
from .errors import AutocompressError, one_of
from .evaluate import accuracy, fixed_batches
from .cost.ort_int8 import qdq_bytes
from .cost.quantized import kept_float
from .cost.runtimes import KEPT_RANGES
from .int8 import to_int8
from .onnx_weights import compact, compact_int8

FORMATS = ("state_dict", "torchscript", "onnx", "torch-int8", "onnx-int8", "openvino", "openvino-int8", "packed")
SUFFIX = {"state_dict": "pt", "torchscript": "ts.pt", "onnx": "onnx", "torch-int8": "int8.ts.pt",
          "onnx-int8": "int8.onnx", "openvino": "xml", "openvino-int8": "int8.xml", "packed": "acpk"}
CALIBRATION_BATCHES = 8  # training batches that set the int8 activation ranges


@dataclass
class Exported:
    """What `export` wrote and what the written file measures."""

    path: Path
    format: str
    trial: int
    size_bytes: int
    estimated_size_kb: float     # the cost model's size: weights counted at their bit-width
    accuracy: float | None       # the written file's accuracy on the validation data (None: not measured)
    reported_accuracy: float | None
    test_accuracy: float | None = None           # ... and on the test data
    reported_test_accuracy: float | None = None
    latency_ms: float | None = None              # the file timed in its runtime, batch of the example input
    reported_latency_ms: float | None = None     # the cost model's latency on the run's hardware profile
    threads: int = 1
    note: str = ""
    also: tuple[Path, ...] = ()                  # the files written beside `path` (an IR's .bin), counted in size_bytes

    def summary(self) -> str:
        also = "".join(f" and {f}" for f in self.also)
        lines = [f"wrote {self.path}{also} ({self.format}, trial {self.trial}): "
                 f"{self.size_bytes / 1024:,.1f} KB on disk "
                 f"(the cost model's size_kb, weights counted at their bit-width: {self.estimated_size_kb:,.1f} KB)"]
        for name, measured, reported in (("validation", self.accuracy, self.reported_accuracy),
                                         ("test", self.test_accuracy, self.reported_test_accuracy)):
            if measured is not None:
                said = f"{reported:.4f}" if reported is not None else "none"
                lines.append(f"accuracy of the file on the {name} data: {measured:.4f} (reported {said})")
        if self.latency_ms is not None:
            said = f"{self.reported_latency_ms:.4g} ms" if self.reported_latency_ms is not None else "none"
            lines.append(f"latency of the file in its runtime on this machine ({self.threads} thread(s), median): "
                         f"{self.latency_ms:.4g} ms (the cost model's: {said})")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def export(result, trial: int, format: str, to=None, data=None) -> Exported:
    """Write trial `trial` of `result` to `to` (default trial_N.<suffix>) in `format` and re-measure the file on
    `data` = (train, val[, test]) loaders, else on the run's data spec."""
    if format not in FORMATS:
        raise one_of("export format", format, FORMATS)
    path = Path(to if to is not None else f"trial_{trial}.{SUFFIX[format]}")
    if format.startswith("openvino") and path.suffix != ".xml":
        raise AutocompressError(f"an OpenVINO IR is written to a path ending in .xml (its weights go beside it as "
                                f".bin), not {str(path)!r}")
    model = result.compressed(trial)
    row = result.trials.loc[trial]
    loaders = _loaders(result, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = result.example_input
    calibration = fixed_batches(loaders[0], CALIBRATION_BATCHES) if loaders and loaders[0] is not None else None
    written = WRITERS[format](model, example, path, calibration) or [path]
    loaded = LOADERS[format](path, lambda: result.compressed(trial))
    measured, notes = [None, None], [_recalibrated(model, format)]
    if loaders is None:
        notes.append("accuracy not re-measured: no data (cost-only run; pass data= or --data to check one)")
    else:
        measured = [accuracy(loaded, loader) if loader is not None else None for loader in loaders[1:]]
    threads = torch.get_num_threads()  # what a user's process gets, not the profile's timing setting
    size = sum(f.stat().st_size for f in written)
    return Exported(path, format, int(trial), size, float(row["size_kb"]), measured[0],
                    _number(row["accuracy"]), measured[1], _number(row.get("test_accuracy")),
                    measure_latency_ms(loaded, example, threads=threads), _number(row.get("latency_ms")), threads,
                    "\n".join(n for n in notes if n), tuple(written[1:]))


# format -> the runtime it is
INT8_FORMATS = {"torch-int8": "torch-int8", "onnx-int8": "onnxruntime-int8", "openvino-int8": "openvino-int8"}


def _recalibrated(model: nn.Module, format: str) -> str:
    """What to say when an int8 file is not the model the run judged: its activation ranges are calibrated now."""
    runtime = INT8_FORMATS.get(format)
    if runtime is None or KEPT_RANGES[runtime] in model._buffers:
        return ""
    why = ("no layer of this model is held at 8 bits or fewer, so the file converts every one" if kept_float(model)
           is None else f"the run did not judge this model in the {runtime} runtime")
    return (f"note: {why}, with int8 activation ranges calibrated now on training batches: it is not the model the "
            f"front reports on, and its own accuracy is the one above (a run with --runtime {runtime} reports it)")


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _loaders(result, data):
    """(train, val, test) loaders: the given ones, else those of the run's data spec (runs from the command line)."""
    if data is not None:
        return split_data(data)
    return load_recorded_data(result.config, "the run")


def _write_state_dict(model: nn.Module, example: torch.Tensor, path: Path, calibration=None) -> None:
    torch.save(model.state_dict(), path)


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, calibration=None) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, but still the
        torch.jit.trace(model, example).save(str(path))  # format most runtimes (C++, mobile) load


def _write_torch_int8(model: nn.Module, example: torch.Tensor, path: Path, calibration=None) -> None:
    """What the torch-int8 runtime runs: layers held wider than 8 bits stay float, unless none is held at 8 bits
    or fewer (a float model: every layer converted)."""
    _write_torchscript(to_int8(model, example, calibration, kept_float(model) or ()), example, path)


def _write_onnx_int8(model: nn.Module, example: torch.Tensor, path: Path, calibration=None) -> None:
    """What the onnxruntime-int8 runtime runs (cost/ort_int8.py): ONNX Runtime's QDQ quantization of the float
    graph, with the ranges the model was judged with where it keeps them (an onnxruntime-int8 run), else
    calibrated on `calibration` (None: synthesized inputs); then each int8 weight stored in its smallest form."""
    import onnx

    path.write_bytes(qdq_bytes(model, example, calibration))
    onnx.save(compact_int8(onnx.load(str(path))), str(path))  # 4-bit, shared and sparse weights kept small


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, calibration=None) -> None:
    """The float graph with every compressed weight stored at its bit-width (see onnx_weights.py): the state_dict's
    names and BatchNorm are kept at export so the weights can be found, and ONNX Runtime folds both when it loads."""
    import onnx

    _write_float_onnx(model, example, path, training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    onnx.save(compact(onnx.load(str(path)), model), str(path))


def _write_openvino(model: nn.Module, example: torch.Tensor, path: Path, calibration=None) -> list[Path]:
    """What the openvino runtime compiles: the float ONNX file, as OpenVINO's IR (.xml and .bin)."""
    return save_ir(onnx_bytes(model.eval(), example), path)


def _write_openvino_int8(model: nn.Module, example: torch.Tensor, path: Path, calibration=None) -> list[Path]:
    """What the openvino-int8 runtime compiles: the onnx-int8 export's QDQ file (the same ranges), as OpenVINO's
    IR, whose FakeQuantize ops OpenVINO runs as int8 kernels."""
    return save_ir(qdq_bytes(model, example, calibration), path)


def _write_float_onnx(model: nn.Module, example: torch.Tensor, path: Path, **options) -> None:
    Path(path).write_bytes(onnx_bytes(model, example, **options))


def _write_packed(model: nn.Module, example: torch.Tensor, path: Path, calibration=None) -> None:
    save_packed(model, path)


def _load_packed(path: Path, architecture) -> nn.Module:
    return load_packed(path).eval()  # from the file alone: the structure it stores, its decoded weights


def _load_state_dict(path: Path, architecture) -> nn.Module:
    model = architecture()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _load_torchscript(path: Path, architecture) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").eval()


def _load_onnx(path: Path, architecture) -> nn.Module:
    return OrtModule(str(path))  # torch's thread count: the one torch is timed with


def _load_openvino(path: Path, architecture) -> nn.Module:
    return OvModule(str(path))  # the IR (.xml with its .bin), compiled as the openvino runtimes compile


WRITERS = {"state_dict": _write_state_dict, "torchscript": _write_torchscript, "onnx": _write_onnx,
           "torch-int8": _write_torch_int8, "onnx-int8": _write_onnx_int8, "openvino": _write_openvino,
           "openvino-int8": _write_openvino_int8, "packed": _write_packed}
LOADERS = {"state_dict": _load_state_dict, "torchscript": _load_torchscript, "onnx": _load_onnx,
           "torch-int8": _load_torchscript, "onnx-int8": _load_onnx, "openvino": _load_openvino,
           "openvino-int8": _load_openvino, "packed": _load_packed}
