"""Channel groups and their safe removal: what structured pruning may turn, and the pruner that removes channels.

Channel groups (channels that must be pruned together: residual adds, concats, depthwise and grouped convs,
BN, attention heads) come from Torch-Pruning's DependencyGraph; every group is test-pruned once on a
copy of the model, and a group whose removal breaks the forward pass is left out (named in one
warning), so the search never turns a knob that cannot work.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import warnings

import torch
from torch import nn

from ...graph import ChannelGroup, Layer, LayerGraph, output_layers, output_shape

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
    pristine = _module_states(model)  # pruning replaces attributes and tensors, never edits one in place
    try:
        pruner = ChannelPruner(model, example_input, keep_whole)
        pruned, failed = pruner.prune_all(chooser(model), check=False)
        if pruner.runs():
            return model, pruned, failed
    except Exception:  # some group broke the model: redo it group by group
        pass
    _restore_states(pristine)
    pruner = ChannelPruner(model, example_input, keep_whole)
    pruned, failed = pruner.prune_all(chooser(model), check=True)
    return model, pruned, failed


def _module_states(model: nn.Module) -> list:
    """Every module's attributes, parameters, buffers and children as they are now (dicts copied, tensors shared)."""
    return [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in model.modules()]


def _restore_states(states: list) -> None:
    for m, attrs, params, buffers, children in states:
        m.__dict__.clear()
        m.__dict__.update(attrs, _parameters=params, _buffers=buffers, _modules=children)


class ChannelPruner:
    """Torch-Pruning's dependency graph of one model, and the safe removal of channels group by group.

    Groups are enumerated as `DependencyGraph.get_all_groups` does, except that a root whose dependency
    closure keeps growing is reported (with no Torch-Pruning group) instead of being expanded: the
    index mapping through reshapes such as Swin's window partition can grow without bound. `prune`
    removes channels of one group; with `check` it runs the model and, if the forward pass fails or its
    output shape changed, restores every layer of the group as it was.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, keep_whole: list[str]):
        self.model = model
        self.example_input = example_input
        record = traced(model, example_input)
        self.dg = record.graph_of(model)
        self.names = {m: n for n, m in model.named_modules()}
        self.keep_whole = {model.get_submodule(n) for n in keep_whole}
        self.reference = record.output_shape  # the output shape every pruned model must keep

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
            if not check:
                return True
            _sync_attributes(self.model)
            if self.runs():
                return True
        except Exception:
            if not check:
                raise
        self._restore(saved)
        return False

    def runs(self) -> bool:
        """Whether the model's forward pass works and keeps its output shape."""
        _sync_attributes(self.model)
        return output_shape(self.model, self.example_input, meta=True) == self.reference

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
        state = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules)) for m in modules]
        return state, nodes, dict(self.dg._param_to_name), dict(self.dg.module2node)

    def _restore(self, saved) -> None:
        state, nodes, param_names, module2node = saved
        _restore_states(state)
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


TRACES_KEPT = 4  # structures kept per process: a search prunes copies of one model (or of a few, after depth)
_traces: collections.OrderedDict = collections.OrderedDict()


@dataclasses.dataclass
class Traced:
    """What pruning needs to know of one model structure, found once per structure and process.

    A search prunes a fresh copy of the same model in every trial, and tracing its dependency graph (a forward
    pass with hooks, then the walk of its autograd graph), finding its output layers and running it for its
    output shape were most of a cost-only trial's time. The graph is traced on a meta-tensor twin of the model
    (shapes only, no arithmetic) where it runs there; each use gets a copy bound to its own model (`graph_of`).
    """
    twin: nn.Module                # the model the graph was traced on (meta tensors, else a real copy)
    graph: object                  # its Torch-Pruning DependencyGraph, None when it cannot be traced
    output_shape: tuple | None     # the unpruned model's output shape: every pruned model must keep it
    output_layers: list[str]       # conv/linear layers whose width is the model's output

    def graph_of(self, model: nn.Module):
        """The dependency graph bound to `model` (of this structure), as if traced on it; None without one."""
        return None if self.graph is None else _rebound(self.graph, self.twin, model)


def traced(model: nn.Module, example_input: torch.Tensor) -> Traced:
    """The Traced record of `model`'s structure (see `_structure_key`), traced now if not kept from before."""
    key = _structure_key(model, example_input)
    if key not in _traces:
        twin, graph = _trace_graph(model, example_input)
        _traces[key] = Traced(twin, graph, output_shape(model, example_input, meta=True),
                              output_layers(model, example_input))
        while len(_traces) > TRACES_KEPT:
            _traces.popitem(last=False)
    _traces.move_to_end(key)
    return _traces[key]


def _trace_graph(model: nn.Module, example_input: torch.Tensor) -> tuple:
    """(the model the graph was traced on, Torch-Pruning's DependencyGraph): traced on a meta twin of `model`,
    else (an op without a meta kernel...) on a real copy; (None, None) with a warning when neither traces."""
    import torch_pruning as tp

    _guard_reshape_mapping()
    for twin_of in (_meta_twin, lambda m, x: (copy.deepcopy(m), x)):
        try:
            twin, x = twin_of(model, example_input)
            with warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore")
                # a tuple: Torch-Pruning calls model(*inputs) first, which would run a lone tensor's first sample
                return twin, tp.DependencyGraph().build_dependency(twin, example_inputs=(x,))
        except Exception as exc:
            error = exc
    warnings.warn(f"channel dependencies could not be traced ({type(error).__name__}: {error}); "
                  "channel pruning is disabled for this model", stacklevel=4)
    return None, None


def _structure_key(model: nn.Module, example_input: torch.Tensor) -> tuple:
    """What the dependency graph depends on: every module's name, class and settings, every tensor's name and
    shape, and the input's shape."""
    modules = tuple((n, type(m).__qualname__, m.extra_repr()) for n, m in model.named_modules())
    tensors = tuple((n, tuple(t.shape), t.dtype, t.requires_grad)
                    for n, t in [*model.named_parameters(), *model.named_buffers()])
    return modules, tensors, tuple(example_input.shape), example_input.dtype


def _meta_twin(model: nn.Module, example_input: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A copy of `model` whose parameters and buffers are meta tensors of the same shapes, and a meta input."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo), torch.empty_like(example_input, device="meta")


def _rebound(dg, twin: nn.Module, model: nn.Module):
    """A copy of dependency graph `dg` (traced on `twin`) that points at `model`, whose structure is the twin's.

    Nodes, dependencies and Torch-Pruning's own op records are copied (pruning and index-mapping updates change
    them); the twin's modules, parameters and buffers are replaced by `model`'s of the same name; the pruners,
    the autograd records of the trace and the index-mapping functions are shared (nothing changes them in place).
    Torch-Pruning 1.6's graph layout is relied on (the version pyproject pins); `tests/test_prune.py` checks that a
    rebound graph prunes as a fresh trace does.
    """
    same = {id(a): b for (_, a), (_, b) in zip(twin.named_modules(), model.named_modules())}
    same.update((id(a), b) for (_, a), (_, b) in zip(twin.named_parameters(), model.named_parameters()))
    same.update((id(a), b) for (_, a), (_, b) in zip(twin.named_buffers(), model.named_buffers()))

    def mapped(obj):
        return same.get(id(obj), obj)

    autograd = {id(n.grad_fn): n.grad_fn for n in dg.module2node.values()}
    nodes = {}
    for node in dg.module2node.values():  # Torch-Pruning's op records (concat sizes...) change as channels go
        new = nodes[id(node)] = copy.copy(node)
        own = id(node.module) in same
        new.module = same[id(node.module)] if own else copy.deepcopy(node.module, dict(autograd))
    for node in dg.module2node.values():
        new = nodes[id(node)]
        new.inputs = [nodes[id(n)] for n in node.inputs]
        new.outputs = [nodes[id(n)] for n in node.outputs]
        new.dependencies = [_rebound_dependency(d, nodes) for d in node.dependencies]
    out = copy.copy(dg)
    out.model = model
    out.module2node = {nodes[id(n)].module: nodes[id(n)] for n in dg.module2node.values()}
    out._module2name = {mapped(m): name for m, name in dg._module2name.items()}
    out._param_to_name = {mapped(p): name for p, name in dg._param_to_name.items()}
    out.unwrapped_parameters = [u._replace(parameters=mapped(u.parameters)) for u in dg.unwrapped_parameters]
    out.ignored_params = [mapped(p) for p in dg.ignored_params]
    out.IGNORED_LAYERS_IN_TRACING = [mapped(m) for m in dg.IGNORED_LAYERS_IN_TRACING]
    out._pruning_history = []
    if hasattr(dg, "unmapped"):
        out.unmapped = {nodes[id(n)] for n in dg.unmapped}
    return out


def _rebound_dependency(dep, nodes: dict):
    new = copy.copy(dep)
    new.source, new.target = nodes[id(dep.source)], nodes[id(dep.target)]
    new.index_mapping = list(dep.index_mapping)
    return new


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


def with_channel_groups(graph: LayerGraph, model: nn.Module, example_input: torch.Tensor) -> LayerGraph:
    """`graph` (of `model`, as graph.analyze traced it) with its channel groups and the layers left whole."""
    groups, fixed = channel_groups(model, example_input, graph.layers, graph.output_layers)
    return dataclasses.replace(graph, groups=groups, fixed=fixed)
