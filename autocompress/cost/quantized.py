"""PyTorch's int8 runtime: the layers a model holds at 8 bits or fewer run torch.ao's quantized kernels.

Weights are int8 per output channel, symmetric on [-127, 127] (the grid of 8-bit fake-quant, so the two agree;
BatchNorm is folded first, which per-channel scales absorb exactly); activations are per-tensor affine uint8 on
7 bits (reduce_range, as torch.ao's x86 default: no saturation without VNNI) from min/max calibration. The flow
is torch.ao's FX graph mode with the x86 engine, whose quantized::conv2d / linear / add kernels run in eager mode.

In a model with any 8-bit layer, FX quantizes every op it has an int8 kernel for (adds, pools, ReLU, ...), and
converts at each edge between an int8 op and a float one (a layer kept wider, an activation with no int8
kernel: SiLU, GELU, Sigmoid): `runs_int8` is that rule, which the cost model prices with (cost/model.py).
torchao's pt2e flow (0.18, with X86InductorQuantizer) was tried first: it fails to annotate ResNet blocks that
call one ReLU module twice ("Input partition has more than one output node"), and its converted graph runs
quantize/dequantize around float kernels unless compiled by inductor.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..compress.base import get_meta
from ..compress.quantize import act_fake_quant
from ..errors import AutocompressError
from . import kernels
from .flow import INPUT

ENGINE = "x86"
NATIVE_BITS = 8
BODY_INPUT = "_quantized_input_"  # kernel_body's buffers: the quantized input (or constant) it reads
FLOAT_ONLY_ACTS = ("SiLU", "silu", "GELU", "gelu", "Sigmoid", "sigmoid", "Hardsigmoid", "hardsigmoid", "Tanh", "tanh",
                   "LeakyReLU", "leaky_relu", "Softmax", "softmax")  # no x86 int8 kernel in torch.ao's FX flow


def qconfig():
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver, QConfig

    weight = PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                                quant_min=-127, quant_max=127)
    # 7-bit activations, as torch.ao's own x86 default: fbgemm's AVX2 / AVX-512 kernels multiply uint8 activations
    # by int8 weights in int16 pair sums, which saturate on CPUs without VNNI (one front model here lost 6 points)
    activation = MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=True)
    return QConfig(activation=activation, weight=weight)


@contextlib.contextmanager
def engine(name: str = ENGINE):
    """torch's quantized engine set to `name` inside the block. Setting it costs about 10 us, as much as a small
    kernel: a block already on it sets nothing."""
    before = torch.backends.quantized.engine
    if before == name:
        yield
        return
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` without activation fake-quant hooks and ranges (the int8 flow quantizes for real), its
    weights plain tensors holding their current values (a model judged mid fine-tune has them parametrized)."""
    out = copy.deepcopy(model).eval()
    for m in list(out.modules()):
        if parametrize.is_parametrized(m):
            _unparametrized(m)
    for m in out.modules():
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is act_fake_quant:
                del m._forward_pre_hooks[key]
        m._buffers.pop("act_range", None)
    return out


def _unparametrized(module: nn.Module) -> None:
    """`module` (a copy) with its parametrized tensors as plain parameters of their current values. Not
    `remove_parametrizations`: it edits the parametrized class, which the copy shares with the original."""
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value))


def is_native(module: nn.Module) -> bool:
    """Whether a conv / linear holds weights and activations at 8 bits or fewer (its compression metadata says)."""
    meta = get_meta(module)
    return max(int(meta.get("weight_bits", 32)), int(meta.get("act_bits", 32))) <= NATIVE_BITS


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}


RANGES = "int8_ranges"  # a root buffer: the activation ranges a model's int8 conversion was judged with


def _prepared(model: nn.Module, example_input: torch.Tensor, keep_float) -> torch.fx.GraphModule:
    """`model` (a fake-quant-free copy) with torch.ao's observers inserted; the layers in `keep_float` stay float."""
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    mapping = QConfigMapping().set_global(qconfig())
    for name in keep_float:
        mapping.set_module_name(name, None)
    try:
        return prepare_fx(plain_copy(model), mapping, (example_input,))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutocompressError(f"the model cannot be converted to int8: torch.fx cannot trace it ({first})") from None


def _observers(prepared: nn.Module) -> list[nn.Module]:
    """The activation observers FX inserted, in graph order: each holds one tensor's min and max."""
    return [m for name, m in prepared.named_modules() if name.startswith("activation_post_process_")]


@torch.no_grad()
def observe_ranges(model: nn.Module, example_input: torch.Tensor, calibration) -> None:
    """Calibrate `model`'s int8 conversion on `calibration` input batches and keep the ranges in the model (its
    `RANGES` buffer, so they travel with its state_dict): every later conversion (`convert`, `runnable_int8`, the
    torch-int8 export) then gives the very int8 model whose accuracy was judged, without the data."""
    with warnings.catch_warnings(), engine():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices (see the module docstring)
        prepared = _prepared(model, example_input, kept_float(model) or ())
        for batch in calibration:
            prepared(batch[0] if isinstance(batch, (tuple, list)) else batch)
    ranges = torch.tensor([[float(o.min_val), float(o.max_val)] for o in _observers(prepared)]).reshape(-1, 2)
    if RANGES in model._buffers:
        model._buffers[RANGES] = ranges
    else:
        model.register_buffer(RANGES, ranges)


@torch.no_grad()
def convert(model: nn.Module, example_input: torch.Tensor, calibration=(), keep_float=()) -> nn.Module:
    """`model` converted to int8 (a fake-quant-free copy), the conv / linear layers named in `keep_float` float,
    with conversions around them. Activation ranges: those the model keeps (`observe_ranges`), else observed on
    `calibration` input batches."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings(), engine():
        warnings.simplefilter("ignore")
        prepared = _prepared(model, example_input, keep_float)
        kept = model._buffers.get(RANGES)
        if kept is not None:
            _set_ranges(prepared, kept)
        for batch in calibration if kept is None else ():
            prepared(batch[0] if isinstance(batch, (tuple, list)) else batch)
        return convert_fx(prepared)


def _set_ranges(prepared: nn.Module, ranges: torch.Tensor) -> None:
    observers = _observers(prepared)
    if len(observers) != len(ranges):
        raise AutocompressError(f"the model keeps int8 activation ranges for {len(ranges)} tensors, but its int8 "
                                f"conversion observes {len(observers)}; re-judge it (its ranges were set for "
                                f"another structure)")
    for observer, (lo, hi) in zip(observers, ranges.tolist()):
        observer.min_val.fill_(lo)
        observer.max_val.fill_(hi)


class OnEngine(nn.Module):
    """A converted model called with the x86 quantized engine selected (torch's global setting, restored after)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with engine():
            return self.model(x)


def kept_float(model: nn.Module) -> list[str] | None:
    """The conv / linear layers the torch-int8 runtime keeps float (more than 8 bits); None when it keeps all."""
    layers = weight_layers(model)
    keep = [name for name, m in layers.items() if not is_native(m)]
    return None if len(keep) == len(layers) else keep


def runnable_int8(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """`model` as the torch-int8 runtime runs it: its 8-bit layers int8, the rest float; itself when it has none.
    Activation ranges: those the model keeps (`observe_ranges`: what it was judged with), else from the example
    input (what a call costs does not depend on them)."""
    keep = kept_float(model)
    return model.eval() if keep is None else OnEngine(convert(model, example_input, [example_input], keep))


def _is_quantize(node) -> bool:
    return node.op == "call_function" and node.target in (torch.quantize_per_tensor, torch.quantize_per_channel)


@torch.no_grad()
def kernel_body(converted: torch.fx.GraphModule, example_input: torch.Tensor) -> nn.Module:
    """A converted kernel without its float boundaries, for timing it alone: its quantized input (and any
    quantized constant) computed once, its output left quantized. Its call ignores its argument; call it with
    the engine set (`engine()`) around the whole timing, not per call."""
    gm = copy.deepcopy(converted)
    graph = gm.graph
    for i, node in enumerate([n for n in graph.nodes if _is_quantize(n)]):
        source = node.args[0]
        if source.op not in ("placeholder", "get_attr"):
            continue
        value = example_input if source.op == "placeholder" else _attr(gm, source.target)
        args = [value] + [_attr(gm, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args[1:]]
        name = f"{BODY_INPUT}{i}"
        gm.register_buffer(name, node.target(*args))
        with graph.inserting_before(node):
            node.replace_all_uses_with(graph.get_attr(name))
        graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    for node in list(output.all_input_nodes):
        if node.op == "call_method" and node.target == "dequantize":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _attr(gm: nn.Module, target: str):
    for part in target.split("."):
        gm = getattr(gm, part)
    return gm


INT8_FAMILIES = ("conv", "pointwise", "grouped", "dwconv", "linear", "add", "mul", "cat", "maxpool", "avgpool",
                 "adaptivepool", "norm", "act")  # the kernel families FX gives an x86 int8 kernel


def native_op(layer) -> bool:
    """Whether torch.ao's FX flow has an int8 kernel for this op (a conv / linear also needs its bits to fit)."""
    return kernels.family(layer) in INT8_FAMILIES and layer.type not in FLOAT_ONLY_ACTS


def int8_flags(layers, weight_int8: list[bool]) -> list[bool]:
    """Per layer, whether it runs int8 in the torch-int8 runtime: a conv / linear whose bits fit
    (`weight_int8`), and, in a model with any, every other op with an int8 kernel (see the module docstring)."""
    weighted = [l.kind in ("conv", "dwconv", "linear") for l in layers]
    if not any(w and q for w, q in zip(weighted, weight_int8)):
        return [False] * len(layers)
    return [q if w else (l.kind != "param" and native_op(l)) for l, w, q in zip(layers, weighted, weight_int8)]


FOLDED_ACTS = ("ReLU", "relu", "relu_")  # what FX fuses into the int8 conv / linear / add before it


def folded(layers, anchor: list[int], computes_int8: list[bool]) -> list[bool]:
    """Per layer, whether FX folds it into the kernel it belongs to, so it writes no tensor of its own: in a
    converted model (any layer int8) BatchNorm into its convolution, and a ReLU into its int8 conv / linear / add."""
    converted = any(computes_int8)
    return [converted and anchor[i] != i and (("BatchNorm" in l.type and layers[anchor[i]].kind in ("conv", "dwconv"))
                                              or (computes_int8[i] and l.type in FOLDED_ACTS))
            for i, l in enumerate(layers)]


def boundaries(layers, flow, anchor: list[int], flags: list[bool], input_shape) -> list[tuple[int, str, tuple]]:
    """(layer whose kernel pays it, quantize | dequantize, tensor shape) of every conversion between float and
    int8: on each edge into a kernel from an op of the other kind (the model input is float), and at each
    int8 model output. A kernel's own members convert inside it (its timing holds that)."""
    out = []
    for i, producers in enumerate(flow.inputs):
        if anchor[i] != i or layers[i].kind == "param":
            continue
        for p in producers:
            if p != INPUT and (layers[p].kind == "param" or anchor[p] == i):
                continue
            theirs = False if p == INPUT else flags[p]
            if flags[i] != theirs:
                out.append((i, "quantize" if flags[i] else "dequantize",
                            tuple(input_shape) if p == INPUT else tuple(layers[p].out_shape)))
    out += [(anchor[o], "dequantize", tuple(layers[o].out_shape)) for o in flow.outputs if o != INPUT and flags[o]]
    return out
