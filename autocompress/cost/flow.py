"""Who feeds whom: the data-flow edges between a LayerGraph's layers, for fusion and liveness.

The LayerGraph lists ops in execution order; this adds, for every layer, the layers whose outputs it
reads and whether it writes in place. The model is traced again with torch.fx (symbolic only, a few
milliseconds) and its nodes are matched in order to the graph's layers by name. Ops the graph skips
as free (view, flatten, getitem, ...) are aliases: a layer reading one reads what the alias came
from. Where torch.fx cannot trace the model (the graph then came from module hooks) every layer is
taken to read its predecessor: a chain.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

INPUT = -1  # the model's input, as a producer index
INPLACE_FUNCS = {"iadd", "imul", "isub", "itruediv"}


@dataclass
class Flow:
    """inputs[i]: producers of layer i (layer indices, INPUT for the model input), in argument order;
    inplace[i]: layer i writes into its first input's memory; outputs: producers of the model's outputs."""

    inputs: list[list[int]]
    inplace: list[bool]
    outputs: list[int]

    def consumers(self) -> list[list[int]]:
        out = [[] for _ in self.inputs]
        for i, producers in enumerate(self.inputs):
            for p in producers:
                if p != INPUT:
                    out[p].append(i)
        return out


def dataflow(model: nn.Module, graph) -> Flow:
    """The edges between `graph.layers` (analyzed from `model`)."""
    n = len(graph.layers)
    if graph.traced_with == "fx":
        try:
            return _fx_flow(model, graph)
        except Exception:  # a model fx traced once but not twice: fall back to the chain
            pass
    return Flow([[i - 1] for i in range(n)], [False] * n, [n - 1] if n else [])


def _fx_flow(model: nn.Module, graph) -> Flow:
    import torch.fx

    return flow_of(torch.fx.symbolic_trace(model), graph)


def flow_of(gm, graph) -> Flow:
    """The edges between `graph.layers`, read from the fx GraphModule they were traced from."""
    modules = dict(gm.named_modules())
    layers = graph.layers  # parameters used by functional code come last, as layers of kind "param"
    index: dict = {}      # fx node -> producer indices (layers, INPUT): one, or several for an alias of many
    inputs, inplace, j = [[] for _ in layers], [False] * len(layers), 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            index[node] = [INPUT]
            continue
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        producers = [p for a in node.all_input_nodes for p in index.get(a, [])]
        name = node.target if node.op == "call_module" else node.name
        if j < len(layers) and layers[j].name == name:
            inputs[j] = list(dict.fromkeys(producers))
            inplace[j] = _writes_in_place(node, modules)
            index[node] = [j]
            j += 1
        else:  # a free op: an alias of what it reads
            index[node] = list(dict.fromkeys(producers))
    if any(l.kind != "param" for l in layers[j:]):
        raise ValueError("fx nodes do not line up with the graph's layers")
    output = next(nd for nd in gm.graph.nodes if nd.op == "output")
    outputs = [p for a in output.all_input_nodes for p in index.get(a, []) if p != INPUT]
    return Flow(inputs, inplace, list(dict.fromkeys(outputs)))


def _writes_in_place(node, modules) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    name = getattr(node.target, "__name__", str(node.target))
    return (name in INPLACE_FUNCS or bool(node.kwargs.get("inplace"))
            or (name.endswith("_") and not name.startswith("_")))  # relu_, add_: torch's in-place naming
