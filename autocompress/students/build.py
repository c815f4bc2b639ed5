"""Build a student network from its policy: `build(policy, input_shape, classes) -> nn.Module`.

A student is a stem, five stages of blocks (MBConv or fire, the `block` setting), a 1x1 head conv, global
pooling and a linear classifier. Each stage starts from a template (channels, blocks, stride) and the
policy's per-stage values scale and shape it:

| field      | meaning                                                               | blocks        |
|------------|-----------------------------------------------------------------------|---------------|
| depth      | multiplier of the template's blocks in the stage (ceil, at least 1)   | both          |
| width      | multiplier of the template's channels (rounded to multiples of 8)     | both          |
| expand     | expansion ratio of the inverted residual (1: no expansion conv)       | mbconv        |
| kernel     | depthwise (mbconv) or expand (fire) kernel size: 3, 5 or 7            | both          |
| se         | squeeze-excite on (1) or off (0)                                      | mbconv        |
| act        | activation: relu, hswish or swish                                     | both          |
| primary    | fraction of each pointwise conv's outputs computed by real filters;  | both          |
|            | the rest are Ghost maps (1.0: plain convs)                            |               |
| separate   | 0: blocks after the stage's first share one set of weights (tie.py)   | both          |
| squeeze    | squeeze width as a fraction of the fire module's output               | fire          |
| bypass     | fire modules add their input where shapes allow (1) or not (0)        | fire          |
| resolution | the input is resized by this factor first (first stage's value)      | both          |

The stem and head adapt to the input: the stem reads its channels, and its stride (and where the stages
downsample) follows the input resolution, so that small images (32x32 digits) are not reduced to nothing
and large ones are reduced early; the classifier has one output per class of the teacher.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AutocompressError
from .blocks import ACTIVATIONS, BLOCKS, conv_bn, make_divisible, share_blocks

STAGES = tuple(f"stage{i}" for i in range(1, 6))
# per block type: stem channels, head channels, and (channels, blocks, stride) of each stage
TEMPLATES = {
    "mbconv": {"stem": 16, "head": 256, "stages": [(16, 1, 1), (24, 2, 2), (32, 2, 2), (64, 2, 2), (96, 1, 1)]},
    "fire": {"stem": 32, "head": 256, "stages": [(32, 1, 1), (64, 2, 2), (96, 2, 2), (128, 2, 2), (160, 1, 1)]},
}
# the value of each field when a policy does not give one: the template as it is
DEFAULTS = {"depth": 1.0, "width": 1.0, "expand": 4, "kernel": 3, "se": 0, "act": "relu", "primary": 1.0,
            "separate": 1, "squeeze": 0.25, "bypass": 0, "resolution": 1.0}
FIELDS_OF = {"mbconv": ("depth", "width", "expand", "kernel", "se", "act", "primary", "separate", "resolution"),
             "fire": ("depth", "width", "kernel", "act", "primary", "separate", "squeeze", "bypass", "resolution")}


class Student(nn.Module):
    """[resize] -> stem -> stages -> head -> global average pool -> linear classifier."""

    def __init__(self, size, stem: nn.Module, stages: nn.Sequential, head: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.size = size
        self.stem, self.stages, self.head, self.classifier = stem, stages, head, classifier

    def forward(self, x):
        if self.size is not None:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        x = self.head(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def stage_values(section: dict, stage: str) -> dict:
    """Every field's value for one stage of a student policy section: {stage: value} as the search writes
    it, or one value for every stage; the template's where it has none."""
    values = {f: section.get(f, default) for f, default in DEFAULTS.items()}
    return {f: v.get(stage, DEFAULTS[f]) if isinstance(v, dict) else v for f, v in values.items()}


def input_size(input_shape, resolution: float) -> tuple[int, int]:
    """(height, width) the student's stem sees: the input's, scaled by `resolution`."""
    h, w = input_shape[2:]
    return max(8, round(h * resolution)), max(8, round(w * resolution))


def check_input(input_shape) -> None:
    if len(input_shape) != 4:
        raise AutocompressError(f"students need image inputs of shape (batch, channels, height, width); the "
                                f"example input has shape {tuple(input_shape)}")


def build(policy, input_shape, classes: int) -> nn.Module:
    """The student a policy (or its `student` section) describes, for inputs of `input_shape` and `classes`
    outputs, with freshly initialized weights (bank.inherit gives it trained ones)."""
    check_input(input_shape)
    section = policy.get("student", policy)
    block = section.get("block", "mbconv")
    template = TEMPLATES[block]
    values = [stage_values(section, s) for s in STAGES]
    size = input_size(input_shape, float(values[0]["resolution"]))
    stem_stride, strides = _strides(min(size), [s for _, _, s in template["stages"]])
    cin = make_divisible(template["stem"] * values[0]["width"])
    stem = conv_bn(nn.Conv2d(input_shape[1], cin, 3, stem_stride, 1, bias=False), cin, values[0]["act"])
    stages = OrderedDict()
    for name, v, (channels, depth, _), stride in zip(STAGES, values, template["stages"], strides):
        cout, blocks = make_divisible(channels * v["width"]), max(1, math.ceil(depth * v["depth"] - 1e-9))
        stages[name] = nn.Sequential(*[_block(block, cin if i == 0 else cout, cout, stride if i == 0 else 1, v)
                                       for i in range(blocks)])
        if not int(v["separate"]) and blocks > 2:
            share_blocks(list(stages[name])[1:])
        cin = cout
    head = conv_bn(nn.Conv2d(cin, template["head"], 1, bias=False), template["head"], values[-1]["act"])
    resized = None if size == tuple(input_shape[2:]) else size
    return Student(resized, stem, nn.Sequential(stages), head, nn.Linear(template["head"], classes)).eval()


def _block(kind: str, cin: int, cout: int, stride: int, v: dict) -> nn.Module:
    if v["act"] not in ACTIVATIONS:
        raise AutocompressError(f"student act {v['act']!r} is not allowed; allowed: {', '.join(ACTIVATIONS)}")
    common = {"kernel": int(v["kernel"]), "act": v["act"], "primary": float(v["primary"])}
    if kind == "mbconv":
        return BLOCKS[kind](cin, cout, stride, expand=float(v["expand"]), se=bool(v["se"]), **common)
    return BLOCKS[kind](cin, cout, stride, squeeze=float(v["squeeze"]), bypass=bool(v["bypass"]), **common)


def _strides(size: int, template: list[int]) -> tuple[int, list[int]]:
    """Stem stride and per-stage strides for an input of `size` pixels: the stem halves inputs of 32 pixels
    and more, the last stage halves inputs of 160 and more, and no stage halves a map smaller than 4."""
    stem = 2 if size >= 32 else 1
    wanted = template[:-1] + [2 if size >= 160 else template[-1]]
    res, out = size / stem, []
    for s in wanted:
        s = s if res >= 4 else 1
        out.append(s)
        res /= s
    return stem, out
