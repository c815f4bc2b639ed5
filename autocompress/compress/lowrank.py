"""Low-rank factorization: truncated SVD for Linear and 1x1 convs, Tucker-2 or spatial SVD for kxk convs.

The knob is a layer's `rank` as a fraction of its full rank (1.0 = untouched). The layer is replaced
by an nn.Sequential of smaller layers under the same name, so later techniques (sparsity, sharing,
quantization) reach the factors through the same target:
- Linear / 1x1 conv, W = U S V^T:  [in -> r] then [r -> out], each factor carrying sqrt(S).
- kxk conv, `kxk: tucker` (Tucker-2, HOSVD): 1x1 [in -> r_in], kxk core [r_in -> r_out], 1x1 [r_out -> out].
- kxk conv, `kxk: spatial` (Jaderberg et al.): kx1 [in -> r] then 1xk [r -> out], from the SVD of W
  reshaped to (in*kh, out*kw).
At full rank every factorization reproduces the layer exactly. The relative output error of the
factorized layer on the example input is recorded as `lowrank_error`. Grouped convs and convs with
string padding are left as they are.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..threads import fixed_threads
from .base import FRACTION, Technique, layer_targets, set_meta

KXK_METHODS = ("tucker", "spatial")


def _rank(full: int, fraction: float) -> int:
    return max(1, min(full, math.ceil(full * fraction)))


def _conv(src: nn.Conv2d, cin: int, cout: int, kernel, stride=1, padding=0, dilation=1, bias=False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias, padding_mode=src.padding_mode)


def _svd_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (m x r) and B (r x n) with A @ B the best rank-r approximation of the matrix `w`."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def _leading(w: torch.Tensor, r: int) -> torch.Tensor:
    """The `r` leading left singular vectors of the matrix `w` (columns)."""
    return torch.linalg.svd(w, full_matrices=False)[0][:, :r]


def factor_linear(layer: nn.Linear, fraction: float) -> nn.Sequential:
    w = layer.weight.detach()
    r = _rank(min(w.shape), fraction)
    a, b = _svd_factors(w, r)
    first, second = nn.Linear(layer.in_features, r, bias=False), nn.Linear(r, layer.out_features, bias=layer.bias is not None)
    first.weight.data, second.weight.data = b.contiguous(), a.contiguous()
    return _finish(layer, nn.Sequential(first, second), rank=r, fraction=fraction, method="svd")


def factor_pointwise(layer: nn.Conv2d, fraction: float) -> nn.Sequential:
    w = layer.weight.detach().flatten(1)
    r = _rank(min(w.shape), fraction)
    a, b = _svd_factors(w, r)
    first = _conv(layer, layer.in_channels, r, 1, layer.stride, layer.padding, layer.dilation)
    second = _conv(layer, r, layer.out_channels, 1, bias=layer.bias is not None)
    first.weight.data, second.weight.data = b[:, :, None, None].contiguous(), a[:, :, None, None].contiguous()
    return _finish(layer, nn.Sequential(first, second), rank=r, fraction=fraction, method="svd")


def factor_tucker(layer: nn.Conv2d, fraction: float) -> nn.Sequential:
    w = layer.weight.detach()
    cout, cin = w.shape[:2]
    r_out, r_in = _rank(cout, fraction), _rank(cin, fraction)
    u_out = _leading(w.flatten(1), r_out)                       # (cout, r_out)
    u_in = _leading(w.transpose(0, 1).flatten(1), r_in)         # (cin, r_in)
    core = torch.einsum("oikl,or,is->rskl", w, u_out, u_in)
    first = _conv(layer, cin, r_in, 1)
    middle = _conv(layer, r_in, r_out, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    last = _conv(layer, r_out, cout, 1, bias=layer.bias is not None)
    first.weight.data = u_in.t()[:, :, None, None].contiguous()
    middle.weight.data = core.contiguous()
    last.weight.data = u_out[:, :, None, None].contiguous()
    return _finish(layer, nn.Sequential(first, middle, last), rank=r_out, fraction=fraction, method="tucker", rank_in=r_in)


def factor_spatial(layer: nn.Conv2d, fraction: float) -> nn.Sequential:
    w = layer.weight.detach()
    cout, cin, kh, kw = w.shape
    m = w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)      # M[(i, y), (o, x)] = W[o, i, y, x]
    r = _rank(min(m.shape), fraction)
    a, b = _svd_factors(m, r)
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    vertical = _conv(layer, cin, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1))
    horizontal = _conv(layer, r, cout, (1, kw), (1, sw), (0, pw), (1, dw), bias=layer.bias is not None)
    vertical.weight.data = a.reshape(cin, kh, r).permute(2, 0, 1)[..., None].contiguous()
    horizontal.weight.data = b.reshape(r, cout, kw).permute(1, 0, 2)[:, :, None, :].contiguous()
    return _finish(layer, nn.Sequential(vertical, horizontal), rank=r, fraction=fraction, method="spatial")


def _finish(layer: nn.Module, factors: nn.Sequential, rank: int, fraction: float, method: str, **extra) -> nn.Sequential:
    """Copy the bias to the last factor and record what was done on the container."""
    if layer.bias is not None:
        factors[-1].bias.data = layer.bias.detach().clone()
    set_meta(factors, rank=rank, rank_fraction=float(fraction), lowrank_method=method, **extra)
    return factors.train(layer.training)


def factorize(layer: nn.Module, fraction: float, kxk: str = "tucker") -> nn.Sequential | None:
    """The factorized replacement of `layer`, or None when the layer is not one this technique handles."""
    if isinstance(layer, nn.Linear):
        return factor_linear(layer, fraction)
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1 or isinstance(layer.padding, str):
        return None
    if layer.kernel_size == (1, 1):
        return factor_pointwise(layer, fraction)
    return factor_tucker(layer, fraction) if kxk == "tucker" else factor_spatial(layer, fraction)


@torch.no_grad()
def relative_error(old: nn.Module, new: nn.Module, x: torch.Tensor) -> float:
    ref = old(x)
    return float((new(x) - ref).norm() / ref.norm().clamp_min(1e-12))


def _layer_inputs(model: nn.Module, names: list[str], example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named layer receives when the model runs on the example input."""
    seen = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: seen.setdefault(n, args[0]))
               for n in names]
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in handles:
            h.remove()
    return seen


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    kxk = section.get("kxk", "tucker")
    chosen = {}
    for name, fraction in section.get("rank", {}).items():
        if float(fraction) < 1.0 and isinstance(_get(model, name), (nn.Linear, nn.Conv2d)):
            chosen[name] = float(fraction)
    inputs = _layer_inputs(model, list(chosen), example_input) if chosen else {}
    with fixed_threads(1):  # small SVDs: on a busy machine a thread pool costs 3-30x the work itself
        for name, fraction in chosen.items():
            layer = model.get_submodule(name)
            factors = factorize(layer, fraction, kxk)
            if factors is None or name not in inputs:
                continue
            set_meta(factors, lowrank_error=relative_error(layer, factors, inputs[name]))
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, factors)
    return model


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:  # removed by an earlier technique
        return None


TECHNIQUE = Technique(
    name="lowrank",
    order=40,
    fields={"rank": [1.0, 0.5, 0.25, 0.125]},
    settings={"kxk": "tucker"},
    allowed_settings={"kxk": KXK_METHODS, "rank": FRACTION},
    targets=lambda graph: layer_targets(graph, ("conv", "linear")),
    apply=apply,
    titles={"rank": "kept fraction of rank, per layer"},
)
