"""Structured channel pruning that physically removes channels.

Coupled channels (residual adds, concats, depthwise convs, BN) are found and removed together by
Torch-Pruning's DependencyGraph; the search turns one keep ratio per channel group. Channels with
the lowest importance go first.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..graph import iter_channel_groups, output_layers
from .base import Technique, set_meta

IMPORTANCE = ("l1", "l2", "bn")


def kept_channels(channels: int, keep: float, round_to: int) -> int:
    """How many of `channels` survive a keep ratio, rounded to a multiple of `round_to` (at least one)."""
    n = int(round(channels * keep / round_to)) * round_to
    return max(min(n, channels), min(round_to, channels), 1)


def _importance(name: str):
    import torch_pruning as tp

    if name == "bn":
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)


def _targets(graph):
    return [(g.id, g.stage) for g in graph.groups]


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    keep = section.get("keep", {})
    if not keep or all(v >= 1.0 for v in keep.values()):
        return model
    round_to = int(section.get("round_to", 8))
    importance = _importance(section.get("importance", "l1"))
    outputs = output_layers(model, example_input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info, group in iter_channel_groups(model, example_input, outputs):
            ratio = keep.get(info.id, 1.0)
            n_keep = kept_channels(info.channels, ratio, round_to)
            if n_keep >= info.channels:
                continue
            scores = importance(group)
            if scores is None:  # Torch-Pruning found nothing to score: leave the group whole
                continue
            drop = torch.argsort(scores)[: info.channels - n_keep].tolist()
            group.prune(idxs=sorted(drop))
            for member in info.members:
                set_meta(model.get_submodule(member), keep=n_keep / info.channels)
    return model


TECHNIQUE = Technique(
    name="prune",
    fields={"keep": {"low": 0.25, "high": 1.0, "step": 0.125}},
    settings={"importance": "l1", "round_to": 8},
    allowed_settings={"importance": IMPORTANCE, "round_to": None},
    targets=_targets,
    apply=apply,
)
