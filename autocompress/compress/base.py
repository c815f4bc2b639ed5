"""What every technique provides, and the per-module metadata the cost model reads.

Metadata keys (set with `set_meta`, read with `get_meta`; absent means "not compressed that way"):

| key             | set by    | on                        | meaning                                                        |
|-----------------|-----------|---------------------------|----------------------------------------------------------------|
| keep            | prune     | conv/linear               | fraction of output channels kept (shapes already reflect it)   |
| rank            | lowrank   | the nn.Sequential factors | rank of the factorization (Tucker-2: the output-side rank)     |
| rank_in         | lowrank   | Tucker-2 factors          | input-side rank of a Tucker-2 factorization                    |
| rank_fraction   | lowrank   | the nn.Sequential factors | the knob: rank as a fraction of the full rank                  |
| lowrank_method  | lowrank   | the nn.Sequential factors | svd (Linear, 1x1), tucker or spatial (kxk)                     |
| lowrank_error   | lowrank   | the nn.Sequential factors | relative output error ||f(x) - f_r(x)|| / ||f(x)|| on the example input |
| sparsity        | sparsity  | conv/linear leaf          | fraction of weights that are exactly zero (stored sparse)      |
| share_bits      | share     | conv/linear leaf          | index bits per stored weight (2^share_bits shared values)      |
| clusters        | share     | conv/linear leaf          | distinct non-zero values actually left (codebook entries)      |
| weight_bits     | quantize  | conv/linear leaf          | bits per weight value (1 binary, 2 ternary, 4, 8 int; 16 fp16) |
|                 |           |                           | with `clusters`: bits of each codebook value (one scale/layer) |
| act_bits        | quantize  | conv/linear leaf          | bits of the layer's input activations (per-tensor affine)      |
| huffman         | share, quantize | conv/linear leaf    | stored value codes are Huffman-coded                           |

Stored size of a weight tensor with these keys: `weights.weight_bytes(weight, meta)`, made of the stages
(`Technique.stages`) of the techniques that set them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..weights import Stage

META = "autocompress_meta"
WEIGHT_KINDS = ("conv", "dwconv", "linear")
COMPRESSED = "compressed"  # the candidate kind of techniques that compress the user's model (see Technique.kind)


def get_meta(module: nn.Module) -> dict:
    """Compression metadata of a module (weight_bits, sparsity, rank...); empty when uncompressed."""
    return getattr(module, META, {})


def set_meta(module: nn.Module, **values) -> None:
    meta = dict(get_meta(module))
    meta.update(values)
    setattr(module, META, meta)


def layer_targets(graph, kinds=WEIGHT_KINDS) -> list[tuple[str, str]]:
    """(layer name, stage) of every module layer of `kinds`; the stage is its output resolution."""
    return [(l.name, "x".join(map(str, l.out_shape[2:])) or "flat")
            for l in graph.layers if l.kind in kinds and l.module is not None]


def weight_layers(model: nn.Module, name: str) -> list[nn.Module]:
    """The conv/linear modules a target name now stands for: the layer itself, or the factors an earlier
    technique replaced it with (low-rank); none when an earlier technique removed it (depth)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return []
    return [m for m in module.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q):
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exactly `q` in the forward pass, the identity's gradient to `x` in the backward pass (fake-quant training).
    Without a gradient to pass (inference, export) it is `q` itself: ONNX and TorchScript cannot hold the Function."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return q.detach()
    return _StraightThrough.apply(x, q.detach())


class Between:
    """Allowed numeric choices: low < value <= high, whole numbers only with `whole`, and any value of `also`
    besides (e.g. 32 = "not compressed" for bit-widths)."""

    def __init__(self, low: float, high: float, whole: bool = False, also: tuple = ()):
        self.low, self.high, self.whole, self.also = low, high, whole, also

    def __contains__(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        return self.low < value <= self.high and (not self.whole or isinstance(value, int))

    def __str__(self) -> str:
        kind = "whole numbers" if self.whole else "numbers"
        top = f" up to {self.high}" if self.high != float("inf") else ""
        also = f", or {', '.join(map(str, self.also))}" if self.also else ""
        return f"{kind} above {self.low}{top}{also}"


FRACTION = Between(0, 1)  # a kept share: keep ratio, rank fraction, density, primary filters


@dataclass(frozen=True)
class Technique:
    """One compression technique as the search space sees it; register a new one with `compress.register`.

    `order` places it in the pipeline (`compress.apply` runs techniques by increasing order: structure first,
    numerics last). `fields` are the knobs it exposes (name -> default choices), and each field's largest
    choice must leave the model unchanged (keep 1.0, 32 bits: what an unsampled knob takes); `settings` are
    fixed options with their defaults; `allowed_settings` the allowed values of settings and of every field's
    choices (a tuple, or an object supporting `in` such as `Between`; None means any value); `targets(graph)`
    lists (target name, stage) pairs that a knob is sampled for; `apply(model, section, example_input)`
    performs the compression. `constraint(module)`, when given, returns a torch parametrization that keeps the
    module's compression in force while it is fine-tuned (or None for modules it did not touch).
    `calibrate(model, batches)`, when given, re-fits what the technique derives from data (activation ranges)
    after every BatchNorm recalibration. `titles` name its fields in the report (field -> title). `stages` are
    the parts of a stored weight its metadata calls for (weights.Stage: its slot, header keys, encoding and
    bytes), which the cost model's size and the packed export compose (weights.py).

    `kind` is the kind of candidate its policies make. COMPRESSED (the default): it compresses the user's model
    and combines with the other compression techniques in one policy. Any other name (the student's "student"):
    it builds a new network from its own section alone (`apply` reads only the input shape and the classes of
    the model it gets), so its knobs shape every cost of that candidate; a space holding it beside techniques of
    another kind gets a `kind` knob that chooses one kind per policy (space.py), and a trial records its kind
    as its `origin`.
    """

    name: str
    order: float
    fields: dict
    settings: dict
    targets: Callable
    apply: Callable
    allowed_settings: dict = field(default_factory=dict)
    constraint: Callable | None = None
    calibrate: Callable | None = None
    titles: dict = field(default_factory=dict)
    kind: str = COMPRESSED
    stages: tuple[Stage, ...] = ()

    @property
    def builds_model(self) -> bool:
        """Whether it builds a new network rather than compressing the user's model (see `kind`)."""
        return self.kind != COMPRESSED
