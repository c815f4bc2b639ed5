"""Ghost replacement of a user's convs: compute a fraction of the output channels with real filters and
generate the rest from them with cheap depthwise 3x3 operations (GhostNet's feature-map reuse).

The knob is a conv's `primary`: the fraction of its output channels kept as real filters (1.0 leaves it
as it is). The layer becomes a `students.blocks.GhostConv` under the same name, so later techniques
(sparsity, sharing, quantization) reach its two convs through the same target, and its output has the
same channels in the same order. Weights are inherited: the real filters are the layer's most important
ones (largest L1 norm); each dropped filter is generated from the kept filter most similar to it
(cosine), each kept filter feeding at most its share of cheap maps, by a 3x3 depthwise kernel whose
centre tap is the least-squares scale between the two filters (the rest zero), so the replacement starts
close to the original and fine-tuning with distillation recovers the rest. Grouped convs, convs with
string padding and the layers producing the model output are left as they are. The container records
`ghost_primary` (the knob) and `ghost_real` (real filters) in its metadata.
"""
from __future__ import annotations

import torch
from torch import nn

from ..graph import output_layers
from ..students.blocks import GhostConv, ghost_split
from .base import FRACTION, Technique, set_meta


def ghost_of(conv: nn.Conv2d, primary: float) -> GhostConv | None:
    """A GhostConv reproducing `conv`'s output channels from its most important filters, or None when the
    conv is not one this technique handles (grouped, string padding, or too few channels to split)."""
    if (not isinstance(conv, nn.Conv2d) or conv.groups != 1 or isinstance(conv.padding, str)
            or ghost_split(conv.out_channels, primary)[1] < 1):
        return None
    w = conv.weight.detach().flatten(1)
    real, per_real = ghost_split(conv.out_channels, primary)
    kept = torch.sort(torch.argsort(w.abs().sum(1), descending=True)[:real]).values
    ghost = GhostConv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, primary, bias=conv.bias is not None, padding_mode=conv.padding_mode)
    ghost.primary.weight.data = conv.weight.detach()[kept].clone()
    if conv.bias is not None:
        ghost.primary.bias.data = conv.bias.detach()[kept].clone()
    ghost.cheap.weight.data.zero_()
    order = torch.empty(conv.out_channels, dtype=torch.long)
    order[kept] = torch.arange(real)
    for channel, (source, slot) in _assign(w, kept, per_real).items():
        scale = torch.dot(w[channel], w[kept[source]]) / w[kept[source]].square().sum().clamp_min(1e-12)
        ghost.cheap.weight.data[slot, 0, 1, 1] = scale
        if conv.bias is not None:
            ghost.cheap.bias.data[slot] = conv.bias[channel] - scale * conv.bias[kept[source]]
        order[channel] = real + slot
    ghost.order = order
    return ghost.train(conv.training)


def _assign(w: torch.Tensor, kept: torch.Tensor, per_real: int) -> dict[int, tuple[int, int]]:
    """Dropped channel -> (index of its real filter among `kept`, cheap output slot). Each dropped filter,
    most important first, takes the most similar real filter that still has a free slot; real filter i
    owns slots i*per_real ... i*per_real + per_real - 1 (the depthwise groups of GhostConv.cheap)."""
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dropped = [c for c in torch.argsort(w.abs().sum(1), descending=True).tolist() if c not in set(kept.tolist())]
    used = [0] * len(kept)
    out = {}
    for channel in dropped:
        for source in torch.argsort((unit[kept] @ unit[channel]).abs(), descending=True).tolist():
            if used[source] < per_real:
                out[channel] = (source, source * per_real + used[source])
                used[source] += 1
                break
    return out


def _targets(graph) -> list[tuple[str, str]]:
    outputs = set(graph.output_layers)
    return [(l.name, "x".join(map(str, l.out_shape[2:])) or "flat") for l in graph.layers
            if l.kind == "conv" and isinstance(l.module, nn.Conv2d) and l.module.groups == 1 and l.name not in outputs]


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    chosen = {n: float(p) for n, p in section.get("primary", {}).items() if float(p) < 1.0}
    protected = set(output_layers(model, example_input)) if chosen else set()
    for name, primary in chosen.items():
        try:
            conv = model.get_submodule(name)
        except AttributeError:  # removed by an earlier technique
            continue
        ghost = ghost_of(conv, primary) if name not in protected else None
        if ghost is None:
            continue
        set_meta(ghost, ghost_primary=primary, ghost_real=ghost.primary.out_channels)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, ghost)
    return model


TECHNIQUE = Technique(
    name="ghost",
    order=50,
    fields={"primary": [1.0, 0.5, 0.25]},
    settings={},
    allowed_settings={"primary": FRACTION},
    targets=_targets,
    apply=apply,
)
