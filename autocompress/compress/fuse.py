"""Conv+BN(+ReLU) folding for export.

An inference-mode BatchNorm is an affine map per channel; folded into the preceding convolution's
weights and bias it disappears, so the exported model runs one op where the trained one ran two.
The activation after it stays a module of its own: runtimes apply it in the convolution's epilogue,
and the cost model already prices conv+bn(+relu) chains as one op (cost/fusion.py), so the folded
module is the model that was priced.

Only a BatchNorm that reads a convolution's output and nothing else, where that output feeds nothing
else, is folded (found with torch.fx); a model torch.fx cannot trace is returned unfolded. Folding
freezes the running statistics, so it comes after BN recalibration, at export, not inside the search.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names whose BN can be folded into the conv: each called once, BN reads only the conv."""
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return []
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None or calls[node.target] != 1:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if getattr(src, "op", None) == "call_module" else None
        if isinstance(conv, nn.modules.conv._ConvNd) and calls[src.target] == 1 and len(src.users) == 1:
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode with every foldable BatchNorm folded into its convolution (the BN
    becomes nn.Identity). Outputs equal the unfused model's up to float rounding."""
    model = copy.deepcopy(model).eval()
    for conv_name, bn_name in conv_bn_pairs(model):
        fused = fuse_conv_bn_eval(model.get_submodule(conv_name), model.get_submodule(bn_name))
        _replace(model, conv_name, fused)
        _replace(model, bn_name, nn.Identity())
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
