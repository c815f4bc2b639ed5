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


def test_bench_peers_space_stores_every_layer_at_8_bits_or_fewer(digits_model, digits_input, tmp_path):
    """scripts/peers_space.yaml (bench_peers.py's autocompress side): a depth knob per residual block, and every
    sampled policy stores each conv/linear at 8 or 4 bits, Huffman-coded, packed no larger than fixed-width."""
    from pathlib import Path

    from autocompress.compress.base import get_meta
    from autocompress.cost.pack import save_packed

    space = SearchSpace.load(str(Path(__file__).parents[1] / "scripts" / "peers_space.yaml"))
    graph = ac.analyze(digits_model, digits_input)
    bound = space.bind(graph)
    assert len([k for k in bound.knobs if k.technique == "depth"]) == len(graph.blocks) > 0
    bits = {frozenset(k.distribution.choices) for k in bound.knobs if k.technique == "quantize"}
    assert bits == {frozenset((8, 4))}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(3):
        policy = bound.sample(study.ask())
        model = ac.apply(digits_model, policy, digits_input)
        layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        assert layers and all(get_meta(m)["weight_bits"] in (8, 4) and get_meta(m)["huffman"] for m in layers)
        fixed = ac.apply(digits_model, ac.Policy({**policy, "quantize": {**policy["quantize"], "huffman": False}}),
                         digits_input)
        assert save_packed(model, tmp_path / "h.acpk") <= save_packed(fixed, tmp_path / "f.acpk")
