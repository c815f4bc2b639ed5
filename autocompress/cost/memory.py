"""Peak activation memory: the largest set of feature maps alive at once while the model runs.

Liveness over the data-flow graph, in execution order: a layer's output is allocated when the layer
runs (unless it writes in place into its input) and freed after its last reader; the model's
outputs live to the end. A conversion between float and int8 (the torch-int8 runtime) writes a tensor of its own
that lives while the layer reading it runs. The peak is taken while each layer
runs, when its inputs and its output are alive together. The input belongs to the caller and stays
alive throughout. Weights are not counted (they are the `size_kb` metric). `measure.measure_peak_activation_bytes` re-measures the same quantity on the
real model by tracking every tensor PyTorch allocates.
"""
from __future__ import annotations

import math

from .flow import INPUT, Flow


def storages(flow: Flow) -> list[int]:
    """The storage each layer's output lives in: its own index, or its input's when it writes in place."""
    owner = []
    for i, producers in enumerate(flow.inputs):
        owner.append(owner_of(owner, producers[0]) if flow.inplace[i] and producers else i)
    return owner


def owner_of(owner: list[int], producer: int) -> int:
    return INPUT if producer == INPUT else owner[producer]


def peak_activation_bytes(graph, flow: Flow, out_bytes: list[float], input_bytes: float,
                          transient: list[float] | None = None) -> tuple[float, int]:
    """(peak bytes, index of the layer running at the peak); `out_bytes[i]` is the size of layer i's output and
    `transient[i]` what else is alive only while layer i runs (the float <-> int8 conversions it reads)."""
    owner = storages(flow)
    size, last = {INPUT: input_bytes}, {}
    for i, producers in enumerate(flow.inputs):
        if graph.layers[i].kind == "param":
            continue
        if owner[i] == i:
            size[i] = out_bytes[i]
        for s in {owner_of(owner, p) for p in producers} | {owner[i]}:
            last[s] = max(last.get(s, -1), i)
    last[INPUT] = math.inf
    for p in flow.outputs:
        last[owner[p]] = math.inf
    ends: dict = {}
    for s, end in last.items():
        ends.setdefault(end, []).append(s)
    live, peak, at = input_bytes, input_bytes, -1
    for i, l in enumerate(graph.layers):
        if l.kind == "param":
            continue
        if owner[i] == i:
            live += size[i]
        now = live + (transient[i] if transient else 0.0)
        if now > peak:
            peak, at = now, i
        live -= sum(size[s] for s in ends.get(i, []))
    return peak, at
