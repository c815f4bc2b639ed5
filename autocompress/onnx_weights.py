"""Compressed weights inside an ONNX file, stored at their bit-width with standard operators only.

torch.onnx writes every weight as fp32, so a model whose layers are quantized to 4 bits or share 16 values each
is as large on disk as the original. `compact` replaces each compressed conv/linear weight initializer by its
stored form and the ops that rebuild the float weight from it:

    integer grid (weight_bits <= 8)  int8 codes, one fp32 scale per output channel: Mul(Cast(codes), scale)
    shared values                    uint8 codebook indices and the codebook: Gather(codebook, Cast(indices))
    fp16 values                      Cast(values)

Codes of at most 4 bits (weight_bits <= 4, codebooks of at most 16 values) are packed two per byte and unpacked
with integer Div / Mul / Sub, Concat and Reshape (opset 17 has no bitwise And and no INT4 type).

Every rebuilt weight has constant inputs only, so ONNX Runtime (like any runtime that folds constants) computes it
once, when the session is created: the graph then runs the float kernels of the plain file at its speed, on the
values the module holds.

A sparse layer stores only its non-zeros (in the coding above) and a bitmask of one bit per weight, when that
makes its part of the file smaller, and scatters them back with Div / Mod (the mask's bits), CumSum and Gather. (ONNX's own sparse
initializers would index each non-zero with an int64, 8 bytes.)
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from .cost.pack import tensor_entries
from .weights import weight_grid


def compact(graph_model: onnx.ModelProto, model: nn.Module) -> onnx.ModelProto:
    """`graph_model` (exported from `model` with its state_dict names kept) with every compressed weight stored
    in its compact form; other initializers unchanged."""
    stored = {name: (t, meta) for name, t, meta, _ in tensor_entries(model) if meta}
    return _replaced(graph_model, lambda init: _stored_form(init.name, *stored[init.name])
                     if init.name in stored else None)


def compact_int8(graph_model: onnx.ModelProto) -> onnx.ModelProto:
    """A QDQ int8 file (ONNX Runtime's static quantization) with each int8 weight that feeds a DequantizeLinear
    stored in its smallest form (`_int8_form`), whatever made it small: the few distinct codes of a weight held
    at 4 bits or fewer (or sharing few values), the zeros of a sparse one. The rebuilt int8 tensors have constant
    inputs only, so ONNX Runtime folds them when the session is created and then fuses its int8 kernels from the
    folded weights exactly as from the plain file's."""
    weights = {node.input[0] for node in graph_model.graph.node if node.op_type == "DequantizeLinear"}
    tags = (f"i8_{k}" for k in itertools.count())  # short names inside: a graph's names are bytes of its file
    return _replaced(graph_model, lambda init: _int8_form(init.name, numpy_helper.to_array(init), next(tags))
                     if init.name in weights and init.data_type == onnx.TensorProto.INT8 else None)


def _replaced(graph_model: onnx.ModelProto, form_of) -> onnx.ModelProto:
    """`graph_model` with each initializer for which `form_of(init)` gives (initializers, nodes) rebuilt by
    them under its name; the others unchanged."""
    graph = graph_model.graph
    kept, nodes = [], []
    for init in graph.initializer:
        form = form_of(init)
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


NIBBLE_OFFSET = 8


def _codes(name: str, values: np.ndarray, nibbles: bool) -> tuple[list, list, str]:
    """(initializers, nodes, output) storing integer `values` (int8 or uint8 range, or 0..15 with `nibbles`) and
    the nodes that give them back in their shape: one byte each as they are, nibbles two per uint8 byte."""
    if not nibbles:
        # Codebook indices reach 255: as int8 they would wrap to negative indices, which Gather counts from the end
        dtype = np.int8 if values.min() < 0 else np.uint8
        if values.min() < np.iinfo(dtype).min or values.max() > np.iinfo(dtype).max:
            raise ValueError(f"codes in [{values.min()}, {values.max()}] do not fit one byte")
        return [numpy_helper.from_array(values.astype(dtype), name)], [], name
    flat = values.astype(np.uint8).ravel()
    padded = np.append(flat, np.zeros(len(flat) % 2, np.uint8))
    packed = (padded[0::2] | (padded[1::2] << 4)).astype(np.uint8)
    constants = {"packed": packed, "sixteen": np.array(16, np.int32), "pairs": np.array([-1, 1], np.int64),
                 "start": np.array([0], np.int64), "end": np.array([flat.size], np.int64),
                 "flat_shape": np.array([-1], np.int64), "shape": np.array(values.shape, np.int64)}
    inits = [numpy_helper.from_array(v, f"{name}.{k}") for k, v in constants.items()]
    n = lambda k: f"{name}.{k}"  # noqa: E731
    nodes = [helper.make_node("Cast", [n("packed")], [n("bytes")], to=onnx.TensorProto.INT32),
             helper.make_node("Div", [n("bytes"), n("sixteen")], [n("high")]),  # the second code of each byte
             helper.make_node("Mul", [n("high"), n("sixteen")], [n("high_part")]),
             helper.make_node("Sub", [n("bytes"), n("high_part")], [n("low")]),  # the first
             helper.make_node("Reshape", [n("low"), n("pairs")], [n("low_column")]),
             helper.make_node("Reshape", [n("high"), n("pairs")], [n("high_column")]),
             helper.make_node("Concat", [n("low_column"), n("high_column")], [n("pairs_out")], axis=1),
             helper.make_node("Reshape", [n("pairs_out"), n("flat_shape")], [n("flat")]),
             helper.make_node("Slice", [n("flat"), n("start"), n("end")], [n("unpadded")]),
             helper.make_node("Reshape", [n("unpadded"), n("shape")], [n("values")])]
    return inits, nodes, n("values")


def _stored_form(name: str, weight, meta: dict):
    """(initializers, nodes) that rebuild `weight` under `name`, or None when storing it as fp32 is smallest.
    A sparse layer (its metadata says so) stores only its non-zeros and a bitmask when that is smaller."""
    w = weight.detach().float().cpu()
    dense = _rebuilt(name, w, meta, None)
    if not meta.get("sparsity"):
        return dense
    sparse = _rebuilt(name, w, meta, (w != 0).numpy().ravel())
    as_is = dense or ([numpy_helper.from_array(w.numpy(), name)], [])  # a dense fp32 weight: its initializer
    return sparse if _bytes(sparse) < _bytes(as_is) else dense


def _bytes(form) -> int:
    return sum(item.ByteSize() for part in form for item in part)


def _rebuilt(name: str, w, meta: dict, keep: np.ndarray | None):
    """(initializers, nodes) rebuilding `w` from its values at the `keep` positions (all when None) in their
    stored coding; None for a dense fp32 weight, which is stored as it is."""
    form = _value_form(name, w, meta, keep)
    if form is None and keep is None:
        return None
    if form is None:
        form = ([numpy_helper.from_array(w.numpy().ravel()[keep], f"{name}.values")], [], f"{name}.values", None)
    inits, nodes, values, scale = form
    if keep is not None:
        more_inits, more_nodes, values = _scattered(name, values, keep)
        inits, nodes = inits + more_inits, nodes + more_nodes
    inits.append(numpy_helper.from_array(np.array(w.shape, np.int64), f"{name}.shape"))
    shaped = f"{name}.unscaled" if scale is not None else name
    nodes.append(helper.make_node("Reshape", [values, f"{name}.shape"], [shaped]))
    if scale is not None:
        inits.append(numpy_helper.from_array(scale, f"{name}.scale"))
        nodes.append(helper.make_node("Mul", [shaped, f"{name}.scale"], [name]))
    return inits, nodes


def _looked_up(name: str, book: np.ndarray, codes: np.ndarray, output: str) -> tuple[list, list, str]:
    """(initializers, nodes, output) giving book[codes] under `output`: the codebook and the codes as indices
    into it (a byte each, or nibbles two per byte for at most 16 values), looked up with Gather."""
    inits, nodes, indices = _codes(f"{name}.indices", codes, nibbles=len(book) <= 16)
    return ([numpy_helper.from_array(book, f"{name}.codebook"), *inits],
            [*nodes, helper.make_node("Cast", [indices], [f"{name}.index64"], to=onnx.TensorProto.INT64),
             helper.make_node("Gather", [f"{name}.codebook", f"{name}.index64"], [output], axis=0)],
            output)


def _value_form(name: str, w, meta: dict, keep: np.ndarray | None):
    """(initializers, nodes, flat float output, per-channel scale or None) giving the values of `w` at the `keep`
    positions (every value when None) in the stored coding; None for fp32."""
    flat = w.numpy().ravel()
    chosen = flat if keep is None else flat[keep]
    bits = int(meta.get("weight_bits", 32))
    if "clusters" in meta:
        book, codes = np.unique(chosen, return_inverse=True)
        if len(book) <= 256:
            return (*_looked_up(name, book.astype(np.float32), codes, f"{name}.flat_values"), None)
    if bits <= 8:
        q, scales = weight_grid(w, bits, per_channel=True)
        offset = NIBBLE_OFFSET if bits <= 4 else 0  # 4-bit codes -7..7 stored as 1..15
        q = q.astype(np.int16) + offset
        inits, nodes, codes = _codes(f"{name}.codes", q if keep is None else q[keep], nibbles=bits <= 4)
        nodes.append(helper.make_node("Cast", [codes], [f"{name}.float_codes"], to=onnx.TensorProto.FLOAT))
        if offset:
            inits.append(numpy_helper.from_array(np.array(offset, np.float32), f"{name}.offset"))
            nodes.append(helper.make_node("Sub", [f"{name}.float_codes", f"{name}.offset"], [f"{name}.centred"]))
        scale = scales.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
        return inits, nodes, nodes[-1].output[0], scale
    if bits == 16:
        return ([numpy_helper.from_array(chosen.astype(np.float16), f"{name}.half")],
                [helper.make_node("Cast", [f"{name}.half"], [f"{name}.flat_values"], to=onnx.TensorProto.FLOAT)],
                f"{name}.flat_values", None)
    return None


def _int8_form(name: str, q: np.ndarray, tag: str):
    """(initializers, nodes) rebuilding the int8 tensor `q` under `name` (its parts named `tag`.*), or None when
    it is smallest as it is: nibble indices into at most 16 distinct values (of the whole tensor, or of each output
    channel: a shared weight's values are re-quantized with one scale per channel), or only its non-zeros and a
    bitmask."""
    if q.ndim == 0:
        return None
    plain = ([numpy_helper.from_array(q, name)], [])
    best = min((f for f in (_int8_indexed(name, q, tag), _int8_sparse(name, q, tag)) if f is not None), key=_bytes)
    return best if _bytes(best) < _bytes(plain) else None


def _int8_indexed(name: str, q: np.ndarray, tag: str):
    """`q` as nibble indices into its distinct values, one table for the tensor or one per output channel
    (row), whichever holds at most 16 values per table; None when neither does."""
    rows = q.reshape(1 if len(np.unique(q)) <= 16 else q.shape[0], -1)
    tables = [np.unique(row, return_inverse=True) for row in rows]
    if max(len(book) for book, _ in tables) > 16:
        return None
    table = np.zeros((len(rows), 16), np.int8)
    for row, (book, _) in enumerate(tables):
        table[row, :len(book)] = book
    codes = np.stack([c.ravel() for _, c in tables])
    inits, nodes, indices = _codes(f"{tag}.indices", codes.ravel(), nibbles=True)
    n = lambda k: f"{tag}.{k}"  # noqa: E731
    inits += [numpy_helper.from_array(table.ravel(), n("table")),
              numpy_helper.from_array(np.array([len(rows), -1], np.int64), n("rows")),
              numpy_helper.from_array((16 * np.arange(len(rows), dtype=np.int32))[:, None], n("row_offsets")),
              numpy_helper.from_array(np.array(q.shape, np.int64), n("shape"))]
    nodes += [helper.make_node("Reshape", [indices, n("rows")], [n("row_indices")]),
              helper.make_node("Add", [n("row_indices"), n("row_offsets")], [n("table_indices")]),  # row r: 16r..
              helper.make_node("Cast", [n("table_indices")], [n("index64")], to=onnx.TensorProto.INT64),
              helper.make_node("Gather", [n("table"), n("index64")], [n("values")], axis=0),
              helper.make_node("Reshape", [n("values"), n("shape")], [name])]
    return inits, nodes


def _int8_sparse(name: str, q: np.ndarray, tag: str):
    """`q` as its non-zeros (nibble indices into them when at most 16 distinct, else one byte each) and a
    bitmask."""
    keep = q.ravel() != 0
    chosen = q.ravel()[keep]
    book, codes = np.unique(chosen, return_inverse=True)
    n = lambda k: f"{tag}.{k}"  # noqa: E731
    if 0 < len(book) <= 16:
        inits, nodes, _ = _looked_up(tag, book.astype(np.int8), codes.ravel(), n("nonzeros"))
    else:
        inits, nodes = [numpy_helper.from_array(chosen, n("nonzeros"))], []
    more_inits, more_nodes, dense = _scattered(tag, n("nonzeros"), keep, zero=np.zeros(1, np.int8))
    inits += [*more_inits, numpy_helper.from_array(np.array(q.shape, np.int64), n("shape"))]
    nodes += [*more_nodes, helper.make_node("Reshape", [dense, n("shape")], [name])]
    return inits, nodes


BIT_WEIGHTS = np.array([128, 64, 32, 16, 8, 4, 2, 1], np.int32)  # np.packbits order: the first weight is the MSB


def _scattered(name: str, values: str, keep: np.ndarray, zero: np.ndarray = np.zeros(1, np.float32)
               ) -> tuple[list, list, str]:
    """(initializers, nodes, flat output) putting the 1-D `values` (of `zero`'s type) at the `keep` positions,
    zeros elsewhere.
    The mask is unpacked from bits with Div and Mod; the k-th kept weight reads values[k] through
    Gather([0, values...], CumSum(mask) * mask), so every pruned weight reads the leading zero."""
    n = lambda k: f"{name}.{k}"  # noqa: E731
    constants = {"mask_bits": np.packbits(keep.astype(np.uint8)), "bit_weights": BIT_WEIGHTS,
                 "two": np.array(2, np.int32), "column": np.array([-1, 1], np.int64),
                 "flat_shape": np.array([-1], np.int64), "start": np.array([0], np.int64),
                 "end": np.array([keep.size], np.int64), "axis": np.array(0, np.int32), "zero": zero}
    inits = [numpy_helper.from_array(v, n(k)) for k, v in constants.items()]
    nodes = [helper.make_node("Cast", [n("mask_bits")], [n("mask_bytes")], to=onnx.TensorProto.INT32),
             helper.make_node("Reshape", [n("mask_bytes"), n("column")], [n("byte_column")]),
             helper.make_node("Div", [n("byte_column"), n("bit_weights")], [n("shifted")]),
             helper.make_node("Mod", [n("shifted"), n("two")], [n("bit_rows")]),
             helper.make_node("Reshape", [n("bit_rows"), n("flat_shape")], [n("padded_mask")]),
             helper.make_node("Slice", [n("padded_mask"), n("start"), n("end")], [n("mask")]),
             helper.make_node("CumSum", [n("mask"), n("axis")], [n("rank")]),
             helper.make_node("Mul", [n("rank"), n("mask")], [n("position")]),
             helper.make_node("Cast", [n("position")], [n("position64")], to=onnx.TensorProto.INT64),
             helper.make_node("Concat", [n("zero"), values], [n("zero_and_values")], axis=0),
             helper.make_node("Gather", [n("zero_and_values"), n("position64")], [n("dense")], axis=0)]
    return inits, nodes, n("dense")
