"""Fine-tuning with knowledge distillation: it recovers accuracy, keeps every compression, is repeatable; early stopping."""
import optuna
import pytest
import torch

import autocompress as ac
from autocompress.compress.base import get_meta, layer_targets
from autocompress.errors import AutocompressError
from autocompress.evaluate import EarlyStopping, Evaluator, finalize, make_evaluator


@pytest.fixture(scope="module")
def pruned_policy(digits_model, digits_input):
    graph = ac.analyze(digits_model, digits_input)
    return {"prune": {"keep": {g.id: 0.375 for g in graph.groups}}}


def test_distillation_beats_bn_recalibration_alone(digits_model, digits_input, digits_data, pruned_policy):
    train, val = digits_data
    recal_only = Evaluator(train, val)(ac.apply(digits_model, pruned_policy, digits_input))
    distilled = Evaluator(train, val, finetune_steps=20, teacher=digits_model)(ac.apply(digits_model, pruned_policy, digits_input))
    assert distilled >= recal_only + 0.10, (recal_only, distilled)


def test_fine_tuning_keeps_every_compression_and_is_repeatable(digits_model, digits_input, digits_data, pruned_policy):
    train, val = digits_data
    names = [n for n, _ in layer_targets(ac.analyze(digits_model, digits_input))]
    policy = {**pruned_policy, "sparsity": {"density": dict.fromkeys(names, 0.3)},
              "share": {"bits": dict.fromkeys(names[:8], 3)},
              "quantize": {"weight_bits": dict.fromkeys(names[8:], 4), "act_bits": dict.fromkeys(names, 8)}}
    judge = Evaluator(train, val, finetune_steps=4, teacher=digits_model)
    models = []
    for _ in range(2):
        model = ac.apply(digits_model, policy, digits_input)
        before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        judge.prepare(model)
        models.append(model)
        for n in names:
            w, meta = model.get_submodule(n).weight.detach(), get_meta(model.get_submodule(n))
            # same density (surgery may move the mask; 4-bit rounding may zero a few more)
            assert 0.97 * int((before[n] != 0).sum()) <= int((w != 0).sum()) <= int((before[n] != 0).sum())
            if n in names[:8]:
                assert torch.unique(w[w != 0]).numel() <= 8
            else:
                per_channel = max(torch.unique(row).numel() for row in w.flatten(1))
                assert per_channel <= 15 and meta["weight_bits"] == 4
        assert not torch.equal(w, before[names[-1]])  # it did train
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_rule():
    rule = EarlyStopping(margin=0.05, similar=0.25, min_peers=2)
    near, far = {"latency_ms": 1.0, "size_kb": 100}, {"latency_ms": 1.0, "size_kb": 300}
    rule.record({"latency_ms": 1.1, "size_kb": 110}, 0.90)
    assert not rule.behind(near, 0.5)  # one peer is not enough evidence
    rule.record({"latency_ms": 0.9, "size_kb": 95}, 0.80)
    assert rule.behind(near, 0.84) and not rule.behind(near, 0.86)
    assert not rule.behind(far, 0.1)  # no peer of similar cost
    assert rule.check_step(40) == 10 and EarlyStopping(after=3).check_step(40) == 3


def test_a_candidate_behind_its_peers_stops_early(digits_model, digits_input, digits_data, pruned_policy):
    train, val = digits_data
    rule = EarlyStopping(after=1, min_peers=1)
    cost = {"latency_ms": 2.0, "size_kb": 300.0}
    rule.record(cost, 1.0)
    judge = Evaluator(train, val, finetune_steps=3, teacher=digits_model, early_stopping=rule)
    stopped = judge.judge(ac.apply(digits_model, pruned_policy, digits_input), cost)
    assert stopped["early_stopped"] and stopped["early_accuracy"] < 0.95 and 0 <= stopped["accuracy"] <= 1
    other = judge.judge(ac.apply(digits_model, pruned_policy, digits_input), {"latency_ms": 9.0, "size_kb": 900.0})
    assert not other["early_stopped"]
    assert len(rule.history) == 3  # every candidate's early accuracy becomes evidence


def test_search_records_early_stopping_and_finalize_remeasures(digits_model, digits_input, digits_data, tmp_path):
    storage = f"sqlite:///{tmp_path}/study.db"
    result = ac.compress(digits_model, digits_input, data=digits_data, objectives=("accuracy", "size_kb"),
                         space="mixed_precision", trials=3, finetune_steps=2, progress=False, storage=storage)
    study = optuna.load_study(study_name="autocompress", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("feasible")]
    assert complete and all(isinstance(t.user_attrs.get("early_stopped"), bool) for t in complete)
    judge = Evaluator(*digits_data, finetune_steps=3, teacher=digits_model)
    table, models = finalize(result, judge, 3, digits_input)
    assert list(table.index) == list(result.pareto.index)
    for n, row in table.iterrows():
        assert 0 <= row["accuracy"] <= 1
        assert row["size_kb"] == pytest.approx(ac.estimate(models[n], digits_input).size_kb)


def test_data_free_evaluator_and_bad_steps(digits_model, digits_input, digits_data):
    _, val = digits_data
    judge = make_evaluator((None, val), None, finetune_steps=10)
    assert judge.finetune_steps == 0  # nothing to train on
    names = [n for n, _ in layer_targets(ac.analyze(digits_model, digits_input))]
    model = ac.apply(digits_model, {"quantize": {"act_bits": dict.fromkeys(names, 8)}}, digits_input)
    ranges = model.get_submodule(names[2]).act_range.clone()
    assert judge(model) > 0.9 and torch.equal(model.get_submodule(names[2]).act_range, ranges)
    with pytest.raises(AutocompressError, match="finetune_steps=-1"):
        make_evaluator(None, None, finetune_steps=-1)


def test_a_fine_tuned_trial_reports_the_cost_of_the_model_as_judged(digits_model, digits_input, digits_data):
    """Surgery may splice weights back and Huffman code lengths follow the values: the trial's size is that of the
    fine-tuned model, which Result.model(n) rebuilds."""
    space = ac.SearchSpace("dc", {"sparsity": {"density": [0.3], "granularity": "global"},
                                  "share": {"bits": [3, 4], "huffman": True, "granularity": "global"}})
    result = ac.compress(digits_model, digits_input, data=digits_data, space=space, trials=2, finetune_steps=3,
                         sampler="random", seed=1, progress=False, objectives=("accuracy", "size_kb"))
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert len(done) == 2
    for number, row in done.iterrows():
        again = ac.estimate(result.model(number), digits_input)
        assert again.size_kb == pytest.approx(row["size_kb"], rel=1e-9) and again.params == row["params"]
