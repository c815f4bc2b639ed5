"""Judging a candidate: BN recalibration on a few training batches, then top-1 accuracy.

Pruning changes which channels feed each BatchNorm, so its running statistics are stale; re-estimating
them on a few batches (no gradient steps) recovers most of the accuracy at almost no cost.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, batches: int = 8) -> nn.Module:
    """Re-estimate BatchNorm running statistics from `batches` training batches (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    if not norms or loader is None:
        return model.eval()
    model.eval()
    saved = []
    for m in norms:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
        m.train()
    for batch in itertools.islice(loader, batches):
        model(_inputs(batch))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, loader, max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] over `loader` (all of it unless `max_batches`)."""
    model.eval()
    correct = total = 0
    for batch in itertools.islice(loader, max_batches):
        x, y = batch[0], batch[1]
        out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        correct += (out.argmax(1) == y).sum().item()
        total += y.numel()
    return correct / total if total else math.nan


class Evaluator:
    """The built-in judge: BN recalibration on the training loader, then accuracy on the validation loader."""

    def __init__(self, train_loader, val_loader, recal_batches: int = 8, max_val_batches: int | None = None):
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.recal_batches = recal_batches
        self.max_val_batches = max_val_batches

    def __call__(self, model: nn.Module) -> float:
        torch.manual_seed(0)  # shuffled loaders draw the same calibration batches every time
        recalibrate_bn(model, self.train_loader, self.recal_batches)
        return accuracy(model, self.val_loader, self.max_val_batches)


def make_evaluator(data, evaluator: Callable | None) -> Callable | None:
    """The user's evaluator if given, else the built-in one over `data`, else None (cost-only search)."""
    if evaluator is not None:
        return evaluator
    if data is None:
        return None
    train, val = data
    return Evaluator(train, val)
