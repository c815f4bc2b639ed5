"""Trace a model into a LayerGraph: its layers with shapes, MACs and parameters, and its removable residual
blocks.

torch.fx is used where the model traces (every op, functional adds and matmuls included); where it
does not, forward hooks on leaf modules give the layers. MACs of modules come from fvcore. The graph's
channel groups (channels that must be pruned together) are found by the prune technique
(compress/prune/groups.py) and added to it by `autocompress.analyze`.
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from .errors import AutocompressError

log = logging.getLogger("autocompress")

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
        nn.PReLU, nn.ELU, nn.Mish, nn.Softmax)
POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
         nn.modules.pooling._AdaptiveMaxPoolNd)
FREE_FUNCS = {"flatten", "view", "reshape", "size", "getitem", "getattr", "permute", "transpose", "unsqueeze",
              "squeeze", "contiguous", "chunk", "split", "dim", "type_as", "to", "float", "expand", "unbind"}
ELEMENTWISE_FUNCS = {"add", "iadd", "mul", "imul", "sub", "truediv", "cat", "concat", "relu", "relu_", "gelu",
                     "silu", "sigmoid", "hardswish", "hardsigmoid", "softmax", "dropout", "layer_norm",
                     "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "mean", "pad", "roll", "interpolate"}
MATMUL_FUNCS = {"matmul", "bmm", "linear", "scaled_dot_product_attention", "einsum", "baddbmm"}


@dataclass
class Layer:
    """One op of the traced model: what it is, its shapes, and its cost drivers."""

    name: str
    kind: str               # conv | dwconv | linear | matmul | norm | act | pool | elementwise | other
    type: str               # module class or function name
    in_shape: tuple
    out_shape: tuple
    macs: int
    params: int
    module: nn.Module | None = field(default=None, repr=False)

    @property
    def in_numel(self) -> int:
        return math.prod(self.in_shape) if self.in_shape else 0

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape) if self.out_shape else 0


@dataclass
class ChannelGroup:
    """Channels coupled across layers: pruning one channel removes it from every member."""

    id: str                 # name of the root layer (first prunable layer of the group)
    members: list[str]      # layers whose output channels belong to the group
    channels: int
    stage: str              # layers at the same feature-map resolution form a stage
    chunks: int = 1         # equal slices (conv groups, attention heads) that must keep equal widths


@dataclass
class LayerGraph:
    """The analyzed model: layers in execution order, channel groups, and how it was traced."""

    layers: list[Layer]
    groups: list[ChannelGroup]
    traced_with: str        # "fx" or "hooks"
    output_layers: list[str]
    input_shape: tuple
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (residual block, stage): droppable whole
    fixed: list[str] = field(default_factory=list)  # layers whose channels cannot be pruned safely

    @property
    def macs(self) -> int:
        return sum(l.macs for l in self.layers)

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers)

    def layer(self, name: str) -> Layer:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def to_frame(self) -> pd.DataFrame:
        rows = [{"name": l.name, "kind": l.kind, "type": l.type, "in_shape": l.in_shape, "out_shape": l.out_shape,
                 "macs": l.macs, "params": l.params} for l in self.layers]
        return pd.DataFrame(rows).set_index("name")

    def __repr__(self) -> str:
        return (f"LayerGraph({len(self.layers)} layers, {len(self.groups)} channel groups, "
                f"macs={self.macs:,}, params={self.params:,}, traced with {self.traced_with})")


def check_forward(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """Run the model once; a failure becomes one clear sentence instead of a deep traceback."""
    if not isinstance(example_input, torch.Tensor):
        raise AutocompressError(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    try:
        with torch.no_grad():
            out = model.eval()(example_input)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AutocompressError(
            f"the model's forward fails on an example input of shape {tuple(example_input.shape)}: {msg}") from None
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, torch.Tensor):
        raise AutocompressError(f"the model returns {type(out).__name__}; autocompress needs a tensor output")
    return out


def analyze(model: nn.Module, example_input: torch.Tensor) -> LayerGraph:
    """Trace `model` on `example_input` into a LayerGraph (layers, MACs, params, residual blocks). Its channel
    groups are left empty: they are the prune technique's to find (`compress.prune.groups.with_channel_groups`,
    which `autocompress.analyze` adds)."""
    model = model.eval()
    check_forward(model, example_input)
    try:
        layers, outputs, blocks = _fx_layers(model, example_input)
        how = "fx"
    except Exception as exc:  # data-dependent control flow and friends: fall back to hooks
        log.debug("torch.fx could not trace the model (%s); using module hooks", exc)
        (layers, outputs), blocks = _hook_layers(model, example_input), []
        how = "hooks"
    _fill_module_macs(model, example_input, layers)
    return LayerGraph(layers, [], how, outputs, tuple(example_input.shape), blocks)


def _module_kind(m: nn.Module) -> str:
    if isinstance(m, nn.modules.conv._ConvNd):
        return "dwconv" if m.groups > 1 and m.groups == m.in_channels else "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.MultiheadAttention):
        return "matmul"
    if isinstance(m, NORMS):
        return "norm"
    if isinstance(m, ACTS):
        return "act"
    if isinstance(m, POOLS):
        return "pool"
    if isinstance(m, (nn.Identity, nn.Flatten, nn.Dropout, nn.Unflatten)):
        return "free"
    return "other"


def first_tensor(x):
    """The first tensor in `x` (a tensor, or tuples and lists of them, as a module may return), else None."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for item in x:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def _shape(x) -> tuple:
    t = first_tensor(x)
    return tuple(t.shape) if t is not None else ()


def _own_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters(recurse=False))


def node_layer(node, modules: dict, values: dict) -> Layer:
    """The Layer (MACs still 0) of one fx call node, from the shapes recorded in `values`; kind "free" for
    functions that move no data (views, getitem, ...). Parameters of non-leaf-traced containers are counted
    on their own leaves."""
    in_nodes = node.all_input_nodes
    in_shape = _shape(values.get(in_nodes[0].name)) if in_nodes else ()
    out_shape = _shape(values.get(node.name))
    if node.op == "call_module":
        m = modules[node.target]
        return Layer(node.target, _module_kind(m), type(m).__name__, in_shape, out_shape, 0, _own_params(m), m)
    fname = getattr(node.target, "__name__", str(node.target)).strip("_")
    kind = ("matmul" if fname in MATMUL_FUNCS else "free" if fname in FREE_FUNCS
            else "elementwise" if fname in ELEMENTWISE_FUNCS else "other")
    return Layer(node.name, kind, fname, in_shape, out_shape, 0, 0, None)


def _fx_layers(model: nn.Module, example_input: torch.Tensor):
    """Every op of the fx graph with shapes from a real run; returns (layers, output layer names)."""
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    values: dict[str, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(example_input)
    modules = dict(gm.named_modules())
    layers = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        layer = node_layer(node, modules, values)
        if layer.kind == "free":
            continue
        layer.macs = matmul_macs(node, values) if layer.kind == "matmul" and layer.module is None else 0
        layers.append(layer)
    add_get_attr_params(gm, layers)
    return layers, traced_output_layers(gm, modules), _residual_blocks(gm, values, modules)


ADD_FUNCS = {"add", "iadd", "add_"}


def _residual_blocks(gm, values, modules) -> list[tuple[str, str]]:
    """Innermost modules computing `x + f(x)` of their single input x, with output shaped like x.

    Such a block can be replaced by the identity (f := 0) and the network still runs with the same
    shapes: the depth knob of Once-for-All style sub-networks. A module is found from the
    `nn_module_stack` that torch.fx records on each node; a module called more than once is left out.
    """
    inside: dict[str, list] = {}
    calls: dict[str, set] = {}
    for node in gm.graph.nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            inside.setdefault(path, []).append(node)
            calls.setdefault(path, set()).add(key)
    found = {}
    for path, nodes in inside.items():
        if path and len(calls[path]) == 1 and _is_residual(nodes, values, modules):
            found[path] = _shape(values.get(nodes[-1].name))
    innermost = [p for p in found if not any(q.startswith(p + ".") for q in found)]
    return [(p, "x".join(map(str, found[p][2:])) or "flat") for p in innermost]


def _is_residual(nodes, values, modules) -> bool:
    members = set(nodes)
    sources = {a for n in nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
    sinks = [n for n in nodes if any(u not in members for u in n.users)]
    if len(sources) != 1 or len(sinks) != 1:
        return False
    (x,) = sources
    in_shape, out_shape = _shape(values.get(x.name)), _shape(values.get(sinks[0].name))
    if not in_shape or in_shape != out_shape:
        return False
    for n in nodes:  # an add of the block input and something computed from it inside the block
        name = getattr(n.target, "__name__", str(n.target)).strip("_")
        if n.op not in ("call_function", "call_method") or name not in ADD_FUNCS or len(n.args) < 2:
            continue
        for shortcut, other in (n.args[:2], n.args[1::-1]):
            if x in _identity_chain(shortcut, modules) and other in members and _depends_on(other, x, members):
                return True
    return False


def _identity_chain(node, modules) -> list:
    """`node` and the nodes it passes on unchanged through identity shortcuts (nn.Identity, dropout)."""
    chain = [node]
    while getattr(node, "op", None) == "call_module" and isinstance(modules[node.target], (nn.Identity, nn.Dropout)):
        node = node.args[0]
        chain.append(node)
    return chain


def _depends_on(node, source, members) -> bool:
    """Whether `node` is computed from `source` through nodes of `members`."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is source:
            return True
        if n in seen or n not in members:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def add_get_attr_params(gm, layers) -> None:
    """Parameters used directly by functional code (class tokens, position embeddings) as their own layers."""
    counted = {id(p) for l in layers if l.module is not None for p in l.module.parameters(recurse=False)}
    for name, p in gm.named_parameters():
        if id(p) not in counted:
            owner = gm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else gm
            if any(l.module is owner for l in layers):
                continue
            layers.append(Layer(name, "param", "Parameter", (), tuple(p.shape), 0, p.numel(), None))
            counted.add(id(p))


def matmul_macs(node, values) -> int:
    """MACs of a functional matmul-like op from its real input and output shapes."""
    ins = [first_tensor(values.get(a.name)) for a in node.all_input_nodes]
    out = first_tensor(values.get(node.name))
    if out is None or not ins or ins[0] is None:
        return 0
    fname = getattr(node.target, "__name__", "")
    if fname == "scaled_dot_product_attention" and len(ins) >= 3:
        q, k = ins[0], ins[1]
        return 2 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]
    return out.numel() * ins[0].shape[-1]


def traced_output_layers(gm, modules) -> list[str]:
    """Parametric layers whose output channels reach the model output unchanged (must keep their width)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    found, stack, seen = [], list(output.all_input_nodes), set()
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op == "call_module" and isinstance(modules[node.target], (nn.modules.conv._ConvNd, nn.Linear)):
            found.append(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return found


def _hook_layers(model: nn.Module, example_input: torch.Tensor):
    """Leaf modules in execution order via forward hooks (for models torch.fx cannot trace)."""
    layers, handles = [], []
    names = {m: n for n, m in model.named_modules()}

    def hook(m, inputs, output):
        kind = _module_kind(m)
        if kind != "free":
            layers.append(Layer(names[m], kind, type(m).__name__, _shape(inputs), _shape(output), 0, _own_params(m), m))

    for m in model.modules():
        if not list(m.children()) or _own_params(m):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    seen, unique = set(), []
    for l in layers:  # a module called twice is priced twice but counted once for params
        if l.name in seen:
            l.params = 0
        seen.add(l.name)
        unique.append(l)
    param_layers = [l for l in unique if l.kind in ("conv", "dwconv", "linear")]
    return unique, [param_layers[-1].name] if param_layers else []


def _fill_module_macs(model: nn.Module, example_input: torch.Tensor, layers: list[Layer]) -> None:
    """MACs of module layers from fvcore (one MAC per multiply-accumulate of conv, linear, attention)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        fca = FlopCountAnalysis(model, example_input)
        for op in ("aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
                   "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d",
                   "aten::grid_sampler"):
            fca.set_op_handle(op, None)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_module = fca.by_module()
    occurrences: dict[str, int] = {}
    for l in layers:
        if l.module is not None:
            occurrences[l.name] = occurrences.get(l.name, 0) + 1
    for l in layers:
        if l.module is not None and l.kind in ("conv", "dwconv", "linear", "matmul", "other"):
            l.macs = int(by_module.get(l.name, 0)) // occurrences[l.name]


def output_shape(model: nn.Module, example_input: torch.Tensor, meta: bool = False) -> tuple | None:
    """Shape of the model's (first) output, or None when its forward pass fails.

    With `meta` the model runs on meta tensors first (its parameters and buffers swapped for meta ones, nothing
    in it changes): shapes are checked by every op as usual, but nothing is computed, which is what a check
    that a pruned model still runs needs (a real resnet50 pass at 224 px costs ~0.1 s). A model that does not
    run on meta tensors (an op without a meta kernel, data-dependent control flow) is run for real.
    """
    if meta:
        shape = _meta_output_shape(model, example_input)
        if shape is not None:
            return shape
    try:
        with torch.no_grad():
            return _shape(model(example_input))
    except Exception:
        return None


def meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `model` by name, as a meta tensor of its shape (to run it on shapes alone)."""
    return {k: torch.empty_like(v, device="meta") for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _meta_output_shape(model: nn.Module, example_input: torch.Tensor) -> tuple | None:
    x = torch.empty_like(example_input, device="meta")
    norms = {m: m.__dict__.get("forward") for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    try:
        for m in norms:  # batch norm on meta tensors is a slow Python decomposition: check its shapes directly
            m.forward = functools.partial(_batch_norm_shape, m)
        with torch.no_grad():
            return _shape(torch.func.functional_call(model, meta_state(model), (x,))) or None
    except Exception:
        return None
    finally:
        for m, own in norms.items():  # back to the class's forward, or the one the instance had set
            del m.forward
            if own is not None:
                m.forward = own


def _batch_norm_shape(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """What BatchNorm's forward checks of shapes, and an output of its shape."""
    widths = {t.shape[0] for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var) if t is not None}
    if x.dim() < 2 or widths - {x.shape[1]} or norm.num_features != x.shape[1]:
        raise ValueError(f"batch norm of {norm.num_features} features on an input of shape {tuple(x.shape)}")
    return torch.empty_like(x)


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Conv/linear layers that produce the model output (their output width must stay)."""
    try:
        import torch.fx

        gm = torch.fx.symbolic_trace(model)
        return traced_output_layers(gm, dict(gm.named_modules()))
    except Exception:
        return _hook_layers(model, example_input)[1]
