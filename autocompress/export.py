"""Export one trial's compressed model to a file (state_dict, TorchScript or ONNX) and prove it on the data.

The model is rebuilt from the trial's policy and brought to the state the search judged it in by the
same built-in evaluator (BatchNorm statistics and activation ranges re-estimated on the training
data, the run's fine-tuning steps with distillation from the uncompressed model), so the exported
weights are the ones whose accuracy was reported. After writing,
the file is loaded back on its own (torch.load, torch.jit.load, onnxruntime) and its accuracy
re-measured on the validation data.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import AutocompressError, one_of
from .evaluate import NORM_TYPES, accuracy, make_evaluator

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
    note: str = ""

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, trial {self.trial}): {self.size_bytes / 1024:,.1f} KB on disk "
                 f"(the cost model's size_kb, weights counted at their bit-width: {self.estimated_size_kb:,.1f} KB)"]
        if self.accuracy is not None:
            reported = f"{self.reported_accuracy:.4f}" if self.reported_accuracy is not None else "none"
            lines.append(f"accuracy of the file on the validation data: {self.accuracy:.4f} (reported {reported})")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def export(result, trial: int, format: str, to=None, data=None) -> Exported:
    """Write trial `trial` of `result` to `to` (default trial_N.<suffix>) in `format`; `data` = (train_loader,
    val_loader), else the run's.

    `data` is needed when the trial's accuracy was measured (its BatchNorm statistics come from the
    training data) unless the run was started with a data spec, which is reused.
    """
    if format not in FORMATS:
        raise one_of("export format", format, FORMATS)
    model = result.model(trial)
    row = result.trials.loc[trial]
    reported = None if _missing(row["accuracy"]) else float(row["accuracy"])
    loaders = _loaders(result, data)
    prepared = result.prepared(trial)
    if reported is not None and loaders is None and not prepared and _has_norm(model):
        raise AutocompressError(
            f"trial {trial}'s accuracy was measured after re-estimating BatchNorm statistics on the training data; "
            f"pass data=(train_loader, val_loader) (on the command line: --data) so the exported model gets them too")
    note = ""
    if loaders is not None and not prepared:  # the search's judge, in place: same recalibration and fine-tuning
        make_evaluator(loaders, None, result.config.get("finetune_steps", 0), teacher=result._base_model)(model)
    if loaders is None:
        note = "accuracy not re-measured: no data (cost-only run; pass data= or --data to check one)"
    path = Path(to if to is not None else f"trial_{trial}.{SUFFIX[format]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    WRITERS[format](model, result._example_input, path)
    measured = None
    if loaders is not None:
        loaded = LOADERS[format](path, lambda: result.model(trial))
        if loaded is None:
            note = "accuracy not re-measured: onnxruntime is not installed (pip install 'autocompress[onnx]')"
        else:
            measured = accuracy(loaded, loaders[1])
    return Exported(path, format, int(trial), path.stat().st_size, float(row["size_kb"]), measured, reported, note)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _has_norm(model: nn.Module) -> bool:
    return any(isinstance(m, NORM_TYPES) for m in model.modules())


def _loaders(result, data):
    """(train, val) loaders: the given ones, else those of the run's data spec (runs from the command line)."""
    if data is not None:
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise AutocompressError(f"data must be (train_loader, val_loader), got {type(data).__name__}")
        return tuple(data)
    spec = result.config.get("data")
    if not spec:
        return None
    from .data import load_data

    return load_data(spec, tuple(result.config.get("input_shape") or ()) or None)


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


def _load_onnx(path: Path, architecture) -> nn.Module | None:
    try:
        return OnnxModule(path)
    except ImportError:
        return None


WRITERS = {"state_dict": _write_state_dict, "torchscript": _write_torchscript, "onnx": _write_onnx}
LOADERS = {"state_dict": _load_state_dict, "torchscript": _load_torchscript, "onnx": _load_onnx}
