"""Unstructured sparsity: per-layer magnitude masks, kept up by dynamic network surgery while fine-tuning.

The knob is a layer's `density`, the fraction of its weights kept (1.0 = dense): the smallest
magnitudes are set to exactly zero. Shapes do not change; the layer is stored sparse (its `INDEX` stage:
non-zero values plus a bitmask or CSR index, whichever is smaller). While fine-tuning, every
weight keeps a float shadow that receives gradients even when pruned, and every `SURGERY_EVERY`
steps the mask is recomputed from the shadows at the same density, so a weight pruned earlier
whose shadow has grown is spliced back (Guo et al., Dynamic Network Surgery, 2016).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..unpack import read_index
from ..weights import Loaded, Stage, Stored, pack_bits
from .base import FRACTION, Technique, get_meta, layer_targets, set_meta, straight_through, weight_layers

SURGERY_EVERY = 10  # fine-tuning steps between mask updates


def magnitude_mask(weight: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of the `keep` largest-magnitude entries of `weight` (ties broken by position)."""
    mask = torch.zeros(weight.numel(), dtype=torch.bool)
    mask[torch.topk(weight.detach().abs().flatten(), keep, sorted=False).indices] = True
    return mask.reshape(weight.shape)


def kept_weights(numel: int, density: float) -> int:
    return max(1, min(numel, round(numel * density)))


def index_bytes(mask: torch.Tensor) -> int:
    """Bytes of the index that says where the non-zeros of `mask` are: a bitmask (one bit per weight) or
    CSR over (output channel, rest) rows (32-bit row pointers, column indices of ceil(log2(cols)) bits),
    whichever is smaller."""
    rows = mask.shape[0]
    cols = mask.numel() // rows
    bitmask = math.ceil(mask.numel() / 8)
    csr = 4 * (rows + 1) + math.ceil(int(mask.sum()) * max(1, math.ceil(math.log2(cols))) / 8)
    return min(bitmask, csr)


def _mask(stored: Stored) -> torch.Tensor:
    """Only the non-zeros are stored from here on."""
    stored.mask = stored.weight != 0
    return stored.mask


def _encode_index(stored: Stored) -> None:
    """The position of the non-zeros: a bitmask or CSR rows (`index_bytes` picks the same)."""
    mask = _mask(stored).reshape(stored.weight.shape[0], -1)
    rows, cols = mask.shape
    bitmask = np.packbits(mask.reshape(-1).numpy().astype(np.uint8)).tobytes()
    if len(bitmask) == index_bytes(mask):
        stored.enc["index"] = "bitmask"
        stored.sections.append(bitmask)
        return
    col_bits = max(1, math.ceil(math.log2(cols)))
    pointers = np.concatenate([[0], np.cumsum(mask.sum(dim=1).numpy())]).astype(np.uint32)
    stored.enc["index"] = "csr"
    stored.sections.append(pointers.tobytes() + pack_bits(np.nonzero(mask.numpy())[1], col_bits))


def _decode_index(loaded: Loaded) -> None:
    loaded.mask = read_index(loaded.enc, loaded.sections.pop(0), loaded.shape).reshape(-1)


INDEX = Stage(name="sparse index", slot="index", order=10, keys=("index",),
              present=lambda s: bool(s.meta.get("sparsity")), encode=_encode_index,
              nbytes=lambda s: index_bytes(_mask(s)), written=lambda enc: "index" in enc, decode=_decode_index)


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    for name, density in section.get("density", {}).items():
        if float(density) >= 1.0:
            continue
        for module in weight_layers(model, name):
            w = module.weight.data
            mask = magnitude_mask(w, kept_weights(w.numel(), float(density)))
            w.mul_(mask)
            set_meta(module, sparsity=1.0 - int(mask.sum()) / w.numel())
    return model


class Surgery(nn.Module):
    """Fine-tuning parametrization: masked weights forward, gradients to all weights, masks re-cut at the same
    density every `every` training steps (pruned weights can come back)."""

    def __init__(self, weight: torch.Tensor, every: int = SURGERY_EVERY):
        super().__init__()
        self.register_buffer("mask", weight != 0)
        self.keep = int(self.mask.sum())
        self.every = every
        self.steps = 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.steps and self.steps % self.every == 0:
                self.mask = magnitude_mask(weight, self.keep)
            self.steps += 1
        return straight_through(weight, weight * self.mask)


def constraint(module: nn.Module) -> nn.Module | None:
    return Surgery(module.weight.detach()) if get_meta(module).get("sparsity", 0) > 0 else None


TECHNIQUE = Technique(
    name="sparsity",
    order=70,
    fields={"density": [1.0, 0.5, 0.3, 0.2, 0.1]},
    settings={},
    allowed_settings={"density": FRACTION},
    targets=layer_targets,
    apply=apply,
    constraint=constraint,
    titles={"density": "fraction of weights kept (unstructured sparsity), per layer"},
    stages=(INDEX,),
)
