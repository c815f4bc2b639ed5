"""The Technique plugin interface: every technique's largest choice leaves the model unchanged, and a technique
defined and registered in this file alone is searched, applied in its order, priced, reported and delivered."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import autocompress as ac
from autocompress.compress import TECHNIQUES, Technique, get_meta, register, unregister
from autocompress.compress.base import FRACTION, Between, layer_targets, set_meta, weight_layers
from autocompress.cost.model import size_bytes
from autocompress.cost.pack import load_packed, packed_sections, save_packed
from autocompress.errors import AutocompressError
from autocompress.evaluate import accuracy
from autocompress.models import DigitsResNet
from autocompress.report import field_title
from autocompress.space import Policy, SearchSpace
from autocompress.unpack import read_packed
from autocompress.weights import Stage, weight_bytes

# A student is a new network built from its knobs, not a compression of the given one: it has no identity.
COMPRESSING = [name for name, technique in TECHNIQUES.items() if not technique.builds_model]


@pytest.fixture(scope="module")
def blocky_model():
    """Identical residual blocks (so depth and tie have targets), seeded, BatchNorm statistics not trivial."""
    torch.manual_seed(0)
    model = DigitsResNet(widths=(8, 16, 16), blocks=2)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 32, 32))
    return model.eval()


def identity_policy(name: str, model: nn.Module, x: torch.Tensor):
    """The policy of a space holding technique `name` alone (its default choices), every knob at its largest."""
    bound = SearchSpace("one", {name: {}}).bind(ac.analyze(model, x))
    assert bound.knobs or bound.fixed, f"{name} has no target in the test model: the check would be vacuous"
    return bound.policy({})


@pytest.mark.parametrize("name", COMPRESSING)
def test_the_largest_choice_of_every_technique_leaves_the_model_unchanged(name, blocky_model, digits_input):
    """The rule `scaled`, repair and unsampled knobs rely on: the largest choice is no compression at all."""
    same = ac.apply(blocky_model, identity_policy(name, blocky_model, digits_input), digits_input)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same(x), blocky_model(x))
    assert not any(get_meta(m) for m in same.modules()), "a metadata key says compressed"
    before, after = ac.estimate(blocky_model, digits_input, "raspberry-pi-4"), ac.estimate(same, digits_input,
                                                                                           "raspberry-pi-4")
    assert (after.size_kb, after.latency_ms, after.macs) == (before.size_kb, before.latency_ms, before.macs)


def test_every_technique_declares_its_place_and_legal_choices():
    orders = [t.order for t in TECHNIQUES.values()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)
    for technique in TECHNIQUES.values():
        for field, choices in technique.fields.items():
            allowed = technique.allowed_settings.get(field)
            listed = choices if isinstance(choices, list) else [choices["low"], choices["high"]]
            assert allowed is None or all(c in allowed for c in listed), (technique.name, field)


def _clip(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    """Clamp every weight of a layer to `clip` x its largest magnitude (a toy technique)."""
    for name, clip in section.get("clip", {}).items():
        if float(clip) >= 1.0:
            continue
        for module in weight_layers(model, name):
            bound = float(clip) * float(module.weight.detach().abs().max())
            module.weight.data.clamp_(-bound, bound)
    return model


CLIP = Technique(name="clip", order=85, fields={"clip": [1.0, 0.5, 0.25]}, settings={},
                 allowed_settings={"clip": FRACTION}, targets=layer_targets, apply=_clip,
                 titles={"clip": "weights clamped to this fraction of their largest magnitude, per layer"})


@pytest.fixture
def clip_registered():
    register(CLIP)
    yield CLIP
    unregister("clip")


def test_a_technique_registered_from_one_file_is_searched_applied_and_delivered(clip_registered, tmp_path,
                                                                                  digits_model, digits_input,
                                                                                  digits_data):
    names = list(TECHNIQUES)
    assert names.index("share") < names.index("clip") < names.index("quantize")  # at its order in the pipeline
    space = tmp_path / "clip.yaml"
    space.write_text("name: clip\ntechniques:\n  clip:\n    clip: [1.0, 0.5, 0.25]\n  quantize:\n"
                     "    weight_bits: [32, 8]\n")
    bound = SearchSpace.load(str(space)).bind(ac.analyze(digits_model, digits_input))
    assert {k.technique for k in bound.knobs} == {"clip", "quantize"}
    clipped = ac.apply(digits_model, bound.policy({k.param: 0.25 for k in bound.knobs if k.technique == "clip"}),
                       digits_input)
    conv = clipped.get_submodule(layer_targets(ac.analyze(digits_model, digits_input))[0][0])
    original = digits_model.get_submodule(layer_targets(ac.analyze(digits_model, digits_input))[0][0])
    assert float(conv.weight.detach().abs().max()) == pytest.approx(0.25 * float(original.weight.detach().abs().max()), rel=1e-6)
    assert field_title("clip", "clip") == CLIP.titles["clip"]

    result = ac.compress(digits_model, digits_input, data=digits_data, space=str(space), trials=4,
                         objectives=("accuracy", "size_kb"), final_epochs=0, progress=False)
    policies = [Policy.from_json(p) for p in result.trials["policy"].dropna()]
    assert any(set(p.get("clip", {}).get("clip", {}).values()) - {1.0} for p in policies), "clip was never sampled"
    for n in result.pareto.index:  # the returned model measures what the front says
        assert accuracy(result.model(int(n)), digits_data[2]) == pytest.approx(result.pareto.loc[n, "test_accuracy"])


def test_register_refuses_a_taken_name_or_order(clip_registered):
    with pytest.raises(AutocompressError, match="already registered"):
        register(CLIP)
    with pytest.raises(AutocompressError, match="order 90, the order of 'quantize'"):
        register(Technique(name="other", order=90, fields={}, settings={}, targets=layer_targets, apply=_clip))
    with pytest.raises(AutocompressError, match="no technique named 'nothing'"):
        unregister("nothing")


def _bfloat16(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    """Round a layer's weights to bfloat16 (a toy technique with a stored format of its own)."""
    for name, bits in section.get("bits", {}).items():
        if int(bits) < 32:
            for module in weight_layers(model, name):
                module.weight.data = module.weight.data.bfloat16().float()
                set_meta(module, bfloat16=True)
    return model


def _read_bfloat16(loaded) -> None:
    """bfloat16 is the top half of a float32: shift the stored 16 bits up."""
    raw = np.frombuffer(loaded.sections.pop(0), dtype=np.uint16).astype(np.uint32) << 16
    loaded.values = raw.view(np.float32)


BFLOAT16 = Technique(name="bfloat16", order=95, fields={"bits": [32, 16]}, settings={},
                     allowed_settings={"bits": (16, 32)}, targets=layer_targets, apply=_bfloat16,
                     stages=(Stage(name="bfloat16 values", slot="values", order=5, keys=("bfloat16",),
                                   present=lambda s: bool(s.meta.get("bfloat16")),
                                   encode=lambda s: (s.enc.update(bfloat16=True), s.sections.append(
                                       s.values().bfloat16().view(torch.int16).numpy().tobytes())),
                                   nbytes=lambda s: 2 * s.count(), written=lambda enc: "bfloat16" in enc,
                                   decode=_read_bfloat16),))


def test_a_technique_registered_from_one_file_stores_its_weights_in_its_own_stage(blocky_model, tmp_path):
    """Its stage takes the values slot before the built-in ones: the cost model's size and the packed file
    count two bytes a weight; unregistered, the stage goes with it."""
    x = torch.randn(1, 1, 32, 32)
    names = [name for name, _ in layer_targets(ac.analyze(blocky_model, x))]
    register(BFLOAT16)
    try:
        model = ac.apply(blocky_model, {"bfloat16": {"bits": dict.fromkeys(names, 16)}}, x)
        stored = sum(2 * p.numel() if name.endswith("weight") and get_meta(model.get_submodule(name[:-7]))
                     else p.numel() * p.element_size() for name, p in model.state_dict().items())
        assert size_bytes(model) == stored
        save_packed(model, tmp_path / "m.acpk", architecture=False)
        assert packed_sections(tmp_path / "m.acpk")["tensors"] == stored
        loaded = load_packed(tmp_path / "m.acpk", copy.deepcopy(model))  # read back by the technique's stage
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        with pytest.raises(ValueError, match="header key 'bfloat16'"):  # the numpy-only reader says it cannot
            read_packed(tmp_path / "m.acpk")
    finally:
        unregister("bfloat16")
    conv = model.get_submodule(names[0])
    assert weight_bytes(conv.weight, get_meta(conv)) == 4 * conv.weight.numel()  # fp32 again: the stage left


def _probe(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    """A new network, not the model compressed: one hidden layer of `hidden` units, the model's classes out."""
    hidden = int(section["hidden"]["net"])
    classes = model(example_input).shape[1]
    return nn.Sequential(nn.Flatten(), nn.Linear(example_input[0].numel(), hidden), nn.ReLU(),
                         nn.Linear(hidden, classes)).eval()


PROBE = Technique(name="probe", order=5, fields={"hidden": [4, 8, 16]}, settings={},
                  allowed_settings={"hidden": Between(0, 64, whole=True)}, targets=lambda graph: [("net", "all")],
                  apply=_probe, kind="probe")


@pytest.fixture
def probe_registered():
    register(PROBE)
    yield PROBE
    unregister("probe")


def test_a_candidate_kind_registered_from_one_file_gets_its_own_policies_levers_and_origin(probe_registered,
                                                                                          digits_model,
                                                                                          digits_input):
    """A technique whose `kind` is not "compressed" builds its own network: the space gets a `kind` knob, its
    policies hold its section alone, it lowers every cost (repair always scales it), its trials say its kind."""
    from autocompress import search
    from autocompress.cost.hardware import load_profile
    from autocompress.repair import levers

    space = SearchSpace("mixed", {"probe": {"granularity": "global"}, "prune": {"granularity": "global"}})
    bound = space.bind(ac.analyze(digits_model, digits_input))
    assert bound.kinds == ("compressed", "probe") and bound.distributions["kind"].choices == ("compressed", "probe")
    probe = bound.policy(bound.uniform(0.0, kind="probe"))
    assert probe == {"probe": {"hidden": {"net": 4}}} and probe.kind() == "probe"
    assert set(bound.policy(bound.uniform(0.0))) == {"prune"} and bound.policy({}).kind() == "compressed"
    problem = search.Problem(digits_model, digits_input, bound, load_profile("raspberry-pi-4"),
                             ("accuracy", "size_kb"), {}, None)
    assert all("probe" in movers for movers in levers(bound, problem.price, ("size_kb", "macs")).values())

    result = ac.compress(digits_model, digits_input, evaluator=lambda m: 0.5, space=space, trials=6,
                         objectives=("accuracy", "size_kb"), sampler="random", progress=False)
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert set(done["origin"]) == {"compressed", "probe"}  # the warm start tries both kinds
    for _, row in done.iterrows():
        policy = Policy.from_json(row["policy"])
        assert policy.kind() == row["origin"] and (row["origin"] == "probe") == ("probe" in policy)
        built = ac.apply(digits_model, policy, digits_input)
        assert isinstance(built, nn.Sequential) == (row["origin"] == "probe")
