"""Structured channel pruning that physically removes channels.

Coupled channels (residual adds, concats, depthwise and grouped convs, BN, squeeze-excite, attention
heads) are found and removed together by Torch-Pruning's DependencyGraph (see groups.ChannelPruner);
the search turns one keep ratio per channel group, and kept widths are rounded to a multiple of
`round_to`. Channels with the lowest importance go first:

- l1, l2: magnitude of the group's weights (filter pruning);
- bn: BatchNorm scaling factors (network slimming);
- taylor: first-order Taylor |weight x gradient| of the cross-entropy, gradients as their RMS over
  calibration batches (see `calibration_data`; without them, the example input against the model's
  own predictions).

A group a criterion cannot score (no BatchNorm for bn, no gradient for taylor) is scored by l1.
All groups are pruned, then the model is run once; if that fails, pruning restarts from the
unpruned model checking each group by a forward pass, and a group that breaks the model is left
whole with a warning. Widths of the stage granularity make this the per-stage width multiplier of
the slim search space.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import nn

from ...errors import AutocompressError, one_of
from ...graph import first_tensor
from ..base import FRACTION, Between, Technique, set_meta
from .groups import prune_channels, traced

IMPORTANCE = ("l1", "l2", "bn", "taylor")
DEFAULT_IMPORTANCE = "l1"  # most accurate after BN recalibration at equal MACs on digits: scripts/bench_importance.py

_calibration: list = []


@contextlib.contextmanager
def calibration_data(batches):
    """Inside this block, data-driven criteria (taylor) score channels on `batches`.

    `batches`: a list of input tensors or of (inputs, labels) pairs, e.g. a few training batches.
    Techniques are applied as `apply(model, policy, example_input)`, which takes no data; this keeps
    that signature and the search loop unchanged. The batches are fixed, so `apply` stays
    deterministic; outside the block taylor scores on the example input alone.
    """
    saved = list(_calibration)
    _calibration[:] = list(batches)
    try:
        yield
    finally:
        _calibration[:] = saved


def kept_channels(channels: int, keep: float, round_to: int) -> int:
    """How many of `channels` survive a keep ratio, rounded to a multiple of `round_to` (at least one)."""
    n = int(round(channels * keep / round_to)) * round_to
    return max(min(n, channels), min(round_to, channels), 1)


def _scorer(name: str, model: nn.Module, example_input: torch.Tensor):
    """Channel importance of a Torch-Pruning group under criterion `name`, falling back to l1."""
    import torch_pruning as tp

    if name not in IMPORTANCE:
        raise one_of("prune.importance", name, IMPORTANCE)
    l1 = tp.importance.GroupMagnitudeImportance(p=1)
    primary = {"l1": l1, "l2": tp.importance.GroupMagnitudeImportance(p=2), "bn": tp.importance.BNScaleImportance(),
               "taylor": tp.importance.GroupTaylorImportance()}[name]
    if name == "taylor":
        _accumulate_gradients(model, example_input)

    def score(group):
        try:
            scores = primary(group)
        except Exception:  # a layer the loss does not reach has no gradient
            scores = None
        return scores if scores is not None else l1(group)

    return score


def _accumulate_gradients(model: nn.Module, example_input: torch.Tensor) -> None:
    """Leave in each parameter's .grad the root-mean-square over the calibration batches of its gradient
    of the cross-entropy (labels: given, else the model's own predictions).

    Torch-Pruning's Taylor score of a channel is sum |weight x grad| over its parameters; with the RMS
    that is each parameter's first-order loss change averaged over batches, where a plain sum of
    gradients lets batches cancel out (a trained model's gradients point every which way).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    squares: list = [None] * len(params)   # stays None for a parameter the loss never reaches
    batches = _calibration or [example_input]
    with torch.enable_grad():
        for batch in batches:
            x, y = batch if isinstance(batch, (tuple, list)) else (batch, None)
            model.zero_grad(set_to_none=True)
            out = first_tensor(model(x))
            try:
                nn.functional.cross_entropy(out, out.argmax(1).detach() if y is None else y).backward()
            except (RuntimeError, ValueError, IndexError):  # not a classifier's output: taylor falls back to l1
                model.zero_grad(set_to_none=True)
                return
            for i, p in enumerate(params):
                if p.grad is not None:
                    squares[i] = p.grad.square() + (0 if squares[i] is None else squares[i])
    for sq, p in zip(squares, params):
        p.grad = None if sq is None else (sq / len(batches)).sqrt()


def _targets(graph):
    return [(g.id, g.stage) for g in graph.groups]


def _chooser(keep: dict, round_to: int, importance: str, example_input: torch.Tensor):
    """For prune_channels: per model, the channels of each group to drop, lowest importance first."""

    def chooser(model):
        score = _scorer(importance, model, example_input)

        def choose(info, group):
            ratio, chunk = keep.get(info.id), info.channels // info.chunks
            if ratio is None or group is None:
                return []
            # rounded per chunk so that the kept width summed over the chunks is a multiple of round_to
            n_keep = kept_channels(chunk, ratio, round_to // math.gcd(round_to, info.chunks))
            scores = score(group) if n_keep < chunk else None
            if scores is None:  # nothing to drop, or Torch-Pruning finds nothing to score
                return []
            return torch.argsort(scores.view(info.chunks, chunk).mean(0))[: chunk - n_keep].tolist()

        return choose

    return chooser


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    keep = {k: float(v) for k, v in section.get("keep", {}).items() if float(v) < 1.0}
    round_to = section.get("round_to", 8)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise AutocompressError(f"prune.round_to = {round_to!r} is not allowed; it must be an integer >= 1")
    if not keep:
        return model
    chooser = _chooser(keep, round_to, section.get("importance", DEFAULT_IMPORTANCE), example_input)
    model, pruned, failed = prune_channels(model, example_input, traced(model, example_input).output_layers, chooser)
    model.zero_grad(set_to_none=True)
    for info, dropped in pruned:
        for member in info.members:
            set_meta(model.get_submodule(member), keep=1 - dropped / (info.channels // info.chunks))
    for info in failed:
        warnings.warn(f"channel group {info.id} cannot be pruned safely to {keep[info.id]:g} of its channels; "
                      "it is left whole", stacklevel=3)
    return model


TECHNIQUE = Technique(
    name="prune",
    order=30,
    fields={"keep": {"low": 0.25, "high": 1.0, "step": 0.125}},
    settings={"importance": DEFAULT_IMPORTANCE, "round_to": 8},
    allowed_settings={"importance": IMPORTANCE, "round_to": Between(0, math.inf, whole=True), "keep": FRACTION},
    targets=_targets,
    apply=apply,
    titles={"keep": "kept fraction of channels, per channel group"},
)
