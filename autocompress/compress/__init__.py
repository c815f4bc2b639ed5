"""Compression techniques and `apply(model, policy)`.

Each technique is one module exposing a `Technique` (see base.py: its order, knobs with their legal
ranges, `apply`, fine-tuning constraint, calibration hook, report titles, stored-weight stages), registered
with `register`.
`apply` runs them in their order on a copy of the model. Compressed modules carry their own metadata (`autocompress_meta`), which is what
the cost model reads.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .. import weights
from ..errors import AutocompressError
from . import depth, ghost, lowrank, prune, quantize, share, sparsity, student, tie
from .base import COMPRESSED, Technique, get_meta, set_meta

# Every technique in its `order`: structure first (pruning changes shapes), numerics last (quantization).
# One dict, kept sorted in place, so that every module holding it sees a technique registered later.
TECHNIQUES: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    """Make `technique` available to search spaces, `apply`, the report and (its `stages`) the stored-weight
    format, at its `order` in the pipeline.

    A technique is one module defining a `Technique` and calling this (the built-in ones are registered
    below); its knobs are then accepted in a space YAML like any built-in one's."""
    if not isinstance(technique, Technique):
        raise AutocompressError(f"register() takes a compress.Technique, not {type(technique).__name__}")
    if technique.name in TECHNIQUES:
        raise AutocompressError(f"a technique named {technique.name!r} is already registered; registered: "
                                f"{', '.join(TECHNIQUES)}")
    clash = [t.name for t in TECHNIQUES.values() if t.order == technique.order]
    if clash:
        raise AutocompressError(f"technique {technique.name!r} has order {technique.order!r}, the order of "
                                f"{clash[0]!r}; give it a free position in the pipeline")
    weights.add_stages(technique.stages)
    ordered = sorted([*TECHNIQUES.values(), technique], key=lambda t: t.order)
    TECHNIQUES.clear()
    TECHNIQUES.update((t.name, t) for t in ordered)
    return technique


def unregister(name: str) -> None:
    """Remove a registered technique (a plugin's tests clean up with it)."""
    if name not in TECHNIQUES:
        raise AutocompressError(f"no technique named {name!r} is registered; registered: {', '.join(TECHNIQUES)}")
    weights.remove_stages(TECHNIQUES.pop(name).stages)


for _module in (student, depth, prune, lowrank, ghost, tie, sparsity, share, quantize):
    register(_module.TECHNIQUE)


def calibrate(model: nn.Module, batches) -> None:
    """Every technique's calibration hook (activation ranges...) on `batches`, after BatchNorm recalibration."""
    for technique in TECHNIQUES.values():
        if technique.calibrate is not None:
            technique.calibrate(model, batches)


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


__all__ = ["apply", "calibrate", "register", "unregister", "COMPRESSED", "TECHNIQUES", "Technique", "get_meta",
           "set_meta"]
