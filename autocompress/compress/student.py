"""The student technique: replace the user's model by a compact network built from the policy.

Its targets are the student's five stages (stage1 ... stage5), not the teacher's layers, and its knobs
shape each stage (students/build.py lists them). `apply` keeps nothing of the teacher but its input
shape and its number of classes (a teacher whose output is not class scores is refused), builds the
student and, when the policy names a supernet (see autocompress/supernet.py: `ac.compress` trains it once
per teacher, data and space), gives it the supernet's weights (students/bank.py); the evaluator then
recalibrates its BatchNorm statistics and fine-tunes it with distillation from the teacher. A student
policy is applied on its own (its `kind` is "student"): a space mixing students with compression techniques
chooses one kind per policy (space.py).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..students import bank
from ..students.blocks import ACTIVATIONS
from ..students.build import DEFAULTS, STAGES, TEMPLATES, build
from .base import Between, Technique, set_meta

SUPERNET_STEPS = 200  # about a minute or two on two idle cores for the built-in spaces on digits


ALLOWED = {
    "block": tuple(TEMPLATES), "supernet": None, "supernet_steps": None,
    "depth": Between(0, 4), "width": Between(0, 4), "expand": Between(0.5, 8), "kernel": (3, 5, 7), "se": (0, 1),
    "act": tuple(ACTIVATIONS), "primary": Between(0, 1), "separate": (0, 1), "squeeze": Between(0, 1),
    "bypass": (0, 1), "resolution": Between(0.1, 4),
}


def _targets(graph) -> list[tuple[str, str]]:
    return [(stage, stage[len("stage"):]) for stage in STAGES]


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    student = build(section, example_input.shape, bank.class_count(model, example_input))
    key = section.get("supernet")
    if key:
        stored = bank.load(key)
        if stored is None:
            warnings.warn(f"student supernet {key} is not in this machine's cache; the student starts from "
                          f"fresh weights", stacklevel=2)
        else:
            bank.inherit(student, stored)
    set_meta(student, student=section.get("block", "mbconv"), supernet=key)
    return student


NAME = "student"

TECHNIQUE = Technique(
    name=NAME,
    order=10,
    fields={f: [v] for f, v in DEFAULTS.items()},
    settings={"block": "mbconv", "supernet": None, "supernet_steps": SUPERNET_STEPS},
    allowed_settings=ALLOWED,
    targets=_targets,
    apply=apply,
    kind=NAME,  # a candidate of its own: a new network, not the user's model compressed
)
