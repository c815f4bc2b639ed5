"""Fused ops: chains of layers a runtime runs as one kernel, priced as one.

A profile's `fuses` lists patterns such as conv+bn, conv+bn+relu or conv+bn+add+relu. Starting at
every anchor layer (a conv, a linear or an add) the longest pattern is matched along the data flow:
each next layer must be the only reader of the previous one's output and match the next token. A
fused group is priced once: the anchor's compute, the group's outside inputs and final output as
memory traffic (intermediate feature maps never leave the kernel), and one fixed overhead. The
model itself is not changed: this is how the runtime will run it.
"""
from __future__ import annotations

from .flow import Flow

RELU_TYPES = {"ReLU", "ReLU6", "relu", "relu_", "relu6", "Hardtanh", "hardtanh", "hardtanh_"}
ADD_TYPES = {"add", "iadd", "add_"}


def matches(layer, token: str) -> bool:
    """Whether `layer` is an op the pattern token stands for."""
    if token == "conv":
        return layer.kind in ("conv", "dwconv")
    if token == "linear":
        return layer.kind == "linear"
    if token == "bn":
        return layer.kind == "norm" and "batch" in layer.type.lower()
    if token == "relu":
        return layer.kind in ("act", "elementwise") and layer.type in RELU_TYPES
    if token == "act":
        return layer.kind == "act" or layer.type in RELU_TYPES
    return layer.kind == "elementwise" and layer.type in ADD_TYPES  # add


def fusion_groups(graph, flow: Flow, patterns) -> list[int]:
    """For every layer the index of the group it runs in: its anchor's index (itself when not fused)."""
    anchor = list(range(len(graph.layers)))
    if not patterns:
        return anchor
    readers = flow.consumers()
    outputs = set(flow.outputs)
    for i, layer in enumerate(graph.layers):
        if anchor[i] != i:
            continue
        best: list[int] = []
        for pattern in patterns:
            chain = _match(graph.layers, readers, outputs, anchor, i, pattern)
            if len(chain) > len(best):
                best = chain
        for j in best[1:]:
            anchor[j] = i
    return anchor


def _match(layers, readers, outputs, anchor, start: int, pattern) -> list[int]:
    """The layers of `pattern` starting at `start` along sole-reader edges, or [] when it does not match."""
    if not matches(layers[start], pattern[0]):
        return []
    chain = [start]
    for token in pattern[1:]:
        cur = chain[-1]
        nxt = readers[cur]
        if cur in outputs or len(nxt) != 1 or anchor[nxt[0]] != nxt[0] or not matches(layers[nxt[0]], token):
            return []
        chain.append(nxt[0])
    return chain
