"""Search spaces: validation with clear errors, binding to real graphs, policies as plain JSON."""
import json

import optuna
import pytest
import torch
import torchvision

import autocompress as ac
from autocompress.space import SearchSpace, builtin_spaces


def write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, message", [
    ("techniques:\n  shrink: {}\n", "unknown technique 'shrink'"),
    ("techniques:\n  prune:\n    keep: [0.5, fast]\n", "prune.keep must list numbers"),
    ("techniques:\n  prune:\n    granularity: block\n", "granularity 'block' of 'prune' is not allowed"),
    ("techniques:\n  prune:\n    importance: vibes\n", "prune.importance = 'vibes' is not allowed"),
    ("techniques:\n  prune:\n    keep: {low: 0, high: 1}\n", "0 < low <= high"),
    ("techniques:\n  quantize:\n    colour: red\n", "unknown key 'colour' for technique 'quantize'"),
    ("techniques: [1, 2]\n", "must be a mapping with a 'techniques' mapping"),
    ("techniques:\n  prune: {keep: [0.5\n", "is not valid YAML"),
    ("name: x\nextra: 1\ntechniques: {}\n", "unknown key 'extra'"),
])
def test_bad_spaces_get_one_sentence(tmp_path, text, message):
    with pytest.raises(ac.AutocompressError, match=message) as info:
        SearchSpace.load(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_builtin_default_space_binds_one_knob_per_group_and_layer(digits_model, digits_input):
    assert "default" in builtin_spaces()
    graph = ac.analyze(digits_model, digits_input)
    bound = SearchSpace.load("default").bind(graph)
    prune_knobs = [k for k in bound.knobs if k.technique == "prune"]
    quant_knobs = [k for k in bound.knobs if k.technique == "quantize"]
    assert len(prune_knobs) == len(graph.groups) == 9   # residual adds couple 3 groups' worth of layers
    convs_and_linears = [l for l in graph.layers if l.kind in ("conv", "linear")]
    assert len(quant_knobs) == len(convs_and_linears)


def test_global_and_stage_granularity(tmp_path, digits_model, digits_input):
    graph = ac.analyze(digits_model, digits_input)
    glob = SearchSpace.load(write(tmp_path, "techniques:\n  prune: {granularity: global}\n")).bind(graph)
    assert [k.param for k in glob.knobs] == ["prune.keep.all"]
    stage = SearchSpace.load(write(tmp_path, "techniques:\n  prune: {granularity: stage}\n")).bind(graph)
    assert sorted(k.param for k in stage.knobs) == ["prune.keep.stage_16x16", "prune.keep.stage_32x32", "prune.keep.stage_8x8"]


def test_policy_is_json_and_apply_is_deterministic(digits_model, digits_input):
    bound = SearchSpace.load("default").bind(ac.analyze(digits_model, digits_input))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    policy = bound.sample(trial)
    text = policy.to_json()
    assert ac.Policy.from_json(text) == json.loads(text)
    a = ac.apply(digits_model, text, digits_input)
    b = ac.apply(digits_model, ac.Policy.from_json(text), digits_input)
    torch.testing.assert_close(a(digits_input), b(digits_input))
    assert sum(p.numel() for p in a.parameters()) < sum(p.numel() for p in digits_model.parameters())


def test_identity_policy_leaves_the_model_unchanged(digits_model, digits_input):
    bound = SearchSpace.load("default").bind(ac.analyze(digits_model, digits_input))
    same = ac.apply(digits_model, bound.policy({}), digits_input)
    torch.testing.assert_close(same(digits_input), digits_model(digits_input))


def test_resnet18_binds_and_prunes(tmp_path):
    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    bound = SearchSpace.load("default").bind(ac.analyze(model, x))
    half = ac.apply(model, bound.policy({k.param: 0.5 for k in bound.knobs if k.technique == "prune"}), x)
    assert half(x).shape == (1, 1000)
    est = ac.estimate(half, x, "raspberry-pi-4")
    assert est.params == sum(p.numel() for p in half.parameters())
    assert est.macs < 0.35 * ac.estimate(model, x, "raspberry-pi-4").macs
