"""Compact students: spaces validated on load, stem/head fitted to the teacher, an elastic supernet trained once
and cached, inherited weights identical to the supernet's sliced forward pass, students on the same front as
compressed models with an `origin` column. Tiny spaces and a 3-step supernet keep it quick."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autocompress as ac
from autocompress.compress.student import TECHNIQUE as STUDENT
from autocompress.evaluate import Evaluator, accuracy
from autocompress import supernet
from autocompress.space import SearchSpace
from autocompress.students import bank
from autocompress.students.build import Student, build

TINY = """
techniques:
  student:
    block: {block}
    granularity: global
    depth: [0.5, 1]
    width: [0.5, 0.75]
    kernel: [3, 5]
    primary: [1.0, 0.5]
    separate: [1, 0]
    supernet_steps: 3
"""


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """Supernets go to a fresh folder (the trained digits model and the host profile stay where they are)."""
    monkeypatch.setattr(bank, "_path", lambda key: tmp_path / f"{key}.pt")
    monkeypatch.setattr(bank, "_LOADED", {})
    return tmp_path


@pytest.fixture(scope="module")
def small_data():
    from autocompress.data import digits_tensors

    (xt, yt), (xv, yv), _ = digits_tensors()
    train = DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=32)
    return train, DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=128)


@pytest.fixture(scope="module")
def digits_graph(digits_model, digits_input):
    return ac.analyze(digits_model, digits_input)


def quick_judge(data):
    return Evaluator(*data, recal_batches=1)


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (("block: mbconv", "block: resnet"), "student.block = 'resnet' is not allowed; allowed: mbconv, fire"),
    (("kernel: [3, 5]", "kernel: [3, 9]"), "student.kernel choice 9 is not allowed; allowed: 3, 5, 7"),
    (("width: [0.5, 0.75]", "width: [0.5, 5]"), "student.width choice 5 is not allowed; allowed: numbers above 0 up to 4"),
    (("separate: [1, 0]", "act: [relu, gelu]"), "student.act choice 'gelu' is not allowed; allowed: relu, hswish, swish"),
    (("separate: [1, 0]", "se: [0, 2]"), "student.se choice 2 is not allowed; allowed: 0, 1"),
])
def test_bad_student_spaces_get_one_sentence_naming_key_and_allowed_values(tmp_path, edit, message):
    text = TINY.format(block="mbconv").replace(*edit)
    with pytest.raises(ac.AutocompressError) as info:
        SearchSpace.load(write(tmp_path, text))
    assert str(info.value) == message


def test_a_knob_the_block_type_lacks_is_refused_before_any_work(tmp_path, digits_model, digits_input):
    text = TINY.format(block="mbconv") + "    squeeze: [0.25, 0.5]\n"
    with pytest.raises(ac.AutocompressError, match="student.squeeze applies to fire blocks only; this space's block is mbconv"):
        ac.compress(digits_model, digits_input, space=write(tmp_path, text), trials=1, progress=False)


@pytest.mark.parametrize("name", ["mobilenet", "squeezenet", "efficientnet"])
def test_builtin_student_spaces_bind_to_stages_and_fit_any_teacher(name, digits_model, digits_input, digits_graph):
    import torchvision

    bound = SearchSpace.load(name).bind(digits_graph)
    assert {k.technique for k in bound.knobs} == {"student"}
    assert all(set(t) <= {f"stage{i}" for i in range(1, 6)} for k in bound.knobs for t in [k.targets])
    for fraction in (0.0, 1.0):
        small = ac.apply(digits_model, bound.policy(bound.uniform(fraction)), digits_input)
        assert isinstance(small, Student) and small(digits_input).shape == (1, 10)
    x = torch.randn(1, 3, 64, 64)
    resnet = torchvision.models.resnet18(num_classes=7)
    big = ac.apply(resnet, bound.policy(bound.uniform(1.0)), x)
    assert big(x).shape == (1, 7) and big.stem[0].in_channels == 3


def test_resolution_knob_resizes_the_input_and_the_cost_model_sees_it(digits_input):
    plain = build({"block": "mbconv"}, digits_input.shape, 10)
    larger = build({"block": "mbconv", "resolution": 1.25}, digits_input.shape, 10)
    assert plain.size is None and larger.size == (40, 40)
    ratio = ac.estimate(larger, digits_input).macs / ac.estimate(plain, digits_input).macs
    assert 1.3 < ratio < 1.8  # about 1.25^2 more positions (strides round some maps)


def test_a_teacher_without_class_scores_gets_a_clear_error(digits_input):
    segmenter = nn.Conv2d(1, 4, 3, padding=1)
    with pytest.raises(ac.AutocompressError, match=r"outputs class scores of shape \(batch, classes\); this model "
                                                   r"outputs a torch.float32 tensor of shape \(1, 4, 32, 32\)"):
        ac.apply(segmenter, {"student": {"block": "mbconv"}}, digits_input)


def test_supernet_is_trained_once_cached_and_students_inherit_exactly_its_slices(
        tmp_path, cache, digits_model, digits_input, digits_graph, small_data):
    bound = SearchSpace.load(write(tmp_path, TINY.format(block="mbconv"))).bind(digits_graph)
    said = []
    key = supernet.prepare(bound, digits_model, digits_input, small_data[0], log=said.append)
    assert (cache / f"{key}.pt").exists() and any("trained" in s for s in said)
    assert bound.space.techniques["student"]["supernet"] == key
    said.clear()
    bank._LOADED.clear()
    assert supernet.prepare(bound, digits_model, digits_input, small_data[0], log=said.append) == key and not said

    stored = bank.load(key)
    sampler = supernet.Sampler(bound)
    x = small_data[1].dataset.tensors[0][:8]
    for section in (sampler.uniform(0.0), sampler.uniform(1.0), sampler.uniform(0.5)):
        student = ac.apply(digits_model, {"student": section}, digits_input)  # the policy names the supernet
        skeleton = supernet._skeleton(section, digits_input.shape, 10).eval()
        with torch.no_grad():
            sliced = supernet._run_sliced(skeleton, stored["params"], stored["buffers"], x)
            torch.testing.assert_close(student(x), sliced)
    fresh = build(sampler.uniform(1.0), digits_input.shape, 10)
    assert not torch.equal(fresh.classifier.weight, ac.apply(digits_model, {"student": sampler.uniform(1.0)},
                                                             digits_input).classifier.weight)

    other = type(digits_model)()  # other teacher weights: another supernet
    other.load_state_dict(digits_model.state_dict())
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    cfg = bound.space.techniques["student"]
    assert supernet.supernet_key(other, small_data[0], digits_input.shape, 10, cfg) != key


def test_students_share_the_front_with_compressed_models_and_rebuild_from_their_policy(
        tmp_path, cache, digits_model, digits_input, small_data):
    text = TINY.format(block="fire").replace("separate: [1, 0]", "separate: [1, 0]\n    bypass: [0, 1]") + \
        "  prune:\n    keep: [0.5, 1.0]\n    granularity: global\n"
    result = ac.compress(digits_model, digits_input, data=small_data, evaluator=quick_judge(small_data),
                         space=write(tmp_path, text), trials=3, sampler="random", budgets={"size": 0.9}, progress=False)
    trials = result.trials[result.trials["state"] == "COMPLETE"]  # a repair may make a duplicate: it has no policy
    assert set(trials["origin"]) == {"student", "compressed"}
    for number, row in trials.iterrows():
        policy = ac.Policy.from_json(row["policy"])
        assert ("student" in policy) == (row["origin"] == "student") and len(policy) == 1
        model = ac.apply(digits_model, policy, digits_input) if number not in result.pareto.index else \
            result.model(number)  # only the front's weights are kept
        assert isinstance(model, Student) == (row["origin"] == "student")
        est = ac.estimate(model, digits_input)
        assert (est.macs, est.params) == (row["macs"], row["params"])
        if row["feasible"]:
            assert 0.0 <= row["accuracy"] <= 1.0
    assert set(result.pareto["origin"]) <= {"student", "compressed"}
    judged = trials[(trials["origin"] == "student") & trials["accuracy"].notna()]
    # a student whose weights are kept (on the front); else the front's first model (test_truth covers students)
    student = next((n for n in judged.index if _stored(result, n)), result.pareto.index[0])
    expected = accuracy(result.model(student), small_data[1])
    assert expected == trials.loc[student, "accuracy"]  # rebuilt from its policy, judged as in the search
    for fmt, suffix in (("state_dict", "pt"), ("torchscript", "ts.pt"), ("onnx", "onnx")):
        info = result.export(student, fmt, tmp_path / f"student.{suffix}", data=small_data)
        assert info.accuracy == pytest.approx(expected, abs=1 / 128)  # the file, loaded on its own


def test_an_infeasible_student_is_never_trained_or_judged(tmp_path, digits_model, digits_input):
    judged = []
    result = ac.compress(digits_model, digits_input, space=write(tmp_path, TINY.format(block="mbconv")), trials=2,
                         evaluator=lambda m: judged.append(type(m).__name__) or 0.5, budgets={"size_kb": 1},
                         progress=False)
    assert judged == ["DigitsResNet"]  # the baseline only
    assert not result.trials["feasible"].any() and result.trials["accuracy"].isna().all()
    assert (result.trials["origin"] == "student").all()


def test_student_technique_knobs_are_its_stages_not_the_teachers_layers(digits_graph):
    assert [t for t, _ in STUDENT.targets(digits_graph)] == [
        "stage1", "stage2", "stage3", "stage4", "stage5"]


def _stored(result, number) -> bool:
    try:
        result.model(number)
        return True
    except ac.AutocompressError:
        return False
