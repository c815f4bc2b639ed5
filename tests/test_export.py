"""Export: every format's file, loaded on its own, reproduces the reported accuracy on the validation data."""
import io
import re
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

import autocompress as ac
from autocompress import export
from autocompress.cli import main
from autocompress.errors import AutocompressError
from report_runs import digits_run


@pytest.fixture(scope="module")
def run():
    return digits_run()


@pytest.fixture(scope="module")
def best(run):
    """The most accurate Pareto model: its trial number and reported accuracy."""
    result, _ = run
    n = int(result.pareto["accuracy"].idxmax())
    return n, float(result.trials.loc[n, "accuracy"])


def file_accuracy(fmt: str, path, result, trial: int, val_loader) -> float:
    """Load the written file with its own runtime only (no autocompress code in the forward pass) and score it."""
    if fmt == "state_dict":
        model = ac.apply(result.base_model, result.trials.loc[trial, "policy"], result.example_input)
        model.load_state_dict(torch.load(path, weights_only=True))
        run = lambda x: model.eval()(x).detach().numpy()  # noqa: E731
    elif fmt == "packed":  # the documented loader: decodes the stored bit-widths back into the stored structure
        model = ac.load_packed(path)
        run = lambda x: model.eval()(x).detach().numpy()  # noqa: E731
    elif fmt in ("torchscript", "torch-int8"):
        model = torch.jit.load(str(path))
        run = lambda x: model.eval()(x).detach().numpy()  # noqa: E731
    elif fmt.startswith("openvino"):  # the IR compiled as OpenVINO's documentation does, at f32 (see cost/ov.py)
        import openvino

        compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        run = lambda x: compiled(x.numpy())[0]  # noqa: E731
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # noqa: E731
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += int((np.argmax(run(x), axis=1) == y.numpy()).sum())
            total += len(y)
    return correct / total


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "onnx", "openvino", "packed"])
def test_exported_file_reproduces_the_reported_accuracy(fmt, run, best, digits_data, tmp_path):
    result, _ = run
    trial, reported = best
    path = tmp_path / f"model.{export.SUFFIX[fmt]}"
    info = result.export(trial, fmt, path, data=digits_data)
    written = (path, *info.also)  # an OpenVINO IR is its .xml and .bin
    assert info.path == path and info.size_bytes == sum(f.stat().st_size for f in written) > 10_000
    assert len(written) == (2 if fmt == "openvino" else 1)
    assert info.accuracy == pytest.approx(reported, abs=1e-12)
    assert file_accuracy(fmt, path, result, trial, digits_data[1]) == pytest.approx(reported, abs=1e-12)


def test_packed_file_holds_what_size_kb_counts(run, best, digits_data, tmp_path):
    """The packed artifact is the front's size on disk: its tensors take the cost model's size_kb (within 2 %), and
    every compressed model's file is smaller than its float state_dict."""
    from autocompress.cost.pack import packed_sections

    result, _ = run
    for trial in result.pareto.index:
        info = result.export(int(trial), "packed", tmp_path / f"t{trial}.acpk", data=digits_data)
        assert packed_sections(info.path)["tensors"] == pytest.approx(info.estimated_size_kb * 1024, rel=0.02)
        assert info.accuracy == pytest.approx(result.trials.loc[trial, "accuracy"], abs=1e-12)
        assert info.size_bytes < result.export(int(trial), "state_dict", tmp_path / f"t{trial}.pt",
                                               data=digits_data).size_bytes
    assert "packed" in info.summary()


@pytest.mark.parametrize("fmt", ["torch-int8", "onnx-int8", "openvino-int8"])
def test_int8_artifacts_hold_int8_kernels_and_say_what_they_measure(fmt, run, best, digits_data, tmp_path):
    """The int8 files are real int8 (quantized kernels / QDQ nodes), smaller than the float state_dict, run without
    autocompress, and the accuracy and latency `export` prints are the file's own."""
    result, _ = run
    trial, reported = best
    path = tmp_path / f"model.{export.SUFFIX[fmt]}"
    info = result.export(trial, fmt, path, data=digits_data)
    own = file_accuracy(fmt, path, result, trial, digits_data[1])
    assert info.accuracy == pytest.approx(own, abs=1e-12) and abs(own - reported) <= 0.02
    assert info.latency_ms > 0 and f"{info.latency_ms:.4g} ms" in info.summary()
    assert "not the model the front reports on" in info.summary()  # a float run: ranges calibrated at export
    float_bytes = result.export(trial, "state_dict", tmp_path / "float.pt", data=digits_data).size_bytes
    assert info.size_bytes < 0.6 * float_bytes
    if fmt == "torch-int8":
        assert "quantized::conv2d" in str(torch.jit.load(str(path)).inlined_graph)
    elif fmt == "openvino-int8":
        import openvino

        ops = {op.get_type_name() for op in openvino.Core().read_model(str(path)).get_ops()}
        assert {"FakeQuantize", "Convolution"} <= ops
    else:
        import onnx

        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


def test_cli_export_prints_size_and_accuracy_of_the_file(run, best, tmp_path):
    pytest.importorskip("onnxruntime")
    _, folder = run
    trial, reported = best
    path = tmp_path / "m.onnx"
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["export", str(folder), "--model", "digits_resnet", "--data", "digits", "--trial", str(trial),
                     "--format", "onnx", "--to", str(path)])
    assert code == 0
    text = out.getvalue()
    size_kb = float(re.search(r"([\d,.]+) KB on disk", text).group(1).replace(",", ""))
    assert size_kb == pytest.approx(path.stat().st_size / 1024, abs=0.06)
    assert f"accuracy of the file on the validation data: {reported:.4f} (reported {reported:.4f})" in text


def test_export_refuses_what_it_cannot_honour(run, best, tmp_path):
    result, _ = run
    trial, _ = best
    bare = type(result)(result.trials, result.baseline, result.config, result.base_model, result.example_input)
    with pytest.raises(AutocompressError, match=f"weights trial {trial} was judged with are not stored"):
        bare.export(trial, "state_dict", tmp_path / "m.pt")  # no stored weights: its policy alone is not the model
    with pytest.raises(AutocompressError, match="unknown export format 'tflite'"):
        result.export(trial, "tflite", tmp_path / "m.tflite")
    with pytest.raises(AutocompressError, match="an OpenVINO IR is written to a path ending in .xml .* not '.*m.bin'"):
        result.export(trial, "openvino", tmp_path / "m.bin")
    with pytest.raises(AutocompressError, match="no trial 999"):
        result.export(999, "state_dict", tmp_path / "m.pt")
    assert not list(tmp_path.iterdir())


def test_onnx_file_stores_compressed_weights_at_their_bit_width(digits_model, digits_data, tmp_path):
    """The float ONNX file keeps quantized and shared weights as int8 codes / uint8 indices rebuilt by standard
    ops, so it is smaller than the same graph at fp32, and still measures the reported accuracy. The front is of
    a search over weight bit-widths alone at a fifth of the size, which fp16 alone cannot reach: every model on it
    holds weights at 8 bits or fewer. (Activations stay float: a fake-quantized activation can round to the next
    level in ONNX Runtime's float kernels, see README.)"""
    import onnx

    from autocompress.cost.pack import tensor_entries
    from autocompress.export import _write_float_onnx

    weight_bits = ac.SearchSpace("weight bit-widths", {"quantize": {"weight_bits": [32, 16, 8, 4, 2]}})
    result = ac.compress(digits_model, digits_data[1].dataset[0][0][None], data=digits_data, space=weight_bits,
                         budgets={"size": 0.2}, trials=2, final_epochs=0, progress=False, storage=None,
                         hardware="raspberry-pi-4")
    compressed = [int(n) for n in result.pareto.index
                  if any(meta.get("weight_bits", 32) <= 8 or "clusters" in meta
                         for _, _, meta, _ in tensor_entries(result.model(int(n))))]
    assert compressed and len(compressed) == len(result.pareto)
    for trial in compressed:
        info = result.export(trial, "onnx", tmp_path / f"t{trial}.onnx", data=digits_data)
        _write_float_onnx(result.model(trial), result.example_input, tmp_path / "plain.onnx")
        assert info.size_bytes < 0.7 * (tmp_path / "plain.onnx").stat().st_size
        ops = {node.op_type for node in onnx.load(str(info.path)).graph.node}
        assert ops & {"Gather", "Mul"} and "Cast" in ops
        assert file_accuracy("onnx", info.path, result, trial, digits_data[1]) == pytest.approx(
            result.trials.loc[trial, "accuracy"], abs=1e-12)
