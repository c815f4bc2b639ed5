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
(students/build.py, the `separate` knob of a student space), with the same `students.blocks.share_blocks`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..students.blocks import share_blocks
from .base import Technique, set_meta


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
    order=60,
    fields={"separate": [1, 0]},
    settings={},
    allowed_settings={"separate": (0, 1)},
    targets=_targets,
    apply=apply,
)
