"""The compact ONNX file rebuilds every compressed weight exactly: codebooks of every size a byte or a nibble
holds (255 values wrapped to negative Gather indices once), integer grids of 1 to 8 bits, odd element counts, and
sparse layers stored as their non-zeros and a bitmask in each of those codings."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper
from torch import nn

from autocompress.compress.base import set_meta
from autocompress.compress.quantize import fake_quantize
from autocompress.export import _write_onnx


def _shared(weight: torch.Tensor, values: int) -> torch.Tensor:
    """`weight` with every entry replaced by one of `values` distinct values, each of them used."""
    book = torch.linspace(-1, 1, values)
    codes = torch.arange(weight.numel()) % values
    return book[codes[torch.randperm(weight.numel(), generator=torch.Generator().manual_seed(0))]].reshape(weight.shape)


def _model(setup, cout: int = 7) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, cout, 3), nn.Flatten(), nn.Linear(cout * 3 * 3, 5)).eval()  # 189 and 315
    with torch.no_grad():
        for layer in (model[0], model[2]):
            setup(layer)
    return model


def _rebuilt(path, names) -> dict:
    graph = onnx.load(str(path))
    for name in names:
        graph.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": np.zeros((1, 3, 5, 5), np.float32)})
    return dict(zip(names, outputs[1:]))


def _share(values):
    def setup(layer):
        layer.weight.copy_(_shared(layer.weight, values))
        set_meta(layer, clusters=values, share_bits=8)
    return setup


def _quantize(bits):
    def setup(layer):
        layer.weight.copy_(fake_quantize(layer.weight, bits))
        set_meta(layer, weight_bits=bits)
    return setup


@pytest.mark.parametrize("setup", [_share(v) for v in (256, 255, 129, 127, 17, 16, 15, 2)]
                         + [_quantize(b) for b in (8, 5, 4, 3, 2, 1)],
                         ids=[f"shared{v}" for v in (256, 255, 129, 127, 17, 16, 15, 2)]
                         + [f"int{b}" for b in (8, 5, 4, 3, 2, 1)])
def test_compact_onnx_rebuilds_each_weight_exactly(setup, tmp_path):
    model = _model(setup)
    path = tmp_path / "m.onnx"
    _write_onnx(model, torch.randn(1, 3, 5, 5), path)
    names = ["0.weight", "2.weight"]
    stored = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert not stored & set(names)  # both are stored compactly, rebuilt by nodes
    for name, rebuilt in _rebuilt(path, names).items():
        np.testing.assert_array_equal(rebuilt, model.state_dict()[name].numpy(), err_msg=name)
    x = torch.randn(4, 3, 5, 5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-4)


def _half(layer):
    layer.weight.copy_(layer.weight.half().float())
    set_meta(layer, weight_bits=16)


def _sparse(setup, density):
    """`setup` on a layer whose smallest weights were pruned to keep `density` of them."""
    def sparse_setup(layer):
        setup(layer)
        w = layer.weight
        kept = w.abs().flatten().topk(round(density * w.numel())).indices
        mask = torch.zeros(w.numel(), dtype=torch.bool)
        mask[kept] = True
        w.mul_(mask.reshape(w.shape))
        set_meta(layer, sparsity=1 - density)
    return sparse_setup


SPARSE = {"fp32": lambda layer: None, "fp16": _half, "int8": _quantize(8), "int4": _quantize(4),
          "int2": _quantize(2), "shared200": _share(200), "shared16": _share(16)}


@pytest.mark.parametrize("density", [0.2, 0.05])
@pytest.mark.parametrize("coding", sorted(SPARSE))
def test_a_sparse_layer_keeps_only_its_nonzeros_and_a_bitmask(coding, density, tmp_path):
    sparse = _model(_sparse(SPARSE[coding], density), cout=240)  # 6480 and 10800 weights: a mask pays
    path, dense_path = tmp_path / "sparse.onnx", tmp_path / "dense.onnx"
    _write_onnx(sparse, torch.randn(1, 3, 5, 5), path)
    names = ["0.weight", "2.weight"]
    for name, rebuilt in _rebuilt(path, names).items():
        np.testing.assert_array_equal(rebuilt, sparse.state_dict()[name].numpy(), err_msg=name)
    for layer in (sparse[0], sparse[2]):
        set_meta(layer, sparsity=0.0)
    _write_onnx(sparse, torch.randn(1, 3, 5, 5), dense_path)  # the same values stored densely
    assert {f"{n}.mask_bits" for n in names} <= {i.name for i in onnx.load(str(path)).graph.initializer}
    assert path.stat().st_size < dense_path.stat().st_size
    x = torch.randn(4, 3, 5, 5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], sparse(x).detach().numpy(), rtol=1e-5,
                               atol=1e-4)


def test_a_layer_with_few_zeros_stays_dense(tmp_path):
    """The bitmask and the scatter cost bytes of their own: at 90 % density they do not pay."""
    path = tmp_path / "m.onnx"
    _write_onnx(_model(_sparse(_quantize(4), 0.9), cout=240), torch.randn(1, 3, 5, 5), path)
    assert not any(i.name.endswith("mask_bits") for i in onnx.load(str(path)).graph.initializer)


INT8 = {"int8": (_quantize(8), 1.0), "int4": (_quantize(4), 1.0), "int2": (_quantize(2), 1.0),
        "shared16": (_share(16), 1.0), "sparse int8": (_quantize(8), 0.1), "sparse int4": (_quantize(4), 0.2)}


@pytest.mark.parametrize("coding", sorted(INT8))
def test_the_int8_file_keeps_few_values_and_zeros_and_computes_the_same(coding, tmp_path, monkeypatch):
    """The onnx-int8 file stores each int8 weight in its smallest form (nibble indices into a tensor's or each
    channel's values, or non-zeros and a bitmask): every int8 weight is rebuilt exactly, ONNX Runtime computes
    exactly the plain QDQ file's outputs, and the file is smaller unless the weight is a full 8-bit grid."""
    import autocompress.export as export

    setup, density = INT8[coding]
    model = _model(_sparse(setup, density) if density < 1 else setup, cout=960)  # 25,920 and 43,200 weights
    batches = [torch.randn(8, 3, 5, 5) for _ in range(2)]
    path, plain_path = tmp_path / "m.int8.onnx", tmp_path / "plain.int8.onnx"
    export._write_onnx_int8(model, batches[0][:1], path, batches)
    monkeypatch.setattr(export, "compact_int8", lambda graph: graph)
    export._write_onnx_int8(model, batches[0][:1], plain_path, batches)
    plain = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(plain_path)).graph.initializer
             if i.data_type == onnx.TensorProto.INT8}
    stored = {i.name for i in onnx.load(str(path)).graph.initializer}
    rebuilt = sorted(set(plain) - stored)
    graph = onnx.load(str(path))
    graph.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.INT8, None) for n in rebuilt)
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5), dtype=np.float32)
    outputs = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None,
                                                                                                        {"input": x})
    for name, values in zip(rebuilt, outputs[1:]):
        np.testing.assert_array_equal(values, plain[name], err_msg=name)
    plain_out = ort.InferenceSession(str(plain_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    np.testing.assert_array_equal(outputs[0], plain_out[0])
    saved = plain_path.stat().st_size - path.stat().st_size
    if coding == "int8":
        assert not rebuilt and saved == 0  # 255 values a channel: one byte each is smallest
    else:  # nibbles halve a weight; a tenth or a fifth of it and a bitmask take less still
        assert rebuilt and saved >= 0.4 * sum(plain[n].nbytes for n in rebuilt)
