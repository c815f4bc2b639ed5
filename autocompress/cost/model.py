"""The cost model: latency, energy, size, MACs and parameters of a (compressed) module on a device.

It reads the module itself, never the policy: shapes come from tracing the module, bit-widths from
the metadata each compressed module carries. Latency per op is a roofline (compute time at the
dtype's peak times a per-kind efficiency, against memory traffic over bandwidth) plus a fixed
per-op overhead; the model's latency is the sum over ops, which is how eager single-stream
inference runs. Energy is per-MAC energy by bit-width plus per-byte memory energy plus static
power over the latency.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn

from ..compress.base import get_meta
from ..graph import analyze
from .profiles import HardwareProfile, load_profile

ACT_BYTES = 4  # activations stay fp32 until activation quantization lands


@dataclass
class Estimate:
    """Totals of one model on one device, with the per-layer breakdown in `layers`."""

    latency_ms: float
    energy_mj: float
    size_kb: float
    macs: int
    params: int
    hardware: str
    layers: pd.DataFrame

    def as_dict(self) -> dict:
        return {"latency_ms": self.latency_ms, "energy_mj": self.energy_mj, "size_kb": self.size_kb,
                "macs": self.macs, "params": self.params}

    def __repr__(self) -> str:
        return (f"Estimate(hardware={self.hardware!r}, latency_ms={self.latency_ms:.4g}, energy_mj={self.energy_mj:.4g}, "
                f"size_kb={self.size_kb:.4g}, macs={self.macs:,}, params={self.params:,})")


def weight_bits(module: nn.Module | None) -> int:
    return int(get_meta(module).get("weight_bits", 32)) if module is not None else 32


def size_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: each conv/linear weight as compress.storage.weight_bytes
    counts it (bit-packed values, per-channel scales, sparse index, codebook, optional Huffman), every other
    tensor of the state_dict at its own dtype size."""
    from ..compress.storage import weight_bytes

    total = 0
    for module in model.modules():
        meta = get_meta(module)
        for name, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if name == "weight" and meta:
                total += weight_bytes(p, meta)
            else:
                total += p.numel() * p.element_size()
    return total


def _mac_energy_pj(profile: HardwareProfile, bits: int) -> float:
    table = profile.energy["mac_pj"]
    wider = [b for b in table if b >= bits]
    return table[min(wider)] if wider else table[max(table)]


def layer_features(layer) -> dict:
    """What the cost of one op depends on, independent of the device."""
    bits = weight_bits(layer.module)
    inputs = 2 if layer.kind == "elementwise" and layer.type in ("add", "iadd", "mul", "imul", "sub") else 1
    return {"kind": layer.kind, "macs": layer.macs, "bits": bits,
            "act_bytes": (inputs * layer.in_numel + layer.out_numel) * ACT_BYTES,
            "w_bytes": math.ceil(layer.params * bits / 8), "unfold_bytes": _unfold_bytes(layer)}


def _unfold_bytes(layer) -> int:
    """Bytes an im2col convolution writes and reads back: the input unfolded to one column per output pixel."""
    m = layer.module
    if layer.kind != "conv" or not isinstance(m, nn.modules.conv._ConvNd) or math.prod(m.kernel_size) == 1:
        return 0
    spatial = math.prod(layer.out_shape[2:]) * layer.out_shape[0]
    return 2 * spatial * (m.in_channels // m.groups) * math.prod(m.kernel_size) * ACT_BYTES


def layer_latency_s(f: dict, profile: HardwareProfile) -> tuple[float, bool]:
    """Roofline latency of one op plus its fixed overhead; also whether compute bounds it."""
    dtype = profile.dtype_for(f["bits"])
    compute_s = f["macs"] / (profile.peak_gmacs[dtype] * 1e9 * profile.efficiency.get(f["kind"], 1.0))
    traffic = f["act_bytes"] + f["w_bytes"] + (f["unfold_bytes"] if profile.im2col else 0)
    memory_s = traffic / (profile.bandwidth_gbs * 1e9)
    # overlap 1 is the classic roofline (memory hidden under compute); CPUs' kernels overlap less
    bound_s = max(compute_s, memory_s) + (1.0 - profile.overlap) * min(compute_s, memory_s)
    return profile.overhead_for(f["kind"]) * 1e-6 + bound_s, compute_s >= memory_s


def _layer_row(layer, profile: HardwareProfile) -> dict:
    f = layer_features(layer)
    latency_s, compute_bound = layer_latency_s(f, profile)
    e = profile.energy
    energy_j = (f["macs"] * _mac_energy_pj(profile, f["bits"]) + f["w_bytes"] * e["dram_pj_per_byte"]
                + f["act_bytes"] * e["sram_pj_per_byte"]) * 1e-12 + e["static_w"] * latency_s
    return {"name": layer.name, "kind": layer.kind, "type": layer.type, "out_shape": layer.out_shape,
            "macs": layer.macs, "params": layer.params, "weight_bits": f["bits"], "dtype": profile.dtype_for(f["bits"]),
            "bytes": f["act_bytes"] + f["w_bytes"], "bound": "compute" if compute_bound else "memory",
            "latency_ms": latency_s * 1e3, "energy_mj": energy_j * 1e3}


def estimate(model: nn.Module, example_input: torch.Tensor, hardware="host") -> Estimate:
    """Price `model` on `hardware` (a profile name, a YAML path or a HardwareProfile)."""
    profile = load_profile(hardware)
    graph = analyze(model, example_input, groups=False)
    layers = pd.DataFrame([_layer_row(l, profile) for l in graph.layers]).set_index("name")
    return Estimate(
        latency_ms=float(layers["latency_ms"].sum()),
        energy_mj=float(layers["energy_mj"].sum()),
        size_kb=size_bytes(model) / 1024,
        macs=int(layers["macs"].sum()),
        params=sum(p.numel() for p in model.parameters()),
        hardware=profile.name,
        layers=layers,
    )
