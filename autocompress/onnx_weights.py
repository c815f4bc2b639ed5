"""Compressed weights inside an ONNX file, stored at their bit-width with standard operators only.

torch.onnx writes every weight as fp32, so a model whose layers are quantized to 4 bits or share 16 values each
is as large on disk as the original. `compact` replaces each compressed conv/linear weight initializer by its
stored form and the ops that rebuild the float weight from it:

    integer grid (weight_bits <= 8)  int8 codes, one fp32 scale per output channel: Mul(Cast(codes), scale)
    shared values                    uint8 codebook indices and the codebook: Gather(codebook, Cast(indices))
    fp16 values                      Cast(values)

Every rebuilt weight has constant inputs only, so ONNX Runtime (like any runtime that folds constants) computes it
once, when the session is created: the graph then runs the float kernels of the plain file at its speed, on the
values the module holds. Sparsity is not kept: ONNX's sparse initializers index with int64, 8 bytes per non-zero.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from .cost.pack import tensor_entries, weight_grid


def compact(graph_model: onnx.ModelProto, model: nn.Module) -> onnx.ModelProto:
    """`graph_model` (exported from `model` with its state_dict names kept) with every compressed weight stored
    in its compact form; other initializers unchanged."""
    stored = {name: (t, meta) for name, t, meta, _ in tensor_entries(model) if meta}
    graph = graph_model.graph
    kept, nodes = [], []
    for init in graph.initializer:
        form = _stored_form(init.name, *stored[init.name]) if init.name in stored else None
        if form is None:
            kept.append(init)
        else:
            kept.extend(form[0])
            nodes.extend(form[1])
    del graph.initializer[:]
    graph.initializer.extend(kept)
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)  # the rebuilt weights come first: ONNX graphs are topologically sorted
    return graph_model


def _stored_form(name: str, weight, meta: dict):
    """(initializers, nodes) that rebuild `weight` under `name`, or None when storing it as fp32 is smallest."""
    w = weight.detach().float().cpu()
    bits = int(meta.get("weight_bits", 32))
    if "clusters" in meta:
        book, codes = np.unique(w.numpy(), return_inverse=True)
        if len(book) <= 256:
            return ([numpy_helper.from_array(book.astype(np.float32), f"{name}.codebook"),
                     numpy_helper.from_array(codes.reshape(w.shape).astype(np.uint8), f"{name}.indices")],
                    [helper.make_node("Cast", [f"{name}.indices"], [f"{name}.index64"], to=onnx.TensorProto.INT64),
                     helper.make_node("Gather", [f"{name}.codebook", f"{name}.index64"], [name], axis=0)])
    if bits <= 8:
        q, scales = weight_grid(w, bits, per_channel=True)
        shape = (w.shape[0],) + (1,) * (w.dim() - 1)
        return ([numpy_helper.from_array(q.reshape(w.shape).astype(np.int8), f"{name}.codes"),
                 numpy_helper.from_array(scales.reshape(shape), f"{name}.scale")],
                [helper.make_node("Cast", [f"{name}.codes"], [f"{name}.float_codes"], to=onnx.TensorProto.FLOAT),
                 helper.make_node("Mul", [f"{name}.float_codes", f"{name}.scale"], [name])])
    if bits == 16:
        return ([numpy_helper.from_array(w.numpy().astype(np.float16), f"{name}.half")],
                [helper.make_node("Cast", [f"{name}.half"], [name], to=onnx.TensorProto.FLOAT)])
    return None
