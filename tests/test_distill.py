"""Fine-tuning with knowledge distillation: it recovers accuracy, keeps every compression, is repeatable; multi-fidelity
rungs (successive halving over the Pareto rank) and the delivered front."""
import numpy as np
import optuna
import pytest
import torch

import autocompress as ac
from autocompress.compress.base import get_meta, layer_targets
from autocompress.errors import AutocompressError
from autocompress.evaluate import (Evaluator, Rungs, accuracy, crowding_distance, dominance_rank, fidelity_rungs,
                                   finetune, make_evaluator, seeded_batches)


@pytest.fixture(scope="module")
def pruned_policy(digits_model, digits_input):
    graph = ac.analyze(digits_model, digits_input)
    return {"prune": {"keep": {g.id: 0.375 for g in graph.groups}}}


def test_distillation_beats_bn_recalibration_alone(digits_model, digits_input, digits_data, pruned_policy):
    train, val, _ = digits_data
    recal_only = Evaluator(train, val)(ac.apply(digits_model, pruned_policy, digits_input))
    distilled = Evaluator(train, val, finetune_steps=20, teacher=digits_model)(ac.apply(digits_model, pruned_policy, digits_input))
    assert distilled >= recal_only + 0.10, (recal_only, distilled)


def test_fine_tuning_keeps_every_compression_and_is_repeatable(digits_model, digits_input, digits_data, pruned_policy):
    train, val, _ = digits_data
    names = [n for n, _ in layer_targets(ac.analyze(digits_model, digits_input))]
    policy = {**pruned_policy, "sparsity": {"density": dict.fromkeys(names, 0.3)},
              "share": {"bits": dict.fromkeys(names[:8], 3)},
              "quantize": {"weight_bits": dict.fromkeys(names[8:], 4), "act_bits": dict.fromkeys(names, 8)}}
    judge = Evaluator(train, val, finetune_steps=4, teacher=digits_model)
    models = []
    for _ in range(2):
        model = ac.apply(digits_model, policy, digits_input)
        before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        judge.judge(model)
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


def test_rungs_divide_the_steps_and_promote_by_pareto_rank():
    assert fidelity_rungs(90) == (0, 10, 30, 90) and fidelity_rungs(20) == (0, 6, 20) and fidelity_rungs(9) == (0, 9)
    assert fidelity_rungs(0) == ()
    assert list(dominance_rank(np.array([[0, 0], [1, 1], [0, 2], [2, 2]]))) == [0, 1, 1, 2]
    rule = Rungs((10, 30), eta=3)
    assert not rule.promote(0.5, (1.0,), []) and not rule.promote(0.9, (0.5,), [(0.5, (1.0,))])  # < eta judged
    peers = [(0.9, (1.0,)), (0.8, (1.0,))]
    assert not rule.promote(0.7, (1.0,), peers)  # two better models at the same cost
    assert rule.promote(0.7, (0.5,), peers)  # cheaper than both: on the front, and 3 // 3 = 1 may go on
    five = [(0.9, (1.0,)), (0.5, (1.5,)), (0.4, (1.6,)), (0.3, (1.7,)), (0.2, (1.8,))]
    assert rule.promote(0.85, (1.2,), five)  # one model ahead of it, and 6 // 3 = 2 may go on
    assert not rule.promote(0.85, (1.2,), five + [(0.95, (2.0,))])  # now two ahead, of 7
    assert not Rungs((10, 30), floor=0.9, floor_margin=0.05).promote(0.84, (0.1,), [])  # cannot reach the floor


def test_within_a_pareto_layer_the_spread_out_candidates_go_on():
    assert list(crowding_distance(np.array([[0.0, 3.0], [1.0, 2.0], [3.0, 0.0]]))) == [np.inf, 2.0, np.inf]
    curve = [(0.9, (1.0,)), (0.71, (0.72,)), (0.69, (0.68,)), (0.5, (0.5,)), (0.3, (0.3,))]  # one trade-off curve
    rule = Rungs((10, 30), eta=3)
    assert not rule.promote(0.7, (0.7,), curve)  # on the front, but crowded: behind both ends and (0.5, 0.5)
    assert rule.promote(0.2, (0.1,), curve)  # the new end of the curve


def test_a_candidate_behind_its_peers_stops_at_the_first_rung(digits_model, digits_input, digits_data, pruned_policy):
    train, val, _ = digits_data
    judge = Evaluator(train, val, finetune_steps=12, teacher=digits_model)
    assert judge.rungs.steps == (0, 4, 12)
    seen = []
    peers = lambda steps: [(1.0, (1.0,)), (0.1, (1.0,))]  # noqa: E731
    better = judge.judge(ac.apply(digits_model, pruned_policy, digits_input), (2.0,), peers,
                         lambda steps, acc: seen.append((steps, acc)))
    assert better["steps"] == 0 and better["early_stopped"] and better["rung"] == 0  # BatchNorm alone
    assert list(better["rung_accuracy"]) == ["0"] and seen == [(0, better["rung_accuracy"]["0"])]
    cheaper = judge.judge(ac.apply(digits_model, pruned_policy, digits_input), (0.5,), peers)
    assert cheaper["steps"] == 12 and not cheaper["early_stopped"] and list(cheaper["rung_accuracy"]) == ["0", "4", "12"]


def test_a_promoted_candidate_trains_exactly_as_one_fine_tune(digits_model, digits_input, digits_data, pruned_policy):
    """Rungs cut one schedule into pieces: reaching the last rung gives the weights of one uninterrupted fine-tune."""
    train, val, _ = digits_data
    judge = Evaluator(train, val, finetune_steps=12, teacher=digits_model)
    ranked = ac.apply(digits_model, pruned_policy, digits_input)
    judge.judge(ranked, (1.0,), lambda steps: [(0.0, (2.0,)), (0.0, (3.0,))])  # ahead of both: promoted
    plain = judge.calibrate(ac.apply(digits_model, pruned_policy, digits_input))
    finetune(plain, seeded_batches(train, 12), 12, digits_model)
    judge.calibrate(plain)
    for a, b in zip(ranked.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def small_data():
    """The digits split with its training set cut to 4 batches: an epoch of delivery is 4 steps, not 17."""
    from torch.utils.data import DataLoader, TensorDataset

    from autocompress.data import digits_tensors

    (xt, yt), (xv, yv), (xs, ys) = digits_tensors()
    gen = torch.Generator().manual_seed(0)
    return (DataLoader(TensorDataset(xt[:256], yt[:256]), batch_size=64, shuffle=True, generator=gen),
            DataLoader(TensorDataset(xv, yv), batch_size=256), DataLoader(TensorDataset(xs, ys), batch_size=256))


def test_search_records_rungs_and_delivers_the_front(digits_model, digits_input, small_data, tmp_path):
    digits_data = small_data
    storage = f"sqlite:///{tmp_path}/study.db"
    result = ac.compress(digits_model, digits_input, data=digits_data, objectives=("accuracy", "size_kb"),
                         space="mixed_precision", trials=4, finetune_steps=12, final_epochs=1, progress=False,
                         storage=storage)
    study = optuna.load_study(study_name="autocompress", storage=storage)
    judged = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("feasible")]
    assert judged and all(set(t.user_attrs["rung_accuracy"]) <= {"0", "4", "12"} for t in judged)
    assert all(t.user_attrs["steps"] in (0, 4, 12) for t in judged)
    front = result.pareto
    assert len(front) and front["delivered"].all() and (front["final_steps"] == len(digits_data[0])).all()
    for n, row in front.iterrows():
        model = result.model(n)
        assert accuracy(model, digits_data[1]) == row["accuracy"]
        assert accuracy(model, digits_data[2]) == row["test_accuracy"]
        assert row["size_kb"] == pytest.approx(ac.estimate(model, digits_input).size_kb)
        assert row["search_accuracy"] == study.trials[n].user_attrs["accuracy"]


def test_data_free_evaluator_and_bad_steps(digits_model, digits_input, digits_data):
    _, val, _ = digits_data
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
                         final_epochs=0, sampler="random", seed=1, progress=False, objectives=("accuracy", "size_kb"))
    assert (result.trials["state"] == "COMPLETE").sum() == 2
    for number, row in result.pareto.iterrows():  # only the front's weights are kept
        again = ac.estimate(result.model(number), digits_input)
        assert again.size_kb == pytest.approx(row["size_kb"], rel=1e-9) and again.params == row["params"]
