"""Shapes for the cost model without running the model: one torch.fx trace, propagated on meta tensors.

`graph.analyze` runs the model three times on real data (a forward check, shape propagation, fvcore's
jit trace for MACs): half a second for resnet50 at 224 px, most of a cost-only search's time per
trial. The cost model needs only the layers, their shapes, MACs and parameters, and the data flow, so
here the model is traced once with torch.fx and its nodes are run on meta tensors (shapes, no
arithmetic; the module's own parameters are swapped for meta ones, nothing in it changes). MACs of
convolutions and linears are counted as fvcore counts them (one per multiply-accumulate, bias left
out). Models fx cannot trace, and modules whose MACs only fvcore knows (attention), go through
`analyze` and `dataflow` as before: same result, slower.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from ..graph import (Layer, LayerGraph, add_get_attr_params, analyze, check_forward, matmul_macs, meta_state,
                     node_layer, traced_output_layers)
from .flow import Flow, dataflow, flow_of

EXACT_MODULES = (nn.modules.conv._ConvNd, nn.Linear)  # the parametric modules whose MACs are counted here


def trace(model: nn.Module, example_input: torch.Tensor) -> tuple[LayerGraph, Flow]:
    """The model's LayerGraph (no channel groups) and data flow, from shapes on meta tensors where fx traces."""
    model = model.eval()
    try:
        gm = torch.fx.symbolic_trace(model)
        values = _meta_values(gm, example_input)
    except Exception:  # not traceable, or an op without a meta kernel: the real run says what is wrong
        return _analyzed(model, example_input)
    modules = dict(gm.named_modules())
    layers = _layers(gm, modules, values)
    if layers is None:
        return _analyzed(model, example_input)
    add_get_attr_params(gm, layers)
    graph = LayerGraph(layers, [], "fx", traced_output_layers(gm, modules), tuple(example_input.shape))
    return graph, flow_of(gm, graph)


def _analyzed(model: nn.Module, example_input: torch.Tensor) -> tuple[LayerGraph, Flow]:
    graph = analyze(model, example_input)
    return graph, dataflow(model, graph)


def _meta_values(gm: torch.fx.GraphModule, example_input: torch.Tensor) -> dict:
    """Every node's output on a meta copy of the input, the module's tensors swapped for meta ones."""
    if not isinstance(example_input, torch.Tensor):
        check_forward(gm, example_input)  # raises the one-sentence error about the input
    values: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n.name] = out
            return out

        def call_module(self, target, args, kwargs):
            m = self.fetch_attr(target)
            if _keeps_shape(m, args, kwargs):  # its output is its input's shape: no meta kernel to run
                return torch.empty_like(args[0])
            return super().call_module(target, args, kwargs)

    with _reparametrize_module(gm, meta_state(gm)), torch.no_grad():
        Recorder(gm).run(torch.empty_like(example_input, device="meta"))
    return values


SHAPE_KEEPING = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh,
                 nn.LeakyReLU, nn.Hardtanh, nn.Identity, nn.Dropout)  # modules whose output has their input's shape
BATCH_NORM_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


def _keeps_shape(m: nn.Module, args, kwargs) -> bool:
    """Whether a module call returns a tensor of its one input's shape and dtype (an activation, dropout, or a
    BatchNorm whose channels match): meta propagation need not run it (a BatchNorm's meta kernel is a
    decomposition, a third of a resnet50 estimate's time)."""
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
        return False
    x = args[0]
    if type(m) in BATCH_NORM_DIMS:
        return x.dim() in BATCH_NORM_DIMS[type(m)] and x.shape[1] == m.num_features
    return type(m) in SHAPE_KEEPING


def _layers(gm, modules, values) -> list[Layer] | None:
    """Layers as graph._fx_layers makes them, MACs included; None where a module's MACs need fvcore."""
    layers = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        layer = node_layer(node, modules, values)
        m = layer.module
        if m is not None and layer.kind in ("matmul", "other") and layer.params and not isinstance(m, EXACT_MODULES):
            return None
        if layer.kind == "free":
            continue
        layer.macs = (matmul_macs(node, values) if layer.kind == "matmul" and m is None
                      else _module_macs(m, layer.out_shape))
        layers.append(layer)
    return layers


def _module_macs(m: nn.Module | None, out_shape: tuple) -> int:
    """fvcore's count for a conv (output elements x input channels per group x kernel area) or a linear
    (output elements x input features); 0 for every other module."""
    if not out_shape:
        return 0
    if isinstance(m, nn.modules.conv._ConvNd):
        return math.prod(out_shape) * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear):
        return math.prod(out_shape) * m.in_features
    return 0
