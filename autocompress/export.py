"""Export one trial's compressed model to a file (state_dict, TorchScript or ONNX) and prove it on the data.

The model is `result.model(trial)`: the trial's policy with the weights its reported numbers were measured
on (delivered or judged), so nothing is trained again. After writing, the file is loaded back on its own
(torch.load, torch.jit.load, onnxruntime) and its accuracy re-measured on the validation data (and on the
test data when there is one), next to the reported figures.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import load_recorded_data, split_data
from .errors import one_of
from .evaluate import accuracy

FORMATS = ("state_dict", "torchscript", "onnx")
SUFFIX = {"state_dict": "pt", "torchscript": "ts.pt", "onnx": "onnx"}


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
    note: str = ""

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, trial {self.trial}): {self.size_bytes / 1024:,.1f} KB on disk "
                 f"(the cost model's size_kb, weights counted at their bit-width: {self.estimated_size_kb:,.1f} KB)"]
        for name, measured, reported in (("validation", self.accuracy, self.reported_accuracy),
                                         ("test", self.test_accuracy, self.reported_test_accuracy)):
            if measured is not None:
                said = f"{reported:.4f}" if reported is not None else "none"
                lines.append(f"accuracy of the file on the {name} data: {measured:.4f} (reported {said})")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def export(result, trial: int, format: str, to=None, data=None) -> Exported:
    """Write trial `trial` of `result` to `to` (default trial_N.<suffix>) in `format` and re-measure the file on
    `data` = (train, val[, test]) loaders, else on the run's data spec."""
    if format not in FORMATS:
        raise one_of("export format", format, FORMATS)
    model = result.model(trial)
    row = result.trials.loc[trial]
    loaders = _loaders(result, data)
    path = Path(to if to is not None else f"trial_{trial}.{SUFFIX[format]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[format](model, result._example_input, path)
    measured, note = [None, None], ""
    if loaders is None:
        note = "accuracy not re-measured: no data (cost-only run; pass data= or --data to check one)"
    else:
        loaded = LOADERS[format](path, lambda: result.model(trial))
        measured = [accuracy(loaded, loader) if loader is not None else None for loader in loaders[1:]]
    return Exported(path, format, int(trial), path.stat().st_size, float(row["size_kb"]), measured[0],
                    _number(row["accuracy"]), measured[1], _number(row.get("test_accuracy")), note)


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _loaders(result, data):
    """(train, val, test) loaders: the given ones, else those of the run's data spec (runs from the command line)."""
    if data is not None:
        return split_data(data)
    return load_recorded_data(result.config, "the run")


def _write_state_dict(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.save(model.state_dict(), path)


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, but still the
        torch.jit.trace(model, example).save(str(path))  # format most runtimes (C++, mobile) load


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    # The TorchScript-based exporter (dynamo=False) needs no extra package; the dynamo one needs onnxscript.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def _load_state_dict(path: Path, architecture) -> nn.Module:
    model = architecture()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _load_torchscript(path: Path, architecture) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").eval()


class OnnxModule(nn.Module):
    """An onnxruntime session behind the nn.Module call convention, so `accuracy` can judge the file."""

    def __init__(self, path: Path):
        super().__init__()
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0])


def _load_onnx(path: Path, architecture) -> nn.Module:
    return OnnxModule(path)


WRITERS = {"state_dict": _write_state_dict, "torchscript": _write_torchscript, "onnx": _write_onnx}
LOADERS = {"state_dict": _load_state_dict, "torchscript": _load_torchscript, "onnx": _load_onnx}
