"""The cost model: latency, energy, size, peak memory, MACs and parameters of a (compressed) module on a device.

It reads the module itself, never the policy: shapes come from tracing the module, bit-widths,
sparsity and codebooks from the metadata each compressed module carries (compress/base.py).

Latency of one op (or of one fused group, see fusion.py) is a roofline plus a fixed overhead:

    compute = work / (peak_gmacs[dtype] x efficiency[kind] x shape efficiency [x narrow_efficiency])
    memory  = activations in and out [+ im2col unfold] / their bandwidth + weights / theirs
    latency = overhead[kind] + max(compute, memory) + (1 - overlap) x min(compute, memory)

`dtype` is the narrowest one the profile supports that holds the layer's weight and activation bits;
`work` is, for a pooling op, its window reads; otherwise the MACs with channels padded to the profile's `channel_multiple`, and only the non-zero
weights' MACs where the profile skips zeros (`sparse`); the shape efficiency m/(m + m_half) x ...
makes small GEMMs (few output channels, pixels or reduction terms) slower per MAC, and a convolution
with fewer than `narrow_n` output positions keeps only `narrow_efficiency` of its efficiency (CPU
kernels vectorize over output pixels: a 2x2 or 3x3 map cannot fill a vector and takes a slower path,
which is where a late stage's large weights are processed). Memory has two
levels: feature maps that fit in the on-chip memory (`cache_kb`) move at its bandwidth, and so do
the weights of a model whose weights all fit (they stay there between inferences); everything else
moves at the main-memory bandwidth. The model's
latency is the sum over ops: single-stream, batch-1 inference. A lower bit-width therefore speeds a
layer up only where the profile has a narrower dtype, and sparsity only where it skips zeros.

Energy: MACs x energy per MAC at the dtype's width, weights read from DRAM at their stored size
(packed bits, scales, sparse index: what compression saves even where it does not save time),
activations at the SRAM energy per byte, plus static power x latency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..compress.base import WEIGHT_KINDS, get_meta
from ..compress.sparsity import index_bytes
from ..weights import weight_bytes
from . import kernels, pack, quantized
from .flow import INPUT, Flow
from .fusion import fusion_groups
from .hardware import load_profile
from .memory import peak_activation_bytes
from .profiles import DTYPE_BITS, HardwareProfile
from .runtimes import INT8_RUNTIMES
from .trace import trace

GEMM_KINDS = ("conv", "linear", "matmul")


@dataclass
class Estimate:
    """Totals of one model on one device, with the per-layer breakdown in `layers`."""

    latency_ms: float
    energy_mj: float
    size_kb: float
    peak_mem_kb: float
    macs: int
    params: int
    hardware: str
    layers: pd.DataFrame
    threads: int | None = None  # torch threads the latency is for (None: a datasheet profile, no thread count)
    runtime: str = "torch"  # what the latency is for: the profile's runtime

    def as_dict(self) -> dict:
        return {"latency_ms": self.latency_ms, "energy_mj": self.energy_mj, "size_kb": self.size_kb,
                "peak_mem_kb": self.peak_mem_kb, "macs": self.macs, "params": self.params}

    def __repr__(self) -> str:
        return (f"Estimate(hardware={self.hardware!r}, runtime={self.runtime!r}, threads={self.threads}, latency_ms={self.latency_ms:.4g}, energy_mj={self.energy_mj:.4g}, "
                f"size_kb={self.size_kb:.4g}, peak_mem_kb={self.peak_mem_kb:.4g}, macs={self.macs:,}, "
                f"params={self.params:,})")


def weight_bits(module: nn.Module | None) -> int:
    return int(get_meta(module).get("weight_bits", 32)) if module is not None else 32


def size_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: each conv/linear weight as weights.weight_bytes counts it
    (bit-packed values, per-channel scales, sparse index, codebook, optional Huffman), every other tensor of
    the state_dict at its own dtype size. cost/pack.py writes exactly these bytes."""
    return sum(nbytes for _, _, _, nbytes in pack.tensor_entries(model))


def padded(count: np.ndarray, multiple: int) -> np.ndarray:
    """`count` rounded up to a multiple of `multiple` (channels filling whole SIMD lanes or PE rows)."""
    return np.ceil(count / multiple) * multiple


def shape_efficiency(m, n, k, half: dict) -> np.ndarray:
    """Fraction of a kernel's large-GEMM efficiency reached at these sizes: d / (d + d_half) per dimension."""
    eff = np.ones_like(np.asarray(m, dtype=float))
    for dim, values in (("m", m), ("n", n), ("k", k)):
        h = half.get(dim, 0.0)
        if h:
            eff = eff * values / (values + h)
    return eff


def narrow_factor(conv, n, narrow_n: int, efficiency: float) -> np.ndarray:
    """Per op, the efficiency factor of the profile's narrow-convolution path: `efficiency` for a convolution
    (`conv` true) with fewer than `narrow_n` output positions `n`, else 1."""
    return np.where(np.asarray(conv) & (np.asarray(n) < narrow_n), efficiency, 1.0)


def roofline_s(compute_s, memory_s, overlap: float):
    """(seconds, compute-bound?) per op: compute against memory time, overlapping by `overlap`."""
    return np.maximum(compute_s, memory_s) + (1.0 - overlap) * np.minimum(compute_s, memory_s), compute_s >= memory_s


def on_chip(act_bytes, weight_bytes, cache_kb: float) -> tuple[np.ndarray, bool]:
    """Which traffic the on-chip memory serves: per op, feature maps that fit in it; and the weights, when the
    whole model's weights fit (they then stay between inferences; a model that does not fit streams them)."""
    size = cache_kb * 1024
    return np.asarray(act_bytes) <= size, bool(size) and float(np.sum(weight_bytes)) <= size


def memory_s(act_bytes, weight_bytes, act_cached, weights_cached, bandwidth_gbs: float, cache_bandwidth_gbs: float):
    """Seconds of memory traffic per op: each byte at the bandwidth of the memory level that serves it."""
    cache = cache_bandwidth_gbs or bandwidth_gbs
    act_bw = np.where(act_cached, cache, bandwidth_gbs)
    w_bw = np.where(weights_cached, cache, bandwidth_gbs)
    return (act_bytes / act_bw + weight_bytes / w_bw) / 1e9


def op_table(graph, flow: Flow, profile: HardwareProfile) -> pd.DataFrame:
    """One row per layer with what its cost depends on, on this profile: dtype, work, GEMM sizes, traffic."""
    layers = graph.layers
    anchor = fusion_groups(graph, flow, profile.fuses)
    rows = [_layer_facts(l, profile) for l in layers]
    int8 = _int8_flags(layers, rows, profile)
    # a fused op writes as its kernel does, unless the runtime has no int8 kernel for it (the kernel dequantizes)
    runs_int8 = [int8[a] and (a == i or quantized.native_op(l)) for i, (l, a) in enumerate(zip(layers, anchor))]
    width = _output_widths(layers, flow, rows, runs_int8)
    folded = quantized.folded(layers, anchor, runs_int8)
    input_bytes = math.prod(graph.input_shape) * 4
    last = {a: i for i, a in enumerate(anchor)}
    for i, row in enumerate(rows):  # a fused group reads its outside inputs and writes its last member's output
        row["in_bytes"] = sum(input_bytes if p == INPUT else layers[p].out_numel * width[p]
                              for p in flow.inputs[i] if p == INPUT or anchor[p] != anchor[i])
        row["out_bytes"] = layers[i].out_numel * width[i] if last[anchor[i]] == i else 0.0
        row["anchor"], row["width"], row["int8"], row["folded"] = anchor[i], width[i], int8[i], folded[i]
    table = pd.DataFrame(rows)
    table.attrs["input_bytes"] = input_bytes
    if any(int8):
        table.attrs["boundaries"] = quantized.boundaries(layers, flow, anchor, int8, graph.input_shape)
    return table


def _int8_flags(layers, rows, profile: HardwareProfile) -> list[bool]:
    """Per layer, whether it runs an int8 kernel: only in a runtime that has them (cost/quantized.py's rule, torch.ao's;
    ONNX Runtime's QDQ flow quantizes the same ops in the models here, and its timings are its own)."""
    if profile.runtime not in INT8_RUNTIMES:
        return [False] * len(layers)
    return quantized.int8_flags(layers, [row["dtype"] == "int8" for row in rows])


def _layer_facts(layer, profile: HardwareProfile) -> dict:
    """The device-dependent facts of one layer: its dtype, its work (padded, sparse-aware) and weight bytes."""
    meta = get_meta(layer.module) if layer.module is not None else {}
    weighted = layer.kind in WEIGHT_KINDS
    wbits, abits = (int(meta.get("weight_bits", 32)), int(meta.get("act_bits", 32))) if weighted else (32, 32)
    dtype = profile.dtype_for(max(wbits, abits)) if weighted or layer.kind == "matmul" else profile.dtype_for(32)
    density = 1.0 - float(meta.get("sparsity", 0.0)) if profile.sparse else 1.0
    m, n, k = kernels.gemm_dims(layer)
    work = layer.macs * density
    if layer.kind in GEMM_KINDS:
        work *= padded(m, profile.channel_multiple) / m
    elif layer.kind == "dwconv":
        channels = layer.module.out_channels
        work *= padded(channels, profile.channel_multiple) / channels
    elif layer.kind == "pool":
        work = kernels.pool_work(layer)
    stored, dense = _weight_bytes(layer, dtype, density)
    return {"name": layer.name, "kind": layer.kind, "type": layer.type, "out_shape": layer.out_shape,
            "macs": layer.macs, "params": layer.params, "weight_bits": wbits, "act_bits": abits, "dtype": dtype,
            "work": work, "m": m, "n": n, "k": k, "w_bytes": dense, "w_stored": stored,
            "unfold_bytes": _unfold_elements(layer) * DTYPE_BITS[dtype] / 8,
            "mac_bits": DTYPE_BITS[dtype], "exec_macs": layer.macs * density}


def _weight_bytes(layer, dtype: str, density: float) -> tuple[float, float]:
    """(bytes stored, bytes a kernel reads) of the layer's own tensors. A conv/linear weight is stored as
    weights.weight_bytes counts it and read in the dtype the kernel computes in (only the non-zeros, plus
    their index, where the profile skips zeros); other tensors (bias, BatchNorm) at their own size."""
    if layer.module is None:
        return 0.0, 0.0
    tensors = _named_own(layer.module)
    weight = dict(tensors).get("weight") if layer.kind in WEIGHT_KINDS else None
    other = float(sum(t.numel() * t.element_size() for _, t in tensors if t is not weight))
    if weight is None:
        return other, other
    meta = get_meta(layer.module)
    stored = weight_bytes(weight, meta) if meta else weight.numel() * weight.element_size()
    read = weight.numel() * DTYPE_BITS[dtype] / 8
    if density < 1.0:
        read = read * density + index_bytes(weight.detach() != 0)
    return stored + other, read + other


def _named_own(module: nn.Module):
    return list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))


def _unfold_elements(layer) -> int:
    """Elements an im2col convolution writes and reads back: the input unfolded to one column per output pixel."""
    m = layer.module
    if layer.kind != "conv" or not isinstance(m, nn.modules.conv._ConvNd) or math.prod(m.kernel_size) == 1:
        return 0
    spatial = math.prod(layer.out_shape[2:]) * layer.out_shape[0]
    return 2 * spatial * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def _output_widths(layers, flow: Flow, rows, int8: list[bool]) -> list[float]:
    """Bytes per element of every layer's output (`int8`: per layer, whether it computes in int8): an
    int8 kernel writes one; a weight layer its dtype; in a model
    the runtime runs partly int8, any other computing op fp32 (its input is dequantized); shape ops and the
    rest their input's."""
    mixed = any(int8)
    width = []
    for i, l in enumerate(layers):
        if int8[i]:
            width.append(1.0)
        elif l.kind in WEIGHT_KINDS or l.kind == "matmul":
            width.append(DTYPE_BITS[rows[i]["dtype"]] / 8)
        elif mixed and l.kind != "param" and kernels.family(l) != "other":
            width.append(4.0)
        else:
            first = flow.inputs[i][0] if flow.inputs[i] else INPUT
            width.append(4.0 if first == INPUT else width[first])
    return width


def _conversion_bytes(graph, table: pd.DataFrame) -> list[float]:
    """Per layer, the bytes of the float <-> int8 conversions it reads: a quantize writes one byte per element, a
    dequantize four; a float op inside an int8 kernel's group (a SiLU after an int8 convolution) dequantizes its
    input too."""
    out = [0.0] * len(table)
    for i, kind, shape in table.attrs.get("boundaries", []):
        out[i] += math.prod(shape) * (1.0 if kind == "quantize" else 4.0)
    anchor, int8 = table["anchor"].to_numpy(), table["int8"].to_numpy()
    for i, width in enumerate(table["width"]):
        if anchor[i] != i and int8[anchor[i]] and width == 4.0:
            out[i] += 4.0 * graph.layers[i].out_numel
    return out


def kernel_seconds(graph, table: pd.DataFrame, profile: HardwareProfile) -> np.ndarray:
    """Per row of `op_table`, the kernel regressor's seconds for the kernel it anchors (0 for other members)."""
    index, rows = kernels.features(graph.layers, list(table["anchor"]), int8=list(table["int8"]))
    seconds = np.zeros(len(table))
    seconds[index] = kernels.predict_s(rows, profile)
    converts = table.attrs.get("boundaries", [])
    if converts:  # float <-> int8 conversions, each on the kernel that pays it
        paid = kernels.predict_s(np.array([kernels.boundary_row(kind, shape) for _, kind, shape in converts]), profile)
        np.add.at(seconds, [i for i, _, _ in converts], paid)
    return seconds


def price(table: pd.DataFrame, profile: HardwareProfile, kernel_s: np.ndarray | None = None) -> pd.DataFrame:
    """Latency and energy of every op of `op_table`. A fused group is priced on its anchor's row (the anchor's
    work, the group's traffic and weights, one overhead); its other members cost nothing of their own. With
    `kernel_s` (a profile with timed kernels) latency is the kernel regressor's, not the roofline's."""
    anchor = table["anchor"].to_numpy()
    is_anchor = anchor == np.arange(len(table))

    def group_sum(column: str) -> np.ndarray:  # a group's total on its anchor's row, 0 elsewhere
        return np.bincount(anchor, weights=table[column].to_numpy(float), minlength=len(table))

    act_bytes = group_sum("in_bytes") + group_sum("out_bytes") + table["unfold_bytes"].to_numpy(float) * (
        is_anchor & profile.im2col)
    w_bytes = group_sum("w_bytes")
    act_cached, weights_cached = on_chip(act_bytes, w_bytes, profile.cache_kb)
    kinds = table["kind"].to_numpy()
    rate = np.array([profile.peak_gmacs[d] * profile.efficiency.get(k, 1.0) for d, k in zip(table["dtype"], kinds)])
    n = table["n"].to_numpy(float)
    rate = rate * np.where(np.isin(kinds, GEMM_KINDS), shape_efficiency(
        table["m"].to_numpy(float), n, table["k"].to_numpy(float), profile.gemm_half), 1.0)
    rate = rate * narrow_factor(kinds == "conv", n, profile.narrow_n, profile.narrow_efficiency)
    bound_s, compute_bound = roofline_s(
        table["work"].to_numpy(float) * is_anchor / (rate * 1e9),
        memory_s(act_bytes, w_bytes, act_cached, weights_cached, profile.bandwidth_gbs, profile.cache_bandwidth_gbs),
        profile.overlap)
    traffic = act_bytes + w_bytes
    real = (kinds != "param") & is_anchor
    roofline = bound_s + np.array([profile.overhead_for(k) for k in kinds]) * 1e-6
    latency_s = np.where(real, roofline if kernel_s is None else kernel_s, 0.0)
    e = profile.energy
    mac_pj = np.array([_mac_energy_pj(e["mac_pj"], b) for b in table["mac_bits"]])
    energy_j = (group_sum("exec_macs") * mac_pj + group_sum("w_stored") * e["dram_pj_per_byte"]
                + act_bytes * e["sram_pj_per_byte"]) * 1e-12 + e["static_w"] * latency_s
    names = table["name"].to_numpy()
    return pd.DataFrame({
        "name": names, "kind": kinds, "type": table["type"], "out_shape": table["out_shape"],
        "macs": table["macs"], "params": table["params"], "weight_bits": table["weight_bits"],
        "act_bits": table["act_bits"], "dtype": table["dtype"], "bytes": traffic,
        "bound": np.where(real, np.where(compute_bound, "compute", "memory"), ""),
        "latency_ms": latency_s * 1e3, "energy_mj": energy_j * 1e3,
        "fused_into": [names[a] if a != i else "" for i, a in enumerate(anchor)],
    }).set_index("name")


def _mac_energy_pj(table: dict, bits: int) -> float:
    """Energy of one MAC at `bits` bits: the table's entry for the narrowest width >= bits (else the widest)."""
    wider = [b for b in table if b >= bits]
    return table[min(wider)] if wider else table[max(table)]


def estimate(model: nn.Module, example_input: torch.Tensor, hardware="host", threads: int | None = None,
             runtime: str | None = None) -> Estimate:
    """Price `model` on `hardware` (a profile name, a YAML path or a HardwareProfile) run with `threads`
    threads in `runtime` (None: `host` at torch's count in eager PyTorch, a fitted profile at its own; another
    count than a fitted profile's, or another runtime than a profile's, is refused). The latency is the sum of
    the kernels plus the runtime's one call per inference (`call_us`, 0 for eager PyTorch)."""
    profile = load_profile(hardware, threads, runtime)
    graph, flow = trace(model, example_input)
    table = op_table(graph, flow, profile)
    layers = price(table, profile, kernel_seconds(graph, table, profile) if profile.kernels else None)
    out_bytes = table["width"].to_numpy() * np.array([l.out_numel for l in graph.layers], dtype=float)
    alive = Flow(flow.inputs, [a or b for a, b in zip(flow.inplace, table["folded"])], flow.outputs)
    peak, _ = peak_activation_bytes(graph, alive, list(out_bytes), table.attrs["input_bytes"],
                                    _conversion_bytes(graph, table))  # an op folded into its kernel writes in its output
    return Estimate(
        latency_ms=float(layers["latency_ms"].sum()) + profile.call_us * 1e-3,
        energy_mj=float(layers["energy_mj"].sum()),
        size_kb=size_bytes(model) / 1024,
        peak_mem_kb=peak / 1024,
        macs=int(layers["macs"].sum()),
        params=sum(p.numel() for p in model.parameters()),
        hardware=profile.name,
        layers=layers,
        threads=profile.threads,
        runtime=profile.runtime,
    )
