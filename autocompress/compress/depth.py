"""Depth: drop whole residual blocks, as in Once-for-All sub-networks of the user's model.

The graph lists the blocks that compute `x + f(x)` of their single input with an output shaped like
it (graph.blocks: ResNet, MobileNet and EfficientNet inverted residuals, ConvNeXt, ViT and Swin
blocks...). A dropped block becomes `nn.Identity` (f := 0): every shape downstream is unchanged, the
blocks kept inherit their weights, and the BN recalibration of the evaluation adapts the statistics.
The search turns one knob per block: keep it (1) or drop it (0).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import AutocompressError
from .base import Technique


def _targets(graph):
    return list(graph.blocks)


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    for name, keep in section.get("keep", {}).items():
        if keep:
            continue
        parent, _, child = name.rpartition(".")
        try:
            owner = model.get_submodule(parent)
            getattr(owner, child)
        except AttributeError:
            raise AutocompressError(f"depth.keep names block {name!r}, which the model does not have") from None
        setattr(owner, child, nn.Identity())
    return model


TECHNIQUE = Technique(
    name="depth",
    order=20,
    fields={"keep": [0, 1]},
    settings={},
    allowed_settings={"keep": (0, 1)},
    targets=_targets,
    apply=apply,
)
