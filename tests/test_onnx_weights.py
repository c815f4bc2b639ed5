"""The compact ONNX file rebuilds every compressed weight exactly: codebooks of every size a byte or a nibble
holds (255 values wrapped to negative Gather indices once), integer grids of 1 to 8 bits, odd element counts."""
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


def _model(setup) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 7, 3), nn.Flatten(), nn.Linear(7 * 3 * 3, 5)).eval()  # 189 and 315 weights
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
