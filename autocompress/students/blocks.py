"""Building blocks of compact students.

- `MBConv`: MobileNetV2's inverted residual (1x1 expansion, kxk depthwise, 1x1 linear projection, identity
  shortcut when shapes allow), with EfficientNet's squeeze-excite as an option.
- `Fire`: SqueezeNet's fire module (1x1 squeeze, then 1x1 and kxk expands concatenated), with the optional
  simple bypass; a stride-2 fire block max-pools its input first, as SqueezeNet does between groups.
- `GhostConv`: GhostNet's feature-map reuse. A conv computes `primary` of the output channels; cheap 3x3
  depthwise operations on those generate the rest. Used for the pointwise convs of both blocks (the
  `primary` knob) and, by compress/ghost.py, as a replacement for a user's own convs.
- `share_blocks`: equal blocks made to use one set of conv and linear weights (ALBERT-style tying): a
  student stage's `separate` knob, and compress/tie.py on a user's residual blocks.

Every block is built from plain nn.Conv2d / nn.BatchNorm2d leaves, so the layer graph, the cost model and
every compression technique see ordinary layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "hswish": nn.Hardswish, "swish": nn.SiLU}


def make_divisible(value: float, divisor: int = 8) -> int:
    """`value` rounded to a multiple of `divisor` (at least `divisor`, never below 90% of `value`), as
    MobileNet rounds its widths: hardware computes channels in such multiples."""
    out = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * value else out


def ghost_split(out_channels: int, primary: float) -> tuple[int, int]:
    """(real filters, cheap outputs per real filter) for a Ghost conv computing `primary` of `out_channels`."""
    real = max(1, math.ceil(out_channels * primary))
    return real, math.ceil(out_channels / real) - 1


class GhostConv(nn.Module):
    """`out_channels` feature maps from `real` filters of a conv plus `per_real` cheap depthwise 3x3 maps
    computed from each real one (GhostNet). `order` (a buffer, or None) picks the output channels from
    [real maps, cheap maps] in the order the replaced conv produced them; None keeps the first ones."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, dilation=1,
                 primary: float = 0.5, bias: bool = False, padding_mode: str = "zeros"):
        super().__init__()
        real, per_real = ghost_split(out_channels, primary)
        if per_real < 1:
            raise ValueError(f"a Ghost conv needs fewer real filters than outputs, got {real} of {out_channels}")
        self.out_channels = out_channels
        self.primary = nn.Conv2d(in_channels, real, kernel_size, stride, padding, dilation, bias=bias,
                                 padding_mode=padding_mode)
        self.cheap = nn.Conv2d(real, real * per_real, 3, 1, 1, groups=real, bias=bias)
        self.register_buffer("order", None)

    def forward(self, x):
        real = self.primary(x)
        out = torch.cat([real, self.cheap(real)], 1)
        return out[:, : self.out_channels] if self.order is None else out.index_select(1, self.order)


def pointwise(in_channels: int, out_channels: int, primary: float = 1.0) -> nn.Module:
    """A 1x1 conv, or a Ghost conv computing `primary` of its outputs when that saves filters."""
    if primary < 1.0 and ghost_split(out_channels, primary)[1] >= 1:
        return GhostConv(in_channels, out_channels, primary=primary)
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


def conv_bn(conv: nn.Module, channels: int, act: str | None) -> nn.Sequential:
    """conv -> BatchNorm -> activation (none for linear bottlenecks)."""
    layers = [conv, nn.BatchNorm2d(channels)]
    if act is not None:
        layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool, 1x1 reduce, ReLU, 1x1 expand, hard sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        gate = self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1))))
        return x * F.hardsigmoid(gate)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise (stride) -> [squeeze-excite] -> 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: float = 4, kernel: int = 3, se: bool = False,
                 act: str = "relu", primary: float = 1.0):
        super().__init__()
        hidden = make_divisible(cin * expand) if expand != 1 else cin
        self.expand = conv_bn(pointwise(cin, hidden, primary), hidden, act) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn(nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
                                 hidden, act)
        self.se = SqueezeExcite(hidden, make_divisible(cin / 4)) if se else nn.Identity()
        self.project = conv_bn(pointwise(hidden, cout, primary), cout, None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.residual else out


class Fire(nn.Module):
    """[max-pool when stride 2] -> 1x1 squeeze -> (1x1 expand || kxk expand), concatenated; with `bypass`,
    plus the input when shapes allow (SqueezeNet's simple bypass)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, squeeze: float = 0.25, kernel: int = 3,
                 bypass: bool = False, act: str = "relu", primary: float = 1.0):
        super().__init__()
        mid, ones = make_divisible(cout * squeeze), cout // 2
        self.pool = nn.MaxPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.squeeze = conv_bn(pointwise(cin, mid, primary), mid, act)
        self.expand1 = conv_bn(pointwise(mid, ones, primary), ones, act)
        self.expandk = conv_bn(nn.Conv2d(mid, cout - ones, kernel, 1, kernel // 2, bias=False), cout - ones, act)
        self.residual = bool(bypass) and stride == 1 and cin == cout

    def forward(self, x):
        x = self.pool(x)
        mid = self.squeeze(x)
        out = torch.cat([self.expand1(mid), self.expandk(mid)], 1)
        return x + out if self.residual else out


BLOCKS = {"mbconv": MBConv, "fire": Fire}


SHARED_TYPES = (nn.modules.conv._ConvNd, nn.Linear)


def signature(module: nn.Module) -> list:
    """Structure of a block: every submodule's name, type, and own tensors' shapes."""
    return [(name, type(m).__name__, [tuple(t.shape) for t in list(m.parameters(False)) + list(m.buffers(False))])
            for name, m in module.named_modules()]


def share_blocks(blocks: list[nn.Module]) -> list[int]:
    """Make each block of `blocks[1:]` that has the structure of `blocks[0]` use blocks[0]'s conv and
    linear modules; returns the indices of the blocks tied."""
    ref = blocks[0]
    shape = signature(ref)
    shared = [(name, m) for name, m in ref.named_modules() if isinstance(m, SHARED_TYPES)]
    tied = []
    for i, block in enumerate(blocks[1:], 1):
        if signature(block) != shape:
            continue
        for name, m in shared:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent), attr, m)
        tied.append(i)
    return tied
