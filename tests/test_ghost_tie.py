"""Ghost replacement of a user's convs and cross-layer parameter sharing (tie): shapes, inherited weights,
and MACs / parameters / size exactly as the cost model counts them."""
import io
import math

import pytest
import torch
from torch import nn

import autocompress as ac
from autocompress.compress import ghost, tie
from autocompress.compress.base import get_meta
from autocompress.evaluate import finetune
from autocompress.students.blocks import GhostConv
from autocompress.students.build import build
from counting import count_params


def _saved_bytes(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return len(buf.getvalue())


def test_ghost_reproduces_a_conv_whose_dropped_filters_are_multiples_of_kept_ones():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 8, 3, stride=2, padding=1, bias=True)
    base = torch.randn(4, 5, 3, 3) * 3  # the 4 most important filters (largest L1)
    with torch.no_grad():
        conv.weight[[0, 2, 5, 7]] = base
        conv.weight[[1, 3, 4, 6]] = base[[2, 0, 3, 1]] * torch.tensor([0.5, -0.3, 0.2, 0.1])[:, None, None, None]
    g = ghost.ghost_of(conv, 0.5)
    x = torch.randn(2, 5, 9, 9)
    assert g.primary.out_channels == 4 and g(x).shape == conv(x).shape
    torch.testing.assert_close(g(x), conv(x), atol=1e-5, rtol=1e-4)  # same channels, same order, same values


def test_ghost_on_a_users_model_keeps_shapes_and_prices_macs_and_params_as_counted(digits_model, digits_input):
    graph = ac.analyze(digits_model, digits_input)
    targets = [name for name, _ in ghost.TECHNIQUE.targets(graph)]
    assert "fc" not in targets and "layer1.0.conv1" in targets
    model = ac.apply(digits_model, {"ghost": {"primary": {"layer1.0.conv1": 0.25, "layer2.1.conv2": 0.5}}},
                     digits_input)
    assert model(digits_input).shape == digits_model(digits_input).shape
    replaced = {"layer1.0.conv1": (0.25, 32), "layer2.1.conv2": (0.5, 16)}  # (primary, output side)
    expected_macs = ac.estimate(digits_model, digits_input).macs
    for name, (primary, side) in replaced.items():
        old, new = digits_model.get_submodule(name), model.get_submodule(name)
        assert isinstance(new, GhostConv) and get_meta(new)["ghost_primary"] == primary
        real = math.ceil(old.out_channels * primary)
        per_real = math.ceil(old.out_channels / real) - 1
        assert new.primary.out_channels == real and new.cheap.out_channels == real * per_real
        expected_macs += side * side * (real * old.in_channels * 9 + real * per_real * 9 - old.out_channels * old.in_channels * 9)
    est = ac.estimate(model, digits_input)
    assert est.macs == expected_macs
    assert est.params == count_params(model) < count_params(digits_model)


def test_tie_shares_one_set_of_weights_counted_once_and_used_twice(digits_model, digits_input, digits_data):
    graph = ac.analyze(digits_model, digits_input)
    assert tie.TECHNIQUE.targets(graph) == [("layer1.0,layer1.1", "32x32")]
    tied = ac.apply(digits_model, {"tie": {"separate": {"layer1.0,layer1.1": 0}}}, digits_input)
    assert tied.layer1[1].conv1 is tied.layer1[0].conv1 and tied.layer1[1].bn1 is not tied.layer1[0].bn1
    assert get_meta(tied.layer1[1])["tied_to"] == "layer1.0"
    shared = sum(p.numel() for p in digits_model.layer1[1].conv1.parameters()) + \
        sum(p.numel() for p in digits_model.layer1[1].conv2.parameters())
    before, after = ac.estimate(digits_model, digits_input), ac.estimate(tied, digits_input)
    assert after.params == count_params(tied) == before.params - shared
    assert before.size_kb * 1024 - after.size_kb * 1024 == shared * 4
    assert _saved_bytes(digits_model) - _saved_bytes(tied) == pytest.approx(shared * 4, rel=0.01)  # torch.save agrees
    assert after.macs == before.macs and after.latency_ms == pytest.approx(before.latency_ms)  # every use priced
    weight = tied.layer1[0].conv1.weight.detach().clone()
    finetune(tied, iter(digits_data[0]), 2, teacher=digits_model)
    assert tied.layer1[1].conv1 is tied.layer1[0].conv1  # fine-tuning trains the shared weights, keeps the tie
    assert not torch.equal(tied.layer1[1].conv1.weight, weight)


def test_untied_or_unequal_blocks_stay_separate(digits_model, digits_input):
    same = ac.apply(digits_model, {"tie": {"separate": {"layer1.0,layer1.1": 1}}}, digits_input)
    assert same.layer1[1].conv1 is not same.layer1[0].conv1
    pruned = ac.apply(digits_model, {"prune": {"keep": {"layer1.0.conv1": 0.5}},
                                     "tie": {"separate": {"layer1.0,layer1.1": 0}}}, digits_input)
    assert pruned.layer1[1].conv1 is not pruned.layer1[0].conv1  # pruning made the blocks unequal


@pytest.mark.parametrize("block", ["mbconv", "fire"])
def test_student_stage_with_separate_0_shares_weights_with_every_use_priced(block):
    x = torch.randn(1, 3, 32, 32)
    own = build({"block": block, "depth": 2.0, "separate": 1}, x.shape, 10)
    tied = build({"block": block, "depth": 2.0, "separate": 0}, x.shape, 10)
    stage = tied.stages.stage3  # 4 blocks: the first downsamples, blocks 2 and 3 use block 1's weights
    convs = [m for m in stage[1].modules() if isinstance(m, nn.Conv2d)]
    assert all(any(m is c for m in stage[3].modules()) for c in convs)
    removed = sum(p.numel() for s in own.stages for b in list(s)[2:] for m in b.modules()
                  if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False))
    est_own, est_tied = ac.estimate(own, x), ac.estimate(tied, x)
    assert est_tied.params == count_params(tied) == est_own.params - removed
    assert est_tied.macs == est_own.macs
