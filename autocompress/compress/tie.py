"""Cross-layer parameter sharing: repeated blocks of equal shape within a stage use one set of weights.

A target is a run of residual blocks (LayerGraph.blocks) at one feature-map resolution whose layers have
the same structure and shapes, e.g. `layer1.0,layer1.1` of a ResNet. Its knob `separate` is 1 (each block
keeps its own weights) or 0 (tied): every later block then uses the first block's conv and linear modules,
the module objects themselves, as ALBERT and recurrent-depth networks do. Normalization layers stay per
block, since each position sees different statistics (the evaluator re-estimates them).

Because the module is shared, every weight tensor exists once: the cost model's size (module by module,
each module once) and parameter count (each tensor once) count it once, while the layer graph lists
every call, so latency and energy count every use. Blocks that an earlier technique made unequal
(pruned to different widths, factorized to different ranks) stay separate. Tied blocks carry
`tied_to` (the block whose weights they use) in their metadata. Students tie blocks the same way
(students/build.py, the `separate` knob of a student space).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Technique, set_meta

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


def _targets(graph) -> list[tuple[str, str]]:
    """One target per run of equal residual blocks at one resolution: "block,block,..." and its stage."""
    runs: dict[tuple, list[str]] = {}
    for path, stage in graph.blocks:
        inside = [l for l in graph.layers if l.module is not None and l.name.startswith(path + ".")]
        shape = tuple((l.name[len(path):], l.type, tuple(tuple(p.shape) for p in l.module.parameters(False)))
                      for l in inside)
        runs.setdefault((stage, shape), []).append(path)
    return [(",".join(paths), stage) for (stage, _), paths in runs.items() if len(paths) > 1]


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    for target, separate in section.get("separate", {}).items():
        if float(separate) >= 1:
            continue
        paths = target.split(",")
        try:
            blocks = [model.get_submodule(p) for p in paths]
        except AttributeError:  # an earlier technique removed a block
            continue
        for i in share_blocks(blocks):
            set_meta(blocks[i], tied_to=paths[0])
    return model


TECHNIQUE = Technique(
    name="tie",
    fields={"separate": [1, 0]},
    settings={},
    allowed_settings={"separate": (0, 1)},
    targets=_targets,
    apply=apply,
)
