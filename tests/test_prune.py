"""Channel pruning and depth: coupled groups, rounding, chunks, criteria, unsafe groups, slim sub-networks."""
import warnings

import optuna
import pytest
import torch
import torchvision
from torch import nn

import autocompress as ac
from autocompress.compress.prune import calibration_data, kept_channels
from autocompress.errors import AutocompressError
from autocompress.threads import fixed_threads
from counting import count_params


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every pruning check runs forward passes: one thread is several times faster on a small shared machine."""
    with fixed_threads(1):
        yield


def _prune(model, x, keep, **settings):
    graph = ac.analyze(model, x)
    ratios = keep if isinstance(keep, dict) else {g.id: keep for g in graph.groups}
    return graph, ac.apply(model, {"prune": {"keep": ratios, **settings}}, x)


def _out(model, x):
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def resnet18():
    return torchvision.models.resnet18().eval(), torch.randn(1, 3, 64, 64)


def test_residual_adds_couple_their_layers_into_one_knob(resnet18):
    model, x = resnet18
    graph = ac.analyze(model, x)
    stem = next(g for g in graph.groups if g.id == "conv1")
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(stem.members)
    assert sum("layer1.0.conv2" in g.members for g in graph.groups) == 1
    pruned = ac.apply(model, {"prune": {"keep": {"conv1": 0.5}}}, x)
    convs = [pruned.get_submodule(n) for n in stem.members if isinstance(model.get_submodule(n), nn.Conv2d)]
    assert len(convs) == 3 and {c.out_channels for c in convs} == {32}
    assert pruned.layer1[1].conv1.in_channels == 32 and pruned.layer2[0].downsample[0].in_channels == 32
    assert _out(pruned, x).shape == (1, 1000)


@pytest.mark.parametrize("round_to, expected", [(8, 24), (1, 22), (16, 16)])
def test_kept_widths_are_rounded_to_the_configured_multiple(resnet18, round_to, expected):
    model, x = resnet18
    _, pruned = _prune(model, x, {"conv1": 0.35}, round_to=round_to)  # 64 * 0.35 = 22.4
    assert pruned.conv1.out_channels == expected == kept_channels(64, 0.35, round_to)


def test_round_to_must_be_a_positive_integer(resnet18):
    model, x = resnet18
    with pytest.raises(AutocompressError, match="round_to"):
        ac.apply(model, {"prune": {"keep": {"conv1": 0.5}, "round_to": 0}}, x)


class Grouped(nn.Module):
    """A grouped conv (4 groups) between two dense convs: its channels fall in 4 equal slices."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def test_grouped_convs_lose_the_same_channels_in_every_group():
    model, x = Grouped().eval(), torch.randn(2, 3, 16, 16)
    graph, pruned = _prune(model, x, 0.5, round_to=1)
    assert {g.chunks for g in graph.groups} == {4}
    conv2 = pruned.conv2
    assert conv2.groups == 4 and conv2.in_channels == conv2.out_channels == 16
    assert conv2.weight.shape == (16, 4, 3, 3) and _out(pruned, x).shape == (2, 5)


def test_attention_heads_keep_equal_widths_and_vit_stays_consistent():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                              num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph, pruned = _prune(model, x, 0.5, round_to=8)
    residual = next(g for g in graph.groups if g.id == "conv_proj")
    assert residual.chunks == 4 and not graph.fixed
    attn = pruned.encoder.layers[0].self_attention
    assert attn.embed_dim == 32 and attn.head_dim == 8 and attn.num_heads == 4
    assert pruned.hidden_dim == pruned.conv_proj.out_channels == 32
    assert pruned.encoder.layers[0].mlp[0].out_features == 64      # the MLP hidden width is a group of its own
    assert pruned.class_token.shape[-1] == pruned.encoder.pos_embedding.shape[-1] == 32
    assert _out(pruned, x).shape == (1, 10)


def _known_order_model():
    """conv -> bn -> linear where L1 of the conv filters and |gamma| of the BN rank channels oppositely."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        scale = torch.arange(1, 9, dtype=torch.float32)
        model[0].weight.copy_(scale.view(8, 1, 1, 1).expand(8, 3, 1, 1))   # filter i has L1 proportional to i+1
        model[1].weight.copy_(1.0 / scale)                                 # gamma i decreases with i
        model[5].weight.fill_(0.01)                                        # the next layer weighs channels alike
    return model


@pytest.mark.parametrize("criterion, kept", [("l1", [4, 5, 6, 7]), ("l2", [4, 5, 6, 7]), ("bn", [0, 1, 2, 3])])
def test_each_criterion_keeps_the_channels_it_ranks_highest(criterion, kept):
    model, x = _known_order_model(), torch.randn(1, 3, 8, 8)
    _, pruned = _prune(model, x, 0.5, round_to=1, importance=criterion)
    expected = model[0].weight[kept, 0, 0, 0]
    assert torch.equal(pruned[0].weight[:, 0, 0, 0], expected)


def test_taylor_uses_the_calibration_batches_and_is_deterministic():
    from autocompress.models import digits_resnet

    model, x = digits_resnet(pretrained=False), torch.randn(1, 1, 32, 32)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen))]
    graph = ac.analyze(model, x)
    policy = {"prune": {"keep": {g.id: 0.5 for g in graph.groups}, "importance": "taylor"}}
    with calibration_data(batches):
        a, b = ac.apply(model, policy, x), ac.apply(model, policy, x)
    alone = ac.apply(model, policy, x)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), alone.state_dict().values()))
    assert all(p.grad is None for p in a.parameters()) and all(p.grad is None for p in model.parameters())


def test_unknown_criterion_is_one_clear_error(resnet18):
    model, x = resnet18
    with pytest.raises(AutocompressError, match="importance.*allowed"):
        ac.apply(model, {"prune": {"keep": {"conv1": 0.5}, "importance": "random"}}, x)


class HardCoded(nn.Module):
    """`body`'s width is hard-coded in forward (a reshape to 16 channels): pruning it breaks the model."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)))
        return self.head(x.reshape(x.shape[0], 16, -1).mean(-1))


def test_a_group_that_breaks_the_model_is_left_whole_and_named_once():
    model, x = HardCoded().eval(), torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ac.analyze(model, x)
    messages = [str(w.message) for w in caught if "left whole" in str(w.message) or "whole because" in str(w.message)]
    assert len(messages) == 1 and messages[0].count("body") == 1 and "stem" not in messages[0]
    assert [g.id for g in graph.groups] == ["stem"] and graph.fixed == ["body"]
    with pytest.warns(UserWarning, match="channel group body cannot be pruned safely"):
        pruned = ac.apply(model, {"prune": {"keep": {"stem": 0.5, "body": 0.5}, "round_to": 1}}, x)
    assert pruned.stem.out_channels == 4 and pruned.body.out_channels == 16
    assert _out(pruned, x).shape == (1, 4)


def test_resnet_blocks_with_matching_shapes_are_droppable(resnet18):
    model, x = resnet18
    graph = ac.analyze(model, x)
    assert [b for b, _ in graph.blocks] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    slim = ac.apply(model, {"depth": {"keep": {"layer1.1": 0, "layer3.1": 0, "layer4.1": 1}}}, x)
    assert isinstance(slim.layer1[1], nn.Identity) and isinstance(slim.layer3[1], nn.Identity)
    removed = count_params(model.layer1[1]) + count_params(model.layer3[1])
    assert count_params(slim) == count_params(model) - removed
    assert torch.equal(slim.layer4[1].conv1.weight, model.layer4[1].conv1.weight)   # kept blocks inherit weights
    assert _out(slim, x).shape == (1, 1000)


@pytest.mark.parametrize("name, blocks", [("mobilenet_v2", 10), ("convnext_tiny", 18)])
def test_depth_finds_inverted_residual_and_convnext_blocks(name, blocks):
    model, x = torchvision.models.get_model(name).eval(), torch.randn(1, 3, 64, 64)
    graph = ac.analyze(model, x)
    assert len(graph.blocks) == blocks
    slim = ac.apply(model, {"depth": {"keep": {b: 0 for b, _ in graph.blocks}}}, x)
    assert count_params(slim) < count_params(model) and _out(slim, x).shape == (1, 1000)


def test_unknown_block_is_one_clear_error(resnet18):
    model, x = resnet18
    with pytest.raises(AutocompressError, match="layer9.9"):
        ac.apply(model, {"depth": {"keep": {"layer9.9": 0}}}, x)


def test_slim_space_samples_depth_and_stage_widths_that_run(digits_model, digits_input):
    graph = ac.analyze(digits_model, digits_input)
    bound = ac.SearchSpace.load("slim").bind(graph)
    depth = [k for k in bound.knobs if k.technique == "depth"]
    width = [k for k in bound.knobs if k.technique == "prune"]
    assert len(depth) == len(graph.blocks) == 4
    assert len(width) == len({g.stage for g in graph.groups}) == 3
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(4):
        policy = bound.sample(study.ask())
        slim = ac.apply(digits_model, policy, digits_input)
        assert _out(slim, digits_input).shape == (1, 10)
        assert ac.estimate(slim, digits_input, hardware="raspberry-pi-4").params == count_params(slim)


def test_shufflenet_prunes_branch_widths_and_removes_exactly_the_ranked_channels():
    """Torch-Pruning cannot map channels through ShuffleNet's channel shuffle: the groups that pass it stay whole,
    the others prune, and the channels they remove are the ones that were chosen. Half the inner channels of one
    branch are made silent (BN gamma and beta 0); pruning them by BN scale leaves the features as they were,
    where pruning half of the live channels changes them."""
    model, x = torchvision.models.shufflenet_v2_x0_5(weights=None).eval(), torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ac.analyze(model, x)
    assert graph.groups and graph.fixed and any("whole because" in str(w.message) for w in caught)

    def stage2(m):  # the shuffle units' output: random-weight logits barely depend on one branch
        return _out(nn.Sequential(m.conv1, m.maxpool, m.stage2), x)

    group = next(g for g in graph.groups if g.id == "stage2.1.branch2.0")
    keep = {g.id: 1.0 for g in graph.groups} | {group.id: 0.5}
    assert not torch.allclose(stage2(_prune(model, x, keep, round_to=1)[1]), stage2(model), atol=1e-3)
    branch = model.stage2[1].branch2  # 1x1 conv, BN, ReLU, 3x3 depthwise, BN, 1x1 conv, BN, ReLU
    silent = list(range(0, group.channels, 2))
    with torch.no_grad():
        for bn in (branch[1], branch[4]):
            bn.weight[silent] = 0.0
        branch[4].bias[silent] = 0.0
    _, pruned = _prune(model, x, keep, round_to=1, importance="bn")  # BN scale: the silent channels go
    assert pruned.stage2[1].branch2[0].out_channels == group.channels - len(silent)
    torch.testing.assert_close(stage2(pruned), stage2(model), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["densenet121", "vit", "shufflenet_v2_x0_5"])
def test_a_kept_dependency_graph_prunes_as_a_fresh_trace_does(name):
    """Each prune binds a copy of one graph traced on a meta twin (concats, unwrapped parameters, reshapes
    Torch-Pruning cannot map): the pruned model must equal, tensor for tensor, what a graph traced on the model
    itself gives, pruned twice from one structure."""
    import copy

    import torch_pruning as tp

    from autocompress.compress.prune import groups
    from autocompress.graph import output_layers

    torch.manual_seed(0)
    if name == "vit":
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    else:
        model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 32, 32)

    def every_third(_model):
        return lambda info, group: list(range(0, info.channels // info.chunks, 3))[: info.channels // info.chunks - 1]

    def pruned(fresh: bool):
        groups._traces.clear()
        for _ in range(2):  # the second prune reuses the kept graph
            copied = copy.deepcopy(model)
            if fresh:  # the graph traced on the model itself, as Torch-Pruning is meant to be used
                copied_graph = tp.DependencyGraph().build_dependency(copied, example_inputs=(x,))
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(groups.Traced, "graph_of", lambda self, m: copied_graph)
                    out = groups.prune_channels(copied, x, output_layers(model, x), every_third)
            else:
                out = groups.prune_channels(copied, x, output_layers(model, x), every_third)
        return out

    (kept, kept_groups, kept_failed), (fresh, fresh_groups, fresh_failed) = pruned(False), pruned(True)
    assert [i.id for i, _ in kept_groups] == [i.id for i, _ in fresh_groups] and kept_groups
    assert [i.id for i in kept_failed] == [i.id for i in fresh_failed]
    assert {k: v.shape for k, v in kept.state_dict().items()} == {k: v.shape for k, v in fresh.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(kept(x), fresh(x))
