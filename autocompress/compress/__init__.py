"""Compression techniques and `apply(model, policy)`.

Each technique is one module exposing a `Technique`: its knobs (what the search space may turn)
and `apply(model, section, example_input) -> model`. `apply` runs them in a fixed order on a copy
of the model. Compressed modules carry their own metadata (`autocompress_meta`), which is what
the cost model reads.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import AutocompressError
from . import depth, ghost, lowrank, prune, quantize, share, sparsity, student, tie
from .base import Technique, get_meta, set_meta

# The order matters: structure first (pruning changes shapes), numerics last (quantization).
TECHNIQUES: dict[str, Technique] = {t.name: t for t in (student.TECHNIQUE, depth.TECHNIQUE, prune.TECHNIQUE,
                                                          lowrank.TECHNIQUE, ghost.TECHNIQUE, tie.TECHNIQUE,
                                                          sparsity.TECHNIQUE, share.TECHNIQUE, quantize.TECHNIQUE)}


def apply(model: nn.Module, policy, example_input: torch.Tensor) -> nn.Module:
    """Return a compressed copy of `model` following `policy`; the original is left untouched."""
    unknown = set(policy) - set(TECHNIQUES)
    if unknown:
        raise AutocompressError(f"unknown technique {sorted(unknown)[0]!r} in policy; allowed: {', '.join(TECHNIQUES)}")
    out = copy.deepcopy(model).eval()
    for name, technique in TECHNIQUES.items():
        if policy.get(name):
            out = technique.apply(out, policy[name], example_input)
    return out.eval()


__all__ = ["apply", "TECHNIQUES", "Technique", "get_meta", "set_meta"]
