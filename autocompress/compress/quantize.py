"""Per-layer weight quantization, simulated with fake-quant.

Weights of conv and linear layers are rounded to a symmetric per-output-channel integer grid of
`bits` bits and stored back as floats, so the module runs unchanged while holding only values a
`bits`-bit model could hold. The chosen bit-width is recorded on the module for the cost model.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Technique, set_meta

BITS = (1, 2, 4, 8, 16, 32)


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `weight` to `bits` bits, symmetric, one scale per output channel (dim 0)."""
    if bits >= 32:
        return weight
    flat = weight.reshape(weight.shape[0], -1)
    if bits == 1:  # binary: sign times the mean magnitude of the channel (XNOR-Net)
        alpha = flat.abs().mean(dim=1, keepdim=True)
        return (torch.sign(flat) * alpha).reshape_as(weight)
    qmax = 2 ** (bits - 1) - 1
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.round(flat / scale).clamp(-qmax, qmax) * scale).reshape_as(weight)


def _targets(graph):
    return [(l.name, "x".join(map(str, l.out_shape[2:])) or "flat")
            for l in graph.layers if l.kind in ("conv", "dwconv", "linear") and l.module is not None]


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    for name, bits in section.get("weight_bits", {}).items():
        bits = int(bits)
        if bits >= 32:
            continue
        module = model.get_submodule(name)
        module.weight.data = fake_quantize(module.weight.data, bits)
        set_meta(module, weight_bits=bits)
    return model


TECHNIQUE = Technique(
    name="quantize",
    fields={"weight_bits": [32, 16, 8, 4]},
    settings={},
    targets=_targets,
    apply=apply,
)
