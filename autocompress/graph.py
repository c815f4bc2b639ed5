"""Trace a model into a LayerGraph: its layers with shapes, MACs and parameters, its channel groups
and its removable residual blocks.

torch.fx is used where the model traces (every op, functional adds and matmuls included); where it
does not, forward hooks on leaf modules give the layers. MACs of modules come from fvcore. Channel
groups (channels that must be pruned together: residual adds, concats, depthwise and grouped convs,
BN, attention heads) come from Torch-Pruning's DependencyGraph; every group is test-pruned once on a
copy of the model, and a group whose removal breaks the forward pass is left out (named in one
warning), so the search never turns a knob that cannot work.
"""
from __future__ import annotations

import collections
import copy
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


def analyze(model: nn.Module, example_input: torch.Tensor, groups: bool = True) -> LayerGraph:
    """Trace `model` on `example_input` into a LayerGraph (layers, MACs, params, channel groups)."""
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
    chan_groups, fixed = channel_groups(model, example_input, layers, outputs) if groups else ([], [])
    return LayerGraph(layers, chan_groups, how, outputs, tuple(example_input.shape), blocks, fixed)


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


PROBE_KEEP = 0.25       # analysis test-prunes every group down to this fraction of its channels
CLOSURE_LIMIT = 4096    # index-mapping steps one channel's dependency closure may take before it counts as unbounded
REVISIT_LIMIT = 32      # times a Torch-Pruning group may add one layer (under new index sets) before it counts as
                        # unbounded: 8 in swin_t, the most of 13 torchvision models measured at 64 px; a residual
                        # added into a slice of the channels (timm's rexnet_100) re-adds its layers without end
ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
PRUNABLE_KINDS = ("conv", "dwconv", "linear")


def channel_groups(model: nn.Module, example_input: torch.Tensor, layers: list[Layer],
                   output_layers: list[str]) -> tuple[list[ChannelGroup], list[str]]:
    """Coupled output channels that prune safely, in model order, and the conv/linear layers left whole.

    Every group is test-pruned to PROBE_KEEP of its channels on a copy of the model (see
    `prune_channels`) and kept only if the model still runs with the same output shape. The layers
    that no safe group covers (besides the output layers, whose width is the model's output) are
    named in one warning.
    """
    resolution = {l.name: l.out_shape[2:] if len(l.out_shape) > 2 else () for l in layers}

    def probe(info, group):  # drop the last channels of each chunk: which ones does not matter for safety
        chunk = info.channels // info.chunks
        return range(max(1, int(chunk * PROBE_KEEP)), chunk)

    _, pruned, _ = prune_channels(copy.deepcopy(model), example_input, output_layers, lambda _model: probe)
    safe = [info for info, _ in pruned]
    for info in safe:
        info.stage = "x".join(map(str, resolution.get(info.id, ()))) or "flat"
    covered = {m for g in safe for m in g.members} | set(output_layers)
    fixed = list(dict.fromkeys(l.name for l in layers if l.kind in PRUNABLE_KINDS and l.module is not None
                               and l.name not in covered))
    if fixed:
        warnings.warn(f"channel pruning leaves {len(fixed)} conv/linear layer(s) whole because their channels "
                      f"cannot be removed safely: {', '.join(fixed)}", stacklevel=3)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(safe, key=lambda g: order[g.id]), fixed


def prune_channels(model: nn.Module, example_input: torch.Tensor, keep_whole: list[str], chooser):
    """Prune channel groups of `model`; returns (pruned model, [(group, channels dropped per chunk)], failed groups).

    `chooser(model)` gives `choose(info, tp_group)`: the channel indices within one chunk to drop
    (empty: keep the group whole). All groups are pruned, then the model is run once; if that
    fails, pruning restarts from an unpruned copy checking every group by a forward pass, and a
    group that breaks the model is restored and reported as failed. Layers in `keep_whole` keep
    their output width.
    """
    reference = output_shape(model, example_input)
    pristine = copy.deepcopy(model)
    try:
        pruner = ChannelPruner(model, example_input, keep_whole, reference)
        pruned, failed = pruner.prune_all(chooser(model), check=False)
        if pruner.runs():
            return model, pruned, failed
    except Exception:  # some group broke the model: redo it group by group
        pass
    pruner = ChannelPruner(pristine, example_input, keep_whole, reference)
    pruned, failed = pruner.prune_all(chooser(pristine), check=True)
    return pristine, pruned, failed


class ChannelPruner:
    """Torch-Pruning's dependency graph of one model, and the safe removal of channels group by group.

    Groups are enumerated as `DependencyGraph.get_all_groups` does, except that a root whose dependency
    closure keeps growing is reported (with no Torch-Pruning group) instead of being expanded: the
    index mapping through reshapes such as Swin's window partition can grow without bound. `prune`
    removes channels of one group; with `check` it runs the model and, if the forward pass fails or its
    output shape changed, restores every layer of the group as it was.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, keep_whole: list[str], reference: tuple):
        self.model = model
        self.example_input = example_input
        self.dg = dependency_graph(model, example_input)
        self.names = {m: n for n, m in model.named_modules()}
        self.keep_whole = {model.get_submodule(n) for n in keep_whole}
        self.reference = reference  # the output shape every pruned model must keep

    def groups(self):
        """Yield (ChannelGroup, Torch-Pruning group or None when it cannot be built) lazily: each may be pruned as
        it comes."""
        if self.dg is None:
            return
        dg = self.dg
        ignored = self.keep_whole | set(dg.IGNORED_LAYERS_IN_TRACING)
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        visited = set()
        for m in list(dg.module2node):
            pruner = dg.get_pruner_of_module(m) if isinstance(m, ROOT_TYPES) and m in self.names else None
            if pruner is None or m in ignored or m in visited or not pruner.get_out_channels(m):
                continue
            channels, name = pruner.get_out_channels(m), self.names[m]
            try:
                bounded = self._bounded(m, pruner.prune_out_channels)
                group = self._group(m, pruner.prune_out_channels, channels) if bounded else None
            except _Unbounded as exc:  # every root it reached shares its fate: stays whole, without a rebuild
                visited.update(o for o in exc.reached if o in self.names)
                group = None
            except Exception:  # Torch-Pruning cannot follow this root's dependencies
                group = None
            if group is not None and _crosses_unmapped(dg, group):
                group = None  # its channels pass a reshape whose channel order Torch-Pruning could not map
            if group is None:
                visited.add(m)
                yield ChannelGroup(name, [name], channels, ""), None
                continue
            outs = [dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)]
            visited.update(outs)
            if any(o in ignored for o in outs):
                continue
            members = sorted((self.names[o] for o in outs if o in self.names), key=order.__getitem__)
            yield ChannelGroup(members[0], members, channels, "", _chunks(group, channels)), group

    def prune_all(self, choose, check: bool):
        """Prune every group as `choose(info, group)` says; returns ([(group, dropped per chunk)], failed groups)."""
        pruned, failed = [], []
        for info, group in self.groups():
            try:
                drop = list(choose(info, group))
            except Exception:  # e.g. an importance criterion that fails on this group
                if not check:
                    raise
                failed.append(info)
                continue
            if not drop:
                continue
            if group is not None and self.prune(info, group, drop, check):
                pruned.append((info, len(drop)))
            else:
                failed.append(info)
        return pruned, failed

    def prune(self, info: ChannelGroup, group, drop, check: bool) -> bool:
        """Remove channels `drop` (indices within one chunk, removed from every chunk) of a group.

        Without `check` a failure raises; with it the group is restored and False returned."""
        chunk = info.channels // info.chunks
        idxs = sorted(int(i) + c * chunk for c in range(info.chunks) for i in drop)
        saved = self._snapshot(group) if check else None
        try:
            _subgroup(group, idxs).prune()
            _sync_attributes(self.model)
            if not check or self.runs():
                return True
        except Exception:
            if not check:
                raise
        self._restore(saved)
        return False

    def runs(self) -> bool:
        """Whether the model's forward pass works and keeps its output shape."""
        return output_shape(self.model, self.example_input) == self.reference

    def _group(self, module: nn.Module, pruning_fn, channels: int):
        """Torch-Pruning's group of removing every channel of `module`, adding no layer more than REVISIT_LIMIT
        times: beyond that it raises _Unbounded (the library's loop would re-add layers under new index sets
        for minutes, or forever)."""
        from torch_pruning.dependency import graph as tp_graph

        library = tp_graph.Group
        tp_graph.Group = _limited_group_class()
        try:
            return self.dg.get_pruning_group(module, pruning_fn, list(range(channels)))
        finally:
            tp_graph.Group = library

    def _bounded(self, module: nn.Module, pruning_fn) -> bool:
        """Walk the closure of removing one channel of `module` as Torch-Pruning would, within CLOSURE_LIMIT steps."""
        from torch_pruning._helpers import _HybridIndex

        # the index mappings are as the last get_pruning_group left them: recomputing them costs seconds
        # on reshape-heavy models, and a probe of the closure's size does not need the latest widths
        stack, seen, steps = [(self.dg.module2node[module], pruning_fn, [_HybridIndex(0, 0)])], set(), 0
        while stack:
            node, fn, idxs = stack.pop()
            for dep in node.dependencies:
                if not dep.is_triggered_by(fn):
                    continue
                new = idxs
                for mapping in dep.index_mapping:
                    new = mapping(new) if mapping is not None else new
                key = (dep.target, dep.handler, tuple(new))
                if not new or key in seen:
                    continue
                seen.add(key)
                steps += len(new)
                if steps > CLOSURE_LIMIT:
                    return False
                stack.append((dep.target, dep.handler, new))
        return True

    def _snapshot(self, group):
        """What pruning `group` may change: its modules' attributes and tensors, and the graph's parameter records."""
        modules, nodes = set(), []
        for dep, _ in group:
            target = dep.target.module
            nodes.append((dep.target, target))
            if isinstance(target, nn.Parameter):  # unwrapped parameters (class tokens...) are replaced on their owner
                target = self.model.get_submodule(self.dg._param_to_name[target].rpartition(".")[0])
            modules.update(target.modules())
        state = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers)) for m in modules]
        return state, nodes, dict(self.dg._param_to_name), dict(self.dg.module2node)

    def _restore(self, saved) -> None:
        state, nodes, param_names, module2node = saved
        for m, attrs, params, buffers in state:
            m.__dict__.clear()
            m.__dict__.update(attrs, _parameters=params, _buffers=buffers)
        for node, module in nodes:
            node.module = module
        self.dg._param_to_name, self.dg.module2node = param_names, module2node
        _sync_attributes(self.model)


class _Unbounded(Exception):
    """A Torch-Pruning group added one layer more than REVISIT_LIMIT times; `reached` holds the modules it had
    collected."""

    def __init__(self, reached: set):
        super().__init__(f"a channel group revisits a layer more than {REVISIT_LIMIT} times")
        self.reached = reached


@functools.cache
def _limited_group_class():
    """Torch-Pruning's Group, refusing to add one layer more than REVISIT_LIMIT times (see ChannelPruner._group)."""
    from torch_pruning.dependency.group import Group

    class LimitedGroup(Group):
        def __init__(self):
            super().__init__()
            self.adds = collections.Counter()

        def add_dep(self, dep, idxs):
            self.adds[dep.target] += 1
            if self.adds[dep.target] > REVISIT_LIMIT:
                raise _Unbounded({item.dep.target.module for item in self._group})
            super().add_dep(dep, idxs)

    return LimitedGroup


def output_shape(model: nn.Module, example_input: torch.Tensor) -> tuple | None:
    """Shape of the model's (first) output, or None when its forward pass fails."""
    try:
        with torch.no_grad():
            return _shape(model(example_input))
    except Exception:
        return None


def _subgroup(group, root_idxs):
    """The part of a full Torch-Pruning group that removing `root_idxs` of its root touches.

    Each item of a group records, for every index, the root index it maps from; cutting the full group
    gives what `group.prune(idxs)` would rebuild, without recomputing the index mappings (seconds
    per group on reshape-heavy models)."""
    from torch_pruning.dependency.group import Group

    drop, sub = set(root_idxs), Group()
    sub._DG = group._DG
    for item in group:
        kept = [i for i, r in zip(item.idxs, item.root_idxs) if r in drop]
        if kept:
            sub.add_dep(item.dep, kept)
    return sub


def _chunks(group, channels: int) -> int:
    """Equal slices a group's channels fall into (conv groups, group-norm groups, attention heads): each
    slice must lose the same channels, or grouped weights and head splits stop lining up."""
    counts = [1]
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.MultiheadAttention):
            counts.append(m.num_heads)
        elif isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not _depthwise(m):
            counts.append(m.groups)
        elif isinstance(m, nn.GroupNorm):
            counts.append(m.num_groups)
    n = max(counts)
    return n if channels % n == 0 else 1


def _depthwise(conv) -> bool:
    """One input and one output channel per group: channels prune one by one, no slices to keep equal."""
    return conv.groups == conv.in_channels == conv.out_channels


def _sync_attributes(model: nn.Module) -> None:
    """Widths that some models keep as plain attributes and read in forward (torchvision's ViT `hidden_dim`)."""
    for m in model.modules():
        proj = getattr(m, "conv_proj", None)
        if isinstance(proj, nn.Conv2d) and isinstance(getattr(m, "hidden_dim", None), int):
            m.hidden_dim = proj.out_channels


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """Conv/linear layers that produce the model output (their output width must stay)."""
    try:
        import torch.fx

        gm = torch.fx.symbolic_trace(model)
        return traced_output_layers(gm, dict(gm.named_modules()))
    except Exception:
        return _hook_layers(model, example_input)[1]


def dependency_graph(model: nn.Module, example_input: torch.Tensor):
    """Build Torch-Pruning's DependencyGraph, or None (with a warning) when it cannot."""
    import torch_pruning as tp

    _guard_reshape_mapping()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    except Exception as exc:
        warnings.warn(f"channel dependencies could not be traced ({type(exc).__name__}: {exc}); "
                      "channel pruning is disabled for this model", stacklevel=2)
        return None


def _guard_reshape_mapping() -> None:
    """Let Torch-Pruning skip a reshape whose channel mapping it cannot infer instead of failing on the whole model.

    Torch-Pruning 1.6 divides by an inferred channel count of 0 at reshapes such as ShuffleNet's channel shuffle
    (a 5-d view), which aborts the dependency graph of every group. The guarded version records such nodes on
    the graph (`unmapped`) and leaves their mapping unset; `_crosses_unmapped` then keeps every group that
    passes one whole, since its channel order there is unknown. Installed once, in place of the library's.
    """
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    if getattr(original, "guarded", False):
        return

    def guarded(graph, node):
        try:
            original(graph, node)
        except ZeroDivisionError:
            graph.unmapped = getattr(graph, "unmapped", set()) | {node}

    guarded.guarded = True
    index_mapping.update_reshape_index_mapping = guarded


def _crosses_unmapped(dg, group) -> bool:
    unmapped = getattr(dg, "unmapped", set())
    return bool(unmapped) and any(dep.source in unmapped or dep.target in unmapped for dep, _ in group)
